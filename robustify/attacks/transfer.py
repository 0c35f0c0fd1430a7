"""The transfer attack: APGD-CE crafted on a source model (default: the attacked model with its defenses
switched off, the ``disabled`` hook), evaluated on the attacked one: ``transfer``. It is crafted without EoT
(the attacked model's randomness never enters its gradients; a random source is attacked as it is)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustify.attacks.autoattack import make_autoattack
from robustify.attacks.base import Attack, AttackSpec, register_attack
from robustify.defenses.registry import disabled

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

__all__ = ["TransferAttack"]


class _BaseModelView(nn.Module):
    """The defended model with every defense that can be switched off disabled: the undefended base model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with disabled(self.model):
            return self.model(x)


class TransferAttack(Attack):
    """APGD-CE crafted on a source model (default: the undefended base model)."""

    name = "transfer"

    def __init__(self, source: Callable[[torch.Tensor], torch.Tensor], config: AttackConfig, device: Any):
        self.aa = make_autoattack(source, dataclasses.replace(config, eot_iter=None), device)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.aa.apgd.loss = "ce"
        self.aa.apgd.seed = self.aa.get_seed()
        return self.aa.apgd.perturb(x, y)


def _build(model: nn.Module, config: AttackConfig, device: Any, source_model: nn.Module | None,
           autoattack: Any) -> Attack:
    source = source_model if source_model is not None else _BaseModelView(model)
    return TransferAttack(source, config, device)


def _budget(config: AttackConfig) -> dict[str, Any]:
    return {"iters": config.apgd_iters, "restarts": config.apgd_restarts}


register_attack(AttackSpec(name="transfer", kind="black-box", build=_build, budget=_budget,
                           budget_fields=("apgd_iters", "apgd_restarts"), requires="disabled", applied_only=True))
