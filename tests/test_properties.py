"""Property-based tests (hypothesis) of the MeanSparse operator and of the moment merging."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustify.defenses.meansparse.module import MeanSparse, bpda
from robustify.core.stats import RunningMoments

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], int]:
    """A random input shape (2 to 4 dims) and a channel axis: dim 1 or the last dim."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    channel_dim = draw(st.sampled_from([1, -1]))
    return shape, channel_dim


def _module(shape: tuple[int, ...], channel_dim: int, alpha: float, seed: int) -> tuple[MeanSparse, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    channels = shape[channel_dim]
    m = MeanSparse(channels, alpha=alpha, channel_dim=channel_dim, ndim=len(shape), site="s")
    m.set_statistics(torch.randn(channels, generator=g), torch.rand(channels, generator=g) * 2)
    x = torch.randn(shape, generator=g) * 1.5
    return m, x


def _view(v: torch.Tensor, shape: tuple[int, ...], channel_dim: int) -> torch.Tensor:
    b = [1] * len(shape)
    b[channel_dim] = shape[channel_dim]
    return v.view(b)


@SETTINGS
@given(layout=layouts(), alpha=st.floats(0, 3, allow_nan=False), seed=st.integers(0, 2**16))
def test_operator_is_mean_inside_the_band_and_identity_outside(layout, alpha: float, seed: int) -> None:
    shape, channel_dim = layout
    m, x = _module(shape, channel_dim, alpha, seed)
    out = m(x)
    mean = _view(m.mean, shape, channel_dim).expand(shape)
    sigma = _view(m.var.sqrt(), shape, channel_dim).expand(shape)
    inside = (x - mean).abs() < sigma * alpha  # strict <, float32 as the module
    assert torch.equal(out[inside], mean[inside])
    assert torch.equal(out[~inside], x[~inside])
    # in float64 the band test agrees except within rounding of the boundary
    exact_inside = (x.double() - mean.double()).abs() < sigma.double() * alpha
    boundary = ((x.double() - mean.double()).abs() - sigma.double() * alpha).abs() < 1e-5
    assert torch.equal(inside[~boundary], exact_inside[~boundary])


@SETTINGS
@given(layout=layouts(), seed=st.integers(0, 2**16))
def test_alpha_zero_is_exactly_the_identity(layout, seed: int) -> None:
    shape, channel_dim = layout
    m, x = _module(shape, channel_dim, 0.0, seed)
    assert torch.equal(m(x), x)


@SETTINGS
@given(layout=layouts(), alpha=st.floats(0, 3, allow_nan=False), seed=st.integers(0, 2**16))
def test_bpda_keeps_forward_and_passes_gradient_straight_through(layout, alpha: float, seed: int) -> None:
    shape, channel_dim = layout
    m, x = _module(shape, channel_dim, alpha, seed)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    x.requires_grad_(True)
    with bpda(m):
        out = m(x)
        (out * w).sum().backward()
    assert torch.equal(out.detach(), m(x.detach()))
    assert torch.equal(x.grad, w)  # identity backward
    assert m.straight_through is False  # restored on exit


@st.composite
def split_data(draw: st.DrawFn) -> tuple[torch.Tensor, list[int], int]:
    n = draw(st.integers(1, 40))
    rest = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=6))) - {n})
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n]) if b > a]
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 10.0, -1e4]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *rest), generator=g, dtype=torch.float64) * scale + offset
    return x, sizes, draw(st.sampled_from([1, -1])) if len(rest) > 0 else 1


@SETTINGS
@given(data=split_data())
def test_merged_moments_equal_the_whole_set_for_any_split(data) -> None:
    x, sizes, channel_dim = data
    acc = RunningMoments()
    for chunk in x.split(sizes):
        acc.update(chunk, channel_dim)
    flat = x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    assert acc.count == flat.shape[0]
    torch.testing.assert_close(acc.mean, flat.mean(dim=0), rtol=1e-9, atol=1e-9 * float(flat.abs().max()))
    biased = flat.var(dim=0, unbiased=False)
    torch.testing.assert_close(acc.variance(unbiased=False), biased, rtol=1e-7, atol=1e-12 * float(flat.abs().max()) ** 2)
    if flat.shape[0] > 1:
        torch.testing.assert_close(acc.variance(unbiased=True), flat.var(dim=0, unbiased=True), rtol=1e-7,
                                   atol=1e-12 * float(flat.abs().max()) ** 2)


@SETTINGS
@given(data=split_data(), alpha=st.floats(0, 2, allow_nan=False))
def test_calibrated_module_does_not_depend_on_the_split(data, alpha: float) -> None:
    x, sizes, channel_dim = data
    x = x.float()
    whole = MeanSparse(x.shape[channel_dim], alpha=alpha, channel_dim=channel_dim, ndim=x.dim())
    split = MeanSparse(x.shape[channel_dim], alpha=alpha, channel_dim=channel_dim, ndim=x.dim())
    whole.observe(x)
    whole.finalize()
    for chunk in x.split(sizes):
        split.observe(chunk)
    split.finalize()
    torch.testing.assert_close(split.mean, whole.mean, rtol=1e-6, atol=1e-6 * float(x.abs().max()))
    torch.testing.assert_close(split.var, whole.var, rtol=1e-5, atol=1e-6 * float(x.abs().max()) ** 2)
