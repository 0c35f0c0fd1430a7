"""The attack settings: :class:`AttackConfig` (threat model, attack list, budgets) and AutoAttack's budgets."""

from __future__ import annotations

import functools
import logging
import math
import re
import textwrap
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from robustify.load.datasets import EPS, dataset_eps
from robustify.attacks.base import THREAT_NORMS, aliases, attack_names, autoattack_suite, expand_attacks, get_attack, \
    on_registry_change
from robustify.core.config import SerializableConfig, format_eps, parse_eps
from robustify.core.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_EPS", "AttackConfig", "autoattack_budgets", "autoattack_gaps", "default_eps", "threat_norm"]

#: RobustBench's eps per (dataset, threat model): a live view of the dataset registry (each dataset's registration)
DEFAULT_EPS = EPS


def threat_norm(threat_model: str) -> str:
    """The norm attacks use for a RobustBench threat model (``corruptions``: Linf)."""
    return threat_model if threat_model in THREAT_NORMS else "Linf"


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


@dataclass(frozen=True)
class AttackConfig(SerializableConfig):
    """Threat model, attack list and budgets. Defaults are the published ones.

    ``eps`` None is RobustBench's for ``dataset`` and ``norm`` (:data:`DEFAULT_EPS`: CIFAR
    Linf 8/255, L2 0.5, L1 12; ImageNet Linf 4/255). Attacks run in one order
    (:func:`~robustify.attacks.base.run_order`) whatever order they are listed in. Each attack's
    budget is its registered :attr:`~robustify.attacks.base.AttackSpec.budget` (:meth:`budget_for`).
    ``apgd_iters``/``apgd_restarts`` apply to APGD-CE/DLR (and their BPDA versions); AutoAttack's
    standard version uses 100 iterations, 1 restart (5 for L1), 9 target classes for APGD-T (5 for
    L1) and FAB-T, and 5000 queries for Square (None: these, :func:`autoattack_budgets`). The
    adaptive attack uses 50 steps (MeanSparse paper, A.4); its lambda and step size were not
    published (we default to lambda=1 and a step of 2.5*eps/steps).

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
        fab_iters: FAB-T iterations.
        fab_targets: FAB-T target classes.
        square_queries: Square's query budget.
        adaptive_steps: steps of the adaptive attack.
        adaptive_lambda: the adaptive attack's lambda.
        adaptive_step_size: the adaptive attack's step size (None: 2.5*eps/steps).

    Examples:
        >>> from robustify.attacks import AttackConfig
        >>> config = AttackConfig(attacks=("apgd-ce", "bpda"), eps=rb.parse_eps("8/255"), apgd_iters=10)
        >>> config.budget_for("apgd-ce")
        {'iters': 10, 'restarts': 1}
    """

    VERSION: ClassVar[int] = 1
    attacks: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "square", "bpda", "adaptive", "transfer")
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
    fab_iters: int = 100
    fab_targets: int = 9
    square_queries: int = 5000
    adaptive_steps: int = 50
    adaptive_lambda: float = 1.0
    adaptive_step_size: float | None = None

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
        object.__setattr__(self, "attacks", expand_attacks(self.attacks))
        for attack in self.attacks:
            if self.norm not in get_attack(attack).norms:
                raise UserError(f"attack {attack!r} does not support the {self.norm} threat model")
        for name in ("batch_size", "apgd_iters", "apgd_restarts", "apgd_t_iters", "apgd_t_targets",
                     "fab_iters", "fab_targets", "square_queries", "adaptive_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if not math.isfinite(self.adaptive_lambda) or self.adaptive_lambda < 0:
            raise UserError(f"adaptive_lambda must be >= 0, got {self.adaptive_lambda!r}")

    def budget_for(self, attack: str) -> dict[str, Any]:
        """The budget settings that affect ``attack`` (recorded in results): its registered
        :attr:`~robustify.attacks.base.AttackSpec.budget`."""
        return get_attack(attack).budget(self)


def autoattack_gaps(config: AttackConfig) -> list[str]:
    """How ``config`` differs from AutoAttack's standard evaluation (empty: it is that evaluation)."""
    gaps = [f"no {attack}" for attack in autoattack_suite() if attack not in config.attacks]
    gaps += [f"{name}={getattr(config, name)} (standard {value})"
             for name, value in autoattack_budgets(config.norm).items() if getattr(config, name) != value]
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
            + (f"; or an alias: {alias}" if alias else "") + ".")


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
