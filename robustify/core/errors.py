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
    """Base of every error the user can fix: bad input, spec, file or setting (the CLI: one line, exit 2).

    Examples:
        >>> try:
        ...     rb.parse_eps("eight")
        ... except rb.UserError as error:
        ...     print(error)
        eps must be a number or a fraction like '8/255', got 'eight'
    """


class ModelLoadError(UserError):
    """A model spec or checkpoint could not be loaded.

    Examples:
        >>> try:
        ...     rb.load_model("no-such-model")
        ... except rb.ModelLoadError as error:
        ...     print(error)
        unknown model spec 'no-such-model': use robustbench:NAME, timm:NAME, small-resnet-at, aa-resnet18 or package.module:function
    """


class DataError(UserError):
    """A dataset spec, file or content is unusable.

    Examples:
        >>> try:
        ...     rb.load_data("missing.npz")
        ... except rb.DataError as error:
        ...     print(error)
        data file 'missing.npz' does not exist
    """


class InsertionError(UserError):
    """The model has no site to insert into, or the selection leaves none.

    Examples:
        >>> import torch
        >>> from robustify.defenses import defense_config, get_defense
        >>> try:
        ...     rb.apply_defense(torch.nn.Linear(4, 2), torch.rand(1, 4), defense_config("meansparse"))
        ... except rb.InsertionError as error:
        ...     print(str(error)[:34])
        no activation found in Linear: sea
    """


class NotCalibratedError(UserError, RuntimeError):
    """A calibrated defense's module ran before its statistics were computed or loaded.

    Examples:
        >>> from robustify.defenses import defense_config, get_defense
        >>> model, info = rb.load_model("aa-resnet18")
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("meansparse", alpha=0.2))
        >>> try:
        ...     model(info.example_input())
        ... except rb.NotCalibratedError as error:
        ...     print(str(error)[:45])
        MeanSparse site 'relu_0' has no statistics: r
    """


class StateMismatchError(UserError):
    """Saved state does not fit the model, or the file is unreadable.

    Examples:
        >>> model, info = rb.load_model("aa-resnet18")
        >>> try:
        ...     rb.load_defense(model, "nowhere.safetensors", info.example_input())
        ... except rb.StateMismatchError as error:
        ...     print(str(error)[:42])
        defense sidecar 'nowhere.safetensors.json'
    """


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
