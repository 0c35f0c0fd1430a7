"""Sparta: spatially attentive and dynamic activation (Guo, Juefei-Xu et al., arXiv 2105.08269).

``Y = act(X) * sigmoid(phi_s(X) x phi_c(X))`` with ``act = ReLU`` in the paper, where the
spatial attentive net (SANet) maps X to an ``H x W`` map, the channel attentive net (CANet)
to a ``C`` vector and, in the full model, the dynamic predictive net (DPNet) predicts the
SANet's last 3x3 kernel (Conv5) from X. The outer product broadcasts to ``C x H x W``.

What the paper states and what is inferred here (``spec_modules.md`` section 2):

* [stated] Conv1, Conv2, Conv3, Conv6 are ``C x C x 3 x 3``, Conv4 ``C x 1 x 3 x 3``,
  Conv5 ``1 x 1 x 3 x 3`` predicted per input by the DPNet; neighbourhood sharing (Eq. 6).
* [inferred, configurable] the wiring (Figure 2 is missing): SANet ``Conv1 -> ReLU -> Conv4
  -> Conv5``; DPNet ``Conv2 -> ReLU -> Conv3 -> AdaptiveAvgPool2d(3) -> mean over channels``
  gives the Conv5 kernel, applied as a grouped convolution (one kernel per example), plus
  a learnable scalar bias; CANet ``Conv6 -> global average pool``. Padding 1, bias on every
  conv, no BatchNorm, PyTorch's default init (``init="paper"``: phi ~ 0.5 at init).
  ``hidden_ratio`` scales the width of Conv1/2/3 (1.0 = the paper's C).
* [inferred] SPARTA-w/o-DPNet (``variant="nodp"``): Conv5 is a static learnable 3x3 conv and
  Conv2/Conv3 are dropped.
* [inferred] neighbourhood sharing with N > 1: average-pool the logits over N x N cells,
  apply the sigmoid, nearest-upsample back (a partial last cell is its own cell).
* [robustify's addition] ``init="identity"`` for post-training insertion into a trained
  network: the last layer of each branch is zero-initialised and the biases set so that
  ``phi = sigmoid(init_logit)`` (0.95 for 3.0) everywhere, so the network starts almost
  unchanged and every parameter still receives gradient (as LoRA's zero-initialised B).

Placement: Sparta *replaces* activation modules (after :func:`robustify.defenses.sites.modularize`).
Presets (:data:`SPARTA_PRESETS`): ``paper`` is the last activation of each residual group
(ResNet-18's G1-G4.B2, after the residual add), found by rule from the site names: a
block is a path ending in a numeric index (``layer1.1``), its group the parent
(``layer1``); ``blocks`` is the last activation of every block (the paper's G{1-4}.B{1,2}
ablation); ``all`` is every conv-map activation. Include/exclude globs and an explicit
site list refine the choice.
"""

from __future__ import annotations

import contextlib

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustify.core.errors import UserError
from robustify.core.config import SerializableConfig
from robustify.defenses.file import read_defense_file, write_defense_file
from robustify.defenses.base import Defense, DefenseOptions, toggled
from robustify.defenses.registry import record_config, register_defense
from robustify.core.errors import InsertionError, StateMismatchError
from robustify.defenses.sites import Site, modularize, plan_sites, register_activation, select_sites, set_submodule

logger = logging.getLogger(__name__)

__all__ = [
    "SPARTA_PRESETS",
    "Sparta",
    "SpartaConfig",
    "insert_sparta",
    "load_sparta",
    "plan_sparta",
    "residual_group_sites",
    "save_sparta",
    "sparta_modules",
]

SPARTA_PRESETS: dict[str, str] = {
    "paper": "last activation of each residual group (ResNet-18 G1-G4.B2, the paper's default)",
    "blocks": "last activation of every residual block (the paper's G{1-4}.B{1,2} ablation)",
    "all": "every activation on a conv feature map",
}
VARIANTS = ("sparta", "nodp")
INITS = ("paper", "identity")
_BASES = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "elu": F.elu, "softplus": F.softplus}


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpartaConfig(SerializableConfig):
    """Which Sparta to build and where to put it.

    Attributes:
        variant: ``"sparta"`` (with the dynamic predictive net) or ``"nodp"`` (w/o-DPNet).
        neighborhood: N of Eq. 6 (N x N positions share one score); 1 is Eq. 3.
        preset: placement rule, see :data:`SPARTA_PRESETS`.
        include: glob patterns of site names to keep (after the preset).
        exclude: glob patterns of site names to drop.
        sites: explicit site names; when given, preset/include/exclude are ignored.
        hidden_ratio: width of Conv1/Conv2/Conv3 as a fraction of C (1.0 = paper).
        kernel_size: kernel of every conv (3 in the paper); Conv5's kernel too.
        base: the gated activation (``relu`` in the paper; silu/gelu/elu/softplus allowed).
        init: ``"paper"`` (PyTorch default init, phi ~ 0.5) or ``"identity"`` (phi =
            sigmoid(init_logit) everywhere at start, for post-training insertion).
        init_logit: starting logit for ``init="identity"``.
    """

    VERSION: ClassVar[int] = 1
    variant: str = "sparta"
    neighborhood: int = 1
    preset: str = "paper"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    hidden_ratio: float = 1.0
    kernel_size: int = 3
    base: str = "relu"
    init: str = "paper"
    init_logit: float = 3.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.preset not in SPARTA_PRESETS:
            raise UserError(f"unknown Sparta preset {self.preset!r}; choose from {sorted(SPARTA_PRESETS)}")
        if int(self.neighborhood) != self.neighborhood or self.neighborhood < 1:
            raise UserError(f"neighborhood must be an integer >= 1, got {self.neighborhood!r}")
        if not 0 < self.hidden_ratio <= 4:
            raise UserError(f"hidden_ratio must be in (0, 4], got {self.hidden_ratio!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise UserError(f"kernel_size must be odd and >= 1, got {self.kernel_size!r}")
        if self.base not in _BASES:
            raise UserError(f"base must be one of {sorted(_BASES)}, got {self.base!r}")
        if self.init not in INITS:
            raise UserError(f"init must be one of {INITS}, got {self.init!r}")
        if not math.isfinite(self.init_logit):
            raise UserError(f"init_logit must be finite, got {self.init_logit!r}")
        for name in ("include", "exclude", "sites"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    def module_kwargs(self) -> dict[str, Any]:
        """The arguments of :class:`Sparta` this config fixes (all but ``channels``)."""
        return {
            "variant": self.variant,
            "neighborhood": self.neighborhood,
            "hidden_ratio": self.hidden_ratio,
            "kernel_size": self.kernel_size,
            "base": self.base,
            "init": self.init,
            "init_logit": self.init_logit,
        }


# ------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------
def _dynamic_conv(x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Convolve each example ``x[i]`` (1, H, W) with its own kernel ``kernels[i]`` (1, k, k)."""
    n, _, h, w = x.shape
    k = kernels.shape[-1]
    out = F.conv2d(x.reshape(1, n, h, w), kernels.reshape(n, 1, k, k), padding=k // 2, groups=n)
    return out.reshape(n, 1, h, w) + bias


def _share_neighbourhood(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Eq. 6: one score per N x N cell (mean logit), nearest-upsampled back to H x W."""
    h, w = logits.shape[-2:]
    pooled = F.avg_pool2d(logits, kernel_size=n, stride=n, ceil_mode=True)
    scores = torch.sigmoid(pooled)
    return scores.repeat_interleave(n, dim=-2).repeat_interleave(n, dim=-1)[..., :h, :w]


class Sparta(nn.Module):
    """One Sparta activation for NCHW feature maps with ``channels`` channels (see module doc)."""

    def __init__(
        self,
        channels: int,
        variant: str = "sparta",
        neighborhood: int = 1,
        hidden_ratio: float = 1.0,
        kernel_size: int = 3,
        base: str = "relu",
        init: str = "paper",
        init_logit: float = 3.0,
        site: str = "",
    ) -> None:
        super().__init__()
        self.enabled = True  # False: the base activation alone (the base model; never saved)
        if variant not in VARIANTS:
            raise UserError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if base not in _BASES:
            raise UserError(f"base must be one of {sorted(_BASES)}, got {base!r}")
        self.channels = int(channels)
        self.variant = variant
        self.neighborhood = int(neighborhood)
        self.base = base
        self.site = site
        hidden = max(1, round(self.channels * hidden_ratio))
        k, p = kernel_size, kernel_size // 2
        # SANet: Conv1 -> ReLU -> Conv4 -> Conv5 (dynamic or static)
        self.conv1 = nn.Conv2d(self.channels, hidden, k, padding=p)
        self.conv4 = nn.Conv2d(hidden, 1, k, padding=p)
        if variant == "sparta":
            # DPNet: Conv2 -> ReLU -> Conv3 -> pool(k) -> channel mean = Conv5's kernel
            self.conv2 = nn.Conv2d(self.channels, hidden, k, padding=p)
            self.conv3 = nn.Conv2d(hidden, hidden, k, padding=p)
            self.conv5_bias = nn.Parameter(torch.zeros(1))
        else:
            self.conv5 = nn.Conv2d(1, 1, k, padding=p)
        # CANet: Conv6 -> global average pool
        self.conv6 = nn.Conv2d(self.channels, self.channels, k, padding=p)
        if init == "identity":
            self._init_identity(init_logit)
        elif init != "paper":
            raise UserError(f"init must be one of {INITS}, got {init!r}")

    @property
    def dynamic(self) -> bool:
        return self.variant == "sparta"

    def _init_identity(self, logit: float) -> None:
        """Start at phi = sigmoid(logit) everywhere: zero last weights, biases s=1, c=logit."""
        with torch.no_grad():
            if self.dynamic:
                nn.init.zeros_(self.conv3.weight)
                nn.init.zeros_(self.conv3.bias)
                self.conv5_bias.fill_(1.0)
            else:
                nn.init.zeros_(self.conv5.weight)
                self.conv5.bias.fill_(1.0)
            nn.init.zeros_(self.conv6.weight)
            self.conv6.bias.fill_(logit)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """DPNet: the per-example Conv5 kernel, shape (N, 1, k, k)."""
        k = self.conv4.kernel_size[0]
        h = self.conv3(F.relu(self.conv2(x)))
        return F.adaptive_avg_pool2d(h, k).mean(dim=1, keepdim=True)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """SANet: phi_s(X), shape (N, 1, H, W)."""
        t = self.conv4(F.relu(self.conv1(x)))
        if self.dynamic:
            return _dynamic_conv(t, self.kernel(x), self.conv5_bias)
        return self.conv5(t)

    def channel(self, x: torch.Tensor) -> torch.Tensor:
        """CANet: phi_c(X), shape (N, C, 1, 1)."""
        return F.adaptive_avg_pool2d(self.conv6(x), 1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """phi(X) in [0, 1], shape (N, C, H, W) (with neighbourhood sharing if N > 1)."""
        logits = self.spatial(x) * self.channel(x)
        if self.neighborhood > 1:
            return _share_neighbourhood(logits, self.neighborhood)
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise UserError(
                f"Sparta at {self.site or 'this site'} expects (N, {self.channels}, H, W) feature maps, "
                f"got shape {tuple(x.shape)}"
            )
        if not self.enabled:
            return _BASES[self.base](x)
        return _BASES[self.base](x) * self.attention(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, variant={self.variant!r}, neighborhood={self.neighborhood}, base={self.base!r}"


# Sparta replaces activations: it is one (an FX leaf, and a site for later insertions).
register_activation(Sparta)


def sparta_modules(model: nn.Module) -> dict[str, Sparta]:
    """Every Sparta module of ``model`` by site name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Sparta)}


# ------------------------------------------------------------------------------------------
# placement
# ------------------------------------------------------------------------------------------
def _block_and_group(name: str) -> tuple[str, str] | None:
    """``layer1.1.relu_1`` -> (``layer1.1``, ``layer1``); None outside numbered blocks."""
    parts = name.split(".")[:-1]
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    if not numeric:
        return None
    last = numeric[-1]
    return ".".join(parts[: last + 1]), ".".join(parts[:last])


def residual_group_sites(sites: Sequence[Site], per: str = "group") -> list[Site]:
    """The last site (forward order) of each residual group (``per="group"``) or block (``"block"``).

    A block is a module path ending in a numeric index (``layer1.1``, ``block1.layer.3``,
    ``stages.0.blocks.2``) and its group is the parent container. Sites outside numbered
    blocks (the stem) belong to no group.
    """
    if per not in ("group", "block"):
        raise UserError(f"per must be 'group' or 'block', got {per!r}")
    last: dict[str, Site] = {}
    for site in sorted(sites, key=lambda s: s.order):
        where = _block_and_group(site.name)
        if where is not None:
            last[where[1] if per == "group" else where[0]] = site
    return sorted(last.values(), key=lambda s: s.order)


def _is_feature_map(site: Site) -> bool:
    return len(site.input_shape) == 4 and site.channel_dim == 1


def _select(model: nn.Module, everything: list[Site], config: SpartaConfig) -> list[Site]:
    if config.sites:
        by_name = {s.name: s for s in everything}
        unknown = [n for n in config.sites if n not in by_name]
        if unknown:
            raise InsertionError(
                f"Sparta site(s) {unknown} are not activation sites of {type(model).__name__}; "
                f"available: {[s.name for s in everything][:20]}"
            )
        chosen = [by_name[n] for n in config.sites]
    else:
        maps = [s for s in everything if _is_feature_map(s)]
        if config.preset == "paper":
            chosen = residual_group_sites(maps, "group")
        elif config.preset == "blocks":
            chosen = residual_group_sites(maps, "block")
        else:
            chosen = maps
        chosen = select_sites(model, chosen, include=config.include, exclude=config.exclude, skip_se=True)
    bad = [s.name for s in chosen if not _is_feature_map(s)]
    if bad:
        raise InsertionError(f"Sparta needs NCHW conv feature maps; site(s) {bad} are not (see `robustify inspect`)")
    return chosen


def plan_sparta(
    model: nn.Module, example: torch.Tensor, config: SpartaConfig | None = None
) -> tuple[nn.Module, list[Site]]:
    """Return the (possibly FX-rewritten) model and the sites Sparta would replace."""
    config = config or SpartaConfig()
    prepared = modularize(model, example)
    everything = plan_sites(prepared, example)
    if not everything:
        raise InsertionError(f"no activation found in {type(model).__name__}")
    chosen = _select(prepared, everything, config)
    if not chosen:
        raise InsertionError(
            f"the Sparta plan changes nothing: {len(everything)} activation site(s) in {type(model).__name__}, "
            f"but preset={config.preset!r}, include={list(config.include)}, exclude={list(config.exclude)} "
            "select none (the 'paper' preset needs residual blocks named like layer1.0, layer1.1, ...)"
        )
    return prepared, chosen


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    return next((p.device for p in model.parameters()), fallback)


def insert_sparta(
    model: nn.Module, example: torch.Tensor, config: SpartaConfig | None = None
) -> nn.Module:
    """Replace the activations ``config`` selects by Sparta modules.

    Returns the model to use from now on (an ``fx.GraphModule`` when functional activations
    had to become modules). The input model's own modules are reused, not copied.
    """
    config = config or SpartaConfig()
    if sparta_modules(model):
        raise InsertionError("the model already has Sparta modules")
    prepared, sites = plan_sparta(model, example, config)
    device = _device_of(prepared, example.device)
    for site in sites:
        if site.activation not in ("ReLU", "Sparta"):
            logger.warning("Sparta replaces a %s at %s by gated %s", site.activation, site.name, config.base)
        module = Sparta(site.channels, site=site.name, **config.module_kwargs())
        set_submodule(prepared, site.name, module.to(device))
    logger.info(
        "inserted Sparta (%s, N=%d) at %d site(s): %s",
        config.variant, config.neighborhood, len(sites), ", ".join(f"{s.name} (C={s.channels})" for s in sites),
    )
    return record_config(prepared, config)


# ------------------------------------------------------------------------------------------
# saving and loading (the one defense file format, robustify.defenses.file)
# ------------------------------------------------------------------------------------------
def save_sparta(
    model: nn.Module,
    path: str | Path,
    *,
    config: SpartaConfig,
    model_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save only the Sparta parameters (keys ``<site>.<param>``) plus a JSON sidecar."""
    modules = sparta_modules(model)
    if not modules:
        raise UserError("the model has no Sparta modules to save")
    tensors = {f"{site}.{k}": v for site, m in modules.items() for k, v in m.state_dict().items()}
    sites = [{"name": site, "channels": m.channels, "channel_dim": 1} for site, m in modules.items()]
    write_defense_file(path, tensors, defense=_name_of(config), config=config, sites=sites, model_info=model_info,
                       extra=extra)
    logger.info("saved Sparta (%d site(s), %d tensors) to %s", len(modules), len(tensors), path)
    return Path(path)


def _target_sites(
    model: nn.Module, example: torch.Tensor, config: SpartaConfig, saved: list[dict[str, Any]], mapping: str
) -> tuple[nn.Module, list[Site]]:
    """Where the saved modules go: same names if the model has them, else the same rule, in order."""
    prepared = modularize(model, example)
    everything = plan_sites(prepared, example)
    by_name = {s.name: s for s in everything}
    names = [s["name"] for s in saved]
    if mapping == "name" or (mapping == "auto" and all(n in by_name for n in names)):
        missing = [n for n in names if n not in by_name]
        if missing:
            raise StateMismatchError(f"the model has no activation site(s) {missing} (saved Sparta sites {names})")
        return prepared, [by_name[n] for n in names]
    if mapping not in ("auto", "order"):
        raise UserError(f"mapping must be 'auto', 'name' or 'order', got {mapping!r}")
    rule = SpartaConfig.from_dict({**config.to_dict(), "sites": []})
    try:
        chosen = _select(prepared, everything, rule)
    except InsertionError as exc:
        raise StateMismatchError(f"cannot place the saved Sparta modules: {exc}") from exc
    if len(chosen) != len(saved):
        raise StateMismatchError(
            f"the saved Sparta has {len(saved)} site(s) (channels {[s['channels'] for s in saved]}) but the "
            f"{rule.preset!r} placement finds {len(chosen)} in this model (channels {[s.channels for s in chosen]})"
        )
    return prepared, chosen


def load_sparta(
    model: nn.Module,
    path: str | Path,
    example: torch.Tensor,
    *,
    mapping: str = "auto",
    freeze: bool = False,
) -> nn.Module:
    """Insert the pretrained Sparta saved in ``path`` into ``model`` (transfer included).

    ``mapping``: ``"name"`` puts each saved module at the site of the same name; ``"order"``
    re-applies the saved placement rule to this model and pairs sites in forward order
    (cross-network transfer, e.g. ResNet-18 -> ResNet-34); ``"auto"`` uses names when the
    model has them all, else order. Channel counts must match site by site, otherwise a
    :class:`StateMismatchError` names the first mismatch. ``freeze=True`` sets
    ``requires_grad=False`` on the loaded parameters (the paper's transfer setting).
    """
    tensors, meta = read_defense_file(path, NAMES)
    config = SpartaConfig.from_dict(meta["config"])
    saved = meta["sites"]
    prepared, targets = _target_sites(model, example, config, saved, mapping)
    for entry, site in zip(saved, targets):
        if site.channels != entry["channels"] or not _is_feature_map(site):
            raise StateMismatchError(
                f"{str(path)!r} does not fit this model: saved Sparta site {entry['name']!r} has "
                f"{entry['channels']} channels, target site {site.name!r} has {site.channels} "
                f"(input shape {list(site.input_shape)}); Sparta transfers only between sites of equal width"
            )
    device = _device_of(prepared, example.device)
    for entry, site in zip(saved, targets):
        module = Sparta(entry["channels"], site=site.name, **config.module_kwargs())
        prefix = entry["name"] + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise StateMismatchError(
                f"{str(path)!r}: tensors of site {entry['name']!r} do not fit a {config.variant} Sparta "
                f"(missing {result.missing_keys}, unexpected {result.unexpected_keys})"
            )
        module.requires_grad_(not freeze)
        set_submodule(prepared, site.name, module.to(device))
    logger.info("loaded Sparta from %s into %d site(s)%s", path, len(targets), " (frozen)" if freeze else "")
    return record_config(prepared, config)


# ------------------------------------------------------------------------------------------
# the Sparta defense in the registry
# ------------------------------------------------------------------------------------------
NAMES = ("sparta", "sparta-nodp")


def _name_of(config: SpartaConfig) -> str:
    return "sparta" if config.variant == "sparta" else "sparta-nodp"


def _make_config(name: str, **options: Any) -> SpartaConfig:
    return SpartaConfig(variant="sparta" if name == "sparta" else "nodp", **options)


def _save(model: nn.Module, path: str | Path, config: SpartaConfig, **kwargs: Any) -> Path:
    return save_sparta(model, path, config=config, **kwargs)


@contextlib.contextmanager
def sparta_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Every Sparta module returns its base activation alone inside the block: the base model."""
    with toggled(sparta_modules(model).values(), "enabled", False):
        yield model


SPARTA = register_defense(Defense(
    names=NAMES,
    title="Sparta",
    trainable=True,
    config_type=SpartaConfig,
    make_config=_make_config,
    name_of=_name_of,
    plan=lambda model, example, config: plan_sparta(model, example, config)[1],
    apply=insert_sparta,
    save=_save,
    load=lambda model, path, example, config=None: load_sparta(model, path, example, mapping="name"),
    modules=lambda model: dict(sparta_modules(model)),
    learnable=frozenset(NAMES),
    options=DefenseOptions(
        fields=("preset", "sites", "include", "exclude", "neighborhood", "hidden_ratio", "init", "init_logit"),
        # post-training insertion starts as the identity gate; train from the paper's init with --init paper
        defaults=SpartaConfig(init="identity"),
        names={"preset": "sparta-preset", "sites": "site"},
        choices={"preset": tuple(SPARTA_PRESETS), "init": tuple(INITS)},
        group="Sparta placement"),
    disabled=sparta_disabled,
    transfer=lambda model, path, example: load_sparta(model, path, example, mapping="auto", freeze=True),
))
