"""k-winners-take-all (k-WTA) as a robustify defense plugin, in one file.

Xiao, Zhong and Zheng, "Enhancing Adversarial Defense by k-Winners-Take-All", ICLR 2020
(arXiv 1905.10510): each selected activation (every ReLU by default) is replaced by k-WTA, which
keeps, per example, the ``k`` largest entries of the layer's input and sets all the others to
zero. "The layer" is the activation's whole input for one example (``C*H*W`` entries of a
feature map, ``L*D`` of a token sequence, ``D`` of a vector), and

    k = ceil(ratio * units),  clamped to [1, units]

with ``ratio`` the paper's sparsity ratio gamma. The default 0.1 is the value of the paper's main
CIFAR-10 models (ResNet-18, DenseNet-121, WideResNet-22-10 with k-WTA, gamma = 0.1; its code also
trains a ResNet-18 at 0.2). The reference code takes ``k = int(ratio * units)`` and keeps every
entry ``>=`` the k-th largest; here ``k`` is rounded up (at least one winner) and ties with the
k-th largest are kept as in that code.

The forward is discontinuous in the input (the set of winners jumps), which is what the paper
relies on: the gradient is exact inside a linear piece but says nothing about the next one, and
attacks that follow it stall (gradient masking). Its gradient w.r.t. the winners is 1, w.r.t. the
losers 0. Tramer, Carlini, Brendel and Madry, "On Adaptive Attacks to Adversarial Example Defenses",
NeurIPS 2020, broke k-WTA with attacks that do not follow that local gradient. Here it gets, through
robustify's hooks and nothing else:

* ``straight_through`` (the BPDA attacks): forward k-WTA unchanged; backward through the activation
  k-WTA replaced (``backward="activation"``, the default: for ReLU, gradient 1 where the input is
  positive, whether or not it won), or the identity (``backward="identity"``). The replaced
  activation is the honest surrogate for a post-training swap: it is the function the backbone was
  trained with and the one the k-WTA output approximates (k-WTA = ReLU with the positive losers
  zeroed), so its gradient is the one of the smooth model nearest to the defended one; the identity
  would also pass gradient through the negative inputs, which neither model lets through.
* ``site_inputs`` + ``blocked`` (the mask-penalty attack and the audit's gradient census): the units
  whose gradient k-WTA blocks are the losers, about ``1 - ratio`` of each layer.
* ``disabled`` (the transfer attack's source): the replaced activations are used again, i.e. the base model.
* save/load in the one defense file format: k-WTA has no tensors of its own, the file holds none
  (as the fixed activation swaps' files) and its sidecar the config and the sites.

k-WTA is neither trained nor calibrated: ``robustify evaluate --defense kwta`` applies it with its
config. Installing this package (``pip install plugins/robustify-kwta``) registers it through the
``robustify.defenses`` entry point; nothing inside ``robustify/`` names it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from robustify.core.config import SerializableConfig
from robustify.core.errors import InsertionError, StateMismatchError, UserError
from robustify.defenses import Defense, DefenseOptions, record_config, register_defense
from robustify.defenses.base import captured_inputs, toggled
from robustify.defenses.activations.swaps import plan_swap
from robustify.defenses.file import read_defense_file, write_defense_file
from robustify.defenses.sites import Site, modularize, plan_sites, register_activation, set_submodule

__all__ = ["KWTA", "KWTA_DEFENSE", "KWTAConfig", "apply_kwta", "capture_site_inputs", "kwta_disabled", "kwta_mask",
           "kwta_modules", "load_kwta", "losers", "plan_kwta", "remove_kwta", "save_kwta", "straight_through", "winners"]

logger = logging.getLogger(__name__)

NAME = "kwta"
#: the backward of the straight-through (BPDA) mode
BACKWARDS = ("activation", "identity")


# ------------------------------------------------------------------------------------------
# the operator
# ------------------------------------------------------------------------------------------
def winners(units: int, ratio: float) -> int:
    """``k``: the number of entries k-WTA keeps out of ``units`` (``ceil(ratio * units)``, at least 1)."""
    return min(units, max(1, math.ceil(ratio * units)))


def kwta_mask(z: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per example (dim 0), the entries of ``z`` among its ``k`` largest (ties with the k-th kept): a bool tensor."""
    flat = z.detach().flatten(1)
    k = winners(flat.shape[1], ratio)
    kth = flat.topk(k, dim=1).values[:, -1:]
    return (flat >= kth).view_as(z)


class KWTA(nn.Module):
    """k-WTA in place of an activation (Xiao et al., ICLR 2020): per example, the ``k`` largest entries
    of the input pass, the others are zero.

    ``replaced`` (a child module) is the activation it stands for: the backward of the straight-through
    mode and the whole forward of the disabled mode. The modes are attributes toggled by the context
    managers :func:`straight_through` and :func:`kwta_disabled`, never saved.
    """

    def __init__(self, ratio: float, replaced: nn.Module, backward: str = "activation", channels: int = 0) -> None:
        super().__init__()
        self.ratio = float(ratio)
        self.backward = backward
        self.channels = int(channels)  # of the site (recorded in the defense file, checked on load)
        self.replaced = replaced
        self.straight_through = False
        self.enabled = True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.replaced(z)
        hard = z * kwta_mask(z, self.ratio).to(z.dtype)
        if not self.straight_through:
            return hard
        soft = self._surrogate(z)
        return hard.detach() + (soft - soft.detach())  # the value of ``hard``, the gradient of ``soft``

    def _surrogate(self, z: torch.Tensor) -> torch.Tensor:
        """The function whose gradient the straight-through mode back-propagates."""
        if self.backward == "identity":
            return z
        return self.replaced(z.clone() if getattr(self.replaced, "inplace", False) else z)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio:g}, backward={self.backward}"


register_activation(KWTA)  # a k-WTA site is an activation site (another defense may go in front of it)


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KWTAConfig(SerializableConfig):
    """Where k-WTA replaces activations, and how sparse it is.

    Attributes:
        ratio: the sparsity ratio gamma: share of each layer's units kept per example, k = ceil(ratio * units)
            (0.1: the paper's CIFAR-10 models).
        replace: class names of the activations to replace (default: every ReLU).
        include: glob patterns of site names to keep.
        exclude: glob patterns of site names to skip.
        backward: the BPDA backward: activation (the replaced activation's gradient) or identity.
    """

    VERSION: ClassVar[int] = 1
    ratio: float = 0.1
    replace: tuple[str, ...] = ("ReLU",)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    backward: str = "activation"

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise UserError(f"the k-WTA ratio must be in (0, 1], got {self.ratio!r}")
        if self.backward not in BACKWARDS:
            raise UserError(f"backward must be one of {list(BACKWARDS)}, got {self.backward!r}")
        for name in ("replace", "include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))


def _parse_ratio(text: str) -> float:
    """``--kwta-ratio`` text: a number (0.1) or a fraction (1/10)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise UserError(f"--kwta-ratio takes a number in (0, 1], got {text!r}") from exc


# ------------------------------------------------------------------------------------------
# apply, find, remove
# ------------------------------------------------------------------------------------------
def kwta_modules(model: nn.Module) -> dict[str, KWTA]:
    """Every k-WTA module of ``model`` by site name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, KWTA)}


def _install(model: nn.Module, sites: list[Site], config: KWTAConfig) -> None:
    """Replace the activation at each of ``sites`` by k-WTA (holding the activation it replaced)."""
    for site in sites:
        set_submodule(model, site.name,
                      KWTA(config.ratio, model.get_submodule(site.name), config.backward, site.channels))


def plan_kwta(model: nn.Module, example: torch.Tensor, config: KWTAConfig) -> list[Site]:
    """The activation sites k-WTA would replace (the model is unchanged)."""
    return plan_swap(model, example, config)[1]


def apply_kwta(model: nn.Module, example: torch.Tensor, config: KWTAConfig | None = None) -> nn.Module:
    """Replace the selected activations of ``model`` by k-WTA; returns the model to use (torch.fx-rewritten
    when functional activations had to become modules), with ``config`` recorded."""
    config = config or KWTAConfig()
    if kwta_modules(model):
        raise InsertionError("the model already holds k-WTA activations")
    prepared, sites = plan_swap(model, example, config)
    _install(prepared, sites, config)
    logger.info("k-WTA (ratio %g, k = ceil(ratio * units)) replaces %d activation(s): %s", config.ratio, len(sites),
                ", ".join(s.name for s in sites))
    return record_config(prepared, config)


def remove_kwta(model: nn.Module) -> nn.Module:
    """Put the replaced activations back (the base model; a torch.fx rewrite stays)."""
    for name, module in kwta_modules(model).items():
        set_submodule(model, name, module.replaced)
    return model


# ------------------------------------------------------------------------------------------
# the hooks: modes toggled by context managers (restored on exit, even on error)
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _toggled(model: nn.Module, attribute: str, value: Any) -> Iterator[nn.Module]:
    with toggled(kwta_modules(model).values(), attribute, value):
        yield model


def straight_through(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """BPDA: inside the block every k-WTA module back-propagates through its surrogate (the replaced
    activation, or the identity: the config's ``backward``); the forward is unchanged."""
    return _toggled(model, "straight_through", True)


def kwta_disabled(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Inside the block every k-WTA module is the activation it replaced: the base model."""
    return _toggled(model, "enabled", False)


def capture_site_inputs(model: nn.Module) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
    """``{site: input}`` of every k-WTA module, recorded by the forwards in the block."""
    return captured_inputs(kwta_modules(model))


def losers(model: nn.Module, site: str, z: torch.Tensor) -> torch.Tensor:
    """The units of ``z`` (the input of k-WTA ``site``) outside its top k: zeroed, their gradient is zero."""
    return ~kwta_mask(z, kwta_modules(model)[site].ratio)


# ------------------------------------------------------------------------------------------
# save and load: the one defense file (no tensors; the config and the sites)
# ------------------------------------------------------------------------------------------
def save_kwta(model: nn.Module, path: str | Path, config: KWTAConfig, *, model_info: dict[str, Any] | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    """Write the k-WTA defense of ``model``: no tensors, a sidecar with ``config`` and the sites."""
    modules = kwta_modules(model)
    if not modules:
        raise UserError("the model holds no k-WTA activations to save (apply the kwta defense first)")
    sites = [{"name": name, "channels": m.channels, "replaced": type(m.replaced).__name__}
             for name, m in modules.items()]
    write_defense_file(path, {}, defense=NAME, config=config, sites=sites, model_info=model_info, extra=extra)
    logger.info("saved k-WTA (ratio %g, %d site(s)) to %s", config.ratio, len(sites), path)
    return Path(path)


def load_kwta(model: nn.Module, path: str | Path, example: torch.Tensor, config: KWTAConfig | None = None) -> nn.Module:
    """Re-apply the k-WTA saved in ``path`` to ``model`` at the saved sites (checked against the model).

    ``config`` (a job's settings) may change the ratio or the backward, not where k-WTA goes."""
    _, meta = read_defense_file(path, NAME)
    saved = KWTAConfig.from_dict(meta["config"])
    if config is not None and (config.replace, config.include, config.exclude) != \
            (saved.replace, saved.include, saved.exclude):
        raise StateMismatchError(f"{str(path)!r} places k-WTA with replace/include/exclude "
                                 f"{saved.replace}/{saved.include}/{saved.exclude}, the job asks for "
                                 f"{config.replace}/{config.include}/{config.exclude}")
    config = config or saved
    prepared = modularize(model)
    by_name = {s.name: s for s in plan_sites(prepared, example)}
    for entry in meta["sites"]:
        site = by_name.get(entry["name"])
        if site is None or site.activation != entry.get("replaced", site.activation):
            raise StateMismatchError(f"{str(path)!r} does not fit this model: it has no "
                                     f"{entry.get('replaced', 'activation')} site {entry['name']!r}")
        if site.channels != entry["channels"]:
            raise StateMismatchError(f"{str(path)!r} does not fit this model: site {entry['name']!r} has "
                                     f"{site.channels} channels, the file was saved for {entry['channels']}")
    _install(prepared, [by_name[e["name"]] for e in meta["sites"]], config)
    logger.info("loaded k-WTA (ratio %g) from %s (%d site(s))", config.ratio, path, len(meta["sites"]))
    return record_config(prepared, config)


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------
KWTA_DEFENSE = register_defense(Defense(
    names=(NAME,),
    config_type=KWTAConfig,
    title="k-WTA",
    plan=plan_kwta,
    apply=apply_kwta,
    remove=remove_kwta,
    save=save_kwta,
    load=load_kwta,
    modules=kwta_modules,
    straight_through=straight_through,
    disabled=kwta_disabled,
    site_inputs=capture_site_inputs,
    blocked=losers,
    options=DefenseOptions(fields=("ratio", "replace", "include", "exclude", "backward"), prefix="kwta-",
                           parse={"ratio": _parse_ratio}, choices={"backward": BACKWARDS}, group="k-WTA"),
))
