"""APGD (Croce & Hein 2020) through pyautoattack: ``apgd-ce``, ``apgd-dlr`` (untargeted) and ``apgd-t``
(targeted DLR), configured as AutoAttack's standard version configures them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustify.attacks.autoattack import PyAutoAttack, RunAttack, shared_autoattack
from robustify.attacks.base import Attack, AttackFactory, AttackSpec, register_attack

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

__all__: list[str] = []


def _untargeted(loss: str) -> RunAttack:
    def run(aa: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        aa.apgd.loss = loss
        aa.apgd.seed = aa.get_seed()
        return aa.apgd.perturb(x, y)

    return run


def _targeted(aa: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    aa.apgd_targeted.seed = aa.get_seed()
    return aa.apgd_targeted.perturb(x, y)


def _factory(name: str, run: RunAttack) -> AttackFactory:
    def build(model: nn.Module, config: AttackConfig, device: Any, source_model: nn.Module | None,
              autoattack: Any) -> Attack:
        return PyAutoAttack(name, shared_autoattack(model, config, device, autoattack), run)

    return build


def _untargeted_budget(config: AttackConfig) -> dict[str, Any]:
    return {"iters": config.apgd_iters, "restarts": config.apgd_restarts}


def _targeted_budget(config: AttackConfig) -> dict[str, Any]:
    return {"iters": config.apgd_t_iters, "targets": config.apgd_t_targets}


register_attack(AttackSpec(name="apgd-ce", kind="white-box", build=_factory("apgd-ce", _untargeted("ce")),
                           budget=_untargeted_budget, budget_fields=("apgd_iters", "apgd_restarts"), standard=True,
                           autoattack=True))
register_attack(AttackSpec(name="apgd-dlr", kind="white-box", build=_factory("apgd-dlr", _untargeted("dlr")),
                           budget=_untargeted_budget, budget_fields=("apgd_iters", "apgd_restarts"), standard=True))
register_attack(AttackSpec(name="apgd-t", kind="white-box", build=_factory("apgd-t", _targeted),
                           budget=_targeted_budget, budget_fields=("apgd_t_iters", "apgd_t_targets"), standard=True,
                           autoattack=True))
