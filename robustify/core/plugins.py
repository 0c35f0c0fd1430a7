"""Entry-point plugins: third-party packages extend robustify by declaring entry points.

A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."robustify.defenses"]
    mydefense = "robustify_mydefense"

and importing ``robustify`` imports ``robustify_mydefense``, which registers itself
(``register_defense``, ``register_attack``, ``register_dataset``, ``register_writer``), as pytest
loads the ``pytest11`` group. The groups are listed in :data:`GROUPS`. A plugin that fails to import
is logged and skipped: a broken plugin never stops robustify (``ROBUSTIFY_NO_PLUGINS=1`` skips them all).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os

__all__ = ["GROUPS", "load_entry_points", "load_plugins"]

logger = logging.getLogger(__name__)

#: the entry-point groups robustify reads: what each one's modules register
GROUPS = ("robustify.defenses", "robustify.attacks", "robustify.datasets", "robustify.writers")

_loaded: dict[str, list[str]] = {}


def load_entry_points(group: str) -> list[str]:
    """Import every module of the entry points of ``group`` once; the names loaded."""
    if group in _loaded:
        return _loaded[group]
    names: list[str] = []
    _loaded[group] = names
    if os.environ.get("ROBUSTIFY_NO_PLUGINS"):
        return names
    for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop robustify
            logger.warning("robustify plugin %r (%s) failed to load and is skipped: %s", ep.name, ep.value, exc)
            continue
        names.append(ep.name)
    return names


def load_plugins() -> dict[str, list[str]]:
    """Load the plugins of every group of :data:`GROUPS`; the names loaded per group."""
    return {group: load_entry_points(group) for group in GROUPS}
