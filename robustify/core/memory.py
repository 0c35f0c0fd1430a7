"""Automatic batch-size backoff on out-of-memory errors.

:func:`run_batched` runs a function over ``n`` examples in batches; when a batch raises an
out-of-memory error (``torch.OutOfMemoryError``, or a ``RuntimeError`` whose message says
CUDA/MPS/CPU allocation failed) it frees cached memory, halves the batch size and retries the
same examples. The batch size that finally works is logged and kept for the remaining
batches. Results are collected per example range, so the outcome does not depend on the
batch size for functions that treat examples independently.

Example (the evaluation engine's use)::

    def attack(start: int, stop: int) -> torch.Tensor:
        return adversary.run(x[start:stop], y[start:stop])

    flags = torch.cat(run_batched(attack, len(x), batch_size=256))
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from robustify.core.errors import UserError
from robustify.core.errors import OutOfMemory

logger = logging.getLogger(__name__)

__all__ = ["BatchPlan", "OutOfMemory", "free_memory", "is_oom", "run_batched", "split_on_oom"]

T = TypeVar("T")

_OOM_MESSAGES = (
    "out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "MPS backend out of memory",
)


def is_oom(error: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and allocation-failure ``RuntimeError``s (CUDA, CPU, MPS)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    if isinstance(error, (RuntimeError, MemoryError)):
        message = str(error)
        return isinstance(error, MemoryError) or any(m in message for m in _OOM_MESSAGES)
    return False


def free_memory() -> None:
    """Collect garbage and release cached accelerator memory after an OOM."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class BatchPlan(Generic[T]):
    """What :func:`run_batched` did: results per batch, and the batch sizes used."""

    results: list[T] = field(default_factory=list)
    batch_size: int = 0
    backoffs: list[int] = field(default_factory=list)


def run_batched(
    fn: Callable[[int, int], T],
    n: int,
    batch_size: int,
    *,
    min_batch_size: int = 1,
    what: str = "batch",
    plan: BatchPlan[T] | None = None,
) -> list[T]:
    """Call ``fn(start, stop)`` over ``[0, n)`` in batches, halving the batch size on OOM.

    Args:
        fn: processes examples ``start:stop`` and returns a result for them; it must have no
            side effect that survives an OOM halfway through (or undo it itself).
        n: number of examples.
        batch_size: the batch size to try first.
        min_batch_size: give up (raise :class:`OutOfMemory`) below this size.
        what: a name for log messages (e.g. ``"apgd-ce"``, ``"calibration"``).
        plan: optional :class:`BatchPlan` that receives the results and the sizes used.

    Returns:
        the results of ``fn``, one per batch, in example order.
    """
    if batch_size < 1 or min_batch_size < 1:
        raise UserError(f"batch sizes must be >= 1, got batch_size={batch_size}, min_batch_size={min_batch_size}")
    plan = plan if plan is not None else BatchPlan()
    size = batch_size
    start = 0
    while start < n:
        stop = min(n, start + size)
        try:
            result = fn(start, stop)
        except Exception as error:  # noqa: BLE001 - only OOMs are handled, others re-raised
            if not is_oom(error):
                raise
            size = _halve(size, stop - start, min_batch_size, what, error)
            plan.backoffs.append(size)
            continue
        plan.results.append(result)
        start = stop
    plan.batch_size = size
    if size != batch_size:
        logger.info("%s: ran with batch size %d (requested %d, reduced after out-of-memory)", what, size, batch_size)
    return plan.results


def _halve(size: int, attempted: int, min_batch_size: int, what: str, error: BaseException) -> int:
    free_memory()
    new = min(size, attempted) // 2
    if new < min_batch_size:
        raise OutOfMemory(
            f"{what}: out of memory even with batch size {attempted} (minimum {min_batch_size}): {error}"
        ) from error
    logger.warning("%s: out of memory with batch size %d; retrying with batch size %d", what, attempted, new)
    return new


def split_on_oom(
    fn: Callable[[torch.Tensor], T],
    x: torch.Tensor,
    *,
    min_batch_size: int = 1,
    what: str = "batch",
    state: dict[str, int] | None = None,
) -> list[T]:
    """Run ``fn`` on ``x``, or on consecutive slices of it if ``x`` at once runs out of memory.

    ``state["batch_size"]`` (if given) remembers the largest size that worked, so the next
    call starts from it instead of failing again.
    """
    state = state if state is not None else {}
    size = min(len(x), state.get("batch_size", len(x))) or 1
    plan: BatchPlan[T] = BatchPlan()
    results = run_batched(lambda a, b: fn(x[a:b]), len(x), size, min_batch_size=min_batch_size, what=what, plan=plan)
    if plan.backoffs:
        state["batch_size"] = plan.batch_size
    return results
