"""Datasets: the registry (:mod:`.registry`) and the built-in datasets, one file each.

:mod:`.cifar10`, :mod:`.cifar100` and :mod:`.imagenet` register on import, in this order; a
third-party dataset is one module that calls :func:`register_dataset`, declared in the
``robustify.datasets`` entry-point group (:mod:`robustify.core.plugins`).
"""

from robustify.load.datasets.registry import (ENTRY_POINT_GROUP, EPS, DatasetSpec, EpsTable, FieldTable, dataset_eps,
                                              dataset_names, datasets, find_dataset, get_dataset, load_plugins,
                                              register_dataset, unregister_dataset)
from robustify.load.datasets import cifar10 as _cifar10  # noqa: F401, I001 - the built-ins register, in this order
from robustify.load.datasets import cifar100 as _cifar100  # noqa: F401
from robustify.load.datasets import imagenet as _imagenet  # noqa: F401

__all__ = ["ENTRY_POINT_GROUP", "EPS", "DatasetSpec", "EpsTable", "FieldTable", "dataset_eps", "dataset_names",
           "datasets", "find_dataset", "get_dataset", "load_plugins", "register_dataset", "unregister_dataset"]
