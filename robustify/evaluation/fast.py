"""Compiled/fused path and mixed precision for robustified models.

* :func:`compile_model` wraps ``torch.compile``. It first runs the ``fuse`` hook of every defense in the
  model (:func:`fuse_defenses`; MeanSparse's, :func:`robustify.defenses.meansparse.insert.fuse_meansparse`,
  turns each ReLU hosting a MeanSparse into a
  :class:`~robustify.defenses.meansparse.module.MeanSparseReLU`, same state-dict keys, same eager results).
  Under compilation the pair is ``relu(where(|x - mean| < crop, mean, x))``, which inductor
  fuses with the preceding batch norm into one pointwise kernel: the threshold is folded
  into the activation. Its backward recomputes the band from the ReLU output, which the
  next layer keeps anyway, so nothing extra is saved for the backward pass (the unfused
  formula saves a boolean mask per site, and inductor's CPU code stores boolean tensors
  about ten times slower than float ones: +40% forward+backward before this fusion).
  Other activations (SiLU, GELU, ...) compile the plain formula. BPDA mode compiles too
  (an ``autograd.Function``). Modes (``calibrating``, ``straight_through``, ``enabled``,
  ``alpha``) are Python attributes: changing one triggers a recompilation (a dynamo
  guard), never a wrong result. Compiled and eager outputs agree to float32 rounding
  (inductor reorders the batch-norm arithmetic), so a value within rounding of a band
  edge may be treated differently by the two paths. Measured cost:
  ``benchmarks/results/bench_meansparse.csv``.
* :func:`autocast` runs evaluation in bf16/fp16 (``torch.autocast``) while MeanSparse
  statistics stay float32 buffers (moments float64); the band is tested in float32 (the
  activation promoted, as RobustBench's ``MeanSparse`` does) and the output keeps the activation dtype.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from robustify.core.errors import UserError
from robustify.defenses.registry import with_hook

logger = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "AutocastModel", "autocast", "compile_model", "for_evaluation", "fuse_defenses"]

#: ``--precision`` names and their autocast dtypes (None: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fuse_defenses(model: nn.Module) -> nn.Module:
    """Run the ``fuse`` hook (the convert step before compiling) of every defense in ``model``, in place."""
    for defense in with_hook(model, "fuse"):
        defense.fuse(model)  # type: ignore[misc]
    return model


def compile_model(
    model: nn.Module,
    *,
    mode: str | None = None,
    dynamic: bool | None = False,
    fullgraph: bool = False,
    backend: str = "inductor",
    fuse: bool = True,
    **options: Any,
) -> nn.Module:
    """``torch.compile(model)`` with defaults suited to evaluation (static batch shapes).

    Args:
        model: a (robustified) model. Its only change is its defenses' ``fuse`` step (``fuse``), which keeps
            its state dict and eager behaviour.
        mode: ``torch.compile`` mode (``None``, ``"reduce-overhead"``, ``"max-autotune"``).
        dynamic: compile for dynamic shapes (default False: attacks use fixed batches; the
            last, smaller batch compiles once more).
        fullgraph: require a single graph (raise on graph breaks).
        backend: ``torch.compile`` backend.
        fuse: run the defenses' ``fuse`` hooks first (:func:`fuse_defenses`).
        **options: passed to ``torch.compile``.

    Returns:
        the compiled module (shares parameters and buffers with ``model``).
    """
    if fuse:
        fuse_defenses(model)
    logger.info("compiling %s with torch.compile(backend=%s, mode=%s)", type(model).__name__, backend, mode)
    return torch.compile(model, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend, **options)


@contextlib.contextmanager
def autocast(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """Mixed-precision evaluation: ``torch.autocast`` for ``device`` with ``dtype``.

    MeanSparse statistics are untouched (float32 buffers); inside the block activations
    arrive in ``dtype``, the band is tested in float32 (as RobustBench's module) and outputs stay in ``dtype``.
    """
    device_type = torch.device(device).type
    if dtype not in (torch.bfloat16, torch.float16):
        raise UserError(f"autocast dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


class AutocastModel(nn.Module):
    """Runs ``model`` under :func:`autocast` and returns float32 logits (attack losses stay float32).

    MeanSparse modules stay reachable (``meansparse_modules``, ``bpda``, ...) through it.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device_type = torch.device(device).type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device_type, self.dtype):
            out = self.model(x)
        return out.float()


def for_evaluation(
    model: nn.Module, *, compile: bool = False, precision: str = "float32", device: torch.device | str = "cpu"
) -> nn.Module:
    """The model as attacks should call it: fused, optionally in mixed precision and/or compiled.

    Args:
        model: a (robustified) model; its defenses' ``fuse`` step runs in place (:func:`fuse_defenses`;
            MeanSparse: each MeanSparse+ReLU pair fused, same state dict, same results).
        compile: wrap with :func:`compile_model`.
        precision: ``float32`` (default), ``bfloat16`` or ``float16`` (autocast; statistics stay float32).
        device: the device the model runs on (for autocast).
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    fuse_defenses(model)
    dtype = PRECISIONS[precision]
    if dtype is not None:
        model = AutocastModel(model, dtype, device)
    # attacks call the model on shrinking subsets (APGD-T, FAB, the last batch): let dynamo
    # turn a recompiled shape dynamic instead of compiling every batch size anew
    return compile_model(model, dynamic=None, fuse=False) if compile else model  # fused above
