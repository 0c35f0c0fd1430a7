"""The leaderboard's output formats: the writer registry (:mod:`.registry`) and one file per built-in format.

Built-in writers, registered on import in the order they run: ``csv`` (:mod:`.csv`), ``markdown``
(:mod:`.markdown`), ``model_info`` (:mod:`.model_info`), ``plots`` (:mod:`.plots`), ``html`` (:mod:`.html`,
which embeds the plots) and ``latex`` (:mod:`.latex`). A third-party format is one module that calls
:func:`register_writer`, declared in the ``robustify.writers`` entry-point group (:mod:`robustify.core.plugins`).
"""

from robustify.reporting.writers.registry import (ENTRY_POINT_GROUP, WriteContext, WriteFunction, Writer, get_writer,
                                                  load_plugins, register_writer, run_writers, unregister_writer,
                                                  writer_names, writers)
from robustify.reporting.writers import csv as _csv  # noqa: F401, I001 - the built-ins register, in this order
from robustify.reporting.writers import markdown as _markdown  # noqa: F401
from robustify.reporting.writers import model_info as _model_info  # noqa: F401
from robustify.reporting.writers import plots as _plots  # noqa: F401
from robustify.reporting.writers import html as _html  # noqa: F401
from robustify.reporting.writers import latex as _latex  # noqa: F401

#: the built-in writers' names, in the order they run
BUILTIN_WRITERS = ("csv", "markdown", "model_info", "plots", "html", "latex")

__all__ = ["BUILTIN_WRITERS", "ENTRY_POINT_GROUP", "WriteContext", "WriteFunction", "Writer", "get_writer",
           "load_plugins", "register_writer", "run_writers", "unregister_writer", "writer_names", "writers"]
