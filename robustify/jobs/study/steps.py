"""Running one step (in a worker process or a Slurm job): a calibration or a cell's evaluation, with its record."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from robustify.core.errors import UserError, first_line
from robustify.jobs.study.plan import CALIBRATE, Step
from robustify.jobs.study.state import (DONE, FAILED, RUNNING, SKIPPED, journal_batches, log_event, read_record,
                                        write_record)

logger = logging.getLogger(__name__)

__all__ = ["error_line", "run_step", "skip_step"]

#: Slurm's ids of the job running a step, recorded with it
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


def error_line(exc: BaseException) -> str:
    """A step's one-line error: the message of a user error, else the exception type and its first line."""
    if isinstance(exc, (UserError, OSError, ImportError)):
        return first_line(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"


def skip_step(state_dir: Path, step: Step, reason: str) -> dict[str, Any]:
    record = {"state": SKIPPED, "error": reason, "seconds": None}
    write_record(state_dir, step, record)
    log_event(state_dir, step, SKIPPED, error=reason)
    return record


def _dependency_failure(state_dir: Path, deps: list[Step]) -> str | None:
    """Why a step cannot run: a dependency that did not finish (its error)."""
    from robustify.defenses.file import read_sidecar

    for dep in deps:
        try:
            read_sidecar(dep.path)
            continue
        except Exception:  # noqa: BLE001 - missing or damaged: the dependency did not finish
            pass
        record = read_record(state_dir, dep) or {}
        return f"{dep.id} {record.get('state', 'did not finish')}: {record.get('error') or 'no calibration file'}"
    return None


def run_step(step: Step, state_dir: str | Path, deps: list[Step] | None = None) -> dict[str, Any]:
    """Run ``step``, recording its start and end in ``state_dir``; a dependency in ``deps`` that did not finish
    skips it with that reason. Never raises for the step's own error: the record has it (one line)."""
    state_dir = Path(state_dir)
    reason = _dependency_failure(state_dir, deps or [])
    if reason is not None:
        return skip_step(state_dir, step, reason)
    from robustify.core import distributed

    if not distributed.is_main():  # another rank of a multi-GPU step: the first one keeps the records
        _run(step)
        return {}
    slurm = {k.lower(): os.environ[k] for k in SLURM_VARS if k in os.environ}
    if "slurm_job_id" in slurm:  # as squeue shows it (an array task: JOB_TASK)
        array = ("slurm_array_job_id", "slurm_array_task_id")
        slurm["slurm_job"] = ("_".join(slurm[k] for k in array) if all(k in slurm for k in array)
                              else slurm["slurm_job_id"])
    resumed = journal_batches(Path(step.job.out)) if step.kind != CALIBRATE else 0
    start = time.time()
    base = {"host": socket.gethostname(), "pid": os.getpid(), "started": start, "resumed_batches": resumed, **slurm}
    write_record(state_dir, step, {"state": RUNNING, **base})
    log_event(state_dir, step, "start", resumed_batches=resumed, **slurm)
    try:
        _run(step)
    except Exception as exc:  # noqa: BLE001 - the step's error is recorded; the study goes on
        logger.debug("step %s failed", step.id, exc_info=True)
        record = {"state": FAILED, **base, "seconds": time.time() - start, "error": error_line(exc)}
        write_record(state_dir, step, record)
        log_event(state_dir, step, FAILED, error=record["error"])
        return record
    record = {"state": DONE, **base, "seconds": time.time() - start, "error": ""}
    write_record(state_dir, step, record)
    log_event(state_dir, step, DONE, seconds=record["seconds"])
    return record


def _run(step: Step) -> None:
    job = step.job
    if step.kind == CALIBRATE:
        from robustify.jobs.evaluate import calibrate_defense
        from robustify.load.models import load_model

        model, info = load_model(job.model, dataset=job.dataset, threat_model=job.threat_model, weights=job.weights,
                                 pretrained=job.pretrained, cache_dir=job.cache_dir, device=job.device)
        calibrate_defense(model, info, job.defense_config, step.path, data=job.data, holdout=job.holdout,
                          n_calib=job.n_calib, batch_size=job.calib_batch_size, cache_dir=job.cache_dir,
                          workers=job.workers, device=job.device, progress=False)
        return
    from robustify.jobs.evaluate import run_evaluation
    from robustify.reporting.leaderboard import write_result_table

    from robustify.core import distributed

    run_evaluation(job)
    if distributed.is_main():
        write_result_table(job.out)  # the one-row table next to result.json, as `robustify evaluate` writes it
