"""``model_info/<dataset>/<threat model>/<settings id>.json``: RobustBench's ``model_info`` JSON of every row
(:func:`robustify.reporting.leaderboard.model_info`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robustify.core.io import write_json
from robustify.reporting.writers.registry import WriteContext, register_writer

__all__ = ["write_model_info"]

FOLDER = "model_info"


def write_model_info(table: pd.DataFrame, out_dir: Path, context: WriteContext) -> list[Path]:
    """Write one ``model_info`` JSON per row (atomically)."""
    from robustify.reporting import leaderboard  # the table's module

    paths = []
    for _, row in table.iterrows():
        path = out_dir / FOLDER / str(row["dataset"]) / str(row["threat_model"]) / f"{row['settings_id']}.json"
        write_json(path, leaderboard.model_info(row))
        paths.append(path)
    return paths


register_writer("model_info", write_model_info)
