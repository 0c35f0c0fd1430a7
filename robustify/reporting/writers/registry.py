"""The output-format registry: one writer per file format of the leaderboard.

A writer is ``write(table, out_dir, context) -> [paths written]``, registered once::

    register_writer("csv", write_csv)

:func:`robustify.reporting.leaderboard.write_leaderboard` builds the table and runs every registered
writer in registration order (:func:`run_writers`); a writer sees what the earlier ones wrote in
``context.written`` (the page embeds the plots written before it). Third-party writers register
through the ``robustify.writers`` entry-point group (:func:`load_plugins`) and run after the built-in ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from robustify.core.errors import UserError
from robustify.core.plugins import load_entry_points

logger = logging.getLogger(__name__)

__all__ = ["ENTRY_POINT_GROUP", "WriteContext", "WriteFunction", "Writer", "get_writer", "load_plugins",
           "register_writer", "run_writers", "unregister_writer", "writer_names", "writers"]

#: the entry-point group third-party writers register in (``name = "package.module"``; importing it registers)
ENTRY_POINT_GROUP = "robustify.writers"


@dataclass
class WriteContext:
    """What a writer may use besides the table.

    Attributes:
        results_root: the directory the table's results were collected from (None: not from a directory).
        plots: whether plots are wanted (``write_leaderboard(..., plots=False)`` skips them).
        written: the paths each earlier writer wrote, by writer name, in the order they ran.
    """

    results_root: Path | None = None
    plots: bool = True
    written: dict[str, list[Path]] = field(default_factory=dict)

    def written_files(self, suffix: str = "") -> list[Path]:
        """Every path the earlier writers wrote (ending in ``suffix`` when given), in the order they were written."""
        return [p for paths in self.written.values() for p in paths if p.name.endswith(suffix)]


#: ``write(table, out_dir, context) -> [paths written]``
WriteFunction = Callable[[pd.DataFrame, Path, WriteContext], list[Path]]


@dataclass(frozen=True)
class Writer:
    """One registered output format: its name and its write function."""

    name: str
    write: WriteFunction


_WRITERS: dict[str, Writer] = {}


def register_writer(name: str, write: WriteFunction) -> Writer:
    """Register ``write`` as the output format ``name`` (a name may be registered once); returns the writer."""
    if not name or not callable(write):
        raise TypeError(f"register_writer takes a name and a write(table, out_dir, context) function, got {name!r}")
    if name in _WRITERS and _WRITERS[name].write is not write:
        raise UserError(f"writer {name!r} already registered")
    _WRITERS[name] = Writer(name, write)
    logger.debug("writer %r registered", name)
    return _WRITERS[name]


def unregister_writer(name: str) -> None:
    """Forget writer ``name`` (tests and plugin reloads); nothing if it is not registered."""
    _WRITERS.pop(name, None)


def load_plugins() -> list[str]:
    """Import the modules of the ``robustify.writers`` entry points (they register themselves); the names loaded."""
    return load_entry_points(ENTRY_POINT_GROUP)


def writer_names() -> tuple[str, ...]:
    """The registered writers' names, in the order they run."""
    return tuple(_WRITERS)


def writers() -> tuple[Writer, ...]:
    """The registered writers, in the order they run."""
    return tuple(_WRITERS.values())


def get_writer(name: str) -> Writer:
    """The writer registered as ``name``; a one-line error for an unknown name."""
    if name not in _WRITERS:
        load_plugins()
    if name not in _WRITERS:
        raise UserError(f"unknown writer {name!r}; choose from {list(_WRITERS)}")
    return _WRITERS[name]


def run_writers(table: pd.DataFrame, out_dir: str | Path, context: WriteContext | None = None,
                names: Iterable[str] | None = None) -> dict[str, list[Path]]:
    """Run the writers ``names`` (None: every registered one, the plugins' too) in registration order;
    the paths each wrote, by name."""
    load_plugins()
    context = context if context is not None else WriteContext()
    chosen = [get_writer(n) for n in names] if names is not None else list(writers())
    order = {w.name: i for i, w in enumerate(writers())}
    for writer in sorted(chosen, key=lambda w: order[w.name]):
        context.written[writer.name] = list(writer.write(table, Path(out_dir), context))
        logger.debug("writer %r wrote %d file(s)", writer.name, len(context.written[writer.name]))
    return context.written
