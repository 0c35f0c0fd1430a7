"""APGD-T (Croce & Hein 2020): targeted APGD on the DLR loss towards the top target classes, through
pyautoattack, as in AutoAttack's standard suite (9 targets; 5 for L1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from robustify.attacks.autoattack import pyautoattack_factory
from robustify.attacks.base import AttackSpec, register_attack

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

__all__: list[str] = []


def _run(aa: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    aa.apgd_targeted.seed = aa.get_seed()
    return aa.apgd_targeted.perturb(x, y)


def _budget(config: AttackConfig) -> dict[str, Any]:
    return {"iters": config.apgd_t_iters, "targets": config.apgd_t_targets}


register_attack(AttackSpec(name="apgd-t", kind="white-box", build=pyautoattack_factory("apgd-t", _run), budget=_budget,
                           budget_fields=("apgd_t_iters", "apgd_t_targets"), standard=True, autoattack=True,
                           eot=True))
