"""SAT's SmoothReLU (Xie et al. 2020) as the ``smoothrelu`` defense.

``relu(x - log(alpha*|x| + 1)/alpha)`` with ``alpha = b**2`` and ``b`` a learnable scalar
initialised to 20 (``spec_modules.md`` section 4): zero for x <= 0, ``x - log(alpha x + 1)/alpha``
above, smooth at 0 (the derivative rises from 0 to 1 over roughly 1/alpha). It swaps the
selected activations (every ReLU by default) with the machinery of
:mod:`robustify.defenses.activations.swaps`, and registers itself in :mod:`robustify.defenses`, so training,
evaluation, saving and loading go through the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustify.core.errors import UserError
from robustify.defenses.activations.swaps import ParametricActivation, swap_handler
from robustify.core.config import SerializableConfig
from robustify.defenses.registry import register_defense
from robustify.defenses.sites import register_activation

__all__ = ["SmoothReLU", "SmoothReLUConfig"]


class SmoothReLU(ParametricActivation):
    """``relu(x - log(b^2 |x| + 1) / b^2)`` with a learnable scalar ``b``."""

    PARAMS: ClassVar[tuple[str, ...]] = ("b",)

    def __init__(self, b: float | nn.Parameter = 20.0) -> None:
        nn.Module.__init__(self)
        self.b = b if isinstance(b, nn.Parameter) else nn.Parameter(torch.tensor([float(b)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.b * self.b
        return F.relu(x - torch.log1p(alpha * x.abs()) / alpha)


register_activation(SmoothReLU)


@dataclass(frozen=True)
class SmoothReLUConfig(SerializableConfig):
    """Where SmoothReLU replaces activations.

    Attributes:
        name: always ``"smoothrelu"``.
        replace: class names of the activations to swap (default: every ReLU, as SAT).
        include: glob patterns of site names to keep.
        exclude: glob patterns of site names to skip.
        shared: one ``b`` for all sites, else one per site (default) [inferred].
        b_init: initial ``b`` (20 in SAT: alpha starts at 400).
    """

    VERSION: ClassVar[int] = 1
    name: str = "smoothrelu"
    replace: tuple[str, ...] = ("ReLU",)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    shared: bool = False
    b_init: float = 20.0

    def __post_init__(self) -> None:
        if self.name != "smoothrelu":
            raise UserError(f"SmoothReLUConfig is the 'smoothrelu' defense, got name {self.name!r}")
        if self.b_init == 0:
            raise UserError("b_init must be non-zero (alpha = b^2 = 0 divides by zero)")
        for name in ("replace", "include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    @property
    def parametric(self) -> bool:
        return True

    def make(self) -> nn.Module:
        return SmoothReLU(self.b_init)


register_defense(swap_handler(("smoothrelu",), SmoothReLUConfig, learnable=frozenset({"smoothrelu"})))
