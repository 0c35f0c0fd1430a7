"""Interoperability with the MeanSparse models that RobustBench ships (``Amini2024MeanSparse_*``).

RobustBench's architectures (``robustbench.model_zoo.architectures.Meansparse_*`` and
``sparsified_model.MeanSparse_imagenet``) carry their own MeanSparse modules with buffers
``running_mean``, ``running_var`` and a scalar ``threshold`` (= alpha), plus mode flags stored as
tensors. :func:`convert_published_meansparse` swaps each of them for robustify's
:class:`~robustify.defenses.meansparse.module.MeanSparse` with the same statistics and threshold, so that the
published checkpoints run with identical outputs and gain robustify's modes (BPDA,
:func:`robustify.set_alpha`, :func:`robustify.defenses_disabled`, saving with
:func:`robustify.save_calibration`).

The other direction, :func:`to_robustbench_meansparse` (MeanSparse's ``export`` hook, ``robustify export``):
a model robustified with the published placement becomes an instance of RobustBench's own MeanSparse class
(:data:`ROBUSTBENCH_CLASSES`) and the state dict that class loads strictly, with identical logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from robustify.core.errors import UserError
from robustify.defenses.meansparse.module import MeanSparse
from robustify.defenses.sites import forward_once, set_submodule

logger = logging.getLogger(__name__)

__all__ = ["ROBUSTBENCH_CLASSES", "convert_published_meansparse", "find_published_meansparse",
           "robustbench_meansparse_model", "to_robustbench_meansparse"]

PUBLISHED_BUFFERS = ("running_mean", "running_var", "threshold")

# Channel axis of the published classes whose layout is fixed in their code, by the last part of
# their Python module name. ``MeanSparse_imagenet`` decides per call (``input.shape[1] == C`` means
# NCHW, otherwise channels-last), so its layout is read from one probe forward pass instead.
FIXED_LAYOUT: dict[str, int] = {
    "Meansparse_wrn_70_16": 1,
    "Meansparse_wrn_94_16": 1,
    "Meansparse_ra_wrn_70_16": 1,
    "Meansparse_swin_L": -1,
}


def _is_published(module: nn.Module) -> bool:
    """A research-code MeanSparse module: class ``MeanSparse*`` with the three published buffers."""
    if isinstance(module, MeanSparse) or not type(module).__name__.startswith("MeanSparse"):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    return all(name in buffers for name in PUBLISHED_BUFFERS)


def find_published_meansparse(model: nn.Module) -> dict[str, nn.Module]:
    """The published (RobustBench / research-code) MeanSparse modules of ``model`` by path."""
    return {name: m for name, m in model.named_modules() if name and _is_published(m)}


def _fixed_layout(module: nn.Module) -> int | None:
    return FIXED_LAYOUT.get(type(module).__module__.rsplit(".", 1)[-1])


def _probe_shapes(model: nn.Module, modules: dict[str, nn.Module], example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Input shape of each module in one no-grad forward pass of ``example``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    forward_once(model, example, [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()])
    return shapes


def _channel_dim(name: str, module: nn.Module, shape: tuple[int, ...] | None) -> int:
    fixed = _fixed_layout(module)
    if fixed is not None:
        return fixed
    if shape is None:
        raise UserError(
            f"published MeanSparse module {name!r} ({type(module).__name__}) picks its channel axis from "
            "its input shape: pass an example input (convert_published_meansparse(model, example))"
        )
    channels = module.running_mean.numel()
    return 1 if len(shape) > 1 and shape[1] == channels else -1  # the published rule


def _convert_one(name: str, module: nn.Module, channel_dim: int, ndim: int) -> MeanSparse:
    mean = module.running_mean.detach()
    var = module.running_var.detach()
    threshold = module.threshold.detach()
    if threshold.numel() != 1:
        raise UserError(f"published MeanSparse module {name!r} has a threshold of shape {tuple(threshold.shape)}")
    flag = getattr(module, "flag_update_statistics", None)
    if isinstance(flag, torch.Tensor) and bool(flag.any()):
        raise UserError(
            f"published MeanSparse module {name!r} is in statistics-update mode (flag_update_statistics=1): "
            "its statistics are not final"
        )
    new = MeanSparse(mean.numel(), alpha=float(threshold), channel_dim=channel_dim, ndim=ndim, site=name)
    new.set_statistics(mean, var)
    return new.to(mean.device)


def convert_published_meansparse(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """Replace every published MeanSparse module of ``model`` by robustify's (in place).

    Each module becomes a :class:`~robustify.defenses.meansparse.module.MeanSparse` at the same path (its site
    name) with ``mean``/``var`` from ``running_mean``/``running_var``, ``alpha`` from
    ``threshold`` and the channel axis of the published layout; outputs are identical.
    ``example`` (a batch of inputs) is needed only for ``MeanSparse_imagenet`` modules, whose
    layout depends on their input. Returns ``model``; a model without published modules is
    returned unchanged.
    """
    published = find_published_meansparse(model)
    if not published:
        return model
    needs_probe = any(_fixed_layout(m) is None for m in published.values())
    shapes = _probe_shapes(model, published, example) if needs_probe and example is not None else {}
    replacements = {}  # all built first: an error leaves the model unchanged
    for name, module in published.items():
        shape = shapes.get(name)
        if needs_probe and example is not None and shape is None and _fixed_layout(module) is None:
            raise UserError(f"published MeanSparse module {name!r} did not run on the example input")
        ndim = len(shape) if shape is not None else (3 if _fixed_layout(module) == -1 else 4)
        replacements[name] = _convert_one(name, module, _channel_dim(name, module, shape), ndim)
    for name, new in replacements.items():
        set_submodule(model, name, new)
    logger.info("converted %d published MeanSparse module(s) of %s", len(published), type(model).__name__)
    return model


# ------------------------------------------------------------------------------------------
# the other direction: a robustified model in RobustBench's own MeanSparse classes
# ------------------------------------------------------------------------------------------
#: RobustBench's MeanSparse network class for each published family that has one
ROBUSTBENCH_CLASSES: dict[str, str] = {
    "dm-wrn": "robustbench.model_zoo.architectures.Meansparse_wrn_70_16.DMWideResNet",
}
#: the persistent buffers of RobustBench's ``MeanSparse`` besides the statistics and threshold (its state-dict keys)
_MODE_BUFFERS: dict[str, Callable[[], torch.Tensor]] = {
    "flag_update_statistics": lambda: torch.tensor(0), "batch_num": lambda: torch.tensor(0.0)}


def _dm_wrn_arguments(net: nn.Module) -> dict[str, Any]:
    """The constructor arguments of RobustBench's ``DMWideResNet`` (either file) that rebuild ``net``."""
    relu = net.relu
    activation = nn.ReLU if type(relu).__name__ == "MeanSparseReLU" else type(relu)
    return {"num_classes": net.logits.out_features, "depth": 6 * len(net.layer[0].block) + 4,
            "width": net.num_channels // 64, "activation_fn": activation,
            "mean": tuple(net.mean.flatten().tolist()), "std": tuple(net.std.flatten().tolist()),
            "padding": net.padding, "num_input_channels": net.init_conv.in_channels}


_ARGUMENTS: dict[str, Callable[[nn.Module], dict[str, Any]]] = {"dm-wrn": _dm_wrn_arguments}


def robustbench_meansparse_model(model: nn.Module) -> tuple[nn.Module, str]:
    """A fresh instance of RobustBench's own MeanSparse class for the architecture of ``model`` (zero statistics,
    threshold 0), and the path of that architecture in ``model`` ("" for the model itself)."""
    import importlib

    from robustify.core.compat import import_robustbench
    from robustify.defenses.meansparse.published import find_family

    rule, root = find_family(model)
    if rule.family not in ROBUSTBENCH_CLASSES:
        raise UserError(f"RobustBench has no MeanSparse class for the {rule.family!r} family; export knows "
                        f"{sorted(ROBUSTBENCH_CLASSES)}")
    import_robustbench()
    module_name, _, class_name = ROBUSTBENCH_CLASSES[rule.family].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    net = model.get_submodule(root) if root else model
    arguments = _ARGUMENTS[rule.family](net)
    target = cls(**arguments)
    target.robustify_arguments = {k: f"{v.__module__}.{v.__qualname__}" if isinstance(v, type) else v
                                  for k, v in arguments.items()}  # how to build it again (model.json)
    return target, root


def _in_call_order(model: nn.Module, modules: dict[str, nn.Module], example: torch.Tensor) -> list[tuple[str, tuple]]:
    """``modules`` in the order of their first call in one forward of ``example``, each with its input shape."""
    seen: dict[str, tuple[int, ...]] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, tuple(args[0].shape))

        return hook

    forward_once(model, example, [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()])
    return list(seen.items())


def to_robustbench_meansparse(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """RobustBench's own MeanSparse model computing what the robustified ``model`` computes, and its state dict.

    The target is :func:`robustbench_meansparse_model`; its MeanSparse modules are matched with robustify's sites
    in forward order (same count, same input shapes, else an error), each getting ``running_mean``/``running_var``
    from the site's statistics and ``threshold`` from its alpha; every other tensor is the model's own. The
    state dict loads strictly into that class (``robustbench.utils.load_model`` reads it as a checkpoint).
    """
    target, root = robustbench_meansparse_model(model)
    target = target.to(example.device)
    net = model.get_submodule(root) if root else model
    ours = {name: m for name, m in net.named_modules() if isinstance(m, MeanSparse)}
    if not ours:
        raise UserError("the model has no MeanSparse sites: insert and calibrate MeanSparse before exporting it")
    if not all(m.calibrated for m in ours.values()):
        raise UserError(f"MeanSparse site(s) {[n for n, m in ours.items() if not m.calibrated][:3]} are not calibrated")
    mine = _in_call_order(net, ours, example)
    theirs = _in_call_order(target, find_published_meansparse(target), example)
    if [shape for _, shape in mine] != [shape for _, shape in theirs]:
        raise UserError(
            f"the model's {len(mine)} MeanSparse site(s) do not match the {len(theirs)} of RobustBench's "
            f"{type(target).__name__} in forward order (input shapes differ): export needs the published placement "
            "(--preset published)")
    skip = tuple(f"{name}." for name in ours)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(skip)}
    for (our_name, _), (their_name, _) in zip(mine, theirs):
        site = ours[our_name]
        state[f"{their_name}.running_mean"] = site.mean.detach().float().clone()
        state[f"{their_name}.running_var"] = site.var.detach().float().clone()
        state[f"{their_name}.threshold"] = torch.tensor(site.alpha, dtype=torch.float32)
        for key, make in _MODE_BUFFERS.items():
            state[f"{their_name}.{key}"] = make()
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"the model's tensors do not fit RobustBench's {type(target).__name__}: "
                        f"{str(exc).splitlines()[0]}") from exc
    return target.eval(), {k: v.detach().cpu() for k, v in target.state_dict().items()}
