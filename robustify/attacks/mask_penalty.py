"""The MeanSparse paper's adaptive attack (Amini et al. 2024, appendix A.4, reconstructed) and plain PGD with
its budget: ``adaptive`` (PGD on cross-entropy minus a penalty on changes of the units the defense blocks,
read through the ``site_inputs`` hook) and ``pgd`` (lambda = 0). Both run :func:`~robustify.attacks.pgd.pgd`,
adversarial training's attack too."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from robustify.attacks.base import Attack, AttackFactory, AttackSpec, register_attack
from robustify.attacks.pgd import pgd
from robustify.defenses.registry import blocked, site_inputs

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

logger = logging.getLogger(__name__)

__all__ = ["MaskPenaltyPGD"]


class MaskPenaltyPGD(Attack):
    """The MeanSparse paper's adaptive attack (appendix A.4, reconstructed), for any defense with site inputs.

    Maximises ``CE(f(x+d), y) - lambda * sum_l ||M_l * (z_l(x+d) - z_l(x))||_2`` by PGD with
    a random start (:func:`~robustify.attacks.pgd.pgd`), where ``z_l`` is the input of defense site ``l``
    and ``M_l`` marks the entries of the clean input whose gradient site ``l`` blocks
    (:func:`~robustify.defenses.registry.blocked`). ``lambda = 0`` (or a model without site inputs) is
    plain PGD. Returns, per example, the first iterate that is misclassified (else the last).
    """

    def __init__(self, model: nn.Module, config: AttackConfig, lam: float, name: str):
        self.name = name
        self.model = model
        self.eps, self.norm = config.eps, config.norm
        self.steps = config.adaptive_steps
        self.step_size = config.adaptive_step_size or 2.5 * config.eps / config.adaptive_steps
        self.lam = lam
        self.seed = config.seed
        self.eot_iter = config.eot_iter or 1

    def _masks(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad(), site_inputs(self.model) as captured:
            self.model(x)
        # tested as the forward tests its band (float32 for half inputs, autocast too)
        return {site: (captured[site].detach(), mask) for site, mask in blocked(self.model, captured).items()}

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        masks = self._masks(x) if self.lam > 0 else {}
        with site_inputs(self.model) as captured:
            def objective(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                value = F.cross_entropy(logits, target, reduction="sum")
                for site, (z0, mask) in masks.items():
                    diff = (captured[site] - z0) * mask
                    value = value - self.lam * diff.flatten(1).norm(dim=1).sum()
                return value

            return pgd(self.model, x, y, eps=self.eps, steps=self.steps, step_size=self.step_size, norm=self.norm,
                       loss=objective, generator=generator, first_adversarial=True, eot_iter=self.eot_iter)


def _eager(model: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile``'d one. The adaptive attack's penalty reads the
    sites' inputs through forward pre-hooks, which a compiled model need not call (a fused site,
    :mod:`robustify.evaluation.fast`): under compile that attack would be plain PGD."""
    eager = getattr(model, "_orig_mod", model)
    if eager is not model:
        logger.info("the adaptive attack runs on the eager model (its penalty needs the sites' inputs)")
    return eager


def _factory(name: str, penalised: bool) -> AttackFactory:
    def build(model: nn.Module, config: AttackConfig, device: Any, source_model: nn.Module | None,
              autoattack: Any) -> Attack:
        lam = config.adaptive_lambda if penalised else 0.0
        return MaskPenaltyPGD(_eager(model) if lam > 0 else model, config, lam, name)

    return build


def _budget(penalised: bool) -> Any:
    def budget(config: AttackConfig) -> dict[str, Any]:
        return {"steps": config.adaptive_steps, "lambda": config.adaptive_lambda if penalised else 0.0,
                "step_size": config.adaptive_step_size}

    return budget


register_attack(AttackSpec(name="adaptive", kind="adaptive", build=_factory("adaptive", True), budget=_budget(True),
                           budget_fields=("adaptive_steps", "adaptive_lambda", "adaptive_step_size"),
                           norms=("Linf", "L2"), eot=True))
register_attack(AttackSpec(name="pgd", kind="white-box", build=_factory("pgd", False), budget=_budget(False),
                           budget_fields=("adaptive_steps", "adaptive_step_size"), norms=("Linf", "L2"), eot=True))
