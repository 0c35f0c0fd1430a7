"""Attacks, all on images in [0, 1]: standard ones through pyautoattack, adaptive ones here, each registered.

Every attack is an :class:`Attack`: ``perturb(x, y) -> x_adv`` on one batch, deterministic
given its seed (each batch reseeds, as AutoAttack does), so a batch can be re-run after an
interruption with the same result. The evaluation engine (:mod:`robustify.evaluation.engine`)
decides which examples each attack sees and records who broke what.

Each attack is a module that registers it (:func:`register_attack`, an
:class:`AttackSpec`: name, kind, norms, budget, the defense hook it requires, its factory), and every
list of attacks (names, aliases, kinds, run order, budgets, ``n/a`` reasons) is a query of the registry
(:mod:`~robustify.attacks.base`):

* :mod:`~robustify.attacks.apgd_ce`, :mod:`~robustify.attacks.apgd_dlr`, :mod:`~robustify.attacks.apgd_t`,
  :mod:`~robustify.attacks.fab`, :mod:`~robustify.attacks.square`: the standard attacks, pyautoattack's own objects configured as ``AutoAttack`` configures them
  (:mod:`~robustify.attacks.autoattack`): ``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab-t``, ``square``;
  ``autoattack`` expands to the standard version's sequence ``apgd-ce, apgd-t, fab-t, square``.
* :mod:`~robustify.attacks.bpda`: the same attacks with every defense's backward replaced by the
  identity (``straight_through`` hook): ``bpda-apgd-ce``, ``bpda-apgd-dlr`` (``bpda``), ``bpda-apgd-t``,
  ``bpda-fab-t``; ``bpda-autoattack`` is ``bpda-apgd-ce, bpda-apgd-t, bpda-fab-t, square``.
* :mod:`~robustify.attacks.soft_bpda`: ``soft-bpda``, APGD-CE through a smooth surrogate of each
  defense (``soft_backward`` hook), its temperature annealed over :data:`SOFT_BPDA_TEMPERATURES`.
* :mod:`~robustify.attacks.mask_penalty`: ``adaptive``, the MeanSparse paper's attack (PGD on
  cross-entropy minus a penalty on the units the defense blocks, ``site_inputs`` hook), and ``pgd``,
  plain PGD with the same budget (both run :func:`pgd`, adversarial training's attack too).
* :mod:`~robustify.attacks.transfer`: ``transfer``, APGD-CE crafted on the undefended base model
  (``disabled`` hook), evaluated on the defended one.

A model whose forward is random is attacked with expectation over transformation (EoT,
:mod:`~robustify.attacks.eot`): the attacks registered with ``eot`` average each gradient over
``eot_iter`` forwards.

Third-party packages add attacks through the ``robustify.attacks`` entry-point group
(:func:`robustify.core.plugins.load_entry_points`), loaded after the built-in ones.
"""

from __future__ import annotations

from typing import Any

from robustify.attacks.base import (BACKWARD_HOOKS, KINDS, NOT_APPLICABLE, THREAT_NORMS, Attack, AttackFactory,
                                    AttackSpec, aliases, attack_names, attack_specs, autoattack_suite, build_attack,
                                    expand_attacks, get_attack, not_applicable, on_registry_change, register_alias,
                                    register_attack, run_order, unregister_alias, unregister_attack)
from robustify.attacks.config import (DEFAULT_ATTACKS, DEFAULT_EPS, AttackConfig, autoattack_budgets,
                                      autoattack_eot_iter, autoattack_gaps, default_attacks, default_eps, threat_norm)
from robustify.attacks.autoattack import PyAutoAttack, _set_apgd_iters, make_autoattack
# the built-in attack families register themselves, in this order (the registration order; see run_order)
from robustify.attacks import apgd_ce, apgd_dlr, apgd_t, fab, square, bpda, soft_bpda, mask_penalty, transfer  # noqa: F401
from robustify.attacks.eot import forward_is_random, resolve_eot
from robustify.attacks.mask_penalty import MaskPenaltyPGD
from robustify.attacks.pgd import evaluate_pgd, pgd  # the function: binds ``robustify.attacks.pgd`` (not the module)
from robustify.attacks.soft_bpda import SOFT_BPDA_TEMPERATURES, SoftBPDA
from robustify.attacks.transfer import TransferAttack
from robustify.core.plugins import load_entry_points

__all__ = ["ATTACKS", "BACKWARD_HOOKS", "DEFAULT_ATTACKS", "DEFAULT_EPS", "ENTRY_POINT_GROUP", "KINDS",
           "NOT_APPLICABLE", "SOFT_BPDA_TEMPERATURES", "THREAT_NORMS", "Attack", "AttackConfig", "AttackFactory", "AttackSpec",
           "MaskPenaltyPGD", "PyAutoAttack", "SoftBPDA", "TransferAttack", "aliases", "attack_names", "attack_specs",
           "autoattack_budgets", "autoattack_eot_iter", "autoattack_gaps", "autoattack_suite", "build_attack",
           "default_attacks", "default_eps", "evaluate_pgd", "expand_attacks", "forward_is_random", "get_attack",
           "make_autoattack", "not_applicable", "on_registry_change", "pgd", "register_alias", "register_attack",
           "resolve_eot", "run_order", "threat_norm", "unregister_alias", "unregister_attack"]

#: the entry-point group third-party attacks register in (``name = "package.module"``; importing it registers)
ENTRY_POINT_GROUP = "robustify.attacks"
load_entry_points(ENTRY_POINT_GROUP)

#: the attack tables of earlier versions, now queries of the registry (read when accessed, so they
#: include attacks registered later): prefer the functions
_DERIVED = {
    "ATTACKS": attack_names,
    "STANDARD": lambda: attack_names(standard=True),
    "ADAPTIVE": lambda: attack_names(standard=False),
    "ALIASES": aliases,
    "NORMS": lambda: {s.name: s.norms for s in attack_specs()},
    "WHITE_BOX": lambda: attack_names(kind="white-box"),
    "BLACK_BOX": lambda: attack_names(gradient=False),
    "AUTOATTACK_SUITE": autoattack_suite,
    "RUN_ORDER": lambda: tuple(a for a in run_order() if get_attack(a).standard),
    "REQUIRES": lambda: {s.name: s.requires for s in attack_specs() if s.requires is not None},
}


def __getattr__(name: str) -> Any:
    if name in _DERIVED:
        return _DERIVED[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
