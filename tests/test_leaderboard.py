"""Leaderboard tables, JSON and plots are rebuilt from results alone; audit flags fire when they should."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from robustify.defenses import meansparse as ms
import robustify as rb
from robustify.attacks import AttackConfig
from robustify.evaluation.engine import EvalResult, audit, evaluate
from robustify.reporting.leaderboard import build_table, collect, to_markdown, write_leaderboard
from tinynets import tiny_cnn

EPS = 2 / 255


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """Base model and MeanSparse at two alphas, evaluated with the same attacks."""
    root = tmp_path_factory.mktemp("results")
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    base = tiny_cnn()
    with torch.no_grad():
        y = base(x).argmax(1)
    config = AttackConfig(attacks=("apgd-ce", "square", "bpda"), eps=EPS, apgd_iters=4, square_queries=20,
                          batch_size=8)
    evaluate(base, x, y, AttackConfig(attacks=("apgd-ce", "square"), eps=EPS, apgd_iters=4, square_queries=20,
                                      batch_size=8),
             out_dir=root / "base", meta={"model": "tiny", "defense": "none", "dataset": "synthetic",
                                          "not_applicable": {"bpda-apgd-ce": "no MeanSparse"}}, progress=False)
    model = ms.insert_meansparse(tiny_cnn(), x[:2], ms.MeanSparseConfig())
    rb.calibrate(model, [x], progress=False)
    for alpha in (0.2, 0.5):
        ms.set_alpha(model, alpha)
        evaluate(model, x, y, config, out_dir=root / f"ms_{alpha}",
                 meta={"model": "tiny", "defense": "meansparse", "alpha": alpha, "dataset": "synthetic"},
                 progress=False)
    return root


def test_rows_rank_and_columns(results_dir, tmp_path):
    df = write_leaderboard(results_dir, tmp_path)
    assert len(df) == 3
    assert list(df["rank"]) == [1, 2, 3]
    assert df["worst_case_acc"].is_monotonic_decreasing
    for col in ("model", "defense", "alpha", "dataset", "threat_model", "eps", "n_examples", "clean_acc",
                "apgd-ce_acc", "square_acc", "worst_case_acc", "seconds", "robustify_version"):
        assert col in df.columns
    saved = pd.read_csv(tmp_path / "leaderboard.csv")
    assert len(saved) == 3 and set(saved["defense"]) == {"none", "meansparse"}
    for _, row in df.iterrows():
        result = json.loads(open(row["result"]).read())
        assert row["worst_case_acc"] == pytest.approx(round(100 * result["worst_case_acc"], 2))
    assert (df["eps"] == "2/255").all()


def test_markdown_json_and_plots(results_dir, tmp_path):
    df = write_leaderboard(results_dir, tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    assert md.count("\n| ") >= 3 and "n/a" in md and "worst_case_acc" in md
    infos = list((tmp_path / "model_info" / "synthetic" / "Linf").glob("*.json"))
    assert len(infos) == 3
    for path in infos:
        info = json.loads(path.read_text())
        row = df[df["settings_id"] == path.stem].iloc[0]
        assert info["clean_acc"] == f"{row['clean_acc']:.2f}"
        assert "autoattack_acc" not in info  # APGD-CE and Square at tiny budgets are not AutoAttack
        assert info["external"] == f"{row['worst_case_acc']:.2f}"
    assert (tmp_path / "plots" / "alpha_tiny_2_255.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "bars_tiny_2_255.png").stat().st_size > 1000


def test_rebuild_is_idempotent(results_dir, tmp_path):
    write_leaderboard(results_dir, tmp_path, plots=False)
    first = (tmp_path / "leaderboard.csv").read_bytes()
    write_leaderboard(results_dir, tmp_path, plots=False)
    assert (tmp_path / "leaderboard.csv").read_bytes() == first
    assert len(pd.read_csv(tmp_path / "leaderboard.csv")) == 3


def test_the_reproduce_note_of_the_results_ends_the_markdown(results_dir, tmp_path):
    """The commands that made the results live next to them, so a rebuild keeps them (it dropped them)."""
    results = tmp_path / "results"
    shutil.copytree(results_dir, results)
    write_leaderboard(results, tmp_path / "without", plots=False)
    (results / "REPRODUCE.md").write_text("Reproduce with: `bash make_results.sh` (N=16).\n")
    write_leaderboard(results, tmp_path / "with", plots=False)
    without = (tmp_path / "without" / "leaderboard.md").read_text()
    assert (tmp_path / "with" / "leaderboard.md").read_text() == without + "\nReproduce with: `bash make_results.sh` (N=16).\n"
    assert "Reproduce with" not in without


def _fake(n: int, per_example: dict, acc: dict, eps: float = 8 / 255, alpha: float = 0.2) -> dict:
    correct = [1] * n
    robust = [c == 1 and not any(v[i] == 1 for v in per_example.values()) for i, c in enumerate(correct)]
    result = EvalResult(meta={"model": "m", "defense": "meansparse", "alpha": alpha, "dataset": "d"},
                        config=AttackConfig(attacks=tuple(per_example), eps=eps).to_dict(), n_examples=n,
                        clean_acc=1.0, attack_acc=acc, worst_case_acc=sum(robust) / n, flags=[],
                        per_example={"clean_correct": correct, **per_example}, seconds={}, versions={})
    result.flags = audit(result)
    return result.to_dict()


def test_audit_flags_black_box_and_bpda():
    n = 100
    apgd = [1] * 10 + [0] * 90
    square = [None] * 10 + [1] * 5 + [0] * 85   # breaks 5 examples APGD left robust
    bpda = [None] * 15 + [1] * 3 + [0] * 82     # breaks 3 more
    flags = _fake(n, {"apgd-ce": apgd, "square": square, "bpda-apgd-ce": bpda},
                  {"apgd-ce": .9, "square": .85, "bpda-apgd-ce": .82})["flags"]
    assert "black-box-beats-white-box" in flags and "bpda-beats-standard" in flags
    quiet = _fake(n, {"apgd-ce": apgd, "square": [None] * 10 + [0] * 90},
                  {"apgd-ce": .9, "square": .9})["flags"]
    assert quiet == []


def test_eps_monotonicity_flag():
    small = _fake(10, {"apgd-ce": [1] * 5 + [0] * 5}, {"apgd-ce": .5}, eps=4 / 255)
    large = _fake(10, {"apgd-ce": [1] * 2 + [0] * 8}, {"apgd-ce": .8}, eps=8 / 255)
    df = build_table([small, large])
    flagged = df.set_index("eps")["flags"]
    assert "robust-acc-rises-with-eps" in flagged["8/255"]
    assert "robust-acc-rises-with-eps" not in flagged["4/255"]


def test_collect_skips_corrupted_results(results_dir, tmp_path, caplog):
    import shutil

    shutil.copytree(results_dir, tmp_path / "r")
    (tmp_path / "r" / "broken").mkdir()
    (tmp_path / "r" / "broken" / "result.json").write_text('{"meta": ')
    assert len(collect(tmp_path / "r")) == 3
    assert "unreadable" in caplog.text
    assert "no results" in to_markdown(build_table([]))


def test_crash_during_leaderboard_write_then_rerun(results_dir, tmp_path, monkeypatch):
    """A crash between two table writes leaves complete files; the rerun equals an uninterrupted run."""
    import robustify.reporting.leaderboard as lb

    write_leaderboard(results_dir, tmp_path / "clean", plots=False)

    def crash(*args, **kwargs):  # noqa: ANN002, ANN003
        raise KeyboardInterrupt  # like kill -9 after leaderboard.csv was replaced

    monkeypatch.setattr(lb, "to_markdown", crash)
    with pytest.raises(KeyboardInterrupt):
        write_leaderboard(results_dir, tmp_path / "cut", plots=False)
    assert pd.read_csv(tmp_path / "cut" / "leaderboard.csv").shape[0] == 3  # complete, never half-written
    assert not list((tmp_path / "cut").glob(".*.tmp"))
    monkeypatch.undo()
    write_leaderboard(results_dir, tmp_path / "cut", plots=False)
    for name in ("leaderboard.csv", "leaderboard.md"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
