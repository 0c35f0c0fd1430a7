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

from robustify.defenses.meansparse.config import MeanSparseConfig, parse_site_alpha
from robustify.load.models import ModelInfo, load_model
from robustify.jobs.evaluate import EvaluationJob
from robustify.cli.flags import ConfigFlags, field_default

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
MODEL_FLAGS = ConfigFlags(EvaluationJob, ("dataset", "threat_model", "weights", "pretrained", "cache_dir", "device"),
                          choices={"threat_model": ("Linf", "L2", "corruptions")})
MEANSPARSE_FLAGS = ConfigFlags(
    MeanSparseConfig, ("alpha", "site_alpha", "include", "exclude", "outputs", "preset", "skip_se", "channel_dim",
                       "stats_mode"),
    parse={"site_alpha": parse_site_alpha}, choices={"stats_mode": ("exact", "official")})
#: the evaluation's MeanSparse defaults (alpha 0.2), those of every command with MeanSparse flags
MEANSPARSE_DEFAULTS: MeanSparseConfig = MeanSparseConfig(alpha=0.2)
DATA_FLAGS = ConfigFlags(EvaluationJob, ("data", "holdout", "n_calib", "workers"))
WORKERS_FLAGS = ConfigFlags(EvaluationJob, ("workers",))


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", help="robustbench:NAME, timm:NAME, aa-resnet18 or package.module:function")
    MODEL_FLAGS.add(p)


def add_meansparse_args(p: argparse.ArgumentParser) -> None:
    MEANSPARSE_FLAGS.add(p, MEANSPARSE_DEFAULTS)


def meansparse_config(args: argparse.Namespace) -> MeanSparseConfig:
    return MeanSparseConfig(**MEANSPARSE_FLAGS.values(args))


def load_model_from_args(args: argparse.Namespace, spec: str | None = None,
                         download: bool = True) -> tuple[Any, ModelInfo]:
    """``load_model`` with the model flags; ``download=False`` builds the architecture only
    (a local ``--weights`` file is still read), as planning needs no weights."""
    options = MODEL_FLAGS.values(args)
    options["pretrained"] = options["pretrained"] and download
    return load_model(spec or args.model, **options)
