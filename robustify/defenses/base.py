"""The :class:`Defense` interface: everything the generic stages need to know about one defense.

A defense is one registration (:func:`robustify.defenses.register_defense`) of a :class:`Defense`:
the required hooks plan, apply, save, load and find its modules; the optional hooks are what
the generic stages ask for instead of importing the defense (a hook left ``None`` means the
defense does not offer it, and whatever needs it is ``n/a`` for it, with the reason):

==========================  ==========================================================================
hook                        used by
==========================  ==========================================================================
``calibrate``               :func:`robustify.calibrate` (the statistics pass of a calibrated defense)
``straight_through``        the BPDA attacks (identity backward through the defense, forward unchanged)
``soft_backward``           soft-BPDA (the backward of a smooth surrogate, temperature annealed)
``disabled``                the transfer attack's source: the base model's view, without a copy
``site_inputs``/``blocked`` the mask-penalty attack and the audit's gradient census (units it blocks)
``options``                 the CLI flags of the defense's config (made like every config flag)
``trainable_parameters``    adversarial training with a frozen backbone (default: the modules' parameters)
``regularizer``/``clip``    adversarial training's extra loss term and gradient clipping
``meta``                    what a result records about the defense (``result.json``'s ``meta``)
``setting``/``set_setting`` the numeric setting a sweep varies and a plot's x axis (MeanSparse's alpha)
``adopt``                   turns the defense's modules that came with a loaded model into its own
``fuse``                    the convert step before ``torch.compile`` (same state dict, same results)
``export``                  ``robustify export``: RobustBench's own model class and its state dict
==========================  ==========================================================================

Hooks take the model (the whole network) and act on every module of the defense in it, so a
model may hold several defenses: :mod:`robustify.defenses.registry` combines their hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Defense", "DefenseOptions", "HOOKS", "captured_inputs", "toggled"]

#: the optional hooks an attack or a stage may require, with what each one is (the ``n/a`` reasons name them)
HOOKS: dict[str, str] = {
    "calibrate": "a statistics pass",
    "straight_through": "a straight-through (BPDA) backward",
    "soft_backward": "a smooth-surrogate backward",
    "disabled": "a disabled view (the base model)",
    "site_inputs": "site inputs with the units it blocks",
}


@dataclass(frozen=True, eq=False)
class DefenseOptions:
    """Which fields of the defense's config become command-line flags, and how (see :mod:`robustify.cli.flags`).

    Attributes:
        fields: config field names, one flag each (``--field-name``); the help text is the
            field's entry in the config docstring's ``Attributes:``.
        defaults: the config instance whose values are the flags' defaults (None: the dataclass's).
        parse: field -> function turning the flag's text into the value.
        choices: field -> allowed values.
        names: field -> flag name when ``--field-name`` would clash with another flag.
        prefix: put before every flag name (e.g. ``"sparta-"``).
        group: the title of the flags' group in ``--help``.

    Examples:
        >>> from robustify.defenses import get_defense
        >>> options = get_defense("meansparse").options
        >>> options.fields[:3]
        ('alpha', 'site_alpha', 'include')
    """

    fields: tuple[str, ...]
    defaults: Any = None
    parse: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)
    prefix: str = ""
    group: str = ""


def _parameters_of(modules: Callable[[nn.Module], Mapping[str, nn.Module]]) -> Callable[[nn.Module], list[nn.Parameter]]:
    def parameters(model: nn.Module) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for m in modules(model).values():
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    return parameters


@dataclass(frozen=True, eq=False)
class Defense:
    """One defense (one or several names sharing a config type): its hooks.

    Required:
        names: the defense names (``--defense`` choices) this registration serves.
        config_type: its config dataclass (a :class:`robustify.core.config.SerializableConfig`).
        plan: ``(model, example, config) -> sites`` it would change, changing nothing.
        apply: ``(model, example, config) -> model`` to use (in place where it can).
        save: ``(model, path, config, *, model_info, extra) -> path``: its state only, in the one
            defense file format (:func:`robustify.defenses.file.write_defense_file`).
        load: ``(model, path, example, config=None) -> model`` with the saved state re-applied and the config
            recorded; ``config`` (a job's settings, for a calibrated defense) replaces the file's where the
            state allows it (MeanSparse: the thresholds) and is refused where it does not fit (another placement).
        modules: ``model -> {site: module}`` of its modules in ``model`` (empty: not in the model).

    Optional (None: not offered):
        make_config: ``(name, **options) -> config`` (default: ``config_type(**options)``).
        name_of: ``config -> name`` (default: the first name).
        remove: ``model -> model`` without the defense.
        title: its display name in tables and plots (default: the first name).
        trainable: built by adversarial training (``robustify train``): an evaluation needs its file.
        calibrate: ``(model, batches, *, device, progress) -> {site: count}``: one no-grad statistics pass.
        calibration_batch_size: ``(config, requested) -> batch size`` of its statistics pass.
        batch_dependent: ``config -> bool``: its statistics depend on the calibration batch size (a cached
            calibration from another batch size is then refused).
        straight_through: ``model -> context manager``: identity backward through every module of the
            defense, forward unchanged (BPDA).
        soft_backward: ``(model, temperature) -> context manager``: a smooth surrogate's backward.
        disabled: ``model -> context manager``: the defense switched off (the base model).
        site_inputs: ``model -> context manager`` yielding ``{site: input}``, filled by the forwards in it.
        blocked: ``(model, site, input) -> bool tensor`` of the input's units whose gradient it blocks.
        options: its command-line flags (:class:`DefenseOptions`).
        trainable_parameters: ``model -> parameters`` trained with a frozen backbone.
        regularizer: ``(model, train_config) -> loss term`` added to the adversarial loss.
        clip: ``(model, train_config) -> None``: gradient clipping after ``backward``.
        meta: ``(model, config or None) -> dict`` merged into every result's ``meta`` (``config`` None:
            not the job's defense, e.g. the base row; the dict then says the defense is absent);
            default: the applied config under ``defense_config``.
        setting: the name of its numeric setting a sweep varies (e.g. ``"alpha"``) and the leaderboard shows.
        set_setting: ``(model, value) -> None``: changes that setting in place (no recalibration).
        adopt: ``(model, example) -> model or None``: converts its modules that came with a loaded model
            (None: there were none).
        fuse: ``model -> model``: the convert step before ``torch.compile``.
        export: ``(model, example) -> (module, state_dict)``: the robustified model as RobustBench's own class
            (an instance computing the same logits) and the state dict to ship (``robustify export``).
        transfer: ``(model, path, example) -> model``: a pretrained file inserted frozen into another model
            (its sites mapped onto the model's; default: :attr:`load` with the same site names, then frozen).

    Examples:
        The registered MeanSparse handler and the hooks it offers:

        >>> from robustify.defenses import get_defense
        >>> handler = get_defense("meansparse")
        >>> handler.setting, handler.straight_through is not None, handler.calibrate is not None
        ('alpha', True, True)
    """

    names: tuple[str, ...]
    config_type: type
    plan: Callable[[nn.Module, torch.Tensor, Any], list[Any]]
    apply: Callable[[nn.Module, torch.Tensor, Any], nn.Module]
    save: Callable[..., Path]
    load: Callable[..., nn.Module]
    modules: Callable[[nn.Module], Mapping[str, nn.Module]]
    make_config: Callable[..., Any] | None = None
    name_of: Callable[[Any], str] | None = None
    remove: Callable[[nn.Module], nn.Module] | None = None
    title: str = ""
    trainable: bool = False
    learnable: frozenset[str] = frozenset()
    calibrate: Callable[..., dict[str, int]] | None = None
    calibration_batch_size: Callable[[Any, int | None], int] | None = None
    batch_dependent: Callable[[Any], bool] | None = None
    straight_through: Callable[[nn.Module], contextlib.AbstractContextManager[Any]] | None = None
    soft_backward: Callable[[nn.Module, float], contextlib.AbstractContextManager[Any]] | None = None
    disabled: Callable[[nn.Module], contextlib.AbstractContextManager[Any]] | None = None
    site_inputs: Callable[[nn.Module], contextlib.AbstractContextManager[dict[str, torch.Tensor]]] | None = None
    blocked: Callable[[nn.Module, str, torch.Tensor], torch.Tensor] | None = None
    options: DefenseOptions | None = None
    trainable_parameters: Callable[[nn.Module], list[nn.Parameter]] | None = None
    regularizer: Callable[[nn.Module, Any], torch.Tensor | float] | None = None
    clip: Callable[[nn.Module, Any], None] | None = None
    meta: Callable[[nn.Module, Any], dict[str, Any]] | None = None
    setting: str | None = None
    set_setting: Callable[[nn.Module, float], None] | None = None
    adopt: Callable[[nn.Module, torch.Tensor], nn.Module | None] | None = None
    fuse: Callable[[nn.Module], nn.Module] | None = None
    export: Callable[[nn.Module, torch.Tensor], tuple[nn.Module, dict[str, torch.Tensor]]] | None = None
    transfer: Callable[[nn.Module, str | Path, torch.Tensor], nn.Module] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.names, str) or not self.names:
            raise TypeError(f"a defense needs a tuple of names, got {self.names!r}")
        if not self.title:
            object.__setattr__(self, "title", self.names[0])
        if (self.site_inputs is None) != (self.blocked is None):
            raise TypeError(f"defense {self.names[0]!r}: site_inputs and blocked go together")
        if (self.setting is None) != (self.set_setting is None):
            raise TypeError(f"defense {self.names[0]!r}: setting and set_setting go together")

    @property
    def name(self) -> str:
        """The first (main) name."""
        return self.names[0]

    @property
    def differentiable(self) -> bool:
        """Gradients pass through it unchanged: it offers no straight-through backward (BPDA does not apply)."""
        return self.straight_through is None

    def has(self, hook: str) -> bool:
        """Whether the defense offers the optional ``hook`` (a field name, e.g. ``"straight_through"``)."""
        return getattr(self, hook, None) is not None

    def config(self, name: str | None = None, **options: Any) -> Any:
        """The config of defense ``name`` (default: the first) with config-field ``options``."""
        if self.make_config is not None:
            return self.make_config(name or self.name, **options)
        return self.config_type(**options)

    def default_options(self) -> dict[str, Any]:
        """The option fields' defaults: the values of :attr:`DefenseOptions.defaults` (empty: the config's own)."""
        o = self.options
        if o is None or o.defaults is None:
            return {}
        return {f: getattr(o.defaults, f) for f in o.fields}

    def default_config(self, name: str | None = None, **options: Any) -> Any:
        """The config of defense ``name`` with its registered option defaults, then ``options`` (the one place a
        defense's defaults come from: the jobs and every command's flags)."""
        return self.config(name, **{**self.default_options(), **options})

    def config_name(self, config: Any) -> str:
        """The name ``config`` is registered under (the inverse of :meth:`config`)."""
        return self.name_of(config) if self.name_of is not None else self.name

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What adversarial training with a frozen backbone trains (each parameter once)."""
        if self.trainable_parameters is not None:
            return list(self.trainable_parameters(model))
        return _parameters_of(self.modules)(model)

    def record(self, model: nn.Module, config: Any) -> dict[str, Any]:
        """What a result's ``meta`` records about this defense (``config`` None: not the job's defense)."""
        if self.meta is not None:
            return dict(self.meta(model, config))
        if config is None:
            return {}
        return {"defense_config": config.to_dict() if hasattr(config, "to_dict") else config}


def each(items: Iterable[Any]) -> list[Any]:
    """``items`` without repeats, in order (by identity)."""
    return list({id(i): i for i in items}.values())


# ------------------------------------------------------------------------------------------
# building blocks of hooks for defenses made of modules (modes as plain attributes, never saved)
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def toggled(modules: Iterable[nn.Module], attribute: str, value: Any) -> Iterator[None]:
    """Set ``attribute`` of every module to ``value`` inside the block; restore each one's own value on exit,
    even on error. The ``straight_through``/``disabled``/``soft_backward`` hooks of a defense whose modules
    switch modes by an attribute are this (MeanSparse's, Sparta's, the k-WTA plugin's)."""
    modules = list(modules)
    previous = [getattr(m, attribute) for m in modules]
    for m in modules:
        setattr(m, attribute, value)
    try:
        yield
    finally:
        for m, old in zip(modules, previous):
            setattr(m, attribute, old)


@contextlib.contextmanager
def captured_inputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """``{site: input}`` of each module (by site), recorded by the forwards in the block: a ``site_inputs``
    hook for a defense whose modules take the site's input."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for site, module in modules.items():
        def hook(mod: nn.Module, args: tuple[Any, ...], site: str = site) -> None:
            captured[site] = args[0]

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
