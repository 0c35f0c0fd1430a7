"""The ``published`` preset against RobustBench's own MeanSparse architectures, and output sites.

For each family, RobustBench's base architecture and its MeanSparse architecture are built at a
small configuration (random init) with the same weights. With alpha = 0 the inputs of the
MeanSparse modules are compared in forward order: same count, same channel counts, same
tensors, so the same positions. Then both get the same random statistics and must give equal
logits for alpha > 0.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from robustify.defenses import meansparse as ms
import robustify
from robustify import InsertionError
from robustify.defenses.meansparse import MeanSparseConfig
from robustify.defenses.meansparse.module import capture_site_inputs as _capture_site_inputs
from robustify.defenses.meansparse.insert import fuse_meansparse, insert_meansparse, plan, remove_meansparse
from robustify.defenses.meansparse.interop import _channel_dim as published_channel_dim
from robustify.defenses.meansparse.interop import find_published_meansparse
from robustify.defenses.meansparse.module import meansparse_modules
from robustify.defenses.meansparse.state import sidecar_path

pytest.importorskip("robustbench")
timm = pytest.importorskip("timm")

from robustbench.model_zoo.architectures import (  # noqa: E402
    Meansparse_ra_wrn_70_16,
    Meansparse_wrn_70_16,
    Meansparse_wrn_94_16,
    dm_wide_resnet,
    robustarch_wide_resnet,
)
from robustbench.model_zoo.architectures.utils_architectures import normalize_model  # noqa: E402

MU, SIGMA = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ALPHA = 0.4
PUBLISHED = MeanSparseConfig(preset="published")


def _inputs_in_order(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, input) of each module of ``modules``, in the order they run on ``x``."""
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, name: str = "") -> None:
        seen.append((name, args[0].detach().clone()))

    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _channels_last(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


def assert_same_placement(base: nn.Module, published: nn.Module, x: torch.Tensor) -> int:
    """``base`` with robustify's published plan vs RobustBench's ``published`` (same weights)."""
    missing, unexpected = published.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.rsplit(".", 1)[-1] in (
        "running_mean", "running_var", "threshold", "flag_update_statistics", "batch_num", "momentum", "epsilon")
        for k in missing), (missing, unexpected)
    base.eval()
    published.eval()
    theirs = find_published_meansparse(published)
    with torch.no_grad():
        base_logits = base(x)
    n_planned = len(plan(base, x[:1], PUBLISHED)[1])
    ours = insert_meansparse(base, x[:1], PUBLISHED)
    mine = meansparse_modules(ours)
    assert n_planned == len(mine) == len(theirs) > 0
    for m in mine.values():  # alpha 0: the identity, but robustify refuses uncalibrated modules
        m.set_statistics(torch.zeros(m.channels), torch.ones(m.channels))

    ours_seen = _inputs_in_order(ours, mine, x)
    theirs_seen = _inputs_in_order(published, theirs, x)
    assert len(ours_seen) == len(theirs_seen) == len(mine)  # each module runs once
    generator = torch.Generator().manual_seed(0)
    for (a, za), (b, zb) in zip(ours_seen, theirs_seen):
        dim_b = published_channel_dim(b, theirs[b], tuple(zb.shape))
        channels = theirs[b].running_mean.numel()
        assert mine[a].channels == channels == za.shape[mine[a].channel_dim], (a, b)
        assert torch.equal(_channels_last(za, mine[a].channel_dim), _channels_last(zb, dim_b)), (a, b)
        # the same statistics into both, spread around the data so that alpha cuts something
        flat = _channels_last(za, mine[a].channel_dim)
        mean = flat.mean(0) + 0.1 * torch.randn(channels, generator=generator)
        var = flat.var(0) * (0.5 + torch.rand(channels, generator=generator))
        mine[a].set_statistics(mean, var)
        with torch.no_grad():
            theirs[b].running_mean.copy_(mean)
            theirs[b].running_var.copy_(var)
            theirs[b].threshold.fill_(ALPHA)
    ms.set_alpha(ours, ALPHA)
    with torch.no_grad():
        ours_logits, theirs_logits = ours(x), published(x)
    assert not torch.equal(ours_logits, base_logits)  # the sites do cut
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=0, atol=0)
    return len(mine)


# --- RobustBench WRNs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("published_class", [Meansparse_wrn_70_16.DMWideResNet, Meansparse_wrn_94_16.MeanSparse_DMWideResNet])
def test_dm_wrn_matches_robustbench_meansparse_wrn(one_thread, published_class):
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, depth=10, width=1, activation_fn=nn.SiLU)
    base = dm_wide_resnet.DMWideResNet(**kwargs)
    # depth 10: 3 blocks x (2 activations + the block output) + the final activation
    assert assert_same_placement(base, published_class(**kwargs), torch.rand(4, 3, 32, 32)) == 10


def test_ra_wrn_matches_robustbench_meansparse_ra_wrn(one_thread):
    torch.manual_seed(0)
    kwargs = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616), stem_width=8, depth=[1, 2, 1],
                  stage_width=[8, 16, 32], groups=[1, 1, 1], activation_fn=nn.SiLU, se_ratio=0.25,
                  se_activation=nn.ReLU, se_order=2, num_classes=10)
    base = robustarch_wide_resnet.NormalizedWideResNet(**kwargs)
    published = Meansparse_ra_wrn_70_16.NormalizedWideResNet(**kwargs)
    assert assert_same_placement(base, published, torch.rand(4, 3, 32, 32)) == 4 * 3 + 1  # none inside SE


# --- timm Swin / ConvNeXt, built as RobustBench builds them ------------------------------------------
def test_swin_matches_robustbench_meansparse_swin_l(one_thread):
    from robustbench.model_zoo.architectures.Meansparse_swin_L import swin_large_patch4_window7_224_with_MeanSparse

    small = dict(img_size=56, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10)
    torch.manual_seed(0)
    base = normalize_model(timm.create_model("swin_large_patch4_window7_224", pretrained=False, **small), MU, SIGMA)
    original_keys = list(base.state_dict())
    published = swin_large_patch4_window7_224_with_MeanSparse(pretrained=False, pretrained_cfg=None,
                                                              pretrained_cfg_overlay=None, **small)
    x = torch.rand(2, 3, 56, 56)
    before = base.model.layers[0].blocks[0]
    prepared, _ = plan(base, x[:1], PUBLISHED)
    assert base.model.layers[0].blocks[0] is before and list(base.state_dict()) == original_keys  # untouched
    assert list(prepared.state_dict()) == original_keys  # the rewritten blocks keep the keys
    assert prepared.model.layers[0].blocks[0].norm1 is before.norm1  # and share the modules
    assert assert_same_placement(base, published, x) == 4 * 4  # four per block


def test_convnext_matches_robustbench_inserter(one_thread):
    from robustbench.model_zoo.architectures.sparsified_model import get_sparse_model

    torch.manual_seed(0)  # convnext_large widths: the published inserter hard-codes 192/384/768/1536
    base = normalize_model(timm.create_model("convnext_large", pretrained=False, depths=(1, 1, 1, 1), num_classes=10),
                           MU, SIGMA)
    published = get_sparse_model(copy.deepcopy(base), dataset="imagenet-Linf")
    assert assert_same_placement(base, published, torch.rand(2, 3, 64, 64)) == 2 * 4  # GELU input + drop_path


def test_ra_wrn_imagenet_rule_every_relu_silu_but_last_activation_and_se():
    ra = robustarch_wide_resnet
    torch.manual_seed(0)
    model = ra.NormalizedConfigurableModel(
        mean=ra.IMAGENET_MEAN, std=ra.IMAGENET_STD, stage_widths=[16, 16, 32, 32], kernel=3, strides=[2, 2, 2, 2],
        dilation=1, norm_layer=[nn.Identity, nn.BatchNorm2d, nn.BatchNorm2d], activation_layer=[nn.SiLU] * 3,
        group_widths=[8, 8, 8, 8], bottleneck_multipliers=[1.0] * 4, downsample_norm=nn.BatchNorm2d,
        depths=[1, 2, 1, 1], dense_ratio=None, stem_type=ra.Stem, stem_width=8, stem_kernel=7,
        stem_downsample_factor=2, stem_patch_size=None, block_constructor=ra.BottleneckBlock,
        ConvBlock=ra.Conv2dNormActivation, se_ratio=0.25, se_activation=nn.ReLU)
    expected = [n for n, m in model.named_modules() if type(m) in (nn.ReLU, nn.SiLU)
                and not n.endswith("last_activation") and ".se." not in n]
    skipped = [n for n, m in model.named_modules() if type(m) in (nn.ReLU, nn.SiLU) and n not in expected]
    assert any(n.endswith("last_activation") for n in skipped) and any(".se." in n for n in skipped)
    _, sites = plan(model, torch.zeros(1, 3, 64, 64), PUBLISHED)
    assert [s.name for s in sites] == expected and all(s.position == "input" for s in sites)


# --- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [
    dm_wide_resnet.DMPreActResNet(depth=18),
    Meansparse_wrn_70_16.DMWideResNet(depth=10, width=1),  # already a MeanSparse model
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
], ids=["preact", "published-itself", "sequential"])
def test_published_without_rule_is_one_line_error_naming_families(model):
    with pytest.raises(InsertionError) as exc:
        plan(model, torch.zeros(1, 3, 32, 32), PUBLISHED)
    message = str(exc.value)
    assert "\n" not in message and type(model).__name__ in message
    assert all(f in message for f in ("dm-wrn", "ra-wrn", "swin", "convnext", "DMWideResNet", "SwinTransformer"))


def test_output_pattern_matching_nothing_is_an_error(tiny_model, tiny_input):
    with pytest.raises(InsertionError, match="output pattern 'block.*' matches no module"):
        plan(tiny_model, tiny_input[:1], MeanSparseConfig(outputs=("act1", "block.*")))


# --- output sites through the whole pipeline ------------------------------------------------------------
def _relu_wrn() -> nn.Module:
    torch.manual_seed(0)
    model = dm_wide_resnet.DMWideResNet(depth=10, width=1, activation_fn=nn.ReLU).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
    return model


def test_output_sites_calibrate_alpha_bpda_capture_fuse_save_load_remove(one_thread, tmp_path):
    config = MeanSparseConfig(alpha=0.0, outputs=("layer.?.block.?",))
    base = _relu_wrn()
    keys = set(base.state_dict())
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        base_logits = base(x)
    blocks = {n: m for n, m in base.named_modules() if n.count(".") == 3 and n.startswith("layer.")}
    block_out: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: block_out.setdefault(n, out.detach())) for n, m in blocks.items()]
    with torch.no_grad():
        base(x)
    for h in handles:
        h.remove()

    model = insert_meansparse(base, x[:1], config)
    sites = meansparse_modules(model)
    assert [s for s in sites if s in blocks] == list(blocks) and len(sites) == 7 + 3
    assert keys < set(model.state_dict()) and all("meansparse" in k for k in set(model.state_dict()) - keys)
    assert {f"{b}.meansparse_out.mean" for b in blocks} <= set(model.state_dict())

    counts = robustify.defenses.meansparse.calibrate(model, [x[:4], x[4:]], progress=False)
    for name, out in block_out.items():  # exact statistics of the block outputs (after the residual add)
        assert counts[name] == out.numel() // out.shape[1]
        torch.testing.assert_close(sites[name].mean, out.mean((0, 2, 3)))
        torch.testing.assert_close(sites[name].var, out.var((0, 2, 3)))
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)  # alpha 0 is the identity

    with _capture_site_inputs(model) as captured, torch.no_grad():
        model(x)
    assert all(torch.equal(captured[n], block_out[n]) for n in blocks)  # the adaptive attack sees them

    ms.set_alpha(model, 0.5)
    with torch.no_grad():
        cut = model(x)
    assert not torch.equal(cut, base_logits)
    ms.set_alpha(model, {n: 0.0 for n in sites if n not in blocks})
    with torch.no_grad():  # the output sites alone cut (with one alpha everywhere they are
        assert not torch.equal(model(x), base_logits)  # redundant here: each feeds BN -> MeanSparse)
    ms.set_alpha(model, 0.5)

    xg = x.clone().requires_grad_(True)
    with robustify.bpda(model):
        bpda_out = model(xg)
    torch.testing.assert_close(bpda_out, cut, rtol=0, atol=0)
    assert xg.grad is None and torch.autograd.grad(bpda_out.sum(), xg)[0].abs().sum() > 0

    path = ms.save_calibration(model, tmp_path / "calib.safetensors", config=config)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["config"]["outputs"] == ["layer.?.block.?"]
    fresh = ms.load_calibration(_relu_wrn(), path, x[:1])
    ms.set_alpha(fresh, 0.5)
    with torch.no_grad():
        assert torch.equal(fresh(x), cut)

    assert fuse_meansparse(model) == 7  # the ReLU-host pre-hook sites only
    with torch.no_grad():
        assert torch.equal(model(x), cut)
    remove_meansparse(model)
    assert not meansparse_modules(model) and set(model.state_dict()) == keys
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)


def test_cli_inspect_lists_output_and_published_sites(capsys):
    from robustify.cli import main

    spec = "tinynets:small_dm_wrn"
    assert main(["inspect", spec, "--no-pretrained", "--outputs", "layer.?.block.?", "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)["sites"]
    assert sum(s["position"] == "output" for s in sites) == 3 and len(sites) == 3 * 3 + 1
    assert main(["inspect", spec, "--no-pretrained", "--preset", "published", "--json"]) == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)["sites"]] == [s["name"] for s in sites]
