"""ImageNet: 1000 classes, 224x224 inputs; RobustBench's eps Linf 4/255 (its only ImageNet norm).

``imagenet:DIR`` reads ImageNet's ``train/`` and ``val/`` folders (the class folders must be exactly
ImageNet's 1000 synsets, so that the labels are ImageNet's); the test split is RobustBench's fixed
5000-image subset of ``val/``, in RobustBench's order (:class:`RobustBenchImageNet`). Images get
``Res256Crop224`` (RobustBench's ImageNet default) unless the model has its own preprocessing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from robustify.core.errors import DataError
from robustify.load.datasets._files import image_folder
from robustify.load.datasets.registry import DatasetSpec, register_dataset

__all__ = ["IMAGENET", "RobustBenchImageNet", "check_imagenet_classes", "load_imagenet_files"]


def _robustbench_helper_file(name: str) -> Path:
    from robustify.core.compat import import_robustbench

    return Path(import_robustbench().__file__).parent / "helper_files" / name


def check_imagenet_classes(folder: Path) -> None:
    """Labels are ImageNet's only if the class folders are exactly ImageNet's 1000 synsets."""
    if not folder.is_dir():
        raise DataError(f"ImageNet folder {str(folder)!r} does not exist (expected DIR/train and DIR/val)")
    expected = json.loads(_robustbench_helper_file("imagenet_class_to_id_map.json").read_text())
    found = {d.name for d in os.scandir(folder) if d.is_dir()}
    if found != set(expected):
        missing, unknown = sorted(set(expected) - found), sorted(found - set(expected))
        raise DataError(
            f"{str(folder)!r} does not hold ImageNet's {len(expected)} class folders ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unknown)} unknown, e.g. {unknown[:2]}); for another image folder use folder:DIR"
        )


class RobustBenchImageNet(Dataset):
    """RobustBench's fixed 5000-image ImageNet test subset (``robustbench.loaders.CustomImageFolder``,
    RobustBench's order), yielding ``(image, label)``."""

    #: its examples are image files decoded on every read (loader worker processes pay off)
    reads_files = True

    def __init__(self, val_dir: Path, transform: Callable[..., Any] | None) -> None:
        from robustify.core.compat import import_robustbench

        import_robustbench()
        from robustbench.loaders import CustomImageFolder

        check_imagenet_classes(val_dir)
        self.folder = CustomImageFolder(str(val_dir), transform)
        self.val_dir = val_dir

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label, _ = self.folder[index]
        return image, label

    def check_files(self, indices: Sequence[int]) -> None:
        """A one-line error if an image of ``indices`` is absent from the val folder."""
        missing = [self.folder.samples[i][0] for i in indices if not os.path.isfile(self.folder.samples[i][0])]
        if missing:
            raise DataError(
                f"{str(self.val_dir)!r} lacks {len(missing)} of the {len(indices)} RobustBench test images asked for "
                f"(e.g. {missing[0]!r}): imagenet:DIR evaluates RobustBench's fixed subset of ImageNet's val set; "
                "for another image folder use folder:DIR"
            )


def load_imagenet_files(root: Path, split: str, transform: Callable[..., Any] | None) -> Any:
    """``imagenet:DIR``: RobustBench's test subset of ``DIR/val`` for ``test``, else ``DIR/train``."""
    if split == "test":
        return RobustBenchImageNet(root / "val", transform)
    folder = root / "train"
    check_imagenet_classes(folder)
    return image_folder(folder, transform)


IMAGENET = register_dataset(DatasetSpec(
    name="imagenet",
    classes=1000,
    input_size=(3, 224, 224),
    eps={"Linf": 4 / 255},
    preprocessing="Res256Crop224",
    load_files=load_imagenet_files,
    timm_pretrained=True,
))
