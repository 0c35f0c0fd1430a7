"""The defense registry: one handler per defense, and the generic API that reads it.

Each defense module registers its handler (in the spirit of torchao's
``register_quantize_module_handler`` and PEFT's ``register_peft_method``)::

    register_defense(DefenseHandler(names=("smoothrelu",), config_type=SmoothReLUConfig, ...))

and from then on :func:`apply_defense`, :func:`remove_defense`, :func:`save_defense_state`,
:func:`load_defense_state`, the CLI choices, ``robustify inspect --defense``, training and
the evaluation pipeline know it; none of them lists defenses or switches on their type.
This module sits below every defense module (they import it to register), so it imports
none of them: the handlers are filled in by the defense modules when ``robustify`` is
imported.

:func:`apply_defense` records the config on the returned model as ``robustify_defense``
(as PEFT keeps ``peft_config``); :func:`save_defense_state` uses it when no config is given.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .defense_file import read_sidecar
from .errors import StateMismatchError

__all__ = [
    "CONFIG_ATTR",
    "DefenseHandler",
    "applied_config",
    "applied_sites",
    "apply_defense",
    "defense_config",
    "defense_names",
    "file_defense",
    "get_defense",
    "handler_for_config",
    "load_defense_state",
    "plan_defense",
    "record_config",
    "register_defense",
    "remove_defense",
    "save_defense_state",
]

CONFIG_ATTR = "robustify_defense"
#: the sites a defense changed, for the defenses whose modules do not name them (activation swaps)
SITES_ATTR = "robustify_defense_sites"


@dataclass(frozen=True)
class DefenseHandler:
    """What the generic API needs to know about one defense (one or several names).

    Attributes:
        names: the defense names (``--defense`` choices) this handler serves.
        config_type: its config dataclass.
        make_config: ``(name, **options) -> config`` (options are config fields).
        name_of: ``config -> name`` (the inverse of ``make_config``).
        plan: ``(model, example, config) -> sites`` it would change, changing nothing.
        apply: ``(model, example, config) -> model`` to use.
        remove: ``model -> model`` without the defense, or None if it cannot be removed.
        save: ``(model, path, config, *, model_info, extra) -> path`` of its state.
        load: ``(model, path, example) -> model`` with the saved state re-applied.
        modules: ``model -> {site: module}`` of the inserted modules (for training).
        cli_options: ``(args, frozen) -> options`` for ``make_config`` from the parsed
            ``train``/``inspect`` flags (None: no options).
        learnable: names whose inserted modules have parameters (trained with a frozen
            backbone by default).
        differentiable: gradients pass through it (BPDA does not apply).
        trainable: built by adversarial training (``robustify train``), needs its file to
            evaluate; False for a defense calibrated from data (MeanSparse).
    """

    names: tuple[str, ...]
    config_type: type
    make_config: Callable[..., Any]
    name_of: Callable[[Any], str]
    plan: Callable[[nn.Module, torch.Tensor, Any], list[Any]]  # robustify.Site list
    apply: Callable[[nn.Module, torch.Tensor, Any], nn.Module]
    remove: Callable[[nn.Module], nn.Module] | None
    save: Callable[..., Path]
    load: Callable[[nn.Module, str | Path, torch.Tensor], nn.Module]
    modules: Callable[[nn.Module], dict[str, nn.Module]]
    cli_options: Callable[[argparse.Namespace, bool], dict[str, Any]] | None = None
    learnable: frozenset[str] = frozenset()
    differentiable: bool = True
    trainable: bool = True


_HANDLERS: dict[str, DefenseHandler] = {}


def register_defense(handler: DefenseHandler) -> DefenseHandler:
    """Register ``handler`` under each of its names (a name may be registered once)."""
    taken = [n for n in handler.names if n in _HANDLERS and _HANDLERS[n] is not handler]
    if taken or "none" in handler.names:
        raise ValueError(f"defense name(s) {taken or ['none']} already registered")
    for name in handler.names:
        _HANDLERS[name] = handler
    return handler


def defense_names(*, trainable: bool | None = None) -> tuple[str, ...]:
    """The registered names in registration order (only the (non-)trainable ones if given)."""
    return tuple(n for n, h in _HANDLERS.items() if trainable is None or h.trainable == trainable)


def handlers(*, trainable: bool | None = None) -> tuple[DefenseHandler, ...]:
    """The registered handlers, each once, in registration order (only the (non-)trainable ones if given)."""
    return tuple(dict.fromkeys(h for h in _HANDLERS.values() if trainable is None or h.trainable == trainable))


def get_defense(name: str) -> DefenseHandler:
    """The handler of defense ``name``; a one-line ``ValueError`` for an unknown name."""
    if name not in _HANDLERS:
        raise ValueError(f"unknown defense {name!r}; choose from {list(_HANDLERS)}")
    return _HANDLERS[name]


def handler_for_config(config: Any) -> DefenseHandler:
    """The handler whose config type ``config`` is."""
    for handler in _HANDLERS.values():
        if isinstance(config, handler.config_type):
            return handler
    raise TypeError(f"no defense is registered for a {type(config).__name__}")


def defense_config(name: str, **options: Any) -> Any:
    """The config of defense ``name`` with config-field ``options``."""
    return get_defense(name).make_config(name, **options)


def record_config(model: nn.Module, config: Any, sites: list[Any] | None = None) -> nn.Module:
    """Record ``config`` on ``model`` as the defense applied to it (and the ``sites`` it changed,
    for a defense whose modules do not name them); returns ``model``."""
    setattr(model, CONFIG_ATTR, config)
    if sites is not None:
        setattr(model, SITES_ATTR, list(sites))
    return model


def applied_sites(model: nn.Module) -> list[Any]:
    """The sites recorded by :func:`record_config` (empty if none were)."""
    return list(getattr(model, SITES_ATTR, None) or ())


def plan_defense(model: nn.Module, example: torch.Tensor, config: Any) -> list[Any]:
    """The sites the defense ``config`` describes would change (the model is unchanged)."""
    return handler_for_config(config).plan(model, example, config)


def apply_defense(model: nn.Module, example: torch.Tensor, config: Any) -> nn.Module:
    """Apply the defense ``config`` describes; returns the model to use (in ``model``'s
    train/eval mode) with the config recorded as ``robustify_defense``."""
    out = handler_for_config(config).apply(model, example, config)
    return record_config(out, config).train(model.training)


def applied_config(model: nn.Module) -> Any:
    """The config recorded on ``model`` by :func:`apply_defense` (a one-line error if none)."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("the model carries no defense config: apply it with robustify.apply_defense "
                         "(or pass the config explicitly)")
    return config


def remove_defense(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_defense` (for the defenses that can be removed)."""
    handler = handler_for_config(applied_config(model))
    if handler.remove is None:
        raise ValueError(f"defense {handler.names[0]!r} cannot be removed; reload the model instead")
    out = handler.remove(model)
    for m in {id(model): model, id(out): out}.values():
        for attr in (CONFIG_ATTR, SITES_ATTR):
            if hasattr(m, attr):
                delattr(m, attr)
    return out


def save_defense_state(
    model: nn.Module,
    path: str | Path,
    config: Any = None,
    *,
    model_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save the defense's state (config: the one recorded on the model unless given)."""
    config = applied_config(model) if config is None else config
    return handler_for_config(config).save(model, path, config, model_info=model_info, extra=extra)


def file_defense(path: str | Path) -> tuple[str, DefenseHandler]:
    """The defense saved in ``path`` (its sidecar names it) and its handler."""
    name = str(read_sidecar(path)["defense"])
    if name not in _HANDLERS:
        raise StateMismatchError(f"{str(path)!r} holds a {name!r} defense, not one registered here "
                                 f"({list(_HANDLERS)})")
    return name, _HANDLERS[name]


def load_defense_state(model: nn.Module, path: str | Path, example: torch.Tensor) -> nn.Module:
    """Re-apply the defense saved in ``path`` to ``model``; the config read back is recorded."""
    name, handler = file_defense(path)
    out = handler.load(model, path, example)
    if getattr(out, CONFIG_ATTR, None) is None:
        raise StateMismatchError(f"the {name!r} loader did not record the config of {str(path)!r}")
    return out
