"""The insert stage: the :class:`Defense` interface, its registry and the built-in defenses.

``robustify.defenses`` itself is generic (:mod:`.base`: the interface; :mod:`.registry`: registration,
entry points and the generic API; :mod:`.file`: the one save format; :mod:`.sites`: where a defense can
go). Each defense is a sub-package that registers itself: :mod:`.meansparse`, :mod:`.sparta`,
:mod:`.activations` (the activation swaps: SAT's SmoothReLU, PSSiLU and friends). Importing this
package imports none of them; ``import robustify`` does, and then the plugins' entry points.
"""

from robustify.defenses.base import HOOKS, Defense, DefenseOptions, captured_inputs, toggled
from robustify.defenses.registry import (
    CONFIG_ATTR,
    ENTRY_POINT_GROUP,
    applied_config,
    applied_sites,
    apply_defense,
    backbone_path,
    blocked,
    calibrate,
    defense_config,
    defense_kind,
    defense_names,
    defense_parameters,
    defenses_in,
    disabled,
    file_defense,
    get_defense,
    handler_for_config,
    handlers,
    load_defense,
    load_defense_state,
    load_plugins,
    missing_hook,
    plan_defense,
    record_config,
    register_defense,
    remove_defense,
    save_defense,
    save_defense_state,
    site_inputs,
    soft_backward,
    straight_through,
    with_hook,
)

__all__ = [
    "CONFIG_ATTR", "ENTRY_POINT_GROUP", "HOOKS", "Defense", "DefenseOptions", "applied_config", "applied_sites",
    "captured_inputs", "toggled",
    "apply_defense", "backbone_path", "blocked", "calibrate", "defense_config", "defense_kind", "defense_names",
    "defense_parameters", "defenses_in", "disabled", "file_defense", "get_defense", "handler_for_config",
    "handlers", "load_defense", "load_defense_state", "load_plugins", "missing_hook", "plan_defense",
    "record_config", "register_defense", "remove_defense", "save_defense", "save_defense_state", "site_inputs",
    "soft_backward", "straight_through", "with_hook",
]
