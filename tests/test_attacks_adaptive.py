"""The attacks for thresholding defenses break a toy model on which plain APGD's gradient is zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustify.attacks import AttackConfig, build_attack, expand_attacks
from robustify.defenses.meansparse.module import MeanSparse, meansparse_modules, soft_bpda

EPS = 8 / 255
MEAN, HALF_WIDTH = 0.5, 0.05


class PooledBand(nn.Module):
    """Pixel mean -> MeanSparse band around 0.5 -> linear head (10 classes).

    Inside the band the feature is the constant 0.5, so the prediction is class 0 and the
    input gradient is exactly zero; pushing the pixel mean above 0.55 (reachable within
    eps=8/255 from a mean of 0.53) makes class 1 win.
    """

    def __init__(self) -> None:
        super().__init__()
        self.band = MeanSparse(1, alpha=1.0, channel_dim=1, ndim=2, site="band")
        self.band.set_statistics(torch.tensor([MEAN]), torch.tensor([HALF_WIDTH ** 2]))
        self.head = nn.Linear(1, 10)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([1.0, 0.0] + [-5.0] * 8))
            self.head.weight[1, 0] = 2.0 / HALF_WIDTH  # class 1 logit: 2 (z - 0.5) / 0.05
            self.head.bias[1] = -2.0 * MEAN / HALF_WIDTH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.band(x.mean(dim=(1, 2, 3)).unsqueeze(1)))


@pytest.fixture
def toy():
    g = torch.Generator().manual_seed(0)
    x = (0.53 + 0.2 * (torch.rand(6, 3, 8, 8, generator=g) - 0.5)).clamp(0, 1)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True) + 0.53  # pixel mean exactly 0.53: inside the band
    y = torch.zeros(6, dtype=torch.long)
    model = PooledBand().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, x, y


def _broken(model, attack, x, y) -> torch.Tensor:
    x_adv = attack.perturb(x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def test_plain_apgd_sees_a_zero_gradient_and_fails(toy):
    model, x, y = toy
    assert (model(x).argmax(1) == y).all()
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(nn.functional.cross_entropy(model(xg), y), xg)
    assert grad.abs().max() == 0
    config = AttackConfig(attacks=("apgd-ce", "apgd-t"), eps=EPS, apgd_iters=10, apgd_t_iters=10)
    for name in ("apgd-ce", "apgd-t"):
        assert not _broken(model, build_attack(name, model, config), x, y).any()


@pytest.mark.parametrize("name", ["bpda-apgd-t", "soft-bpda", "bpda-fab-t"])
def test_threshold_attacks_break_the_toy(toy, name):
    model, x, y = toy
    config = AttackConfig(attacks=(name,), eps=EPS, apgd_iters=10, apgd_t_iters=10, fab_iters=10)
    assert _broken(model, build_attack(name, model, config), x, y).all()
    assert all(m.soft_temperature is None and not m.straight_through for m in meansparse_modules(model).values())


def test_soft_backward_is_the_surrogate_derivative(toy):
    model, x, _ = toy
    z = torch.tensor([[0.47], [0.52], [0.6], [0.5]], requires_grad=True)
    with soft_bpda(model, 0.3):
        out = model.band(z)
    assert torch.equal(out.detach(), torch.tensor([[0.5], [0.5], [0.6], [0.5]]))  # forward unchanged
    out.sum().backward()
    d, tau = (z.detach() - MEAN).abs(), 0.3 * HALF_WIDTH
    s = torch.sigmoid((d - HALF_WIDTH) / tau)
    assert torch.allclose(z.grad, s + d * s * (1 - s) / tau, atol=1e-6)
    assert model.band.soft_temperature is None
    with pytest.raises(ValueError, match="temperature"):
        soft_bpda(model, 0.0)


def test_bpda_autoattack_expands_to_the_standard_suite_with_bpda():
    suite = ("bpda-apgd-ce", "bpda-apgd-t", "bpda-fab-t", "square")
    assert set(expand_attacks("bpda-autoattack")) == set(suite)
    assert expand_attacks("bpda-autoattack") == expand_attacks(suite)  # the one run order (standard first)
    budget = AttackConfig(attacks=("soft-bpda",)).budget_for("soft-bpda")
    assert budget["stages"] == 3 and budget["temperatures"] == "1/0.3/0.1"


def test_pass_counts_equal_hand_counted_ones_for_3_iteration_apgd():
    from robustify.evaluation.cost import PassCounter
    from robustify.evaluation.engine import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)  # every example correct: APGD attacks all 5
    config = AttackConfig(attacks=("apgd-ce",), eps=1 / 255, apgd_iters=3, batch_size=8)
    # pyautoattack's APGD: 1 forward to find the correct examples, 1 forward+backward at the
    # random start, then 1 forward+backward per iteration; the engine adds 1 forward to score.
    with PassCounter(model) as passes:
        build_attack("apgd-ce", model, config).perturb(x, y)
    assert (passes.forward, passes.backward) == (5 * (1 + 1 + 3), 5 * (1 + 3))
    result = evaluate(model, x, y, config, progress=False)
    assert result.cost["clean"]["forward"] == 5 and result.cost["clean"]["backward"] == 0
    cost = result.cost["apgd-ce"]
    assert (cost["forward"], cost["backward"], cost["examples"]) == (5 * 6, 5 * 4, 5)
    assert cost["forward_per_example"] == 6 and cost["backward_per_example"] == 4 and cost["seconds"] > 0
