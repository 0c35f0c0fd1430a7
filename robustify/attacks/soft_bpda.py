"""Soft BPDA: APGD-CE back-propagating through each defense's smooth surrogate (the ``soft_backward`` hook)
instead of the identity, its temperature annealed: ``soft-bpda``."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustify.attacks.autoattack import _set_apgd_iters, shared_autoattack
from robustify.attacks.base import Attack, AttackSpec, register_attack
from robustify.defenses.registry import soft_backward

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

__all__ = ["SOFT_BPDA_TEMPERATURES", "SoftBPDA"]

#: soft-BPDA's temperatures (relative to each band's half-width), one APGD-CE stage each
SOFT_BPDA_TEMPERATURES = (1.0, 0.3, 0.1)


class SoftBPDA(Attack):
    """APGD-CE through the smooth surrogate of every defense that has one, temperature annealed.

    One APGD-CE run (``apgd_iters`` iterations) per temperature of
    :data:`SOFT_BPDA_TEMPERATURES`, from hot (smooth, informative gradients inside the band)
    to cold (close to the true band); each stage starts from the previous stage's
    highest-loss point. Per example the first adversarial point found is returned (else
    the last stage's best). The forward is always the true model's.

    It runs a copy of the AutoAttack's APGD at the budget it was built with: pyautoattack's L1
    schedule (``use_largereps``) leaves the shared object with its last stage's iterations and eps.
    """

    name = "soft-bpda"

    def __init__(self, model: nn.Module, aa: Any, temperatures: tuple[float, ...] = SOFT_BPDA_TEMPERATURES):
        self.model, self.aa, self.temperatures = model, aa, temperatures

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        apgd = copy.copy(self.aa.apgd)  # its own: an L1 APGD-CE run left n_iter at its last stage's
        _set_apgd_iters(apgd, apgd.n_iter_orig)
        apgd.eps = apgd.eps_orig
        apgd.loss, apgd.seed = "ce", self.aa.get_seed()
        x = x.detach().clone().float()
        apgd.init_hyperparam(x)
        torch.random.manual_seed(apgd.seed)
        adv, start = x.clone(), None
        with torch.no_grad():
            todo = self.model(x).argmax(1) == y
        for temperature in self.temperatures:
            if not todo.any():
                break
            idx = todo.nonzero().flatten()
            with soft_backward(self.model, temperature):
                best, acc, _, best_adv = apgd.attack_single_run(x[idx], y[idx],
                                                                x_init=None if start is None else start[idx])
            fooled = acc == 0
            adv[idx[fooled]] = best_adv[fooled]
            start = adv.clone() if start is None else start
            start[idx] = torch.where(fooled.view(-1, *[1] * (x.dim() - 1)), best_adv, best)
            todo[idx[fooled]] = False
        return adv


def _build(model: nn.Module, config: AttackConfig, device: Any, source_model: nn.Module | None,
           autoattack: Any) -> Attack:
    return SoftBPDA(model, shared_autoattack(model, config, device, autoattack))


def _budget(config: AttackConfig) -> dict[str, Any]:
    return {"iters": config.apgd_iters, "stages": len(SOFT_BPDA_TEMPERATURES),
            "temperatures": "/".join(f"{t:g}" for t in SOFT_BPDA_TEMPERATURES)}


register_attack(AttackSpec(name="soft-bpda", kind="adaptive", build=_build, budget=_budget,
                           budget_fields=("apgd_iters",), requires="soft_backward", eot=True))
