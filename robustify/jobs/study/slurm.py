"""The Slurm executor: the steps as job arrays through submitit, evaluations after their calibrations.

Calibrations go in one array, evaluations in another that starts after them (``afterany``: an evaluation
whose calibration failed records itself as skipped, with the calibration's error). Each step's resources come
from the study file's ``[resources.calibrate]`` / ``[resources.evaluate]``; a step asking for several GPUs
runs as one task per GPU on one node, joined with torch.distributed (the distributed evaluation of
:func:`robustify.evaluation.engine.evaluate`). The controller records each step's job id and polls ``squeue``; a
job that leaves the queue without a final record (``scancel``, a node failure, a time limit) is recorded as
interrupted, and a rerun resubmits it: the evaluation resumes from its journal. A rerun while a previous
controller's jobs are still queued waits for them instead of submitting them again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from robustify.core.errors import UserError
from robustify.jobs.study.plan import CALIBRATE, EVALUATE, Plan, Step
from robustify.jobs.study.spec import Resources
from robustify.jobs.study.state import DONE, FAILED, INTERRUPTED, SKIPPED, log_event, read_record, write_record
from robustify.jobs.study.steps import run_step

logger = logging.getLogger(__name__)

__all__ = ["run_slurm", "slurm_task"]

SUBMITTED = "submitted"
FINAL = (DONE, FAILED, SKIPPED)
#: seconds between two looks at the queue
POLL_SECONDS = 2.0


def queued_jobs() -> set[str]:
    """The ids of the jobs in Slurm's queue (array tasks one by one, as ``JOB_TASK``)."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"cannot read the Slurm queue (squeue): {exc}") from None
    return {line.strip() for line in out.splitlines() if line.strip()}


def slurm_task(step: Step, state_dir: str, deps: list[Step]) -> dict[str, Any] | None:
    """The function a Slurm task runs: the step; with several tasks (GPUs) the ranks join a process group first
    and the first one keeps the records."""
    import signal

    import submitit

    from robustify.core import distributed

    # scancel sends SIGTERM, which submitit bypasses (until Slurm's SIGKILL): stop at once, the journal is kept
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        distributed.init_from_env()
        step = replace(step, job=replace(step.job, device=str(distributed.device_for_rank())))
    return run_step(step, state_dir, deps)


def _executor(plan: Plan, kind: str, n: int, dependency: str | None) -> Any:
    import submitit

    r: Resources = plan.study.resources_for(kind)
    executor = submitit.AutoExecutor(folder=plan.state_dir / "slurm" / "%j", cluster="slurm")
    params: dict[str, Any] = {"timeout_min": r.time, "mem_gb": r.mem_gb, "cpus_per_task": r.cpus, "nodes": r.nodes,
                              "name": f"robustify-{kind}", "slurm_array_parallelism": max(n, 1)}
    if r.gpus:
        params["gpus_per_node"] = r.gpus
    tasks = r.tasks or max(r.gpus, 1)
    if tasks > 1:
        params["tasks_per_node"] = tasks  # one process per GPU (or per task on CPU), joined by torch.distributed
    if r.partition:
        params["slurm_partition"] = r.partition
    if dependency:
        params["slurm_additional_parameters"] = {"dependency": dependency, "kill_on_invalid_dep": "yes"}
    executor.update_parameters(**params)
    return executor


def _submit(plan: Plan, kind: str, steps: list[Step], job_of: dict[str, str]) -> None:
    """Submit ``steps`` (all of ``kind``) as one array, after the queued jobs of their dependencies."""
    if not steps:
        return
    after = sorted({job_of[d] for s in steps for d in s.deps if d in job_of})
    executor = _executor(plan, kind, len(steps), "afterany:" + ":".join(after) if after else None)
    deps = [[plan.step(d) for d in s.deps] for s in steps]
    jobs = executor.map_array(slurm_task, steps, [str(plan.state_dir)] * len(steps), deps)
    for step, job in zip(steps, jobs):
        job_of[step.id] = job.job_id
        write_record(plan.state_dir, step, {"state": SUBMITTED, "slurm_job": job.job_id, "submitted": time.time()})
        log_event(plan.state_dir, step, SUBMITTED, slurm_job=job.job_id)
    logger.info("submitted %d %s step(s) as Slurm array %s%s", len(steps), kind, jobs[0].job_id.split("_")[0],
                f" after {', '.join(after)}" if after else "")


def run_slurm(plan: Plan, todo: list[Step], on_end: Callable[[Step, dict[str, Any]], None],
              poll: float = POLL_SECONDS) -> None:
    """Submit the steps of ``todo`` (reusing the still-queued jobs of a previous controller) and wait for them."""
    state_dir = plan.state_dir
    queued = queued_jobs()
    job_of: dict[str, str] = {}
    fresh = []
    for step in todo:
        record = read_record(state_dir, step) or {}
        job = record.get("slurm_job")
        if record.get("state") in (SUBMITTED, "running") and job in queued:
            job_of[step.id] = job  # still in the queue: wait for it
        else:
            fresh.append(step)
    if job_of:
        logger.info("waiting for %d step(s) still queued from a previous run", len(job_of))
    _submit(plan, CALIBRATE, [s for s in fresh if s.kind == CALIBRATE], job_of)
    _submit(plan, EVALUATE, [s for s in fresh if s.kind == EVALUATE], job_of)
    waiting = {s.id: s for s in todo}
    while waiting:
        time.sleep(poll)
        queued = queued_jobs()  # first the queue, then the records: a job gone from it wrote its record before
        for step_id, step in list(waiting.items()):
            record = read_record(state_dir, step) or {}
            if record.get("state") in FINAL:
                del waiting[step_id]
                on_end(step, record)
            elif job_of.get(step_id) not in queued:
                record = {**record, "state": INTERRUPTED,
                          "error": f"Slurm job {job_of.get(step_id)} ended without finishing the step (cancelled, "
                                   "node failure or time limit): rerun to resume it"}
                write_record(state_dir, step, record)
                log_event(state_dir, step, INTERRUPTED, error=record["error"])
                del waiting[step_id]
                on_end(step, record)
