"""APGD-CE (Croce & Hein 2020): untargeted APGD on the cross-entropy, through pyautoattack, configured as
AutoAttack's standard version configures it; the first attack of AutoAttack's standard suite."""

from robustify.attacks.autoattack import apgd_budget, pyautoattack_factory, untargeted_apgd
from robustify.attacks.base import AttackSpec, register_attack

__all__: list[str] = []

register_attack(AttackSpec(name="apgd-ce", kind="white-box", build=pyautoattack_factory("apgd-ce", untargeted_apgd("ce")),
                           budget=apgd_budget, budget_fields=("apgd_iters", "apgd_restarts"), standard=True,
                           autoattack=True, eot=True))
