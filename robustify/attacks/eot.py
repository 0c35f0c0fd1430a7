"""Randomized models: detecting a random forward, and the expectation over transformation (EoT) they need.

A defense whose forward is random (random noise, random resizing, a plugin's random layer) gives each
gradient of one sample of its transformation: attacks that follow single gradients underestimate it.
Attacking it honestly averages the gradient of each step over several forwards (EoT, Athalye et al.
2018), as AutoAttack's ``rand`` version does (APGD with ``eot_iter=20``).

:func:`forward_is_random` tells (two forwards of one small batch in eval mode differ, by AutoAttack's
``check_randomized`` criterion); :func:`resolve_eot` then sets the config's ``eot_iter`` the evaluation
uses: AutoAttack's 20 (or the one asked for) on a random model, None on a deterministic one, and
refuses a random model with EoT switched off (``eot_iter=1``) unless ``accept_no_eot``. The attacks
registered with ``eot`` (:attr:`~robustify.attacks.base.AttackSpec.eot`: APGD-CE/DLR/T and their BPDA
versions, soft BPDA through pyautoattack's ``eot_iter``; the adaptive and ``pgd`` attacks through
:func:`~robustify.attacks.pgd.pgd`) use it; the others (Square, FAB-T, transfer) run as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from robustify.attacks.base import attack_names
from robustify.attacks.config import AttackConfig, autoattack_eot_iter
from robustify.core.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["DETECTION_BATCH", "RANDOM_TOLERANCE", "forward_is_random", "resolve_eot"]

#: the examples :func:`forward_is_random` forwards (twice)
DETECTION_BATCH = 16
#: largest L2 distance of two forwards' L2-normalised logits still taken as equal (AutoAttack's ``check_randomized``)
RANDOM_TOLERANCE = 1e-4


def forward_is_random(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      tolerance: float = RANDOM_TOLERANCE) -> bool:
    """Whether two forwards of the batch ``x`` (no gradients; the model as it is, in eval mode for an
    evaluation) differ: some prediction changes, or some example's L2-normalised logits move by more than
    ``tolerance`` (AutoAttack's criterion, which absorbs float non-determinism)."""
    with torch.no_grad():
        first, second = (model(x).float() for _ in range(2))
    if not torch.equal(first.argmax(1), second.argmax(1)):
        return True

    def unit(out: torch.Tensor) -> torch.Tensor:
        return out / (out.flatten(1).norm(dim=1).view(-1, *[1] * (out.dim() - 1)) + 1e-10)

    return bool((unit(first) - unit(second)).flatten(1).norm(dim=1).max() > tolerance)


def resolve_eot(config: AttackConfig, random_forward: bool) -> AttackConfig:
    """``config`` with the ``eot_iter`` an evaluation uses: on a random model the config's (None:
    AutoAttack's rand version's, 20), refused at 1 unless ``accept_no_eot``; on a deterministic model None
    (EoT would repeat one gradient). ``accept_no_eot`` stays set only where it was needed, so that it never
    tells two otherwise equal evaluations (settings ids) apart."""
    if not random_forward:
        if config.eot_iter is not None:
            logger.info("the model's forward is deterministic: attacked without EoT (eot_iter %d ignored)",
                        config.eot_iter)
        return dataclasses.replace(config, eot_iter=None, accept_no_eot=False)
    eot = autoattack_eot_iter() if config.eot_iter is None else config.eot_iter
    if eot == 1 and not config.accept_no_eot:
        raise UserError("the model's forward is random (two forwards of one batch differ) and eot_iter=1 switches "
                        "EoT off: give eot_iter > 1 (--eot-iter; default 20, AutoAttack's rand version) or accept "
                        "the weaker evaluation (--accept-no-eot; the row is flagged random-without-eot)")
    with_eot = [a for a in config.attacks if a in attack_names(eot=True)]
    without = [a for a in config.attacks if a not in with_eot]
    if eot == 1:
        logger.warning("the model's forward is random: attacked WITHOUT EoT (accepted); the row is flagged "
                       "random-without-eot")
    elif not with_eot:
        logger.warning("the model's forward is random but none of the attacks %s averages its gradients (EoT): the "
                       "row is flagged random-without-eot", ", ".join(config.attacks))
    else:
        logger.info("the model's forward is random: %s average their gradients over %d forwards (EoT)",
                    ", ".join(with_eot), eot)
    if without and eot > 1:
        logger.info("%s run without EoT (one forward per step or query); what they break is confirmed by the final "
                    "forward", ", ".join(without))
    return dataclasses.replace(config, eot_iter=eot, accept_no_eot=eot == 1)
