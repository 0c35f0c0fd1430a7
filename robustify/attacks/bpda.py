"""BPDA (Athalye et al. 2018): pyautoattack's gradient attacks with every defense's backward replaced by
the identity (the ``straight_through`` hook of :mod:`robustify.defenses.registry`).

``bpda-apgd-ce``, ``bpda-apgd-dlr``, ``bpda-apgd-t``, ``bpda-fab-t``: the registered attack of the same
name without ``bpda-``, same budget and norms, run inside
:func:`~robustify.defenses.registry.straight_through`. Aliases: ``bpda`` (the two untargeted APGDs) and
``bpda-autoattack`` (AutoAttack's standard suite with the straight-through backward wherever it has one:
``bpda-apgd-ce, bpda-apgd-t, bpda-fab-t, square``). A model without a straight-through backward gets
``n/a`` (the attack would equal the standard one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from robustify.attacks.autoattack import PyAutoAttack
from robustify.attacks.base import (Attack, AttackFactory, AttackSpec, attack_names, autoattack_suite, get_attack,
                                    register_alias, register_attack)
from robustify.defenses.registry import straight_through

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

__all__: list[str] = []

#: the pyautoattack attacks that get a straight-through version (registered before this module)
BASES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t")
PREFIX = "bpda-"


def _factory(name: str, base: str) -> AttackFactory:
    def build(model: nn.Module, config: AttackConfig, device: Any, source_model: nn.Module | None,
              autoattack: Any) -> Attack:
        inner = get_attack(base).build(model, config, device, source_model, autoattack)
        if not isinstance(inner, PyAutoAttack):  # pragma: no cover - a re-registered base
            raise TypeError(f"{name} needs {base} to be a pyautoattack attack, got {type(inner).__name__}")
        return PyAutoAttack(name, inner.aa, inner.run, context=lambda: straight_through(model))

    return build


def _straight_through_suite() -> tuple[str, ...]:
    """AutoAttack's suite with each attack's straight-through version where it has one."""
    names = set(attack_names())
    return tuple(PREFIX + a if PREFIX + a in names else a for a in autoattack_suite())


for _base in BASES:
    _spec = get_attack(_base)
    register_attack(AttackSpec(name=PREFIX + _base, kind="adaptive", build=_factory(PREFIX + _base, _base),
                               budget=_spec.budget, budget_fields=_spec.budget_fields, norms=_spec.norms,
                               requires="straight_through", eot=_spec.eot))
register_alias("bpda", ("bpda-apgd-ce", "bpda-apgd-dlr"))
register_alias("bpda-autoattack", _straight_through_suite)
