"""The project's error classes, in one module at the bottom of the layers.

Every error a user can cause and fix (a bad spec, file, setting or input) is a :class:`UserError`:
the command line prints it as one line and exits with status 2. Any other exception is a bug in
robustify or below it: the command line says so and exits with status 1 (``--debug`` shows the
traceback). :class:`UserError` derives from ``ValueError`` so that code catching ``ValueError``
around configs keeps working; the other classes add the built-in they stood for before.

Each is re-exported from the module that raises it (``robustify.load.models.ModelLoadError`` ...),
so both import paths name the same class.
"""

from __future__ import annotations

__all__ = [
    "first_line",
    "DataError",
    "EvaluationLockedError",
    "InsertionError",
    "JournalMismatchError",
    "ModelLoadError",
    "NotCalibratedError",
    "OutOfMemory",
    "StateMismatchError",
    "UserError",
]


class UserError(ValueError):
    """Base of every error the user can fix: bad input, spec, file or setting (the CLI: one line, exit 2)."""


class ModelLoadError(UserError):
    """A model spec or checkpoint could not be loaded."""


class DataError(UserError):
    """A dataset spec, file or content is unusable."""


class InsertionError(UserError):
    """The model has no site to insert into, or the selection leaves none."""


class NotCalibratedError(UserError, RuntimeError):
    """A calibrated defense's module ran before its statistics were computed or loaded."""


class StateMismatchError(UserError):
    """Saved state does not fit the model, or the file is unreadable."""


class OutOfMemory(UserError, RuntimeError):
    """Even the smallest allowed batch size ran out of memory."""


class EvaluationLockedError(UserError, RuntimeError):
    """Another evaluation is writing the same results directory."""


class JournalMismatchError(UserError):
    """The results directory holds a different evaluation."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
