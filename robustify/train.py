"""Adversarial training of inserted defenses (Sparta, activation swaps), and the defense files.

:func:`train_defense` runs PGD adversarial training (Madry et al.): each batch is attacked
with ``attack_steps`` steps of L-inf PGD (random start, step ``step_size``, radius ``eps``),
then the model takes one SGD step on the cross-entropy of the adversarial batch. With
``freeze_backbone=True`` (post-training use, the default) only the inserted parameters
learn and the whole model stays in ``eval()`` mode (BatchNorm statistics frozen); with
``False`` every parameter that requires grad learns and BatchNorm runs in training mode
for the update (attacks always run in ``eval()`` mode).

``attack_steps=1`` with ``step_size=1.25*eps`` and a random start is FGSM-RS (Wong et al.
2020), the cheap CPU setting. Defaults follow the Sparta paper where it states them (SGD
lr 0.1, x0.1 at epochs 30 and 60, weight decay 1e-4, PGD-10 training); its attack was a
*targeted* PGD with eps 16/255 and step 1/255 (``targeted=True, eps=16/255,
step_size=1/255``); the defaults here are the untargeted eps 8/255, step 2/255 of the
CIFAR-10 L-inf leaderboard instead. The optimizer (SGD, momentum 0.9) is not stated in
the paper [inferred].

Every epoch writes a checkpoint atomically (trained parameters, optimizer, scheduler, epoch,
history, RNG state); a rerun with the same checkpoint path resumes after the last complete
epoch and reaches exactly the numbers of an uninterrupted run: each epoch's shuffling,
augmentation and attack noise come from a generator seeded by ``(seed, epoch)``.

Defense files (:func:`save_defense` / :func:`load_defense`): safetensors holding only the
inserted modules' parameters (``<site>.<param>``) plus a JSON sidecar ``<file>.json``; after
joint training the backbone weights go to ``<file>.backbone.safetensors`` (named in the
sidecar) so that the file reproduces the trained model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from . import defenses
from .activations import PSSiLU
from .attacks import evaluate_pgd, pgd  # the one PGD (training's attack), re-exported here
from .config import SerializableConfig
from .defense_file import read_sidecar
from .errors import StateMismatchError
from .io import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "DEFENSES",
    "TrainConfig",
    "TrainResult",
    "apply_defense",
    "defense_config",
    "defense_kind",
    "defense_parameters",
    "evaluate_pgd",
    "load_defense",
    "pgd",
    "save_defense",
    "train_defense",
]

DEFENSES: tuple[str, ...] = defenses.defense_names(trainable=True)  # those registered when robustify is imported
SCHEDULES = ("step", "cosine", "constant")
CHECKPOINT_FORMAT = "robustify-train-checkpoint"


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig(SerializableConfig):
    """Adversarial-training settings (see the module doc for where the defaults come from).

    Attributes:
        epochs: passes over the training data.
        batch_size: examples per step.
        lr: SGD's learning rate.
        momentum: SGD's momentum.
        nesterov: Nesterov momentum.
        weight_decay: SGD's weight decay.
        schedule: ``"step"`` (x ``gamma`` at each of ``milestones``), ``"cosine"`` (to 0
            over ``epochs``) or ``"constant"``.
        milestones: epochs where the step schedule multiplies lr by ``gamma``.
        gamma: the step schedule's factor.
        eps: L-inf radius of the PGD training attack (a float or a fraction like 8/255).
        attack_steps: PGD steps (0: clean training; 1 with step size 1.25*eps: FGSM-RS).
        step_size: PGD step (a float or a fraction like 2/255).
        random_start: start PGD at a random point of the eps ball.
        targeted: attack towards a random wrong class per example (the Sparta paper).
        freeze_backbone: train only the inserted parameters (model kept in eval mode).
        augment: random crop (reflect pad 4) and horizontal flip.
        train_bn: with ``freeze_backbone=False``, let BatchNorm update its statistics
            (training mode for the update step); default False: fine-tuning a trained model
            on little data keeps its statistics (the model stays in eval mode).
        beta_l1: PAF's ``|beta|`` penalty weight for PSSiLU (PAF_AT uses 10; 0 = off).
        beta_clip: PAF's ``clip_grad_norm_(beta, 0.1)`` on PSSiLU's beta (0 = off).
        seed: seeds shuffling, augmentation and attack noise.
    """

    VERSION: ClassVar[int] = 1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: tuple[int, ...] = (30, 60)
    gamma: float = 0.1
    eps: float = 8 / 255
    attack_steps: int = 10
    step_size: float = 2 / 255
    random_start: bool = True
    targeted: bool = False
    freeze_backbone: bool = True
    augment: bool = True
    train_bn: bool = False
    beta_l1: float = 0.0
    beta_clip: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("lr", "eps", "step_size"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.attack_steps < 0:
            raise ValueError(f"attack_steps must be >= 0 (0 = clean training), got {self.attack_steps}")
        if self.weight_decay < 0 or self.beta_l1 < 0 or self.beta_clip < 0:
            raise ValueError("weight_decay, beta_l1 and beta_clip must be >= 0")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))


@dataclass
class TrainResult:
    """Per-epoch history (loss, adversarial training accuracy, lr, seconds) of a run."""

    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def epochs(self) -> int:
        return len(self.history)


# ------------------------------------------------------------------------------------------
# defenses: build, find parameters, save, load
# ------------------------------------------------------------------------------------------
def defense_config(name: str, **options: Any) -> Any:
    """The config of trainable defense ``name`` (one of :data:`DEFENSES`) with config-field ``options``."""
    if name not in defenses.defense_names(trainable=True):
        raise ValueError(f"unknown defense {name!r}; choose from {list(defenses.defense_names(trainable=True))}")
    return defenses.defense_config(name, **options)


def apply_defense(model: nn.Module, example: torch.Tensor, config: Any) -> nn.Module:
    """Apply the defense ``config`` describes (:func:`robustify.apply_defense`); returns the model to use."""
    return defenses.apply_defense(model, example, config)


def _defense_modules(model: nn.Module) -> dict[str, nn.Module]:
    modules: dict[str, nn.Module] = {}
    for handler in defenses.handlers(trainable=True):
        modules.update(handler.modules(model))
    return modules


def defense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The inserted modules' parameters (Sparta, parametric activations), each once."""
    seen: set[int] = set()
    params = []
    for m in _defense_modules(model).values():
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _is_defense_key(key: str, prefixes: tuple[str, ...]) -> bool:
    return key.startswith(prefixes)


def _backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    prefixes = tuple(f"{n}." for n in _defense_modules(model))
    return {k: v for k, v in model.state_dict().items() if not _is_defense_key(k, prefixes)}


def backbone_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".backbone.safetensors")


def save_defense(
    model: nn.Module,
    path: str | Path,
    config: Any = None,
    *,
    model_info: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    backbone: bool = False,
) -> Path:
    """Save the defense of ``model`` (only its state) + sidecar; ``backbone=True`` also
    writes the other weights to ``<path>.backbone.safetensors`` (after joint training).

    ``config``: the defense's config, by default the one recorded on the model when it was
    applied. A MeanSparse calibration (:func:`robustify.save_calibration`) is saved too, and
    :func:`load_defense` loads it back."""
    config = defenses.applied_config(model) if config is None else config
    handler = defenses.handler_for_config(config)
    if not handler.trainable:
        if backbone:
            raise ValueError(f"{handler.name_of(config)} trains nothing: save_defense(..., backbone=True) "
                             "does not apply to it")
        return defenses.save_defense_state(model, path, config, model_info=model_info,
                                           extra={"training": training} if training else None)
    extra: dict[str, Any] = {"training": training or {}}
    if backbone:
        bpath = backbone_path(path)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in _backbone_state(model).items()}
        with atomic_path(bpath) as tmp:
            save_file(state, str(tmp), metadata={"format": "robustify-backbone"})
        extra["backbone"] = bpath.name
    return defenses.save_defense_state(model, path, config, model_info=model_info, extra=extra)


def defense_kind(path: str | Path) -> str:
    """The defense saved in ``path``: a registered name (``"sparta"``, ``"pssilu"``, ``"meansparse"``...)."""
    return defenses.file_defense(path)[0]


def load_defense(model: nn.Module, path: str | Path, example: torch.Tensor) -> nn.Module:
    """Re-apply the defense saved in ``path`` with its saved state, and the backbone weights
    if it was trained jointly. Returns the model to use (in the train/eval mode of ``model``),
    with the defense's config recorded on it."""
    out = defenses.load_defense_state(model, path, example)
    if defenses.handler_for_config(defenses.applied_config(out)).trainable:
        meta = read_sidecar(path)
        if meta.get("backbone"):
            _load_backbone(out, Path(path).with_name(meta["backbone"]))
    return out.train(model.training)


def _load_backbone(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise StateMismatchError(f"backbone weights {str(path)!r} named in the sidecar do not exist")
    state = load_file(str(path))
    prefixes = tuple(f"{n}." for n in _defense_modules(model))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not _is_defense_key(k, prefixes)]
    if missing or result.unexpected_keys:
        raise StateMismatchError(
            f"backbone weights {str(path)!r} do not fit this model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding and random horizontal flip, per example."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy: dy + h, dx: dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def _trainable(model: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    if config.freeze_backbone:
        params = [p for p in defense_parameters(model) if p.requires_grad]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "nothing to train: " + ("the inserted modules have no trainable parameters (a fixed activation "
                                    "swap such as silu needs freeze_backbone=False)" if config.freeze_backbone
                                    else "no parameter requires grad")
        )
    return params


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), gamma=config.gamma)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def _trained_state(model: nn.Module, config: TrainConfig) -> dict[str, torch.Tensor]:
    if not config.freeze_backbone:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = {id(p) for p in defense_parameters(model)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}


def _restore_state(model: nn.Module, state: dict[str, torch.Tensor], config: TrainConfig) -> None:
    if not config.freeze_backbone:
        model.load_state_dict(state)
        return
    params = dict(model.named_parameters())
    ids = {id(q) for q in defense_parameters(model)}
    if set(state) != {n for n, p in params.items() if id(p) in ids}:
        raise StateMismatchError("the checkpoint was written for other inserted modules than this model has")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _betas(model: nn.Module) -> list[nn.Parameter]:
    betas = {id(m.beta): m.beta for m in _defense_modules(model).values() if isinstance(m, PSSiLU)}
    return [b for b in betas.values() if b.requires_grad]


def _penalty(model: nn.Module, config: TrainConfig) -> torch.Tensor | float:
    if config.beta_l1 == 0:
        return 0.0
    return config.beta_l1 * sum(b.abs().sum() for b in _betas(model))


def _comparable(config: TrainConfig) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("epochs")
    return d


def _load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: TrainConfig
) -> tuple[int, list[dict[str, float]]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupted file
        raise StateMismatchError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise StateMismatchError(f"{str(path)!r} is not a robustify training checkpoint")
    saved = dict(ckpt["config"])
    saved.pop("epochs", None)
    if saved != _comparable(config):
        diff = sorted(k for k in saved if saved.get(k) != _comparable(config).get(k))
        raise StateMismatchError(
            f"checkpoint {str(path)!r} was written with other training settings ({diff}); "
            "delete it or use another checkpoint path to start over"
        )
    _restore_state(model, ckpt["model"], config)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]), list(ckpt["history"])


def _save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    config: TrainConfig, epoch: int, history: list[dict[str, float]],
) -> None:
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "epoch": epoch,
        "history": history,
        "model": _trained_state(model, config),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def _train_epoch(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
    config: TrainConfig, epoch: int, progress: bool,
) -> dict[str, float]:
    generator = _epoch_generator(config.seed, epoch)
    order = torch.randperm(len(x), generator=generator)
    device = next(iter(optimizer.param_groups[0]["params"])).device
    total_loss = correct = seen = 0.0
    betas = _betas(model)
    update_mode = not config.freeze_backbone and config.train_bn
    start = time.perf_counter()
    batches = range(0, len(x), config.batch_size)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not progress, leave=False)
    for i in bar:
        idx = order[i: i + config.batch_size]
        xb, yb = x[idx], y[idx]
        if config.augment:
            xb = _augment(xb, generator)
        xb, yb = xb.to(device), yb.to(device)
        model.eval()
        adv = pgd(model, xb, yb, eps=config.eps, steps=config.attack_steps, step_size=config.step_size,
                  random_start=config.random_start, targeted=config.targeted, generator=generator)
        model.train(update_mode)
        logits = model(adv)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        (loss + _penalty(model, config)).backward()
        if config.beta_clip > 0 and betas:
            torch.nn.utils.clip_grad_norm_(betas, config.beta_clip)
        optimizer.step()
        n = len(yb)
        total_loss += float(loss.detach()) * n
        correct += float((logits.argmax(1) == yb).sum())
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", adv_acc=f"{correct / seen:.3f}")
    model.eval()
    return {
        "epoch": epoch + 1,
        "loss": total_loss / seen,
        "adv_acc": correct / seen,
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - start,
    }


def train_defense(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig | None = None,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Adversarially train ``model`` (in place) on images ``x`` in [0, 1] and labels ``y``.

    ``checkpoint``: file written after every epoch; with ``resume=True`` an existing one is
    loaded first and training continues after its last epoch (settings must match, except
    ``epochs``, which may grow). ``on_epoch_end(epoch, stats)`` runs after each checkpoint.
    The model is left in ``eval()`` mode; parameters frozen for the run are unfrozen again.
    """
    config = config or TrainConfig()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (and at least one), got {len(x)} and {len(y)}")
    frozen: list[nn.Parameter] = []
    if config.freeze_backbone:
        keep = {id(p) for p in defense_parameters(model)}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
        for p in frozen:
            p.requires_grad_(False)
    try:
        params = _trainable(model, config)
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                    nesterov=config.nesterov, weight_decay=config.weight_decay)
        scheduler = _scheduler(optimizer, config)
        start, history = 0, []
        path = Path(checkpoint) if checkpoint is not None else None
        if path is not None and resume and path.is_file():
            start, history = _load_checkpoint(path, model, optimizer, scheduler, config)
            logger.info("resuming from %s after epoch %d", path, start)
        n_trainable = sum(p.numel() for p in params)
        logger.info("adversarial training: %d parameter(s), %s backbone, epochs %d..%d, PGD-%d eps %.4f step %.4f",
                    n_trainable, "frozen" if config.freeze_backbone else "joint", start + 1, config.epochs,
                    config.attack_steps, config.eps, config.step_size)
        for epoch in range(start, config.epochs):
            stats = _train_epoch(model, x, y, optimizer, config, epoch, progress)
            scheduler.step()
            history.append(stats)
            logger.info("epoch %d/%d: adversarial loss %.4f, adversarial accuracy %.3f, lr %.4g, %.0f s",
                        epoch + 1, config.epochs, stats["loss"], stats["adv_acc"], stats["lr"], stats["seconds"])
            if path is not None:
                _save_checkpoint(path, model, optimizer, scheduler, config, epoch + 1, history)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, stats)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return TrainResult(history=history, resumed_from=start)
