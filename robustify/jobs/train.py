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

What is trained comes from the defenses' hooks (:mod:`robustify.defenses`): their parameters
(``trainable_parameters``), extra loss terms (``regularizer``) and gradient clipping (``clip``).
The trained defense is saved with :func:`robustify.defenses.save_defense` (``backbone=True`` after
joint training).
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
from torch import nn
from tqdm import tqdm

from robustify.core.errors import UserError
from robustify import defenses
from robustify.defenses.registry import defense_parameters
from robustify.attacks import evaluate_pgd, pgd  # the one PGD (training's attack), re-exported here
from robustify.core.config import SerializableConfig
from robustify.core.errors import StateMismatchError
from robustify.core.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "evaluate_pgd",
    "pgd",
    "train_defense",
]

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

    Examples:
        >>> config = rb.TrainConfig(epochs=1, batch_size=16, attack_steps=1, step_size=rb.parse_eps("10/255"))
        >>> config.freeze_backbone, config.eps
        (True, 0.03137254901960784)
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
            raise UserError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("lr", "eps", "step_size"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise UserError(f"{name} must be a finite number > 0, got {value!r}")
        if self.attack_steps < 0:
            raise UserError(f"attack_steps must be >= 0 (0 = clean training), got {self.attack_steps}")
        if self.weight_decay < 0 or self.beta_l1 < 0 or self.beta_clip < 0:
            raise UserError("weight_decay, beta_l1 and beta_clip must be >= 0")
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
        raise UserError(
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


def _penalty(model: nn.Module, config: TrainConfig) -> torch.Tensor | float:
    """The sum of the ``regularizer`` hooks of the defenses in ``model`` (PSSiLU's ``|beta|`` penalty, for one)."""
    return sum((h.regularizer(model, config) for h in defenses.with_hook(model, "regularizer")), 0.0)


def _clip(model: nn.Module, config: TrainConfig) -> None:
    """The ``clip`` hooks of the defenses in ``model`` (PSSiLU's gradient clipping of beta, for one)."""
    for h in defenses.with_hook(model, "clip"):
        h.clip(model, config)


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
        _clip(model, config)
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

    Args:
        model: a model with a trainable defense applied (Sparta, a parametric activation swap).
        x: training images ``(N, C, H, W)`` in [0, 1].
        y: their labels.
        config: the training settings (None: :class:`TrainConfig`'s defaults).
        checkpoint: a file written after every epoch (resumable).
        resume: continue from ``checkpoint`` when it exists.
        progress: show progress bars.
        on_epoch_end: called as ``on_epoch_end(epoch, stats)`` after each epoch.

    Returns:
        A ``TrainResult``: the per-epoch ``history`` (loss, adversarial accuracy, lr, seconds).

    Examples:
        >>> from robustify.defenses import defense_config
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> model = rb.apply_defense(model, info.example_input(), defense_config("sparta-nodp", init="identity"))
        >>> x, y = rb.to_tensors(rb.load_data("../shared/data/cifar10_subset.npz", "train", n=16))
        >>> config = rb.TrainConfig(epochs=1, batch_size=16, attack_steps=1, step_size=rb.parse_eps("10/255"))
        >>> rb.train_defense(model, x, y, config, progress=False).epochs
        1
    """
    config = config or TrainConfig()
    if len(x) != len(y) or len(x) == 0:
        raise UserError(f"need as many labels as images (and at least one), got {len(x)} and {len(y)}")
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
