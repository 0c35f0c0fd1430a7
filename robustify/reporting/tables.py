"""Which leaderboard columns lead and which follow: the layout the markdown and the page share.

A reader compares worst cases, so the tables lead with what identifies a row and what it scored
(:data:`LEAD`): rank, model, defense and its settings (the defenses' registered ``setting`` columns,
:mod:`robustify.reporting.settings`), clean accuracy and the worst case, each with its 95% interval in
one cell (``20.0 [14.7, 26.2]``, :func:`acc_cell`), the difference to the base row, the verdict and the
flags. The set-up columns (dataset, threat model, eps, examples, mode) lead only where rows differ in
them; otherwise one line above the table says them once (:func:`common_setup`). Everything else (per
attack accuracies, the paired test, audit figures, costs) comes after: behind a toggle on the page, in
further tables of at most :data:`MAX_MARKDOWN_COLUMNS` columns in ``leaderboard.md``; the CSV keeps
every column. Nothing here names a defense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from robustify.reporting.legend import legend_markdown
from robustify.reporting.settings import setting_columns

__all__ = ["LEAD", "MAX_MARKDOWN_COLUMNS", "Layout", "acc_cell", "common_setup", "layout", "markdown_tables"]

#: the columns a reader compares, in order; the setting columns go after ``defense``, the set-up columns
#: where rows differ in them after the settings
LEAD = ("rank", "model", "defense", "clean_acc", "worst_case_acc", "delta_worst_case", "verdict", "flags")
SETUP = ("dataset", "threat_model", "eps", "n_examples", "mode")
#: markdown tables stay readable in a terminal and on GitHub
MAX_MARKDOWN_COLUMNS = 12
#: in no markdown table (the CSV has them): the row's identity, provenance and long per-attack texts
CSV_ONLY = ("base_settings_id", "not_applicable", "attacks", "budgets", "cost", "seconds_per_attack", "settings_id",
            "robustify_version", "torch_version", "pyautoattack_version", "result")
#: what identifies a row in the markdown tables after the first
KEY = ("rank", "defense")
PER_ATTACK = "Per attack"
OTHERS = "Paired test, audit and cost"


@dataclass(frozen=True)
class Layout:
    """The columns of a leaderboard table, in the order they are shown.

    Attributes:
        lead: the columns shown first (on the page without the toggle; the first markdown table).
        more: every other column the page shows behind its toggle, in the table's order, the ``common`` ones
            last (each ``<x>_ci95`` is in its accuracy's cell, so none is listed).
        common: the set-up columns with one value for every row, and that value (said once above the table).
    """

    lead: tuple[str, ...]
    more: tuple[str, ...]
    common: dict[str, Any]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def common_setup(df: pd.DataFrame) -> dict[str, Any]:
    """The set-up columns of ``df`` whose value is the same on every row (none for an empty table)."""
    if df.empty:
        return {}
    return {c: df[c].iloc[0] for c in SETUP if c in df.columns and df[c].astype(str).nunique(dropna=False) == 1}


def layout(df: pd.DataFrame, hidden: tuple[str, ...] = ()) -> Layout:
    """The lead and the other columns of ``df``; ``hidden`` columns are in neither."""
    common = common_setup(df)
    at = LEAD.index("defense") + 1
    varying = [c for c in SETUP if c in df.columns and c not in common]
    lead = [c for c in (*LEAD[:at], *setting_columns(df.columns), *varying, *LEAD[at:]) if c in df.columns]
    more = [c for c in df.columns if c not in lead and c not in hidden and not _is_interval(c, df.columns)]
    more = [c for c in more if c not in common] + [c for c in more if c in common]  # said once above: last
    return Layout(tuple(lead), tuple(more), common)


def _is_interval(column: str, columns: Any) -> bool:
    return column.endswith("_ci95") and column[:-5] + "_acc" in columns


def _number(value: float) -> str:
    """``20.0``, ``19.5``, ``56.37``: the value as the table has it (to 0.01), at least one decimal."""
    text = f"{value:.2f}"
    return text[:-1] if text.endswith("0") else text


def _round_outward(value: float, direction: Callable[[float], int]) -> float:
    """``value`` to 0.1 in ``direction`` (math.floor or math.ceil); 14.7 stays 14.7 (no float noise)."""
    return direction(round(value * 10, 6)) / 10


def acc_cell(value: Any, interval: Any = None) -> str:
    """An accuracy and its interval in one cell, ``20.0 [14.7, 26.2]`` (the interval rounded outward to
    0.1, so the shown interval always contains the exact one of the CSV); ``""`` for a missing accuracy,
    the accuracy alone without an interval."""
    if _missing(value):
        return ""
    text = _number(float(value))
    if isinstance(interval, str) and interval.startswith("["):
        lo, hi = (float(v) for v in interval.strip("[]").split(","))
        text += f" [{_round_outward(lo, math.floor):.1f}, {_round_outward(hi, math.ceil):.1f}]"
    return text


def _settings_text(row: pd.Series, settings: list[str]) -> str:
    return ", ".join(f"{s}={row[s]:g}" if isinstance(row[s], float) else f"{s}={row[s]}" for s in settings
                     if not _missing(row[s]))


def _markdown_view(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as text: empty cells for missing values, ``n/a`` where the attack does not apply, each lead
    accuracy with its interval."""
    view = df.copy().astype(object)
    for col in view.columns:
        view[col] = view[col].map(lambda v: "" if _missing(v) else str(v))
    if "flags" in view.columns:
        view["flags"] = view["flags"].str.replace(";", ", ")
    for col in ("clean_acc", "worst_case_acc"):
        if col in df.columns:
            ci = df[col[:-4] + "_ci95"] if col[:-4] + "_ci95" in df.columns else [None] * len(df)
            view[col] = [acc_cell(v, c) for v, c in zip(df[col], ci)]
    for i, text in enumerate(df["not_applicable"] if "not_applicable" in df.columns else []):
        for item in filter(None, "" if _missing(text) else str(text).split("; ")):
            col = item.split(":", 1)[0] + "_acc"
            if col in view.columns:
                view.iloc[i, view.columns.get_loc(col)] = "n/a"
    return view


def _fit(view: pd.DataFrame, lead: list[str], settings: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """The lead columns within :data:`MAX_MARKDOWN_COLUMNS`: when they would not fit, the settings in one
    ``settings`` column and the varying set-up columns in one ``setup`` column."""
    if len(lead) <= MAX_MARKDOWN_COLUMNS:
        return view, lead
    view = view.copy()
    varying = [c for c in lead if c in SETUP]
    view["settings"] = [_settings_text(row, settings) for _, row in view.iterrows()]
    view["setup"] = [" ".join(str(row[c]) for c in varying) for _, row in view.iterrows()]
    folded = [c for c in lead if c not in settings and c not in varying]
    at = folded.index("defense") + 1
    return view, folded[:at] + ["settings", "setup"] + folded[at:]


def _table(view: pd.DataFrame, columns: list[str]) -> str:
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return header + "".join("| " + " | ".join(row) + " |\n" for row in view[columns].itertuples(index=False))


def _chunks(columns: list[str], width: int) -> list[list[str]]:
    return [columns[i:i + width] for i in range(0, len(columns), width)] or [[]]


def markdown_tables(df: pd.DataFrame) -> str:
    """The leaderboard as markdown: the lead table, then the other columns in tables of at most
    :data:`MAX_MARKDOWN_COLUMNS` columns keyed by rank and defense, then the legend and the attack budgets."""
    if df.empty:
        return "_no results yet_\n"
    settings = setting_columns(df.columns)
    shape = layout(df, hidden=CSV_ONLY)
    view = _markdown_view(df)
    view, lead = _fit(view, list(shape.lead), settings)
    keyed = view.copy()
    keyed["defense"] = [d + (f" ({s})" if s else "") for d, s in
                        zip(view["defense"], (_settings_text(row, settings) for _, row in df.iterrows()))]
    rest = [c for c in shape.more if c not in shape.common]
    attack_cols = [c for c in rest if c.endswith("_acc")]
    other_cols = [c for c in rest if c not in attack_cols]
    common = ", ".join(f"{c} {v}" for c, v in shape.common.items())
    text = (f"All rows: {common}.\n\n" if common else "") + _table(view, lead)
    text += ("\nAccuracies in percent, `[lo, hi]` its 95% interval; ranked by `worst_case_acc`, the share of examples "
             "no attack broke. The per-attack accuracies, the paired test, the audit figures and the costs follow "
             "in the tables below; `leaderboard.csv` has every column (every interval, the attacks, budgets, "
             "versions and result paths), `index.html` shows them behind its *every column* toggle and each row's "
             "*settings*.\n")
    width = MAX_MARKDOWN_COLUMNS - len(KEY)
    for title, cols in ((PER_ATTACK, attack_cols), (OTHERS, other_cols)):
        for part in _chunks(cols, width):
            if part:
                text += f"\n### {title}\n\n" + _table(keyed, [*KEY, *part])
    shown = [*lead, *shape.common, *rest]
    flags = {f for v in df.get("flags", []) if not _missing(v) for f in str(v).split(";") if f}
    text += "\n### Legend\n\n" + legend_markdown(shown, [c for c in df.columns if c not in shown], flags)
    budgets = sorted(set(df["budgets"])) if "budgets" in df.columns else []
    if budgets:
        text += "\nAttack budgets:\n" + "".join(f"- `{b}`\n" for b in budgets)
    return text
