"""The evaluate / sweep / leaderboard commands end to end, resume after kill -9, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustify.cli import main
from tinynets import write_labelled_npz

TESTS = Path(__file__).resolve().parent
QUICK = ["--eps", "2/255", "--apgd-iters", "3", "--square-queries", "10", "--adaptive-steps", "3",
         "--attack-batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    """Random images labelled by the tiny model itself (100% clean accuracy, attacks matter)."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    write_labelled_npz(str(path), n_train=96, n_test=40)
    return path


def _evaluate(npz: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "tinynets:tiny_cnn", "--data", str(npz), "--n-examples", "16", "--out", str(out),
                 *QUICK, *extra])


def test_evaluate_base_and_meansparse_then_leaderboard(npz, tmp_path, capsys):
    assert _evaluate(npz, tmp_path / "res" / "base", "--attacks", "apgd-ce,bpda,transfer") == 0
    assert _evaluate(npz, tmp_path / "res" / "ms", "--defense", "meansparse", "--alpha", "0.3",
                     "--attacks", "apgd-ce,bpda,adaptive,transfer", "--leaderboard-dir", str(tmp_path / "lb")) == 0
    base = json.loads((tmp_path / "res" / "base" / "result.json").read_text())
    ms = json.loads((tmp_path / "res" / "ms" / "result.json").read_text())
    assert list(base["attack_acc"]) == ["apgd-ce"]  # BPDA and transfer do not apply to the base model
    assert set(base["meta"]["not_applicable"]) == {"bpda-apgd-ce", "bpda-apgd-dlr", "transfer"}
    assert list(ms["attack_acc"]) == ["apgd-ce", "bpda-apgd-ce", "bpda-apgd-dlr", "adaptive", "transfer"]
    assert (tmp_path / "res" / "ms" / "calibration.safetensors").is_file()
    lb = pd.read_csv(tmp_path / "lb" / "leaderboard.csv")
    assert sorted(lb["defense"]) == ["meansparse", "none"]
    assert "worst case" in capsys.readouterr().out


def test_rerun_reuses_calibration_and_results(npz, tmp_path):
    out = tmp_path / "ms"
    assert _evaluate(npz, out, "--defense", "meansparse", "--attacks", "apgd-ce") == 0
    stamp = (out / "calibration.safetensors").stat().st_mtime_ns
    lines = (out / "journal.jsonl").read_text()
    assert _evaluate(npz, out, "--defense", "meansparse", "--attacks", "apgd-ce") == 0
    assert (out / "calibration.safetensors").stat().st_mtime_ns == stamp
    assert (out / "journal.jsonl").read_text() == lines  # nothing recomputed


def test_same_command_twice_gives_identical_rows(npz, tmp_path):
    for run in ("a", "b"):
        assert _evaluate(npz, tmp_path / run / "res" / "ms", "--defense", "meansparse",
                         "--attacks", "apgd-ce,square,adaptive", "--leaderboard-dir", str(tmp_path / run / "lb")) == 0
    timing = ["seconds", "seconds_per_attack", "result"]
    a = pd.read_csv(tmp_path / "a" / "lb" / "leaderboard.csv").drop(columns=timing)
    b = pd.read_csv(tmp_path / "b" / "lb" / "leaderboard.csv").drop(columns=timing)
    assert a.to_csv(index=False) == b.to_csv(index=False)


def test_sweep_picks_alpha_by_the_rule(npz, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "tinynets:tiny_cnn", "--data", str(npz), "--holdout", "24", "--n-examples", "16",
                 "--alphas", "0.1,0.5,2", "--attacks", "apgd-ce,bpda", "--out", str(out), *QUICK]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    curve = pd.DataFrame(sweep["curve"])
    assert list(curve["alpha"]) == [0.0, 0.1, 0.5, 2.0]
    ok = curve[curve["clean_acc"] >= sweep["base"]["clean_acc"] - 0.5]
    best = ok[ok["worst_case_acc"] == ok["worst_case_acc"].max()]["alpha"].min()
    assert sweep["setting"] == "alpha" and sweep["chosen"] == best
    assert (out / "sweep.png").is_file() and (out / "sweep.csv").is_file()
    calib = json.loads((out / "calibration.safetensors.json").read_text())
    assert calib["holdout"] == 24  # calibration never saw the held-out examples
    assert len(list(out.glob("alpha_*/result.json"))) == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "nope:nothing", "--out", "X"], "cannot import model factory"),
        (["evaluate", "tinynets:tiny_cnn", "--attacks", "nope", "--out", "X"], "unknown attack"),
        (["evaluate", "tinynets:tiny_cnn", "--eps", "8/0", "--out", "X"], "eps"),
        (["evaluate", "tinynets:tiny_cnn", "--defense", "magic", "--out", "X"], "unknown defense"),
        (["evaluate", "tinynets:tiny_cnn", "--attacks", "adaptive", "--norm", "L1", "--out", "X"], "does not support"),
        (["leaderboard", "/does/not/exist"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, capsys, npz):
    argv = [a if a != "X" else "/tmp/robustify-never-written" for a in argv]
    if argv[0] == "evaluate":
        argv += ["--data", str(npz)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_n_examples_larger_than_data(npz, capsys):
    assert main(["evaluate", "tinynets:tiny_cnn", "--data", str(npz), "--n-examples", "1000",
                 "--out", "/tmp/robustify-never-written"]) == 2
    assert "asked for 1000 examples" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "robustify", *args]


def test_kill_9_during_an_attack_then_resume(npz, tmp_path):
    args = ["evaluate", "tinynets:tiny_cnn", "--data", str(npz), "--n-examples", "16", "--defense", "meansparse",
            "--attacks", "apgd-ce,apgd-dlr", "--eps", "2/255", "--apgd-iters", "10", "--attack-batch-size", "2",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    reference = tmp_path / "reference"
    subprocess.run(_cli(*args, "--out", str(reference)), env=env, check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journal = out / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"apgd-ce"') >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "result.json").exists()
    subprocess.run(_cli(*args, "--out", str(out)), env=env, check=True, capture_output=True)
    killed = json.loads((out / "result.json").read_text())
    ref = json.loads((reference / "result.json").read_text())
    assert killed["per_example"] == ref["per_example"]
    assert killed["attack_acc"] == ref["attack_acc"]
    records = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    keys = [(r["attack"], r["batch"]) for r in records]
    assert len(keys) == len(set(keys))


def test_torchrun_two_processes_equal_one(npz, tmp_path):
    """`torchrun --nproc_per_node=2 -m robustify evaluate` gives the single-process result."""
    args = ["evaluate", "tinynets:tiny_cnn", "--data", str(npz), "--n-examples", "20", "--defense", "meansparse",
            "--attacks", "apgd-ce,pgd", *QUICK]
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(*args, "--out", str(tmp_path / "one")), env=env, check=True, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "robustify", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    one_res = json.loads((tmp_path / "one" / "result.json").read_text())
    two_res = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two_res["per_example"] == one_res["per_example"]
    assert two_res["attack_acc"] == one_res["attack_acc"]
    # calibration statistics merged across the two ranks equal the single-process ones
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "calibration.safetensors"))
    b = load_file(str(tmp_path / "two" / "calibration.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_main_job_run(npz, tmp_path, caplog):
    with caplog.at_level("INFO"):
        assert main(["run", "--model", "tinynets:tiny_cnn", "--data", str(npz), "--n-examples", "8",
                     "--n-calib", "32", "--apgd-iters", "2", "--eps", "2/255", "--out", str(tmp_path)]) == 0
    assert "check passed: MeanSparse at alpha=0 reproduces the base model exactly" in caplog.text
    lb = pd.read_csv(tmp_path / "leaderboard" / "leaderboard.csv")
    assert sorted(lb["defense"]) == ["meansparse", "none"]
    assert "bpda-apgd-ce_acc" in lb.columns


def test_main_job_offline_says_how_to_use_local_data(tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError("simulated: no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert main(["run", "--model", "tinynets:tiny_cnn", "--cache-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--data file.npz" in err and len(err.strip().splitlines()) == 1


def test_precision_and_compile_flags(npz, tmp_path):
    """--precision autocasts the attacked model (recorded in the result and the leaderboard);
    --compile attacks the compiled, fused model and agrees with the eager run."""
    common = ["--defense", "meansparse", "--alpha", "0.3", "--attacks", "apgd-ce,bpda,adaptive,transfer"]
    assert _evaluate(npz, tmp_path / "res" / "eager", *common) == 0
    assert _evaluate(npz, tmp_path / "res" / "bf16", *common, "--precision", "bfloat16",
                     "--leaderboard-dir", str(tmp_path / "lb")) == 0
    assert _evaluate(npz, tmp_path / "res" / "compiled", *common, "--compile") == 0
    eager, bf16, compiled = (json.loads((tmp_path / "res" / d / "result.json").read_text())
                             for d in ("eager", "bf16", "compiled"))
    assert bf16["meta"]["precision"] == "bfloat16" and "precision" not in eager["meta"]
    lb = pd.read_csv(tmp_path / "lb" / "leaderboard.csv")
    assert sorted(lb["precision"]) == ["bfloat16", "float32"]
    assert compiled["per_example"]["clean_correct"] == eager["per_example"]["clean_correct"]
    for attack, acc in eager["attack_acc"].items():
        assert abs(compiled["attack_acc"][attack] - acc) <= 1 / 16 + 1e-9
    assert sum(bf16["per_example"]["clean_correct"]) >= 14  # labels are the float32 model's own predictions
    with pytest.raises(SystemExit):
        _evaluate(npz, tmp_path / "res" / "bad", "--precision", "float8")
