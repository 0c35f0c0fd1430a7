"""torch.distributed helpers: run under ``torchrun`` and get the single-process result.

The rule: rank ``r`` of ``w`` processes the contiguous block :func:`shard` ``(n, r, w)`` of
the examples; per-example outputs are gathered in rank order with :func:`gather_examples`,
which therefore restores the original example order; calibration moments are gathered
and merged in rank order with Chan's formulas (:func:`robustify.defenses.meansparse.calibrate.merge_moments`). Works with the gloo
backend on CPU and nccl on GPUs (:func:`init_from_env` picks one).

Typical use in an evaluation engine::

    distributed.init_from_env()
    part = distributed.shard(len(x))                  # this rank's examples
    flags = evaluate_flags(x[part.start:part.stop])   # per-example booleans, same seeds per example
    flags = distributed.gather_examples(flags)        # every rank: all examples, in order
    if distributed.is_main(): write_csv(flags)

Single-process runs need no change: every helper is the identity when ``torch.distributed``
is not initialised.
"""

from __future__ import annotations
from robustify.core.errors import UserError

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "barrier",
    "broadcast_object",
    "gather_examples",
    "gather_variable",
    "init_from_env",
    "is_distributed",
    "is_main",
        "rank",
    "shard",
    "shard_indices",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the process that writes result files)."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if present.

    Reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``. The backend
    defaults to nccl when CUDA is available and gloo otherwise; with CUDA each process
    uses device ``LOCAL_RANK``. Returns True when running with more than one rank.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    logger.info("torch.distributed: rank %d of %d (%s)", rank(), world_size(), backend)
    return is_distributed()


def device_for_rank() -> torch.device:
    """The device this rank should use: ``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous block of ``range(n)`` that rank ``rank_`` of ``world`` processes.

    Blocks differ in size by at most one and concatenate, in rank order, to ``range(n)``.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise UserError(f"rank {r} is outside a world of size {w}")
    return range(r * n // w, (r + 1) * n // w)


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """:func:`shard` as an int64 index tensor."""
    part = shard(n, rank_, world)
    return torch.arange(part.start, part.stop, dtype=torch.int64)


def _collective_device(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_examples(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's per-example tensor (first dimension) in rank order.

    Ranks may hold different numbers of examples. Returned on every rank, on the device of
    ``local``. The identity when not distributed.
    """
    if not is_distributed():
        return local
    device = _collective_device(local)
    n_local = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n_local) for _ in range(world_size())]
    dist.all_gather(sizes, n_local)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    if local.dtype == torch.bool:  # gloo/nccl have no bool all_gather: go through uint8
        parts8 = [p.to(torch.uint8) for p in parts]
        dist.all_gather(parts8, padded.to(torch.uint8))
        parts = [p.bool() for p in parts8]
    else:
        dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(local.device)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (e.g. a run directory name). Identity when not distributed."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def gather_variable(local: torch.Tensor) -> list[torch.Tensor]:
    """All ranks' 1-D tensors (possibly of different lengths), in rank order."""
    device = _collective_device(local)
    n_local = torch.tensor([local.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n_local) for _ in range(world_size())]
    dist.all_gather(sizes, n_local)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), dtype=local.dtype, device=device)
    padded[: local.numel()] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return [p[:c].cpu() for p, c in zip(parts, counts)]
