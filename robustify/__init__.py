"""robustify: post-training robustness modules for image classifiers, honestly evaluated.

The data flows one way: :func:`load_model` -> :func:`insert_meansparse` ->
:func:`calibrate` -> attack/evaluate -> results tables.
"""

from ._version import __version__
# the defense modules register their handlers on import, in this order (the --defense choices' order)
from . import state, sparta, activations, smoothrelu  # noqa: F401, I001
from .activations import ActivationConfig, swap_activations
from .smoothrelu import SmoothReLU, SmoothReLUConfig
from .attacks import AttackConfig
from .calibrate import calibrate, calibrating
from .config import MeanSparseConfig, parse_eps
from .defenses import DefenseHandler, apply_defense, register_defense, remove_defense
from .data import DataError, load_data, loader, to_tensors
from . import evaluate  # the engine module, callable: rb.evaluate(model, x, y, config) runs evaluate.evaluate
from .insert import (
    InsertionError,
    fuse_meansparse,
    insert_meansparse,
    plan,
    remove_meansparse,
    unfuse_meansparse,
)
from .interop import convert_published_meansparse
from .leaderboard import write_leaderboard
from .meansparse import (
    MeanSparse,
    NotCalibratedError,
    bpda,
    defenses_disabled,
    meansparse_modules,
    set_alpha,
    soft_bpda,
)
from .models import ModelInfo, ModelLoadError, load_model
from .pipeline import EvaluationJob, run_evaluation, sweep_alpha
from .results import EvalResult, load_result
from .sites import Site, register_activation
from .sparta import SpartaConfig, insert_sparta, load_sparta, save_sparta
from .state import StateMismatchError, load_calibration, save_calibration
from .train import TrainConfig, load_defense, save_defense, train_defense

__all__ = [
    "DefenseHandler",
    "SmoothReLU",
    "SmoothReLUConfig",
    "apply_defense",
    "register_defense",
    "remove_defense",
    "ActivationConfig",
    "AttackConfig",
    "EvalResult",
    "EvaluationJob",
    "SpartaConfig",
    "TrainConfig",
    "convert_published_meansparse",
    "evaluate",
    "insert_sparta",
    "load_defense",
    "load_result",
    "load_sparta",
    "run_evaluation",
    "save_defense",
    "save_sparta",
    "swap_activations",
    "sweep_alpha",
    "train_defense",
    "write_leaderboard",
    "DataError",
    "InsertionError",
    "MeanSparse",
    "MeanSparseConfig",
    "ModelInfo",
    "ModelLoadError",
    "NotCalibratedError",
    "Site",
    "StateMismatchError",
    "bpda",
    "calibrate",
    "calibrating",
    "defenses_disabled",
    "fuse_meansparse",
    "insert_meansparse",
    "load_calibration",
    "load_data",
    "load_model",
    "loader",
    "meansparse_modules",
    "parse_eps",
    "plan",
    "register_activation",
    "remove_meansparse",
    "save_calibration",
    "set_alpha",
    "soft_bpda",
    "to_tensors",
    "unfuse_meansparse",
]
