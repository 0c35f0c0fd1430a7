"""The study controller: plan, skip what is done, run the rest on an executor, report.

One controller per study directory (:func:`robustify.jobs.study.state.controller_lock`). Rerunning it resumes:
finished cells (a matching result.json, whoever wrote it) are skipped, partial ones resume from their journals,
failed ones rerun with ``retry_failed``; cells added to the file are the only new work.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from robustify.core.errors import UserError
from robustify.jobs.study.plan import CALIBRATE, EVALUATE, RESULTS_DIR, Plan, Step, plan_study
from robustify.jobs.study.spec import Study, load_study
from robustify.jobs.study.state import (DONE, FAILED, CellState, cell_states, controller_lock, read_record,
                                        step_done)
from robustify.jobs.study.steps import skip_step

logger = logging.getLogger(__name__)

__all__ = ["EXECUTORS", "STUDY_FILE", "load_plan", "report_study", "run_study", "study_status"]

EXECUTORS = ("local", "slurm")
#: the study file as the last run used it, kept in ``<out>/study/`` (what ``status`` and ``report`` read)
STUDY_FILE = "study.toml"


def _todo(plan: Plan, retry_failed: bool) -> tuple[list[Step], list[Step]]:
    """The steps to run, and the failed ones kept as they are (without ``retry_failed``)."""
    todo, kept = [], []
    needed = {d for s in plan.steps if s.kind == EVALUATE and not step_done(plan, s) for d in s.deps}
    for step in plan.steps:
        if (step.kind == CALIBRATE and step.id not in needed) or step_done(plan, step):
            continue  # done, or a calibration no unfinished cell needs
        record = read_record(plan.state_dir, step) or {}
        if record.get("state") == FAILED and not retry_failed:
            kept.append(step)
        else:
            todo.append(step)
    return todo, kept


def _skip_dependents(plan: Plan, todo: list[Step], kept: list[Step]) -> list[Step]:
    """Record the steps of ``todo`` that depend on a kept failed step as skipped; the rest."""
    failed = {s.id: read_record(plan.state_dir, s) or {} for s in kept}
    rest = []
    for step in todo:
        bad = [d for d in step.deps if d in failed]
        if bad:
            skip_step(plan.state_dir, step, f"{bad[0]} failed: {failed[bad[0]].get('error', '')}")
        else:
            rest.append(step)
    return rest


def _write_reproduce(plan: Plan) -> None:
    from robustify.reporting.leaderboard import REPRODUCE_FILE

    note = plan.study.note
    text = (f"Reproduce with: `robustify study run {plan.study.path} --out {plan.out}` (one command for every row; "
            f"rerun it to resume). The per-example results behind every row are in "
            f"`{plan.out / RESULTS_DIR}/*/result.json`; `robustify study report {plan.out}` rebuilds these tables "
            "and plots from them.")
    path = plan.out / RESULTS_DIR / REPRODUCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + (f" {note}" if note else "") + "\n", encoding="utf-8")


def run_study(
    study: Study | str | Path,
    out_dir: str | Path,
    executor: str = "local",
    *,
    workers: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    report: bool = True,
    resources: dict[str, Any] | None = None,
) -> list[CellState]:
    """Run every cell of ``study`` not done yet, locally or on Slurm, and rebuild its leaderboard.

    A cell is done when its ``result.json`` is the cell's, so a rerun resumes (interrupted cells continue from
    their journals) and adding a setting runs only the new cells. A failed step records its one-line error
    (``robustify study status``) and skips its dependents. One controller per ``out_dir``.

    Args:
        study: a :class:`~robustify.jobs.study.Study` (:func:`robustify.load_study`) or the path of its TOML file.
        out_dir: the study directory: results in ``<out_dir>/results/<cell>/``, the leaderboard in ``out_dir``.
        executor: ``local`` (worker processes: one per GPU on CUDA, ``workers`` on CPU) or ``slurm`` (job arrays
            through submitit, with the file's ``[resources]``).
        workers: local worker processes on CPU (None: the default; 0: run the cells in this process).
        retry_failed: rerun the steps that failed before (otherwise they are kept failed).
        progress: show a progress bar.
        report: rebuild the leaderboard of every cell in ``out_dir`` at the end.
        resources: :class:`~robustify.jobs.study.spec.Resources` fields overriding the file's for every step.

    Returns:
        Each cell's state (``done``, ``failed``, ``skipped``, ...), as ``robustify study status`` shows it.

    Raises:
        UserError: an unknown executor, an invalid study file (:class:`~robustify.jobs.study.StudyFileError`), or
            another controller running in ``out_dir`` (:class:`~robustify.jobs.study.StudyLockedError`).

    Examples:
        >>> from pathlib import Path
        >>> _ = Path("one.toml").write_text('''
        ... [study]
        ... data = "../shared/data/cifar10_subset.npz"
        ... n_examples = 4
        ...
        ... [[models]]
        ... model = "aa-resnet18"
        ... weights = "../shared/models/resnet18_at_relu.pt"
        ...
        ... [[defenses]]
        ... defense = "none"
        ...
        ... [[attacks]]
        ... name = "quick"
        ... attacks = ["apgd-ce"]
        ... apgd_iters = 1
        ... ''')
        >>> states = rb.run_study("one.toml", "runs/one", workers=0, progress=False)
        >>> [(s.cell, s.state) for s in states]
        [('aa-resnet18/base/quick', 'done')]
        >>> [(s.cell, s.state) for s in rb.run_study("one.toml", "runs/one", workers=0, progress=False)]  # resumes
        [('aa-resnet18/base/quick', 'done')]
    """
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; choose from {list(EXECUTORS)}")
    if not isinstance(study, Study):
        study = load_study(study)
    study = study.with_resources(**(resources or {}))
    plan = plan_study(study, out_dir)
    with controller_lock(plan.state_dir):
        _keep_study_file(plan)
        todo, kept = _todo(plan, retry_failed)
        todo = _skip_dependents(plan, todo, kept)
        n_done = sum(step_done(plan, plan.cell_step(c)) for c in plan.cells)
        logger.info("study %s: %d cell(s), %d done, %d to run, %d failed (kept; --retry-failed reruns them)",
                    study.name, len(plan.cells), n_done, sum(s.kind == EVALUATE for s in todo),
                    sum(s.kind == EVALUATE for s in kept))
        bar = _bar(len(plan.cells), n_done, progress)

        def on_end(step: Step, record: dict[str, Any]) -> None:
            if record.get("state") != DONE:
                logger.warning("%s %s: %s", step.id, record.get("state"), record.get("error", ""))
            if step.kind == EVALUATE and bar is not None:
                bar.update(1)

        try:
            if todo and executor == "local":
                from robustify.jobs.study.local import run_local

                run_local(plan, todo, workers, on_end)
            elif todo:
                from robustify.jobs.study.slurm import run_slurm

                run_slurm(plan, todo, on_end)
        finally:
            if bar is not None:
                bar.close()
        _write_reproduce(plan)
        if report:
            report_study(plan.out, plan=plan)
        return cell_states(plan)


def _bar(total: int, initial: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="cells", unit="cell")


def _keep_study_file(plan: Plan) -> None:
    source = Path(plan.study.path)
    target = plan.state_dir / STUDY_FILE
    if source.is_file() and source.resolve() != target.resolve():
        shutil.copyfile(source, target)


def load_plan(out_dir: str | Path) -> Plan:
    """The plan of the study last run in ``out_dir`` (its study file is kept in ``<out_dir>/study/``)."""
    path = Path(out_dir) / "study" / STUDY_FILE
    if not path.is_file():
        raise UserError(f"{str(out_dir)!r} holds no study (no {path}): run `robustify study run FILE --out DIR` first")
    study = load_study(path)
    return plan_study(study, out_dir)


def study_status(out_dir: str | Path) -> list[CellState]:
    """One :class:`CellState` per cell of the study in ``out_dir``."""
    return cell_states(load_plan(out_dir))


def report_study(out_dir: str | Path, *, plan: Plan | None = None, plots: bool = True) -> Any:
    """Rebuild the leaderboard of every cell's result in ``out_dir`` (the writers of ``robustify leaderboard``)."""
    from robustify.reporting.leaderboard import write_leaderboard

    plan = plan or load_plan(out_dir)
    return write_leaderboard(plan.out / RESULTS_DIR, plan.out, plots=plots)


def calibration_steps(plan: Plan) -> list[Step]:
    return [s for s in plan.steps if s.kind == CALIBRATE]


