"""The evaluation job: load -> insert (and calibrate) -> attack -> evaluate -> leaderboard, in one call.

These are the functions the CLI commands call (``robustify evaluate``, ``audit``, ``calibrate``, ``run``);
use them from Python for the same results. Every defense is reached through its registered hooks
(:mod:`robustify.defenses`): this module names none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustify import defenses
from robustify.attacks import AttackConfig, not_applicable, threat_norm
from robustify.core import distributed
from robustify.core.config import SerializableConfig
from robustify.core.errors import StateMismatchError, UserError
from robustify.defenses.file import read_sidecar, saved_defense
from robustify.evaluation.engine import evaluate
from robustify.evaluation.fast import PRECISIONS, for_evaluation
from robustify.evaluation.results import EvalResult
from robustify.load.data import check_image_size, load_model_data, loader, reads_image_files, to_tensors
from robustify.load.models import ModelInfo, load_model

logger = logging.getLogger(__name__)

__all__ = ["CALIBRATION_FILE", "EvaluationJob", "build_defended_model", "calibrate_defense", "calibration_loader",
           "load_examples", "not_robust_warning", "run_evaluation"]

#: where an evaluation caches its calibrated defense's state in ``out`` (reused by a rerun)
CALIBRATION_FILE = "calibration.safetensors"


@dataclass
class EvaluationJob(SerializableConfig):
    """Everything one evaluation needs; the CLI's flags are made from these fields (and their help from here).

    Attributes:
        model: robustbench:NAME, timm:NAME, small-resnet-at, aa-resnet18 or package.module:function.
        defense: none, or a registered defense (:func:`robustify.defenses.defense_names`).
        data: a registered dataset's NAME or NAME:DIR (cifar10, cifar100, imagenet:DIR), folder:DIR or a .npz file
            (x_train, y_train, x_test, y_test).
        dataset: the model's leaderboard, a registered dataset: cifar10, cifar100, imagenet or a plugin's.
        threat_model: the model's leaderboard threat model: Linf, L2 or corruptions.
        weights: local checkpoint (safetensors or weights-only PyTorch file).
        defense_weights: the defense's file: a calibration (``robustify calibrate``) or trained parameters
            (``robustify train``); a weights file with a robustify sidecar is taken as this too.
        pretrained: download pretrained weights (unless a weights file is given).
        image_size: the side of the square images the model takes (None: the dataset's; a timm model's own
            pretrained size); a timm model is built for it (its img_size where it takes one: ViTs; a
            convolutional model takes any size). Nothing is resized.
        new_head: pretrained timm weights for another number of classes than the dataset's get a new,
            randomly initialised classifier (without this flag, that is an error).
        cache_dir: where downloads are cached (None: $ROBUSTIFY_CACHE or ~/.cache/robustify).
        device: torch device.
        n_examples: the first N examples of the split are evaluated.
        split: test, or holdout (the held-out training examples).
        holdout: training examples held out from calibration (for choosing alpha).
        n_calib: calibrate on N training examples only (the first; class-spread on an image folder).
        calib_batch_size: calibration batch size (None: the defense's default, e.g. MeanSparse's 256, or the
            published 512 with stats mode official).
        workers: data-loading processes (None: one per CPU, at most 8, for image folders; 0 for tensors).
        defense_config: the defense's settings, a config of its registered type (None: the defaults of its
            command-line flags, :attr:`robustify.defenses.DefenseOptions.defaults`, else the config's own).
        attack: threat model, attacks and budgets (None: the defaults for the job's dataset and threat model).
        out: results directory (resumable: rerun the same job to resume).
        leaderboard_dir: rebuild this leaderboard from every result next to ``out`` when done.
        progress: show progress bars.
        compile: attack the torch.compile'd model (MeanSparse fused into ReLU): about a minute of
            compilation, then ~1.5x faster on CPU (benchmarks/results/compiled_eval.csv).
        precision: autocast the attacked model: float32, bfloat16 or float16 (MeanSparse statistics stay float32).
        keep_adversarial: keep the worst-case adversarial examples in ``out``/adversarial.pt (per example: the
            input of the first attack that broke it, else the clean input; for ``robustify export``).

    Examples:
        >>> from robustify.attacks import AttackConfig
        >>> job = rb.EvaluationJob(model="aa-resnet18", weights="../shared/models/resnet18_at_relu.pt",
        ...                        data="../shared/data/cifar10_subset.npz", defense="meansparse", n_calib=64,
        ...                        n_examples=4, attack=AttackConfig(attacks=("apgd-ce",), apgd_iters=1),
        ...                        out="runs/ms", progress=False)
        >>> job.defense, job.n_examples, job.split
        ('meansparse', 4, 'test')
    """

    model: str
    defense: str = "none"
    data: str = "cifar10"
    dataset: str = "cifar10"
    threat_model: str = "Linf"
    weights: str | None = None
    defense_weights: str | None = None
    pretrained: bool = True
    image_size: int | None = None
    new_head: bool = False
    cache_dir: str | None = None
    device: str = "cpu"
    n_examples: int = 1000
    split: str = "test"
    holdout: int = 0
    n_calib: int | None = None
    calib_batch_size: int | None = None  # None: the defense's calibration_batch_size hook
    workers: int | None = None  # data-loading processes; None: one per CPU (max 8) for image files, 0 for tensors
    defense_config: Any = None
    attack: AttackConfig | None = None  # None: the defaults for the job's dataset and threat model
    out: str = "runs/eval"
    leaderboard_dir: str | None = None
    progress: bool = True
    compile: bool = False
    precision: str = "float32"
    keep_adversarial: bool = False

    def __post_init__(self) -> None:
        if self.defense != "none" and self.defense not in defenses.defense_names():
            raise UserError(f"unknown defense {self.defense!r}; choose from {['none', *defenses.defense_names()]}")
        self.defense_config = _defense_config(self.defense, self.defense_config)
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose from {list(PRECISIONS)}")
        if self.n_examples < 1:
            raise UserError(f"n_examples must be positive, got {self.n_examples}")
        if self.attack is None:
            self.attack = AttackConfig(norm=threat_norm(self.threat_model), dataset=self.dataset)
        elif self.attack.dataset != self.dataset:
            raise UserError(f"the attack config is for dataset {self.attack.dataset!r} (its default eps) but the job "
                             f"evaluates {self.dataset!r}: AttackConfig(dataset={self.dataset!r}, ...)")


def _defense_config(name: str, config: Any) -> Any:
    """The config of defense ``name``: ``config`` (a config of its type, or its dict), else its defaults."""
    if name == "none":
        return None  # no defense, no settings (``replace(job, defense="none")`` drops them)
    defense = defenses.get_defense(name)
    if config is None:
        return defense.default_config(name)
    if isinstance(config, dict):
        config = defense.config_type.from_dict(config)
    if not isinstance(config, defense.config_type):
        raise UserError(f"defense {name!r} takes a {defense.config_type.__name__}, got a {type(config).__name__}")
    return config


def _is_defense_file(path: str | None) -> bool:
    """Whether ``path`` is a defense file (its sidecar names a defense), not a model checkpoint."""
    return saved_defense(path) is not None


#: calibration batch size of a calibrated defense without a ``calibration_batch_size`` hook
CALIB_BATCH_SIZE = 256


def calibration_loader(
    data: str,
    info: ModelInfo,
    *,
    holdout: int = 0,
    n_calib: int | None = None,
    batch_size: int = CALIB_BATCH_SIZE,
    cache_dir: str | None = None,
    workers: int | None = None,
    device: str | None = None,
) -> Any:
    """The calibration batches: the training split minus its ``holdout`` examples, in the model's preprocessing.

    ``n_calib`` keeps the first examples only (class-spread on an ImageFolder, see
    :func:`robustify.load.data.load_data`); ``workers`` processes decode images (None: the
    default of :func:`robustify.load.data.loader`), into pinned memory for a CUDA ``device``.
    Under torchrun each rank gets its shard (a defense's statistics pass merges the ranks).
    """
    from torch.utils.data import Subset

    ds = load_model_data(data, "train", info, holdout=holdout, cache_dir=cache_dir)
    check_image_size(tuple(ds[0][0].shape), info.input_size)
    if n_calib is not None:
        if not 0 < n_calib <= len(ds):
            raise UserError(f"--n-calib must be in [1, {len(ds)}], got {n_calib}")
        ds = Subset(ds, range(n_calib))
    if distributed.world_size() > 1:
        ds = Subset(ds, distributed.shard(len(ds)))
    return loader(ds, batch_size, workers=workers, device=device)


def _calibration_batch_size(defense: defenses.Defense, config: Any, requested: int | None) -> int:
    if defense.calibration_batch_size is not None:
        return defense.calibration_batch_size(config, requested)
    return requested if requested is not None else CALIB_BATCH_SIZE


def calibrate_defense(
    model: nn.Module,
    info: ModelInfo,
    config: Any,
    out: str | Path,
    *,
    data: str,
    holdout: int = 0,
    n_calib: int | None = None,
    batch_size: int | None = None,
    cache_dir: str | None = None,
    workers: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, int]]:
    """Apply the calibrated defense ``config`` describes, run its statistics pass once over the job's calibration
    data and save its state to ``out`` with where the statistics came from (on the main process under torchrun).
    ``batch_size`` None: the defense's default. Returns the model and the per-site counts."""
    defense = defenses.handler_for_config(config)
    if defense.calibrate is None:
        raise UserError(f"defense {defense.config_name(config)!r} has no statistics pass to calibrate")
    model = defenses.apply_defense(model, info.example_input(device=device), config)
    batch_size = _calibration_batch_size(defense, config, batch_size)
    batches = calibration_loader(data, info, holdout=holdout, n_calib=n_calib, batch_size=batch_size,
                                 cache_dir=cache_dir, workers=workers, device=device)
    counts = defenses.calibrate(model, batches, device=device, progress=progress)
    if distributed.is_main():  # under torchrun every rank holds the merged statistics
        defenses.save_defense_state(model, out, config, model_info=info.to_dict(),
                                    extra=_calibration_source(data, holdout, n_calib, batch_size))
    return model, counts


def _calibration_source(data: str, holdout: int, n_calib: int | None, batch_size: int) -> dict[str, Any]:
    """Where a calibration's statistics came from, as recorded in its sidecar (and checked on reuse)."""
    return {"data": data, "holdout": holdout, "n_calib": n_calib, "batch_size": batch_size}


def _check_cached(path: Path, job: EvaluationJob, defense: defenses.Defense) -> None:
    """Refuse a calibration cached in the results directory from other calibration data."""
    try:
        saved = read_sidecar(path)
    except (OSError, StateMismatchError):
        return  # the defense's loader reports the damaged file
    config = job.defense_config
    wanted = _calibration_source(job.data, job.holdout, job.n_calib,
                                 _calibration_batch_size(defense, config, job.calib_batch_size))
    try:
        saved_config = defense.config_type.from_dict(saved.get("config") or {})
    except (TypeError, ValueError):
        saved_config = None
    depends = defense.batch_dependent or (lambda c: False)
    if not (saved_config is not None and depends(saved_config) and depends(config)):
        del wanted["batch_size"]  # statistics that do not depend on it (a mismatch of modes: the loader refuses)
    differ = sorted(k for k, v in wanted.items() if saved.get(k) != v)
    if differ:
        raise StateMismatchError(
            f"{str(path)!r} was calibrated with {', '.join(f'{k}={saved.get(k)!r}' for k in differ)}, the job asks "
            f"for {', '.join(f'{k}={wanted[k]!r}' for k in differ)}: use another --out, or delete the file to recalibrate"
        )




def _calibrated(job: EvaluationJob, model: nn.Module, info: ModelInfo, defense: defenses.Defense) -> nn.Module:
    """The job's calibrated defense: from its file, the one cached in ``out``, or calibrated now (and cached)."""
    example = info.example_input(device=job.device)
    cached = Path(job.out) / CALIBRATION_FILE
    source = job.defense_weights or (str(cached) if cached.is_file() else None)
    if job.defense_weights is None and cached.is_file():
        _check_cached(cached, job, defense)
    if source is not None:
        model = defense.load(model, source, example, job.defense_config)  # the job's settings, checked to fit
        logger.info("%s statistics loaded from %s (no recalibration)", defense.title, source)
        return model
    model, _ = calibrate_defense(model, info, job.defense_config, cached, data=job.data, holdout=job.holdout,
                                 n_calib=job.n_calib, batch_size=job.calib_batch_size, cache_dir=job.cache_dir,
                                 workers=job.workers, device=job.device, progress=job.progress)
    distributed.barrier()
    return model


def build_defended_model(job: EvaluationJob) -> tuple[nn.Module, ModelInfo, nn.Module | None]:
    """Load the model and apply the job's defense.

    A calibrated defense (one with a statistics pass) is calibrated here, or loaded from its file or the
    calibration cached in ``job.out``; a trained one is loaded from its file; any other is applied with
    the job's settings. Returns ``(model, info, source_model)``; ``source_model`` (the transfer attack's
    source) is None: the attack takes the base model's view through the defense's ``disabled`` hook.
    """
    weights, defense_weights = job.weights, job.defense_weights
    if job.defense != "none" and defense_weights is None and _is_defense_file(weights):
        weights, defense_weights = None, weights  # `--weights` named the defense's file
        job = replace(job, weights=None, defense_weights=defense_weights)
    model, info = load_model(job.model, dataset=job.dataset, threat_model=job.threat_model, weights=weights,
                             pretrained=job.pretrained, cache_dir=job.cache_dir, device=job.device,
                             image_size=job.image_size, new_head=job.new_head)
    if job.defense == "none":
        return model, info, None
    defense = defenses.get_defense(job.defense)
    if defense.calibrate is not None:
        return _calibrated(job, model, info, defense), info, None
    example = info.example_input(device=job.device)
    if defense_weights is not None:
        return defenses.load_defense(model, defense_weights, example), info, None
    if defense.trainable:
        raise UserError(f"--defense {job.defense} needs its trained parameters: --defense-weights FILE "
                        "(from `robustify train`)")
    return defenses.apply_defense(model, example, job.defense_config), info, None


def _job_meta(job: EvaluationJob, info: ModelInfo, model: nn.Module) -> dict[str, Any]:
    """The result's ``meta``: the job's identity and, from each registered defense's ``meta`` hook, what it records
    (the job's defense with its config; the others say whether they are in the model)."""
    meta: dict[str, Any] = {"model": job.model, "defense": job.defense}
    config = getattr(model, defenses.CONFIG_ATTR, None) or job.defense_config  # a file's own, where one was loaded
    for defense in defenses.handlers():
        applied = job.defense != "none" and defense is defenses.get_defense(job.defense)
        if applied or defense.meta is not None:
            meta.update(defense.record(model, config if applied else None))
    meta.update({"dataset": info.dataset, "data": job.data, "split": job.split, "weights": job.weights,
                 "defense_weights": job.defense_weights})
    if job.image_size is not None:  # the model was built for other images than its own (a timm model)
        meta["image_size"] = job.image_size
    if info.extra.get("new_head"):
        meta["new_head"] = True
    if job.precision != "float32":  # results depend on it; compiling changes float32 rounding only
        meta["precision"] = job.precision
    if reads_image_files(job.data):  # how the image files were turned into the model's inputs
        from robustify.load.preprocessing import describe_transform

        meta["preprocessing"] = {**(info.preprocessing or {}), "transform": describe_transform(info.transform())}
    return meta


def _attacked(job: EvaluationJob, model: nn.Module) -> nn.Module:
    return for_evaluation(model, compile=job.compile, precision=job.precision, device=job.device)


def _applicable(config: AttackConfig, model: nn.Module, defense: str) -> tuple[AttackConfig, dict[str, str]]:
    """Drop the attacks that do not apply to this model, saying why (:func:`robustify.attacks.not_applicable`)."""
    skipped: dict[str, str] = {}
    keep = []
    for attack in config.attacks:
        why = not_applicable(attack, model, defended=defense != "none")
        if why is None:
            keep.append(attack)
        else:
            skipped[attack] = f"not applicable: {why}"
    if not keep:
        raise UserError(f"none of the attacks {list(config.attacks)} applies to defense {defense!r}")
    return replace(config, attacks=tuple(keep)), skipped


def load_examples(job: EvaluationJob, info: ModelInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """The job's examples as tensors, in the model's preprocessing: what the evaluation (and its audit) attacks."""
    data = load_model_data(job.data, job.split, info, n=job.n_examples,
                           holdout=job.holdout if job.split == "holdout" else 0, cache_dir=job.cache_dir)
    return to_tensors(data, workers=job.workers)


def run_evaluation(job: EvaluationJob) -> EvalResult:
    """Load, defend, calibrate (or load statistics), evaluate, and rebuild the leaderboard.

    Args:
        job: everything the evaluation needs (:class:`EvaluationJob`).

    Returns:
        The :class:`EvalResult`, also written to ``job.out/result.json``.

    Examples:
        >>> from robustify.attacks import AttackConfig
        >>> job = rb.EvaluationJob(model="aa-resnet18", weights="../shared/models/resnet18_at_relu.pt",
        ...                        data="../shared/data/cifar10_subset.npz", defense="meansparse", n_calib=64,
        ...                        n_examples=4, attack=AttackConfig(attacks=("apgd-ce", "bpda"), apgd_iters=1),
        ...                        out="runs/ms", progress=False)
        >>> result = rb.run_evaluation(job)
        >>> result.meta["defense"], sorted(result.attack_acc)
        ('meansparse', ['apgd-ce', 'bpda-apgd-ce', 'bpda-apgd-dlr'])
    """
    model, info, source = build_defended_model(job)
    x, y = load_examples(job, info)
    config, skipped = _applicable(job.attack, model, job.defense)
    meta = _job_meta(job, info, model)
    meta["not_applicable"] = skipped
    result = evaluate(_attacked(job, model), x, y, config, out_dir=job.out, meta=meta, source_model=source,
                      device=job.device, num_classes=info.num_classes, input_size=info.input_size,
                      progress=job.progress, keep_adversarial=job.keep_adversarial)
    if job.leaderboard_dir and distributed.is_main():
        from robustify.reporting.leaderboard import write_leaderboard

        write_leaderboard(Path(job.out).parent, job.leaderboard_dir)
    return result


#: Worst-case robust accuracy (fraction) at or below which the base model is taken as not adversarially trained.
NOT_ROBUST_ACC = 0.01


def not_robust_warning(base: EvalResult, model: str) -> str | None:
    """One plain line when the base model is (nearly) never robust: post-training defenses need an adversarially
    trained one."""
    if base.worst_case_acc > NOT_ROBUST_ACC:
        return None
    return (f"{model} has {100 * base.worst_case_acc:.1f}% robust accuracy: it is probably not adversarially "
            "trained, and every robustify defense is a post-training method for adversarially trained models; run "
            "one with --model robustbench:NAME (e.g. robustbench:Engstrom2019Robustness) or --weights FILE "
            "(e.g. --model aa-resnet18 --weights resnet18_at.pt)")
