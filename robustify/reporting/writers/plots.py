"""``plots/``: accuracy against each defense's setting, and base-vs-defended bars (:mod:`robustify.reporting.plots`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robustify.reporting.writers.registry import WriteContext, register_writer

__all__ = ["write_plots"]

FOLDER = "plots"


def write_plots(table: pd.DataFrame, out_dir: Path, context: WriteContext) -> list[Path]:
    """Write the PNG plots (none when ``context.plots`` is off or the table is empty)."""
    if not context.plots or table.empty:
        return []
    from robustify.reporting.plots import plot_base_vs_defended, plot_setting_curves

    return plot_setting_curves(table, out_dir / FOLDER) + plot_base_vs_defended(table, out_dir / FOLDER)


register_writer("plots", write_plots)
