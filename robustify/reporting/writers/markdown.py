"""``leaderboard.md``: the readable table (:func:`robustify.reporting.leaderboard.to_markdown`) and, when the
results directory has one, its ``REPRODUCE.md`` (the commands that produced the results)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robustify.core.io import write_text
from robustify.reporting.writers.registry import WriteContext, register_writer

__all__ = ["write_markdown"]

FILE = "leaderboard.md"
TITLE = "# robustify leaderboard\n\n"


def write_markdown(table: pd.DataFrame, out_dir: Path, context: WriteContext) -> list[Path]:
    """Write ``out_dir/leaderboard.md`` (atomically)."""
    from robustify.reporting import leaderboard  # the table's module (looked up at call time: tests replace it)

    note = leaderboard.reproduce_note(context.results_root) if context.results_root is not None else ""
    path = out_dir / FILE
    write_text(path, TITLE + leaderboard.to_markdown(table) + (f"\n{note}\n" if note else ""))
    return [path]


register_writer("markdown", write_markdown)
