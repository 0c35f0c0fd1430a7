"""The MeanSparse operator (Amini et al., arXiv 2406.05927) and its evaluation modes.

``out = mean_c if |x - mean_c| < alpha * std_c else x``, per channel ``c``; strict ``<``, so
``alpha = 0`` is exactly the identity (no data-dependent branch is needed for that). The band is
tested in ``x``'s dtype promoted with the float32 statistics (float32 for float16/bfloat16 inputs,
as RobustBench's module), the output is in ``x``'s dtype.

Modes are plain Python attributes toggled by context managers and never saved:

* ``calibrating``: the module returns its input unchanged and merges exact per-channel
  moments (:class:`robustify.core.stats.RunningMoments`); see :mod:`robustify.defenses.meansparse.calibrate`.
* ``straight_through`` (BPDA): same forward, identity backward, as RobustBench's external
  evaluation of the published MeanSparse models; use :func:`bpda`.
* ``enabled``: when False the module is the identity, used to run the base model.
* ``soft_temperature`` (soft BPDA): same forward; the backward is that of the smooth surrogate
  ``mean + (x - mean) * sigmoid((|x - mean| - crop) / (T * crop))`` of the band, with
  temperature ``T`` relative to the band's half-width; use :func:`soft_bpda`.

Speed (eager). ``torch.where`` and comparison ops are slow on CPUs, and every full-size
temporary of a large activation is a fresh allocation (page faults). The eager forward
therefore never materialises ``x - mean`` or a mask: it precomputes, per dtype, *exact*
bounds ``lo < x < hi`` that select the same elements as ``|x - mean| < crop`` evaluated in
that dtype (found by stepping ``nextafter`` until the rounding of ``x - mean`` agrees, so
the result is bit-identical to the published formula, NaN and infinities included), then
selects ``mean`` or ``x`` with sign-bit arithmetic on cache-sized chunks written straight
into the output. The only allocation per call is the output (plus a bool mask when a
gradient through the mask is needed). Under ``torch.compile`` the plain ``torch.where``
formula is used instead, which inductor fuses with the following activation (see
:mod:`robustify.evaluation.fast`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from robustify.core.errors import UserError
from robustify.core.errors import NotCalibratedError
from robustify.core.stats import RunningMoments
from robustify.defenses.base import captured_inputs, toggled

__all__ = [
    "MeanSparse",
    "MeanSparseReLU",
    "NotCalibratedError",
    "bpda",
    "defenses_disabled",
    "soft_bpda",
    "meansparse_modules",
    "set_alpha",
    "capture_site_inputs",
    "in_band",
]


class _StraightThrough(torch.autograd.Function):
    """MeanSparse forward, identity backward (BPDA / straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mean: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        return _sparsify(x, mean, crop)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad_output, None, None


class _SoftBand(torch.autograd.Function):
    """MeanSparse forward; backward of ``mean + (x - mean) * sigmoid((|x - mean| - crop) / tau)``.

    ``tau = temperature * crop`` per channel. The surrogate's derivative
    ``s + |x - mean| * s * (1 - s) / tau`` (``s`` the sigmoid) is positive everywhere, tends
    to 1 far outside the band and to the hard band's zero/one as the temperature falls.
    Channels with ``crop == 0`` are never sparsified and pass the gradient unchanged.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mean: torch.Tensor, crop: torch.Tensor,  # type: ignore[override]
                temperature: float) -> torch.Tensor:
        ctx.save_for_backward(x, mean, crop)
        ctx.temperature = temperature
        return _sparsify(x, mean, crop)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        x, mean, crop = ctx.saved_tensors
        dist = (x - mean).abs()
        tau = (crop * ctx.temperature).clamp_min(torch.finfo(dist.dtype).tiny)
        s = torch.sigmoid((dist - crop) / tau)
        slope = torch.where(crop > 0, s + dist * s * (1 - s) / tau, torch.ones_like(s))
        return (grad_output * slope).to(grad_output.dtype), None, None, None


def _sparsify(x: torch.Tensor, mean: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """The reference formula ``where(|x - mean| < crop, mean, x)`` (used when compiling/tracing).

    ``mean`` and ``crop`` are in the decision dtype (:meth:`MeanSparse.thresholds_like`): the band is
    tested there, as RobustBench's module does by type promotion; the output keeps ``x``'s dtype."""
    return torch.where((x - mean).abs() < crop, mean.to(x.dtype), x)


class _SparsifyReLU(torch.autograd.Function):
    """``relu(where(|x - mean| < crop, mean, x))`` whose backward needs only the output.

    The gradient of the pair is zero where the ReLU output ``y`` is ``<= 0`` (ReLU's own
    rule) or where the input was in the band. For ``y > 0``, ``y`` is the MeanSparse output
    ``z``, and ``z == mean`` with ``crop > 0`` holds exactly when ``x`` was in the band
    (outside it ``z = x``, and ``x == mean`` is inside any band of positive width). So the
    mask is recomputed from ``y``, which the next layer's backward keeps anyway: unlike the
    unfused formula, nothing extra is saved (inductor's CPU code stores a saved boolean
    mask about ten times slower than a float tensor). Gradients are identical to the
    unfused pair, NaN inputs included.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mean: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        y = torch.relu(_sparsify(x, mean, crop))
        ctx.save_for_backward(y, mean, crop)
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        y, mean, crop = ctx.saved_tensors
        # y == mean (in y's dtype) comes from the band exactly when that value itself lies in the band
        mean_y = mean.to(y.dtype)
        blocked = (y <= 0) | ((y == mean_y) & ((mean_y - mean).abs() < crop))
        return torch.where(blocked, torch.zeros_like(grad_output), grad_output), None, None


# ---------------------------------------------------------------------------------------
# Eager fast path: exact bounds + sign-bit select on cache-sized chunks.
# ---------------------------------------------------------------------------------------
#: bytes of one operand chunk processed at a time by the eager fast path.
CHUNK_BYTES = 1 << 20
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_workspaces = threading.local()
CHILD_NAME = "meansparse"  # the child of an activation under which insertion attaches MeanSparse (robustify.defenses.meansparse.insert)
OUTPUT_CHILD_NAME = "meansparse_out"  # the child of a module whose output MeanSparse sparsifies


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """A per-thread, per-device reusable byte buffer of at least ``nbytes`` (grown on demand)."""
    cache: dict[torch.device, torch.Tensor] = getattr(_workspaces, "buffers", None) or {}
    _workspaces.buffers = cache
    buf = cache.get(device)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        cache[device] = buf
    return buf


def _key(t: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 key of each float (``a < b`` iff ``key(a) < key(b)``, -0 just below +0)."""
    bits = t.view(_INT_VIEW[t.dtype]).to(torch.int64)
    sign_flip = (1 << (8 * t.element_size() - 1)) - 1
    return torch.where(bits < 0, bits ^ sign_flip, bits)


def _from_key(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = torch.where(key < 0, key ^ ((1 << (8 * torch.empty((), dtype=dtype).element_size() - 1)) - 1), key)
    return bits.to(_INT_VIEW[dtype]).view(dtype)


def _rounded(value: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``value`` (float64) rounded to ``dtype`` towards +inf (``up``) or -inf."""
    r = value.to(dtype)
    direction = torch.full_like(r, math.inf if up else -math.inf)
    wrong = (r.double() < value) if up else (r.double() > value)
    return torch.where(wrong, torch.nextafter(r, direction), r)


def _bisect(below: torch.Tensor, above: torch.Tensor, inside: Any) -> torch.Tensor:
    """Smallest float in ``(below, above]`` where the monotone predicate ``inside`` holds.

    Requires ``inside(above)`` and not ``inside(below)``; a fixed number of steps (no sync).
    """
    dtype = below.dtype
    lo, hi = _key(below), _key(above)
    for _ in range(8 * below.element_size() + 2):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        ok = inside(_from_key(mid, dtype))
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return _from_key(hi, dtype)


def exact_bounds(mean: torch.Tensor, crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Bounds with ``(lo < x <= top) == (|x - mean| < crop)`` for every ``x`` of ``mean.dtype``.

    ``fl(x - mean)`` is monotone in ``x``, so the selected values form an interval of floats
    whose ends are found by stepping ``nextafter``: ``top`` is the largest selected value
    (``top == lo`` when nothing is selected, e.g. ``crop == 0``). Zeros are normalised to +0
    so that the sign bits of ``lo - x`` and ``top - x`` encode ``x > lo`` and ``x > top``.
    Returns ``None`` when no finite bounds exist (overflowing thresholds): use the formula.
    """
    if mean.dtype not in _INT_VIEW or mean.dtype == torch.float64:
        return None
    exact_hi, exact_lo = mean.double() + crop.double(), mean.double() - crop.double()
    # every x >= mean + crop (exactly) has fl(x - mean) >= crop, and x = mean has fl(0) = 0:
    # hi = smallest x with fl(x - mean) >= crop lies in (mean, up]; with crop == 0 it is mean.
    up = _rounded(exact_hi, mean.dtype, up=True)
    down = _rounded(exact_lo, mean.dtype, up=False)
    if not bool(torch.isfinite(up).all() and torch.isfinite(down).all()):
        return None
    hi = _bisect(mean, up, lambda v: (v - mean) >= crop)
    hi = torch.where(crop == 0, mean, hi)
    # lo = largest x with fl(x - mean) <= -crop: one float below the smallest x with fl(x - mean) > -crop
    first_above = _bisect(down, mean, lambda v: (v - mean) > -crop)
    lo = torch.where(crop == 0, mean, torch.nextafter(first_above, torch.full_like(mean, -math.inf)))
    top = torch.maximum(torch.nextafter(hi, torch.full_like(hi, -math.inf)), lo)
    return lo + 0.0, top + 0.0  # -0 -> +0


def _select_chunks(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mu: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """``out = mu where lo < x <= hi else x`` for a contiguous ``x`` seen as rows of ``R`` values
    (a whole sample, or one position's channels when they are last), bounds of shape ``(R,)``;
    ``out`` has ``x``'s shape (a base tensor, not a view, so that it may be modified in place).

    The sign bit of ``lo - x`` is set iff ``x > lo`` and that of ``hi - x`` iff ``x > hi``
    (exact in IEEE arithmetic: a non-zero difference never rounds to zero and keeps its
    sign, and :func:`exact_bounds` normalises -0 away). As ``lo <= hi``, their XOR is set iff
    ``lo < x <= hi``; a NaN ``x`` gives two equal signs and is never selected. Shifted
    arithmetically it is an all-ones integer mask, and the select is ``x ^ ((x ^ mu) & mask)``
    on the bit patterns. ``keep`` (int8, like ``x2``) optionally receives the complement
    mask for the backward pass.
    """
    x2 = x.view(-1, lo.numel())
    n, r = x2.shape
    itype = _INT_VIEW[x2.dtype]
    esize = x2.element_size()
    rows = max(1, min(n, CHUNK_BYTES // max(1, r * esize)))
    buf = _workspace(2 * rows * r * esize, x2.device)
    a = buf[: rows * r * esize].view(x2.dtype).view(rows, r)
    b = buf[rows * r * esize : 2 * rows * r * esize].view(x2.dtype).view(rows, r)
    out = torch.empty_like(x)
    xi, oi, mui = x2.view(itype), out.view(n, r).view(itype), mu.view(itype)
    shift = 8 * esize - 1
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        k = stop - start
        ak, bk = a[:k], b[:k]
        torch.sub(lo, x2[start:stop], out=ak)
        torch.sub(hi, x2[start:stop], out=bk)
        ai, bi = ak.view(itype), bk.view(itype)
        ai.bitwise_xor_(bi).bitwise_right_shift_(shift)  # -1 inside the band, 0 outside
        torch.bitwise_xor(xi[start:stop], mui, out=bi)
        bi.bitwise_and_(ai)
        torch.bitwise_xor(bi, xi[start:stop], out=oi[start:stop])
        if keep is not None:  # int8 -1 where the gradient passes (outside the band), 0 inside
            keep[start:stop].copy_(ai.bitwise_not_())
    return out


def _narrowed(lo: torch.Tensor, top: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Bounds in the narrower ``dtype`` selecting the same values of ``dtype`` as ``lo < x <= top``
    (wider floats, e.g. float32 bounds of a band tested in float32 on float16 inputs): both rounded
    down, since for ``x`` of ``dtype``, ``x > lo`` iff ``x > round_down(lo)`` and ``x <= top`` iff
    ``x <= round_down(top)``. None when they overflow ``dtype`` (use the formula)."""
    lo_n, top_n = (_rounded(t.double(), dtype, up=False) for t in (lo, top))
    if not bool(torch.isfinite(lo_n).all() and torch.isfinite(top_n).all()):
        return None
    return lo_n + 0.0, top_n + 0.0  # -0 -> +0


class _Prepared:
    """Per-(dtype, device, sample shape) flattened bounds of one module."""

    __slots__ = ("lo", "hi", "mu", "mean", "crop")

    def __init__(self, lo: torch.Tensor | None, hi: torch.Tensor | None, mu: torch.Tensor | None,
                 mean: torch.Tensor, crop: torch.Tensor) -> None:
        self.lo, self.hi, self.mu, self.mean, self.crop = lo, hi, mu, mean, crop


class _FastMasked(torch.autograd.Function):
    """Fast forward; backward is that of ``torch.where``: zero gradient inside the band.

    Saves an int8 mask (-1 outside the band, 0 inside); the backward is one bitwise AND of
    the gradient's bits with it, which is exactly ``where(inside, 0, grad)``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, prep: _Prepared) -> torch.Tensor:  # type: ignore[override]
        keep = torch.empty(x.shape, dtype=torch.int8, device=x.device).view(-1, prep.lo.numel())
        out = _select_chunks(x, prep.lo, prep.hi, prep.mu, keep)
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        itype = _INT_VIEW[grad_output.dtype]
        grad = grad_output.contiguous().view(itype)
        return torch.bitwise_and(grad, keep.view(grad.shape)).view(grad_output.dtype), None


class _FastStraightThrough(torch.autograd.Function):
    """Fast forward, identity backward (BPDA)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, prep: _Prepared) -> torch.Tensor:  # type: ignore[override]
        return _select_chunks(x, prep.lo, prep.hi, prep.mu, None)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad_output, None


def _is_tracing(x: Any) -> bool:
    return bool(
        torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)
    )


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
            raise UserError(f"stats_mode must be 'exact' or 'official', got {stats_mode!r}")
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
        self.soft_temperature: float | None = None
        self.enabled = True
        self.moments = RunningMoments()
        self._official: list[torch.Tensor] = []
        self._prepared: dict[tuple[Any, ...], _Prepared] = {}
        self._alpha = 0.0
        self.alpha = alpha

    # -- configuration -------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"alpha must be a number, got {value!r} (site {self.site!r})")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"alpha must be a finite number >= 0, got {value!r} (site {self.site!r})")
        self._alpha = value
        self._refresh_crop()

    def _refresh_crop(self) -> None:
        with torch.no_grad():
            self.crop.copy_(self.var.clamp_min(0).sqrt() * self._alpha)
        self._prepared = {}

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "MeanSparse":  # type: ignore[override]
        self._prepared = {}
        return super()._apply(fn, *args, **kwargs)

    def _prepare(self, x: torch.Tensor) -> _Prepared:
        """Bounds for inputs like ``x`` (cached; computed once per dtype, device and sample shape)."""
        # the buffers' version counters make in-place edits of mean/crop invalidate the cache
        key = (x.dtype, x.device, tuple(x.shape[1:]), self.mean._version, self.crop._version)
        prep = self._prepared.get(key)
        if prep is None:
            with torch.no_grad():
                mean, crop = self.thresholds_like(x)
                bounds = exact_bounds(mean, crop)
                if bounds is not None and mean.dtype != x.dtype:
                    bounds = _narrowed(*bounds, x.dtype)
                mu = mean.to(x.dtype)
                if bounds is None or x.dim() < 2 or self.channel_dim % x.dim() == 0:
                    prep = _Prepared(None, None, None, mean, crop)
                elif self.channel_dim % x.dim() == x.dim() - 1:  # channels last: one bound per channel
                    lo, hi, mu = (t.reshape(-1).contiguous() for t in (*bounds, mu))
                    prep = _Prepared(lo, hi, mu, mean, crop)
                else:  # channels inside a sample: bounds for every value of a sample
                    full = tuple(x.shape[1:])
                    lo, hi, mu = (t.expand(full).contiguous().view(-1) for t in (*bounds, mu))
                    prep = _Prepared(lo, hi, mu, mean, crop)
            if len(self._prepared) >= 8:
                self._prepared.clear()
            self._prepared[key] = prep
        return prep

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
            raise UserError(
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
            raise UserError(
                f"site {self.site!r}: statistics have {mean.numel()}/{var.numel()} channels, expected {self.channels}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()) or (var < 0).any():
            raise UserError(f"site {self.site!r}: statistics must be finite with var >= 0")
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
                f"MeanSparse site {self.site!r} has no statistics: run robustify.defenses.meansparse.calibrate(...) "
                "or load a calibration file before using the model"
            )
        if self._alpha == 0.0:
            return x  # strict "<": a zero threshold selects nothing, exactly the identity
        if self.soft_temperature is not None:
            return _SoftBand.apply(x, *self.thresholds_like(x), self.soft_temperature)
        if _is_tracing(x):
            mean, crop = self.thresholds_like(x)
            if self.straight_through:
                return _StraightThrough.apply(x, mean, crop)
            return _sparsify(x, mean, crop)
        prep = self._prepare(x)
        if prep.lo is None or not x.is_contiguous() or x.numel() == 0:
            if self.straight_through:
                return _StraightThrough.apply(x, prep.mean, prep.crop)
            return _sparsify(x, prep.mean, prep.crop)
        if self.straight_through:
            return _FastStraightThrough.apply(x, prep)
        if torch.is_grad_enabled() and x.requires_grad:
            return _FastMasked.apply(x, prep)
        return _select_chunks(x, prep.lo, prep.hi, prep.mu, None)

    def thresholds_like(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``crop`` shaped to broadcast against ``x``, in the dtype the band is tested in:
        ``x``'s dtype promoted with the statistics' (float32 for float16/bfloat16 inputs, as in
        RobustBench's ``MeanSparse``, whose ``input - running_mean`` promotes). The reference formula
        is ``where(|x - mean| < crop, mean, x)`` with these, its output in ``x``'s dtype."""
        shape = self._broadcast_shape(x.dim())
        dtype = torch.promote_types(x.dtype, self.mean.dtype) if x.is_floating_point() else self.mean.dtype
        return self.mean.view(shape).to(dtype), self.crop.view(shape).to(dtype)

    @property
    def sparsifying(self) -> bool:
        """True when the forward is the plain (non-BPDA) sparsification, nothing else."""
        return (
            self.calibrated and self.enabled and not self.calibrating and not self.straight_through
            and self._alpha != 0.0 and self.soft_temperature is None
        )

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, alpha={self._alpha:g}, channel_dim={self.channel_dim}, "
            f"calibrated={self.calibrated}, site={self.site!r}"
        )


class MeanSparseReLU(nn.ReLU):
    """A ReLU with its MeanSparse child fused into it (see :func:`robustify.defenses.meansparse.insert.fuse_meansparse`).

    It keeps the child under the same name, so state-dict keys do not change. Eagerly it
    computes ``relu(meansparse(x))`` exactly as the unfused pair (MeanSparse's fast path,
    every mode), rectifying MeanSparse's fresh output in place; under
    ``torch.compile``/tracing, in the plain sparsifying mode, it runs
    :class:`_SparsifyReLU`, whose backward saves nothing beyond the ReLU output.
    """

    meansparse: MeanSparse

    def __init__(self, meansparse: MeanSparse, inplace: bool = False) -> None:
        super().__init__(inplace=inplace)
        self.meansparse = meansparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = self.meansparse
        if ms.sparsifying and _is_tracing(x):
            return _SparsifyReLU.apply(x, *ms.thresholds_like(x))
        z = ms(x)
        # MeanSparse's output is a fresh tensor that nothing else keeps: rectify it in place
        # (one large allocation less per site); the identity modes return ``x`` itself
        return nn.functional.relu(z, inplace=self.inplace or z is not x)


def meansparse_modules(model: nn.Module) -> dict[str, MeanSparse]:
    """Every MeanSparse module of ``model`` (each module object once), in registration order.

    Keyed by site name; where distinct modules share a site name (an ensemble of robustified
    models), each of them is keyed by its path in ``model`` instead (``members.0.act1``).
    """
    entries = [(module.site or name, name, module) for name, module in model.named_modules()
               if isinstance(module, MeanSparse)]
    shared = Counter(site for site, _, _ in entries)
    found: dict[str, MeanSparse] = {}
    for site, name, module in entries:
        key = site if shared[site] == 1 else name.removesuffix(f".{CHILD_NAME}")
        found[name if key in found else key] = module
    return found


def _by_site_or_key(modules: dict[str, MeanSparse], names: Iterable[str]) -> dict[str, list[MeanSparse]]:
    """The modules each name designates: its key, else every module of that site name."""
    return {name: [modules[name]] if name in modules else [m for m in modules.values() if m.site == name]
            for name in names}


def set_alpha(model: nn.Module, alpha: float | Mapping[str, float]) -> None:
    """Set the threshold of every MeanSparse site (a float) or of named sites (a mapping).

    A mapping's keys are those of :func:`meansparse_modules`, or site names (which reach
    that site in every member of an ensemble).

    Never recalibrates: the statistics do not depend on alpha.
    """
    modules = meansparse_modules(model)
    if not modules:
        raise UserError("the model has no MeanSparse modules: insert them first")
    if isinstance(alpha, Mapping):
        targets = _by_site_or_key(modules, alpha)
        unknown = sorted(name for name, found in targets.items() if not found)
        if unknown:
            raise UserError(f"unknown MeanSparse site(s) {unknown}; known sites: {list(modules)[:8]}...")
        for name, value in alpha.items():
            for module in targets[name]:
                module.alpha = value
    else:
        for module in modules.values():
            module.alpha = alpha


@contextlib.contextmanager
def _toggled(model: nn.Module, attribute: str, value: bool | float) -> Iterator[nn.Module]:
    with toggled(meansparse_modules(model).values(), attribute, value):
        yield model


def bpda(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block, every MeanSparse module passes gradients straight through.

    The forward is unchanged; the backward is the identity. Restored on exit, even on error.
    """
    return _toggled(model, "straight_through", True)


def soft_bpda(model: nn.Module, temperature: float) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block, every MeanSparse module back-propagates through the smooth surrogate
    of its band at ``temperature`` (relative to the band's half-width). Forward unchanged;
    restored on exit, even on error; never saved."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature <= 0:
        raise UserError(f"temperature must be a finite number > 0, got {temperature!r}")
    return _toggled(model, "soft_temperature", float(temperature))


def defenses_disabled(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block, every MeanSparse module is the identity (the base model)."""
    return _toggled(model, "enabled", False)


def capture_site_inputs(model: nn.Module) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
    """``{site: input}`` of every MeanSparse module, recorded by the forwards in the block."""
    return captured_inputs(meansparse_modules(model))


def in_band(model: nn.Module, site: str, z: torch.Tensor) -> torch.Tensor:
    """The units of ``z`` (the input of MeanSparse ``site``) inside its band ``|z - mean| < crop``:
    replaced by the mean, their gradient is zero. Tested as the forward does (:meth:`MeanSparse.thresholds_like`)."""
    mean, crop = meansparse_modules(model)[site].thresholds_like(z)
    return (z - mean).abs() < crop
