"""timm weights from a local Hugging Face cache, offline; planning needs no weights at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustify import ModelLoadError, load_model
from robustify.cli import main

TINY = "test_vit"  # timm's 0.37M-parameter ViT; pretrained_cfg: hf_hub_id timm/test_vit.r160_in1k, no url
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> Path:
    """An empty Hugging Face hub cache under tmp_path, offline mode on (env and the read-at-import constants)."""
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def _publish(hub: Path, repo_id: str, model: torch.nn.Module) -> Path:
    """Lay ``model`` out as the hub cache holds a downloaded repo: snapshot files + refs/main."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))  # the files timm's save_for_hf writes
    save_config_for_hf(model, snapshot / "config.json")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def _random_tiny() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # nothing like timm's own init, so a fresh model cannot match by chance
    return model


def test_timm_hub_support_is_importable() -> None:
    """timm 1.0.9 (robustbench's pin) needs an API huggingface_hub 2.x removed."""
    from timm.models._hub import has_hf_hub

    assert has_hf_hub(necessary=False)


@pytest.mark.parametrize("spec", [f"timm:{TINY}", "timm:hf-hub:timm/test_vit.r160_in1k"])
def test_timm_weights_load_from_the_offline_hub_cache(hf_cache: Path, spec: str) -> None:
    published = _random_tiny()
    snapshot = _publish(hf_cache, "timm/test_vit.r160_in1k", published)
    model, info = load_model(spec, dataset="imagenet")
    expected = published.state_dict()
    loaded = model.model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert info.input_size == (3, 160, 160) and info.pretrained
    assert (snapshot / "config.json").is_file()


def test_timm_weights_missing_offline_is_a_one_line_error(hf_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as exc:
        load_model(f"timm:{TINY}", dataset="imagenet")
    message = str(exc.value)
    assert "\n" not in message
    assert "offline, put its weights in the Hugging Face cache" in message and str(hf_cache) in message


def test_timm_without_hub_support_names_the_fix(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._hub

    monkeypatch.setattr(timm.models._hub, "_has_hf_hub", False)  # what huggingface_hub 2.x does to timm 1.0.9
    with pytest.raises(ModelLoadError, match=r"cannot use huggingface_hub .*: pip install 'huggingface_hub<2'"):
        load_model(f"timm:{TINY}", dataset="imagenet")


def test_inspect_builds_the_architecture_only(hf_cache: Path, capsys: pytest.CaptureFixture) -> None:
    """Offline with an empty cache: nothing to download, and inspect needs nothing."""
    blocks = [f"model.blocks.{i}.mlp.act" for i in range(len(_random_tiny().blocks))]  # one GELU per block
    assert main(["inspect", f"timm:{TINY}", "--dataset", "imagenet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["pretrained"] is False and [s["name"] for s in out["sites"]] == blocks
    assert main(["inspect", f"timm:{TINY}", "--dataset", "imagenet", "--defense", "gelu", "--replace", "GELU",
                 "--json"]) == 0  # inspect of an activation-swap plan too
    assert [s["name"] for s in json.loads(capsys.readouterr().out)["sites"]] == blocks


def test_pretrained_timm_head_reinitialised_only_when_asked(hf_cache: Path) -> None:
    """ImageNet weights for a 10-class dataset: timm would drop the classifier for a random one, silently."""
    published = _random_tiny()
    _publish(hf_cache, "timm/test_vit.r160_in1k", published)
    with pytest.raises(ModelLoadError, match=r"1000 classes.*cifar10 has 10.*new_head"):
        load_model(f"timm:{TINY}", dataset="cifar10")
    model, info = load_model(f"timm:{TINY}", dataset="cifar10", new_head=True)
    loaded, expected = model.model.state_dict(), published.state_dict()
    assert loaded["head.weight"].shape == (10, expected["head.weight"].shape[1]) and info.num_classes == 10
    assert all(torch.equal(loaded[k], expected[k]) for k in expected if not k.startswith("head."))
    assert info.extra.get("new_head") is True
