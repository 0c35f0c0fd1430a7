"""Randomized models: a random forward is detected and attacked with EoT (expectation over transformation),
refused without it unless accepted, recorded in the budgets and flagged when evaluated without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from robustify import defenses
from robustify.attacks import (AttackConfig, autoattack_eot_iter, autoattack_gaps, build_attack, forward_is_random,
                               resolve_eot)
from robustify.cli import main
from robustify.core.errors import UserError
from robustify.evaluation.engine import evaluate
from robustify.evaluation.results import EvalResult, audit
from robustify.reporting.leaderboard import result_row
from tinynets import random_tiny_cnn, seeded_resnet18, tiny_cnn, write_labelled_npz

#: tiny_cnn's images and budget where single-sample APGD and EoT-APGD differ clearly (32 examples, seed 1:
#: plain 59%, EoT 16%, the deterministic model 16%; other seeds gave gaps of 31-47 points)
EPS, ITERS, N = 0.02, 10, 32


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = tiny_cnn()(x).argmax(1)  # labelled by the model: 100% clean accuracy
    return x, y


def _config(**kw) -> AttackConfig:
    return AttackConfig(**{"attacks": ("apgd-ce",), "eps": EPS, "apgd_iters": ITERS, "batch_size": N, **kw})


class _Counting(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def test_detection_tells_a_random_forward_from_a_deterministic_one(one_thread) -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    random, fixed = _Counting(random_tiny_cnn()), _Counting(tiny_cnn())
    assert forward_is_random(random, x) is True
    assert forward_is_random(fixed, x) is False
    assert random.calls == fixed.calls == 2  # two forwards of one batch
    dropout = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 32 * 32, 10))
    assert forward_is_random(dropout.train(), x) and not forward_is_random(dropout.eval(), x)


@pytest.mark.parametrize("name", defenses.defense_names())
def test_every_registered_defense_keeps_the_forward_deterministic(name, one_thread) -> None:
    base, example = seeded_resnet18()  # residual blocks named layer1.0, ...: every placement rule finds sites
    x = torch.rand(2, *example.shape[1:], generator=torch.Generator().manual_seed(2))
    model = defenses.apply_defense(base, example, defenses.get_defense(name).default_config(name)).eval()
    if defenses.with_hook(model, "calibrate"):
        defenses.calibrate(model, [x], progress=False)
    assert defenses.defenses_in(model)
    assert forward_is_random(model, x) is False, name
    assert forward_is_random(model, x, tolerance=0.0) is False, name  # not even float noise


def test_eot_apgd_breaks_what_single_sample_apgd_misses(data, one_thread) -> None:
    x, y = data
    plain = evaluate(random_tiny_cnn(), x, y, _config(eot_iter=1, accept_no_eot=True), progress=False)
    eot = evaluate(random_tiny_cnn(), x, y, _config(), progress=False)
    fixed = evaluate(tiny_cnn(), x, y, _config(), progress=False)
    assert plain.clean_acc == eot.clean_acc == fixed.clean_acc == 1.0  # the jitter barely moves the logits
    assert plain.worst_case_acc - eot.worst_case_acc >= 0.2  # measured: 59.4% vs 15.6%
    assert eot.worst_case_acc <= fixed.worst_case_acc + 0.1  # EoT recovers the deterministic model's gradient
    assert (eot.meta, plain.meta, fixed.meta) == ({"random_forward": True}, {"random_forward": True},
                                                  {"random_forward": False})
    assert (eot.config["eot_iter"], plain.config["eot_iter"], fixed.config["eot_iter"]) == (20, 1, None)
    assert "random-without-eot" in plain.flags and "random-without-eot" not in eot.flags
    assert "autoattack-checks" in plain.flags and eot.aa_checks == []  # check_randomized skipped with EoT (rand)
    rows = [result_row(r.to_dict()) for r in (eot, plain, fixed)]
    assert [r["budgets"] for r in rows] == [f"apgd-ce(iters={ITERS},restarts=1,eot=20)",
                                            f"apgd-ce(iters={ITERS},restarts=1,eot=1)", f"apgd-ce(iters={ITERS},restarts=1)"]
    assert len({r["settings_id"] for r in rows}) == 3
    assert eot.cost["apgd-ce"]["backward"] >= 20 * ITERS * N  # 20 gradients per step


def test_eot_pgd_and_a_random_model_repeat_under_the_seed(data, one_thread) -> None:
    x, y = data[0][:16], data[1][:16]
    config = _config(attacks=("pgd",), adaptive_steps=ITERS, batch_size=8, eot_iter=10)
    model = random_tiny_cnn()
    first = evaluate(model, x, y, config, progress=False)
    again = evaluate(model, x, y, config, progress=False)  # from another state of torch's generator: batches reseed
    assert first.per_example == again.per_example
    plain = evaluate(random_tiny_cnn(), x, y, _config(attacks=("pgd",), adaptive_steps=ITERS, batch_size=8,
                                                      eot_iter=1, accept_no_eot=True), progress=False)
    assert plain.worst_case_acc - first.worst_case_acc >= 0.2  # measured: 56.2% vs 12.5%
    assert result_row(first.to_dict())["budgets"] == f"pgd(steps={ITERS},lambda=0.0,eot=10)"


def test_eot_off_on_a_random_model_is_refused_unless_accepted() -> None:
    assert autoattack_eot_iter() == 20  # pyautoattack's rand version
    assert resolve_eot(_config(), True).eot_iter == 20
    assert resolve_eot(_config(eot_iter=7), True).eot_iter == 7
    assert resolve_eot(_config(eot_iter=7), False).eot_iter is None  # EoT would repeat one gradient
    with pytest.raises(UserError, match="forward is random") as err:
        resolve_eot(_config(eot_iter=1), True)
    assert "\n" not in str(err.value) and "--accept-no-eot" in str(err.value)
    assert resolve_eot(_config(eot_iter=1, accept_no_eot=True), True).eot_iter == 1
    # the consent is recorded only where it was used: it never splits equal evaluations into two settings
    assert resolve_eot(_config(accept_no_eot=True), False) == resolve_eot(_config(), False)
    assert resolve_eot(_config(accept_no_eot=True), True) == resolve_eot(_config(), True)
    with pytest.raises(UserError, match="eot_iter must be a positive integer"):
        _config(eot_iter=0)


def test_the_eot_iterations_reach_the_attacks(one_thread) -> None:
    config = AttackConfig(attacks=("apgd-ce", "apgd-t", "transfer"), eot_iter=5)
    model = tiny_cnn()
    assert build_attack("apgd-ce", model, config).aa.apgd.eot_iter == 5
    assert build_attack("apgd-t", model, config).aa.apgd_targeted.eot_iter == 5
    assert build_attack("adaptive", model, config).eot_iter == 5
    assert build_attack("transfer", model, config, source_model=tiny_cnn()).aa.apgd.eot_iter == 1  # crafted on the source
    assert build_attack("apgd-ce", model, AttackConfig(attacks=("apgd-ce",))).aa.apgd.eot_iter == 1
    assert [config.budget_for(a).get("eot") for a in ("apgd-ce", "fab-t", "square", "transfer", "bpda-apgd-t")] == \
        [5, None, None, None, 5]
    assert "eot_iter=5 (standard: no EoT)" in autoattack_gaps(config)  # no autoattack_acc: the standard suite has none


def _result(attacks: list[str], random: bool | None, eot_iter: int | None) -> EvalResult:
    meta = {} if random is None else {"random_forward": random}
    return EvalResult(meta=meta, config={"eot_iter": eot_iter}, n_examples=2, clean_acc=1.0,
                      attack_acc={a: 0.5 for a in attacks}, worst_case_acc=0.5, flags=[],
                      per_example={"clean_correct": [1, 1], **{a: [0, 1] for a in attacks}}, seconds={}, versions={})


@pytest.mark.parametrize("attacks, random, eot_iter, flagged", [
    (["apgd-ce"], True, 20, False),
    (["apgd-ce", "square"], True, 20, False),
    (["apgd-ce"], True, 1, True),   # EoT switched off (accepted)
    (["square"], True, 20, True),   # no attack that can average gradients
    (["fab-t", "transfer"], True, 20, True),
    (["apgd-ce"], False, None, False),
    (["apgd-ce"], None, None, False),  # a result written before the detection
])
def test_random_without_eot_flag(attacks, random, eot_iter, flagged) -> None:
    assert ("random-without-eot" in audit(_result(attacks, random, eot_iter))) is flagged


def test_cli_refuses_a_random_model_without_eot_and_records_eot(tmp_path: Path, capsys, one_thread) -> None:
    npz = tmp_path / "tiny.npz"
    write_labelled_npz(str(npz), n_train=16, n_test=8)
    argv = ["evaluate", "tinynets:random_tiny_cnn", "--data", str(npz), "--n-examples", "8", "--attacks", "apgd-ce",
            "--eps", "2/255", "--apgd-iters", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "off"), "--eot-iter", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "forward is random" in err
    assert main([*argv, "--out", str(tmp_path / "accepted"), "--eot-iter", "1", "--accept-no-eot"]) == 0
    assert main([*argv, "--out", str(tmp_path / "eot"), "--eot-iter", "3"]) == 0
    accepted, eot = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("accepted", "eot"))
    assert "random-without-eot" in accepted["flags"] and "random-without-eot" not in eot["flags"]
    assert (accepted["config"]["eot_iter"], eot["config"]["eot_iter"]) == (1, 3)
    assert eot["meta"]["random_forward"] is True


def test_a_random_defense_is_paired_with_its_deterministic_base() -> None:
    from robustify.core.significance import find_base

    def result(defense: str, eot_iter: int | None, random: bool) -> dict:
        return {"meta": {"model": "m", "defense": defense, "data": "d.npz", "split": "test", "dataset": "cifar10",
                         "random_forward": random},
                "config": {"attacks": ["apgd-ce"], "eps": 8 / 255, "eot_iter": eot_iter, "accept_no_eot": False},
                "n_examples": 2, "per_example": {"clean_correct": [1, 1], "apgd-ce": [0, 1]}}

    base = result("none", None, False)
    assert find_base(result("noise", 20, True), [base]) is not None  # the budgets differ only by the model's EoT
    assert find_base(result("noise", 20, True), [{**base, "config": {**base["config"], "eps": 4 / 255}}]) is None


class _GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) noise to the input at every forward: random predictions, not only random gradients."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x)


def test_the_audit_sees_the_clean_predictions_the_evaluation_saw(data, one_thread) -> None:
    from robustify.evaluation.audit import _check_same_model

    x, y = data
    model = nn.Sequential(_GaussianNoise(0.5), tiny_cnn()).eval()
    config = _config(apgd_iters=2, eot_iter=2, batch_size=8)
    result = evaluate(model, x, y, config, progress=False)
    assert result.meta["random_forward"] and 0.2 < result.clean_acc < 0.9  # measured: 78.1%, one forward per image
    torch.rand(3)  # another state of torch's generator: the audit reseeds each clean batch as the evaluation did
    clean = _check_same_model(model, x, y, result, AttackConfig.from_dict(result.config), "cpu")
    assert [int(c) for c in clean] == result.per_example["clean_correct"]
