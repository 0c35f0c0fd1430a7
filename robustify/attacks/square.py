"""Square (Andriushchenko et al. 2020), the score-based black-box attack, through pyautoattack: ``square``,
configured as AutoAttack's standard version configures it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from robustify.attacks.autoattack import pyautoattack_factory
from robustify.attacks.base import AttackSpec, register_attack

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

__all__: list[str] = []


def _run(aa: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    aa.square.seed = aa.get_seed()
    return aa.square.perturb(x, y)


def _budget(config: AttackConfig) -> dict[str, Any]:
    return {"queries": config.square_queries}


register_attack(AttackSpec(name="square", kind="black-box", build=pyautoattack_factory("square", _run), budget=_budget,
                           budget_fields=("square_queries",), standard=True, autoattack=True))
