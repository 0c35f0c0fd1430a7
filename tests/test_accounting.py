"""What a row counts: every forward pass (AutoAttack's own checks included), intervals from exact counts,
and one default attack list for Python and the CLI."""

from __future__ import annotations

import torch
from scipy.stats import beta
from torch import nn

from robustify.attacks import AttackConfig
from robustify.cli import build_parser
from robustify.cli import evaluate as evaluate_cli
from robustify.evaluation.engine import evaluate
from robustify.evaluation.results import EvalResult
from robustify.reporting.leaderboard import result_row


def test_passes_count_every_forward_autoattack_checks_included() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)  # every example correct: the checks run on all 5
    rows: list[int] = []
    handle = model.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        result = evaluate(model, x, y, AttackConfig(attacks=("apgd-ce",), eps=1 / 255, apgd_iters=3, batch_size=8),
                          progress=False)
    finally:
        handle.remove()
    # the logit width (1 forward of the first batch), the randomness detection (2 forwards of the same
    # examples) and pyautoattack's checks on the first correct batch: check_randomized (5 forwards),
    # check_range_output (1), check_dynamic (1); no backward
    assert result.cost["checks"]["forward"] == 5 + 2 * 5 + 7 * 5 and result.cost["checks"]["backward"] == 0
    assert sum(c["forward"] for c in result.cost.values()) == sum(rows)
    row = result_row(result.to_dict())
    assert row["passes"] == sum(rows) + sum(c["backward"] for c in result.cost.values())
    assert "checks" not in row["cost"] and row["cost"].startswith("apgd-ce=")


def _exact(k: int, n: int) -> str:
    """The Clopper-Pearson interval from beta quantiles (statsmodels' ``proportion_confint(method="beta")``)."""
    lo = beta.ppf(0.025, k, n - k + 1) if k else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return f"[{100 * lo:.2f}, {100 * hi:.2f}]"


def test_intervals_come_from_exact_counts_at_50000_examples() -> None:
    n = 50_000
    for k in (36_517, 36_518, 36_503, 12_345):
        per = [1] * k + [0] * (n - k)
        result = EvalResult(meta={}, config=AttackConfig(attacks=("apgd-ce",)).to_dict(), n_examples=n,
                            clean_acc=1.0, attack_acc={"apgd-ce": k / n}, worst_case_acc=k / n, flags=[],
                            per_example={"clean_correct": [1] * n, "apgd-ce": [1 - v for v in per]}, seconds={},
                            versions={})
        row = result_row(result.to_dict())
        assert row["worst_case_ci95"] == row["apgd-ce_ci95"] == _exact(k, n), k
        assert row["clean_ci95"] == _exact(n, n)


def test_the_python_default_attack_list_is_the_clis() -> None:
    args = build_parser().parse_args(["evaluate", "tinynets:tiny_cnn", "--out", "o"])
    assert evaluate_cli.attack_config(args) == AttackConfig()
    assert "bpda-apgd-t" in AttackConfig().attacks
