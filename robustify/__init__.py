"""robustify: post-training robustness modules for image classifiers, honestly evaluated.

The data flows one way, one package per stage: :mod:`robustify.load` (models, data) ->
:mod:`robustify.defenses` (insert a registered defense; its statistics pass) -> :mod:`robustify.attacks`
-> :mod:`robustify.evaluation` (engine, results, audit) -> :mod:`robustify.reporting` (leaderboard),
driven end to end by :mod:`robustify.jobs` and the command line :mod:`robustify.cli`.

This module is the public API. Importing it registers the built-in defenses, attacks, datasets and
output formats, then every plugin declared by an installed package's entry points
(:mod:`robustify.core.plugins`). Names and module paths of the first flat layout still resolve, with a
``DeprecationWarning`` naming their new home (:data:`_DEPRECATED`, :data:`robustify._deprecated.MOVED`), for one
release.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from robustify import _deprecated
from robustify._version import __version__
from robustify.core import compat as _compat
from robustify.core.config import parse_eps
from robustify.core.errors import (DataError, InsertionError, ModelLoadError, NotCalibratedError, StateMismatchError,
                                   UserError)
# the built-in defenses register on import, in this order (the --defense choices' order)
from robustify.defenses import meansparse as _meansparse  # noqa: F401, I001
from robustify.defenses import sparta as _sparta  # noqa: F401
from robustify.defenses import activations as _activations  # noqa: F401
from robustify.defenses import (Defense, DefenseOptions, apply_defense, calibrate, load_defense, register_defense,
                                remove_defense, save_defense)
from robustify.defenses.registry import disabled as defenses_disabled
from robustify.defenses.registry import soft_backward as soft_bpda
from robustify.defenses.registry import straight_through as bpda
from robustify.defenses.sites import Site, register_activation
from robustify.load.data import load_data, loader, to_tensors
from robustify.load.models import ModelInfo, load_model
from robustify.attacks import AttackConfig
from robustify.evaluation.engine import evaluate
from robustify.evaluation.results import EvalResult, load_result
from robustify.reporting.leaderboard import write_leaderboard
from robustify.jobs.evaluate import EvaluationJob, run_evaluation
from robustify.jobs.export import ExportJob, export_robustbench
from robustify.jobs.sweep import sweep
from robustify.jobs.study import load_study, run_study
from robustify.jobs.train import TrainConfig, train_defense
from robustify.core.plugins import load_plugins as _load_plugins

_compat.install_autoattack_alias()  # RobustBench's `import autoattack` works once robustify is imported
_deprecated.install()  # the first layout's module paths (robustify.meansparse, robustify.pipeline, ...)
_load_plugins()

__all__ = [
    "AttackConfig",
    "DataError",
    "Defense",
    "DefenseOptions",
    "EvalResult",
    "EvaluationJob",
    "ExportJob",
    "InsertionError",
    "ModelInfo",
    "ModelLoadError",
    "NotCalibratedError",
    "Site",
    "StateMismatchError",
    "TrainConfig",
    "UserError",
    "__version__",
    "apply_defense",
    "bpda",
    "calibrate",
    "defenses_disabled",
    "evaluate",
    "export_robustbench",
    "load_data",
    "load_defense",
    "load_model",
    "load_result",
    "load_study",
    "loader",
    "parse_eps",
    "register_activation",
    "register_defense",
    "run_study",
    "remove_defense",
    "run_evaluation",
    "save_defense",
    "soft_bpda",
    "sweep",
    "to_tensors",
    "train_defense",
    "write_leaderboard",
]

#: public names of the first layout, kept for one release: name -> the module that now holds it (and its name there)
_DEPRECATED: dict[str, tuple[str, str]] = {
    "DefenseHandler": ("robustify.defenses", "Defense"),
    "calibrating": ("robustify.defenses.meansparse", "calibrating"),
    "MeanSparse": ("robustify.defenses.meansparse", "MeanSparse"),
    "MeanSparseConfig": ("robustify.defenses.meansparse", "MeanSparseConfig"),
    "insert_meansparse": ("robustify.defenses.meansparse", "insert_meansparse"),
    "remove_meansparse": ("robustify.defenses.meansparse", "remove_meansparse"),
    "fuse_meansparse": ("robustify.defenses.meansparse", "fuse_meansparse"),
    "unfuse_meansparse": ("robustify.defenses.meansparse", "unfuse_meansparse"),
    "meansparse_modules": ("robustify.defenses.meansparse", "meansparse_modules"),
    "plan": ("robustify.defenses.meansparse", "plan"),
    "set_alpha": ("robustify.defenses.meansparse", "set_alpha"),
    "save_calibration": ("robustify.defenses.meansparse", "save_calibration"),
    "load_calibration": ("robustify.defenses.meansparse", "load_calibration"),
    "convert_published_meansparse": ("robustify.defenses.meansparse", "convert_published_meansparse"),
    "SpartaConfig": ("robustify.defenses.sparta", "SpartaConfig"),
    "insert_sparta": ("robustify.defenses.sparta", "insert_sparta"),
    "load_sparta": ("robustify.defenses.sparta", "load_sparta"),
    "save_sparta": ("robustify.defenses.sparta", "save_sparta"),
    "ActivationConfig": ("robustify.defenses.activations", "ActivationConfig"),
    "swap_activations": ("robustify.defenses.activations", "swap_activations"),
    "SmoothReLU": ("robustify.defenses.activations", "SmoothReLU"),
    "SmoothReLUConfig": ("robustify.defenses.activations", "SmoothReLUConfig"),
    "sweep_alpha": ("robustify.jobs.sweep", "sweep_alpha"),
}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        module, attr = _DEPRECATED[name]
        warnings.warn(f"robustify.{name} is deprecated and will be removed in the next release: "
                      f"use {module}.{attr}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'robustify' has no attribute {name!r}")
