"""Loaders the built-in datasets share: torchvision's downloads and ImageFolder trees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustify.core.errors import DataError

__all__ = ["image_folder", "torchvision_loader"]


def torchvision_loader(name: str, class_name: str) -> Callable[[str, Path], Any]:
    """``(split, cache_dir) -> Dataset``: torchvision's ``datasets.<class_name>``, downloaded into ``cache_dir/data``
    (``test``: its test set; other splits: its training set), images as tensors in [0, 1]."""

    def load(split: str, cache: Path) -> Any:
        import torchvision
        from torchvision import transforms

        cls = getattr(torchvision.datasets, class_name)  # looked up at call time (tests replace it)
        root = Path(cache) / "data"
        try:
            return cls(str(root), train=split != "test", download=True, transform=transforms.ToTensor())
        except Exception as exc:  # noqa: BLE001 - URLError, gaierror, ...
            raise DataError(
                f"could not download {name} into {root} ({type(exc).__name__}); offline, point robustify at "
                "local data: --data file.npz (x_train, y_train, x_test, y_test; uint8 NCHW)"
            ) from exc

    return load


def image_folder(folder: Path, transform: Callable[..., Any] | None) -> Any:
    """torchvision's ``ImageFolder`` over ``folder`` (one sub-folder of images per class), one-line errors."""
    from torchvision import datasets

    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist (expected DIR/train and DIR/val)")
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{str(folder)!r} is not an ImageFolder (one sub-folder of images per class): {exc}") from exc
