"""Image folders as ImageNet is evaluated: RobustBench's 5000-image subset, class-spread subsets,
each model's own preprocessing, loader processes. All on real JPEG files generated in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustify import ModelInfo, load_model
from robustify.load.data import (
    DataError,
    class_spread_order,
    default_workers,
    load_data,
    load_model_data,
    loader,
    to_tensors,
)
from robustify.jobs.evaluate import calibration_loader
from robustify.load.preprocessing import build_transform, describe_transform, model_preprocessing

RB = Path(__import__("importlib").util.find_spec("robustbench").submodule_search_locations[0])
SUBSET = (RB / "helper_files" / "imagenet_test_image_ids.txt").read_text().split()
SYNSETS = sorted(json.loads((RB / "helper_files" / "imagenet_class_to_id_map.json").read_text()))


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (20, 15)) -> None:
    """A small real JPEG whose content depends on ``seed`` (so that images differ)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def _folder(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (20, 15)) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _jpeg(root / name / f"{name}_{i:04d}.JPEG", seed=1000 * c + i, size=size)
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``folder:DIR`` tree, class-sorted like ImageNet: 5 classes, 10 train / 8 val JPEGs each."""
    root = tmp_path_factory.mktemp("folder")
    classes = [f"n0{c:07d}" for c in range(5)]
    _folder(root / "train", classes, 10)
    _folder(root / "val", classes, 8)
    return root


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageNet tree: the 1000 synset folders, 2 train JPEGs each, and the first 30 images of
    RobustBench's test subset in ``val/``."""
    root = tmp_path_factory.mktemp("imagenet")
    _folder(root / "train", SYNSETS, 2, size=(8, 6))
    for name in SYNSETS:
        (root / "val" / name).mkdir(parents=True)
    for i, rel in enumerate(SUBSET[:30]):
        _jpeg(root / "val" / rel, seed=7 + i, size=(24, 18))
    return root


RES = build_transform({"source": "default", "name": "Res224"})


def test_twenty_examples_cover_every_class(image_folder: Path) -> None:
    x, y = to_tensors(load_data(f"folder:{image_folder}", "test", n=20, transform=RES))
    assert x.shape == (20, 3, 224, 224)
    assert torch.bincount(y, minlength=5).tolist() == [4, 4, 4, 4, 4]  # not classes 0-2 only
    assert y[:5].tolist() == [0, 1, 2, 3, 4]  # deterministic: each class in turn


def test_holdout_and_calibration_subset_span_classes(image_folder: Path) -> None:
    spec = f"folder:{image_folder}"
    held = load_data(spec, "holdout", holdout=10, transform=RES)
    calib = load_data(spec, "train", holdout=10, transform=RES)
    _, y_held = to_tensors(held)
    assert torch.bincount(y_held, minlength=5).tolist() == [2] * 5  # not the last class
    assert len(calib) == 40
    assert set(held.indices).isdisjoint(calib.indices) and len(set(held.indices) | set(calib.indices)) == 50
    _, y_calib = to_tensors(load_data(spec, "train", holdout=10, n=15, transform=RES))
    assert torch.bincount(y_calib, minlength=5).tolist() == [3] * 5
    info = ModelInfo(spec="m", source="factory", name="m", dataset="imagenet", threat_model="Linf",
                     input_size=(3, 224, 224), num_classes=5, preprocessing={"source": "default", "name": "Res224"})
    batches = list(calibration_loader(spec, info, holdout=10, n_calib=15, batch_size=8, workers=0))
    assert [len(b[0]) for b in batches] == [8, 7]
    assert torch.bincount(torch.cat([b[1] for b in batches]), minlength=5).tolist() == [3] * 5


def test_class_spread_order_unequal_classes() -> None:
    order = class_spread_order([0, 0, 0, 1, 2, 2])
    assert order.tolist() == [0, 3, 4, 1, 5, 2]
    assert sorted(order.tolist()) == list(range(6))


def test_imagenet_holdout_spans_classes(tiny_imagenet: Path) -> None:
    held = load_data(f"imagenet:{tiny_imagenet}", "holdout", holdout=20, transform=RES)
    labels = [held.dataset.targets[i] for i in held.indices]
    assert len(set(labels)) == 20  # twenty classes, not the last ten


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # RobustBench's load_imagenet
def test_imagenet_test_split_is_robustbench_subset(tiny_imagenet: Path) -> None:
    from robustify.core.compat import import_robustbench

    import_robustbench()
    from robustbench.data import PREPROCESSINGS, load_imagenet

    tf = PREPROCESSINGS["BicubicRes256Crop224"]
    x, y = to_tensors(load_data(f"imagenet:{tiny_imagenet}", "test", n=30, transform=tf), workers=0)
    x_rb, y_rb = load_imagenet(n_examples=30, data_dir=str(tiny_imagenet), transforms_test=tf)
    assert torch.equal(x, x_rb) and torch.equal(y, y_rb)
    classes = json.loads((RB / "helper_files" / "imagenet_class_to_id_map.json").read_text())
    assert y.tolist() == [classes[rel.split("/")[0]] for rel in SUBSET[:30]]
    with pytest.raises(DataError, match="lacks 1 of the 31 RobustBench test images"):
        load_data(f"imagenet:{tiny_imagenet}", "test", n=31, transform=tf)


def test_imagenet_needs_the_imagenet_classes(image_folder: Path) -> None:
    with pytest.raises(DataError, match="does not hold ImageNet's 1000 class folders.*folder:DIR"):
        load_data(f"imagenet:{image_folder}", "test", n=4)
    with pytest.raises(DataError, match="does not hold ImageNet's 1000 class folders"):
        load_data(f"imagenet:{image_folder}", "train", n=4)


def test_timm_model_gets_timm_preprocessing_without_normalize(image_folder: Path) -> None:
    from timm.data import create_transform, resolve_data_config

    model, info = load_model("timm:resnet18", dataset="imagenet", pretrained=False)
    config = resolve_data_config(model=model.model)
    assert info.preprocessing == {"source": "timm", "input_size": [3, 224, 224], "interpolation": "bicubic",
                                  "crop_pct": config["crop_pct"], "crop_mode": "center"}
    assert config["crop_pct"] != 0.875  # differs from Res256Crop224, so the test tells them apart
    image = Image.open(next((image_folder / "val").rglob("*.JPEG"))).convert("RGB")
    normalized = create_transform(**config)(image)
    mean, std = (torch.tensor(config[k]).view(3, 1, 1) for k in ("mean", "std"))
    ours = info.transform()(image)
    torch.testing.assert_close(ours, normalized * std + mean)
    assert 0 <= float(ours.min()) and float(ours.max()) <= 1
    assert "Normalize" not in describe_transform(info.transform())
    x, _ = to_tensors(load_model_data(f"folder:{image_folder}", "test", info, n=5))
    torch.testing.assert_close(x[0], info.transform()(Image.open(sorted((image_folder / "val").rglob("*.JPEG"))[0])
                                                       .convert("RGB")))


def test_robustbench_entry_preprocessing(image_folder: Path) -> None:
    from robustify.core.compat import import_robustbench

    import_robustbench()
    from robustbench.data import get_preprocessing
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    for name, key in [("Amini2024MeanSparse_Swin-L", "BicubicRes256Crop224"),
                      ("Amini2024MeanSparse_ConvNeXt-L", "BicubicRes256Crop224"), ("Salman2020Do_R18", "Res256Crop224")]:
        assert model_preprocessing("robustbench", name, "imagenet", "Linf") == {"source": "robustbench", "name": key}
    _, info = load_model("robustbench:Salman2020Do_R18", dataset="imagenet", pretrained=False)
    assert info.preprocessing == {"source": "robustbench", "name": "Res256Crop224"}
    assert info.to_dict()["preprocessing"] == info.preprocessing
    image = Image.open(next((image_folder / "val").rglob("*.JPEG"))).convert("RGB")
    reference = get_preprocessing(BenchmarkDataset.imagenet, ThreatModel.Linf, "Amini2024MeanSparse_Swin-L", None)
    ours = build_transform({"source": "robustbench", "name": "BicubicRes256Crop224"},
                           model="Amini2024MeanSparse_Swin-L", dataset="imagenet", threat_model="Linf")
    assert torch.equal(ours(image), reference(image))
    assert not torch.equal(ours(image), build_transform(None)(image))  # bicubic, not Res256Crop224's bilinear
    assert model_preprocessing("robustbench", "Carmon2019Unlabeled", "cifar10", "Linf")["name"] is None  # ToTensor
    _, aa = load_model("aa-resnet18", pretrained=False)
    assert aa.preprocessing == {"source": "default", "name": None}


def test_loader_workers_and_pinned_memory(image_folder: Path) -> None:
    data = load_data(f"folder:{image_folder}", "test", n=12, transform=RES)
    x0, y0 = to_tensors(data, batch_size=5, workers=0)
    x2, y2 = to_tensors(data, batch_size=5, workers=2)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert default_workers(data) >= 1
    assert default_workers(torch.utils.data.TensorDataset(x0, y0)) == 0
    assert loader(data, device="cuda").pin_memory and not loader(data, device="cpu").pin_memory
    assert loader(data).num_workers == default_workers(data)
    with pytest.raises(DataError, match="workers must be >= 0"):
        loader(data, workers=-1)


def test_evaluation_records_preprocessing(tmp_path: Path) -> None:
    """`robustify evaluate` and `calibrate` on image files: the result names the preprocessing,
    --workers reaches the loader, and a 20-example evaluation covers every class."""
    from robustify.cli import main

    root = tmp_path / "d"
    classes = [f"n0{c:07d}" for c in range(5)]
    _folder(root / "train", classes, 6, size=(32, 32))
    _folder(root / "val", classes, 6, size=(32, 32))
    out = tmp_path / "eval"
    assert main(["evaluate", "tinynets:tiny_cnn", "--data", f"folder:{root}", "--n-examples", "20",
                 "--defense", "meansparse", "--holdout", "5", "--n-calib", "10", "--workers", "2",
                 "--attacks", "apgd-ce", "--apgd-iters", "2", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["meta"]["preprocessing"] == {"source": "default", "name": None, "transform": "ToTensor()"}
    assert result["n_examples"] == 20
    x, y = to_tensors(load_data(f"folder:{root}", "test", n=20, transform=build_transform({"source": "default",
                                                                                            "name": None})))
    assert torch.bincount(y).tolist() == [4] * 5
    assert main(["calibrate", "tinynets:tiny_cnn", "--data", f"folder:{root}", "--workers", "2",
                 "--out", str(tmp_path / "c.safetensors")]) == 0
