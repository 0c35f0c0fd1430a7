"""RobustBench's published MeanSparse models -> robustify's MeanSparse, with identical outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustify import bpda, defenses_disabled
from robustify.defenses.meansparse import meansparse_modules
from robustify.defenses.meansparse import set_alpha
from robustify.core.compat import import_robustbench
from robustify.defenses.meansparse.interop import convert_published_meansparse, find_published_meansparse
from robustify.defenses.meansparse.module import MeanSparse

import_robustbench()
from robustbench.model_zoo.architectures import Meansparse_swin_L, Meansparse_wrn_70_16, Meansparse_wrn_94_16  # noqa: E402
from robustbench.model_zoo.architectures.sparsified_model import MeanSparse_imagenet  # noqa: E402


def _randomize(model: nn.Module, threshold: float, seed: int = 0) -> nn.Module:
    """Random published statistics, as a calibrated checkpoint would carry."""
    g = torch.Generator().manual_seed(seed)
    for m in find_published_meansparse(model).values():
        c = m.running_mean.numel()
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
        m.running_var.copy_(torch.rand(c, generator=g) + 0.2)
        m.threshold.fill_(threshold)
    return model.eval()


def _wrn94() -> nn.Module:
    torch.manual_seed(0)
    return Meansparse_wrn_94_16.MeanSparse_DMWideResNet(depth=10, width=1, activation_fn=nn.SiLU)


def _wrn70() -> nn.Module:
    torch.manual_seed(1)
    return Meansparse_wrn_70_16.DMWideResNet(depth=10, width=2, activation_fn=nn.SiLU)


@pytest.mark.parametrize("build", [_wrn94, _wrn70], ids=["S-WRN-94-16 class", "WRN-70-16 class"])
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.6])
def test_published_wrn_converts_with_identical_outputs(build, threshold: float) -> None:
    model = _randomize(build(), threshold)
    published = find_published_meansparse(model)
    # per block: before each activation, after the residual add; plus before the final activation
    assert len(published) == 3 * 3 + 1
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
    stats = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in published.items()}
    assert convert_published_meansparse(model) is model
    assert not find_published_meansparse(model)
    modules = meansparse_modules(model)
    assert list(modules) == list(published)  # site = module path
    for name, m in modules.items():
        assert isinstance(m, MeanSparse) and m.channel_dim == 1 and m.calibrated
        assert m.alpha == pytest.approx(threshold)
        assert torch.equal(m.mean, stats[name][0]) and torch.equal(m.var, stats[name][1])
    with torch.no_grad():
        assert torch.equal(model(x), reference)
        if threshold > 0:
            with defenses_disabled(model):
                assert not torch.equal(model(x), reference)


def test_bpda_works_on_converted_model() -> None:
    model = _randomize(_wrn94(), 0.3)
    convert_published_meansparse(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 7])

    def grad() -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        nn.functional.cross_entropy(model(xg), y).backward()
        return xg.grad

    masked = grad()
    with bpda(model):
        straight = grad()
        assert all(m.straight_through for m in meansparse_modules(model).values())
    assert not any(m.straight_through for m in meansparse_modules(model).values())
    assert (straight - masked).abs().max() > 1e-6
    # at threshold 0 the published model is the base model: BPDA gives its gradient exactly
    set_alpha(model, 0.0)
    with bpda(model):
        at_zero = grad()
    with defenses_disabled(model):
        assert torch.equal(at_zero, grad())


class _ImagenetStyle(nn.Module):
    """RobustBench's ConvNeXt recipe: MeanSparse_imagenet on NCHW maps and on a channels-last MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ms_nchw = MeanSparse_imagenet(8)
        self.fc1 = nn.Linear(8, 32)
        self.ms_last = MeanSparse_imagenet(32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ms_nchw(self.conv(x)).permute(0, 2, 3, 1)  # (N, H, W, C)
        x = self.act(self.ms_last(self.fc1(x)))
        return self.fc2(x).mean(dim=(1, 2))


def test_imagenet_style_layout_is_read_from_a_probe() -> None:
    torch.manual_seed(0)
    model = _randomize(_ImagenetStyle(), 0.25)
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        reference = model(x)
    with pytest.raises(ValueError, match="pass an example input"):
        convert_published_meansparse(model)
    assert len(find_published_meansparse(model)) == 2  # refused before changing anything
    convert_published_meansparse(model, x[:1])
    modules = meansparse_modules(model)
    assert {s: m.channel_dim for s, m in modules.items()} == {"ms_nchw": 1, "ms_last": -1}
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_swin_meansparse_is_channels_last() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), Meansparse_swin_L.MeanSparse(12), nn.GELU()).eval()
    _randomize(model, 0.4)
    x = torch.randn(2, 5, 6)  # tokens
    with torch.no_grad():
        reference = model(x)
    convert_published_meansparse(model)  # fixed layout: no example needed
    (site, m), = meansparse_modules(model).items()
    assert site == "1" and m.channel_dim == -1
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_statistics_update_mode_is_refused() -> None:
    model = _randomize(_wrn94(), 0.2)
    last = list(find_published_meansparse(model).values())[-1]
    last.flag_update_statistics.fill_(1)
    with pytest.raises(ValueError, match="statistics-update mode"):
        convert_published_meansparse(model)
    assert len(find_published_meansparse(model)) == 10 and not meansparse_modules(model)  # nothing half-converted


def test_model_without_published_modules_is_unchanged(tiny_model) -> None:
    keys = list(tiny_model.state_dict())
    assert convert_published_meansparse(tiny_model) is tiny_model
    assert list(tiny_model.state_dict()) == keys
