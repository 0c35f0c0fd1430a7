"""Datasets as tensors of images in [0, 1]: the data half of the "load" step.

Specs: ``cifar10`` / ``cifar100`` (torchvision, downloaded into a cache), ``imagenet:DIR``
(an ImageFolder tree with ``train/`` and ``val/``, eval transforms), or a ``.npz`` file with
``x_train, y_train, x_test, y_test`` (uint8 NCHW, as ``shared/data/cifar10_subset.npz``).

Splits: ``test`` for evaluation; ``train`` for calibration, minus its last ``holdout``
examples, which form the ``holdout`` split for choosing alpha (never seen by calibration).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .models import default_cache_dir

logger = logging.getLogger(__name__)

__all__ = ["DataError", "check_image_size", "load_data", "loader", "to_tensors", "validate_batch"]

SPLITS = ("train", "test", "holdout")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A dataset spec, file or content is unusable."""


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
        raise DataError(f"images are {image_shape[1]}x{image_shape[2]}; the model expects {expected[1]}x{expected[2]}")


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


def _torchvision(name: str, split: str, cache: Path) -> Dataset:
    import torchvision
    from torchvision import transforms

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    root = cache / "data"
    try:
        return cls(str(root), train=split != "test", download=True, transform=transforms.ToTensor())
    except Exception as exc:  # noqa: BLE001 - URLError, gaierror, ...
        raise DataError(
            f"could not download {name} into {root} ({type(exc).__name__}); offline, point robustify at "
            "local data: --data file.npz (x_train, y_train, x_test, y_test; uint8 NCHW)"
        ) from exc


def _imagenet(root: Path, split: str) -> Dataset:
    from torchvision import datasets, transforms

    folder = root / ("val" if split == "test" else "train")
    if not folder.is_dir():
        raise DataError(f"ImageNet folder {str(folder)!r} does not exist (expected {root}/train and {root}/val)")
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    return datasets.ImageFolder(str(folder), transform=tf)


def load_data(
    spec: str,
    split: str = "test",
    *,
    n: int | None = None,
    holdout: int = 0,
    cache_dir: str | Path | None = None,
    num_classes: int | None = None,
    channels: int | None = None,
) -> Dataset:
    """Load a split of a dataset (see the module doc); ``n`` keeps the first ``n`` examples.

    ``.npz`` contents are checked on load (shape, dtype, values in [0, 1], finite, integer
    labels, and labels below ``num_classes`` and images with ``channels`` channels when
    given: pass the model's ``ModelInfo.num_classes`` and ``input_size[0]``). Every problem
    raises a one-line :class:`DataError`.
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
    elif spec in ("cifar10", "cifar100"):
        dataset = _torchvision(spec, split, cache)
    elif spec.startswith("imagenet:"):
        dataset = _imagenet(Path(spec.split(":", 1)[1]), split)
    else:
        raise DataError(f"unknown dataset {spec!r}: use cifar10, cifar100, imagenet:DIR or a .npz file")
    size = len(dataset)  # type: ignore[arg-type]
    if split != "test" and holdout:
        if holdout < 0 or holdout >= size:
            raise DataError(f"holdout must be in [0, {size}), got {holdout}")
        start, stop = (0, size - holdout) if split == "train" else (size - holdout, size)
        dataset = Subset(dataset, range(start, stop))
    elif split == "holdout":
        raise DataError("the holdout split needs holdout > 0 (the number of training examples to hold out)")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"the {split} split of {spec!r} is empty")
    if n is not None:
        if n <= 0:
            raise DataError(f"n must be positive, got {n}")
        if n > len(dataset):  # type: ignore[arg-type]
            raise DataError(f"asked for {n} examples but the {split} split of {spec!r} has {len(dataset)}")
        dataset = Subset(dataset, range(n))
    return dataset


def loader(dataset: Dataset, batch_size: int = 128, workers: int = 0) -> DataLoader:
    """A deterministic (unshuffled) loader."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def to_tensors(dataset: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a dataset into ``(x, y)`` tensors."""
    xs, ys = [], []
    for x, y in loader(dataset, batch_size):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        raise DataError("dataset is empty")
    return torch.cat(xs), torch.cat(ys).long()
