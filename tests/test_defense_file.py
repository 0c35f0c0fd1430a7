"""Issue 12, item 2: one save format for every defense (robustify.defenses.file), old files still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from robustify.defenses import sparta as sparta_pkg
from robustify.defenses import meansparse as ms
from robustify.defenses import activations as acts
import robustify as rb
from robustify.defenses.activations import swaps as acts_swaps
from robustify.defenses.file import FORMAT, FORMAT_VERSION, content_digest, read_sidecar, sidecar_path
from robustify.defenses.meansparse.state import StateMismatchError
from tinynets import tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

V1 = Path(__file__).parent / "data" / "format_v1"
EXAMPLE = torch.zeros(2, 3, 32, 32)
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
CONFIGS = {
    "meansparse": ms.MeanSparseConfig(alpha=0.3),
    "sparta": sparta_pkg.SpartaConfig(preset="all", init="identity"),
    "sparta-nodp": sparta_pkg.SpartaConfig(variant="nodp", preset="all", init="identity"),
    "pssilu": acts.ActivationConfig(name="pssilu"),
    "silu": acts.ActivationConfig(name="silu"),
    "smoothrelu": acts.SmoothReLUConfig(),
}


def _defended(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny CNN with defense ``name`` applied, its inserted state moved off its initial values."""
    model = rb.apply_defense(tiny_cnn(), EXAMPLE, CONFIGS[name])
    if name == "meansparse":
        rb.calibrate(model, [torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))], progress=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rb.defenses.defense_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_defense_is_saved_in_the_one_format(name: str, tmp_path: Path) -> None:
    model = _defended(name)
    path = rb.save_defense(model, tmp_path / f"{name}.safetensors", model_info={"spec": "tinynets:tiny_cnn"})
    meta = json.loads(sidecar_path(path).read_text())
    assert (meta["format"], meta["format_version"], meta["defense"]) == (FORMAT, FORMAT_VERSION, name)
    assert meta["config"] == CONFIGS[name].to_dict() and {"_type", "_version"} <= set(meta["config"])
    tensors = load_file(str(path))
    assert meta["content_sha256"] == content_digest(tensors)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": FORMAT}
    site_names = {s["name"] for s in meta["sites"]}
    assert site_names and all(any(k.startswith(f"{n}.") for n in site_names) for k in tensors)  # inserted state only
    assert not any(k.startswith(("conv", "bn", "fc")) for k in tensors)
    again = rb.save_defense(model, tmp_path / f"{name}_again.safetensors", model_info={"spec": "tinynets:tiny_cnn"})
    assert again.read_bytes() == path.read_bytes()
    assert sidecar_path(again).read_bytes() == sidecar_path(path).read_bytes()
    loaded = rb.load_defense(tiny_cnn(), path, EXAMPLE)
    assert loaded.robustify_defense == CONFIGS[name]
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


@pytest.mark.parametrize("name", ["sparta", "pssilu", "smoothrelu"])
def test_files_of_two_writes_are_not_mixed_for_trained_defenses_either(name: str, tmp_path: Path) -> None:
    """Sparta and activation files had no digest: tensors of run 2 next to the sidecar of run 1 loaded."""
    path = rb.save_defense(_defended(name, seed=0), tmp_path / "a.safetensors")
    other = rb.save_defense(_defended(name, seed=1), tmp_path / "b.safetensors")
    path.write_bytes(other.read_bytes())
    with pytest.raises(StateMismatchError, match="do not belong together") as exc:
        rb.load_defense(tiny_cnn(), path, EXAMPLE)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["meansparse", "sparta", "pssilu", "smoothrelu"])
def test_files_written_before_the_one_format_still_load(name: str) -> None:
    """Files of the earlier formats, written by the code before issue 12 (tests/data/format_v1)."""
    expected = load_file(str(V1 / "expected_logits.safetensors"))
    path = V1 / f"{name}.safetensors"
    assert json.loads(sidecar_path(path).read_text())["format_version"] == 1
    assert rb.defenses.defense_kind(path) == name
    loaded = rb.load_defense(tiny_cnn(), path, EXAMPLE)
    assert type(loaded.robustify_defense).__name__ == json.loads(sidecar_path(path).read_text())["config"]["_type"]
    with torch.no_grad():
        assert torch.equal(loaded(expected["x"]), expected[name])
        assert not torch.equal(loaded(expected["x"]), tiny_cnn()(expected["x"]))
    resaved = rb.save_defense(loaded, Path(pytest.importorskip("tempfile").mkdtemp()) / "v2.safetensors")
    assert read_sidecar(resaved)["format_version"] == FORMAT_VERSION


def test_old_meansparse_calibrations_keep_their_thresholds() -> None:
    expected = load_file(str(V1 / "expected_logits.safetensors"))
    model = ms.load_calibration(tiny_cnn(), V1 / "meansparse.safetensors", EXAMPLE)
    assert {m.alpha for m in ms.meansparse_modules(model).values()} == {0.3}
    with torch.no_grad():
        assert torch.equal(model(expected["x"]), expected["meansparse"])


def test_each_loader_refuses_another_defense_and_unknown_versions(tmp_path: Path) -> None:
    sparta = rb.save_defense(_defended("sparta"), tmp_path / "sparta.safetensors")
    with pytest.raises(StateMismatchError, match="holds a 'sparta' defense, not meansparse"):
        ms.load_calibration(tiny_cnn(), sparta, EXAMPLE)
    with pytest.raises(StateMismatchError, match=r"holds a 'sparta' defense, not one of \['silu', "):
        acts_swaps.load_activations(tiny_cnn(), sparta, EXAMPLE)
    side = sidecar_path(sparta)
    side.write_text(side.read_text().replace('"format_version": 2', '"format_version": 7'))
    with pytest.raises(StateMismatchError, match="format version 7, expected 2"):
        rb.load_defense(tiny_cnn(), sparta, EXAMPLE)
    side.write_text(side.read_text().replace('"format_version": 7', '"format_version": 2')
                    .replace('"defense": "sparta"', '"defense": "magic"'))
    with pytest.raises(StateMismatchError, match="holds a 'magic' defense, not one registered here"):
        rb.load_defense(tiny_cnn(), sparta, EXAMPLE)
