"""Insert MeanSparse in front of activations or after modules: the "prepare" step.

Each selected activation module gets a :class:`~robustify.defenses.meansparse.module.MeanSparse` child named
``meansparse`` and a forward pre-hook that runs it on the activation's input (the
``torch.ao.quantization`` observer pattern): the original state-dict keys stay unchanged, the
defense shows in ``print(model)``, and in-place or parametric activations keep working.
Functional activations are first turned into modules by :func:`robustify.defenses.sites.modularize`.
A module selected by ``MeanSparseConfig.outputs`` (or by the ``published`` preset) gets a
child named ``meansparse_out`` and a forward hook that runs it on the module's output.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from robustify.defenses.meansparse.config import MeanSparseConfig
from robustify.defenses import CONFIG_ATTR, record_config
from robustify.core.errors import InsertionError
from robustify.defenses.meansparse.module import CHILD_NAME, OUTPUT_CHILD_NAME, MeanSparse, MeanSparseReLU, meansparse_modules
from robustify.defenses.sites import ACTIVATION_CLASS_NAMES, Site, modularize, plan_output_sites, plan_sites, select_sites

logger = logging.getLogger(__name__)

__all__ = [
    "InsertionError",
    "fuse_meansparse",
    "insert_meansparse",
    "plan",
    "remove_meansparse",
    "unfuse_meansparse",
]



def _run_child_first(child_name: str, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, child_name)(args[0]), *args[1:])


def _attach(activation: nn.Module, module: MeanSparse) -> None:
    """Make ``module`` the activation's ``meansparse`` child, run first by a forward pre-hook."""
    activation.add_module(CHILD_NAME, module)
    activation.register_forward_pre_hook(functools.partial(_run_child_first, CHILD_NAME))


def _run_child_on_output(child_name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    return getattr(module, child_name)(output)


def _attach_output(host: nn.Module, module: MeanSparse) -> None:
    """Make ``module`` the host's ``meansparse_out`` child, run on its output by a forward hook."""
    host.add_module(OUTPUT_CHILD_NAME, module)
    host.register_forward_hook(functools.partial(_run_child_on_output, OUTPUT_CHILD_NAME))


def _our_hooks(module: nn.Module, kind: str = "_forward_pre_hooks") -> list[int]:
    func = _run_child_first if kind == "_forward_pre_hooks" else _run_child_on_output
    hooks = getattr(module, kind, {})
    return [k for k, h in hooks.items() if isinstance(h, functools.partial) and h.func is func]


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


def _matching_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Module names matching ``patterns`` (``fnmatch``); a pattern matching none is an error."""
    names = [name for name, _ in model.named_modules() if name]
    selected = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise InsertionError(
                f"output pattern {pattern!r} matches no module of {type(model).__name__} "
                f"(module names look like {names[:4]}; see print(model))"
            )
        selected += [n for n in hits if n not in selected]
    return selected


def _published(
    model: nn.Module, example: torch.Tensor, config: MeanSparseConfig
) -> tuple[nn.Module, list[Site], dict[str, int]]:
    """The published preset: the (Swin-rewritten) model, its activation sites and its output
    modules, each with the channel axis of the published code."""
    from robustify.defenses.meansparse.published import published_placement

    if config.channel_dim is not None:
        raise InsertionError("--preset published fixes every site's channel axis: drop --channel-dim")
    prepared, placement, rule = published_placement(model)
    found = {s.name: s for s in plan_sites(prepared, example)}
    missing = sorted(set(placement.activations) - set(found))
    if missing:
        raise InsertionError(
            f"the published {rule.family} placement names activation(s) {missing[:3]} that did not run on the example"
        )
    activations = [_with_channel_dim(found[name], cdim) for name, cdim in placement.activations.items()]
    return prepared, sorted(activations, key=lambda s: s.order), placement.outputs


def _with_channel_dim(site: Site, cdim: int) -> Site:
    return replace(site, channel_dim=cdim, channels=int(site.input_shape[cdim]))


def _count(sites: list[Site]) -> str:
    outputs = sum(s.position == "output" for s in sites)
    text = f"{len(sites) - outputs} activation site(s)"
    return text + (f" and {outputs} module output site(s)" if outputs else "")


def plan(
    model: nn.Module, example: torch.Tensor, config: MeanSparseConfig | None = None
) -> tuple[nn.Module, list[Site]]:
    """Return the (possibly rewritten) model and the sites ``config`` selects, in forward order.

    The input model is left untouched; nothing is inserted.
    """
    config = config or MeanSparseConfig()
    fixed_outputs: dict[str, int] = {}
    if config.preset == "published":
        prepared, everything, fixed_outputs = _published(model, example, config)
    else:
        prepared = modularize(model, example)
        everything = plan_sites(prepared, example, channel_dim=config.channel_dim)
        if not everything and not config.outputs:
            raise InsertionError(
                f"no activation found in {type(model).__name__}: searched activation modules "
                f"(torch.nn ReLU/SiLU/GELU/..., and classes named {sorted(ACTIVATION_CLASS_NAMES)}) and "
                "functional calls (F.relu, torch.relu, x.relu(), F.gelu, F.silu, ...)"
            )
        everything = select_sites(prepared, everything, preset=config.preset, skip_se=False)
    outputs = list(fixed_outputs)
    outputs += [n for n in _matching_modules(prepared, config.outputs) if n not in fixed_outputs]
    if outputs:
        everything = plan_output_sites(prepared, example, outputs, everything, channel_dim=config.channel_dim)
        everything = [_with_channel_dim(s, fixed_outputs[s.name]) if s.position == "output" and s.name in fixed_outputs
                      else s for s in everything]
    selected = select_sites(prepared, everything, include=config.include, exclude=config.exclude, skip_se=config.skip_se)
    if not selected:
        raise InsertionError(
            f"the insertion plan changes nothing: {_count(everything)} found in "
            f"{type(model).__name__}, but include={list(config.include)}, exclude={list(config.exclude)}, "
            f"preset={config.preset!r}, skip_se={config.skip_se} select none of them"
        )
    inputs = {s.name for s in selected if s.position == "input"}
    doubled = sorted(inputs & {s.name for s in selected if s.position == "output"})
    if doubled:
        raise InsertionError(
            f"module(s) {doubled[:3]} would get MeanSparse both on their input and on their output: exclude one"
        )
    return prepared, selected


def insert_meansparse(
    model: nn.Module, example: torch.Tensor, config: MeanSparseConfig | None = None
) -> nn.Module:
    """Insert an (uncalibrated) MeanSparse module at every selected site.

    Returns the model to use from now on: the same object when every activation is a
    module, an ``fx.GraphModule`` when functional calls had to be rewritten, a copy sharing
    the modules when the ``published`` preset rewrote Swin blocks. Calibrate it
    with :func:`robustify.defenses.meansparse.calibrate` before use.
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
        host = prepared.get_submodule(site.name)
        module = MeanSparse(
            site.channels,
            alpha=config.alpha_of(site.name),
            channel_dim=site.channel_dim,
            ndim=len(site.input_shape),
            site=site.name,
            stats_mode=config.stats_mode,
        )
        device = next((t.device for t in [*host.parameters(), *host.buffers()]), example.device)
        (_attach_output if site.position == "output" else _attach)(host, module.to(device))
    logger.info("inserted MeanSparse at %d site(s) of %s", len(sites), type(model).__name__)
    return record_config(prepared, config)


def remove_meansparse(model: nn.Module) -> nn.Module:
    """Remove every inserted MeanSparse module and its hook (in place); fused ReLUs become ReLUs."""
    unfuse_meansparse(model)
    for module in model.modules():
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(module, kind, {})
            for key in _our_hooks(module, kind):
                child = hooks.pop(key).args[0]
                if child in module._modules:
                    del module._modules[child]
    if isinstance(getattr(model, CONFIG_ATTR, None), MeanSparseConfig):
        delattr(model, CONFIG_ATTR)
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

    The ReLU becomes a :class:`~robustify.defenses.meansparse.module.MeanSparseReLU` holding the same
    MeanSparse child: state-dict keys, eager outputs and gradients are unchanged, and under
    ``torch.compile`` the pair's backward keeps nothing but the ReLU output (see
    :mod:`robustify.evaluation.fast`). Other activations, and ReLUs carrying hooks of their own, are
    left as they are. :func:`unfuse_meansparse` undoes it.
    """
    count = _replace_children(model, _fused)
    logger.info("fused MeanSparse with %d ReLU(s)", count)
    return count


def unfuse_meansparse(model: nn.Module) -> int:
    """Undo :func:`fuse_meansparse` in place; returns the number of ReLUs restored."""
    return _replace_children(model, _unfused)
