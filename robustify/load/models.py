"""Load pretrained models from one spec string: the "load" step.

Specs:

* ``robustbench:NAME`` — RobustBench model zoo (``dataset``/``threat_model`` select the
  leaderboard; weights cached under ``cache_dir``). ``pretrained=False`` builds the
  architecture without downloading weights.
* ``timm:NAME`` — a timm model (pretrained or not), wrapped with its input normalisation;
  ``timm:hf-hub:ORG/NAME`` reads the model's ``config.json`` from the Hugging Face hub. Weights
  come from the Hugging Face cache (``HF_HUB_CACHE``; with ``HF_HUB_OFFLINE=1``, only from it).
* ``small-resnet-at`` — robustify's own small adversarially trained CIFAR-10 ResNet-8 (78k parameters), whose
  weights ship inside this package (:mod:`robustify.load.small_resnet`): the default model of ``robustify run``.
* ``aa-resnet18`` — AutoAttack's example CIFAR-10 ResNet-18 (standard-trained), whose weights ship inside the
  ``pyautoattack`` wheel.
* ``package.module:function`` — any factory returning an ``nn.Module``.

Any of these can take a local checkpoint (``weights=FILE``: safetensors, or a PyTorch file
read with ``torch.load(weights_only=True)``; pickled code is never executed). Inputs are
always images in [0, 1]: normalisation lives inside the returned model.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustify.load import small_resnet
from robustify.load._loading import first_line, html_page_error
from robustify.load.datasets import FieldTable, find_dataset
from robustify.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

__all__ = ["ModelInfo", "ModelLoadError", "Normalize", "load_model", "load_state_dict_file"]

#: ``{dataset: (C, H, W)}``, a live view of the dataset registry (:mod:`robustify.load.datasets`)
DATASET_INPUT = FieldTable("input_size")
THREAT_MODELS = ("Linf", "L2", "corruptions")


@dataclass
class ModelInfo:
    """What was loaded, enough to load it again.

    Attributes:
        spec: the spec it was loaded from (``aa-resnet18``, ``robustbench:NAME``, ...).
        source: the kind of spec (``robustbench``, ``timm``, ``aa``, ``factory``).
        name: the model's name within its source.
        dataset: its dataset.
        threat_model: its threat model.
        input_size: the input ``(C, H, W)`` it expects.
        num_classes: its number of outputs.
        weights: the local checkpoint loaded, if any.
        pretrained: whether pretrained weights were loaded.
        extra: whatever else the loader records.
        preprocessing: the preprocessing of image files for this model (see :mod:`robustify.load.preprocessing`).

    Examples:
        >>> model, info = rb.load_model("aa-resnet18")
        >>> info.spec, info.num_classes
        ('aa-resnet18', 10)
        >>> info.example_input().shape
        torch.Size([2, 3, 32, 32])
    """

    spec: str
    source: str
    name: str
    dataset: str
    threat_model: str
    input_size: tuple[int, int, int]
    num_classes: int
    weights: str | None = None
    pretrained: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None  # for image files: see robustify.load.preprocessing

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    def transform(self) -> Any:
        """The PIL-image -> [0, 1] tensor transform for this model (see :mod:`robustify.load.preprocessing`)."""
        from robustify.load.preprocessing import build_transform

        return build_transform(self.preprocessing, model=self.name, dataset=self.dataset,
                               threat_model=self.threat_model)

    def example_input(self, batch: int = 2, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(batch, *self.input_size, device=device)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so that the model takes inputs in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """A model behind its input normalisation (``normalize`` then ``model``)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def default_cache_dir() -> Path:
    return Path(os.environ.get("ROBUSTIFY_CACHE", Path.home() / ".cache" / "robustify"))


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``, DataParallel's
    ``module.`` prefix) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist")
    html = html_page_error(path)
    if html:
        raise ModelLoadError(html)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is an unreadable checkpoint
        raise ModelLoadError(
            f"cannot read checkpoint {str(path)!r}: {first_line(exc)} (truncated or corrupted file, or a pickle "
            "with code, which is never executed: only plain tensors are accepted)"
        ) from exc
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {str(path)!r} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_weights(model: nn.Module, path: str | Path) -> None:
    state = load_state_dict_file(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches are raised, one per line after a header
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise ModelLoadError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {details[0]}{more}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
            f"{len(result.missing_keys)} missing key(s) (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected key(s) (e.g. {result.unexpected_keys[:3]})"
        )


# ------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------
def _aa_resnet18(pretrained: bool) -> nn.Module:
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("aa-resnet18 needs the pyautoattack package (pip install pyautoattack)")
    examples = Path(list(spec.submodule_search_locations)[0]) / "examples"
    module_spec = importlib.util.spec_from_file_location("_robustify_aa_resnet", examples / "resnet.py")
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model = module.ResNet18()
    if pretrained:
        _load_weights(model, examples / "model_test.pt")
    return model


def _robustbench(name: str, dataset: str, threat_model: str, pretrained: bool, cache_dir: Path) -> nn.Module:
    from robustify.core.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    except (ValueError, KeyError):
        raise ModelLoadError(f"RobustBench has no leaderboard {dataset}/{threat_model}") from None
    if name not in zoo:
        close = [k for k in zoo if name.lower()[:6] in k.lower()][:5]
        raise ModelLoadError(
            f"unknown RobustBench model {name!r} for {dataset}/{threat_model}"
            + (f"; similar names: {close}" if close else f" ({len(zoo)} models available)")
        )
    from robustify.load import zoo as rb_zoo

    if not pretrained:
        return rb_zoo.build_architecture(name, dataset, threat_model, zoo[name])
    from robustbench.utils import load_model as rb_load_model

    model_dir = cache_dir / "robustbench"
    paths = rb_zoo.checkpoint_paths(model_dir, name, dataset, threat_model, zoo[name])
    rb_zoo.check_checkpoint_files(paths)
    try:
        with rb_zoo.cuda_calls_stay_on_cpu():
            return rb_load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except Exception as exc:  # noqa: BLE001 - network/gdown errors are many and varied
        rb_zoo.check_checkpoint_files(paths)  # the download may have saved an HTML page
        where = f"place the checkpoint at {str(paths[0])!r}, or " if paths else ""
        raise ModelLoadError(
            f"could not download RobustBench weights for {name!r} ({type(exc).__name__}: {first_line(exc)}); offline, "
            f"{where}build the architecture with pretrained=False (--no-pretrained) and pass --weights FILE"
        ) from exc


def _timm_pretrained_classes(name: str) -> int | None:
    """The number of classes of timm model ``name``'s pretrained weights (None: unknown), without the weights."""
    from timm.models import get_pretrained_cfg

    if name.startswith("hf-hub:"):
        from timm.models._hub import load_model_config_from_hf

        try:
            return load_model_config_from_hf(name[len("hf-hub:"):])[0].get("num_classes")
        except Exception:  # noqa: BLE001 - create_model reports the hub's errors
            return None
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag: create_model reports it
        return None
    return cfg.num_classes if cfg is not None else None


def _timm(name: str, pretrained: bool, num_classes: int | None, *, dataset: str, image_size: int | None = None,
          new_head: bool = False) -> tuple[nn.Module, tuple[int, int, int], bool]:
    """timm model ``name`` behind its normalisation, its pretrained input size and whether its head was
    re-initialised.

    ``image_size``: build it for square images of that side (timm's ``img_size`` for the models taking one, such
    as ViTs; a convolutional model takes any size as it is). Pretrained weights for another number of classes
    than ``num_classes`` get a random new head (timm's doing) only with ``new_head``; otherwise that is an error.
    """
    import timm

    if not name.startswith("hf-hub:") and not timm.is_model(name):  # hf-hub:ORG/NAME: config.json from the hub
        raise ModelLoadError(f"unknown timm model {name!r}")
    kwargs: dict[str, Any] = {"num_classes": num_classes} if num_classes is not None else {}
    reinit = False
    if pretrained and num_classes is not None:
        weights_classes = _timm_pretrained_classes(name)
        reinit = weights_classes is not None and weights_classes != num_classes
        if reinit and not new_head:
            raise ModelLoadError(
                f"timm:{name}'s pretrained weights are for {weights_classes} classes, dataset {dataset} has "
                f"{num_classes}: timm would replace their classifier with a random one; ask for that with "
                f"new_head=True (--new-head), or give weights for {num_classes} classes (--weights FILE)")
    try:
        net = _create_timm(name, pretrained, kwargs, image_size)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(_timm_error(name, exc)) from exc
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    if reinit:
        logger.warning("timm:%s: pretrained weights with a new, randomly initialised %d-class head (new_head)", name,
                       num_classes)
    return NormalizedModel(net, mean, std), input_size, reinit  # type: ignore[return-value]


def _create_timm(name: str, pretrained: bool, kwargs: dict[str, Any], image_size: int | None) -> nn.Module:
    """``timm.create_model``, for ``image_size`` images where the model's constructor takes ``img_size``."""
    import timm

    if image_size is None:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, img_size=image_size, **kwargs)
    except TypeError as exc:  # a model of any input size (a CNN): its constructor has no img_size
        if "img_size" not in str(exc):
            raise
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _timm_error(name: str, exc: Exception) -> str:
    """One line on why timm could not create ``name``, and what to do offline."""
    import timm
    from timm.models._hub import has_hf_hub

    if not has_hf_hub(necessary=False):
        version = importlib.metadata.version("huggingface_hub") if importlib.util.find_spec("huggingface_hub") else None
        return (
            f"timm {timm.__version__} cannot use huggingface_hub {version} to fetch the weights of {name!r}: "
            "pip install 'huggingface_hub<2'"
        )
    from huggingface_hub import constants

    return (
        f"could not create timm model {name!r} ({type(exc).__name__}: {first_line(exc)}); offline, put its weights in "
        f"the Hugging Face cache ({constants.HF_HUB_CACHE}, with HF_HUB_OFFLINE=1), or use pretrained=False "
        "(--no-pretrained) with --weights FILE"
    )


def _factory(path: str) -> nn.Module:
    module_name, _, function = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import model factory {path!r}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {path!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _adopt_defenses(model: nn.Module, input_size: tuple[int, ...]) -> nn.Module:
    """Let every registered defense turn its modules that came with the model into its own (its ``adopt`` hook:
    RobustBench's published MeanSparse models, for one)."""
    from robustify.defenses.registry import handlers

    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    for defense in handlers():
        if defense.adopt is not None:
            adopted = defense.adopt(model, torch.zeros(1, *input_size, device=device))
            model = adopted if adopted is not None else model
    return model


def load_model(
    spec: str,
    *,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    weights: str | Path | None = None,
    pretrained: bool = True,
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    image_size: int | None = None,
    new_head: bool = False,
) -> tuple[nn.Module, ModelInfo]:
    """Load a model from a spec (see the module doc). Returns ``(model.eval(), info)``.

    A defense's modules that came with the model become robustify's (each registered defense's
    ``adopt`` hook): RobustBench's published MeanSparse models, for one, keep their outputs.
    The model's logits must have the dataset's number of classes (one forward of one example).
    Raises :class:`ModelLoadError` with a one-line reason for unknown specs, unusable
    checkpoints and a model that does not fit the dataset.

    Args:
        spec: ``robustbench:NAME``, ``timm:NAME``, ``small-resnet-at``, ``aa-resnet18`` or
            ``package.module:function``.
        dataset: the model's dataset (RobustBench's leaderboard; a registered dataset).
        threat_model: the model's threat model (RobustBench's leaderboard): ``Linf``, ``L2`` or ``corruptions``.
        weights: a local checkpoint (safetensors, or a weights-only PyTorch file) loaded instead of the
            pretrained weights.
        pretrained: download the pretrained weights (unless ``weights`` is given); False builds the
            architecture only.
        cache_dir: where downloads are cached (None: ``$ROBUSTIFY_CACHE`` or ``~/.cache/robustify``).
        device: the torch device to put the model on.
        image_size: the side of the square images the model takes (None: the dataset's; a timm model's own
            pretrained size), a timm model being built for it (its ``img_size``, where its constructor takes
            one). Nothing is resized.
        new_head: pretrained timm weights for another number of classes than the dataset's get a new, random
            classifier (else that is an error).

    Returns:
        ``(model, info)``: the model in eval mode, taking inputs in [0, 1], and its :class:`ModelInfo`.

    Examples:
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> info.num_classes, info.input_size
        (10, (3, 32, 32))
    """
    facts = find_dataset(dataset)
    if facts is None:
        raise ModelLoadError(f"unknown dataset {dataset!r}; choose from {sorted(DATASET_INPUT)}")
    if threat_model not in THREAT_MODELS:
        raise ModelLoadError(f"unknown threat model {threat_model!r}; choose from {list(THREAT_MODELS)}")
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise ModelLoadError(f"image_size must be a positive number of pixels, got {image_size!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    input_size = facts.input_size
    num_classes = facts.classes
    download = pretrained and weights is None
    reinit = False
    target: nn.Module
    if spec == small_resnet.NAME:
        source, name = "robustify", spec
        model = target = small_resnet.load_small_resnet_at(download)
    elif spec == "aa-resnet18":
        source, name = "aa", spec
        model = target = _aa_resnet18(download)
    elif spec.startswith("robustbench:"):
        source, name = "robustbench", spec.split(":", 1)[1]
        model = target = _robustbench(name, dataset, threat_model, download, cache)
    elif spec.startswith("timm:"):
        source, name = "timm", spec.split(":", 1)[1]
        model, input_size, reinit = _timm(name, download, None if facts.timm_pretrained else num_classes,
                                          dataset=dataset, image_size=image_size, new_head=new_head)
        target = model.model  # type: ignore[assignment]
    elif ":" in spec and not spec.startswith(("/", ".")):
        source, name = "factory", spec
        model = target = _factory(spec)
    else:
        raise ModelLoadError(
            f"unknown model spec {spec!r}: use robustbench:NAME, timm:NAME, "
            f"{small_resnet.NAME}, aa-resnet18 or package.module:function"
        )
    if image_size is not None:
        input_size = (input_size[0], image_size, image_size)
    if weights is not None:
        _load_weights(target, weights)
        logger.info("loaded weights from %s", weights)
    if source == "robustbench":
        model = _adopt_defenses(model, input_size)
    from robustify.load.preprocessing import model_preprocessing

    info = ModelInfo(
        spec=spec,
        source=source,
        name=name,
        dataset=dataset,
        threat_model=threat_model,
        input_size=tuple(input_size),  # type: ignore[arg-type]
        num_classes=num_classes,
        weights=str(weights) if weights is not None else None,
        pretrained=pretrained,
        preprocessing=model_preprocessing(source, name, dataset, threat_model, target,
                                          input_size=input_size if image_size is not None else None),
        extra={"new_head": True} if source == "timm" and reinit else {},
    )
    model = model.to(device).eval()
    _check_classes(model, info, device)
    return model, info


def _check_classes(model: nn.Module, info: ModelInfo, device: torch.device | str) -> None:
    """Refuse a model whose logits do not have the dataset's number of classes (one forward of one example)."""
    with torch.no_grad():
        logits = model(info.example_input(batch=1, device=device))
    width = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
    if width != info.num_classes:
        has = f"has {width} logits" if width is not None else (
            f"returns {tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}, not logits")
        raise ModelLoadError(
            f"{info.spec} {has} but dataset {info.dataset!r} has {info.num_classes} classes: give the model's dataset "
            f"(--dataset), or register one with its classes (robustify.load.datasets.register_dataset)")
