"""The leaderboard as a web page and a LaTeX table, from the leaderboard table alone.

:func:`write_page` renders ``index.html`` with the Jinja2 template shipped in
``robustify/reporting/templates``: one static file (inline CSS and script, plots embedded as base64
PNG, no network fetch), sortable columns, each row's settings and flags with what every flag
means, and the rows of one model (base and defended) grouped. The columns a reader compares lead
(:func:`robustify.reporting.tables.layout`: rank, model, defense and its settings, clean and worst-case
accuracy each with its interval in one cell, the difference to the base row, verdict, flags); the others
(per-attack accuracies, the paired test, audit figures, costs) follow behind the *every column* toggle.
What a column or flag means comes from :mod:`robustify.reporting.legend`. :func:`write_latex` writes a
booktabs table of the ranked rows with pandas' Styler, ready to ``\\input`` in a paper.
Columns are rendered from the table as it is, so new leaderboard columns appear without
changes here.
"""

from __future__ import annotations

import base64
import logging
import math
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from markupsafe import Markup, escape

from robustify.core.io import write_text
from robustify.reporting.legend import FLAG, FLAG_EXPLANATIONS, UNKNOWN, column_legend, explain_column, explain_flag
from robustify.reporting.settings import setting_columns
from robustify.reporting.tables import acc_cell, layout

logger = logging.getLogger(__name__)

__all__ = ["FLAG_EXPLANATIONS", "render_page", "to_latex", "write_latex", "write_page"]

UNKNOWN_FLAG = UNKNOWN.format(kind=FLAG)

#: Columns shown in each row's settings panel instead of the table.
DETAIL_COLUMNS = ("attacks", "budgets", "not_applicable", "settings_id", "robustify_version", "torch_version",
                  "pyautoattack_version", "result")
GROUP_COLUMNS = ("model", "dataset", "threat_model", "eps", "n_examples")
TEMPLATE = "leaderboard.html.j2"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any) -> str:
    if _missing(value):
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _flags(text: Any) -> list[dict[str, str]]:
    names = [f for f in str(text or "").split(";") if f] if not _missing(text) else []
    return [{"name": f, "explanation": explain_flag(f)} for f in names]


def _skipped(text: Any) -> dict[str, str]:
    """``not_applicable`` text ("attack: why; ...") as {attack column: why}."""
    reasons = {}
    for item in ("" if _missing(text) else str(text)).split("; "):
        attack, sep, why = item.partition(":")
        if sep:
            reasons[f"{attack}_acc"] = why.strip()
    return reasons


def _group_keys(df: pd.DataFrame) -> list[str]:
    cols = [c for c in GROUP_COLUMNS if c in df.columns]
    return [" ".join(_text(v) for v in row) for row in df[cols].itertuples(index=False)]


def _grouped_order(df: pd.DataFrame, keys: list[str]) -> list[int]:
    """Row positions grouped by model settings (groups by their best rank), base row first in each."""
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    base = [0 if d == "none" else 1 for d in df.get("defense", pd.Series(["?"] * len(df)))]
    return sorted(range(len(df)), key=lambda i: (first[keys[i]], base[i], i))


def _numeric(column: pd.Series) -> bool:
    """Whether ``column`` holds numbers: a numeric dtype, or objects that are all numbers or missing (a paired
    column is None on base rows)."""
    if pd.api.types.is_bool_dtype(column):
        return False
    if pd.api.types.is_numeric_dtype(column):
        return True
    values = [v for v in column if not _missing(v)]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _cell(df: pd.DataFrame, column: str, record: pd.Series, skipped: dict[str, str]) -> dict[str, Any]:
    """One cell: its text (an accuracy with its interval, ``20.0 [14.7, 26.2]``), sort key and tooltip."""
    value = record[column]
    numeric = _numeric(df[column])
    if column in skipped and _missing(value):
        return {"text": "n/a", "sort": "", "title": skipped[column], "numeric": numeric}
    sort = "" if _missing(value) or not numeric else repr(float(value))
    if numeric and column.endswith("_acc"):
        return {"text": acc_cell(value, record.get(column[:-4] + "_ci95")), "sort": sort, "title": "",
                "numeric": numeric}
    return {"text": _text(value), "sort": sort, "title": "", "numeric": numeric}


def _rows(df: pd.DataFrame, columns: list[str]) -> list[dict[str, Any]]:
    keys = _group_keys(df)
    order = _grouped_order(df, keys)
    group_ids = {key: n for n, key in enumerate(dict.fromkeys(keys[i] for i in order))}
    rows = []
    for position, i in enumerate(order):
        record = df.iloc[i]
        skipped = _skipped(record.get("not_applicable"))
        rows.append({
            "cells": [_cell(df, c, record, skipped) for c in columns],
            "flags": _flags(record.get("flags")),
            "details": [(c, _text(record[c])) for c in df.columns if c in DETAIL_COLUMNS and _text(record[c])],
            "group": group_ids[keys[i]],
            "group_label": keys[i],
            "group_start": position == 0 or keys[order[position - 1]] != keys[i],
            "base": record.get("defense") == "none",
        })
    return rows


def _code(text: str) -> Markup:
    """A legend text with its `names` as ``<code>`` (the rest escaped)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _plots(paths: Sequence[str | Path]) -> list[dict[str, str]]:
    plots = []
    for path in paths:
        data = Path(path).read_bytes()
        plots.append({"name": Path(path).name, "src": "data:image/png;base64," + base64.b64encode(data).decode()})
    return plots


def render_page(df: pd.DataFrame, plots: Sequence[str | Path] = (), title: str = "robustify leaderboard") -> str:
    """The leaderboard page as one self-contained HTML string."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("robustify.reporting", "templates"), autoescape=select_autoescape(["j2", "html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["code"] = _code
    shape = layout(df, hidden=DETAIL_COLUMNS)
    columns = [*shape.lead, *shape.more]
    seen = {f for text in df.get("flags", []) for f in str(text or "").split(";") if f and not _missing(text)}
    return env.get_template(TEMPLATE).render(
        title=title, columns=columns, lead=len(shape.lead), rows=_rows(df, columns), plots=_plots(plots),
        headers=[{"name": c, "explanation": explain_column(c), "more": i >= len(shape.lead)}
                 for i, c in enumerate(columns)],
        common=[(c, _text(v)) for c, v in shape.common.items()],
        column_legend=column_legend(df.columns),  # the intervals in their cells and the settings panel too
        flags=[{"name": f, "explanation": e, "seen": f in seen} for f, e in FLAG_EXPLANATIONS.items()]
        + [{"name": f, "explanation": UNKNOWN_FLAG, "seen": True} for f in sorted(seen - set(FLAG_EXPLANATIONS))],
        budgets=sorted(set(df["budgets"])) if "budgets" in df.columns else [],
    )


def write_page(df: pd.DataFrame, out_dir: str | Path, plots: Sequence[str | Path] = ()) -> Path:
    """Write ``index.html`` into ``out_dir`` (atomically)."""
    path = Path(out_dir) / "index.html"
    write_text(path, render_page(df, plots))
    return path


def _latex_columns(df: pd.DataFrame) -> list[str]:
    ident = [c for c in ("rank", "model", "defense", *setting_columns(df.columns), "eps", "n_examples")
             if c in df.columns]
    # accuracy columns with at least one number (an all-empty column, e.g. autoattack_acc where no row earned it,
    # is left out whether it reads as None objects from the results or as NaN from the CSV)
    accs = [c for c in df.columns if c.endswith("_acc") and pd.to_numeric(df[c], errors="coerce").notna().any()]
    return ident + accs


def to_latex(df: pd.DataFrame) -> str:
    """A booktabs table (``\\toprule``/``\\midrule``/``\\bottomrule``) of the ranked rows, accuracies in percent."""
    cols = _latex_columns(df)
    view = df[cols].copy()
    for setting in setting_columns(view.columns):
        view[setting] = view[setting].map(lambda a: "" if _missing(a) else f"{a:g}")
    accs = [c for c in cols if c.endswith("_acc")]
    view[accs] = view[accs].apply(pd.to_numeric, errors="coerce")
    styler = (view.style.hide(axis="index")
              .format(escape="latex", na_rep="--")
              .format("{:.2f}", subset=accs, na_rep="--")
              .format_index(escape="latex", axis=1))
    align = "".join("r" if c in accs or c in ("rank", "n_examples") else "l" for c in cols)
    body = styler.to_latex(hrules=True, column_format=align)
    note = ("% robustify leaderboard: accuracies in percent, ranked by worst_case_acc (no attack broke the example).\n"
            "% Needs \\usepackage{booktabs}.\n")
    return note + body


def write_latex(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write ``leaderboard.tex`` into ``out_dir`` (atomically)."""
    path = Path(out_dir) / "leaderboard.tex"
    write_text(path, to_latex(df))
    return path
