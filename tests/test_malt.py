"""MALT targeting for APGD-T (Melamed et al., NeurIPS 2024): targets ranked by a first-order estimate of the
distance to each class's decision boundary, |z_y - z_c| / ||grad (z_y - z_c)||_q, instead of by logit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustify.attacks import AttackConfig, autoattack_gaps, build_attack, make_autoattack
from robustify.attacks.malt import malt_targets, targeted_apgd, top_logit_targets
from robustify.cli import build_parser
from robustify.cli import evaluate as evaluate_cli
from robustify.core.errors import UserError
from robustify.reporting.leaderboard import settings_id

X0 = 0.5


def _linear(weights: list[list[float]], logits_at_x0: list[float]) -> nn.Module:
    """A linear model on 1x2x2 images whose logits at the grey image (all pixels X0) are ``logits_at_x0``."""
    w = torch.tensor(weights)
    layer = nn.Linear(4, len(weights))
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.tensor(logits_at_x0) - w.sum(1) * X0)
    return nn.Sequential(nn.Flatten(), layer).eval()


# class 0 is the true class. Logit order of the others: 1, 2, 3, 4. Linf boundary distances (margin over
# the L1 norm of the weight difference): class 1: 1 / 0.4 = 2.5; class 2: 2 / 2 = 1; class 3: 3 / 40 =
# 0.075; class 4: 5 / 4 = 1.25. MALT's order: 3, 2, 4, 1.
WEIGHTS = [[0, 0, 0, 0], [0.1, 0.1, -0.1, -0.1], [0.5, -0.5, 0.5, -0.5], [-10, -10, 10, 10], [1, 1, 1, 1]]
LOGITS = [3.0, 2.0, 1.0, 0.0, -2.0]


def _grey(n: int = 1) -> torch.Tensor:
    return torch.full((n, 1, 2, 2), X0)


def test_malt_ranks_by_estimated_boundary_distance_not_by_logit() -> None:
    model, x, y = _linear(WEIGHTS, LOGITS), _grey(), torch.tensor([0])
    assert top_logit_targets(model, x, y, 4).tolist() == [[1, 2, 3, 4]]
    assert malt_targets(model, x, y, "Linf", 4).tolist() == [[3, 2, 4, 1]]
    assert malt_targets(model, x, y, "Linf", 2).tolist() == [[3, 2]]
    assert malt_targets(model, x, y, "Linf", 9).tolist() == [[3, 2, 4, 1]]  # capped at classes - 1


def test_malt_uses_the_dual_norm_of_the_threat_model() -> None:
    # equal margins; class 1's weight difference (1,1,1,1) has L1 norm 4 and L2 norm 2, class 2's (3,0,0,0)
    # L1 norm 3 and L2 norm 3: under Linf (dual L1) class 1 is nearer, under L2 class 2, under L1 (dual Linf) 2
    model = _linear([[0, 0, 0, 0], [1, 1, 1, 1], [3, 0, 0, 0], [0, 0, 0, 0]], [1.0, 0.0, 0.0, -1.0])
    x, y = _grey(), torch.tensor([0])
    assert malt_targets(model, x, y, "Linf", 2).tolist() == [[1, 2]]
    assert malt_targets(model, x, y, "L2", 2).tolist() == [[2, 1]]
    assert malt_targets(model, x, y, "L1", 2).tolist() == [[2, 1]]
    # a class whose margin has no gradient is never reached by the linearisation: ranked last
    assert malt_targets(model, x, y, "Linf", 3).tolist()[0][-1] == 3


@pytest.mark.parametrize("norm, eps", [("Linf", 16 / 255), ("L2", 0.5), ("L1", 3.0)])
def test_targeted_apgd_with_top_logit_targets_is_pyautoattacks_apgd_t(norm: str, eps: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).eval()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    # L1: AutoAttack's L1 settings (its schedule of decreasing radii) over 10 iterations
    config = AttackConfig(attacks=("apgd-t",), norm=norm, eps=eps, apgd_t_iters=10, apgd_t_targets=3)
    reference = make_autoattack(model, config, "cpu").apgd_targeted.perturb(x, y)
    apgd = make_autoattack(model, config, "cpu").apgd_targeted
    ours = targeted_apgd(apgd, x, y, top_logit_targets(model, x, y, 3))
    assert torch.equal(ours, reference)
    assert (ours != x).any()  # some example was broken: the comparison is not of two clean batches


@pytest.mark.parametrize("targeting, broken", [("top-logit", False), ("malt", True)])
def test_apgd_t_with_one_target_breaks_only_with_malts_target(targeting: str, broken: bool) -> None:
    # eps 0.1 under Linf reaches class 3's boundary (0.075) and no other (class 2's is 1 away)
    model, x, y = _linear(WEIGHTS, LOGITS), _grey(), torch.tensor([0])
    config = AttackConfig(attacks=("apgd-t",), eps=0.1, apgd_t_iters=20, apgd_t_targets=1, apgd_t_targeting=targeting)
    x_adv = build_attack("apgd-t", model, config).perturb(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        pred = model(x_adv).argmax(1).item()
    assert (pred == 3) is broken and (pred == 0) is not broken


def test_the_targeting_is_a_setting_recorded_in_budgets_and_row_identity() -> None:
    args = build_parser().parse_args(["evaluate", "tinynets:tiny_cnn", "--out", "o", "--targets", "malt"])
    malt = evaluate_cli.attack_config(args)
    assert malt.apgd_t_targeting == "malt" and AttackConfig().apgd_t_targeting == "top-logit"
    for attack in ("apgd-t", "bpda-apgd-t"):
        assert malt.budget_for(attack)["targeting"] == "malt"
        assert "targeting" not in AttackConfig().budget_for(attack)  # AutoAttack's: as recorded before
    assert any("malt" in gap for gap in autoattack_gaps(AttackConfig(attacks=("autoattack",), apgd_t_targeting="malt")))
    assert autoattack_gaps(AttackConfig(attacks=("autoattack",))) == []
    rows = [{"meta": {}, "config": AttackConfig(apgd_t_targeting=t).to_dict(), "n_examples": 10}
            for t in ("top-logit", "malt")]
    assert settings_id(rows[0]) != settings_id(rows[1])
    with pytest.raises(UserError, match="top-logit"):
        AttackConfig(apgd_t_targeting="logit")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "tinynets:tiny_cnn", "--out", "o", "--targets", "nearest"])
