"""``leaderboard.csv``: every column of the table, one row per leaderboard row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robustify.core.io import atomic_path
from robustify.reporting.writers.registry import WriteContext, register_writer

__all__ = ["write_csv"]

FILE = "leaderboard.csv"


def write_csv(table: pd.DataFrame, out_dir: Path, context: WriteContext) -> list[Path]:
    """Write ``out_dir/leaderboard.csv`` (atomically)."""
    path = out_dir / FILE
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return [path]


register_writer("csv", write_csv)
