"""Issue 11: every number means what its column says (default eps, autoattack_acc, attack order, L1
settings, the adaptive attack under compile, eps text, newest duplicate, evaluate's result.csv)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch

from robustify.defenses import meansparse as ms
import robustify as rb
from robustify.attacks import AttackConfig, build_attack, make_autoattack
from robustify.cli import build_parser, main
from robustify.evaluation.engine import EvalResult, audit, evaluate
from robustify.evaluation.fast import for_evaluation
from robustify.reporting.leaderboard import build_table, collect, model_info
from tinynets import tiny_cnn

EPS = 2 / 255


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def defended(images):
    """Tiny CNN with calibrated MeanSparse; labels = its own clean predictions."""
    model = ms.insert_meansparse(tiny_cnn(), images[:2], ms.MeanSparseConfig(alpha=0.3))
    rb.calibrate(model, [images], progress=False)
    with torch.no_grad():
        y = model(images).argmax(1)
    return model, y


def _parse(*argv: str):  # type: ignore[no-untyped-def]
    from robustify.cli.evaluate import job_from_args

    return job_from_args(build_parser().parse_args(["evaluate", "tinynets:tiny_cnn", "--out", "unused", *argv]))


def _fake(per_example: dict, *, norm: str = "Linf", eps: float = 8 / 255, **budgets) -> dict:
    """A result as ``evaluate`` writes it, from per-example break flags (every example clean-correct)."""
    n = len(next(iter(per_example.values())))
    correct = [1] * n
    config = AttackConfig(attacks=tuple(per_example), norm=norm, eps=eps, **budgets)
    robust = [not any(v[i] == 1 for v in per_example.values()) for i in range(n)]
    result = EvalResult(meta={"model": "m", "defense": "none", "dataset": "cifar10"}, config=config.to_dict(),
                        n_examples=n, clean_acc=1.0, attack_acc={a: 0.5 for a in per_example},
                        worst_case_acc=sum(robust) / n, flags=[],
                        per_example={"clean_correct": correct, **{a: per_example[a] for a in config.attacks}},
                        seconds={}, versions={})
    result.flags = audit(result)
    return result.to_dict()


# ------------------------------------------------------------------------------------------
# 1. default eps
# ------------------------------------------------------------------------------------------
def test_default_eps_follows_threat_model_and_dataset():
    assert AttackConfig().eps == pytest.approx(8 / 255)
    assert AttackConfig(norm="L2").eps == pytest.approx(0.5)
    assert AttackConfig(norm="L1", attacks=("apgd-ce",)).eps == pytest.approx(12.0)
    assert AttackConfig(dataset="cifar100", norm="L2").eps == pytest.approx(0.5)
    assert AttackConfig(dataset="imagenet").eps == pytest.approx(4 / 255)
    assert AttackConfig(dataset="imagenet", eps="8/255").eps == pytest.approx(8 / 255)  # given: kept
    with pytest.raises(ValueError, match="no default eps"):
        AttackConfig(dataset="imagenet", norm="L2")


def test_cli_and_job_default_eps_follow_the_threat_model():
    assert _parse("--threat-model", "L2").attack.eps == pytest.approx(0.5)
    assert _parse("--threat-model", "L2").attack.norm == "L2"
    assert _parse("--dataset", "imagenet").attack.eps == pytest.approx(4 / 255)
    assert _parse("--threat-model", "L2", "--eps", "0.25").attack.eps == pytest.approx(0.25)
    job = rb.EvaluationJob(model="tinynets:tiny_cnn", threat_model="L2")
    assert (job.attack.norm, job.attack.eps) == ("L2", pytest.approx(0.5))
    assert rb.EvaluationJob(model="x", dataset="imagenet").attack.eps == pytest.approx(4 / 255)
    with pytest.raises(ValueError, match="dataset"):
        rb.EvaluationJob(model="x", dataset="imagenet", attack=AttackConfig())


def test_evaluate_prints_and_stores_the_eps_it_used(small_npz, tmp_path, capsys):
    out = tmp_path / "l2"
    assert main(["evaluate", "tinynets:tiny_cnn", "--data", str(small_npz), "--threat-model", "L2",
                 "--attacks", "apgd-ce", "--apgd-iters", "2", "--n-examples", "8", "--no-progress",
                 "--out", str(out)]) == 0
    config = json.loads((out / "result.json").read_text())["config"]
    assert (config["norm"], config["eps"]) == ("L2", 0.5)
    assert "L2 eps 0.5" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# 2. autoattack_acc only for AutoAttack
# ------------------------------------------------------------------------------------------
SUITE = {"apgd-ce": [1, 0, 0, 0, 0, 0], "apgd-t": [None, 1, 0, 0, 0, 0], "fab-t": [None, None, 0, 0, 0, 0],
         "square": [None, None, 1, 0, 0, 0]}


def test_autoattack_acc_only_for_the_standard_suite_at_standard_budgets(tmp_path):
    full = build_table([_fake(SUITE)]).iloc[0]
    assert full["autoattack_acc"] == pytest.approx(50.0)
    assert model_info(full)["autoattack_acc"] == "50.00"

    short = build_table([_fake({"apgd-ce": [1, 0, 0, 0], "apgd-dlr": [None, 1, 0, 0], "square": [None, None, 0, 0]},
                               apgd_iters=20, square_queries=300)]).iloc[0]
    assert pd.isna(short["autoattack_acc"])
    info = model_info(short)
    assert "autoattack_acc" not in info
    assert info["external"] == "50.00"
    assert "not AutoAttack" in info["footnote"] and "apgd-t" in info["footnote"] and "iters=20" in info["footnote"]

    cheap = model_info(build_table([_fake(SUITE, square_queries=1000)]).iloc[0])  # the whole suite, less budget
    assert "autoattack_acc" not in cheap and "queries=1000" in cheap["footnote"]


def test_autoattack_acc_needs_every_example_the_suite_would_see():
    """Sequential mode where another attack took examples from the suite: not AutoAttack's number."""
    per = {**SUITE, "apgd-t": [None, None, 0, 0, 0, 0]}  # apgd-t did not see example 1, left robust by apgd-ce
    assert pd.isna(build_table([_fake(per)]).iloc[0]["autoattack_acc"])


# ------------------------------------------------------------------------------------------
# 3. attack order
# ------------------------------------------------------------------------------------------
def test_results_do_not_depend_on_the_order_attacks_are_listed(defended, images):
    model, y = defended
    settings = dict(eps=EPS, apgd_iters=5, batch_size=12)
    given = evaluate(model, images, y, AttackConfig(attacks=("bpda-apgd-ce", "apgd-ce"), **settings), progress=False)
    canonical = evaluate(model, images, y, AttackConfig(attacks=("apgd-ce", "bpda-apgd-ce"), **settings),
                         progress=False)
    assert given.config["attacks"] == ["apgd-ce", "bpda-apgd-ce"]
    assert given.per_example == canonical.per_example
    assert given.attack_acc == canonical.attack_acc and given.flags == canonical.flags
    assert 0 < canonical.attack_acc["apgd-ce"] < 1  # not vacuous
    assert AttackConfig(attacks=("transfer", "square", "autoattack", "apgd-dlr")).attacks == (
        "apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "transfer")


# ------------------------------------------------------------------------------------------
# 4. L1 settings
# ------------------------------------------------------------------------------------------
def test_l1_uses_autoattack_l1_settings():
    l1 = AttackConfig(norm="L1", attacks=("autoattack",))  # Square supports L1 as in AutoAttack's L1 suite
    assert (l1.apgd_restarts, l1.apgd_t_targets) == (5, 5)
    aa = make_autoattack(torch.nn.Identity(), l1, "cpu")
    assert (aa.apgd.n_restarts, aa.apgd_targeted.n_target_classes, aa.apgd.use_largereps) == (5, 5, True)
    linf = AttackConfig()
    assert (linf.apgd_restarts, linf.apgd_t_targets) == (1, 9)
    assert (_parse("--norm", "L1", "--attacks", "apgd-ce").attack.apgd_restarts) == 5
    assert AttackConfig(norm="L1", attacks=("apgd-ce",), apgd_restarts=2).apgd_restarts == 2  # given: kept


# ------------------------------------------------------------------------------------------
# 5. the adaptive attack under --compile
# ------------------------------------------------------------------------------------------
def test_adaptive_attack_stays_adaptive_under_compile(images, one_thread):
    x = images[:4]
    model = ms.insert_meansparse(tiny_cnn(), x[:2], ms.MeanSparseConfig(alpha=1.0))
    rb.calibrate(model, [images], progress=False)
    with torch.no_grad():
        y = model(x).argmax(1)
    config = AttackConfig(attacks=("adaptive", "pgd"), eps=8 / 255, adaptive_steps=3, adaptive_lambda=50.0)
    eager = for_evaluation(model)
    adaptive = build_attack("adaptive", eager, config).perturb(x, y)
    plain = build_attack("pgd", eager, config).perturb(x, y)
    assert not torch.allclose(adaptive, plain)  # the penalty changes the attack: the test is not vacuous
    compiled = for_evaluation(model, compile=True)
    torch.testing.assert_close(build_attack("adaptive", compiled, config).perturb(x, y), adaptive)


# ------------------------------------------------------------------------------------------
# 9. eps text, newest duplicate
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm, eps, text", [("Linf", 8 / 255, "8/255"), ("Linf", 0.03, "0.03"),
                                              ("L2", 1.0, "1.0"), ("L2", 0.5, "0.5"), ("L1", 12.0, "12.0")])
def test_eps_text_is_norm_aware(norm, eps, text):
    attack = "apgd-ce"
    assert build_table([_fake({attack: [1, 0]}, norm=norm, eps=eps)]).iloc[0]["eps"] == text


def _write(path, result: dict) -> None:
    path.mkdir(parents=True)
    (path / "result.json").write_text(json.dumps(result))


def test_duplicate_rows_keep_the_newest_result_by_its_timestamp(tmp_path):
    older, newer = _fake({"apgd-ce": [1, 0]}), _fake({"apgd-ce": [1, 0]})
    older["finished"], newer["finished"] = "2024-01-01T00:00:00+00:00", "2024-06-01T00:00:00+00:00"
    newer["clean_acc"] = 0.5
    _write(tmp_path / "a", newer)
    _write(tmp_path / "b", older)
    os.utime(tmp_path / "a" / "result.json", (1, 1))  # the file is older: the recorded timestamp decides
    df = build_table(collect(tmp_path))
    assert len(df) == 1 and df.iloc[0]["result"].endswith(os.path.join("a", "result.json"))
    assert df.iloc[0]["clean_acc"] == 50.0


def test_duplicate_rows_without_timestamp_keep_the_newest_file(tmp_path):
    result = _fake({"apgd-ce": [1, 0]})
    _write(tmp_path / "a", result)
    _write(tmp_path / "b", result)
    os.utime(tmp_path / "b" / "result.json", (1, 1))
    assert build_table(collect(tmp_path)).iloc[0]["result"].endswith(os.path.join("a", "result.json"))


def test_evaluate_records_when_it_finished(defended, images, tmp_path):
    model, y = defended
    evaluate(model, images[:4], y[:4], AttackConfig(attacks=("apgd-ce",), eps=EPS, apgd_iters=1), out_dir=tmp_path,
             progress=False)
    stamp = json.loads((tmp_path / "result.json").read_text())["finished"]
    assert pd.Timestamp(stamp).tzinfo is not None


# ------------------------------------------------------------------------------------------
# 10. evaluate --out DIR leaves DIR/result.csv
# ------------------------------------------------------------------------------------------
def test_evaluate_out_leaves_a_one_row_result_csv(small_npz, tmp_path):
    out = tmp_path / "run"
    assert main(["evaluate", "tinynets:tiny_cnn", "--data", str(small_npz), "--attacks", "apgd-ce",
                 "--apgd-iters", "2", "--n-examples", "8", "--no-progress", "--out", str(out)]) == 0
    saved = pd.read_csv(out / "result.csv", dtype={"settings_id": str})  # a hex id like 242e955690 would parse as a float
    expected = build_table(collect(out))
    assert len(saved) == 1 and list(saved.columns) == list(expected.columns)
    result = json.loads((out / "result.json").read_text())
    assert saved.iloc[0]["worst_case_acc"] == pytest.approx(round(100 * result["worst_case_acc"], 2))
    assert saved.iloc[0]["settings_id"] == expected.iloc[0]["settings_id"]
