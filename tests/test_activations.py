"""Activation swaps: formulas, swapping (functional calls included), saving and loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustify.defenses.activations.swaps import (
    ActivationConfig,
    PSSiLU,
    PSiLU,
    PSoftplus,
    load_activations,
    parametric_modules,
    save_activations,
    swap_activations,
)
from robustify.defenses import applied_sites
from robustify.defenses.meansparse.insert import InsertionError
from robustify.defenses.sites import is_activation, plan_sites
from robustify.defenses.meansparse.state import StateMismatchError
from robustify.jobs.train import defense_parameters

from tinynets import seeded_resnet18

pytestmark = pytest.mark.usefixtures("one_thread")


resnet18 = seeded_resnet18


X = torch.linspace(-6, 6, 241)


def test_parametric_formulas() -> None:
    torch.testing.assert_close(PSiLU(1.0)(X), F.silu(X))
    torch.testing.assert_close(PSiLU(-2.0)(X), X * torch.sigmoid(2 * X))  # |alpha|
    torch.testing.assert_close(PSoftplus(1.0)(X), F.softplus(X))
    torch.testing.assert_close(PSoftplus(3.0)(X), torch.log1p(torch.exp(3 * X)) / 3)
    big = torch.tensor([-200.0, 200.0])
    assert torch.isfinite(PSoftplus(5.0)(big)).all()  # stable form
    torch.testing.assert_close(PSSiLU(2.0, 0.0)(X), PSiLU(2.0)(X))
    torch.testing.assert_close(PSSiLU(2.0, -0.3)(X), X * (torch.sigmoid(2 * X) - 0.3) / 0.7)
    # positive outputs for negative inputs when |beta| > sigmoid(|alpha| x)
    assert float(PSSiLU(1.0, 0.5)(torch.tensor([-3.0])).detach()) > 0


def test_pssilu_beta_clamp_and_init_gradient() -> None:
    out = PSSiLU(1.0, 5.0)(X)  # |beta| clamped to 1 - 1e-4: finite, not singular
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, X * (torch.sigmoid(X) - (1 - 1e-4)) / 1e-4, rtol=1e-3, atol=1e-2)
    act = PSSiLU()
    assert float(act.beta.detach()) == pytest.approx(1e-8) and float(act.alpha.detach()) == 1.0
    act(X).sum().backward()
    assert float(act.beta.grad.abs()) > 0  # at exactly 0, |beta| would get no gradient
    zero = PSSiLU(1.0, 0.0)
    zero(X).sum().backward()
    assert float(zero.beta.grad) == 0.0


def test_new_activations_are_sites() -> None:
    assert all(is_activation(cls()) for cls in (PSiLU, PSoftplus, PSSiLU))


@pytest.mark.parametrize(
    "name, expected",
    [("silu", nn.SiLU), ("softplus", nn.Softplus), ("gelu", nn.GELU), ("elu", nn.ELU),
     ("psilu", PSiLU), ("psoftplus", PSoftplus), ("pssilu", PSSiLU)],
)
def test_swap_replaces_every_functional_relu(name: str, expected: type) -> None:
    model, example = resnet18()
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    out = swap_activations(model, example, ActivationConfig(name=name)).eval()
    sites = plan_sites(out, example)
    assert len(sites) == 17
    assert all(type(out.get_submodule(s.name)) is expected for s in sites)
    if name == "gelu":
        assert out.get_submodule(sites[0].name).approximate == "tanh"  # SAT's formula
    with torch.no_grad():
        assert not torch.allclose(out(x), before)


def test_shared_and_per_site_parameters() -> None:
    model, example = resnet18()
    shared = swap_activations(model, example, ActivationConfig(name="pssilu"))
    params = defense_parameters(shared)
    assert len(params) == 2  # one alpha, one beta for the whole network (PAF)
    modules = parametric_modules(shared)
    assert len(modules) == 17 and len({id(m) for m in modules.values()}) == 17
    assert all(m.alpha is params[0] for m in modules.values())
    model, example = resnet18()
    separate = swap_activations(model, example, ActivationConfig(name="psilu", shared=False))
    assert len(defense_parameters(separate)) == 17


def test_selection_and_errors() -> None:
    model, example = resnet18()
    out = swap_activations(model, example, ActivationConfig(name="silu", include=("layer4*",)))
    assert sorted(s.name for s in applied_sites(out)) == [
        "layer4.0.relu_0", "layer4.0.relu_1", "layer4.1.relu_0", "layer4.1.relu_1"]
    assert type(out.get_submodule("layer1.0.relu_0")) is nn.ReLU
    with pytest.raises(InsertionError, match="already swapped"):
        swap_activations(out, example, ActivationConfig(name="gelu"))
    with pytest.raises(InsertionError, match="changes nothing.*activations found: \\['ReLU'\\]"):
        swap_activations(resnet18()[0], example, ActivationConfig(name="silu", replace=("GELU",)))
    with pytest.raises(ValueError, match="unknown activation"):
        ActivationConfig(name="swishy")
    with pytest.raises(ValueError, match="beta_init"):
        ActivationConfig(beta_init=1.0)


@pytest.mark.parametrize("config", [ActivationConfig(name="pssilu"), ActivationConfig(name="psoftplus", shared=False),
                                    ActivationConfig(name="elu", include=("layer2*",))])
def test_save_load_round_trip(tmp_path, config: ActivationConfig) -> None:
    model, example = resnet18()
    model = swap_activations(model, example, config).eval()
    with torch.no_grad():
        for i, p in enumerate(defense_parameters(model)):
            p.fill_(0.3 + 0.1 * i)
    path = tmp_path / "act.safetensors"
    save_activations(model, path, model_info={"spec": "aa-resnet18"})
    fresh, _ = resnet18()
    loaded = load_activations(fresh, path, example).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    if config.parametric and config.shared:
        assert len(defense_parameters(loaded)) == 2
        assert math.isclose(float(defense_parameters(loaded)[1].detach()), 0.4, rel_tol=1e-6)


def test_load_onto_mismatched_model_fails(tmp_path) -> None:
    model, example = resnet18()
    model = swap_activations(model, example, ActivationConfig(name="pssilu"))
    path = tmp_path / "act.safetensors"
    save_activations(model, path)
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 10))
    with pytest.raises(StateMismatchError, match="no activation site 'relu_0'"):
        load_activations(other, path, example)
