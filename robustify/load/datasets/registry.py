"""The dataset registry: one :class:`DatasetSpec` per dataset, the one place its facts live.

A dataset is one file plus one registration::

    register_dataset(DatasetSpec(name="cifar10", classes=10, input_size=(3, 32, 32),
                                 eps={"Linf": 8 / 255, "L2": 0.5, "L1": 12.0}, load=...))

and from then on :func:`robustify.load.models.load_model` (classes, input size), the attack
configs' default eps (:func:`dataset_eps`), the data specs of :func:`robustify.load.data.load_data`
(``NAME`` or ``NAME:DIR``) and the default preprocessing of its image files know it. The built-in
datasets register when :mod:`robustify.load.datasets` is imported; third-party ones through the
``robustify.datasets`` entry-point group (:func:`load_plugins`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustify.core.errors import UserError
from robustify.core.plugins import load_entry_points

logger = logging.getLogger(__name__)

__all__ = ["ENTRY_POINT_GROUP", "EPS", "DatasetSpec", "EpsTable", "FieldTable", "dataset_eps", "dataset_names",
           "datasets", "find_dataset", "get_dataset", "load_plugins", "register_dataset", "unregister_dataset"]

#: the entry-point group third-party datasets register in (``name = "package.module"``; importing it registers)
ENTRY_POINT_GROUP = "robustify.datasets"

#: ``(split, cache_dir) -> torch Dataset`` of images in [0, 1] (the data spec ``NAME``)
LoadNamed = Callable[[str, Path], Any]
#: ``(root, split, transform) -> torch Dataset`` of image files under ``root`` (the data spec ``NAME:DIR``)
LoadFiles = Callable[[Path, str, Callable[..., Any] | None], Any]


@dataclass(frozen=True, eq=False)
class DatasetSpec:
    """What robustify knows about one dataset (a RobustBench leaderboard's, or a plugin's).

    Attributes:
        name: the ``--dataset`` name (also the data spec ``NAME`` / ``NAME:DIR`` when it can be loaded).
        classes: the number of classes (a loaded model's output size).
        input_size: a model's input ``(C, H, W)``.
        eps: RobustBench's eps per norm (``Linf``, ``L2``, ``L1``): the attacks' default where none is given;
            a norm without one has no default (RobustBench has no such leaderboard).
        preprocessing: the default preprocessing of its image files (a key of RobustBench's
            ``PREPROCESSINGS``, e.g. ``Res256Crop224``; None: none, tensors already at the input size).
        load: ``(split, cache_dir) -> Dataset``: the named data (``--data NAME``, e.g. torchvision's download).
        load_files: ``(root, split, transform) -> Dataset``: its image files under a folder (``--data NAME:DIR``).
        timm_pretrained: timm's pretrained models are trained on it: a ``timm:`` model keeps its own head.
    """

    name: str
    classes: int
    input_size: tuple[int, int, int]
    eps: Mapping[str, float] = field(default_factory=dict)
    preprocessing: str | None = None
    load: LoadNamed | None = None
    load_files: LoadFiles | None = None
    timm_pretrained: bool = False

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name or self.name == "folder":
            raise TypeError(f"a dataset needs a name without ':' other than 'folder', got {self.name!r}")
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < 1:
            raise TypeError(f"dataset {self.name!r}: classes must be a positive integer, got {self.classes!r}")
        if len(tuple(self.input_size)) != 3:
            raise TypeError(f"dataset {self.name!r}: input_size must be (C, H, W), got {self.input_size!r}")
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))
        object.__setattr__(self, "eps", {str(k): float(v) for k, v in dict(self.eps).items()})


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register ``spec`` under its name (a name may be registered once); returns it."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset takes a robustify.load.datasets.DatasetSpec, got {type(spec).__name__}")
    if spec.name in _DATASETS and _DATASETS[spec.name] is not spec:
        raise UserError(f"dataset {spec.name!r} already registered")
    _DATASETS[spec.name] = spec
    logger.debug("dataset %r registered", spec.name)
    return spec


def unregister_dataset(name: str) -> None:
    """Forget dataset ``name`` (tests and plugin reloads); nothing if it is not registered."""
    _DATASETS.pop(name, None)


def load_plugins() -> list[str]:
    """Import the modules of the ``robustify.datasets`` entry points (they register themselves); the names loaded."""
    return load_entry_points(ENTRY_POINT_GROUP)


def dataset_names() -> tuple[str, ...]:
    """The registered dataset names, in registration order."""
    return tuple(_DATASETS)


def datasets() -> tuple[DatasetSpec, ...]:
    """The registered datasets, in registration order."""
    return tuple(_DATASETS.values())


def find_dataset(name: str) -> DatasetSpec | None:
    """The dataset registered as ``name`` (the plugins' too), or None."""
    if name not in _DATASETS:
        load_plugins()
    return _DATASETS.get(name)


def get_dataset(name: str) -> DatasetSpec:
    """The dataset registered as ``name``; a one-line error for an unknown name."""
    spec = find_dataset(name)
    if spec is None:
        raise UserError(f"unknown dataset {name!r}; choose from {sorted(_DATASETS)}")
    return spec


def dataset_eps(dataset: str, norm: str) -> float:
    """RobustBench's eps for ``dataset`` under ``norm``; a one-line error where it has none."""
    spec = find_dataset(dataset)
    if spec is None or norm not in spec.eps:
        raise UserError(f"no default eps for {dataset} {norm} (RobustBench has no such leaderboard): "
                        "give one (--eps)")
    return spec.eps[norm]


class FieldTable(Mapping[str, Any]):
    """A read-only, live ``{dataset: spec.<attribute>}`` view of the registry (the old module-level tables)."""

    def __init__(self, attribute: str) -> None:
        self._attribute = attribute

    def __getitem__(self, name: str) -> Any:
        spec = find_dataset(name)
        if spec is None:
            raise KeyError(name)
        return getattr(spec, self._attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(dataset_names())

    def __len__(self) -> int:
        return len(_DATASETS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


class EpsTable(Mapping[tuple[str, str], float]):
    """A read-only, live ``{(dataset, norm): eps}`` view of the registry (RobustBench's eps)."""

    def __getitem__(self, key: tuple[str, str]) -> float:
        dataset, norm = key
        spec = find_dataset(dataset)
        if spec is None or norm not in spec.eps:
            raise KeyError(key)
        return spec.eps[norm]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter([(spec.name, norm) for spec in datasets() for norm in spec.eps])

    def __len__(self) -> int:
        return sum(len(spec.eps) for spec in datasets())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


#: ``{(dataset, norm): eps}`` of every registered dataset, live
EPS: Mapping[tuple[str, str], float] = EpsTable()
