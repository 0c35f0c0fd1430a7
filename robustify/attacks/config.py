"""The attack settings: :class:`AttackConfig` (threat model, attack list, budgets) and AutoAttack's budgets."""

from __future__ import annotations

import functools
import logging
import math
import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from torch import nn

from robustify.load.datasets import EPS, dataset_eps
from robustify.attacks.base import THREAT_NORMS, aliases, attack_names, autoattack_suite, expand_attacks, get_attack, \
    on_registry_change
from robustify.attacks.malt import TARGETINGS
from robustify.core.config import SerializableConfig, format_eps, parse_eps
from robustify.core.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ATTACKS", "DEFAULT_EPS", "AttackConfig", "autoattack_budgets", "autoattack_eot_iter",
           "autoattack_gaps", "default_attacks", "default_eps", "threat_norm"]

#: RobustBench's eps per (dataset, threat model): a live view of the dataset registry (each dataset's registration)
DEFAULT_EPS = EPS
#: the attacks of an :class:`AttackConfig` given none (less those that do not support its norm: :func:`default_attacks`)
DEFAULT_ATTACKS = ("apgd-ce", "apgd-dlr", "square", "bpda", "bpda-apgd-t", "adaptive", "transfer")


def threat_norm(threat_model: str) -> str:
    """The norm attacks use for a RobustBench threat model (``Linf``, ``L2``; ``L1`` too). ``corruptions`` is
    none: a one-line error (RobustBench evaluates it on corrupted images, not with attacks)."""
    if threat_model in THREAT_NORMS:
        return threat_model
    if threat_model == "corruptions":
        raise UserError("corruptions is not an Lp threat model: RobustBench evaluates it on common corruptions "
                        "(CIFAR-10-C, ImageNet-C), not with attacks, and robustify does not run that evaluation; to "
                        "attack a corruptions model in an Lp ball, give the norm (--norm Linf, L2 or L1)")
    raise UserError(f"unknown threat model {threat_model!r}; choose from {[*THREAT_NORMS, 'corruptions']}")


def default_attacks(norm: str, names: Iterable[str] | str = DEFAULT_ATTACKS) -> tuple[str, ...]:
    """The attacks of ``names`` (aliases expanded, in the run order) whose registration supports ``norm``
    (:attr:`~robustify.attacks.base.AttackSpec.norms`): the defaults under ``norm`` (an attack named by the
    user that does not support it stays an error)."""
    expanded = expand_attacks(names)
    keep = tuple(a for a in expanded if norm in get_attack(a).norms)
    left_out = [a for a in expanded if a not in keep]
    if left_out:
        logger.info("default attacks without a %s version left out: %s", norm, ", ".join(left_out))
    if not keep:
        raise UserError(f"none of the attacks {list(expanded)} supports the {norm} threat model")
    return keep


def default_eps(dataset: str, norm: str) -> float:
    """RobustBench's eps for ``dataset`` under ``norm``: the dataset's registration (:data:`DEFAULT_EPS`);
    a one-line error "no default eps for {dataset} {norm} (RobustBench has no such leaderboard): give one (--eps)"."""
    return dataset_eps(dataset, norm)


@functools.lru_cache(maxsize=None)
def autoattack_budgets(norm: str) -> dict[str, int]:
    """AutoAttack's standard-version budgets for ``norm`` as :class:`AttackConfig` fields, read from
    pyautoattack's own ``AutoAttack(version="standard")`` (L1: 5 APGD restarts, 5 target classes)."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(nn.Identity(), norm=norm, eps=1.0, version="standard")  # the model is not called
    return {"apgd_iters": aa.apgd.n_iter, "apgd_restarts": aa.apgd.n_restarts, "apgd_t_iters": aa.apgd_targeted.n_iter,
            "apgd_t_targets": aa.apgd_targeted.n_target_classes, "fab_iters": aa.fab.n_iter,
            "fab_targets": aa.fab.n_target_classes, "square_queries": aa.square.n_queries}


@functools.lru_cache(maxsize=None)
def autoattack_eot_iter() -> int:
    """The EoT iterations of AutoAttack's ``rand`` version (its APGD's ``eot_iter``, 20), read from pyautoattack:
    the default of :attr:`AttackConfig.eot_iter` on a model whose forward is random."""
    from pyautoattack import AutoAttack

    return int(AutoAttack(nn.Identity(), norm="Linf", eps=1.0, version="rand").apgd.eot_iter)


@dataclass(frozen=True)
class AttackConfig(SerializableConfig):
    """Threat model, attack list and budgets. Defaults are the published ones.

    ``attacks`` None is :data:`DEFAULT_ATTACKS` less the attacks without a version for ``norm``
    (:func:`default_attacks`: under L1, no ``adaptive``). ``eps`` None is RobustBench's for ``dataset`` and ``norm`` (:data:`DEFAULT_EPS`: CIFAR
    Linf 8/255, L2 0.5, L1 12; ImageNet Linf 4/255). Attacks run in one order
    (:func:`~robustify.attacks.base.run_order`) whatever order they are listed in. Each attack's
    budget is its registered :attr:`~robustify.attacks.base.AttackSpec.budget` (:meth:`budget_for`).
    ``apgd_iters``/``apgd_restarts`` apply to APGD-CE/DLR (and their BPDA versions); AutoAttack's
    standard version uses 100 iterations, 1 restart (5 for L1), 9 target classes for APGD-T (5 for
    L1) and FAB-T, and 5000 queries for Square (None: these, :func:`autoattack_budgets`). The
    adaptive attack uses 50 steps (MeanSparse paper, A.4); its lambda and step size were not
    published (we default to lambda=1 and a step of 2.5*eps/steps).

    A model whose forward is random (two forwards of one batch differ, :mod:`~robustify.attacks.eot`) is
    attacked with expectation over transformation, as AutoAttack's ``rand`` version does: the attacks
    registered with ``eot`` average their gradient over ``eot_iter`` forwards. The evaluation decides:
    it records the iterations used in the config of the result (None on a deterministic model).

    Attributes:
        attacks: the attacks (comma-separated on the command line), from the attack registry:
            apgd-ce, apgd-dlr, apgd-t, fab-t, square, bpda-apgd-ce, bpda-apgd-dlr, bpda-apgd-t, bpda-fab-t,
            soft-bpda, adaptive, pgd, transfer; or an alias: autoattack (apgd-ce + apgd-t + fab-t + square),
            bpda (bpda-apgd-ce + bpda-apgd-dlr), bpda-autoattack (bpda-apgd-ce + bpda-apgd-t + bpda-fab-t +
            square).
        norm: the threat model: Linf, L2 or L1.
        dataset: whose RobustBench eps is the default.
        eps: perturbation budget: a float or a fraction like 8/255 (None: RobustBench's for the
            dataset and norm: CIFAR Linf 8/255, L2 0.5, L1 12; ImageNet Linf 4/255).
        seed: seeds the attacks' random starts and queries.
        batch_size: examples per attack batch.
        individual: run every attack on every correctly classified example (else only on the
            examples no earlier attack broke).
        apgd_iters: APGD-CE/DLR iterations (also of their BPDA versions and the transfer attack).
        apgd_restarts: APGD-CE/DLR restarts (None: AutoAttack's for the norm, 1; 5 for L1).
        apgd_t_iters: APGD-T iterations.
        apgd_t_targets: APGD-T target classes (None: AutoAttack's for the norm, 9; 5 for L1).
        apgd_t_targeting: how APGD-T and BPDA-APGD-T pick their target classes: top-logit (AutoAttack's: the
            highest logits after the true class) or malt (MALT, Melamed et al. 2024: the nearest decision
            boundaries by a first-order estimate; not AutoAttack's standard evaluation).
        fab_iters: FAB-T iterations.
        fab_targets: FAB-T target classes.
        square_queries: Square's query budget.
        adaptive_steps: steps of the adaptive attack.
        adaptive_lambda: the adaptive attack's lambda.
        adaptive_step_size: the adaptive attack's step size (None: 2.5*eps/steps).
        eot_iter: EoT iterations (gradients averaged per step) of the gradient attacks on a model whose forward
            is random (None: AutoAttack's rand version's, 20; 1 disables EoT, refused unless accept_no_eot). A
            deterministic model is attacked without EoT.
        accept_no_eot: evaluate a random model with eot_iter 1 (no EoT): its row is flagged random-without-eot.

    Examples:
        >>> from robustify.attacks import AttackConfig
        >>> config = AttackConfig(attacks=("apgd-ce", "bpda"), eps=rb.parse_eps("8/255"), apgd_iters=10)
        >>> config.budget_for("apgd-ce")
        {'iters': 10, 'restarts': 1}
    """

    VERSION: ClassVar[int] = 1
    attacks: tuple[str, ...] | None = None
    norm: str = "Linf"
    dataset: str = "cifar10"
    eps: float | str | None = None
    seed: int = 0
    batch_size: int = 128
    individual: bool = False
    apgd_iters: int = 100
    apgd_restarts: int | None = None
    apgd_t_iters: int = 100
    apgd_t_targets: int | None = None
    apgd_t_targeting: str = "top-logit"
    fab_iters: int = 100
    fab_targets: int = 9
    square_queries: int = 5000
    adaptive_steps: int = 50
    adaptive_lambda: float = 1.0
    adaptive_step_size: float | None = None
    eot_iter: int | None = None
    accept_no_eot: bool = False

    def __post_init__(self) -> None:
        if self.norm not in THREAT_NORMS:
            raise UserError(f"unknown threat model {self.norm!r}; choose Linf, L2 or L1")
        if self.eps is None:
            object.__setattr__(self, "eps", default_eps(self.dataset, self.norm))
            logger.debug("eps not given: RobustBench's %s %s default, %s", self.dataset, self.norm,
                         format_eps(self.eps, self.norm))
        object.__setattr__(self, "eps", parse_eps(self.eps))
        for name in ("apgd_restarts", "apgd_t_targets"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, autoattack_budgets(self.norm)[name])
        object.__setattr__(self, "attacks", expand_attacks(self.attacks) if self.attacks is not None
                           else default_attacks(self.norm))
        for attack in self.attacks:
            if self.norm not in get_attack(attack).norms:
                raise UserError(f"attack {attack!r} does not support the {self.norm} threat model")
        for name in ("batch_size", "apgd_iters", "apgd_restarts", "apgd_t_iters", "apgd_t_targets",
                     "fab_iters", "fab_targets", "square_queries", "adaptive_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.eot_iter is not None and (isinstance(self.eot_iter, bool) or not isinstance(self.eot_iter, int)
                                          or self.eot_iter < 1):
            raise UserError(f"eot_iter must be a positive integer, got {self.eot_iter!r}")
        if self.apgd_t_targeting not in TARGETINGS:
            raise UserError(f"unknown APGD-T targeting {self.apgd_t_targeting!r}; choose {' or '.join(TARGETINGS)}")
        if not math.isfinite(self.adaptive_lambda) or self.adaptive_lambda < 0:
            raise UserError(f"adaptive_lambda must be >= 0, got {self.adaptive_lambda!r}")

    def budget_for(self, attack: str) -> dict[str, Any]:
        """The budget settings that affect ``attack`` (recorded in results): its registered
        :attr:`~robustify.attacks.base.AttackSpec.budget`, and ``eot`` (the EoT iterations) for an attack that
        averages its gradients (:attr:`~robustify.attacks.base.AttackSpec.eot`) when ``eot_iter`` is set."""
        spec = get_attack(attack)
        budget = spec.budget(self)
        if spec.eot and self.eot_iter is not None:
            budget = {**budget, "eot": self.eot_iter}
        return budget

    def for_classes(self, classes: int) -> AttackConfig:
        """This config for a model with ``classes`` classes: the targeted attacks' target counts
        (``apgd_t_targets``, ``fab_targets``) capped at ``classes - 1``, the other classes there are, so that
        the budgets recorded are the ones run."""
        cap = max(classes - 1, 1)
        capped = {name: cap for name in ("apgd_t_targets", "fab_targets") if getattr(self, name) > cap}
        if not capped:
            return self
        logger.info("%d classes: %s capped at %d", classes, ", ".join(capped), cap)
        return replace(self, **capped)


def autoattack_gaps(config: AttackConfig) -> list[str]:
    """How ``config`` differs from AutoAttack's standard evaluation (empty: it is that evaluation)."""
    gaps = [f"no {attack}" for attack in autoattack_suite() if attack not in config.attacks]
    gaps += [f"{name}={getattr(config, name)} (standard {value})"
             for name, value in autoattack_budgets(config.norm).items() if getattr(config, name) != value]
    if config.eot_iter is not None and config.eot_iter > 1:
        gaps.append(f"eot_iter={config.eot_iter} (standard: no EoT)")
    targeted = [a for a in autoattack_suite() if a in config.attacks and "apgd_t_targeting" in get_attack(a).budget_fields]
    if targeted and config.apgd_t_targeting != TARGETINGS[0]:
        gaps.append(f"apgd_t_targeting={config.apgd_t_targeting} (standard {TARGETINGS[0]})")
    return gaps


# ------------------------------------------------------------------------------------------
# the ``attacks`` entry of AttackConfig's docstring (the CLI's --attacks help) follows the registry
# ------------------------------------------------------------------------------------------
_ATTACKS_ENTRY = re.compile(r"(?ms)^(?P<indent> +)attacks: .*?(?=^(?P=indent)norm: )")


def _attacks_help() -> str:
    """What the ``attacks`` field accepts, from the registry."""
    names = ", ".join(attack_names())
    alias = ", ".join(f"{name} ({' + '.join(members)})" for name, members in aliases().items())
    return (f"the attacks (comma-separated on the command line), from the attack registry: {names}"
            + (f"; or an alias: {alias}" if alias else "")
            + f" (None: {', '.join(DEFAULT_ATTACKS)}, less those without a version for the norm).")


def document_attacks() -> None:
    """Rewrite the ``attacks`` entry of :class:`AttackConfig`'s docstring from the registry."""
    doc = AttackConfig.__doc__ or ""
    match = _ATTACKS_ENTRY.search(doc)
    if match is None:  # pragma: no cover - the docstring lost its entry
        return
    indent = match.group("indent")
    entry = textwrap.fill(_attacks_help(), width=110, initial_indent=indent + "attacks: ",
                          subsequent_indent=indent + "    ", break_on_hyphens=False, break_long_words=False)
    AttackConfig.__doc__ = doc[:match.start()] + entry + "\n" + doc[match.end():]


on_registry_change(document_attacks)
