"""Pieces shared by :mod:`robustify.load.models` and :mod:`robustify.load.zoo` (below both, so
``zoo`` needs nothing from ``models``)."""

from __future__ import annotations

from pathlib import Path

from robustify.core.errors import first_line  # noqa: F401 - re-exported: models and zoo import it from here
from robustify.load.datasets import FieldTable

#: ``{dataset: classes}``, a live view of the dataset registry (:mod:`robustify.load.datasets`)
DATASET_CLASSES = FieldTable("classes")


def html_page_error(path: str | Path) -> str | None:
    """A one-line reason if the file at ``path`` is an HTML page (not weights), else ``None``.

    Google Drive answers large or rate-limited downloads with an HTML confirmation or quota
    page, which downloaders then save under the checkpoint's name.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(512).lstrip().lower()
    except OSError:
        return None
    if not head.startswith((b"<!doctype html", b"<html")):
        return None
    return (
        f"checkpoint {str(path)!r} is an HTML page, not weights (a download, e.g. from Google Drive, "
        "saved its confirmation or quota page): delete it and download the file again"
    )
