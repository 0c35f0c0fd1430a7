"""FAB-T (Croce & Hein 2020, targeted) through pyautoattack: ``fab-t``, configured as AutoAttack's
standard version configures it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from robustify.attacks.autoattack import pyautoattack_factory
from robustify.attacks.base import AttackSpec, register_attack

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

__all__: list[str] = []


def _run(aa: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    aa.fab.targeted = True
    aa.fab.n_restarts = 1
    aa.fab.seed = aa.get_seed()
    return aa.fab.perturb(x, y)


def _budget(config: AttackConfig) -> dict[str, Any]:
    return {"iters": config.fab_iters, "targets": config.fab_targets}


register_attack(AttackSpec(name="fab-t", kind="white-box", build=pyautoattack_factory("fab-t", _run), budget=_budget,
                           budget_fields=("fab_iters", "fab_targets"), standard=True, autoattack=True))
