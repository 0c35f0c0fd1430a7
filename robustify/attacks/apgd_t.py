"""APGD-T (Croce & Hein 2020): targeted APGD on the DLR loss towards the top target classes, through
pyautoattack, as in AutoAttack's standard suite (9 targets; 5 for L1).

``apgd_t_targeting="malt"`` (``--targets malt``) picks the targets by MALT's estimate of the nearest decision
boundaries instead of by logit (:mod:`robustify.attacks.malt`); BPDA-APGD-T runs the same targeting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from robustify.attacks.autoattack import PyAutoAttack, shared_autoattack
from robustify.attacks.base import Attack, AttackSpec, register_attack
from robustify.attacks.malt import malt_targets, targeted_apgd

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

__all__: list[str] = []


def _run(aa: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    aa.apgd_targeted.seed = aa.get_seed()
    return aa.apgd_targeted.perturb(x, y)


def _run_malt(aa: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    apgd = aa.apgd_targeted
    apgd.seed = aa.get_seed()
    x, y = x.to(apgd.device), y.to(apgd.device)
    return targeted_apgd(apgd, x, y, malt_targets(apgd.model, x, y, apgd.norm, apgd.n_target_classes))


def _build(model: Any, config: AttackConfig, device: Any, source_model: Any, autoattack: Any) -> Attack:
    run = _run_malt if config.apgd_t_targeting == "malt" else _run
    return PyAutoAttack("apgd-t", shared_autoattack(model, config, device, autoattack), run)


def _budget(config: AttackConfig) -> dict[str, Any]:
    """Iterations and targets; the targeting where it is not AutoAttack's (the budgets of earlier rows stay as they were)."""
    budget: dict[str, Any] = {"iters": config.apgd_t_iters, "targets": config.apgd_t_targets}
    if config.apgd_t_targeting != "top-logit":
        budget["targeting"] = config.apgd_t_targeting
    return budget


register_attack(AttackSpec(name="apgd-t", kind="white-box", build=_build, budget=_budget,
                           budget_fields=("apgd_t_iters", "apgd_t_targets", "apgd_t_targeting"), standard=True,
                           autoattack=True, eot=True))
