"""Studies on a real Slurm cluster (``.ci/slurm.sh start`` makes a single-node one): the tiny study gives the local
executor's results, and a cancelled array task resumes from its journal on the rerun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study_helpers import events, per_example, write_study

import robustify as rb
from robustify.jobs.study import plan_study

pytestmark = pytest.mark.skipif(shutil.which("sinfo") is None,
                                reason="no Slurm here (sinfo not found): `bash .ci/slurm.sh start` makes a cluster")

#: small requests, so that two array tasks run at once on a 2-core machine
RESOURCES = """
[resources.calibrate]
cpus = 1
mem_gb = 1
time = 10

[resources.evaluate]
cpus = 1
mem_gb = 1
time = 10
"""


@pytest.fixture(scope="module", autouse=True)
def cluster_up() -> None:
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not any(state in ("idle", "mixed", "allocated") for state in out):
        pytest.skip(f"the Slurm node is not up (sinfo: {out}): `bash .ci/slurm.sh start`")


def test_tiny_study_on_slurm_matches_local(study_root: Path, study_local_run: Path) -> None:
    """(a) The tiny study (2 models x 3 settings x 2 attacks) on Slurm: per example as on the local executor."""
    text = (study_root / "tiny.toml").read_text() + RESOURCES
    path = study_root / "tiny_slurm.toml"
    path.write_text(text)
    out = study_root / "slurm"
    rows = rb.run_study(path, out, executor="slurm", progress=False, report=False, resources={"partition": "debug"})
    assert [r.state for r in rows] == ["done"] * 12, rows
    scripts = [p.read_text() for p in (out / "study" / "slurm").rglob("*_submission.sh")]
    assert len(scripts) == 2  # one array of calibrations, one of evaluations after it
    assert all("#SBATCH --partition=debug" in t and "#SBATCH --cpus-per-task=1" in t for t in scripts)
    assert sum("#SBATCH --dependency=afterany:" in t for t in scripts) == 1
    for cell in plan_study(rb.load_study(path), out).cells:
        reference = study_local_run / "results" / cell.id / "result.json"
        assert per_example(cell.out / "result.json") == per_example(reference)
    starts = [e for e in events(out) if e["event"] == "start"]
    assert all("slurm_job" in e for e in starts) and sum(e["kind"] == "calibrate" for e in starts) == 2


def test_scancel_a_running_task_and_resume(study_root: Path, study_local_run: Path, tmp_path: Path) -> None:
    """(b) scancel of a running array task: the controller records it interrupted; the rerun resumes its journal and
    ends identical to the uninterrupted run."""
    attacks = '\n[[attacks]]\nname = "ce"\nattacks = ["apgd-ce"]\napgd_iters = 2\nbatch_size = 2\n'
    path = write_study(study_root, "slow_slurm.toml", ["studynets:slow_a"], [0.1], attacks=attacks + RESOURCES,
                       base=False)
    out = tmp_path / "slow"
    env = {**os.environ, "STUDY_TEST_DELAY": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "robustify", "study", "run", str(path), "--out", str(out),
                             "--executor", "slurm", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    cell = out / "results" / "slow_a" / "meansparse_0.1" / "ce"
    record = out / "study" / "steps" / "evaluate-slow_a__meansparse_0.1__ce.json"
    deadline, job = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        if (cell / "journal.jsonl").is_file() and len((cell / "journal.jsonl").read_text().splitlines()) >= 2:
            job = json.loads(record.read_text()).get("slurm_job")
            break
        time.sleep(0.05)
    assert job is not None, "the task did not start in time"
    subprocess.run(["scancel", job], check=True)
    assert proc.wait(timeout=120) == 1  # not every cell is done
    assert json.loads(record.read_text())["state"] == "interrupted"
    assert not (cell / "result.json").exists()
    rows = rb.run_study(path, out, executor="slurm", progress=False, report=False)
    assert [r.state for r in rows] == ["done"]
    starts = [e for e in events(out) if e["step"] == "evaluate:slow_a/meansparse_0.1/ce" and e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["resumed_batches"] == 0 and starts[1]["resumed_batches"] >= 1
    assert per_example(cell / "result.json") == \
        per_example(study_local_run / "results" / "tiny_a" / "meansparse_0.1" / "ce" / "result.json")


def test_cell_spanning_two_tasks(study_root: Path, study_local_run: Path, tmp_path: Path) -> None:
    """A step with ``tasks = 2``: two Slurm tasks joined by torch.distributed (gloo on CPU) calibrate and evaluate
    one cell; its per-example results equal the one-process run's."""
    attacks = '\n[[attacks]]\nname = "ce"\nattacks = ["apgd-ce"]\napgd_iters = 2\nbatch_size = 4\n'
    path = write_study(study_root, "two_tasks.toml", ["studynets:tiny_a"], [0.1], base=False,
                       attacks=attacks + RESOURCES.replace("time = 10", "time = 10\ntasks = 2"))
    out = tmp_path / "two_tasks"
    rows = rb.run_study(path, out, executor="slurm", progress=False, report=False)
    assert [r.state for r in rows] == ["done"]
    logs = "".join(p.read_text() for p in (out / "study" / "slurm").rglob("*_log.*"))
    assert "global_rank=1(2)" in logs
    assert per_example(out / "results" / "tiny_a" / "meansparse_0.1" / "ce" / "result.json") == \
        per_example(study_local_run / "results" / "tiny_a" / "meansparse_0.1" / "ce" / "result.json")


def test_rerun_waits_for_the_jobs_a_killed_controller_submitted(study_root: Path, tmp_path: Path) -> None:
    """kill -9 of the controller after it submitted: the rerun waits for the queued jobs, submits nothing again."""
    attacks = '\n[[attacks]]\nname = "ce"\nattacks = ["apgd-ce"]\napgd_iters = 2\nbatch_size = 2\n'
    path = write_study(study_root, "reattach.toml", ["studynets:slow_a"], [0.1], attacks=attacks + RESOURCES,
                       base=False)
    out = tmp_path / "reattach"
    env = {**os.environ, "STUDY_TEST_DELAY": "0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "robustify", "study", "run", str(path), "--out", str(out),
                             "--executor", "slurm", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and sum(e["event"] == "submitted" for e in events(out)) < 2:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    rows = rb.run_study(path, out, executor="slurm", progress=False, report=False)
    assert [r.state for r in rows] == ["done"]
    submitted = [e["step"] for e in events(out) if e["event"] == "submitted"]
    assert len(submitted) == 2 and len(set(submitted)) == 2  # the calibration and the evaluation, once each
