"""What every ``robustify`` command module shares: the command registry and the argument groups.

:mod:`robustify.cli` builds the parser from :data:`COMMANDS`; the command modules
(:mod:`~robustify.cli.calibrate`, :mod:`~robustify.cli.evaluate`, :mod:`~robustify.cli.train`) import
this module and :mod:`~robustify.cli.flags`, never each other. The flags of config settings are made
from the config dataclasses (:class:`~robustify.cli.flags.ConfigFlags`): their defaults and help
texts live there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from robustify import defenses
from robustify.load.models import ModelInfo, load_model
from robustify.jobs.evaluate import EvaluationJob
from robustify.cli.flags import ConfigFlags

__all__ = ["COMMANDS", "register_command"]

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register_command(
    name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorator registering ``run(args) -> int`` as ``robustify NAME``."""

    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return decorate


# ------------------------------------------------------------------------------------------
# shared argument groups
# ------------------------------------------------------------------------------------------
MODEL_FLAGS = ConfigFlags(EvaluationJob, ("dataset", "threat_model", "weights", "pretrained", "image_size", "new_head",
                                          "cache_dir", "device"),
                          choices={"threat_model": ("Linf", "L2", "corruptions")})
DATA_FLAGS = ConfigFlags(EvaluationJob, ("data", "holdout", "n_calib", "workers"))
WORKERS_FLAGS = ConfigFlags(EvaluationJob, ("workers",))


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", help="robustbench:NAME, timm:NAME, small-resnet-at, aa-resnet18 or package.module:function")
    MODEL_FLAGS.add(p)


# ------------------------------------------------------------------------------------------
# defense flags: made from each registered defense's options (its config fields)
# ------------------------------------------------------------------------------------------
def defense_flags(defense: defenses.Defense) -> ConfigFlags | None:
    """The flags of ``defense``'s options (None: it declares none)."""
    o = defense.options
    if o is None:
        return None
    return ConfigFlags(defense.config_type, o.fields, prefix=o.prefix, names=o.names, parse=o.parse, choices=o.choices)


def add_defense_args(p: argparse.ArgumentParser, *, trainable: bool | None = None) -> None:
    """One group of flags per registered defense (only the (non-)trainable ones if given). A flag two
    defenses share (``--include``, ``--exclude``) is added once, by the first registered, and read by both;
    where their defaults differ, the flag's default is each defense's own."""
    actions = {a: action for action in p._actions for a in action.option_strings}
    for defense in defenses.handlers(trainable=trainable):
        flags = defense_flags(defense)
        if flags is None:
            continue
        for name in flags.fields:
            action = actions.get(flags.flag(name))
            if action is not None and action.default != flags.default(name, defense.options.defaults):
                action.default = None
                action.help = (action.help or "").replace(" (default: %(default)s)", "") + " (default: the defense's own)"
        fresh = tuple(f for f in flags.fields if flags.flag(f) not in actions)
        if not fresh:
            continue
        group = p.add_argument_group(defense.options.group or f"{defense.title} settings")
        ConfigFlags(flags.config, fresh, prefix=flags.prefix, names=flags.names, parse=flags.parse,
                    choices=flags.choices).add(group, defense.options.defaults)
        actions.update({a: action for action in group._group_actions for a in action.option_strings})


def defense_config_from_args(args: argparse.Namespace, name: str) -> Any:
    """The config of defense ``name`` from the parsed flags (its options; the other fields keep their defaults)."""
    if name == "none":
        return None
    defense = defenses.get_defense(name)
    flags = defense_flags(defense)
    values = flags.values(args) if flags is not None else {}
    return defense.default_config(name, **{k: v for k, v in values.items() if v is not None})


def load_model_from_args(args: argparse.Namespace, spec: str | None = None,
                         download: bool = True) -> tuple[Any, ModelInfo]:
    """``load_model`` with the model flags; ``download=False`` builds the architecture only
    (a local ``--weights`` file is still read), as planning needs no weights."""
    options = MODEL_FLAGS.values(args)
    options["pretrained"] = options["pretrained"] and download
    return load_model(spec or args.model, **options)
