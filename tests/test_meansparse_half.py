"""MeanSparse on float16/bfloat16 inputs decides the band as RobustBench's module does (in float32, by type
promotion against its float32 statistics), on every forward path: eager fast path, reference formula,
straight-through, and the ReLU-fused function the compiled path runs."""

from __future__ import annotations

import pytest
import torch

from robustify.core.compat import import_robustbench
from robustify.defenses.meansparse.module import MeanSparse, MeanSparseReLU, _SparsifyReLU, _sparsify

import_robustbench()
from robustbench.model_zoo.architectures.Meansparse_wrn_70_16 import MeanSparse as PublishedMeanSparse  # noqa: E402

C = 16


def _pair(alpha: float = 0.7, seed: int = 0) -> tuple[PublishedMeanSparse, MeanSparse]:
    g = torch.Generator().manual_seed(seed)
    mean, var = torch.randn(C, generator=g), torch.rand(C, generator=g) * 2 + 0.05
    theirs = PublishedMeanSparse(C)
    theirs.running_mean.copy_(mean)
    theirs.running_var.copy_(var)
    theirs.threshold.fill_(alpha)
    ours = MeanSparse(C, alpha=alpha)
    ours.set_statistics(mean, var)
    return theirs, ours


def _near_edges(ours: MeanSparse, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """16,384 inputs in ``dtype``: each a few representable steps from one of its channel's band edges."""
    g = torch.Generator().manual_seed(seed)
    mean, crop = ours.mean.view(1, C, 1, 1), ours.crop.view(1, C, 1, 1)
    sign = torch.where(torch.rand(64, C, 4, 4, generator=g) < 0.5, -1.0, 1.0)
    x = (mean + sign * crop).to(dtype)
    steps = torch.randint(-3, 4, x.shape, generator=g)
    for k in range(3):
        x = torch.where(steps > k, torch.nextafter(x, torch.full_like(x, torch.inf)), x)
        x = torch.where(steps < -k, torch.nextafter(x, torch.full_like(x, -torch.inf)), x)
    return x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_band_decision_equals_robustbench_in_half_precision(dtype: torch.dtype) -> None:
    theirs, ours = _pair()
    x = _near_edges(ours, dtype)
    with torch.no_grad():
        expected = theirs(x)  # float32: RobustBench's input - running_mean promotes
        inside = (x - theirs.running_mean.view(1, C, 1, 1)).abs() < (theirs.threshold * theirs.running_var.sqrt()).view(1, C, 1, 1)
        assert 0.2 < inside.float().mean() < 0.8  # both sides of the edges are exercised
        want = expected.to(dtype)
        assert torch.equal(ours(x), want)  # eager fast path (bounds)
        assert torch.equal(ours(x.transpose(2, 3)), want.transpose(2, 3))  # non-contiguous: the formula
        assert torch.equal(_sparsify(x, *ours.thresholds_like(x)), want)  # the traced/compiled formula
        assert torch.equal(MeanSparseReLU(ours)(x), torch.relu(want))  # fused ReLU, eager
        assert torch.equal(_SparsifyReLU.apply(x, *ours.thresholds_like(x)), torch.relu(want))  # fused, compiled
    xg = x.clone().requires_grad_(True)
    out = ours(xg)  # the masked fast path: zero gradient exactly inside RobustBench's band
    assert torch.equal(out.detach(), want)
    out.sum().backward()
    assert torch.equal(xg.grad == 0, inside)
    xg.grad = None
    y = _SparsifyReLU.apply(xg, *ours.thresholds_like(xg))
    y.sum().backward()
    assert torch.equal(xg.grad == 0, inside | (want <= 0))
    ours.straight_through = True
    with torch.no_grad():
        assert torch.equal(ours(x), want)
