"""End-to-end jobs: load -> insert -> calibrate -> evaluate -> leaderboard, in one call.

These are the functions the CLI commands call (``robustify evaluate``, ``sweep``,
``run``); use them from Python for the same results.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from . import defenses, distributed
from .attacks import AttackConfig, threat_norm
from .calibrate import calibrate
from .config import MeanSparseConfig, SerializableConfig
from .data import check_image_size, load_model_data, loader, reads_image_files, to_tensors
from .evaluate import evaluate
from .fast import PRECISIONS, for_evaluation
from .insert import insert_meansparse
from .io import atomic_path, write_json
from .meansparse import meansparse_modules, set_alpha
from .models import ModelInfo, load_model
from .results import EvalResult
from .state import StateMismatchError, load_calibration, save_calibration, sidecar_path

logger = logging.getLogger(__name__)

__all__ = ["EvaluationJob", "SweepResult", "build_defended_model", "run_evaluation", "sweep_alpha"]

DEFENSES = ("none", *defenses.defense_names())  # as registered at import; jobs check the registry itself
CALIBRATION_FILE = "calibration.safetensors"


@dataclass
class EvaluationJob(SerializableConfig):
    """Everything one evaluation needs; the CLI's flags are made from these fields (and their help from here).

    Attributes:
        model: robustbench:NAME, timm:NAME, aa-resnet18 or package.module:function.
        defense: none, or a registered defense (:func:`robustify.defenses.defense_names`).
        data: cifar10, cifar100, imagenet:DIR, folder:DIR or a .npz file (x_train, y_train, x_test, y_test).
        dataset: cifar10, cifar100 or imagenet (the model's leaderboard).
        threat_model: the model's leaderboard threat model: Linf, L2 or corruptions.
        weights: local checkpoint (safetensors or weights-only PyTorch file).
        defense_weights: MeanSparse calibration file, or trained defense parameters from
            ``robustify train`` (a weights file with a robustify sidecar is taken as this too).
        pretrained: download pretrained weights (unless a weights file is given).
        cache_dir: where downloads are cached (None: $ROBUSTIFY_CACHE or ~/.cache/robustify).
        device: torch device.
        n_examples: the first N examples of the split are evaluated.
        split: test, or holdout (the held-out training examples).
        holdout: training examples held out from calibration (for choosing alpha).
        n_calib: calibrate on N training examples only (the first; class-spread on an image folder).
        calib_batch_size: calibration batch size (None: 256, or the published 512 with stats mode official).
        workers: data-loading processes (None: one per CPU, at most 8, for image folders; 0 for tensors).
        meansparse: MeanSparse placement and thresholds (by default alpha 0.2, for the CLI too).
        attack: threat model, attacks and budgets (None: the defaults for the job's dataset and threat model).
        out: results directory (resumable: rerun the same job to resume).
        leaderboard_dir: rebuild this leaderboard from every result next to ``out`` when done.
        progress: show progress bars.
        compile: attack the torch.compile'd model (MeanSparse fused into ReLU): about a minute of
            compilation, then ~1.5x faster on CPU (benchmarks/results/compiled_eval.csv).
        precision: autocast the attacked model: float32, bfloat16 or float16 (MeanSparse statistics stay float32).
    """

    model: str
    defense: str = "none"
    data: str = "cifar10"
    dataset: str = "cifar10"
    threat_model: str = "Linf"
    weights: str | None = None
    defense_weights: str | None = None
    pretrained: bool = True
    cache_dir: str | None = None
    device: str = "cpu"
    n_examples: int = 1000
    split: str = "test"
    holdout: int = 0
    n_calib: int | None = None
    calib_batch_size: int | None = None  # None: MeanSparseConfig.calibration_batch_size()
    workers: int | None = None  # data-loading processes; None: one per CPU (max 8) for image files, 0 for tensors
    meansparse: MeanSparseConfig = field(default_factory=lambda: MeanSparseConfig(alpha=0.2))
    attack: AttackConfig | None = None  # None: the defaults for the job's dataset and threat model
    out: str = "runs/eval"
    leaderboard_dir: str | None = None
    progress: bool = True
    compile: bool = False
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.defense != "none" and self.defense not in defenses.defense_names():
            raise ValueError(f"unknown defense {self.defense!r}; choose from {['none', *defenses.defense_names()]}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {list(PRECISIONS)}")
        if self.n_examples < 1:
            raise ValueError(f"n_examples must be positive, got {self.n_examples}")
        if self.attack is None:
            self.attack = AttackConfig(norm=threat_norm(self.threat_model), dataset=self.dataset)
        elif self.attack.dataset != self.dataset:
            raise ValueError(f"the attack config is for dataset {self.attack.dataset!r} (its default eps) but the job "
                             f"evaluates {self.dataset!r}: AttackConfig(dataset={self.dataset!r}, ...)")


def _is_defense_file(path: str | None) -> bool:
    if not path or not sidecar_path(path).is_file():
        return False
    try:
        return str(json.loads(sidecar_path(path).read_text()).get("format", "")).startswith("robustify")
    except (OSError, json.JSONDecodeError):
        return False


def calibration_loader(
    data: str,
    info: ModelInfo,
    *,
    holdout: int = 0,
    n_calib: int | None = None,
    batch_size: int = MeanSparseConfig.CALIB_BATCH_SIZE,
    cache_dir: str | None = None,
    workers: int | None = None,
    device: str | None = None,
) -> Any:
    """The calibration batches: the training split minus its ``holdout`` examples, in the model's preprocessing.

    ``n_calib`` keeps the first examples only (class-spread on an ImageFolder, see
    :func:`robustify.data.load_data`); ``workers`` processes decode images (None: the
    default of :func:`robustify.data.loader`), into pinned memory for a CUDA ``device``.
    Under torchrun each rank gets its shard (the moments of all ranks are merged exactly by
    :func:`robustify.calibrate`).
    """
    from torch.utils.data import Subset

    ds = load_model_data(data, "train", info, holdout=holdout, cache_dir=cache_dir)
    check_image_size(tuple(ds[0][0].shape), info.input_size)
    if n_calib is not None:
        if not 0 < n_calib <= len(ds):
            raise ValueError(f"--n-calib must be in [1, {len(ds)}], got {n_calib}")
        ds = Subset(ds, range(n_calib))
    if distributed.world_size() > 1:
        ds = Subset(ds, distributed.shard(len(ds)))
    return loader(ds, batch_size, workers=workers, device=device)


def calibrate_meansparse(
    model: nn.Module,
    info: ModelInfo,
    config: MeanSparseConfig,
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
    """Insert MeanSparse with ``config``, calibrate it in one pass over the job's calibration data and
    save the statistics to ``out`` with where they came from (on the main process under torchrun).
    ``batch_size`` None: the config's (:meth:`MeanSparseConfig.calibration_batch_size`). Returns the
    model and the per-site counts."""
    model = insert_meansparse(model, info.example_input(device=device), config)
    batch_size = config.calibration_batch_size(batch_size)
    batches = calibration_loader(data, info, holdout=holdout, n_calib=n_calib, batch_size=batch_size,
                                 cache_dir=cache_dir, workers=workers, device=device)
    counts = calibrate(model, batches, device=device, progress=progress)
    if distributed.is_main():  # under torchrun every rank holds the merged statistics
        save_calibration(model, out, config=config, model_info=info.to_dict(),
                         extra=_calibration_source(data, holdout, n_calib, batch_size))
    return model, counts


def _calibration_source(data: str, holdout: int, n_calib: int | None, batch_size: int) -> dict[str, Any]:
    """Where a calibration's statistics came from, as recorded in its sidecar (and checked on reuse)."""
    return {"data": data, "holdout": holdout, "n_calib": n_calib, "batch_size": batch_size}


def _check_cached(path: Path, job: EvaluationJob) -> None:
    """Refuse a calibration cached in the results directory from other calibration data."""
    try:
        saved = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON
        saved = None
    if not isinstance(saved, dict):
        return  # load_calibration reports the damaged file
    wanted = _calibration_source(job.data, job.holdout, job.n_calib,
                                 job.meansparse.calibration_batch_size(job.calib_batch_size))
    official = (saved.get("config") or {}).get("stats_mode") == job.meansparse.stats_mode == "official"
    if not official:  # official statistics depend on the batch size (another stats mode: load_calibration refuses)
        del wanted["batch_size"]
    differ = sorted(k for k, v in wanted.items() if saved.get(k) != v)
    if differ:
        raise StateMismatchError(
            f"{str(path)!r} was calibrated with {', '.join(f'{k}={saved.get(k)!r}' for k in differ)}, the job asks "
            f"for {', '.join(f'{k}={wanted[k]!r}' for k in differ)}: use another --out, or delete the file to recalibrate"
        )


def _meansparse(job: EvaluationJob, model: nn.Module, info: ModelInfo) -> nn.Module:
    example = info.example_input(device=job.device)
    cached = Path(job.out) / CALIBRATION_FILE
    source = job.defense_weights or (str(cached) if cached.is_file() else None)
    if job.defense_weights is None and cached.is_file():
        _check_cached(cached, job)
    if source is not None:
        model = load_calibration(model, source, example, config=job.meansparse)  # the job's placement and alphas
        logger.info("MeanSparse statistics loaded from %s (no recalibration)", source)
        return model
    model, _ = calibrate_meansparse(model, info, job.meansparse, cached, data=job.data, holdout=job.holdout,
                                    n_calib=job.n_calib, batch_size=job.calib_batch_size, cache_dir=job.cache_dir,
                                    workers=job.workers, device=job.device, progress=job.progress)
    distributed.barrier()
    return model


def _job_meansparse(job: EvaluationJob) -> MeanSparseConfig | None:
    """The job's MeanSparse settings if its defense is the one they configure (its registered
    config type is theirs), else None."""
    if job.defense == "none" or defenses.get_defense(job.defense).config_type is not type(job.meansparse):
        return None
    return job.meansparse


def build_defended_model(job: EvaluationJob) -> tuple[nn.Module, ModelInfo, nn.Module | None]:
    """Load the model and apply the job's defense.

    Returns ``(model, info, source_model)`` where ``source_model`` is the undefended base
    model for the transfer attack when the defense cannot simply be switched off (None
    for MeanSparse, whose modules are disabled instead).
    """
    weights, defense_weights = job.weights, job.defense_weights
    if job.defense != "none" and defense_weights is None and _is_defense_file(weights):
        weights, defense_weights = None, weights  # `--weights` named the defense's file
        job = replace(job, weights=None, defense_weights=defense_weights)
    model, info = load_model(job.model, dataset=job.dataset, threat_model=job.threat_model, weights=weights,
                             pretrained=job.pretrained, cache_dir=job.cache_dir, device=job.device)
    if job.defense == "none":
        return model, info, None
    if _job_meansparse(job) is not None:  # MeanSparse: calibrated here (or loaded)
        return _meansparse(job, model, info), info, None
    if defense_weights is None:
        raise ValueError(f"--defense {job.defense} needs its trained parameters: --defense-weights FILE "
                         "(from `robustify train`)")
    from .train import load_defense

    base = copy.deepcopy(model)
    defended = load_defense(model, defense_weights, info.example_input(device=job.device))
    return defended, info, base


def _applied_meansparse(job: EvaluationJob, model: nn.Module) -> dict[str, Any] | None:
    """The MeanSparse settings in force, read back from the model's modules: its sites and
    per-site thresholds (those differing from ``alpha``)."""
    alphas = {site: m.alpha for site, m in meansparse_modules(model).items()}
    if not alphas:
        return None
    if _job_meansparse(job) is not None:  # inserted with the job's placement (a file's is checked to match)
        record, alpha = job.meansparse.to_dict(), job.meansparse.alpha
    else:  # MeanSparse that came with the model (RobustBench's published ones): the commonest alpha
        counts = Counter(alphas.values())
        record, alpha = {}, min(counts, key=lambda a: (-counts[a], a))
    record.update(alpha=alpha, site_alpha={s: a for s, a in alphas.items() if a != alpha}, sites=list(alphas))
    return record


def _job_meta(job: EvaluationJob, info: ModelInfo, model: nn.Module) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "model": job.model,
        "defense": job.defense,
        "alpha": job.meansparse.alpha if _job_meansparse(job) is not None else None,
        "dataset": info.dataset,
        "data": job.data,
        "split": job.split,
        "weights": job.weights,
        "defense_weights": job.defense_weights,
        "meansparse": _applied_meansparse(job, model),
    }
    if job.precision != "float32":  # results depend on it; compiling changes float32 rounding only
        meta["precision"] = job.precision
    if reads_image_files(job.data):  # how the image files were turned into the model's inputs
        from .preprocessing import describe_transform

        meta["preprocessing"] = {**(info.preprocessing or {}), "transform": describe_transform(info.transform())}
    return meta


def _attacked(job: EvaluationJob, model: nn.Module) -> nn.Module:
    return for_evaluation(model, compile=job.compile, precision=job.precision, device=job.device)


def _has_nondifferentiable(model: nn.Module) -> bool:
    """True when the model holds modules of a defense BPDA applies to (MeanSparse, also a published one)."""
    return any(h.modules(model) for h in defenses.handlers() if not h.differentiable)


def _applicable(config: AttackConfig, model: nn.Module, defense: str) -> tuple[AttackConfig, dict[str, str]]:
    """Drop attacks that cannot differ from others on this model, saying why."""
    skipped: dict[str, str] = {}
    has_ms = _has_nondifferentiable(model)
    keep = []
    for attack in config.attacks:
        if (attack.startswith("bpda-") or attack == "soft-bpda") and not has_ms:
            skipped[attack] = ("not applicable: no MeanSparse (equals standard APGD)" if defense == "none"
                               else "not applicable: the defense is differentiable")
        elif attack == "transfer" and defense == "none":
            skipped[attack] = "not applicable: the source would be the model itself"
        else:
            keep.append(attack)
    if not keep:
        raise ValueError(f"none of the attacks {list(config.attacks)} applies to defense {defense!r}")
    return replace(config, attacks=tuple(keep)), skipped


def load_examples(job: EvaluationJob, info: ModelInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """The job's examples as tensors, in the model's preprocessing: what the evaluation (and its audit) attacks."""
    data = load_model_data(job.data, job.split, info, n=job.n_examples,
                           holdout=job.holdout if job.split == "holdout" else 0, cache_dir=job.cache_dir)
    return to_tensors(data, workers=job.workers)


def run_evaluation(job: EvaluationJob) -> EvalResult:
    """Load, defend, calibrate (or load statistics), evaluate, and rebuild the leaderboard."""
    model, info, source = build_defended_model(job)
    x, y = load_examples(job, info)
    config, skipped = _applicable(job.attack, model, job.defense)
    meta = _job_meta(job, info, model)
    meta["not_applicable"] = skipped
    result = evaluate(_attacked(job, model), x, y, config, out_dir=job.out, meta=meta, source_model=source,
                      device=job.device, num_classes=info.num_classes, input_size=info.input_size,
                      progress=job.progress)
    if job.leaderboard_dir and distributed.is_main():
        from .leaderboard import write_leaderboard

        write_leaderboard(Path(job.out).parent, job.leaderboard_dir)
    return result


#: Worst-case robust accuracy (fraction) at or below which the base model is taken as not adversarially trained.
NOT_ROBUST_ACC = 0.01


def not_robust_warning(base: EvalResult, model: str) -> str | None:
    """One plain line when the base model is (nearly) never robust; MeanSparse needs an adversarially trained one."""
    if base.worst_case_acc > NOT_ROBUST_ACC:
        return None
    return (f"{model} has {100 * base.worst_case_acc:.1f}% robust accuracy: it is probably not adversarially "
            "trained, and MeanSparse is a post-training method for adversarially trained models; run one with "
            "--model robustbench:NAME (e.g. robustbench:Engstrom2019Robustness) or --weights FILE "
            "(e.g. --model aa-resnet18 --weights resnet18_at.pt)")


# ------------------------------------------------------------------------------------------
# alpha sweep
# ------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """The held-out curve and the alpha the rule picked."""

    alphas: list[float]
    curve: list[dict[str, Any]]
    base: dict[str, float]
    chosen_alpha: float | None
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _choose(curve: pd.DataFrame, base_clean: float, max_clean_drop: float) -> float | None:
    ok = curve[curve["clean_acc"] >= base_clean - max_clean_drop]
    if ok.empty:
        return None
    best = ok["worst_case_acc"].max()
    return float(ok[ok["worst_case_acc"] == best]["alpha"].min())


def sweep_alpha(job: EvaluationJob, alphas: list[float], max_clean_drop: float = 0.5) -> SweepResult:
    """Calibrate once, evaluate every alpha on the held-out split, pick alpha by an explicit rule.

    Rule: the highest worst-case robust accuracy among the alphas whose clean accuracy is
    within ``max_clean_drop`` points of the base model's (ties: the smallest alpha).
    Alpha 0 (exactly the base model) is always evaluated as the reference. Results go to
    ``<out>/alpha_<a>/`` (each resumable), the curve to ``<out>/sweep.{json,csv,png}``.
    """
    if job.holdout <= 0:
        raise ValueError("the sweep evaluates on held-out training examples: set holdout > 0")
    if any(a < 0 for a in alphas) or not alphas:
        raise ValueError(f"alphas must be a non-empty list of numbers >= 0, got {alphas}")
    grid = sorted(set([0.0, *map(float, alphas)]))
    job = replace(job, defense="meansparse", split="holdout", meansparse=replace(job.meansparse, alpha=grid[0]))
    model, info, _ = build_defended_model(job)
    x, y = load_examples(job, info)  # job.split is "holdout"
    attacked = _attacked(job, model)
    rows = []
    for alpha in grid:
        set_alpha(model, alpha)
        config = job.attack
        meta = {**_job_meta(replace(job, meansparse=replace(job.meansparse, alpha=alpha)), info, model)}
        result = evaluate(attacked, x, y, config, out_dir=Path(job.out) / f"alpha_{alpha:g}", meta=meta,
                          device=job.device, num_classes=info.num_classes, input_size=info.input_size,
                          progress=job.progress)
        rows.append({"alpha": alpha, "clean_acc": 100 * result.clean_acc,
                     "worst_case_acc": 100 * result.worst_case_acc,
                     **{f"{a}_acc": 100 * v for a, v in result.attack_acc.items()}})
    curve = pd.DataFrame(rows)
    base = {"clean_acc": float(curve.loc[curve["alpha"] == 0.0, "clean_acc"].iloc[0]),
            "worst_case_acc": float(curve.loc[curve["alpha"] == 0.0, "worst_case_acc"].iloc[0])}
    rule = (f"max worst_case_acc on the held-out split subject to clean_acc >= base clean_acc - {max_clean_drop} "
            "points; ties -> smallest alpha")
    chosen = _choose(curve, base["clean_acc"], max_clean_drop)
    result = SweepResult(alphas=grid, curve=rows, base=base, chosen_alpha=chosen, rule=rule)
    out = Path(job.out)
    write_json(out / "sweep.json", result.to_dict())
    with atomic_path(out / "sweep.csv") as tmp:
        curve.to_csv(tmp, index=False)
    from .plots import plot_sweep

    plot_sweep(curve, chosen, base, out / "sweep.png")
    logger.info("sweep: chosen alpha = %s (%s)", chosen, rule)
    return result
