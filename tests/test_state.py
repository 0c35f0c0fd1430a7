"""Calibration files: round trip, refusal of models they do not fit, damaged and mismatched files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from robustify import StateMismatchError, calibrate
from robustify.defenses.meansparse import MeanSparseConfig
from robustify.defenses.meansparse import insert_meansparse
from robustify.defenses.meansparse import load_calibration
from robustify.defenses.meansparse import meansparse_modules
from robustify.defenses.meansparse import save_calibration
from robustify.defenses import file as defense_file_module
from robustify.defenses.meansparse.state import content_digest, sidecar_path


def _calibrated(model: nn.Module, x: torch.Tensor, config: MeanSparseConfig) -> nn.Module:
    model = insert_meansparse(model, x, config)
    calibrate(model, list(x.split(3)), progress=False)
    return model


def _save(model: nn.Module, path: Path, config: MeanSparseConfig, spec: str = "tiny") -> Path:
    return save_calibration(model, path, config=config, model_info={"spec": spec}, extra={"data": "unit"})


def test_round_trip_restores_identical_outputs(tiny_model, tiny_input, tmp_path: Path) -> None:
    fresh = copy.deepcopy(tiny_model)
    config = MeanSparseConfig(alpha=0.3, site_alpha={"act3": 0.7})
    model = _calibrated(tiny_model, tiny_input, config)
    path = _save(model, tmp_path / "calib.safetensors", config)
    tensors = load_file(str(path))
    sites = list(meansparse_modules(model))
    assert set(tensors) == {f"{s}.{k}" for s in sites for k in ("mean", "var")}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["model"] == {"spec": "tiny"} and meta["data"] == "unit"
    assert [s["name"] for s in meta["sites"]] == sites
    assert meta["config"]["alpha"] == 0.3 and meta["config"]["site_alpha"] == {"act3": 0.7}

    restored = load_calibration(fresh, path, tiny_input)
    with torch.no_grad():
        assert torch.equal(restored(tiny_input), model(tiny_input))
    assert {s: m.alpha for s, m in meansparse_modules(restored).items()} == {s: m.alpha for s, m in meansparse_modules(model).items()}


def test_round_trip_on_fx_rewritten_model(aa_model, tmp_path: Path) -> None:
    from robustify import load_model

    base, info = aa_model
    config = MeanSparseConfig(alpha=0.25)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = _calibrated(base, x, config)
    path = _save(model, tmp_path / "aa.safetensors", config, spec="aa-resnet18")
    fresh, _ = load_model("aa-resnet18")
    restored = load_calibration(fresh, path, info.example_input())
    assert len(meansparse_modules(restored)) == 17
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_saving_is_deterministic(tiny_model, tiny_input, tmp_path: Path) -> None:
    config = MeanSparseConfig(alpha=0.1)
    model = _calibrated(tiny_model, tiny_input, config)
    a, b = _save(model, tmp_path / "a.safetensors", config), _save(model, tmp_path / "b.safetensors", config)
    assert a.read_bytes() == b.read_bytes()
    assert sidecar_path(a).read_bytes() == sidecar_path(b).read_bytes()
    with safe_open(str(a), framework="pt") as f:
        assert f.metadata() == {"format": "robustify-defense"}
    assert json.loads(sidecar_path(a).read_text())["content_sha256"] == content_digest(load_file(str(a)))


def test_refuses_a_model_it_does_not_fit(tiny_model, tiny_input, aa_model, tmp_path: Path) -> None:
    config = MeanSparseConfig(alpha=0.2)
    path = _save(_calibrated(tiny_model, tiny_input, config), tmp_path / "tiny.safetensors", config)
    other, info = aa_model
    with pytest.raises(StateMismatchError, match=r"does not fit this model \(saved for tiny\): \d+ saved site\(s\) not in the model") as exc:
        load_calibration(other, path, info.example_input())
    assert "\n" not in str(exc.value)
    assert not meansparse_modules(other)


def test_refuses_different_channel_counts(tiny_model, tiny_input, tmp_path: Path) -> None:
    config = MeanSparseConfig(alpha=0.2)
    wider = copy.deepcopy(tiny_model)
    path = _save(_calibrated(tiny_model, tiny_input, config), tmp_path / "tiny.safetensors", config)
    wider.conv1, wider.bn1, wider.conv2 = nn.Conv2d(3, 9, 3, padding=1), nn.BatchNorm2d(9), nn.Conv2d(9, 8, 3, padding=1, stride=2)
    wider.eval()
    with pytest.raises(StateMismatchError, match="site 'act1' has 9 channels, the file has 6"):
        load_calibration(wider, path, tiny_input)
    assert not meansparse_modules(wider)  # left as it was


def test_refuses_saving_uncalibrated(tiny_model, tiny_input, tmp_path: Path) -> None:
    model = insert_meansparse(tiny_model, tiny_input)
    with pytest.raises(ValueError, match="not calibrated; nothing saved"):
        save_calibration(model, tmp_path / "x.safetensors", config=MeanSparseConfig())
    assert not list(tmp_path.iterdir())


@pytest.fixture
def saved(tiny_model, tiny_input, tmp_path: Path) -> tuple[Path, torch.Tensor, nn.Module]:
    fresh = copy.deepcopy(tiny_model)
    config = MeanSparseConfig(alpha=0.2)
    path = _save(_calibrated(tiny_model, tiny_input, config), tmp_path / "calib.safetensors", config)
    return path, tiny_input, fresh


def _expect_refusal(fresh: nn.Module, path: Path, x: torch.Tensor, message: str) -> None:
    with pytest.raises(StateMismatchError, match=message) as exc:
        load_calibration(fresh, path, x)
    assert "\n" not in str(exc.value)
    assert not meansparse_modules(fresh)


def test_truncated_tensors_file(saved) -> None:
    path, x, fresh = saved
    path.write_bytes(path.read_bytes()[:-50])
    _expect_refusal(fresh, path, x, "truncated or corrupted safetensors file")
    path.write_bytes(b"\x00" * 7)
    _expect_refusal(fresh, path, x, "truncated or corrupted safetensors file")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "[1, 2]", "not a robustify defense sidecar"),
        (lambda text: text.replace('"format_version": 2', '"format_version": 99'), "format version 99"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "sites"}), "'config' or 'sites'"),
        (lambda text: text.replace('"alpha": 0.2,', '"alpha": -3,', 1), "unusable insertion config"),
    ],
    ids=["truncated", "not a sidecar", "version", "no sites", "bad alpha"],
)
def test_damaged_sidecar(saved, damage, message: str) -> None:
    path, x, fresh = saved
    side = sidecar_path(path)
    side.write_text(damage(side.read_text()))
    _expect_refusal(fresh, path, x, message)


def test_missing_files(saved) -> None:
    path, x, fresh = saved
    sidecar_path(path).unlink()
    _expect_refusal(fresh, path, x, r"\.json' does not exist")
    _expect_refusal(fresh, path.with_name("absent.safetensors"), x, "does not exist")


def test_files_from_two_runs_are_not_mixed(saved, tiny_model, tmp_path: Path) -> None:
    """A crash between the two writes leaves new tensors next to an old sidecar: refused."""
    path, x, fresh = saved
    other_x = torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    config = MeanSparseConfig(alpha=0.2)
    other = _save(_calibrated(copy.deepcopy(fresh), other_x, config), tmp_path / "other.safetensors", config)
    path.write_bytes(other.read_bytes())  # tensors of run 2, sidecar of run 1
    _expect_refusal(fresh, path, x, "do not belong together")


def test_unusable_statistics(saved) -> None:
    path, x, fresh = saved
    tensors = load_file(str(path))
    tensors["act1.var"][0] = -1.0
    digest = content_digest(tensors)
    save_file(tensors, str(path), metadata={"format": "robustify-defense"})
    meta = json.loads(sidecar_path(path).read_text())
    meta["content_sha256"] = digest
    sidecar_path(path).write_text(json.dumps(meta))
    _expect_refusal(fresh, path, x, "unusable statistics")


def test_failed_write_leaves_previous_file_intact(saved, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full during the write: the old calibration stays complete and loadable, no temp file remains."""
    path, x, fresh = saved
    before = path.read_bytes(), sidecar_path(path).read_bytes()
    model = load_calibration(copy.deepcopy(fresh), path, x)

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(defense_file_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_calibration(model, path, config=MeanSparseConfig(alpha=0.2))
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, sidecar_path(path).name])
    assert meansparse_modules(load_calibration(fresh, path, x))
