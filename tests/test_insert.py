"""Insertion of MeanSparse before every activation, on many architectures, and its settings."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from robustify import InsertionError, NotCalibratedError, bpda, calibrate
from robustify.defenses.meansparse import MeanSparseConfig
from robustify.defenses.meansparse import insert_meansparse
from robustify.defenses.meansparse import meansparse_modules
from robustify.defenses.meansparse import plan
from robustify.defenses.meansparse import remove_meansparse
from robustify.defenses.meansparse import set_alpha
from robustify.defenses.meansparse.module import MeanSparse

CONVNEXT_ATTO_MLP = [160] * 2 + [320] * 2 + [640] * 6 + [1280] * 2  # 4 * dim, depths (2, 2, 6, 2)

# spec, input side, number of activation calls, activation class, channel axes, channel counts.
# RobustBench's CIFAR-10 architectures are checked the same way in test_models.py.
ARCHITECTURES = [
    ("aa-resnet18", 32, 17, "ReLU", {1}, [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4),
    ("timm:resnet18", 64, 17, "ReLU", {1}, [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4),
    ("timm:convnext_atto", 64, 12, "GELU", {1}, CONVNEXT_ATTO_MLP),  # timm's atto uses a 1x1-conv MLP (NCHW)
    ("timm:vit_tiny_patch16_224", 224, 12, "GELU", {-1}, [768] * 12),  # tokens (N, 197, 4 * 192)
]


def _calibrated(model: nn.Module, example: torch.Tensor, alpha: float, batches: list[torch.Tensor], **kw) -> nn.Module:
    model = insert_meansparse(model, example, MeanSparseConfig(alpha=alpha, **kw))
    calibrate(model, batches, progress=False)
    return model


@pytest.mark.parametrize("spec,side,n_sites,activation,dims,channels", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_insertion_on_architectures(check_insertion, spec, side, n_sites, activation, dims, channels) -> None:
    check_insertion(spec, side, n_sites, activation, dims, channels)


def test_convnext_channels_last_mlp_uses_last_dim() -> None:
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, conv_mlp=False).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
    ms_model = _calibrated(model, x, 0.0, [torch.rand(2, 3, 64, 64)])
    modules = list(meansparse_modules(ms_model).values())
    assert [m.channel_dim for m in modules] == [-1] * 12
    assert [m.channels for m in modules] == CONVNEXT_ATTO_MLP
    assert modules[0].ndim == 4  # (N, H, W, 4 * dim)
    with torch.no_grad():
        assert torch.equal(ms_model(x), base)


def test_state_dict_keys_kept_and_removal_restores(tiny_model, tiny_input) -> None:
    keys = set(tiny_model.state_dict())
    with torch.no_grad():
        base = tiny_model(tiny_input)
    model = _calibrated(tiny_model, tiny_input, 0.4, [tiny_input])
    new_keys = set(model.state_dict())
    assert keys <= new_keys
    assert {k for k in new_keys - keys} == {f"{s}.meansparse.{b}" for s in meansparse_modules(model) for b in ("mean", "var")}
    with torch.no_grad():
        assert not torch.equal(model(tiny_input), base)
        remove_meansparse(model)
        assert not meansparse_modules(model)
        assert torch.equal(model(tiny_input), base)


def test_plan_changes_nothing(tiny_model, tiny_input) -> None:
    keys = list(tiny_model.state_dict())
    prepared, sites = plan(tiny_model, tiny_input)
    assert [s.name for s in sites] == ["act1", "relu_0", "act3", "relu_1"]
    assert list(tiny_model.state_dict()) == keys
    assert not meansparse_modules(tiny_model) and not meansparse_modules(prepared)
    assert all(not m._forward_pre_hooks for m in tiny_model.modules())


def test_changing_alpha_never_recalibrates(tiny_model, tiny_input) -> None:
    batches = list(torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(5)).split(4))
    fresh = copy.deepcopy(tiny_model)
    model = _calibrated(tiny_model, tiny_input, 0.2, batches)
    modules = meansparse_modules(model)
    before = {s: (m.mean.clone(), m.var.clone(), m.moments.count) for s, m in modules.items()}
    set_alpha(model, 0.8)
    set_alpha(model, {"act1": 0.05})
    for s, m in modules.items():
        assert torch.equal(m.mean, before[s][0]) and torch.equal(m.var, before[s][1])
        assert m.moments.count == before[s][2]
    assert modules["act1"].alpha == 0.05 and modules["act3"].alpha == 0.8
    # same outputs as a model built and calibrated with those alphas from the start
    fresh = _calibrated(fresh, tiny_input, 0.8, batches, site_alpha={"act1": 0.05})
    with torch.no_grad():
        assert torch.equal(model(tiny_input), fresh(tiny_input))


def test_site_alpha_config(tiny_model, tiny_input) -> None:
    model = insert_meansparse(tiny_model, tiny_input, MeanSparseConfig(alpha=0.3, site_alpha={"relu_0": 0.0}))
    alphas = {s: m.alpha for s, m in meansparse_modules(model).items()}
    assert alphas == {"act1": 0.3, "relu_0": 0.0, "act3": 0.3, "relu_1": 0.3}


def test_site_alpha_naming_unknown_site_is_refused(tiny_model, tiny_input) -> None:
    with pytest.raises(InsertionError, match=r"per-site alpha names site\(s\) \['nope'\].*act1"):
        insert_meansparse(tiny_model, tiny_input, MeanSparseConfig(site_alpha={"nope": 0.1}))
    assert not meansparse_modules(tiny_model)  # nothing inserted half-way
    model = _calibrated(tiny_model, tiny_input, 0.1, [tiny_input])
    with pytest.raises(ValueError, match="unknown MeanSparse site"):
        set_alpha(model, {"act1": 0.2, "nope": 0.1})


@pytest.mark.parametrize("alpha,error", [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                         ("0.2", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_alpha_is_refused(alpha, error) -> None:
    with pytest.raises(error, match="alpha must be"):
        MeanSparseConfig(alpha=alpha)
    with pytest.raises(error, match="alpha of site 'a'"):
        MeanSparseConfig(site_alpha={"a": alpha})


def test_set_alpha_refuses_negative(tiny_model, tiny_input) -> None:
    model = _calibrated(tiny_model, tiny_input, 0.1, [tiny_input])
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        set_alpha(model, -1.0)
    for bad in ("0.2", True, None):
        with pytest.raises(TypeError, match="alpha must be a number"):
            set_alpha(model, bad)


def test_no_activation_found_says_which_model_and_what_was_searched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    with pytest.raises(InsertionError, match=r"no activation found in Sequential: searched activation modules.*F\.relu"):
        insert_meansparse(model, torch.rand(1, 3, 8, 8))


def test_plan_that_changes_nothing_is_refused(tiny_model, tiny_input) -> None:
    with pytest.raises(InsertionError, match=r"changes nothing: 4 activation site\(s\) found"):
        insert_meansparse(tiny_model, tiny_input, MeanSparseConfig(exclude=("*",)))
    with pytest.raises(InsertionError, match="changes nothing"):
        insert_meansparse(tiny_model, tiny_input, MeanSparseConfig(include=("layer9.*",)))


def test_inserting_twice_is_refused(tiny_model, tiny_input) -> None:
    model = insert_meansparse(tiny_model, tiny_input)
    with pytest.raises(InsertionError, match="already has MeanSparse"):
        insert_meansparse(model, tiny_input)


def test_uncalibrated_model_refuses_to_run(tiny_model, tiny_input) -> None:
    model = insert_meansparse(tiny_model, tiny_input, MeanSparseConfig(alpha=0.0))
    with pytest.raises(NotCalibratedError, match="has no statistics"):
        model(tiny_input)  # even at alpha = 0: never silently run the identity
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], progress=False)


def test_include_exclude_select_sites(tiny_model, tiny_input) -> None:
    model = insert_meansparse(tiny_model, tiny_input, MeanSparseConfig(include=("act*", "relu_1"), exclude=("act3",)))
    assert list(meansparse_modules(model)) == ["act1", "relu_1"]


# ---------------------------------------------------------------------------------------------
# BPDA
# ---------------------------------------------------------------------------------------------
def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(x), y).backward()
    return x.grad.detach()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.5])
def test_bpda_gradient_equals_base_gradient_when_meansparse_is_the_only_change(alpha: float) -> None:
    """Identity-valued activations (LeakyReLU slope 1): the network is the same function but for MeanSparse."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.LeakyReLU(1.0),
        nn.Conv2d(6, 6, 3, padding=1), nn.LeakyReLU(1.0), nn.Flatten(), nn.Linear(6 * 8 * 8, 10),
    ).eval()
    x, w = torch.rand(4, 3, 8, 8), torch.randn(4, 10)  # a linear loss: its gradient needs no forward values

    def grad_of(m: nn.Module) -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        (m(xg) * w).sum().backward()
        return xg.grad.detach()

    base = grad_of(model)
    with torch.no_grad():
        base_out = model(x)
    ms_model = _calibrated(model, x, alpha, [torch.rand(8, 3, 8, 8)])
    with bpda(ms_model):
        grad = grad_of(ms_model)
    assert torch.equal(grad, base)
    if alpha > 0:  # the forward is sparsified, and without BPDA the sparsified values carry no gradient
        with torch.no_grad():
            assert not torch.equal(ms_model(x), base_out)
        masked = grad_of(ms_model)
        assert (masked - base).abs().max() > 1e-4
    assert not any(m.straight_through for m in meansparse_modules(ms_model).values())


def test_bpda_equals_straight_through_reference_on_resnet(aa_model) -> None:
    """On a real network, BPDA is the straight-through estimator x + (MeanSparse(x) - x).detach()."""
    model, info = aa_model
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.tensor([1, 2])
    base = _input_grad(model, x, y)
    ms_model = _calibrated(model, info.example_input(1), 0.0, [torch.rand(4, 3, 32, 32, generator=g)])
    with bpda(ms_model):
        assert torch.equal(_input_grad(ms_model, x, y), base)  # alpha = 0: exactly the base gradient
    set_alpha(ms_model, 0.5)
    with bpda(ms_model):
        grad = _input_grad(ms_model, x, y)
    masked = _input_grad(ms_model, x, y)
    modules = list(meansparse_modules(ms_model).values())
    try:
        for m in modules:  # reference: x + (MeanSparse(x) - x).detach()
            m.forward = (lambda mod: lambda t: t + (MeanSparse.forward(mod, t.detach()) - t).detach())(m)
        reference = _input_grad(ms_model, x, y)
    finally:
        for m in modules:
            del m.forward
    torch.testing.assert_close(grad, reference, rtol=1e-3, atol=1e-6)
    assert (grad - masked).abs().max() > 1e-4


def test_bpda_flag_cannot_leak(tiny_model, tiny_input) -> None:
    model = _calibrated(tiny_model, tiny_input, 0.3, [tiny_input])
    with pytest.raises(RuntimeError, match="boom"):
        with bpda(model):
            assert all(m.straight_through for m in meansparse_modules(model).values())
            raise RuntimeError("boom")
    assert not any(m.straight_through for m in meansparse_modules(model).values())
    assert "straight_through" not in str(model.state_dict().keys())
