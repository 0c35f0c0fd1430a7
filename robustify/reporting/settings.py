"""The defenses' settings as leaderboard columns, from the defense registry alone.

A defense that registers a ``setting`` (:attr:`robustify.defenses.Defense.setting`, e.g. MeanSparse's
``alpha``) records it in every result's ``meta`` under that name (its ``meta`` hook); the leaderboard
shows one column per setting that some row has a value for, after ``defense``, and plots accuracy
against it (:func:`robustify.reporting.plots.plot_setting_curves`), labelled with the defense's
``title``. Nothing here names a defense.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from robustify.defenses.registry import defense_names, get_defense, handlers

__all__ = ["SettingDefense", "defense_title", "setting_columns", "setting_defenses", "setting_names",
           "setting_symbol"]


@dataclass(frozen=True)
class SettingDefense:
    """One registered defense name with a numeric setting: its leaderboard ``defense`` value, setting, title."""

    name: str
    setting: str
    title: str


def setting_names() -> tuple[str, ...]:
    """Every registered defense's setting name, each once, in registration order."""
    return tuple(dict.fromkeys(h.setting for h in handlers() if h.setting))


def setting_columns(columns: Iterable[str]) -> list[str]:
    """The setting columns among ``columns`` (a table's), in registration order."""
    present = set(columns)
    return [s for s in setting_names() if s in present]


def setting_defenses() -> list[SettingDefense]:
    """Every registered defense name whose defense has a setting, in registration order."""
    return [SettingDefense(name, h.setting, defense_title(name)) for h in handlers() if h.setting for name in h.names]


def defense_title(name: str) -> str:
    """The display name of the defense registered as ``name``: its ``title`` for its main name, else ``name``
    (another name of a registration serving several, or a name not registered here)."""
    if name not in defense_names():
        return name
    defense = get_defense(name)
    return defense.title if name == defense.name else name


def setting_symbol(setting: str) -> str:
    """How a setting is written in a short label: a Greek letter's name as the letter (``alpha``: α), else itself."""
    try:
        return unicodedata.lookup(f"GREEK SMALL LETTER {setting.upper()}")
    except KeyError:
        return setting
