"""What an evaluation costs: forward and backward passes counted by hooks on the model.

:class:`PassCounter` registers a forward hook on each model given; every forward adds the
rows of its output to ``forward``, and, when the output is part of a graph, an autograd hook
on it adds the rows of its gradient to ``backward`` each time a backward pass reaches it.
A pass over a batch of ``B`` examples counts ``B``: the figures are *example-passes*,
comparable across batch sizes and attacks. :func:`summarise` turns per-attack totals into
the ``cost`` entry of a ``result.json``: one entry per attack and per phase that is not an
attack (:data:`PHASES`: clean accuracy, and AutoAttack's own checks on the first batch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["CHECKS", "CLEAN", "PHASES", "PassCounter", "summarise"]

#: the ``cost`` entries that are not attacks: clean accuracy, and the checks: the model's logit width (1 forward
#: of the first batch) and AutoAttack's own (pyautoattack's ``checks.check_randomized``, ``check_range_output``,
#: ``check_dynamic``: 7 forwards of the first correctly classified batch)
CLEAN, CHECKS = "clean", "checks"
PHASES = (CLEAN, CHECKS)


class PassCounter:
    """Count forward and backward example-passes through ``models`` within a ``with`` block."""

    def __init__(self, *models: nn.Module | None) -> None:
        unique: dict[int, nn.Module] = {}
        for m in models:
            if m is not None:
                unique.setdefault(id(m), m)
        self.models = list(unique.values())
        self.forward = 0
        self.backward = 0
        self._handles: list[Any] = []
        self._depth = 0

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.backward += int(grad.shape[0]) if grad.dim() else 1

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._depth += 1

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth or not isinstance(output, torch.Tensor):
            return  # a model nested in another counted model is counted once, by the outer one
        self.forward += int(output.shape[0]) if output.dim() else 1
        if output.requires_grad:
            output.register_hook(self._on_backward)

    def __enter__(self) -> "PassCounter":
        for m in self.models:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._depth = 0


def summarise(forward: int, backward: int, seconds: float, examples: int) -> dict[str, Any]:
    """Totals and per-example figures of one attack (``examples``: how many it attacked)."""
    per = max(examples, 1)
    return {"forward": forward, "backward": backward, "seconds": round(seconds, 3), "examples": examples,
            "forward_per_example": round(forward / per, 2), "backward_per_example": round(backward / per, 2),
            "seconds_per_example": round(seconds / per, 4)}
