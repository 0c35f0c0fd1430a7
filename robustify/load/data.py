"""Datasets as tensors of images in [0, 1]: the data half of the "load" step.

Specs: a registered dataset's name or ``NAME:DIR`` (:mod:`robustify.load.datasets`: ``cifar10`` /
``cifar100``, torchvision, downloaded into a cache; ``imagenet:DIR``, ImageNet's ``train/`` and ``val/``
folders, the test split being RobustBench's fixed 5000-image subset of ``val/``, in RobustBench's order),
``folder:DIR`` (any ImageFolder tree with ``train/`` and ``val/``; the test split is all of ``val/``), or a
``.npz`` file with ``x_train, y_train, x_test, y_test`` (uint8 NCHW, as ``shared/data/cifar10_subset.npz``).
Image files get the model's preprocessing (``transform``, see :mod:`robustify.load.preprocessing`).

Splits: ``test`` for evaluation; ``train`` for calibration, minus ``holdout`` examples, which
form the ``holdout`` split for choosing alpha (never seen by calibration).

Which examples ``n`` and ``holdout`` take: an ImageFolder is sorted by class, so its
examples are taken class by class in turn (:func:`class_spread_order`: the first image of
every class, then the second of every class, ...) and the holdout is the head of that
order; elsewhere ``n`` keeps the first examples and the holdout is the last ``holdout``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from robustify.core.errors import DataError
from robustify.load.datasets import DatasetSpec, datasets, find_dataset
from robustify.load.datasets._files import image_folder
from robustify.load.models import ModelInfo, default_cache_dir

logger = logging.getLogger(__name__)

__all__ = ["DataError", "check_image_size", "class_spread_order", "default_workers", "load_data", "load_model_data",
           "loader", "reads_image_files", "to_tensors", "validate_batch"]

SPLITS = ("train", "test", "holdout")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
FOLDER_SPEC = "folder:"  # any ImageFolder tree; a registered dataset's image files are ``NAME:DIR``
MAX_AUTO_WORKERS = 8


def check_image_size(image_shape: tuple[int, ...], input_size: tuple[int, ...]) -> None:
    """Refuse images of shape ``(C, H, W)`` that do not fit the model's ``input_size``
    (``(C,)`` checks the channels only), with a one-line :class:`DataError`."""
    expected = tuple(input_size)
    if image_shape[0] != expected[0]:
        raise DataError(
            f"images have {image_shape[0]} channel(s) (shape {tuple(image_shape)}), the model expects {expected[0]} "
            f"(input size {expected})"
        )
    if len(expected) == 3 and tuple(image_shape[1:]) != expected[1:]:
        raise DataError(f"images are {image_shape[1]}x{image_shape[2]}; the model expects {expected[1]}x{expected[2]} "
                        "(--image-size N sets the model's input size: a timm model is built for N x N images)")


def validate_batch(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    num_classes: int | None = None,
    *,
    input_size: tuple[int, ...] | None = None,
) -> None:
    """Refuse a batch a model must not be fed, with a one-line :class:`DataError`.

    Checks: a 4-D floating-point batch; values finite and in [0, 1]; the channel count (and,
    when given, height and width) of ``input_size`` ``(C, H, W)``; as many labels as images,
    integer labels in ``[0, num_classes)``.
    """
    if x.dim() != 4:
        raise DataError(f"images must be a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise DataError(f"images must be floating point in [0, 1], got dtype {x.dtype}")
    if input_size is not None:
        check_image_size(tuple(x.shape[1:]), input_size)
    if x.numel():
        if not torch.isfinite(x).all():
            raise DataError("images contain NaN or Inf values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise DataError(
                f"images must be in [0, 1], got values in [{lo:g}, {hi:g}] (divide uint8 images by 255; "
                "normalisation belongs inside the model)"
            )
    if y is not None:
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{x.shape[0]} images but labels of shape {tuple(y.shape)}")
        if torch.is_floating_point(y) or torch.is_complex(y) or y.dtype == torch.bool:
            raise DataError(f"labels must be integers, got dtype {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
            bound = num_classes if num_classes is not None else "n_classes"
            raise DataError(f"labels must be in [0, {bound}), got values in [{int(y.min())}, {int(y.max())}]")


def _npz(path: Path, split: str) -> TensorDataset:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    part = "test" if split == "test" else "train"
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data]
            if missing:
                raise DataError(f"{str(path)!r} lacks arrays {missing}; expected {list(NPZ_KEYS)}")
            x, y = data[f"x_{part}"], data[f"y_{part}"]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/format errors, truncated files, object arrays
        raise DataError(f"cannot read {str(path)!r} (truncated or not an .npz of plain arrays): {exc}") from exc
    if x.ndim != 4:
        raise DataError(f"{str(path)!r}: x_{part} must be 4-D (N, C, H, W), got shape {x.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{str(path)!r}: y_{part} must hold integer labels, got dtype {y.dtype}")
    if x.dtype == np.uint8:
        xt = torch.from_numpy(x).float().div_(255)
    elif np.issubdtype(x.dtype, np.floating):
        xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    else:
        raise DataError(f"{str(path)!r}: x_{part} must be uint8 (0..255) or float in [0, 1], got dtype {x.dtype}")
    if xt.shape[1] not in (1, 3) and xt.shape[-1] in (1, 3):
        xt = xt.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    yt = torch.from_numpy(np.asarray(y)).long()
    try:
        validate_batch(xt, yt)
    except DataError as exc:
        raise DataError(f"{str(path)!r} ({part} split): {exc}") from None
    return TensorDataset(xt, yt)


def _named(spec: str) -> DatasetSpec | None:
    """The registered dataset the data spec ``spec`` names (``NAME``), if it can load it."""
    found = find_dataset(spec)
    return found if found is not None and found.load is not None else None


def _files_dataset(spec: str) -> DatasetSpec | None:
    """The registered dataset whose image files ``spec`` (``NAME:DIR``) names, if it reads them."""
    kind, sep, _ = spec.partition(":")
    found = find_dataset(kind) if sep else None
    return found if found is not None and found.load_files is not None else None


def _spec_choices() -> str:
    """The data specs :func:`load_data` takes, in words (``cifar10, cifar100, imagenet:DIR, folder:DIR or ...``)."""
    named = [d.name for d in datasets() if d.load is not None]
    files = [f"{d.name}:DIR" for d in datasets() if d.load_files is not None]
    return ", ".join([*named, *files, f"{FOLDER_SPEC}DIR"]) + " or a .npz file"


def reads_image_files(spec: str) -> bool:
    """Whether ``spec`` names image files (which take the model's preprocessing)."""
    return spec.startswith(FOLDER_SPEC) or _files_dataset(spec) is not None


def _image_dataset(spec: str, split: str, transform: Callable | None) -> Dataset:
    """``folder:DIR`` or a registered dataset's ``NAME:DIR``; ``transform`` None: the dataset's default preprocessing."""
    from robustify.load.preprocessing import build_transform

    root = Path(spec.partition(":")[2])
    owner = _files_dataset(spec)
    if transform is None:
        default = owner.preprocessing if owner is not None else None
        transform = build_transform({"source": "default", "name": default} if default else None)
    if owner is None:
        return image_folder(root / ("val" if split == "test" else "train"), transform)
    return owner.load_files(root, split, transform)  # type: ignore[misc]


def class_spread_order(targets: Sequence[int] | np.ndarray) -> np.ndarray:
    """Indices taking every class in turn: the first example of each class (in class order),
    then the second of each class, ... Any prefix is spread evenly over the classes."""
    labels = np.asarray(targets)
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.lexsort((labels, rank))


def _selection_order(dataset: Dataset) -> tuple[Sequence[int], bool]:
    """The order ``n``/``holdout`` take examples in, and whether it is class-spread (holdout first)."""
    from torchvision.datasets import DatasetFolder

    if isinstance(dataset, DatasetFolder):
        return class_spread_order(dataset.targets).tolist(), True
    return range(len(dataset)), False  # type: ignore[arg-type]


def _warn_if_class_sorted(spec: str, dataset: Dataset) -> None:
    labels = dataset.tensors[1]  # type: ignore[attr-defined]
    if labels.numel() > 1 and bool((labels[1:] >= labels[:-1]).all()) and int(labels[0]) != int(labels[-1]):
        logger.warning("%s is sorted by class: n and holdout take its first/last examples, which cover few classes",
                       spec)


def load_data(
    spec: str,
    split: str = "test",
    *,
    n: int | None = None,
    holdout: int = 0,
    cache_dir: str | Path | None = None,
    num_classes: int | None = None,
    channels: int | None = None,
    transform: Callable | None = None,
) -> Dataset:
    """Load a split of a dataset (see the module doc); ``n`` keeps ``n`` examples.

    ``transform`` turns each image file (``imagenet:``/``folder:``) into a tensor in [0, 1]:
    pass the model's (``ModelInfo.transform()``, or use :func:`load_model_data`); default
    ``Res256Crop224``. ``.npz`` contents are checked on load (shape, dtype, values in [0, 1],
    finite, integer labels, and labels below ``num_classes`` and images with ``channels``
    channels when given: pass the model's ``ModelInfo.num_classes`` and ``input_size[0]``).
    Every problem raises a one-line :class:`DataError`.

    Args:
        spec: a registered dataset's ``NAME`` or ``NAME:DIR`` (``cifar10``, ``cifar100``, ``imagenet:DIR``),
            ``folder:DIR`` or a ``.npz`` file with ``x_train, y_train, x_test, y_test`` (uint8 NCHW).
        split: ``"train"`` (minus the last ``holdout`` examples), ``"holdout"`` (those) or ``"test"``.
        n: keep the first ``n`` examples (class-spread on an image folder); None keeps all.
        holdout: training examples held out from the training split (for choosing a setting).
        cache_dir: where downloads are cached (None: ``$ROBUSTIFY_CACHE`` or ``~/.cache/robustify``).
        num_classes: check that labels are below it (the model's ``ModelInfo.num_classes``).
        channels: check the images' channel count (the model's ``input_size[0]``).
        transform: turns each image file into a tensor in [0, 1] (default ``Res256Crop224``).

    Returns:
        A ``torch.utils.data.Dataset`` of ``(image, label)`` with images in [0, 1].

    Raises:
        DataError: a missing or malformed file, an unknown split or spec.

    Examples:
        >>> data = rb.load_data("../shared/data/cifar10_subset.npz", "test", n=4)
        >>> len(data), data[0][0].shape
        (4, torch.Size([3, 32, 32]))
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec.endswith(".npz"):
        dataset: Dataset = _npz(Path(spec), split)
        images, labels = dataset.tensors  # type: ignore[attr-defined]
        if channels is not None and images.shape[1] != channels:
            raise DataError(f"{spec!r} has {images.shape[1]}-channel images, the model expects {channels} channels")
        if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
            raise DataError(
                f"{spec!r} has labels up to {int(labels.max())}, but the model has {num_classes} classes"
            )
        if n is not None or holdout:
            _warn_if_class_sorted(spec, dataset)
    elif (named := _named(spec)) is not None:
        dataset = named.load(split, cache)  # type: ignore[misc]
    elif reads_image_files(spec):
        dataset = _image_dataset(spec, split, transform)
    else:
        raise DataError(f"unknown dataset {spec!r}: use {_spec_choices()}")
    order, spread = _selection_order(dataset)
    size = len(order)
    if split != "test" and holdout:
        if holdout < 0 or holdout >= size:
            raise DataError(f"holdout must be in [0, {size}), got {holdout}")
        cut = holdout if spread else size - holdout
        head, tail = order[:cut], order[cut:]
        order = (tail if split == "train" else head) if spread else (head if split == "train" else tail)
    elif split == "holdout":
        raise DataError("the holdout split needs holdout > 0 (the number of training examples to hold out)")
    if len(order) == 0:
        raise DataError(f"the {split} split of {spec!r} is empty")
    if n is not None:
        if n <= 0:
            raise DataError(f"n must be positive, got {n}")
        if n > len(order):
            raise DataError(f"asked for {n} examples but the {split} split of {spec!r} has {len(order)}")
        order = order[:n]
    check_files = getattr(dataset, "check_files", None)  # a dataset that can tell missing image files early
    if callable(check_files):
        check_files(order)
    return dataset if order == range(size) else Subset(dataset, order)


def load_model_data(spec: str, split: str, info: ModelInfo, **kwargs: Any) -> Dataset:
    """:func:`load_data` for a model: its preprocessing for image files, its classes and channels checked."""
    transform = info.transform() if reads_image_files(spec) else None
    return load_data(spec, split, num_classes=info.num_classes, channels=info.input_size[0], transform=transform,
                     **kwargs)


def _reads_files(dataset: Dataset) -> bool:
    from torchvision.datasets import DatasetFolder

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, DatasetFolder) or bool(getattr(dataset, "reads_files", False))


def default_workers(dataset: Dataset) -> int:
    """Loader processes when none are asked for: one per CPU (at most 8) for image files, none for
    tensors already in memory (worker processes would only copy them)."""
    if not _reads_files(dataset):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_AUTO_WORKERS, cpus)


def loader(dataset: Dataset, batch_size: int = 128, workers: int | None = None,
           device: torch.device | str | None = None) -> DataLoader:
    """A deterministic (unshuffled) loader; ``workers`` processes decode images (None: :func:`default_workers`),
    into pinned memory when ``device`` is CUDA.

    Args:
        dataset: the dataset to batch (:func:`load_data`).
        batch_size: examples per batch.
        workers: data-loading processes (None: :func:`default_workers`, 0: in this process).
        device: where the batches go (pinned memory when it is CUDA).

    Returns:
        A ``torch.utils.data.DataLoader`` in the dataset's order.

    Examples:
        >>> batches = rb.loader(rb.load_data("../shared/data/cifar10_subset.npz", "test", n=10), batch_size=4)
        >>> [len(y) for _, y in batches]
        [4, 4, 2]
    """
    if workers is None:
        workers = default_workers(dataset)
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin)


def to_tensors(dataset: Dataset, batch_size: int = 256, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a dataset into ``(x, y)`` tensors.

    Args:
        dataset: the dataset (:func:`load_data`).
        batch_size: examples read per step.
        workers: data-loading processes (None: :func:`default_workers`).

    Returns:
        ``(x, y)``: images ``(N, C, H, W)`` in [0, 1] and integer labels ``(N,)``.

    Examples:
        >>> x, y = rb.to_tensors(rb.load_data("../shared/data/cifar10_subset.npz", "test", n=8))
        >>> x.shape, y.tolist()
        (torch.Size([8, 3, 32, 32]), [3, 8, 8, 0, 6, 6, 1, 6])
    """
    xs, ys = [], []
    for x, y in loader(dataset, batch_size, workers):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        raise DataError("dataset is empty")
    return torch.cat(xs), torch.cat(ys).long()
