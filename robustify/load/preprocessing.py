"""Each model's input preprocessing for image files: part of the "load" step.

Images read from files (``imagenet:DIR``, ``folder:DIR``) are resized and cropped the way
the model was evaluated, and end as tensors in [0, 1] (normalisation lives inside the
model, see :class:`robustify.load.models.NormalizedModel`):

* ``robustbench:NAME`` — RobustBench's own choice, ``robustbench.data.get_preprocessing``
  (the zoo entry's ``preprocessing``, e.g. ``BicubicRes256Crop224`` for the MeanSparse
  Swin-L and ConvNeXt-L; timm's config for the zoo's timm-registered models; ``ToTensor``
  off ImageNet).
* ``timm:NAME`` — timm's pretrained config (``timm.data.resolve_data_config`` /
  ``create_transform``) without its ``Normalize``.
* anything else — the dataset's registered default (:attr:`robustify.load.datasets.DatasetSpec.preprocessing`:
  ``Res256Crop224``, RobustBench's ImageNet default, for ImageNet), ``ToTensor`` where it has none.

The description (a small JSON-able dict) is kept in :attr:`robustify.load.models.ModelInfo.preprocessing`
and, with the transform itself spelled out, in every result's meta.
"""

from __future__ import annotations
from robustify.core.errors import UserError

import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from robustify.load.datasets import find_dataset

logger = logging.getLogger(__name__)

__all__ = ["build_transform", "describe_transform", "model_preprocessing"]

#: the preprocessing of image files nothing else describes (``folder:DIR``): RobustBench's ImageNet default
DEFAULT_IMAGENET = "Res256Crop224"
TIMM_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode")


def _robustbench_data() -> Any:
    from robustify.core.compat import import_robustbench

    import_robustbench()
    import robustbench.data

    return robustbench.data


def _robustbench_transform(name: str, dataset: str, threat_model: str) -> Callable:
    rb_data = _robustbench_data()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return rb_data.get_preprocessing(BenchmarkDataset(dataset), ThreatModel(threat_model), name, None)


def _timm_config(net: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    config = resolve_data_config(model=net)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in TIMM_KEYS}


def model_preprocessing(source: str, name: str, dataset: str, threat_model: str,
                        net: nn.Module | None = None, *, input_size: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Describe the preprocessing of a loaded model (``net``: the timm model, for ``timm``; ``input_size``: the
    size a timm model was built for, where it is not its pretrained config's).

    ``{"source": "robustbench", "name": KEY}`` (a key of RobustBench's ``PREPROCESSINGS``,
    or ``"timm"`` for the zoo's timm-registered models), ``{"source": "timm", "input_size",
    "interpolation", "crop_pct", "crop_mode"}``, or ``{"source": "default", "name": KEY}``.
    """
    if source == "robustbench":
        transform = _robustbench_transform(name, dataset, threat_model)
        keys = [k for k, v in _robustbench_data().PREPROCESSINGS.items() if v is transform]
        return {"source": "robustbench", "name": keys[0] if keys else "timm"}
    if source == "timm" and net is not None:
        config = _timm_config(net)
        return {"source": "timm", **config, **({"input_size": list(input_size)} if input_size is not None else {})}
    return {"source": "default", "name": _dataset_default(dataset)}


def _dataset_default(dataset: str) -> str | None:
    """The registered default preprocessing of ``dataset``'s image files (None: none, or no such dataset)."""
    spec = find_dataset(dataset)
    return spec.preprocessing if spec is not None else None


def build_transform(preprocessing: Mapping[str, Any] | None, *, model: str = "", dataset: str = "imagenet",
                    threat_model: str = "Linf") -> Callable:
    """The PIL-image -> tensor-in-[0, 1] transform a description stands for.

    ``model``, ``dataset`` and ``threat_model`` (the ``ModelInfo``'s ``name``, ``dataset`` and
    ``threat_model``) are needed for ``robustbench`` descriptions, which are rebuilt by
    RobustBench's ``get_preprocessing``. ``None`` is the ImageNet default, ``Res256Crop224``.
    """
    preprocessing = dict(preprocessing or {"source": "default", "name": DEFAULT_IMAGENET})
    source = preprocessing.get("source")
    if source == "robustbench":
        return _robustbench_transform(model, dataset, threat_model)
    if source == "timm":
        from timm.data import create_transform
        from torchvision import transforms

        config = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocessing.items() if k in TIMM_KEYS}
        timm_tf = create_transform(**config, is_training=False)
        return transforms.Compose([t for t in timm_tf.transforms if not isinstance(t, transforms.Normalize)])
    if source == "default":
        table = _robustbench_data().PREPROCESSINGS
        if preprocessing.get("name") not in table:
            raise UserError(f"unknown preprocessing {preprocessing.get('name')!r}; choose from {list(table)}")
        return table[preprocessing.get("name")]
    raise UserError(f"unknown preprocessing source {source!r} in {preprocessing}")


def describe_transform(transform: Callable) -> str:
    """One line naming every step, e.g. ``Resize(size=256, ...) -> CenterCrop(...) -> ToTensor()``."""
    steps = getattr(transform, "transforms", [transform])
    return " -> ".join(" ".join(repr(t).split()) for t in steps)
