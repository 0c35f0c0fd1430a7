"""RobustBench's model zoo without the network: architectures, the checkpoint cache, zoo bugs, HTML pages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustify import ModelLoadError, load_model
from robustify.defenses.meansparse.config import MeanSparseConfig
from robustify.defenses.meansparse.insert import plan

# small entries (<= 61M parameters; benchmarks/zoo_sweep.py runs them all) covering the kinds of zoo entry: plain architectures, and the
# zoo's own bugs (misspelt timm names, lambdas that download weights while building)
SAMPLE = [
    ("cifar10", "Linf", "Ding2020MMA", "Ding2020MMANet"),  # WRN-28-4, 5.8M
    ("cifar100", "corruptions", "Hendrycks2020AugMix_ResNeXt", "Hendrycks2020AugMixResNeXtNet"),
    # the entry's lambda asks timm for 'debenedetti2020light_xcit_s_cifar10_linf' (unregistered), with weights
    ("cifar10", "Linf", "Debenedetti2022Light_XCiT-S12", "Xcit"),
    ("imagenet", "corruptions", "AlexNet", "TimmAlexNet"),  # lambda: timm 'alexnet' (unregistered), with weights
    ("imagenet", "Linf", "Standard_R50", "Bottleneck"),  # lambda: torchvision resnet50(pretrained=True)
]


def _class_names(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize("dataset,threat_model,name,cls", SAMPLE, ids=[f"{d}-{t}-{n}" for d, t, n, _ in SAMPLE])
def test_zoo_entry_builds_offline_and_gets_a_plan(no_network, one_thread, dataset, threat_model, name, cls) -> None:
    model, info = load_model(f"robustbench:{name}", dataset=dataset, threat_model=threat_model, pretrained=False)
    assert cls in _class_names(model)
    with torch.no_grad():
        logits = model(info.example_input(batch=1))
        _, sites = plan(model, info.example_input(batch=1), MeanSparseConfig())
    assert logits.shape == (1, info.num_classes) and sites


def test_timm_served_entries_are_built_as_robustbench_loads_them() -> None:
    """robustbench.utils.load_model serves these through timm under this name, not through the entry's lambda."""
    import timm

    from robustify.load.zoo import robustbench_timm_name, zoo_entries

    served = [(d, t, n) for d, t, n in zoo_entries() if timm.is_model(robustbench_timm_name(n, d, t))]
    assert ("cifar10", "Linf", "Debenedetti2022Light_XCiT-S12") in served
    assert robustbench_timm_name("Debenedetti2022Light_XCiT-S12", "cifar10", "Linf") == "debenedetti2022light_xcit_s12_cifar10_linf"
    assert robustbench_timm_name("Tian2022Deeper_DeiT-S", "imagenet", "corruptions") == "tian2022deeper_deit_s_imagenet_corruptions"


def test_an_entry_that_does_not_build_is_a_one_line_error() -> None:
    def broken() -> torch.nn.Module:
        raise RuntimeError("Unknown model (some_misspelt_name)\nsecond line")

    from robustify.load.zoo import build_architecture

    with pytest.raises(ModelLoadError) as exc:
        build_architecture("Nobody2024Broken", "cifar10", "Linf", {"model": broken, "gdrive_id": "x"})
    assert str(exc.value) == ("RobustBench's zoo entry 'Nobody2024Broken' (cifar10/Linf) does not build: "
                              "RuntimeError: Unknown model (some_misspelt_name)")


def test_checkpoint_paths_follow_robustbench_load_model() -> None:
    from robustify.load.zoo import checkpoint_paths

    single = {"gdrive_id": "abc"}
    assert checkpoint_paths("/c", "Ding2020MMA", "cifar10", "Linf", single) == [Path("/c/cifar10/Linf/Ding2020MMA.pt")]
    ensemble = {"gdrive_id": ["a", "b"]}
    assert checkpoint_paths("/c", "E", "cifar100", "corruptions", ensemble) == [
        Path("/c/cifar100/corruptions/E.pt_m0.pt"), Path("/c/cifar100/corruptions/E.pt_m1.pt")]
    assert checkpoint_paths("/c", "T", "cifar10", "Linf", {"gdrive_id": None}) == []


def _cached_checkpoint(cache: Path, name: str) -> Path:
    path = cache / "robustbench" / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    return path


def test_robustbench_weights_load_from_robustifys_cache_offline(tmp_path: Path, no_network) -> None:
    torch.manual_seed(0)
    published, _ = load_model("robustbench:Ding2020MMA", pretrained=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in published.state_dict().items()}},  # as released
               _cached_checkpoint(tmp_path, "Ding2020MMA"))
    model, info = load_model("robustbench:Ding2020MMA", cache_dir=tmp_path)
    assert info.pretrained
    loaded, expected = model.state_dict(), published.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


GDRIVE_HTML = (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
               b"Google Drive can't scan this file for viruses.<form action=\"https://drive.usercontent.google.com/"
               b"download\"></form></body></html>")


def test_an_html_page_in_the_cache_is_a_clear_error(tmp_path: Path, no_network) -> None:
    path = _cached_checkpoint(tmp_path, "Ding2020MMA")
    path.write_bytes(GDRIVE_HTML)
    with pytest.raises(ModelLoadError) as exc:
        load_model("robustbench:Ding2020MMA", cache_dir=tmp_path)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message and "is an HTML page, not weights" in message
    with pytest.raises(ModelLoadError, match="is an HTML page, not weights"):  # and as --weights FILE
        load_model("robustbench:Ding2020MMA", pretrained=False, weights=path)


def test_offline_without_a_cached_checkpoint_says_where_to_put_it(tmp_path: Path, no_network) -> None:
    with pytest.raises(ModelLoadError) as exc:
        load_model("robustbench:Ding2020MMA", cache_dir=tmp_path)
    assert "\n" not in str(exc.value)
    assert f"place the checkpoint at {str(tmp_path / 'robustbench' / 'cifar10' / 'Linf' / 'Ding2020MMA.pt')!r}" in str(exc.value)


class _AssignsInForward(torch.nn.Module):
    """Like RobustBench's SODEF layer: forward reassigns a tensor attribute, then does what fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.act = torch.nn.ReLU()
        self.t = torch.tensor([0.0, 5.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.t = self.t.type_as(x)
        if not isinstance(self.t, torch.Tensor):  # an fx Proxy is not a tensor: tracing stops here
            raise TypeError("t must be a torch.Tensor")
        return self.act(self.conv(x)) * self.t[1]


def test_planning_leaves_attributes_that_forward_assigns(one_thread) -> None:
    """cifar10/Linf/Kang2021Stable failed its plan: fx tracing left a Proxy in the model."""
    model = _AssignsInForward()
    _, sites = plan(model, torch.rand(1, 3, 4, 4), MeanSparseConfig())
    assert isinstance(model.t, torch.Tensor) and [s.name for s in sites] == ["act"]
    assert model(torch.rand(1, 3, 4, 4)).shape == (1, 4, 4, 4)


class _TensorConstant(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu(x + torch.tensor([1.0]))  # fx stores the constant on the model


def test_planning_keeps_the_tensor_constants_fx_adds(one_thread) -> None:
    prepared, sites = plan(_TensorConstant(), torch.rand(1, 3, 4, 4), MeanSparseConfig())
    assert [s.name for s in sites] == ["relu_0"] and prepared(torch.zeros(1, 3, 4, 4)).eq(1).all()


class _CudaConstants(torch.nn.Module):
    """Like RobustBench's bit_rn.ResNetV2 (Bai2023Improving_*): constants put on the GPU in __init__."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1).cuda()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x - self.mean).mean((2, 3)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="builds as written where CUDA exists")
def test_an_entry_that_calls_cuda_builds_on_a_cpu_only_machine() -> None:
    from robustify.load.zoo import build_architecture

    with pytest.raises((RuntimeError, AssertionError)):
        _CudaConstants()
    model = build_architecture("Nobody2024Cuda", "cifar10", "Linf", {"model": _CudaConstants, "gdrive_id": "x"})
    assert model.mean.device.type == "cpu" and model(torch.rand(1, 3, 4, 4)).shape == (1, 2)
    with pytest.raises((RuntimeError, AssertionError)):  # and .cuda() is itself again afterwards
        torch.zeros(1).cuda()


def test_inspect_a_zoo_entry_offline_needs_no_checkpoint(tmp_path: Path, no_network, capsys) -> None:
    import json

    from robustify.cli import main

    assert main(["inspect", "robustbench:Ding2020MMA", "--cache-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["pretrained"] is False and len(out["sites"]) == 25  # WRN-28: 3 groups x 4 blocks x 2 + 1
    assert not any(tmp_path.iterdir())
