"""Interoperability with the MeanSparse models that RobustBench ships (``Amini2024MeanSparse_*``).

RobustBench's architectures (``robustbench.model_zoo.architectures.Meansparse_*`` and
``sparsified_model.MeanSparse_imagenet``) carry their own MeanSparse modules with buffers
``running_mean``, ``running_var`` and a scalar ``threshold`` (= alpha), plus mode flags stored as
tensors. :func:`convert_published_meansparse` swaps each of them for robustify's
:class:`~robustify.defenses.meansparse.module.MeanSparse` with the same statistics and threshold, so that the
published checkpoints run with identical outputs and gain robustify's modes (BPDA,
:func:`robustify.set_alpha`, :func:`robustify.defenses_disabled`, saving with
:func:`robustify.save_calibration`).
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

__all__ = ["convert_published_meansparse", "find_published_meansparse"]

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
