"""Activation swaps: smooth (SAT, Xie et al. 2020) and parametric (PAF, Dai et al. 2022) activations.

Replaces activation modules (functional calls included, through
:func:`robustify.defenses.sites.modularize`) by another activation, before adversarial fine-tuning
with :func:`robustify.jobs.train.train_defense`. ``spec_modules.md`` sections 3-4:

* ``softplus`` log(1+e^x); ``silu`` x*sigmoid(x); ``gelu`` SAT's tanh approximation;
  ``elu`` (alpha 1).
* ``psilu`` x*sigmoid(|a| x), a init 1; ``psoftplus`` log(1+e^{|a| x})/|a| (computed as
  ``-logsigmoid(-|a| x)/|a|``), a init 1; ``pssilu`` x*(sigmoid(|a| x) - |b|)/(1 - |b|), a init
  1, b init 1e-8 (at exactly 0, |b| has zero gradient and b would never move), |b| clamped
  to at most 1 - 1e-4 where the function is singular.

As in the PAF code, one parameter set is shared by every swapped site (``shared=True``:
each site gets its own module object holding the *same* ``nn.Parameter`` objects, so every
site stays a separate, plannable module); ``shared=False`` gives each site its own.
By default every ReLU is swapped (SAT and PAF replace every ReLU).
"""

from __future__ import annotations

import contextlib

import logging
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
from robustify.defenses.base import Defense, DefenseOptions
from robustify.defenses.registry import CONFIG_ATTR, applied_config, applied_sites, record_config, register_defense
from robustify.core.errors import InsertionError, StateMismatchError
from robustify.defenses.sites import Site, modularize, plan_sites, register_activation, select_sites, set_submodule

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIVATIONS",
    "ActivationConfig",
    "PSSiLU",
    "PSiLU",
    "PSoftplus",
    "ParametricActivation",
    "load_activations",
    "make_activation",
    "parametric_modules",
    "plan_swap",
    "save_activations",
    "swap_activations",
]

BETA_MAX = 1.0 - 1e-4


class ParametricActivation(nn.Module):
    """Base of the learnable activations: scalar parameters ``alpha`` (and ``beta``)."""

    PARAMS: ClassVar[tuple[str, ...]] = ("alpha",)

    def __init__(self, alpha: float | nn.Parameter = 1.0) -> None:
        super().__init__()
        self.alpha = alpha if isinstance(alpha, nn.Parameter) else nn.Parameter(torch.tensor([float(alpha)]))

    def shared_copy(self) -> "ParametricActivation":
        """A new module holding the same parameter objects (parameter sharing)."""
        return type(self)(**{name: getattr(self, name) for name in self.PARAMS})

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={float(getattr(self, n).detach().abs()):.4g}" for n in self.PARAMS)


class PSiLU(ParametricActivation):
    """Parametric SiLU: ``x * sigmoid(|alpha| x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.alpha.abs() * x)


class PSoftplus(ParametricActivation):
    """Parametric softplus: ``log(1 + exp(|alpha| x)) / |alpha|`` (stable form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.abs()
        return -F.logsigmoid(-a * x) / a


class PSSiLU(ParametricActivation):
    """Parametric shifted SiLU: ``x * (sigmoid(|alpha| x) - |beta|) / (1 - |beta|)``, |beta| <= 1-1e-4."""

    PARAMS = ("alpha", "beta")

    def __init__(self, alpha: float | nn.Parameter = 1.0, beta: float | nn.Parameter = 1e-8) -> None:
        super().__init__(alpha)
        self.beta = beta if isinstance(beta, nn.Parameter) else nn.Parameter(torch.tensor([float(beta)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.beta.abs().clamp(max=BETA_MAX)
        return x * (torch.sigmoid(self.alpha.abs() * x) - b) / (1 - b)


for _cls in (PSiLU, PSoftplus, PSSiLU):
    register_activation(_cls)

PARAMETRIC: dict[str, type[ParametricActivation]] = {"psilu": PSiLU, "psoftplus": PSoftplus, "pssilu": PSSiLU}
FIXED = ("silu", "softplus", "gelu", "elu")
ACTIVATIONS: tuple[str, ...] = (*FIXED, *PARAMETRIC)


# ------------------------------------------------------------------------------------------
# configuration and construction
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationConfig(SerializableConfig):
    """Which activation replaces which.

    Attributes:
        name: one of :data:`ACTIVATIONS`.
        replace: class names of the activations to swap (default: every ReLU).
        include: glob patterns of site names to keep.
        exclude: glob patterns of site names to skip.
        shared: one parameter set for all sites (PAF), else one per site.
        alpha_init: initial alpha of the parametric activations (1.0 in PAF).
        beta_init: initial beta of PSSiLU (1e-8, see the module doc).
        gelu_approximate: ``"tanh"`` (SAT's formula) or ``"none"`` (exact erf).
    """

    VERSION: ClassVar[int] = 1
    name: str = "pssilu"
    replace: tuple[str, ...] = ("ReLU",)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    shared: bool = True
    alpha_init: float = 1.0
    beta_init: float = 1e-8
    gelu_approximate: str = "tanh"

    def __post_init__(self) -> None:
        if self.name not in ACTIVATIONS:
            raise UserError(f"unknown activation {self.name!r}; choose from {list(ACTIVATIONS)}")
        if self.gelu_approximate not in ("tanh", "none"):
            raise UserError(f"gelu_approximate must be 'tanh' or 'none', got {self.gelu_approximate!r}")
        if self.alpha_init == 0:
            raise UserError("alpha_init must be non-zero (|alpha| = 0 is degenerate)")
        if abs(self.beta_init) > BETA_MAX:
            raise UserError(f"|beta_init| must be <= {BETA_MAX}, got {self.beta_init!r}")
        for name in ("replace", "include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    @property
    def parametric(self) -> bool:
        return self.name in PARAMETRIC

    def make(self) -> nn.Module:
        """A fresh activation module (the swap machinery calls this on any swap config)."""
        return make_activation(self)


def make_activation(config: ActivationConfig) -> nn.Module:
    """A fresh activation module as ``config`` describes."""
    if config.name == "silu":
        return nn.SiLU()
    if config.name == "softplus":
        return nn.Softplus()
    if config.name == "gelu":
        return nn.GELU(approximate=config.gelu_approximate)
    if config.name == "elu":
        return nn.ELU()
    cls = PARAMETRIC[config.name]
    if cls is PSSiLU:
        return PSSiLU(config.alpha_init, config.beta_init)
    return cls(config.alpha_init)


def parametric_modules(model: nn.Module) -> dict[str, ParametricActivation]:
    """Every parametric activation of ``model`` by site name (shared copies included)."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, ParametricActivation)}


# ------------------------------------------------------------------------------------------
# swapping
# ------------------------------------------------------------------------------------------
def plan_swap(
    model: nn.Module, example: torch.Tensor, config: ActivationConfig | None = None
) -> tuple[nn.Module, list[Site]]:
    """Return the (possibly FX-rewritten) model and the sites the swap would change."""
    config = config or ActivationConfig()
    prepared = modularize(model, example)
    everything = plan_sites(prepared, example)
    candidates = [s for s in everything if s.activation in config.replace]
    chosen = select_sites(prepared, candidates, include=config.include, exclude=config.exclude, skip_se=False)
    if not chosen:
        found = sorted({s.activation for s in everything})
        raise InsertionError(
            f"the activation swap changes nothing: no {list(config.replace)} site of {type(model).__name__} matches "
            f"include={list(config.include)}, exclude={list(config.exclude)} (activations found: {found})"
        )
    return prepared, chosen


#: the attribute of a swapped model holding the activations it replaced (a plain dict: neither saved nor a child)
ORIGINALS_ATTR = "_robustify_swapped_originals"


def _install(prepared: nn.Module, names: Sequence[str], config: Any, device: torch.device) -> None:
    first = config.make().to(device)
    originals = {name: prepared.get_submodule(name) for name in names}
    object.__setattr__(prepared, ORIGINALS_ATTR, originals)
    for i, name in enumerate(names):
        if i == 0 or not config.parametric:
            module = first if i == 0 else config.make()
        elif config.shared:
            module = first.shared_copy()
        else:
            module = config.make().to(device)
        set_submodule(prepared, name, module)


def swap_activations(
    model: nn.Module, example: torch.Tensor, config: ActivationConfig | None = None
) -> nn.Module:
    """Replace the selected activations by ``config.name``; returns the model to use.

    The config and the site list are recorded on the returned model
    (:func:`robustify.defenses.record_config`); :func:`save_activations` writes them to the
    sidecar. ``config`` may be any
    swap config: fields ``name``, ``replace``, ``include``, ``exclude``, ``shared``, a
    ``parametric`` property and a ``make()`` method (as :class:`ActivationConfig`).
    """
    config = config or ActivationConfig()
    if applied_sites(model):
        raise InsertionError("the model's activations were already swapped")
    prepared, sites = plan_swap(model, example, config)
    device = next((p.device for p in prepared.parameters()), example.device)
    _install(prepared, [s.name for s in sites], config, device)
    record_config(prepared, config, sites)
    logger.info("swapped %d activation(s) to %s%s", len(sites), config.name,
                " (one shared parameter set)" if config.parametric and config.shared else "")
    return prepared


def save_activations(
    model: nn.Module,
    path: str | Path,
    *,
    model_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a swap: the parametric activations' parameters (keys ``<site>.<param>``) + sidecar."""
    sites: list[Site] = applied_sites(model)
    if not sites:
        raise UserError("the model has no swapped activations to save (use swap_activations first)")
    config = applied_config(model)
    tensors: dict[str, torch.Tensor] = {}
    for site in sites:
        module = model.get_submodule(site.name)
        if isinstance(module, ParametricActivation):
            for pname in module.PARAMS:
                tensors[f"{site.name}.{pname}"] = getattr(module, pname)
    entries = [{"name": s.name, "channels": s.channels, "channel_dim": s.channel_dim, "replaced": s.activation}
               for s in sites]
    write_defense_file(path, tensors, defense=config.name, config=config, sites=entries, model_info=model_info,
                       extra=extra)
    logger.info("saved %s swap (%d site(s), %d tensors) to %s", config.name, len(sites), len(tensors), path)
    return Path(path)


def load_activations(
    model: nn.Module, path: str | Path, example: torch.Tensor, config_type: type = ActivationConfig,
    names: tuple[str, ...] | None = None,
) -> nn.Module:
    """Re-apply the swap saved in ``path`` to a fresh ``model`` with its trained parameters
    (``config_type``: the swap config class the file was saved with; ``names``: the defense
    names it serves, by default :data:`ACTIVATIONS`)."""
    tensors, meta = read_defense_file(path, names or tuple(ACTIVATIONS))
    config = config_type.from_dict(meta["config"])
    prepared = modularize(model, example)
    by_name = {s.name: s for s in plan_sites(prepared, example)}
    saved = meta["sites"]
    for entry in saved:
        site = by_name.get(entry["name"])
        if site is None:
            raise StateMismatchError(f"{str(path)!r} does not fit this model: it has no activation site {entry['name']!r}")
        if site.channels != entry["channels"]:
            raise StateMismatchError(
                f"{str(path)!r} does not fit this model: site {entry['name']!r} has {site.channels} channels, "
                f"the file was saved for {entry['channels']}"
            )
    device = next((p.device for p in prepared.parameters()), example.device)
    _install(prepared, [e["name"] for e in saved], config, device)
    if config.parametric:
        _load_parameters(prepared, saved, tensors, config, path)
    record_config(prepared, config, [by_name[e["name"]] for e in saved])
    logger.info("loaded %s swap from %s (%d site(s))", config.name, path, len(saved))
    return prepared


def _load_parameters(
    prepared: nn.Module, saved: list[dict[str, Any]], tensors: dict[str, torch.Tensor],
    config: Any, path: str | Path,
) -> None:
    with torch.no_grad():
        for entry in saved:
            module = prepared.get_submodule(entry["name"])
            assert isinstance(module, ParametricActivation)
            for pname in module.PARAMS:
                key = f"{entry['name']}.{pname}"
                if key not in tensors:
                    raise StateMismatchError(f"{str(path)!r} lacks tensor {key!r}")
                value = tensors[key]
                param = getattr(module, pname)
                if value.shape != param.shape:
                    raise StateMismatchError(f"{str(path)!r}: {key!r} has shape {list(value.shape)}, expected {list(param.shape)}")
                param.copy_(value)


# ------------------------------------------------------------------------------------------
# activation swaps in the defense registry
# ------------------------------------------------------------------------------------------
def swapped_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The swapped-in activations by site name (parametric ones, shared copies included)."""
    modules: dict[str, nn.Module] = dict(parametric_modules(model))
    for site in applied_sites(model):
        modules.setdefault(site.name, model.get_submodule(site.name))
    return modules


@contextlib.contextmanager
def swaps_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The replaced activations are back in place inside the block: the base model."""
    originals: dict[str, nn.Module] = getattr(model, ORIGINALS_ATTR, None) or {}
    if swapped_modules(model) and not originals:
        raise UserError("the swapped model does not know the activations it replaced (swapped by an older robustify?): "
                        "swap or load it again with robustify.apply_defense / load_defense")
    swapped = {name: model.get_submodule(name) for name in originals}
    for name, module in originals.items():
        set_submodule(model, name, module)
    try:
        yield model
    finally:
        for name, module in swapped.items():
            set_submodule(model, name, module)


def _save_swap(model: nn.Module, path: str | Path, config: Any, **kwargs: Any) -> Path:
    return save_activations(model, path, **kwargs)


def _swapped_by(config_type: type) -> Any:
    """``swapped_modules`` of a model whose recorded swap config is a ``config_type``: each swap registration
    claims the models it swapped (or loaded) only, not another swap's nor a network built with such activations."""
    def modules(model: nn.Module) -> dict[str, nn.Module]:
        if not isinstance(getattr(model, CONFIG_ATTR, None), config_type):
            return {}
        return swapped_modules(model)

    return modules


def _betas(model: nn.Module) -> list[nn.Parameter]:
    betas = {id(m.beta): m.beta for m in swapped_modules(model).values() if isinstance(m, PSSiLU)}
    return [b for b in betas.values() if b.requires_grad]


def beta_penalty(model: nn.Module, train_config: Any) -> torch.Tensor | float:
    """PAF's ``beta_l1 * sum |beta|`` over the PSSiLU modules (the training loop adds it to the loss)."""
    if train_config.beta_l1 == 0:
        return 0.0
    return train_config.beta_l1 * sum(b.abs().sum() for b in _betas(model))


def clip_betas(model: nn.Module, train_config: Any) -> None:
    """PAF's ``clip_grad_norm_(beta, beta_clip)`` on the PSSiLU betas (after ``backward``)."""
    betas = _betas(model)
    if train_config.beta_clip > 0 and betas:
        torch.nn.utils.clip_grad_norm_(betas, train_config.beta_clip)


def swap_handler(
    names: tuple[str, ...], config_type: type, *, learnable: frozenset[str] = frozenset(),
    make_config: Any = None, **hooks: Any,
) -> Defense:
    """The registry handler of an activation swap whose configs are ``config_type``
    (``make_config(name, **options)``; default: ``config_type(name=name, **options)``)."""
    return Defense(
        trainable=True,
        names=names,
        config_type=config_type,
        make_config=make_config or (lambda name, **options: config_type(name=name, **options)),
        name_of=lambda config: config.name,
        plan=lambda model, example, config: plan_swap(model, example, config)[1],
        apply=swap_activations,
        save=_save_swap,
        load=lambda model, path, example, config=None: load_activations(model, path, example, config_type, names),
        modules=_swapped_by(config_type),
        options=DefenseOptions(fields=("replace", "include", "exclude", "shared"), group="activation swaps"),
        learnable=learnable,
        disabled=swaps_disabled,
        **hooks,
    )


ACTIVATION_SWAPS = register_defense(swap_handler(
    ("pssilu", "psilu", "psoftplus", "silu", "softplus", "gelu", "elu"), ActivationConfig,
    learnable=frozenset(PARAMETRIC), regularizer=beta_penalty, clip=clip_betas))
