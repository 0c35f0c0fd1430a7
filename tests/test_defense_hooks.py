"""Issue 18 item 2: the generic stages reach every defense through its hooks. The disabled view (the transfer
attack's source) is the base model for every built-in defense, without a copy; the attacks that need a hook
apply exactly where a defense offers it; training reads parameters and regularisers from the hooks."""

from __future__ import annotations

import pytest
import torch

import robustify as rb
from robustify import defenses
from robustify.attacks import not_applicable
from robustify.defenses import meansparse as ms
from robustify.defenses.activations import ActivationConfig
from robustify.defenses.sparta import SpartaConfig
from robustify.jobs.train import TrainConfig, _penalty
from tinynets import tiny_cnn

EXAMPLE = torch.rand(1, 3, 32, 32)


def _defended(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    base = tiny_cnn()
    reference = tiny_cnn()
    reference.load_state_dict(base.state_dict())
    if name == "meansparse":
        model = rb.apply_defense(base, EXAMPLE, ms.MeanSparseConfig(alpha=0.5))
        rb.calibrate(model, [torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))], progress=False)
    elif name == "sparta":
        model = rb.apply_defense(base, EXAMPLE, SpartaConfig(preset="all", init="paper"))
    else:
        model = rb.apply_defense(base, EXAMPLE, ActivationConfig(name=name, alpha_init=0.5))
    return model.eval(), reference.eval()


@pytest.mark.parametrize("name", ["meansparse", "sparta", "pssilu", "silu"])
def test_the_disabled_view_is_the_base_model_and_is_undone(name: str) -> None:
    model, reference = _defended(name)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        defended = model(x)
        assert not torch.allclose(defended, reference(x))  # the defense changes the outputs
        with rb.defenses_disabled(model):
            assert torch.allclose(model(x), reference(x), atol=1e-6)
        assert torch.equal(model(x), defended)  # switched back on when the block ends
    assert not_applicable("transfer", model, defended=True) is None


@pytest.mark.parametrize("name, applies", [("meansparse", True), ("sparta", False), ("pssilu", False)])
def test_bpda_applies_where_a_defense_offers_a_straight_through_backward(name: str, applies: bool) -> None:
    model, reference = _defended(name)
    assert (not_applicable("bpda-apgd-ce", model, defended=True) is None) == applies
    assert (not_applicable("soft-bpda", model, defended=True) is None) == applies
    if not applies:
        assert not_applicable("bpda-apgd-ce", model, defended=True) == "the defense is differentiable"
    assert not_applicable("bpda-apgd-ce", reference, defended=False) == (
        "no defense with a straight-through backward (equals standard APGD)")
    assert not_applicable("transfer", reference, defended=False) == "the source would be the model itself"


def test_training_reads_the_regularizer_and_parameters_from_the_hooks() -> None:
    model, _ = _defended("pssilu")
    betas = [m.beta for m in defenses.get_defense("pssilu").modules(model).values()]
    assert defenses.defense_parameters(model)  # the swapped activations' alpha and beta
    penalty = _penalty(model, TrainConfig(beta_l1=2.0))
    expected = sum(float(b.detach().abs().sum()) for b in {id(b): b for b in betas}.values())
    assert float(penalty.detach()) == pytest.approx(2.0 * expected)
    plain, _ = _defended("meansparse")
    assert _penalty(plain, TrainConfig(beta_l1=2.0)) == 0.0 and defenses.defense_parameters(plain) == []
