"""robustify: post-training robustness modules for image classifiers, honestly evaluated.

The data flows one way: :func:`load_model` -> :func:`insert_meansparse` ->
:func:`calibrate` -> attack/evaluate -> results tables.
"""

__version__ = "0.1.0"

from .calibrate import calibrate, calibrating  # noqa: E402
from .config import MeanSparseConfig, parse_eps  # noqa: E402
from .data import DataError, load_data, loader, to_tensors  # noqa: E402
from .insert import InsertionError, insert_meansparse, plan, remove_meansparse  # noqa: E402
from .meansparse import (  # noqa: E402
    MeanSparse,
    NotCalibratedError,
    bpda,
    defenses_disabled,
    meansparse_modules,
    set_alpha,
)
from .models import ModelInfo, ModelLoadError, load_model  # noqa: E402
from .sites import Site, register_activation  # noqa: E402
from .state import StateMismatchError, load_calibration, save_calibration  # noqa: E402

__all__ = [
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
    "to_tensors",
]
