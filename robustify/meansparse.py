"""The MeanSparse operator (Amini et al., arXiv 2406.05927) and its evaluation modes.

``out = mean_c if |x - mean_c| < alpha * std_c else x``, per channel ``c``; strict ``<``, so
``alpha = 0`` is exactly the identity (no data-dependent branch is needed for that).

Modes are plain Python attributes toggled by context managers and never saved:

* ``calibrating``: the module returns its input unchanged and merges exact per-channel
  moments (:class:`robustify.stats.RunningMoments`); see :mod:`robustify.calibrate`.
* ``straight_through`` (BPDA): same forward, identity backward, as RobustBench's external
  evaluation of the published MeanSparse models; use :func:`bpda`.
* ``enabled``: when False the module is the identity, used to run the base model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .stats import RunningMoments

__all__ = [
    "MeanSparse",
    "NotCalibratedError",
    "bpda",
    "defenses_disabled",
    "meansparse_modules",
    "set_alpha",
]


class NotCalibratedError(RuntimeError):
    """Raised when an uncalibrated MeanSparse module is run outside calibration."""


class _StraightThrough(torch.autograd.Function):
    """MeanSparse forward, identity backward (BPDA / straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mean: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        return _sparsify(x, mean, crop)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad_output, None, None


def _sparsify(x: torch.Tensor, mean: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    # The mask carries no gradient: compute it on detached data with in-place ops so the
    # only full-size allocations are one difference tensor, one bool mask and the output.
    diff = x.detach() - mean
    mask = diff.abs_() < crop
    return torch.where(mask, mean, x)


class MeanSparse(nn.Module):
    """Mean-centred per-channel sparsification.

    Args:
        channels: number of channels ``C``.
        alpha: threshold in units of the channel's standard deviation (``>= 0``).
        channel_dim: axis of the channels: 1 for NCHW feature maps, -1 for tokens and
            channels-last tensors.
        ndim: number of dimensions of the inputs (used to pre-shape the buffers).
        site: name of the insertion site (the key prefix in saved state).
        stats_mode: ``"exact"`` (merged float64 moments, default) or ``"official"``
            (the published code's average of per-batch means and variances).

    Buffers ``mean`` and ``var`` (float32, shape ``(C,)``) are the saved state.
    """

    def __init__(
        self,
        channels: int,
        alpha: float = 0.0,
        channel_dim: int = 1,
        ndim: int = 4,
        site: str = "",
        stats_mode: str = "exact",
    ) -> None:
        super().__init__()
        if stats_mode not in ("exact", "official"):
            raise ValueError(f"stats_mode must be 'exact' or 'official', got {stats_mode!r}")
        self.channels = int(channels)
        self.channel_dim = int(channel_dim)
        self.ndim = int(ndim)
        self.site = site
        self.stats_mode = stats_mode
        self.register_buffer("mean", torch.zeros(self.channels))
        self.register_buffer("var", torch.zeros(self.channels))
        self.register_buffer("crop", torch.zeros(self.channels), persistent=False)
        self.calibrated = False
        self.calibrating = False
        self.straight_through = False
        self.enabled = True
        self.moments = RunningMoments()
        self._official: list[torch.Tensor] = []
        self._alpha = 0.0
        self.alpha = alpha

    # -- configuration -------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {value!r} (site {self.site!r})")
        self._alpha = value
        self._refresh_crop()

    def _refresh_crop(self) -> None:
        with torch.no_grad():
            self.crop.copy_(self.var.clamp_min(0).sqrt() * self._alpha)

    def _broadcast_shape(self, ndim: int) -> tuple[int, ...]:
        if self.channel_dim in (-1, ndim - 1):
            return (self.channels,)
        shape = [1] * ndim
        shape[self.channel_dim % ndim] = self.channels
        return tuple(shape[1:])

    # -- calibration ---------------------------------------------------------------
    def reset_statistics(self) -> None:
        self.moments = RunningMoments()
        self._official = []

    def observe(self, x: torch.Tensor) -> None:
        """Merge one batch of inputs into the running statistics."""
        if x.shape[self.channel_dim] != self.channels:
            raise ValueError(
                f"site {self.site!r}: expected {self.channels} channels on dim {self.channel_dim}, "
                f"got input of shape {tuple(x.shape)}"
            )
        if self.stats_mode == "exact":
            self.moments.update(x, self.channel_dim)
        else:
            dims = [d for d in range(x.dim()) if d != self.channel_dim % x.dim()]
            xd = x.detach().float()
            self._official.append(torch.stack([xd.mean(dim=dims), xd.var(dim=dims)]).double())

    def finalize(self) -> None:
        """Turn the merged moments into the ``mean``/``var`` buffers."""
        if self.stats_mode == "exact":
            mean, var = self.moments.mean, self.moments.variance(unbiased=True)
            if mean is None:
                raise NotCalibratedError(f"site {self.site!r} saw no data during calibration")
        else:
            if not self._official:
                raise NotCalibratedError(f"site {self.site!r} saw no data during calibration")
            mean, var = torch.stack(self._official).mean(dim=0)
        self.set_statistics(mean, var)

    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Set the per-channel statistics directly (e.g. from a saved or published model)."""
        mean = torch.as_tensor(mean).reshape(-1)
        var = torch.as_tensor(var).reshape(-1)
        if mean.numel() != self.channels or var.numel() != self.channels:
            raise ValueError(
                f"site {self.site!r}: statistics have {mean.numel()}/{var.numel()} channels, expected {self.channels}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()) or (var < 0).any():
            raise ValueError(f"site {self.site!r}: statistics must be finite with var >= 0")
        with torch.no_grad():
            self.mean.copy_(mean.to(self.mean.dtype))
            self.var.copy_(var.to(self.var.dtype))
        self.calibrated = True
        self._refresh_crop()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "mean" in state_dict and prefix + "var" in state_dict:
            self.calibrated = True
            self._refresh_crop()

    # -- forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        if not self.calibrated:
            raise NotCalibratedError(
                f"MeanSparse site {self.site!r} has no statistics: run robustify.calibrate(...) "
                "or load a calibration file before using the model"
            )
        shape = self._broadcast_shape(x.dim())
        mean, crop = self.mean.view(shape), self.crop.view(shape)
        if mean.dtype != x.dtype:
            mean, crop = mean.to(x.dtype), crop.to(x.dtype)
        if self.straight_through:
            return _StraightThrough.apply(x, mean, crop)
        return _sparsify(x, mean, crop)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, alpha={self._alpha:g}, channel_dim={self.channel_dim}, "
            f"calibrated={self.calibrated}, site={self.site!r}"
        )


def meansparse_modules(model: nn.Module) -> dict[str, MeanSparse]:
    """All MeanSparse modules of ``model`` by site name, in registration order."""
    found: dict[str, MeanSparse] = {}
    for name, module in model.named_modules():
        if isinstance(module, MeanSparse):
            found[module.site or name] = module
    return found


def set_alpha(model: nn.Module, alpha: float | Mapping[str, float]) -> None:
    """Set the threshold of every MeanSparse site (a float) or of named sites (a mapping).

    Never recalibrates: the statistics do not depend on alpha.
    """
    modules = meansparse_modules(model)
    if not modules:
        raise ValueError("the model has no MeanSparse modules: insert them first")
    if isinstance(alpha, Mapping):
        unknown = sorted(set(alpha) - set(modules))
        if unknown:
            raise KeyError(f"unknown MeanSparse site(s) {unknown}; known sites: {list(modules)[:8]}...")
        for site, value in alpha.items():
            modules[site].alpha = value
    else:
        for module in modules.values():
            module.alpha = alpha


@contextlib.contextmanager
def _toggled(model: nn.Module, attribute: str, value: bool) -> Iterator[nn.Module]:
    modules = list(meansparse_modules(model).values())
    previous = [getattr(m, attribute) for m in modules]
    for m in modules:
        setattr(m, attribute, value)
    try:
        yield model
    finally:
        for m, old in zip(modules, previous):
            setattr(m, attribute, old)


def bpda(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block, every MeanSparse module passes gradients straight through.

    The forward is unchanged; the backward is the identity. Restored on exit, even on error.
    """
    return _toggled(model, "straight_through", True)


def defenses_disabled(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block, every MeanSparse module is the identity (the base model)."""
    return _toggled(model, "enabled", False)
