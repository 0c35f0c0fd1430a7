"""The local executor: the steps in worker processes on this machine, each step after its dependencies.

One worker per visible GPU (pinned with ``CUDA_VISIBLE_DEVICES``) when the study runs on CUDA, else ``workers``
processes. Workers die with the controller (``PR_SET_PDEATHSIG``), so a killed controller leaves no worker
holding a cell's evaluation lock; a rerun resumes the cells from their journals.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from robustify.jobs.study.plan import Plan, Step
from robustify.jobs.study.state import FAILED, INTERRUPTED, log_event, write_record
from robustify.jobs.study.steps import run_step

logger = logging.getLogger(__name__)

__all__ = ["run_local", "worker_count"]


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (kill -9 of the controller included)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _init_worker(gpus: Any, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the controller died before the call above
        os._exit(1)
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())


class _Inline:
    """``workers=0``: each step in the controller's own process (a pool's interface, no processes)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller as a pool would
            future.set_exception(exc)
        return future


def worker_count(plan: Plan, workers: int | None) -> tuple[int, list[int] | None]:
    """How many workers, and the GPUs to pin them to (None: CPU); 0: none (steps run in the controller)."""
    if workers == 0:
        return 0, None
    devices = {s.job.device for s in plan.steps}
    if any(str(d).startswith("cuda") for d in devices):
        import torch

        n = torch.cuda.device_count()
        if n:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [int(i) for i in visible.split(",")] if visible else list(range(n))
            ids = ids[: workers or n]
            return len(ids), ids
    return max(1, workers or 1), None


def run_local(plan: Plan, todo: list[Step], workers: int | None,
              on_end: Callable[[Step, dict[str, Any]], None]) -> None:
    """Run the steps of ``todo`` (each after its dependencies in ``todo``), calling ``on_end(step, record)`` as each
    ends; a failed step skips its dependents with its error."""
    n, gpus = worker_count(plan, workers)
    ctx = mp.get_context("spawn")
    queue = None
    if gpus is not None:
        queue = ctx.Manager().Queue()
        for g in gpus:
            queue.put(g)
    logger.info("running %d step(s) on %s%s", len(todo), f"{n} local worker(s)" if n else "the controller's process",
                f" (GPUs {gpus})" if gpus is not None else "")
    waiting = {s.id: s for s in todo}
    finished: dict[str, dict[str, Any]] = {}
    running: dict[Future[dict[str, Any]], Step] = {}
    state_dir = plan.state_dir
    pool: Any = (_Inline() if n == 0 else
                 ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(queue, os.getpid())))
    with pool:
        while waiting or running:
            for step in list(waiting.values()):
                pending = [d for d in step.deps if d in waiting or d in {s.id for s in running.values()}]
                failed = [d for d in step.deps if finished.get(d, {}).get("state") not in (None, "done")]
                if failed:
                    from robustify.jobs.study.steps import skip_step

                    dep = finished[failed[0]]
                    del waiting[step.id]
                    record = skip_step(state_dir, step, f"{failed[0]} {dep['state']}: {dep.get('error', '')}")
                    finished[step.id] = record
                    on_end(step, record)
                elif not pending:
                    del waiting[step.id]
                    running[pool.submit(run_step, step, str(state_dir))] = step
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                step = running.pop(future)
                try:
                    record = future.result()
                except BrokenProcessPool:
                    record = {"state": INTERRUPTED, "error": "its worker process died"}
                    write_record(state_dir, step, record)
                    log_event(state_dir, step, INTERRUPTED, error=record["error"])
                except Exception as exc:  # noqa: BLE001 - a worker-side failure outside the step
                    record = {"state": FAILED, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                    write_record(state_dir, step, record)
                finished[step.id] = record
                on_end(step, record)
