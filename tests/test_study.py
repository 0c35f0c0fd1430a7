"""Studies (robustify.jobs.study, ``robustify study``): file, plan, local executor, resume, status, lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study_helpers import events, per_example, write_study

import robustify as rb
from robustify.cli import main
from robustify.jobs.study import StudyFileError, StudyLockedError, plan_study, study_status
from robustify.jobs.study.state import controller_lock


def _evaluate_argv(cell, out: Path) -> list[str]:
    """The `robustify evaluate` command of a cell (the defense calibrated by the command itself)."""
    job, attack = cell.job, cell.job.attack
    argv = ["evaluate", job.model, "--data", job.data, "--n-examples", str(job.n_examples), "--out", str(out),
            "--defense", job.defense, "--attacks", ",".join(dict(_spec_attacks(cell))["attacks"]),
            "--apgd-iters", str(attack.apgd_iters), "--attack-batch-size", str(attack.batch_size),
            "--seed", str(attack.seed), "--no-progress"]
    for k, v in cell.settings:
        argv += [f"--{k}", str(v)]
    return argv


def _spec_attacks(cell):
    study = rb.load_study(Path(cell.job.data).parent / "tiny.toml")
    return next(a for a in study.attacks if a.name == cell.attack).fields


def test_tiny_study_matches_separate_evaluate_commands(study_root: Path, study_local_run: Path,
                                                       tmp_path: Path) -> None:
    """(a) Every cell's per-example results equal those of its own `robustify evaluate` command."""
    plan = plan_study(rb.load_study(study_root / "tiny.toml"), study_local_run)
    assert len(plan.cells) == 12
    for cell in plan.cells:
        out = tmp_path / cell.id
        assert main(_evaluate_argv(cell, out)) == 0
        assert per_example(cell.out / "result.json") == per_example(out / "result.json"), cell.id
    assert len([e for e in events(study_local_run) if e["kind"] == "calibrate" and e["event"] == "start"]) == 2


def test_status_and_report_cli(study_local_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "status", str(study_local_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 13 and all(" done " in line for line in lines[1:])
    assert main(["study", "report", str(study_local_run), "--no-plots"]) == 0
    assert "meansparse" in capsys.readouterr().out
    assert (study_local_run / "leaderboard.md").read_text().count("| studynets:tiny_") == 12
    assert "robustify study run" in (study_local_run / "leaderboard.md").read_text()


def test_kill_controller_and_resume(study_root: Path, study_local_run: Path, tmp_path: Path) -> None:
    """(b) kill -9 of the controller mid-cell; the rerun resumes that cell's journal and ends identical."""
    extra = ('\n[[attacks]]\nname = "ce"\nattacks = ["apgd-ce"]\napgd_iters = 2\nbatch_size = 2\n')
    path = write_study(study_root, "slow.toml", ["studynets:slow_a"], [0.1], attacks=extra, base=False)
    out = tmp_path / "slow"
    env = {**os.environ, "STUDY_TEST_DELAY": "0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "robustify", "study", "run", str(path), "--out", str(out),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "results" / "slow_a" / "meansparse_0.1" / "ce" / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 2:  # header + a finished batch
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the study ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (journal.parent / "result.json").exists()
    state = {r.cell: r for r in study_status(out)}["slow_a/meansparse_0.1/ce"]
    assert state.state == "interrupted" and state.passes >= 1
    rows = rb.run_study(path, out, workers=0, progress=False, report=False)  # the worker died with it: no lock left
    assert [r.state for r in rows] == ["done"]
    starts = [e for e in events(out) if e["step"] == "evaluate:slow_a/meansparse_0.1/ce" and e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["resumed_batches"] == 0 and starts[1]["resumed_batches"] >= 1
    batches = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert len(batches) == len({(b["attack"], b["batch"]) for b in batches})  # no batch done twice
    assert per_example(journal.parent / "result.json") == \
        per_example(study_local_run / "results" / "tiny_a" / "meansparse_0.1" / "ce" / "result.json")


def test_unknown_model_fails_alone(study_root: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """(c) A cell with an unknown model: its one-line error in `study status`; every other cell completes."""
    attacks = '\n[[attacks]]\nname = "ce"\nattacks = ["apgd-ce"]\napgd_iters = 1\n'
    path = write_study(study_root, "bad_model.toml", ["studynets:tiny_a", "studynets:no_such_model"], [0.1],
                       attacks=attacks, n=4)
    out = tmp_path / "bad"
    assert main(["study", "run", str(path), "--out", str(out), "--no-progress", "--workers", "0"]) == 1
    capsys.readouterr()
    assert main(["study", "status", str(out)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert " done " in rows["tiny_a/base/ce"] and " done " in rows["tiny_a/meansparse_0.1/ce"]
    assert " failed " in rows["no_such_model/base/ce"] and "no_such_model" in rows["no_such_model/base/ce"]
    assert " skipped " in rows["no_such_model/meansparse_0.1/ce"]
    assert "calibrate:no_such_model-meansparse" in rows["no_such_model/meansparse_0.1/ce"]
    states = {r.cell: r for r in study_status(out)}
    assert "\n" not in states["no_such_model/base/ce"].error and states["no_such_model/base/ce"].error


def test_one_calibration_for_three_alphas_and_new_alpha_runs_alone(study_root: Path, tmp_path: Path) -> None:
    """(d) Three alphas of one model: one calibration step runs; adding an alpha runs only its cell."""
    attacks = '\n[[attacks]]\nname = "ce"\nattacks = ["apgd-ce"]\napgd_iters = 1\n'
    path = write_study(study_root, "alphas.toml", ["studynets:tiny_a"], [0.1, 0.2, 0.3], attacks=attacks, n=4)
    out = tmp_path / "alphas"
    plan = plan_study(rb.load_study(path), out)
    assert sum(s.kind == "calibrate" for s in plan.steps) == 1 and len(plan.cells) == 4
    rb.run_study(path, out, workers=0, progress=False, report=False)
    started = [e["step"] for e in events(out) if e["event"] == "start"]
    assert sum(s.startswith("calibrate:") for s in started) == 1 and len(started) == 5
    path = write_study(study_root, "alphas.toml", ["studynets:tiny_a"], [0.1, 0.2, 0.3, 0.4], attacks=attacks, n=4)
    rows = rb.run_study(path, out, workers=0, progress=False, report=False)
    assert [r.state for r in rows] == ["done"] * 5
    started = [e["step"] for e in events(out) if e["event"] == "start"][5:]
    assert started == ["evaluate:tiny_a/meansparse_0.4/ce"]


@pytest.mark.parametrize(("text", "key"), [
    ('[[models]]\nmodel = "aa-resnet18"\n[[defenses]]\ndefense = "meansparse"\ngrid = { alhpa = [0.1] }\n'
     '[[attacks]]\nattacks = ["apgd-ce"]\n', "defenses[0].grid.alhpa"),
    ('[[models]]\nmodel = "aa-resnet18"\n[[defenses]]\ndefense = "nope"\n[[attacks]]\nattacks = ["apgd-ce"]\n',
     "defenses[0].defense"),
    ('[study]\nn_examples = "ten"\n[[models]]\nmodel = "aa-resnet18"\n[[defenses]]\ndefense = "none"\n'
     '[[attacks]]\nattacks = ["apgd-ce"]\n', "study.n_examples"),
    ('[[models]]\nmodel = "aa-resnet18"\n[[defenses]]\ndefense = "none"\n[[attacks]]\nattacks = ["nope"]\n',
     "attacks[0]"),
    ('[[models]]\nmodel = "aa-resnet18"\nwieghts = "x"\n[[defenses]]\ndefense = "none"\n[[attacks]]\n',
     "models[0].wieghts"),
    ('[[defenses]]\ndefense = "none"\n[[attacks]]\n', "models"),
    ('[[models]]\nmodel = "aa-resnet18"\n[[defenses]]\ndefense = "none"\n[[attacks]]\n[resources.evaluate]\n'
     'gpus = "two"\n', "resources.evaluate.gpus"),
])
def test_invalid_file_one_line_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                              key: str) -> None:
    """(e) An invalid study file: exit 2 and one line naming the key."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(StudyFileError, match=key.replace("[", r"\[").replace("]", r"\]")):
        rb.load_study(path)
    assert main(["study", "plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and len(err.splitlines()) == 1


def test_second_controller_refused(study_root: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """(f) A second controller on one study directory is refused, naming the first."""
    path = write_study(study_root, "lock.toml", ["studynets:tiny_a"], [], n=4)
    out = tmp_path / "locked"
    with controller_lock(out / "study"):
        with pytest.raises(StudyLockedError, match=f"pid {os.getpid()}"):
            rb.run_study(path, out, progress=False, report=False)
        assert main(["study", "run", str(path), "--out", str(out), "--no-progress"]) == 2
        assert "another controller" in capsys.readouterr().err
    assert not (out / "results").exists()


def test_leaderboard_study_recognises_the_committed_rows(tmp_path: Path) -> None:
    """leaderboard/study.toml: each committed row is exactly one of its cells, done; the run runs nothing and
    rebuilds the tables with the rows' settings ids unchanged."""
    import pandas as pd

    from robustify.jobs.study import report_study
    from robustify.jobs.study.plan import result_mismatch

    repo = Path(__file__).resolve().parents[1]
    committed = sorted(p.name for p in (repo / "leaderboard" / "results").iterdir() if (p / "result.json").is_file())
    out = tmp_path / "leaderboard"
    shutil.copytree(repo / "leaderboard" / "results", out / "results")
    plan = plan_study(rb.load_study(repo / "leaderboard" / "study.toml"), out)
    assert sorted(c.id for c in plan.cells) == committed
    for cell in plan.cells:
        assert result_mismatch(cell, json.loads((cell.out / "result.json").read_text())) is None, cell.id
    rows = rb.run_study(repo / "leaderboard" / "study.toml", out, progress=False, report=False)
    assert [r.state for r in rows] == ["done"] * len(committed) and events(out) == []
    report_study(out, plots=False)
    ids = pd.read_csv(out / "leaderboard.csv")["settings_id"].tolist()
    assert sorted(ids) == sorted(pd.read_csv(repo / "leaderboard" / "leaderboard.csv")["settings_id"].tolist())
