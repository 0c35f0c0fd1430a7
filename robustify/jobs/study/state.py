"""A study directory's state: the controller lock, one record per step, an event log, each cell's state.

``<out>/study/`` holds ``controller.lock`` (held by the running controller, with its pid),
``steps/<step>.json`` (the last state of each step: running, done, failed, interrupted, skipped; its time,
error and the journal batches it resumed from) and ``events.jsonl`` (every start and end, appended). A cell is
done when its ``result.json`` is the cell's finished result (:func:`robustify.jobs.study.plan.result_mismatch`),
whoever wrote it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustify.core.errors import UserError
from robustify.core.io import write_json
from robustify.defenses.file import read_sidecar
from robustify.evaluation.cost import total_passes
from robustify.evaluation.journal import JOURNAL_FILE
from robustify.evaluation.results import RESULT_FILE, read_result_file
from robustify.jobs.study.plan import CALIBRATE, Cell, Plan, Step, result_mismatch

__all__ = ["CellState", "StudyLockedError", "cell_states", "controller_lock", "controller_running", "journal_batches",
           "log_event", "read_record", "step_done", "write_record"]

LOCK_FILE = "controller.lock"
EVENTS_FILE = "events.jsonl"
RUNNING, DONE, FAILED, INTERRUPTED, SKIPPED, PENDING, PARTIAL = (
    "running", "done", "failed", "interrupted", "skipped", "pending", "partial")


class StudyLockedError(UserError, RuntimeError):
    """Another controller is running the study in this directory."""


@contextlib.contextmanager
def controller_lock(state_dir: Path) -> Iterator[None]:
    """Hold ``<state_dir>/controller.lock`` (an fcntl lock, released when the process dies, even by kill -9);
    a second controller gets :class:`StudyLockedError` at once, naming the first one's pid and host."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    with open(path, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise StudyLockedError(f"another controller ({holder}) is running the study in {state_dir.parent}; "
                                   "wait for it to end or stop it, then rerun") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        try:
            yield
        finally:
            lock.seek(0)
            lock.truncate()
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def controller_running(state_dir: Path) -> bool:
    """Whether a controller holds the study's lock now."""
    import fcntl

    path = state_dir / LOCK_FILE
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return False


def _record_path(state_dir: Path, step: Step) -> Path:
    return state_dir / "steps" / f"{step.file_name}.json"


def read_record(state_dir: Path, step: Step) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(state_dir, step).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_record(state_dir: Path, step: Step, record: dict[str, Any]) -> None:
    write_json(_record_path(state_dir, step), {"step": step.id, "kind": step.kind, **record})


def log_event(state_dir: Path, step: Step, event: str, **extra: Any) -> None:
    """Append one line to ``events.jsonl`` (small appends from several processes stay whole lines)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), "step": step.id, "kind": step.kind, "event": event,
                       "host": socket.gethostname(), "pid": os.getpid(), **extra}) + "\n"
    with open(state_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
        f.write(line)


def events(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / EVENTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def journal_batches(directory: Path) -> int:
    """The finished batches in ``directory``'s evaluation journal (0 without one)."""
    path = directory / JOURNAL_FILE
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.endswith("}"))


def _read_result(cell: Cell) -> dict[str, Any] | None:
    """The cell's result.json (None where there is none, or it cannot be read)."""
    try:
        return read_result_file(cell.out / RESULT_FILE)
    except UserError:
        return None


def step_done(plan: Plan, step: Step) -> bool:
    """Whether ``step``'s product exists: its calibration file, or its cell's finished result.json."""
    if step.kind == CALIBRATE:
        try:
            read_sidecar(step.path)
        except Exception:  # noqa: BLE001 - missing or damaged: not done
            return False
        return True
    cell = next(c for c in plan.cells if c.id == step.cell)
    result = _read_result(cell)
    return result is not None and result_mismatch(cell, result) is None


@dataclass(frozen=True)
class CellState:
    """One row of ``robustify study status``: ``batches`` finished in its evaluation journal, ``passes`` the
    forward + backward example-passes of its finished result (None until it is done)."""

    cell: str
    state: str
    seconds: float | None
    batches: int
    passes: int | None
    error: str


def cell_states(plan: Plan) -> list[CellState]:
    """Each cell's state: done, failed, skipped, running, interrupted, partial (a journal, no record) or pending."""
    rows = []
    alive = controller_running(plan.state_dir)
    for cell in plan.cells:
        step = plan.cell_step(cell)
        record = read_record(plan.state_dir, step) or {}
        batches = journal_batches(cell.out)
        result = _read_result(cell)
        passes = None
        if result is not None and result_mismatch(cell, result) is None:
            state, error, passes = DONE, "", total_passes(result.get("cost"))
            seconds = record.get("seconds") if record.get("state") == DONE else result.get("seconds")
            if isinstance(seconds, dict):
                seconds = sum(v for v in seconds.values() if isinstance(v, (int, float)))
        else:
            state = record.get("state") or (PARTIAL if batches else PENDING)
            seconds, error = record.get("seconds"), record.get("error", "")
            if state == RUNNING and not alive and "slurm_job" not in record:  # its controller (and workers) died
                state, error = INTERRUPTED, "its controller stopped: rerun to resume"
            if result is not None and state == PENDING:
                state, error = FAILED, f"its directory holds another evaluation ({result_mismatch(cell, result)})"
        rows.append(CellState(cell=cell.id, state=state, seconds=seconds, batches=batches, passes=passes,
                              error=error))
    return rows
