"""Sparta: module maths, placement, pretrained files and transfer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustify.defenses.meansparse.insert import InsertionError
from robustify.defenses.sparta.module import (
    Sparta,
    SpartaConfig,
    insert_sparta,
    load_sparta,
    plan_sparta,
    residual_group_sites,
    save_sparta,
    sparta_modules,
)
from robustify.defenses.meansparse.state import StateMismatchError
from tinynets import seeded_resnet18

PAPER_SITES = ["layer1.1.relu_1", "layer2.1.relu_1", "layer3.1.relu_1", "layer4.1.relu_1"]

pytestmark = pytest.mark.usefixtures("one_thread")


resnet18 = seeded_resnet18


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.short = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv(x))) + self.short(x))


class TinyResNet(nn.Module):
    """Two groups of two blocks, widths ``widths``; group names differ from ResNet's."""

    def __init__(self, widths: tuple[int, int] = (4, 8)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1)
        self.stem_act = nn.ReLU()
        self.stages = nn.ModuleList(
            [nn.Sequential(Block(widths[0], widths[0]), Block(widths[0], widths[0])),
             nn.Sequential(Block(widths[0], widths[1], 2), Block(widths[1], widths[1]))]
        )
        self.head = nn.Linear(widths[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [{"variant": "sparta"}, {"variant": "nodp"}, {"variant": "sparta", "neighborhood": 2},
     {"variant": "nodp", "neighborhood": 4}, {"variant": "sparta", "hidden_ratio": 0.5}],
)
def test_shapes_range_and_gradients(kwargs: dict) -> None:
    torch.manual_seed(0)
    module = Sparta(6, **kwargs)
    x = torch.randn(3, 6, 7, 7, requires_grad=True)  # 7 is not a multiple of N: partial cells
    y = module(x)
    assert y.shape == x.shape
    relu = F.relu(x)
    assert torch.all(y >= 0) and torch.all(y <= relu + 1e-6)
    assert torch.all(y[x <= 0] == 0)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    with torch.no_grad():
        phi = module.attention(x.detach())
    assert phi.shape == (3, 6, 7, 7) and float(phi.min()) >= 0 and float(phi.max()) <= 1


def test_dynamic_kernel_is_per_example() -> None:
    torch.manual_seed(0)
    module = Sparta(4, variant="sparta")
    x = torch.randn(5, 4, 6, 6)
    batched = module(x)
    one_by_one = torch.cat([module(x[i: i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)
    kernels = module.kernel(x)
    assert kernels.shape == (5, 1, 3, 3)
    assert not torch.allclose(kernels[0], kernels[1])  # predicted from each input


def test_nodp_has_static_conv5_and_no_dpnet() -> None:
    names = {n for n, _ in Sparta(4, variant="nodp").named_parameters()}
    assert "conv5.weight" in names and not any(n.startswith(("conv2", "conv3")) for n in names)
    names = {n for n, _ in Sparta(4, variant="sparta").named_parameters()}
    assert {"conv2.weight", "conv3.weight", "conv5_bias"} <= names and "conv5.weight" not in names


@pytest.mark.parametrize("n", [2, 3])
def test_neighbourhood_shares_scores_within_cells(n: int) -> None:
    torch.manual_seed(0)
    module = Sparta(3, variant="nodp", neighborhood=n)
    phi = module.attention(torch.randn(2, 3, 7, 7))
    for i in range(0, 7, n):
        for j in range(0, 7, n):
            cell = phi[..., i: i + n, j: j + n]
            assert torch.all(cell == cell[..., :1, :1])
    assert not torch.all(phi == phi[..., :1, :1])  # but cells differ


@pytest.mark.parametrize("variant", ["sparta", "nodp"])
def test_identity_init_starts_at_constant_gate(variant: str) -> None:
    module = Sparta(5, variant=variant, init="identity", init_logit=3.0)
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(module.attention(x), torch.full_like(x, torch.sigmoid(torch.tensor(3.0)).item()))
    module(x).sum().backward()
    trainable = [n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert {"conv6.weight", "conv6.bias"} <= set(trainable)
    assert ("conv3.weight" if variant == "sparta" else "conv5.weight") in trainable


def test_wrong_input_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expects \(N, 4, H, W\)"):
        Sparta(4)(torch.randn(2, 3, 5, 5))


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="variant"):
        SpartaConfig(variant="dp")
    with pytest.raises(ValueError, match="preset"):
        SpartaConfig(preset="everywhere")
    with pytest.raises(ValueError, match="neighborhood"):
        SpartaConfig(neighborhood=0)
    config = SpartaConfig(variant="nodp", neighborhood=2, include=("layer*",), sites=("a.b",))
    assert SpartaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ------------------------------------------------------------------------------------------
# placement
# ------------------------------------------------------------------------------------------
def test_paper_preset_finds_g1_to_g4_b2_of_resnet18() -> None:
    model, example = resnet18()
    _, sites = plan_sparta(model, example, SpartaConfig())
    assert [s.name for s in sites] == PAPER_SITES
    assert [s.channels for s in sites] == [64, 128, 256, 512]
    out = insert_sparta(model, example, SpartaConfig())
    assert list(sparta_modules(out)) == PAPER_SITES
    assert [m.channels for m in sparta_modules(out).values()] == [64, 128, 256, 512]
    assert out(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    extra = sum(p.numel() for m in sparta_modules(out).values() for p in m.parameters())
    assert 12_000_000 < extra < 13_000_000  # spec: ~12.5M extra parameters at G1-G4


def test_blocks_preset_include_and_explicit_sites() -> None:
    model, example = resnet18()
    _, sites = plan_sparta(model, example, SpartaConfig(preset="blocks"))
    assert [s.name for s in sites] == [f"layer{g}.{b}.relu_1" for g in range(1, 5) for b in (0, 1)]
    _, sites = plan_sparta(model, example, SpartaConfig(include=("layer4*",)))
    assert [s.name for s in sites] == ["layer4.1.relu_1"]
    _, sites = plan_sparta(model, example, SpartaConfig(sites=("layer2.0.relu_0", "relu_0")))
    assert [s.name for s in sites] == ["layer2.0.relu_0", "relu_0"]
    with pytest.raises(InsertionError, match="not activation sites"):
        plan_sparta(model, example, SpartaConfig(sites=("layer9.relu",)))
    with pytest.raises(InsertionError, match="changes nothing"):
        plan_sparta(model, example, SpartaConfig(include=("nothing*",)))


def test_paper_rule_on_other_naming() -> None:
    model = TinyResNet()
    _, sites = plan_sparta(model, torch.zeros(2, 3, 8, 8))
    assert [s.name for s in sites] == ["stages.0.1.act2", "stages.1.1.act2"]
    names = [s.name for s in residual_group_sites(sites, per="block")]
    assert names == ["stages.0.1.act2", "stages.1.1.act2"]


# ------------------------------------------------------------------------------------------
# pretrained Sparta: save, load, transfer
# ------------------------------------------------------------------------------------------
def _randomise(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in sparta_modules(model).values():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("variant", ["sparta", "nodp"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, variant: str) -> None:
    model, example = resnet18()
    config = SpartaConfig(variant=variant)
    model = insert_sparta(model, example, config).eval()
    _randomise(model)
    path = tmp_path / "sparta.safetensors"
    save_sparta(model, path, config=config, model_info={"spec": "aa-resnet18"}, extra={"training": {"epochs": 1}})
    meta = json.loads((tmp_path / "sparta.safetensors.json").read_text())
    assert [s["name"] for s in meta["sites"]] == PAPER_SITES
    assert [s["channels"] for s in meta["sites"]] == [64, 128, 256, 512]
    assert meta["config"]["variant"] == variant and meta["training"] == {"epochs": 1}

    fresh, _ = resnet18()  # same backbone (seeded), new Sparta
    loaded = load_sparta(fresh, path, example).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    from safetensors.torch import load_file

    keys = set(load_file(str(path)))
    assert all(k.startswith(tuple(f"{s}." for s in PAPER_SITES)) for k in keys)  # only Sparta parameters
    assert "layer1.1.relu_1.conv6.weight" in keys


def test_transfer_to_another_network_by_order_and_freeze(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    model, example = resnet18()
    config = SpartaConfig(variant="nodp")
    model = insert_sparta(model, example, config)
    _randomise(model)
    path = tmp_path / "r18.safetensors"
    save_sparta(model, path, config=config)
    target = timm.create_model("resnet34", pretrained=False, num_classes=10).eval()  # 3-4-6-3 blocks, act2 modules
    out = load_sparta(target, path, example, freeze=True)
    modules = sparta_modules(out)
    assert list(modules) == ["layer1.2.act2", "layer2.3.act2", "layer3.5.act2", "layer4.2.act2"]
    source = list(sparta_modules(model).values())
    for src, dst in zip(source, modules.values()):
        for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
            assert torch.equal(p, q), n
            assert not q.requires_grad
    assert out(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(StateMismatchError, match="no activation site"):
        load_sparta(target, path, example, mapping="name")


def test_channel_mismatch_fails_with_a_clear_message(tmp_path) -> None:
    small = TinyResNet((4, 8))
    example = torch.zeros(2, 3, 8, 8)
    config = SpartaConfig()
    model = insert_sparta(small, example, config)
    path = tmp_path / "tiny.safetensors"
    save_sparta(model, path, config=config)
    wider = TinyResNet((4, 16))
    with pytest.raises(StateMismatchError, match=r"has 8 channels, target site 'stages.1.1.act2' has 16"):
        load_sparta(wider, path, example)
    r18, r18_example = resnet18()
    with pytest.raises(StateMismatchError, match="channels"):
        load_sparta(r18, path, r18_example)  # 2 saved sites vs 4 paper sites


def test_corrupted_or_foreign_files_are_refused(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(StateMismatchError, match="does not exist"):
        load_sparta(TinyResNet(), path, torch.zeros(1, 3, 8, 8))
    model = insert_sparta(TinyResNet(), torch.zeros(1, 3, 8, 8), SpartaConfig())
    save_sparta(model, path, config=SpartaConfig())
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StateMismatchError, match="truncated or corrupted"):
        load_sparta(TinyResNet(), path, torch.zeros(1, 3, 8, 8))
