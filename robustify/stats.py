"""Exact per-channel moments, merged batch by batch (Chan et al.) in float64.

The published MeanSparse code averages per-batch means and per-batch variances, which
depends on batch size and order and drops the between-batch spread of the means.
:class:`RunningMoments` keeps ``(count, mean, M2)`` per channel and merges each batch with
Chan's parallel formulas, so the result equals a whole-set computation whatever the
batching, and two accumulators (e.g. from two processes) merge exactly too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RunningMoments", "batch_moments"]


def batch_moments(x: torch.Tensor, channel_dim: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, per-channel mean and per-channel M2 (sum of squared deviations) of ``x``.

    Computed in float64 in one ``var_mean`` pass. ``channel_dim`` may be negative.
    """
    channel_dim = channel_dim % x.dim()
    dims = [d for d in range(x.dim()) if d != channel_dim]
    n = x.numel() // x.shape[channel_dim]
    var, mean = torch.var_mean(x.detach().to(torch.float64), dim=dims, correction=0)
    return n, mean, var * n


@dataclass
class RunningMoments:
    """Per-channel count, mean and M2 in float64; ``merge`` is exact (Chan's formulas)."""

    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge the moments of another set of ``n`` elements into this one."""
        if n == 0:
            return
        mean = mean.to(torch.float64)
        m2 = m2.to(torch.float64)
        if self.count == 0 or self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        if mean.shape != self.mean.shape:
            raise ValueError(
                f"channel count changed between batches: {tuple(self.mean.shape)} -> {tuple(mean.shape)}"
            )
        total = self.count + n
        delta = mean.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2.to(self.m2.device) + delta.pow(2) * (self.count * n / total)
        self.count = total

    def update(self, x: torch.Tensor, channel_dim: int) -> None:
        """Merge one batch of activations."""
        self.merge(*batch_moments(x, channel_dim))

    def merge_from(self, other: "RunningMoments") -> None:
        if other.count:
            assert other.mean is not None and other.m2 is not None
            self.merge(other.count, other.mean, other.m2)

    def variance(self, unbiased: bool = True) -> torch.Tensor:
        """Per-channel variance: M2/(n-1) (unbiased, the default) or M2/n."""
        if self.count == 0 or self.m2 is None:
            raise ValueError("no data was merged: run calibration before asking for statistics")
        denom = self.count - 1 if unbiased and self.count > 1 else self.count
        return self.m2 / denom
