"""Site discovery: functional calls through torch.fx, shared modules, channel axes, selection."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from robustify import load_model
from robustify.defenses.sites import is_activation, modularize, plan_sites, probe, select_sites


class Functional(nn.Module):
    """Every functional spelling of an activation, some with non-default arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = torch.relu(x - 0.5)
        x = (x - 0.2).relu()
        x = F.gelu(self.block(x), approximate="tanh")
        x = F.silu(x)
        x = F.leaky_relu(x, 0.2)
        x = F.elu(x, alpha=0.5)
        x = F.softplus(x, beta=2.0)
        return F.mish(x)


class Shared(nn.Module):
    """One PReLU instance (a parameter) called three times, as RobustBench's PAF networks do."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.PReLU(init=0.1)
        self.lin1, self.lin2 = nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin2(self.act(self.lin1(self.act(x)))))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow: not traceable by torch.fx
            x = x * 2
        return F.relu(self.act(x))


def test_every_functional_spelling_becomes_one_module_per_call() -> None:
    model = Functional().eval()
    x = torch.rand(2, 3, 5, 5)
    gm = modularize(model)
    assert isinstance(gm, fx.GraphModule) and gm is not model
    sites = plan_sites(gm, x)
    assert [s.activation for s in sites] == ["ReLU", "ReLU", "ReLU", "GELU", "SiLU", "LeakyReLU", "ELU", "Softplus", "Mish"]
    assert [s.name for s in sites] == [
        "relu_0", "relu_1", "relu_2", "gelu_0", "silu_0", "leaky_relu_0", "elu_0", "softplus_0", "mish_0"
    ]
    # arguments survive the rewrite
    assert gm.get_submodule(sites[3].name).approximate == "tanh"
    assert gm.get_submodule(sites[5].name).negative_slope == 0.2
    assert gm.get_submodule(sites[6].name).alpha == 0.5
    assert gm.get_submodule(sites[7].name).beta == 2.0
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert all(s.channel_dim == 1 and s.channels == 4 for s in sites)
    # the input model is untouched
    assert not any(is_activation(m) for m in model.modules())


def test_model_without_functional_calls_is_returned_as_is() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.GELU())
    assert modularize(model) is model


def test_shared_activation_module_gets_one_parameter_sharing_copy_per_call() -> None:
    model = Shared().eval()
    x = torch.randn(3, 5)
    gm = modularize(model)
    sites = plan_sites(gm, x)
    assert len(sites) == 3
    modules = [gm.get_submodule(s.name) for s in sites]
    assert len({id(m) for m in modules}) == 3
    assert len({m.weight.data_ptr() for m in modules}) == 1  # one shared parameter
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        modules[0].weight.fill_(0.3)  # a change through one copy is seen by all calls
        assert torch.equal(gm(x), model(x))
    assert all(s.channel_dim == 1 and s.channels == 5 for s in sites)


def test_untraceable_model_keeps_its_modules_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = Untraceable().eval()
    with caplog.at_level(logging.WARNING, logger="robustify"):
        assert modularize(model) is model
    assert "could not trace" in caplog.text and "functional" in caplog.text
    sites = plan_sites(model, torch.rand(1, 3, 4, 4))
    assert [s.name for s in sites] == ["act"]


def test_probe_records_shape_producer_and_order(tiny_model, tiny_input) -> None:
    gm = modularize(tiny_model)
    obs = probe(gm, tiny_input)
    assert list(obs) == ["act1", "relu_0", "act3", "relu_1"]
    assert obs["act1"].shape == (6, 6, 8, 8) and isinstance(obs["act1"].producer, nn.BatchNorm2d)
    assert isinstance(obs["act3"].producer, nn.Linear)
    assert [o.order for o in obs.values()] == [0, 1, 2, 3]


def test_channel_axis_is_last_for_tokens_and_channels_last() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(6)
            self.fc1, self.fc2 = nn.Linear(6, 24), nn.Linear(24, 6)
            self.act = nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, C)
            return self.fc2(self.act(self.fc1(self.norm(x))))

    sites = plan_sites(Tokens().eval(), torch.randn(2, 7, 6))
    assert [(s.channel_dim, s.channels, s.input_shape) for s in sites] == [(-1, 24, (2, 7, 24))]
    forced = plan_sites(Tokens().eval(), torch.randn(2, 24, 6), channel_dim=1)
    assert forced[0].channel_dim == 1 and forced[0].channels == 24
    class PermutedConv(nn.Module):  # conv, then channels-last without a Linear in between
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 10, 1), nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.conv(x).permute(0, 2, 3, 1))

    class Transposed(nn.Module):  # Linear, then back to (N, C, L)
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(4, 9), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(x).transpose(1, 2))

    assert [(s.channel_dim, s.channels) for s in plan_sites(PermutedConv(), torch.rand(2, 3, 5, 6))] == [(-1, 10)]
    assert [(s.channel_dim, s.channels) for s in plan_sites(Transposed(), torch.rand(2, 7, 4))] == [(1, 9)]
    with pytest.raises(ValueError, match=r"channel_dim 3 is out of range for site 'act', whose input has shape \(2, 7, 24\)"):
        plan_sites(Tokens().eval(), torch.randn(2, 7, 6), channel_dim=3)


def test_aa_resnet18_has_17_functional_relu_sites(aa_model) -> None:
    model, info = aa_model
    gm = modularize(model)
    sites = plan_sites(gm, info.example_input(1))
    assert len(sites) == 17
    assert all(s.activation == "ReLU" and s.channel_dim == 1 for s in sites)
    assert [s.channels for s in sites] == [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4
    assert sites[0].name == "relu_0"
    assert [s.name for s in sites[1:3]] == ["layer1.0.relu_0", "layer1.0.relu_1"]
    assert sites[-1].name == "layer4.1.relu_1" and sites[-1].owner_class == "BasicBlock"


def _site(name: str, order: int, owner: str = "") -> "object":
    from robustify.defenses.sites import Site

    return Site(name=name, activation="ReLU", channel_dim=1, channels=4, input_shape=(1, 4), order=order, owner_class=owner)


def test_select_sites_patterns_and_presets() -> None:
    model = nn.Sequential(nn.ReLU())
    sites = [_site(n, i) for i, n in enumerate(["stem.act", "layer1.0.act1", "layer1.0.act2", "layer2.0.act1", "final.act"])]
    names = lambda chosen: [s.name for s in chosen]  # noqa: E731
    assert names(select_sites(model, sites)) == [s.name for s in sites]
    assert names(select_sites(model, sites, include=["layer1.*"])) == ["layer1.0.act1", "layer1.0.act2"]
    assert names(select_sites(model, sites, exclude=["*.act2", "stem.*"])) == ["layer1.0.act1", "layer2.0.act1", "final.act"]
    assert names(select_sites(model, sites, preset="no-final")) == names(sites[:-1])
    with pytest.raises(ValueError, match="unknown placement preset 'every'"):
        select_sites(model, sites, preset="every")


@pytest.mark.parametrize("spec,total,n_se", [("timm:seresnet18", 25, 8), ("timm:legacy_seresnet18", 33, 8)])
def test_skip_se_drops_squeeze_excitation_sites(spec: str, total: int, n_se: int) -> None:
    """Only the SE modules' own activations go; not those of the blocks (SEResNetBlock) or the net (SENet)."""
    model, _ = load_model(spec, pretrained=False)
    x = torch.rand(1, 3, 64, 64)
    gm = modularize(model)
    everything = plan_sites(gm, x)
    se = [s.name for s in everything if {"se", "se_module"} & set(s.name.split("."))]
    assert len(everything) == total and len(se) == n_se
    kept = select_sites(gm, everything, skip_se=True)
    assert [s.name for s in kept] == [s.name for s in everything if s.name not in se]
    assert select_sites(gm, everything, skip_se=False) == everything


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out += x  # in place, as ResNet blocks write their residual connection
        out -= 0.5
        out *= 2
        out /= 3
        return F.relu(out)


def test_rewrite_keeps_in_place_arithmetic_in_place() -> None:
    import operator

    model = _Residual().eval()
    rewritten = modularize(model)
    targets = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    assert targets == [operator.iadd, operator.isub, operator.imul, operator.itruediv]
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(rewritten(x), model(x))
    seen: list[torch.Tensor] = []
    rewritten.conv.register_forward_hook(lambda m, i, o: seen.append(o) and None)
    result = rewritten(x)
    conv_out = model.conv(x)
    assert not torch.equal(seen[0], conv_out)  # the conv output itself was updated in place...
    assert torch.equal(result, F.relu(seen[0]))  # ...into the value the activation received


class _Branchy(nn.Module):
    """A top-level wrapper FX cannot trace (it picks a branch from the data) that calls its ``top`` ReLU twice,
    over traceable parts with functional activations and an activation module each part calls twice."""

    class Part(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1)
            self.act = nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.conv1(x))
            return self.act(self.conv2(self.act(x)))

    class Gate(nn.Module):  # no submodules, a functional activation of its own
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * F.silu(x.mean(1, keepdim=True))

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleList([self.Part(), self.Part()])
        self.top = nn.ReLU()
        self.gate = self.Gate()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 2:  # data-dependent control flow: torch.fx cannot trace this forward
            return self.head(self.top(self.parts[0](x)).mean((2, 3)))
        y = self.top(self.parts[0](x) + self.parts[1](x)) - 0.5
        return self.head(self.gate(self.top(y)).mean((2, 3)))


def test_untraceable_wrapper_traces_its_parts_one_by_one() -> None:
    model = _Branchy().eval()
    x = torch.rand(2, 3, 4, 4)
    prepared = modularize(model, x)
    sites = plan_sites(prepared, x)
    assert [s.name for s in sites] == [f"parts.{i}.{n}" for i in (0, 1) for n in ("relu_0", "act_0", "act_1")] + [
        "top_0", "top_1", "gate.silu_0"]
    assert [s.channels for s in sites] == [4, 4, 6, 4, 4, 6, 6, 6, 1]
    calls = Counter()
    for s in sites:
        prepared.get_submodule(s.name).register_forward_pre_hook(lambda m, a, name=s.name: calls.update([name]))
    with torch.no_grad():
        for _ in range(2):  # the per-call copies are counted afresh in every forward
            assert torch.equal(prepared(x), model(x))
        assert torch.equal(prepared(x + 3), model(x + 3))  # the other branch still runs as written
    assert calls == Counter({s.name: 2 for s in sites}) + Counter(["parts.0.relu_0", "parts.0.act_0", "parts.0.act_1",
                                                                   "top_0"])
    prepared.top_1 = nn.Identity()  # a defense replacing one call's module changes that call only
    with torch.no_grad():
        y = model.top(model.parts[0](x) + model.parts[1](x)) - 0.5
        assert torch.equal(prepared(x), model.head(model.gate(y).mean((2, 3))))
    # the input model is untouched
    assert type(model.parts[0]) is _Branchy.Part and type(model.top) is nn.ReLU
    assert not any(isinstance(m, nn.ReLU) for m in model.parts.modules()) and not model._forward_pre_hooks


def test_plan_without_example_still_reports_a_shared_module_fx_could_not_separate() -> None:
    model = _Branchy().eval()
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="'top' is called 2 times"):
        plan_sites(modularize(model), x)
