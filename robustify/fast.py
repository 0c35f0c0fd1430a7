"""Compiled/fused path and mixed precision for robustified models.

* :func:`compile_model` wraps ``torch.compile``. Under compilation every MeanSparse module
  emits the plain ``where(|x - mean| < crop, mean, x)`` formula (its eager fast path is
  skipped), which inductor fuses with the following activation, and with the preceding
  batch norm, into one pointwise kernel: the threshold is folded into the activation and
  costs no extra pass over memory. BPDA mode compiles too (an ``autograd.Function``).
  Modes (``calibrating``, ``straight_through``, ``enabled``, ``alpha``) are Python
  attributes: changing one triggers a recompilation (a dynamo guard), never a wrong result.
  Measured on a 2-core CPU (benchmarks/results/bench_meansparse.csv, aa-resnet18 batch 128,
  one graph, no graph break): compiled forward costs the same as the compiled base model
  (ratio 0.996), but compiled forward+backward costs +40% over the compiled base (inductor's
  CPU backward of the masked ``where``), more than the eager fast path (+12%); on CPU, run
  attacks eagerly. Compiled and eager outputs agree to float32 rounding (inductor reorders
  the batch-norm arithmetic), so a value within rounding of a band edge may be treated
  differently by the two paths.
* :func:`autocast` runs evaluation in bf16/fp16 (``torch.autocast``) while MeanSparse
  statistics stay float32 buffers (moments float64); the thresholds are cast to the
  activation dtype exactly as the reference formula would.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["autocast", "compile_model"]


def compile_model(
    model: nn.Module,
    *,
    mode: str | None = None,
    dynamic: bool | None = False,
    fullgraph: bool = False,
    backend: str = "inductor",
    **options: Any,
) -> nn.Module:
    """``torch.compile(model)`` with defaults suited to evaluation (static batch shapes).

    Args:
        model: a (robustified) model; it is not modified.
        mode: ``torch.compile`` mode (``None``, ``"reduce-overhead"``, ``"max-autotune"``).
        dynamic: compile for dynamic shapes (default False: attacks use fixed batches; the
            last, smaller batch compiles once more).
        fullgraph: require a single graph (raise on graph breaks).
        backend: ``torch.compile`` backend.
        **options: passed to ``torch.compile``.

    Returns:
        the compiled module (shares parameters and buffers with ``model``).
    """
    logger.info("compiling %s with torch.compile(backend=%s, mode=%s)", type(model).__name__, backend, mode)
    return torch.compile(model, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend, **options)


@contextlib.contextmanager
def autocast(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """Mixed-precision evaluation: ``torch.autocast`` for ``device`` with ``dtype``.

    MeanSparse statistics are untouched (float32 buffers); inside the block activations
    arrive in ``dtype`` and the thresholds are applied in ``dtype``.
    """
    device_type = torch.device(device).type
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield
