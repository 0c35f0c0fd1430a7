"""The attack registry: one :class:`AttackSpec` per attack, and every table of attacks derived from it.

Each attack family registers its attacks when its module is imported (in the spirit of
:func:`robustify.defenses.registry.register_defense`)::

    register_attack(AttackSpec(name="square", kind="black-box", build=_build, budget=_budget, ...))

and from then on :class:`~robustify.attacks.config.AttackConfig` accepts the name, the CLI's
``--attacks`` lists it, the evaluation runs it in its place of the run order, its budget is
recorded in results, the audit counts it by its kind, and an attack needing a defense hook the
model lacks is ``n/a`` with a reason. Nothing outside this module lists attacks: the names,
aliases, kinds, norms, budgets and run order are all queries of the registry.

The run order (:func:`run_order`) does not depend on the order attacks are listed in:
AutoAttack's standard suite first (in registration order: ``apgd-ce, apgd-t, fab-t, square``),
then the other standard attacks, then all others, each group in registration order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from robustify.core.errors import UserError
from robustify.defenses.registry import defenses_in, missing_hook

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

logger = logging.getLogger(__name__)

__all__ = ["BACKWARD_HOOKS", "KINDS", "NOT_APPLICABLE", "THREAT_NORMS", "Attack", "AttackFactory", "AttackSpec",
           "aliases", "attack_names", "attack_specs", "autoattack_suite", "build_attack", "expand_attacks",
           "get_attack", "not_applicable", "on_registry_change", "register_alias", "register_attack", "run_order",
           "unregister_alias", "unregister_attack"]

#: the threat models attacks run in
THREAT_NORMS = ("Linf", "L2", "L1")
#: what an attack knows of the model: its true gradients (``white-box``), its outputs only
#: (``black-box``: Square; transfer, whose gradients are another model's), or gradients the attack
#: reshapes around the defense (``adaptive``: a surrogate backward, a penalised objective)
KINDS = ("white-box", "black-box", "adaptive")
#: the defense hooks that replace a defense's backward: attacks requiring one differentiate through it
BACKWARD_HOOKS = ("straight_through", "soft_backward")
#: why an attack requiring a hook does not apply: to a model with no defense, and to one whose
#: defenses lack the hook (stored in results: part of their identities)
NOT_APPLICABLE: dict[str, tuple[str, str]] = {
    "straight_through": ("no defense with a straight-through backward (equals standard APGD)", "the defense is differentiable"),
    "soft_backward": ("no defense with a smooth-surrogate backward (equals standard APGD)", "the defense is differentiable"),
    "disabled": ("the source would be the model itself", "the defense cannot be switched off (no base model to craft on)"),
}


class Attack:
    """One configured attack: ``perturb(x, y)`` returns adversarial images for a batch."""

    name: str

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class AttackFactory(Protocol):
    """Configures an attack: ``build(model, config, device, source_model, autoattack) -> Attack``.

    ``source_model``: the transfer attack's source (None: the attack's default); ``autoattack``: a
    pyautoattack ``AutoAttack`` several attacks may share (None: make one if needed)."""

    def __call__(self, model: nn.Module, config: AttackConfig, device: Any, source_model: nn.Module | None,
                 autoattack: Any) -> Attack: ...


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack.

    Attributes:
        name: the name in ``--attacks``, results and leaderboard columns (lower case).
        kind: ``white-box``, ``black-box`` or ``adaptive`` (:data:`KINDS`).
        build: its factory (:class:`AttackFactory`).
        budget: the budget settings that affect it (``config -> dict``), recorded in results.
        budget_fields: the :class:`~robustify.attacks.config.AttackConfig` fields ``budget`` reads.
        norms: the threat models it supports.
        requires: the defense hook it needs (:data:`robustify.defenses.base.HOOKS`); without it the
            attack is ``n/a`` (:func:`not_applicable`).
        applied_only: the hook must come from a defense the job applied (a defense that came with
            the model is part of the model evaluated).
        reasons: why it does not apply, to a model with no defense and to one whose defenses lack
            the hook (None: :data:`NOT_APPLICABLE`'s for the hook, else the registry's
            :func:`~robustify.defenses.registry.missing_hook`).
        standard: one of the standard (pyautoattack) attacks: run after AutoAttack's suite, before the rest.
        autoattack: part of AutoAttack's standard suite (a standard attack; the suite runs first, in
            registration order).
        gradient: uses the attacked model's gradients (None: every kind but ``black-box``).
        eot: it averages its gradient over ``eot_iter`` forwards (expectation over transformation) when the
            model's forward is random (:mod:`~robustify.attacks.eot`); its budget then records ``eot``.
    """

    name: str
    kind: str
    build: AttackFactory
    budget: Callable[[AttackConfig], dict[str, Any]]
    budget_fields: tuple[str, ...] = ()
    norms: tuple[str, ...] = THREAT_NORMS
    requires: str | None = None
    applied_only: bool = False
    reasons: tuple[str, str] | None = None
    standard: bool = False
    autoattack: bool = False
    gradient: bool | None = None
    eot: bool = False

    def __post_init__(self) -> None:
        if self.gradient is None:
            object.__setattr__(self, "gradient", self.kind != "black-box")

    @property
    def surrogate_backward(self) -> bool:
        """It differentiates through a backward the defense substitutes (straight-through or smooth)."""
        return self.requires in BACKWARD_HOOKS


_ATTACKS: dict[str, AttackSpec] = {}
_ALIASES: dict[str, tuple[str, ...] | Callable[[], tuple[str, ...]]] = {}
_LISTENERS: list[Callable[[], None]] = []


def _changed() -> None:
    for listener in _LISTENERS:
        listener()


def on_registry_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` after every registration and removal (e.g. to regenerate documentation)."""
    _LISTENERS.append(listener)


def _check_spec(spec: AttackSpec) -> None:
    if not isinstance(spec, AttackSpec):
        raise TypeError(f"register_attack takes a robustify.attacks.AttackSpec, got {type(spec).__name__}")
    if not spec.name or spec.name != spec.name.strip().lower() or "," in spec.name:
        raise UserError(f"attack name {spec.name!r} must be lower case, without commas or surrounding spaces")
    if spec.name in _ATTACKS or spec.name in _ALIASES:
        raise UserError(f"attack name {spec.name!r} already registered")
    if spec.kind not in KINDS:
        raise UserError(f"attack {spec.name!r}: kind {spec.kind!r} is not one of {list(KINDS)}")
    unknown = [n for n in spec.norms if n not in THREAT_NORMS]
    if unknown or not spec.norms:
        raise UserError(f"attack {spec.name!r}: norms {list(spec.norms)} must be some of {list(THREAT_NORMS)}")
    if spec.autoattack and not spec.standard:
        raise UserError(f"attack {spec.name!r}: an attack of AutoAttack's suite is a standard attack")
    if spec.applied_only and spec.requires is None:
        raise UserError(f"attack {spec.name!r}: applied_only needs the hook it requires")


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Register ``spec`` under its name (a name may be registered once); returns it."""
    _check_spec(spec)
    _ATTACKS[spec.name] = spec
    logger.debug("attack %r registered (%s)", spec.name, spec.kind)
    _changed()
    return spec


def unregister_attack(name: str) -> AttackSpec:
    """Remove attack ``name`` (and the aliases listing it); returns its spec."""
    spec = get_attack(name)
    del _ATTACKS[name]
    for alias, members in list(_ALIASES.items()):
        if not callable(members) and name in members:
            del _ALIASES[alias]
    _changed()
    return spec


def register_alias(name: str, members: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> None:
    """``name`` expands to ``members`` (or to what ``members()`` returns when expanded: an alias
    that follows the registry, such as AutoAttack's suite)."""
    if name in _ATTACKS or name in _ALIASES:
        raise UserError(f"attack name {name!r} already registered")
    _ALIASES[name] = members if callable(members) else tuple(members)
    _changed()


def unregister_alias(name: str) -> None:
    """Remove alias ``name``."""
    if _ALIASES.pop(name, None) is None:
        raise UserError(f"unknown attack alias {name!r}; choose from {list(_ALIASES)}")
    _changed()


def get_attack(name: str) -> AttackSpec:
    """The attack registered as ``name``; a one-line error for an unknown name."""
    try:
        return _ATTACKS[name]
    except KeyError:
        raise UserError(f"unknown attack {name!r}; choose from {list(_ATTACKS)}") from None


def attack_specs(**where: Any) -> tuple[AttackSpec, ...]:
    """The registered attacks in registration order whose attributes equal ``where``'s values
    (``kind="white-box"``, ``gradient=False``, ``requires="straight_through"``, ``standard=True`` ...)."""
    return tuple(s for s in _ATTACKS.values() if all(getattr(s, k) == v for k, v in where.items()))


def attack_names(**where: Any) -> tuple[str, ...]:
    """The names of :func:`attack_specs` ``(**where)``."""
    return tuple(s.name for s in attack_specs(**where))


def aliases() -> dict[str, tuple[str, ...]]:
    """Each alias with the attacks it expands to, in registration order."""
    return {name: members() if callable(members) else members for name, members in _ALIASES.items()}


def autoattack_suite() -> tuple[str, ...]:
    """AutoAttack's standard version, in its order: the suite behind an ``autoattack_acc``."""
    return attack_names(autoattack=True)


def _run_rank(name: str) -> tuple[int, int]:
    spec = _ATTACKS[name]
    group = 0 if spec.autoattack else 1 if spec.standard else 2
    return group, list(_ATTACKS).index(name)


def run_order() -> tuple[str, ...]:
    """Every registered attack in the order attacks run (sequential mode), whatever order they are given in."""
    return tuple(sorted(_ATTACKS, key=_run_rank))


def _split(names: Iterable[str] | str) -> Iterable[str]:
    return (n.strip() for n in names.split(",") if n.strip()) if isinstance(names, str) else names


def expand_attacks(names: Iterable[str] | str) -> tuple[str, ...]:
    """Expand aliases (``autoattack``, ``bpda``), drop duplicates, validate names, and put them in
    the run order (:func:`run_order`): results never depend on the order attacks are listed in."""
    known = aliases()
    out: list[str] = []
    for name in _split(names):
        name = name.strip().lower()
        for attack in known.get(name, (name,)):
            if attack not in _ATTACKS:
                raise UserError(f"unknown attack {name!r}; choose from {list(_ATTACKS) + list(known)}")
            if attack not in out:
                out.append(attack)
    if not out:
        raise UserError("no attack given")
    return tuple(sorted(out, key=_run_rank))


def not_applicable(attack: str, model: nn.Module, *, defended: bool) -> str | None:
    """Why ``attack`` does not apply to ``model`` (``defended``: the job applied a defense), None if
    it does: it requires a hook (:attr:`AttackSpec.requires`) that no defense in the model offers."""
    spec = get_attack(attack)
    if spec.requires is None:
        return None
    reasons = spec.reasons or NOT_APPLICABLE.get(spec.requires)
    if spec.applied_only and not defended:  # a defense that came with the model is part of the model evaluated
        return reasons[0] if reasons else "no defense applied (one that came with the model is part of it)"
    missing = missing_hook(model, spec.requires)
    if missing is None or reasons is None:
        return missing
    absent, lacking = reasons
    present = defenses_in(model)
    if not present:
        return absent
    if spec.surrogate_backward and not all(h.differentiable for h in present):
        return missing  # e.g. a straight-through backward but no smooth one: "the defense is differentiable" is wrong
    return lacking


def build_attack(
    name: str,
    model: nn.Module,
    config: AttackConfig,
    *,
    device: Any = "cpu",
    source_model: nn.Module | None = None,
    autoattack: Any = None,
) -> Attack:
    """Configure attack ``name`` against ``model`` (its registered factory).

    ``source_model`` is the transfer attack's source (default: ``model`` with its defenses
    disabled). ``autoattack`` lets several attacks share one pyautoattack object.
    """
    return get_attack(name).build(model, config, device, source_model, autoattack)
