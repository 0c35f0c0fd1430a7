"""robustify: post-training robustness modules for image classifiers, honestly evaluated.

The data flows one way: :func:`load_model` -> :func:`insert_meansparse` ->
:func:`calibrate` -> attack/evaluate -> results tables.
"""

__version__ = "0.1.0"

from .calibrate import calibrate, calibrating  # noqa: E402
from .config import MeanSparseConfig, parse_eps  # noqa: E402
from .data import DataError, load_data, loader, to_tensors  # noqa: E402
from .insert import (  # noqa: E402
    InsertionError,
    fuse_meansparse,
    insert_meansparse,
    plan,
    remove_meansparse,
    unfuse_meansparse,
)
from .meansparse import (  # noqa: E402
    MeanSparse,
    NotCalibratedError,
    bpda,
    defenses_disabled,
    meansparse_modules,
    set_alpha,
    soft_bpda,
)
from .models import ModelInfo, ModelLoadError, load_model  # noqa: E402
from .sites import Site, register_activation  # noqa: E402
from .state import StateMismatchError, load_calibration, save_calibration  # noqa: E402
from .attacks import AttackConfig  # noqa: E402
from .evaluate import EvalResult, load_result  # noqa: E402  (the function: robustify.evaluate.evaluate)
from .leaderboard import write_leaderboard  # noqa: E402
from .pipeline import EvaluationJob, run_evaluation, sweep_alpha  # noqa: E402
from .interop import convert_published_meansparse  # noqa: E402
from .sparta import SpartaConfig, insert_sparta, load_sparta, save_sparta  # noqa: E402
from .activations import ActivationConfig, swap_activations  # noqa: E402
from .train import TrainConfig, load_defense, save_defense, train_defense  # noqa: E402

__all__ = [
    "ActivationConfig",
    "AttackConfig",
    "EvalResult",
    "EvaluationJob",
    "SpartaConfig",
    "TrainConfig",
    "convert_published_meansparse",
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
