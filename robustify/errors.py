"""The project's error classes, in one module at the bottom of the layers.

Each is re-exported from the module that raises it (``robustify.models.ModelLoadError`` ...),
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
]


class ModelLoadError(ValueError):
    """A model spec or checkpoint could not be loaded."""


class DataError(ValueError):
    """A dataset spec, file or content is unusable."""


class InsertionError(ValueError):
    """The model has no site to insert into, or the selection leaves none."""


class NotCalibratedError(RuntimeError):
    """Raised when an uncalibrated MeanSparse module is run outside calibration."""


class StateMismatchError(ValueError):
    """Saved state does not fit the model, or the file is unreadable."""


class OutOfMemory(RuntimeError):
    """Even the smallest allowed batch size ran out of memory."""


class EvaluationLockedError(RuntimeError):
    """Another evaluation is writing the same results directory."""


class JournalMismatchError(ValueError):
    """The results directory holds a different evaluation."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
