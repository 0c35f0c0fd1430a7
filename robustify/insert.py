"""Insert MeanSparse in front of activations: the "prepare" step.

Each selected activation module gets a :class:`~robustify.meansparse.MeanSparse` child named
``meansparse`` and a forward pre-hook that runs it on the activation's input (the
``torch.ao.quantization`` observer pattern): the original state-dict keys stay unchanged, the
defense shows in ``print(model)``, and in-place or parametric activations keep working.
Functional activations are first turned into modules by :func:`robustify.sites.modularize`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from .config import MeanSparseConfig
from .meansparse import MeanSparse, MeanSparseReLU, meansparse_modules
from .sites import ACTIVATION_CLASS_NAMES, Site, modularize, plan_sites, select_sites

logger = logging.getLogger(__name__)

__all__ = [
    "InsertionError",
    "fuse_meansparse",
    "insert_meansparse",
    "plan",
    "remove_meansparse",
    "unfuse_meansparse",
]

CHILD_NAME = "meansparse"


class InsertionError(ValueError):
    """The model has no site to insert into, or the selection leaves none."""


def _run_child_first(child_name: str, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, child_name)(args[0]), *args[1:])


def _attach(activation: nn.Module, module: MeanSparse) -> None:
    """Make ``module`` the activation's ``meansparse`` child, run first by a forward pre-hook."""
    activation.add_module(CHILD_NAME, module)
    activation.register_forward_pre_hook(functools.partial(_run_child_first, CHILD_NAME))


def _our_hooks(module: nn.Module) -> list[int]:
    hooks = getattr(module, "_forward_pre_hooks", {})
    return [k for k, h in hooks.items() if isinstance(h, functools.partial) and h.func is _run_child_first]


def _has_other_hooks(module: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    ours = len(_our_hooks(module))
    return sum(len(getattr(module, n, {}) or {}) for n in names) > ours


def _replace_children(model: nn.Module, convert: Any) -> int:
    """Replace every child ``c`` for which ``convert(c)`` is a module (shared children stay shared)."""
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = done.get(id(child))
            if new is None:
                new = convert(child)
                if new is None:
                    continue
                done[id(child)] = new
            parent._modules[name] = new
    return len(done)


def plan(
    model: nn.Module, example: torch.Tensor, config: MeanSparseConfig | None = None
) -> tuple[nn.Module, list[Site]]:
    """Return the (possibly FX-rewritten) model and the sites ``config`` selects.

    The input model is left untouched; nothing is inserted.
    """
    config = config or MeanSparseConfig()
    prepared = modularize(model)
    everything = plan_sites(prepared, example, channel_dim=config.channel_dim)
    if not everything:
        raise InsertionError(
            f"no activation found in {type(model).__name__}: searched activation modules "
            f"(torch.nn ReLU/SiLU/GELU/..., and classes named {sorted(ACTIVATION_CLASS_NAMES)}) and "
            "functional calls (F.relu, torch.relu, x.relu(), F.gelu, F.silu, ...)"
        )
    selected = select_sites(
        prepared,
        everything,
        include=config.include,
        exclude=config.exclude,
        skip_se=config.skip_se,
        preset=config.preset,
    )
    if not selected:
        raise InsertionError(
            f"the insertion plan changes nothing: {len(everything)} activation site(s) found in "
            f"{type(model).__name__}, but include={list(config.include)}, exclude={list(config.exclude)}, "
            f"preset={config.preset!r}, skip_se={config.skip_se} select none of them"
        )
    return prepared, selected


def insert_meansparse(
    model: nn.Module, example: torch.Tensor, config: MeanSparseConfig | None = None
) -> nn.Module:
    """Insert an (uncalibrated) MeanSparse module before every selected activation.

    Returns the model to use from now on: the same object when every activation is a
    module, an ``fx.GraphModule`` when functional calls had to be rewritten. Calibrate it
    with :func:`robustify.calibrate` before use.
    """
    config = config or MeanSparseConfig()
    if meansparse_modules(model):
        raise InsertionError("the model already has MeanSparse modules; remove them first")
    prepared, sites = plan(model, example, config)
    unknown = sorted(set(config.site_alpha) - {s.name for s in sites})
    if unknown:
        raise InsertionError(
            f"per-site alpha names site(s) {unknown} that the plan does not select; selected sites: "
            f"{[s.name for s in sites][:8]}{'...' if len(sites) > 8 else ''} (see `robustify inspect`)"
        )
    for site in sites:
        activation = prepared.get_submodule(site.name)
        module = MeanSparse(
            site.channels,
            alpha=config.alpha_of(site.name),
            channel_dim=site.channel_dim,
            ndim=len(site.input_shape),
            site=site.name,
            stats_mode=config.stats_mode,
        )
        device = next((t.device for t in [*activation.parameters(), *activation.buffers()]), example.device)
        _attach(activation, module.to(device))
    logger.info("inserted MeanSparse at %d site(s) of %s", len(sites), type(model).__name__)
    return prepared


def remove_meansparse(model: nn.Module) -> nn.Module:
    """Remove every inserted MeanSparse module and its hook (in place); fused ReLUs become ReLUs."""
    unfuse_meansparse(model)
    for module in model.modules():
        hooks = getattr(module, "_forward_pre_hooks", {})
        for key in _our_hooks(module):
            child = hooks.pop(key).args[0]
            if child in module._modules:
                del module._modules[child]
    return model


def _fused(module: nn.Module) -> nn.Module | None:
    child = getattr(module, CHILD_NAME, None) if type(module) is nn.ReLU else None
    if not isinstance(child, MeanSparse) or len(_our_hooks(module)) != 1 or _has_other_hooks(module):
        return None
    return MeanSparseReLU(child, inplace=module.inplace).train(module.training)


def _unfused(module: nn.Module) -> nn.Module | None:
    if type(module) is not MeanSparseReLU:
        return None
    relu = nn.ReLU(inplace=module.inplace).train(module.training)
    _attach(relu, module.meansparse)
    return relu


def fuse_meansparse(model: nn.Module) -> int:
    """Fuse each MeanSparse with the ``nn.ReLU`` that hosts it, in place; returns the count.

    The ReLU becomes a :class:`~robustify.meansparse.MeanSparseReLU` holding the same
    MeanSparse child: state-dict keys, eager outputs and gradients are unchanged, and under
    ``torch.compile`` the pair's backward keeps nothing but the ReLU output (see
    :mod:`robustify.fast`). Other activations, and ReLUs carrying hooks of their own, are
    left as they are. :func:`unfuse_meansparse` undoes it.
    """
    count = _replace_children(model, _fused)
    logger.info("fused MeanSparse with %d ReLU(s)", count)
    return count


def unfuse_meansparse(model: nn.Module) -> int:
    """Undo :func:`fuse_meansparse` in place; returns the number of ReLUs restored."""
    return _replace_children(model, _unfused)
