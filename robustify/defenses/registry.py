"""The defense registry: one :class:`~robustify.defenses.base.Defense` per defense, and the generic API that reads it.

Each defense registers itself (in the spirit of torchao's ``register_quantize_module_handler``
and PEFT's ``register_peft_method``)::

    register_defense(Defense(names=("smoothrelu",), config_type=SmoothReLUConfig, ...))

and from then on :func:`apply_defense`, :func:`remove_defense`, :func:`save_defense`,
:func:`load_defense`, :func:`calibrate`, the CLI choices and flags, the attacks that need a
hook, the audit, training and the evaluation jobs know it; none of them lists defenses or
switches on their type. This module imports no defense: the built-in ones register when
``robustify`` is imported, third-party ones through the ``robustify.defenses`` entry-point
group (:func:`load_plugins`, as pytest loads its plugins).

:func:`apply_defense` records the config on the returned model as ``robustify_defense``
(as PEFT keeps ``peft_config``); :func:`save_defense` uses it when no config is given.
"""

from __future__ import annotations

import contextlib
import logging
from collections import ChainMap
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustify.core.errors import StateMismatchError, UserError
from robustify.core.io import atomic_path
from robustify.core.plugins import load_entry_points
from robustify.defenses.base import HOOKS, Defense, each
from robustify.defenses.file import read_sidecar

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_ATTR",
    "Defense",
    "ENTRY_POINT_GROUP",
    "applied_config",
    "applied_sites",
    "apply_defense",
    "backbone_path",
    "blocked",
    "calibrate",
    "defense_config",
    "defense_kind",
    "defense_names",
    "defense_parameters",
    "defenses_in",
    "disabled",
    "missing_hook",
    "file_defense",
    "get_defense",
    "handler_for_config",
    "handlers",
    "load_defense",
    "load_plugins",
    "plan_defense",
    "record_config",
    "register_defense",
    "remove_defense",
    "save_defense",
    "site_inputs",
    "soft_backward",
    "straight_through",
    "with_hook",
]

CONFIG_ATTR = "robustify_defense"
#: the sites a defense changed, for the defenses whose modules do not name them (activation swaps)
SITES_ATTR = "robustify_defense_sites"
#: the entry-point group third-party defenses register in (``name = "package.module"``; importing it registers)
ENTRY_POINT_GROUP = "robustify.defenses"

_HANDLERS: dict[str, Defense] = {}


def register_defense(defense: Defense) -> Defense:
    """Register ``defense`` under each of its names (a name may be registered once); returns it.

    Args:
        defense: the defense's hooks (:class:`Defense`).

    Returns:
        ``defense``, registered: every command, job and the leaderboard know it from now on.

    Raises:
        ValueError: one of its names is registered already.

    Examples:
        A plugin registers its defense when it is imported (``plugins/`` holds an example, k-WTA);
        the built-in defenses are registered by ``import robustify``:

        >>> from robustify.defenses import defense_names, get_defense
        >>> get_defense("meansparse").names, "sparta" in defense_names()
        (('meansparse',), True)
    """
    if not isinstance(defense, Defense):
        raise TypeError(f"register_defense takes a robustify.defenses.Defense, got {type(defense).__name__}")
    taken = [n for n in defense.names if n in _HANDLERS and _HANDLERS[n] is not defense]
    if taken or "none" in defense.names:
        raise UserError(f"defense name(s) {taken or ['none']} already registered")
    for name in defense.names:
        _HANDLERS[name] = defense
    return defense


def load_plugins() -> list[str]:
    """Import the modules of the ``robustify.defenses`` entry points (they register themselves); the names loaded."""
    return load_entry_points(ENTRY_POINT_GROUP)


def defense_names(*, trainable: bool | None = None, hook: str | None = None) -> tuple[str, ...]:
    """The registered names in registration order (only the (non-)trainable ones, or those offering ``hook``,
    if given)."""
    return tuple(n for n, h in _HANDLERS.items()
                 if (trainable is None or h.trainable == trainable) and (hook is None or h.has(hook)))


def handlers(*, trainable: bool | None = None) -> tuple[Defense, ...]:
    """The registered defenses, each once, in registration order (only the (non-)trainable ones if given)."""
    return tuple(dict.fromkeys(h for h in _HANDLERS.values() if trainable is None or h.trainable == trainable))


def get_defense(name: str) -> Defense:
    """The defense registered as ``name``; a one-line error for an unknown name."""
    if name not in _HANDLERS:
        raise UserError(f"unknown defense {name!r}; choose from {list(_HANDLERS)}")
    return _HANDLERS[name]


def handler_for_config(config: Any) -> Defense:
    """The defense whose config type ``config`` is."""
    for handler in _HANDLERS.values():
        if isinstance(config, handler.config_type):
            return handler
    raise TypeError(f"no defense is registered for a {type(config).__name__}")


def defense_config(name: str, **options: Any) -> Any:
    """The config of defense ``name`` with config-field ``options``."""
    return get_defense(name).config(name, **options)


# ------------------------------------------------------------------------------------------
# what a model holds, and the hooks combined over it
# ------------------------------------------------------------------------------------------
def defenses_in(model: nn.Module) -> list[Defense]:
    """The registered defenses with modules in ``model`` (applied, loaded or adopted), in registration order."""
    return [h for h in handlers() if h.modules(model)]


def with_hook(model: nn.Module, hook: str) -> list[Defense]:
    """The defenses in ``model`` that offer ``hook``."""
    return [h for h in defenses_in(model) if h.has(hook)]


def missing_hook(model: nn.Module, hook: str) -> str | None:
    """Why an attack needing ``hook`` does not apply to ``model`` (None: it applies)."""
    present = defenses_in(model)
    if not present:
        return f"no defense in the model offers {HOOKS.get(hook, hook)}"
    if not any(h.has(hook) for h in present):
        names = ", ".join(h.name for h in present)
        return f"{names} offers no {HOOKS.get(hook, hook).removeprefix('a ')}"
    return None


@contextlib.contextmanager
def _combined(model: nn.Module, hook: str, *args: Any) -> Iterator[nn.Module]:
    with contextlib.ExitStack() as stack:
        for h in with_hook(model, hook):
            stack.enter_context(getattr(h, hook)(model, *args))
        yield model


def straight_through(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """BPDA: every defense in ``model`` with a straight-through backward uses it inside the block.

    Args:
        model: a defended model; defenses without the hook are left as they are.

    Returns:
        A context manager; inside it every forward is unchanged and the backward goes straight through.

    Examples:
        >>> import torch
        >>> from robustify.defenses import defense_config, get_defense
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("meansparse", alpha=0.2))
        >>> counts = rb.calibrate(model, rb.loader(rb.load_data("../shared/data/cifar10_subset.npz", "train", n=64)), progress=False)
        >>> x = info.example_input().requires_grad_(True)
        >>> with rb.bpda(model):
        ...     model(x).sum().backward()
        >>> x.grad.shape
        torch.Size([2, 3, 32, 32])
    """
    return _combined(model, "straight_through")


def soft_backward(model: nn.Module, temperature: float) -> contextlib.AbstractContextManager[nn.Module]:
    """Soft BPDA: every defense in ``model`` with a smooth-surrogate backward uses it at ``temperature``.

    Args:
        model: a defended model; defenses without the hook are left as they are.
        temperature: the surrogate's temperature, > 0, relative to each band's half-width (small: close to
            the hard threshold).

    Returns:
        A context manager; inside it every forward is unchanged and the backward is the surrogate's.

    Examples:
        >>> from robustify.defenses import defense_config, get_defense
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("meansparse", alpha=0.2))
        >>> counts = rb.calibrate(model, rb.loader(rb.load_data("../shared/data/cifar10_subset.npz", "train", n=64)), progress=False)
        >>> x = info.example_input().requires_grad_(True)
        >>> with rb.soft_bpda(model, 0.3):
        ...     model(x).sum().backward()
        >>> bool(x.grad.abs().sum() > 0)
        True
    """
    return _combined(model, "soft_backward", temperature)


def disabled(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Every defense in ``model`` that can be switched off is, inside the block (the base model's view).

    Args:
        model: a defended model.

    Returns:
        A context manager; inside it the model computes what its base model computes (no copy is made).

    Examples:
        >>> from robustify.defenses import defense_config, get_defense
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> x = info.example_input()
        >>> before = model(x)
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("meansparse", alpha=0.2))
        >>> counts = rb.calibrate(model, rb.loader(rb.load_data("../shared/data/cifar10_subset.npz", "train", n=64)), progress=False)
        >>> with rb.defenses_disabled(model):
        ...     bool((model(x) == before).all())
        True
    """
    return _combined(model, "disabled")


@contextlib.contextmanager
def site_inputs(model: nn.Module) -> Iterator[Mapping[str, torch.Tensor]]:
    """``{site: input}`` of every defense in ``model`` with site inputs, filled by the forwards in the block."""
    with contextlib.ExitStack() as stack:
        yield ChainMap(*[stack.enter_context(h.site_inputs(model)) for h in with_hook(model, "site_inputs")])


def blocked(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{site: units of its input whose gradient the defense at that site blocks}`` for the ``inputs`` captured
    by :func:`site_inputs` (each site's owner found once)."""
    owners = {site: h for h in with_hook(model, "site_inputs") for site in h.modules(model)}
    missing = sorted(set(inputs) - set(owners))
    if missing:
        raise KeyError(f"no defense with site inputs has site(s) {missing}")
    return {site: owners[site].blocked(model, site, z) for site, z in inputs.items()}  # type: ignore[misc]


# ------------------------------------------------------------------------------------------
# apply, remove, record
# ------------------------------------------------------------------------------------------
def record_config(model: nn.Module, config: Any, sites: list[Any] | None = None) -> nn.Module:
    """Record ``config`` on ``model`` as the defense applied to it (and the ``sites`` it changed,
    for a defense whose modules do not name them); returns ``model``."""
    setattr(model, CONFIG_ATTR, config)
    if sites is not None:
        setattr(model, SITES_ATTR, list(sites))
    return model


def applied_sites(model: nn.Module) -> list[Any]:
    """The sites recorded by :func:`record_config` (empty if none were)."""
    return list(getattr(model, SITES_ATTR, None) or ())


def plan_defense(model: nn.Module, example: torch.Tensor, config: Any) -> list[Any]:
    """The sites the defense ``config`` describes would change (the model is unchanged)."""
    return handler_for_config(config).plan(model, example, config)


def apply_defense(model: nn.Module, example: torch.Tensor, config: Any) -> nn.Module:
    """Apply the defense ``config`` describes; returns the model to use (in ``model``'s
    train/eval mode) with the config recorded as ``robustify_defense``.

    Args:
        model: the model to defend (inputs in [0, 1]).
        example: an input batch; the defense traces the model on it to find its sites.
        config: a registered defense's config (``MeanSparseConfig``, ``SpartaConfig``, ``ActivationConfig``,
            a plugin's); it selects the defense.

    Returns:
        The model to use: ``model`` changed in place where the defense can, else a rewritten copy.

    Raises:
        InsertionError: the model has no site the config selects.

    Examples:
        >>> from robustify.defenses import defense_config, get_defense
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("meansparse", alpha=0.2))
        >>> len(get_defense("meansparse").modules(model)), model.robustify_defense.alpha
        (17, 0.2)
    """
    out = handler_for_config(config).apply(model, example, config)
    return record_config(out, config).train(model.training)


def applied_config(model: nn.Module) -> Any:
    """The config recorded on ``model`` by :func:`apply_defense` (a one-line error if none)."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise UserError("the model carries no defense config: apply it with robustify.apply_defense "
                        "(or pass the config explicitly)")
    return config


def remove_defense(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_defense` (for the defenses that can be removed).

    Args:
        model: a model returned by :func:`apply_defense`.

    Returns:
        The model without the defense (the same object where the defense was applied in place).

    Examples:
        >>> from robustify.defenses import defense_config, get_defense
        >>> model, info = rb.load_model("aa-resnet18")
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("meansparse", alpha=0.2))
        >>> model = rb.remove_defense(model)
        >>> len(get_defense("meansparse").modules(model))
        0
    """
    handler = handler_for_config(applied_config(model))
    if handler.remove is None:
        raise UserError(f"defense {handler.name!r} cannot be removed; reload the model instead")
    out = handler.remove(model)
    for m in {id(model): model, id(out): out}.values():
        for attr in (CONFIG_ATTR, SITES_ATTR):
            if hasattr(m, attr):
                delattr(m, attr)
    return out


# ------------------------------------------------------------------------------------------
# calibrate
# ------------------------------------------------------------------------------------------
def calibrate(model: nn.Module, batches: Iterable[Any], *, device: torch.device | str | None = None,
              progress: bool = True, **options: Any) -> dict[str, int]:
    """The statistics pass: one no-grad pass over ``batches`` for the calibrated defense in ``model``.

    Returns the number of values each site's statistics came from. ``options`` go to the
    defense's ``calibrate`` hook (e.g. ``total``, ``sync``).

    Args:
        model: a model holding a calibrated defense (:func:`apply_defense` with MeanSparse, say).
        batches: ``(x, y)`` batches (a :func:`loader`, or a list of tensors); labels are ignored.
        device: where to run the pass (None: the model's device).
        progress: show a progress bar.
        **options: passed to the defense's ``calibrate`` hook (e.g. ``total``, ``sync``).

    Returns:
        Site name -> the number of values its statistics came from.

    Examples:
        >>> from robustify.defenses import defense_config, get_defense
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("meansparse", alpha=0.2))
        >>> counts = rb.calibrate(model, rb.loader(rb.load_data("../shared/data/cifar10_subset.npz", "train", n=64)), progress=False)
        >>> counts["relu_0"]  # 64 images of 32x32 pixels per channel
        65536
    """
    found = with_hook(model, "calibrate")
    if not found:
        raise UserError("the model holds no defense to calibrate: apply one first (e.g. robustify.apply_defense)")
    if len(found) > 1:
        raise UserError(f"the model holds several calibrated defenses ({[h.name for h in found]}): "
                        "calibrate them one at a time with their own calibrate functions")
    return found[0].calibrate(model, batches, device=device, progress=progress, **options)  # type: ignore[misc]


# ------------------------------------------------------------------------------------------
# save and load: the defense's state in the one file format, and the backbone after joint training
# ------------------------------------------------------------------------------------------
def backbone_path(path: str | Path) -> Path:
    """Where :func:`save_defense` puts the backbone weights of ``path`` after joint training."""
    path = Path(path)
    return path.with_name(path.name + ".backbone.safetensors")


def defense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every trainable defense in ``model``, each once (what a frozen-backbone run trains)."""
    return each(p for h in defenses_in(model) if h.trainable for p in h.parameters(model))


def _defense_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{site}." for h in defenses_in(model) for site in h.modules(model))


def _backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    prefixes = _defense_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def save_defense(
    model: nn.Module,
    path: str | Path,
    config: Any = None,
    *,
    model_info: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    backbone: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save the defense of ``model`` (only its state) and its sidecar; ``backbone=True`` also
    writes the other weights to ``<path>.backbone.safetensors`` (after joint training).

    ``config``: the defense's config, by default the one recorded on the model when it was applied.

    Args:
        model: a defended model (:func:`apply_defense`, calibrated or trained).
        path: the ``.safetensors`` file to write; the sidecar is ``<path>.json``.
        config: the defense's config (None: the one :func:`apply_defense` recorded on the model).
        model_info: what the backbone is (``ModelInfo.to_dict()``), kept in the sidecar.
        training: the training settings, kept in the sidecar (``robustify train`` records them).
        backbone: also write the other weights (after joint training).
        extra: more entries for the sidecar.

    Returns:
        The path written.

    Examples:
        >>> from robustify.defenses import defense_config, get_defense
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("meansparse", alpha=0.2))
        >>> counts = rb.calibrate(model, rb.loader(rb.load_data("../shared/data/cifar10_subset.npz", "train", n=64)), progress=False)
        >>> rb.save_defense(model, "meansparse.safetensors", model_info=info.to_dict()).name
        'meansparse.safetensors'
    """
    config = applied_config(model) if config is None else config
    handler = handler_for_config(config)
    extra = dict(extra or {})
    if training is not None or handler.trainable:
        extra["training"] = training or {}
    if backbone:
        if not handler.trainable:
            raise UserError(f"{handler.config_name(config)} trains nothing: save_defense(..., backbone=True) "
                            "does not apply to it")
        bpath = backbone_path(path)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in _backbone_state(model).items()}
        with atomic_path(bpath) as tmp:
            save_file(state, str(tmp), metadata={"format": "robustify-backbone"})
        extra["backbone"] = bpath.name
    return handler.save(model, path, config, model_info=model_info, extra=extra or None)


def save_defense_state(model: nn.Module, path: str | Path, config: Any = None, *,
                       model_info: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save the defense's state alone (config: the one recorded on the model unless given)."""
    config = applied_config(model) if config is None else config
    return handler_for_config(config).save(model, path, config, model_info=model_info, extra=extra)


def file_defense(path: str | Path) -> tuple[str, Defense]:
    """The defense saved in ``path`` (its sidecar names it) and its registration."""
    name = str(read_sidecar(path)["defense"])
    if name not in _HANDLERS:
        raise StateMismatchError(f"{str(path)!r} holds a {name!r} defense, not one registered here "
                                 f"({list(_HANDLERS)})")
    return name, _HANDLERS[name]


def defense_kind(path: str | Path) -> str:
    """The defense saved in ``path``: a registered name (``"sparta"``, ``"pssilu"``...)."""
    return file_defense(path)[0]


def load_defense_state(model: nn.Module, path: str | Path, example: torch.Tensor) -> nn.Module:
    """Re-apply the defense saved in ``path`` to ``model``; the config read back is recorded."""
    name, handler = file_defense(path)
    out = handler.load(model, path, example)
    if getattr(out, CONFIG_ATTR, None) is None:
        raise StateMismatchError(f"the {name!r} loader did not record the config of {str(path)!r}")
    return out


def load_defense(model: nn.Module, path: str | Path, example: torch.Tensor) -> nn.Module:
    """Re-apply the defense saved in ``path`` with its saved state, and the backbone weights
    if it was trained jointly. Returns the model to use (in the train/eval mode of ``model``),
    with the defense's config recorded on it.

    Args:
        model: the backbone to put the defense on (channel counts must match the saved sites).
        path: a defense file written by :func:`save_defense` (``robustify calibrate``, ``robustify train``).
        example: an input batch (the defense traces the model on it).

    Returns:
        The defended model.

    Raises:
        StateMismatchError: the file is unreadable, or it does not fit the model.

    Examples:
        >>> from robustify.defenses import defense_config, get_defense
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("meansparse", alpha=0.2))
        >>> counts = rb.calibrate(model, rb.loader(rb.load_data("../shared/data/cifar10_subset.npz", "train", n=64)), progress=False)
        >>> _ = rb.save_defense(model, "meansparse.safetensors")
        >>> fresh, _ = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> fresh = rb.load_defense(fresh, "meansparse.safetensors", info.example_input())
        >>> bool((fresh(x := info.example_input()) == model(x)).all())
        True
    """
    out = load_defense_state(model, path, example)
    meta = read_sidecar(path)
    if meta.get("backbone"):
        _load_backbone(out, Path(path).with_name(meta["backbone"]))
    return out.train(model.training)


def _load_backbone(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise StateMismatchError(f"backbone weights {str(path)!r} named in the sidecar do not exist")
    state = load_file(str(path))
    prefixes = _defense_prefixes(model)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if missing or result.unexpected_keys:
        raise StateMismatchError(
            f"backbone weights {str(path)!r} do not fit this model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
