"""benchmarks/gpu_check.sh in its CPU dry run: every step runs, writes its CSV, and the identities hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["meansparse", "calibration", "eval_overhead", "precision_eval", "torchrun_eval"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900)


def test_usage_error_exits_2(tmp_path):
    assert _run().returncode == 2
    assert _run(str(tmp_path), "--bogus").returncode == 2


def test_dry_run_writes_every_csv_and_checks_identities(tmp_path):
    proc = _run(str(tmp_path / "out"), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    summary = pd.read_csv(out / "summary.csv")
    status = dict(zip(summary["step"], summary["status"]))
    assert all(status[s] == "ok" for s in STEPS), status
    assert status["compiled_eval"].startswith("skipped: dry run")  # torch.compile on a CPU takes minutes
    for step in STEPS:
        assert len(pd.read_csv(out / f"{step}.csv")) >= 1
    assert pd.read_csv(out / "eval_overhead.csv")["identical_per_example_results"].all()
    torchrun = pd.read_csv(out / "torchrun_eval.csv")
    assert torchrun["identical_results"].all() and (torchrun["backend"] == "gloo").all()
    precision = pd.read_csv(out / "precision_eval.csv")
    assert set(precision["precision"]) == {"float32", "bfloat16", "float16"}
    assert precision["statistics_float32_unchanged"].all()
    assert (precision["clean_acc"] > 0).all()  # the attacks had examples to attack
    assert set(pd.read_csv(out / "meansparse.csv")["variant"]) >= {"base", "fast", "fused"}


def test_a_failed_identity_fails_the_check(tmp_path):
    """A step whose script exits non-zero (as on differing per-example results) makes the check exit 1."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case "$1" in
  benchmarks/bench_eval_overhead.py) echo "per-example results of robustify and pyautoattack differ" >&2; exit 1 ;;
  benchmarks/*) while [ $# -gt 1 ] && [ "$1" != --out ]; do shift; done; printf 'x\\n1\\n' > "$2"; exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    failed = summary.loc[summary["status"].str.startswith("FAILED"), "step"].tolist()
    assert failed == ["eval_overhead"]
    assert "differ" in summary.set_index("step").loc["eval_overhead", "status"]
