"""Calibrate MeanSparse statistics in a single pass: the "calibrate" step.

All sites are calibrated at once, on the activations of the unmodified model (every
MeanSparse module returns its input while calibrating), with exact merged moments, so the
result does not depend on batch size or order. No gradients are computed.

* Out of memory: a batch that fails is undone and split in halves (the smaller size is kept
  for the following batches and logged); exact moments make the result independent of it.
  ``stats_mode="official"`` statistics depend on the batch size: there the error is
  reported (:class:`~robustify.core.memory.OutOfMemory`) instead.
* Distributed (``torchrun``): each rank passes its own shard of the data (see
  :func:`robustify.core.distributed.shard`), and the per-rank moments (count, mean, M2) are
  gathered and merged in rank order before the statistics are set, on every rank.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustify.core.errors import UserError
from robustify.core import distributed
from robustify.core.memory import OutOfMemory, free_memory, is_oom, split_on_oom
from robustify.core.stats import RunningMoments
from robustify.defenses.meansparse.module import MeanSparse, meansparse_modules

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "calibrating"]


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[list[MeanSparse]]:
    """Put every MeanSparse module in statistics-collection mode (restored on exit)."""
    modules = list(meansparse_modules(model).values())
    if not modules:
        raise UserError("the model has no MeanSparse modules to calibrate: insert them first")
    for m in modules:
        m.reset_statistics()
        m.calibrating = True
    try:
        yield modules
    finally:
        for m in modules:
            m.calibrating = False


def _inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"]
    raise TypeError(f"calibration batches must be tensors or (x, y) pairs, got {type(batch).__name__}")


def _undoable_forward(model: nn.Module, modules: list[MeanSparse]) -> Any:
    """A forward pass that restores every module's statistics if it raises (e.g. OOM halfway)."""

    def step(x: torch.Tensor) -> int:
        saved = [(m.moments.snapshot(), len(m._official)) for m in modules]
        try:
            model(x)
        except BaseException:
            for m, (moments, n_official) in zip(modules, saved):
                m.moments = moments
                del m._official[n_official:]
            raise
        return int(x.shape[0])

    return step


def _whole_batch(step: Any, x: torch.Tensor) -> list[int]:
    """``step(x)`` on the batch as it is: "official" statistics depend on the batch size."""
    try:
        return [step(x)]
    except Exception as error:  # noqa: BLE001 - only OOMs are translated, others re-raised
        if not is_oom(error):
            raise
        free_memory()
        raise OutOfMemory(
            f"calibration: out of memory with batch size {len(x)}; stats_mode='official' statistics depend on "
            "the batch size, so it is not reduced: pass a smaller calibration batch size (other statistics) "
            "or use stats_mode='exact'"
        ) from error


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    total: int | None = None,
    sync: bool | None = None,
) -> dict[str, int]:
    """One no-grad pass over ``batches``; sets every MeanSparse site's mean and variance.

    Args:
        model: a model with inserted MeanSparse modules.
        batches: an iterable of input tensors or ``(x, y)`` pairs (e.g. a DataLoader). Under
            ``torchrun``, each rank passes its own shard.
        device: where to run the forward passes (default: the model's device).
        progress: show a progress bar.
        total: number of batches, for the progress bar when ``batches`` has no length.
        sync: merge the moments of all ranks of the default process group before setting
            the statistics (default: when ``torch.distributed`` is initialised with more
            than one rank).

    Returns:
        the number of values each site's statistics were computed from, by site (over all
        ranks when synchronised).
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if sync is None:
        sync = distributed.world_size() > 1
    was_training = model.training
    model.eval()
    n_images = 0
    oom_state: dict[str, int] = {}
    try:
        with calibrating(model) as modules, torch.no_grad():
            step = _undoable_forward(model, modules)
            official = any(m.stats_mode == "official" for m in modules)
            for batch in tqdm(batches, desc="calibrate", unit="batch", total=total, disable=not progress):
                x = _inputs(batch).to(device, non_blocking=True)
                done = _whole_batch(step, x) if official else split_on_oom(step, x, what="calibration", state=oom_state)
                n_images += sum(done)
            if sync:
                n_images = merge_moments(modules, n_images)
            if n_images == 0:
                raise UserError("calibration data is empty")
            for m in modules:
                m.finalize()
    finally:
        model.train(was_training)
    counts = {site: m.moments.count for site, m in meansparse_modules(model).items()}
    logger.info("calibrated %d MeanSparse site(s) on %d images", len(modules), n_images)
    return counts


def _pack(modules: Sequence[MeanSparse], n_images: int) -> torch.Tensor:
    """One float64 vector: images, then per module ``[count, mean(C), M2(C)]``."""
    parts = [torch.tensor([float(n_images)], dtype=torch.float64)]
    for m in modules:
        mo = m.moments
        if mo.count and mo.mean is not None and mo.m2 is not None:
            mean, m2 = mo.mean.detach().cpu(), mo.m2.detach().cpu()
        else:
            mean = m2 = torch.zeros(m.channels, dtype=torch.float64)
        parts += [torch.tensor([float(mo.count)], dtype=torch.float64), mean.reshape(-1), m2.reshape(-1)]
    return torch.cat(parts)


def merge_moments(modules: Sequence[MeanSparse], n_images: int) -> int:
    """Replace every module's moments by the merge of all ranks' moments, in rank order.

    Exact ("exact" mode): counts add, means and M2 combine with Chan's formulas. The
    published averaging ("official" mode) concatenates the ranks' per-batch statistics.
    Returns the total number of images over all ranks. Identity when not distributed.
    """
    if not distributed.is_distributed():
        return n_images
    vectors = distributed.gather_variable(_pack(modules, n_images))
    total_images = 0
    merged = [RunningMoments() for _ in modules]
    for vec in vectors:  # rank order
        total_images += int(vec[0].item())
        offset = 1
        for acc, m in zip(merged, modules):
            c = m.channels
            count = int(vec[offset].item())
            mean = vec[offset + 1 : offset + 1 + c]
            m2 = vec[offset + 1 + c : offset + 1 + 2 * c]
            offset += 1 + 2 * c
            acc.merge(count, mean, m2)
    for acc, m in zip(merged, modules):
        device = m.mean.device
        if acc.mean is not None and acc.m2 is not None:
            acc.mean, acc.m2 = acc.mean.to(device), acc.m2.to(device)
        m.moments = acc
        if m.stats_mode == "official":
            local = torch.stack(m._official).reshape(-1).cpu() if m._official else torch.zeros(0, dtype=torch.float64)
            everything = torch.cat(distributed.gather_variable(local)).view(-1, 2, m.channels)
            m._official = [t.to(device) for t in everything]
    return total_images
