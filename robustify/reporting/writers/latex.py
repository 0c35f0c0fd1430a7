"""``leaderboard.tex``: a booktabs table of the ranked rows (:func:`robustify.reporting.page.to_latex`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robustify.reporting.page import write_latex
from robustify.reporting.writers.registry import WriteContext, register_writer

__all__ = ["write_tex"]


def write_tex(table: pd.DataFrame, out_dir: Path, context: WriteContext) -> list[Path]:
    """Write ``out_dir/leaderboard.tex`` (atomically)."""
    return [write_latex(table, out_dir)]


register_writer("latex", write_tex)
