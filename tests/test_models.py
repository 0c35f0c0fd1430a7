"""Model loading: every spec form, safe checkpoints, RobustBench architectures, clear errors."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustify import ModelLoadError, load_model
from robustify.defenses.meansparse import meansparse_modules
from robustify.load.models import NormalizedModel, load_state_dict_file

REPO = Path(__file__).resolve().parents[1]

# RobustBench CIFAR-10 Linf architectures built without weights (WRN-28-10 size, the smallest):
# spec, input side, number of activation calls, activation class, channel axes, channel counts
ROBUSTBENCH = [
    ("robustbench:Standard", 32, 25, "ReLU", {1}, None),  # WideResNet-28-10, ReLU modules
    ("robustbench:Wang2023Better_WRN-28-10", 32, 25, "SiLU", {1}, None),  # DM-WideResNet, SiLU
    ("robustbench:Dai2021Parameterizing", 32, 25, "PSSiLU", {1}, None),  # PAF WRN: one PSSiLU, 25 calls
]


@pytest.mark.parametrize("spec,side,n_sites,activation,dims,channels", ROBUSTBENCH, ids=[a[0] for a in ROBUSTBENCH])
def test_robustbench_architectures_without_weights(check_insertion, spec, side, n_sites, activation, dims, channels) -> None:
    check_insertion(spec, side, n_sites, activation, dims, channels)


def test_aa_resnet18_ships_its_weights(aa_model) -> None:
    model, info = aa_model
    assert (info.source, info.name, info.input_size, info.num_classes) == ("aa", "aa-resnet18", (3, 32, 32), 10)
    assert not model.training
    random_init, _ = load_model("aa-resnet18", pretrained=False)
    assert not torch.equal(model.linear.weight, random_init.linear.weight)
    assert info.example_input(3).shape == (3, 3, 32, 32)


def test_timm_model_normalises_inside() -> None:
    model, info = load_model("timm:resnet18", pretrained=False)
    assert isinstance(model, NormalizedModel) and info.num_classes == 10 and info.input_size == (3, 224, 224)
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.model((x - mean) / std))


def test_factory_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_factory_mod.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.ReLU())\n"
        "def not_a_model():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model, info = load_model("my_factory_mod:build")
    assert info.source == "factory" and isinstance(model, nn.Sequential)
    with pytest.raises(ModelLoadError, match="returned int, not an nn.Module"):
        load_model("my_factory_mod:not_a_model")
    with pytest.raises(ModelLoadError, match="cannot import model factory 'my_factory_mod:missing'"):
        load_model("my_factory_mod:missing")


@pytest.mark.parametrize(
    "spec,kwargs,message",
    [
        ("resnet18", {}, "unknown model spec 'resnet18'"),
        ("timm:not_a_real_net", {"pretrained": False}, "unknown timm model 'not_a_real_net'"),
        ("robustbench:Nobody2099Imaginary", {"pretrained": False}, "unknown RobustBench model 'Nobody2099Imaginary'"),
        ("aa-resnet18", {"dataset": "mnist"}, "unknown dataset 'mnist'"),
        ("aa-resnet18", {"threat_model": "L3"}, "unknown threat model 'L3'"),
        ("no_such_module_robustify:make", {}, "cannot import model factory"),
    ],
)
def test_unknown_specs_give_one_line_errors(spec: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(spec, **kwargs)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _outputs_equal(a: nn.Module, b: nn.Module) -> bool:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "dataparallel", "safetensors"])
def test_local_checkpoint_forms(aa_model, tmp_path: Path, wrap: str) -> None:
    source, _ = aa_model
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pt")
    if wrap == "safetensors":
        save_file(state, str(path))
    elif wrap == "state_dict":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif wrap == "dataparallel":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    model, info = load_model("aa-resnet18", weights=path)
    assert info.weights == str(path)
    assert _outputs_equal(model, source)


def test_shared_adversarially_trained_weights(aa_at_model, aa_model) -> None:
    at_model, info = aa_at_model
    assert info.weights is not None and info.weights.endswith("resnet18_at_relu.pt")
    assert not _outputs_equal(at_model, aa_model[0])


class _Payload:
    """A pickle that runs ``touch <marker>`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_executable_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {"linear.weight": torch.zeros(10, 512), "payload": _Payload(marker)}
    with open(path, "wb") as f:
        torch.save(state, f)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint .*never executed") as info:
        load_model("aa-resnet18", weights=path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    probe = tmp_path / "plain.pkl"
    probe.write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads(probe.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint_gives_clear_error(aa_model, tmp_path: Path, suffix: str) -> None:
    state = aa_model[0].state_dict()
    path = tmp_path / f"w{suffix}"
    save_file(dict(state), str(path)) if suffix == ".safetensors" else torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot read checkpoint.*truncated or corrupted") as info:
        load_model("aa-resnet18", weights=path)
    assert "\n" not in str(info.value)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_state_dict_file(path)


def test_checkpoint_that_does_not_fit(aa_model, tmp_path: Path) -> None:
    state = dict(aa_model[0].state_dict())
    wrong_shape = dict(state, **{"linear.weight": torch.zeros(5, 512), "linear.bias": torch.zeros(5)})
    torch.save(wrong_shape, tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError, match=r"does not fit ResNet: size mismatch for linear\.weight") as info:
        load_model("aa-resnet18", weights=tmp_path / "shape.pt")
    assert "\n" not in str(info.value)
    missing = {k: v for k, v in state.items() if not k.startswith("layer4")}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match=r"does not fit ResNet: \d+ missing key\(s\)"):
        load_model("aa-resnet18", weights=tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="not a state dict of tensors"):
        load_model("aa-resnet18", weights=tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("aa-resnet18", weights=tmp_path / "absent.pt")


def test_load_model_converts_published_meansparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """RobustBench's Amini2024MeanSparse_* models come back with robustify's MeanSparse modules."""
    from robustify.core import compat as _compat
    from robustify.load import models as models_module

    _compat.import_robustbench()
    from robustbench.model_zoo.architectures.Meansparse_wrn_94_16 import MeanSparse_DMWideResNet

    def small(*args, **kwargs) -> nn.Module:
        torch.manual_seed(0)
        model = MeanSparse_DMWideResNet(depth=10, width=1, activation_fn=nn.SiLU)
        for name, m in model.named_modules():
            if type(m).__name__ == "MeanSparse":
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
                m.threshold.fill_(0.2)
        return model

    reference = small().eval()
    monkeypatch.setattr(models_module, "_robustbench", small)
    model, _ = load_model("robustbench:Amini2024MeanSparse_S-WRN-94-16", pretrained=False)
    modules = meansparse_modules(model)
    assert len(modules) == 10 and all(m.alpha == pytest.approx(0.2) for m in modules.values())
    assert _outputs_equal(model, reference)


# ---------------------------------------------------------------------------------------------
# `import robustbench` next to the PyPI AutoAttack
# ---------------------------------------------------------------------------------------------
def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def _site_packages() -> list[str]:
    import site

    return [*site.getsitepackages(), site.getusersitepackages()]


def test_import_robustbench_through_compat_in_fresh_process() -> None:
    result = _run(
        "import robustify.core.compat as c; rb = c.import_robustbench(); import autoattack, robustbench;"
        "from autoattack import AutoAttack; print(rb.__name__, AutoAttack.__mro__[1].__module__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["robustbench", "pyautoattack.autoattack"]


def test_importing_robustify_makes_robustbench_client_code_work_and_changes_nothing_before() -> None:
    """Issue 18 item 5: no start-up hook in the environment. A fresh interpreter has no `autoattack` alias until
    robustify is imported; after `import robustify`, RobustBench's own `from autoattack import AutoAttack` works."""
    code = (
        "import importlib.util as u, sys\n"
        "print('before:', u.find_spec('autoattack'))\n"
        "import robustify, robustbench\n"
        "from autoattack import AutoAttack; import autoattack.state\n"
        "print('after:', AutoAttack.__mro__[1].__module__, autoattack.state.__name__)"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.strip().split("\n")
    if before != "before: None":
        pytest.skip("a real `autoattack` package is installed: the alias is not used")
    assert after == "after: pyautoattack.autoattack pyautoattack.state"
    assert not any(Path(d, "robustify-autoattack-alias.pth").is_file() for d in _site_packages())


