"""``index.html``: the self-contained, sortable page (:func:`robustify.reporting.page.render_page`), with the
PNG plots the earlier writers wrote embedded."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robustify.reporting.page import write_page
from robustify.reporting.writers.registry import WriteContext, register_writer

__all__ = ["write_html"]


def write_html(table: pd.DataFrame, out_dir: Path, context: WriteContext) -> list[Path]:
    """Write ``out_dir/index.html`` (atomically)."""
    return [write_page(table, out_dir, context.written_files(".png"))]


register_writer("html", write_html)
