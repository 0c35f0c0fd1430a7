"""The eager fast path of MeanSparse is bit-identical to the reference formula; compiled and
mixed-precision paths behave."""

from __future__ import annotations

import math

import pytest
import torch

from torch import nn

from robustify import bpda, calibrate
from robustify.defenses.meansparse import MeanSparseConfig
from robustify.defenses.meansparse import fuse_meansparse
from robustify.defenses.meansparse import insert_meansparse
from robustify.defenses.meansparse import meansparse_modules
from robustify.defenses.meansparse import remove_meansparse
from robustify.defenses.meansparse import set_alpha
from robustify.defenses.meansparse import unfuse_meansparse
from robustify.evaluation.fast import autocast, compile_model
from robustify.defenses.meansparse.module import MeanSparse, MeanSparseReLU, _sparsify, _SparsifyReLU, exact_bounds

INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _reference(m: MeanSparse, x: torch.Tensor) -> torch.Tensor:
    """The published formula as RobustBench's module evaluates it: the band tested in the input's dtype promoted
    with the float32 statistics (float32 for float16/bfloat16), the output in the input's dtype."""
    shape = m._broadcast_shape(x.dim())
    mean, crop = m.mean.view(shape), m.crop.view(shape)
    return torch.where((x - mean).abs() < crop, mean.to(x.dtype), x)


def _module(channels: int, channel_dim: int, seed: int, alpha: float = 0.3) -> MeanSparse:
    g = torch.Generator().manual_seed(seed)
    m = MeanSparse(channels, alpha=alpha, channel_dim=channel_dim)
    var = torch.rand(channels, generator=g) * 2
    var[0] = 0.0  # a zero-width band selects nothing
    mean = torch.randn(channels, generator=g) * 3
    mean[1] = 0.0
    m.set_statistics(mean, var)
    return m


def _boundary_inputs(m: MeanSparse, dtype: torch.dtype, ndim: int, seed: int) -> torch.Tensor:
    """Values within a few ulps of mean +- crop, of mean and of 0, plus NaN/inf/-0 and noise."""
    shape = m._broadcast_shape(ndim)
    c = m.channels
    mean, crop = m.mean.to(dtype).view(-1), m.crop.to(dtype).view(-1)
    centres = torch.stack([mean - crop, mean + crop, mean, torch.zeros_like(mean)])  # (4, C)
    steps = torch.arange(-4, 5)
    values = []
    for k in steps.tolist():
        v = centres.clone()
        target = torch.full_like(v, math.inf if k > 0 else -math.inf)
        for _ in range(abs(k)):
            v = torch.nextafter(v, target)
        values.append(v)
    vals = torch.cat(values)  # (36, C)
    g = torch.Generator().manual_seed(seed)
    noise = (torch.randn(8, c, generator=g) * 4).to(dtype)
    special = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0], dtype=dtype)
    special = special.view(-1, 1).expand(-1, c)
    rows = torch.cat([vals, noise, special])  # (R, C)
    if ndim == 4:  # (N, C, 2, 2) in NCHW
        x = rows.view(-1, c, 1, 1).expand(-1, c, 2, 2)
    else:  # tokens (N, L, C)
        x = rows.view(-1, 1, c).expand(-1, 3, c)
    assert x.shape[m.channel_dim] == c and shape[0 if ndim == 3 else 0] == c
    return x.contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_fast_path_is_bit_identical_to_the_formula(dtype: torch.dtype, layout: str) -> None:
    ndim, channel_dim = (4, 1) if layout == "nchw" else (3, -1)
    for seed in range(6):
        m = _module(7, channel_dim, seed, alpha=[0.05, 0.2, 0.3, 1.0, 2.5, 1e-6][seed])
        x = _boundary_inputs(m, dtype, ndim, seed)
        out = m(x)
        ref = _reference(m, x)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out.view(INT[dtype]), ref.view(INT[dtype])), (dtype, layout, seed)
        # the inputs really straddle the boundaries: both outcomes occur next to mean +- crop
        replaced = (out.view(INT[dtype]) != x.view(INT[dtype])) & ~x.isnan()
        assert replaced.any() and (~replaced).any()
        assert m._prepared and all(p.lo is not None for p in m._prepared.values())  # fast path used


def test_exact_bounds_select_the_same_values_as_the_formula() -> None:
    mean = torch.tensor([0.0, -0.0353, 1e-30, 3.0, -2.0])
    crop = torch.tensor([0.0, 0.0326, 0.5, 1e-7, 2.0])
    lo, top = exact_bounds(mean, crop)
    for i in range(len(mean)):
        # walk across both ends, comparing membership with the formula one float at a time
        for centre in (mean[i] - crop[i], mean[i] + crop[i], mean[i]):
            v = centre.clone()
            for _ in range(40):
                v = torch.nextafter(v, torch.tensor(-math.inf))
            for _ in range(80):
                inside = bool((v - mean[i]).abs() < crop[i])
                assert inside == bool((v > lo[i]) & (v <= top[i])), (i, float(v))
                v = torch.nextafter(v, torch.tensor(math.inf))


def test_alpha_zero_is_exactly_the_identity_and_alpha_changes_apply() -> None:
    m = _module(4, 1, 0, alpha=0.0)
    x = torch.randn(3, 4, 5, 5)
    assert m(x) is x
    m.alpha = 0.5
    assert torch.equal(m(x), _reference(m, x))
    m.alpha = 1.5  # the cached bounds are refreshed
    assert torch.equal(m(x), _reference(m, x))
    m.set_statistics(torch.zeros(4), torch.ones(4))
    assert torch.equal(m(x), _reference(m, x))


def test_gradients_match_where_and_bpda_is_the_identity() -> None:
    m = _module(5, 1, 3, alpha=0.8)
    x = (torch.randn(4, 5, 3, 3) * 2).requires_grad_(True)
    g = torch.randn(4, 5, 3, 3)
    (grad_fast,) = torch.autograd.grad(m(x), x, g)
    xr = x.detach().clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(_reference(m, xr), xr, g)
    assert torch.equal(grad_fast, grad_ref)
    assert (grad_fast == 0).any() and (grad_fast != 0).any()
    m.straight_through = True
    out = m(x)
    (grad_bpda,) = torch.autograd.grad(out, x, g)
    assert torch.equal(grad_bpda, g)
    assert torch.equal(out.detach(), _reference(m, x.detach()))


def test_non_contiguous_and_repeated_calls_reuse_workspace_safely() -> None:
    m = _module(6, 1, 4, alpha=0.4)
    x = torch.randn(5, 6, 4, 4)
    cl = x.to(memory_format=torch.channels_last)
    assert torch.equal(m(cl), _reference(m, cl))
    a, b = torch.randn(9, 6, 4, 4), torch.randn(9, 6, 4, 4)
    out_a = m(a)
    out_b = m(b)  # same workspace: out_a must not change
    assert torch.equal(out_a, _reference(m, a)) and torch.equal(out_b, _reference(m, b))


def test_model_outputs_match_the_formula_and_calibration_still_works(tiny_model, tiny_input) -> None:
    x = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model = insert_meansparse(tiny_model, x[:2], MeanSparseConfig(alpha=0.3))
    calibrate(model, [x[:12], x[12:]], progress=False)
    modules = meansparse_modules(model)
    assert all(m.calibrated and m.moments.count > 0 for m in modules.values())
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, s=s: seen.__setitem__(s, (a[0], out))) for s, m in modules.items()]
    with torch.no_grad():
        model(tiny_input)
    for h in hooks:
        h.remove()
    for s, (inp, out) in seen.items():
        assert torch.equal(out, _reference(modules[s], inp)), s
    with bpda(model):
        xi = tiny_input.clone().requires_grad_(True)
        model(xi).sum().backward()
        assert xi.grad is not None and torch.isfinite(xi.grad).all()


def test_bf16_autocast_keeps_float32_statistics(tiny_model) -> None:
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    model = insert_meansparse(tiny_model, x[:2], MeanSparseConfig(alpha=0.2))
    with autocast("cpu", torch.bfloat16):
        calibrate(model, [x], progress=False)
    modules = list(meansparse_modules(model).values())
    assert all(m.mean.dtype == torch.float32 and m.var.dtype == torch.float32 for m in modules)
    assert all(m.moments.mean.dtype == torch.float64 for m in modules)
    with torch.no_grad():
        full = model(x)
        with autocast("cpu", torch.bfloat16):
            half = model(x)
    assert half.dtype == torch.bfloat16
    assert all(m.mean.dtype == torch.float32 for m in modules)
    assert (half.float().argmax(1) == full.argmax(1)).float().mean() > 0.8
    torch.testing.assert_close(half.float(), full, rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="bfloat16"):
        with autocast("cpu", torch.float32):
            pass


def _input_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(out, out.detach().argmax(1).roll(1)), xi)
    return out.detach(), grad


def test_compiled_model_matches_eager(tiny_model) -> None:
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    model = insert_meansparse(tiny_model, x[:2], MeanSparseConfig(alpha=0.3))
    calibrate(model, [x], progress=False)
    eager_out, eager_grad = _input_grad(model, x)
    compiled = compile_model(model)  # fuses the three ReLU sites in place (the SiLU one stays)
    assert sum(isinstance(m, MeanSparseReLU) for m in model.modules()) == 3
    out, grad = _input_grad(compiled, x)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0
    with bpda(model):  # a mode change recompiles (guard on the Python attribute), never stale
        torch.testing.assert_close(_input_grad(compiled, x)[1], _input_grad(model, x)[1], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(_input_grad(compiled, x)[1], eager_grad)
    set_alpha(model, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(compiled(x), eager_out)


def test_fused_relu_gradient_equals_the_unfused_pair() -> None:
    """The fused backward rebuilds the band from the ReLU output: exact on band edges, zero-width
    bands, zero and negative means, NaN and infinities."""
    m = _module(6, 1, 11, alpha=0.4)
    with torch.no_grad():
        m.mean[2] = -0.7  # a negative mean: the band maps to 0 after the ReLU
        m.mean[0] = 0.9  # a positive mean with a zero-width band: x == mean keeps its gradient
    x = _boundary_inputs(m, torch.float32, 4, 12)
    mean, crop = m.thresholds_like(x)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(13))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused = _SparsifyReLU.apply(xa, mean, crop)
    pair = torch.relu(_sparsify(xb, mean, crop))
    assert torch.equal(fused, pair) or torch.allclose(fused, pair, equal_nan=True)
    (ga,) = torch.autograd.grad(fused, xa, g)
    (gb,) = torch.autograd.grad(pair, xb, g)
    assert torch.equal(ga, gb)
    inside = ((x - mean).abs() < crop)
    assert inside.any() and (ga[inside] == 0).all()


def test_fuse_keeps_state_outputs_and_gradients_and_undoes(tiny_model) -> None:
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    model = insert_meansparse(tiny_model, x[:2], MeanSparseConfig(alpha=0.3))
    calibrate(model, [x], progress=False)
    keys, sites = list(model.state_dict()), list(meansparse_modules(model))
    out, grad = _input_grad(model, x)
    assert fuse_meansparse(model) == 3
    assert fuse_meansparse(model) == 0  # idempotent
    assert list(model.state_dict()) == keys
    assert list(meansparse_modules(model)) == sites and len(sites) == 4
    fused_out, fused_grad = _input_grad(model, x)
    assert torch.equal(fused_out, out) and torch.equal(fused_grad, grad)
    calibrate(model, [x], progress=False)  # calibration mode still reaches the fused child
    assert torch.equal(model(x), out)
    assert unfuse_meansparse(model) == 3
    assert not any(isinstance(m, MeanSparseReLU) for m in model.modules())
    assert torch.equal(model(x), out)
    fuse_meansparse(model)
    remove_meansparse(model)
    assert not meansparse_modules(model) and not any(isinstance(m, MeanSparseReLU) for m in model.modules())
    assert sum(type(m) is nn.ReLU for m in model.modules()) == 3


def test_relus_with_hooks_of_their_own_are_not_fused(tiny_model) -> None:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    model = insert_meansparse(tiny_model, x[:2], MeanSparseConfig(alpha=0.3))
    calibrate(model, [x], progress=False)
    model.act1.register_forward_hook(lambda mod, inp, out: None)
    assert fuse_meansparse(model) == 2 and type(model.act1) is nn.ReLU


def test_in_place_edits_of_the_buffers_are_picked_up() -> None:
    m = _module(4, 1, 8, alpha=0.5)
    x = torch.randn(3, 4, 5, 5)
    m(x)
    with torch.no_grad():
        m.mean.add_(0.3)
        m.crop.mul_(2.0)
    assert torch.equal(m(x), _reference(m, x))


def test_for_evaluation_fuses_and_autocasts(tiny_model) -> None:
    from robustify.evaluation.fast import AutocastModel, for_evaluation

    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    model = insert_meansparse(tiny_model, x[:2], MeanSparseConfig(alpha=0.3))
    calibrate(model, [x], progress=False)
    with torch.no_grad():
        reference = model(x)
    wrapped = for_evaluation(model, precision="bfloat16")
    assert isinstance(wrapped, AutocastModel) and wrapped.model is model
    assert sum(isinstance(m, MeanSparseReLU) for m in model.modules()) == 3  # fused in place
    assert len(meansparse_modules(wrapped)) == 4  # bpda()/defenses_disabled() reach them through the wrapper
    with torch.no_grad():
        out = wrapped(x)
        assert torch.equal(for_evaluation(model)(x), reference)  # float32: fusing changes nothing
    assert out.dtype == torch.float32 and not torch.equal(out, reference)
    torch.testing.assert_close(out, reference, rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="precision"):
        for_evaluation(model, precision="int8")
