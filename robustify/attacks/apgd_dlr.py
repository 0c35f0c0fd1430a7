"""APGD-DLR (Croce & Hein 2020): untargeted APGD on the difference-of-logits-ratio loss, through pyautoattack."""

from robustify.attacks.autoattack import apgd_budget, pyautoattack_factory, untargeted_apgd
from robustify.attacks.base import AttackSpec, register_attack

__all__: list[str] = []

register_attack(AttackSpec(name="apgd-dlr", kind="white-box",
                           build=pyautoattack_factory("apgd-dlr", untargeted_apgd("dlr")), budget=apgd_budget,
                           budget_fields=("apgd_iters", "apgd_restarts"), standard=True, eot=True))
