"""The sweep job: calibrate once, evaluate a grid of a defense's setting on held-out data, pick one by a rule.

The setting is the one the defense registers (:attr:`robustify.defenses.Defense.setting`, changed in place
by its ``set_setting`` hook without recalibrating: MeanSparse's ``alpha``); its value 0 must leave the
model as it was (the base model: the sweep's reference).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from robustify import defenses
from robustify.core.errors import UserError
from robustify.core.io import atomic_path, write_json
from robustify.evaluation.engine import evaluate
from robustify.jobs.evaluate import EvaluationJob, _attacked, _job_meta, build_defended_model, load_examples

logger = logging.getLogger(__name__)

__all__ = ["SweepResult", "sweep", "sweep_alpha"]


@dataclass
class SweepResult:
    """The held-out curve over the setting's values and the value the rule picked."""

    setting: str
    values: list[float]
    curve: list[dict[str, Any]]
    base: dict[str, float]
    chosen: float | None
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _choose(curve: pd.DataFrame, setting: str, base_clean: float, max_clean_drop: float) -> float | None:
    ok = curve[curve["clean_acc"] >= base_clean - max_clean_drop]
    if ok.empty:
        return None
    best = ok["worst_case_acc"].max()
    return float(ok[ok["worst_case_acc"] == best][setting].min())


def sweep(job: EvaluationJob, values: list[float], max_clean_drop: float = 0.5) -> SweepResult:
    """Calibrate once, evaluate every value of the job defense's setting on the held-out split, pick one.

    Rule: the highest worst-case robust accuracy among the values whose clean accuracy is within
    ``max_clean_drop`` points of the base model's (ties: the smallest value). The value 0 (the base
    model) is always evaluated as the reference. Results go to ``<out>/<setting>_<value>/`` (each
    resumable), the curve to ``<out>/sweep.{json,csv,png}``.

    Args:
        job: the evaluation to repeat (its ``holdout`` examples are the ones evaluated; ``out`` holds every run).
        values: the values of the defense's setting (MeanSparse: alpha) to evaluate; 0 is added.
        max_clean_drop: the rule's largest clean-accuracy drop from the base model, in points.

    Returns:
        The ``SweepResult``: ``setting``, ``values``, the ``curve``, the ``base`` figures, the ``chosen`` value.

    Examples:
        >>> from robustify.attacks import AttackConfig
        >>> job = rb.EvaluationJob(model="aa-resnet18", weights="../shared/models/resnet18_at_relu.pt",
        ...                        data="../shared/data/cifar10_subset.npz", defense="meansparse", holdout=8,
        ...                        n_examples=8, n_calib=64, attack=AttackConfig(attacks=("apgd-ce",), apgd_iters=1),
        ...                        out="runs/sweep", progress=False)
        >>> found = rb.sweep(job, [0.2])
        >>> found.setting, found.values
        ('alpha', [0.0, 0.2])
    """
    if job.defense == "none":
        raise UserError("the sweep varies a defense's setting: give the job a defense")
    defense = defenses.get_defense(job.defense)
    if defense.setting is None or defense.set_setting is None:
        raise UserError(f"defense {job.defense!r} registers no setting to sweep")
    name = defense.setting
    if job.holdout <= 0:
        raise UserError("the sweep evaluates on held-out training examples: set holdout > 0")
    if any(v < 0 for v in values) or not values:
        raise UserError(f"{name} values must be a non-empty list of numbers >= 0, got {values}")
    grid = sorted(set([0.0, *map(float, values)]))
    job = replace(job, split="holdout", defense_config=replace(job.defense_config, **{name: grid[0]}))
    model, info, _ = build_defended_model(job)
    x, y = load_examples(job, info)  # job.split is "holdout"
    attacked = _attacked(job, model)
    rows = []
    for value in grid:
        defense.set_setting(model, value)
        meta = _job_meta(replace(job, defense_config=replace(job.defense_config, **{name: value})), info, model)
        result = evaluate(attacked, x, y, job.attack, out_dir=Path(job.out) / f"{name}_{value:g}", meta=meta,
                          device=job.device, num_classes=info.num_classes, input_size=info.input_size,
                          progress=job.progress)
        rows.append({name: value, "clean_acc": 100 * result.clean_acc, "worst_case_acc": 100 * result.worst_case_acc,
                     **{f"{a}_acc": 100 * v for a, v in result.attack_acc.items()}})
    curve = pd.DataFrame(rows)
    reference = curve[name] == 0.0
    base = {"clean_acc": float(curve.loc[reference, "clean_acc"].iloc[0]),
            "worst_case_acc": float(curve.loc[reference, "worst_case_acc"].iloc[0])}
    rule = (f"max worst_case_acc on the held-out split subject to clean_acc >= base clean_acc - {max_clean_drop} "
            f"points; ties -> smallest {name}")
    chosen = _choose(curve, name, base["clean_acc"], max_clean_drop)
    result = SweepResult(setting=name, values=grid, curve=rows, base=base, chosen=chosen, rule=rule)
    out = Path(job.out)
    write_json(out / "sweep.json", result.to_dict())
    with atomic_path(out / "sweep.csv") as tmp:
        curve.to_csv(tmp, index=False)
    from robustify.reporting.plots import plot_sweep

    plot_sweep(curve, chosen, base, out / "sweep.png", setting=name)
    logger.info("sweep: chosen %s = %s (%s)", name, chosen, rule)
    return result


def sweep_alpha(job: EvaluationJob, alphas: list[float], max_clean_drop: float = 0.5) -> SweepResult:
    """Deprecated: :func:`sweep` (the setting is the defense's own)."""
    import warnings

    warnings.warn("sweep_alpha is deprecated: use robustify.sweep (the setting is the defense's own)",
                  DeprecationWarning, stacklevel=2)
    return sweep(job, alphas, max_clean_drop)
