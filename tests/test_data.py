"""Datasets: .npz files, splits and hold-out, and every bad input refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robustify.load.data import DataError, load_data, loader, to_tensors, validate_batch


def _write_npz(path: Path, **overrides: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(20, 3, 4, 4), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=20),
        "x_test": rng.integers(0, 256, size=(8, 3, 4, 4), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=8),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_real_cifar_subset(cifar_npz: Path) -> None:
    test = load_data(str(cifar_npz), "test", n=100)
    x, y = to_tensors(test)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.max()) > 0.9
    with np.load(cifar_npz) as data:
        torch.testing.assert_close(x, torch.from_numpy(data["x_test"][:100]).float() / 255)
        assert torch.equal(y, torch.from_numpy(data["y_test"][:100]).long())
    assert len(load_data(str(cifar_npz), "train")) == 5085


def test_splits_and_holdout(tmp_path: Path) -> None:
    path = str(_write_npz(tmp_path / "d.npz"))
    x_all, _ = to_tensors(load_data(path, "train"))
    calib, _ = to_tensors(load_data(path, "train", holdout=5))
    held, _ = to_tensors(load_data(path, "holdout", holdout=5))
    assert len(calib) == 15 and len(held) == 5
    assert torch.equal(torch.cat([calib, held]), x_all)  # disjoint, nothing lost
    assert len(load_data(path, "test")) == 8
    first, _ = to_tensors(load_data(path, "train", n=4, holdout=5))
    assert torch.equal(first, x_all[:4])
    batches = [len(b[0]) for b in loader(load_data(path, "train"), batch_size=6)]
    assert batches == [6, 6, 6, 2]


def test_float_and_channels_last_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((5, 4, 4, 3)).astype(np.float32)  # NHWC float in [0, 1]
    path = _write_npz(tmp_path / "f.npz", x_test=x, y_test=np.arange(5))
    xt, _ = to_tensors(load_data(str(path), "test"))
    assert xt.shape == (5, 3, 4, 4)
    torch.testing.assert_close(xt, torch.from_numpy(x).permute(0, 3, 1, 2))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"x_test": np.full((4, 3, 4, 4), 200.0, dtype=np.float32)}, r"must be in \[0, 1\], got values in \[200, 200\]"),
        ({"x_test": np.full((4, 3, 4, 4), np.nan, dtype=np.float32)}, "NaN or Inf"),
        ({"x_test": np.full((4, 3, 4, 4), np.inf, dtype=np.float32)}, "NaN or Inf"),
        ({"x_test": np.zeros((4, 3, 16), dtype=np.uint8)}, "must be 4-D"),
        ({"x_test": np.zeros((4, 3, 4, 4), dtype=np.int64)}, "must be uint8"),
        ({"y_test": np.array([0.5, 1.0, 2.0, 3.0])}, "integer labels"),
        ({"y_test": np.array([0, -1, 2, 3])}, r"labels must be in \[0, "),
        ({"y_test": np.array([0, 1, 2])}, r"4 images but labels of shape \(3,\)"),
        ({"y_test": None}, r"lacks arrays \['y_test'\]"),
    ],
    ids=["0-255 floats", "nan", "inf", "3-D", "int images", "float labels", "negative label", "label count", "missing"],
)
def test_bad_npz_content_is_refused(tmp_path: Path, overrides: dict, message: str) -> None:
    base = {"x_test": np.zeros((4, 3, 4, 4), dtype=np.uint8), "y_test": np.arange(4)}
    path = _write_npz(tmp_path / "bad.npz", **{**base, **overrides})
    with pytest.raises(DataError, match=message) as info:
        load_data(str(path), "test")
    assert "\n" not in str(info.value)


def test_labels_beyond_the_model_classes(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "d.npz", x_test=np.zeros((3, 3, 4, 4), np.uint8), y_test=np.array([0, 5, 12]))
    assert len(load_data(str(path), "test")) == 3
    with pytest.raises(DataError, match="labels up to 12, but the model has 10 classes"):
        load_data(str(path), "test", num_classes=10)


def test_channel_count_for_the_model(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "gray.npz", x_test=np.zeros((3, 1, 4, 4), np.uint8), y_test=np.arange(3))
    assert len(load_data(str(path), "test", channels=1)) == 3
    with pytest.raises(DataError, match="has 1-channel images, the model expects 3 channels"):
        load_data(str(path), "test", channels=3)


def test_empty_dataset_and_too_many_examples(tmp_path: Path) -> None:
    path = str(_write_npz(tmp_path / "e.npz", x_test=np.zeros((0, 3, 4, 4), np.uint8), y_test=np.zeros(0, np.int64)))
    with pytest.raises(DataError, match="the test split of .* is empty"):
        load_data(path, "test")
    with pytest.raises(DataError, match="asked for 21 examples but the train split of .* has 20"):
        load_data(path, "train", n=21)
    with pytest.raises(DataError, match="n must be positive"):
        load_data(path, "train", n=0)
    with pytest.raises(DataError, match=r"holdout must be in \[0, 20\), got 20"):
        load_data(path, "train", holdout=20)
    with pytest.raises(DataError, match="holdout split needs holdout > 0"):
        load_data(path, "holdout")
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_data(path, "val")


def test_unknown_missing_and_corrupted_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_data("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "absent.npz"))
    with pytest.raises(DataError, match="ImageNet folder .* does not exist"):
        load_data(f"imagenet:{tmp_path}")
    good = _write_npz(tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError, match="cannot read .*truncated") as info:
        load_data(str(truncated), "test")
    assert "\n" not in str(info.value)
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, x_train=np.array([object()]), y_train=np.zeros(1), x_test=np.array([object()]), y_test=np.zeros(1))
    with pytest.raises(DataError, match="cannot read"):  # object arrays need pickle: refused
        load_data(str(pickled), "test")


def test_offline_download_says_how_to_use_local_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(DataError, match=r"offline, point robustify at local data: --data file\.npz"):
        load_data("cifar10", "test", cache_dir=tmp_path)


def test_validate_batch() -> None:
    x = torch.rand(4, 3, 8, 8)
    validate_batch(x, torch.tensor([0, 1, 2, 9]), 10, input_size=(3, 8, 8))
    cases = [
        (lambda: validate_batch(x * 255), r"\[0, 1\]"),
        (lambda: validate_batch(x - 0.5), r"\[0, 1\]"),
        (lambda: validate_batch(torch.full((1, 3, 2, 2), float("nan"))), "NaN"),
        (lambda: validate_batch((x * 255).to(torch.uint8)), "floating point"),
        (lambda: validate_batch(x[0]), "4-D"),
        (lambda: validate_batch(x[:, :1], input_size=(3, 8, 8)), r"1 channel\(s\).*expects 3"),
        (lambda: validate_batch(x, input_size=(3, 32, 32)), "8x8; the model expects 32x32"),
        (lambda: validate_batch(x, torch.tensor([0, 1, 2, 10]), 10), r"labels must be in \[0, 10\)"),
        (lambda: validate_batch(x, torch.tensor([0.0, 1, 2, 3])), "integers"),
        (lambda: validate_batch(x, torch.tensor([0, 1])), "4 images but labels"),
    ]
    for call, message in cases:
        with pytest.raises(DataError, match=message):
            call()
