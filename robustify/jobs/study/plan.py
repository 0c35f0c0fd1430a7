"""The expanded study: one cell (an evaluation) per model x defense setting x attack, and the steps that make them.

A step is a calibration (once per model, defense placement and calibration data: every value of the defense's
registered ``setting`` reuses it) or an evaluation (one cell, after its calibration). Nothing here runs a step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from robustify import defenses
from robustify.core.config import untagged
from robustify.core.errors import UserError, first_line
from robustify.jobs.evaluate import EvaluationJob
from robustify.jobs.study.spec import DefenseSpec, ModelSpec, Study, StudyFileError

__all__ = ["CALIBRATE", "EVALUATE", "Cell", "Plan", "Step", "plan_study", "result_mismatch"]

CALIBRATE, EVALUATE = "calibrate", "evaluate"
#: below the study's output directory
RESULTS_DIR, STATE_DIR = "results", "study"


@dataclass(frozen=True)
class Cell:
    """One evaluation of the study: its results directory (below ``<out>/results``) and its job."""

    id: str
    model: str
    defense: str
    attack: str
    settings: tuple[tuple[str, Any], ...]
    job: EvaluationJob
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def out(self) -> Path:
        return Path(self.job.out)


@dataclass(frozen=True)
class Step:
    """One unit of work: a calibration (``job`` is the calibration's model and defense, ``path`` its file) or the
    evaluation of ``cell``; it runs after the steps of ``deps``."""

    id: str
    kind: str
    job: EvaluationJob
    deps: tuple[str, ...] = ()
    cell: str | None = None
    path: str | None = None

    @property
    def file_name(self) -> str:
        return self.id.replace("/", "__").replace(":", "-")


@dataclass(frozen=True)
class Plan:
    study: Study
    out: Path
    cells: tuple[Cell, ...]
    steps: tuple[Step, ...]

    def step(self, step_id: str) -> Step:
        return next(s for s in self.steps if s.id == step_id)

    def cell_step(self, cell: Cell) -> Step:
        return self.step(f"{EVALUATE}:{cell.id}")

    @property
    def state_dir(self) -> Path:
        return self.out / STATE_DIR


def _label(spec: DefenseSpec, settings: dict[str, Any]) -> str:
    """The ``{defense}`` of a cell's directory: ``meansparse_0.1`` for the registered setting's value, else
    ``NAME_key-value`` per grid key."""
    parts = [spec.name]
    setting = defenses.get_defense(spec.defense).setting if spec.defense != "none" else None
    for k, v in settings.items():
        text = f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
        parts.append(text if k == setting else f"{k}-{text}")
    return "_".join(parts)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _job(study: Study, model: ModelSpec, out: Path, cell_id: str) -> EvaluationJob:
    job = dict(study.job)
    if model.data is not None:
        job["data"] = model.data
    return EvaluationJob(model=model.model, weights=model.weights, dataset=model.dataset,
                         threat_model=model.threat_model, pretrained=model.pretrained, progress=False,
                         out=str(out / RESULTS_DIR / cell_id), **job)


def _calibration_key(job: EvaluationJob, defense: defenses.Defense) -> dict[str, Any]:
    """What a calibration depends on: the model, the data and the defense's config less its setting."""
    config = untagged(job.defense_config.to_dict())
    if defense.setting:
        config.pop(defense.setting, None)
    return {"model": job.model, "weights": job.weights, "dataset": job.dataset, "threat_model": job.threat_model,
            "data": job.data, "holdout": job.holdout, "n_calib": job.n_calib, "batch": job.calib_batch_size,
            "defense": job.defense, "config": config}


def plan_study(study: Study, out: str | Path) -> Plan:
    """Expand ``study`` into its cells and steps, with results below ``out``."""
    out = Path(out)
    cells: list[Cell] = []
    steps: dict[str, Step] = {}
    calibrations: dict[str, str] = {}  # calibration file -> its key's digest (one file, one calibration)
    for model in study.models:
        for spec in study.defenses:
            for settings in spec.settings():
                label = _label(spec, settings)
                for attack in study.attacks:
                    cell_id = study.cell_dir.format(model=model.name, defense=label, attack=attack.name)
                    job = _job(study, model, out, cell_id)
                    job = replace(job, attack=attack.config(model, study.seed))
                    deps: tuple[str, ...] = ()
                    if spec.defense != "none":
                        defense = defenses.get_defense(spec.defense)
                        config = defense.default_config(spec.defense)
                        config = type(config).from_dict({**config.to_dict(), **dict(spec.options), **settings})
                        job = replace(job, defense=spec.defense, defense_config=config, defense_weights=spec.weights)
                        if spec.weights is None and defense.trainable:
                            raise StudyFileError(
                                f"study file {study.path!r}: defenses: defense {spec.defense!r} is trained: give its "
                                "file as weights = \"FILE\" (made by `robustify train`)")
                        if spec.weights is None and defense.calibrate is not None:
                            step = _calibration_step(study, job, defense, spec, model, out, calibrations)
                            steps.setdefault(step.id, step)
                            job = replace(job, defense_weights=step.path)
                            deps = (step.id,)
                    if any(c.id == cell_id for c in cells):
                        raise StudyFileError(f"study file {study.path!r}: study.cell_dir: two cells are both "
                                             f"{cell_id!r}; put {{model}}, {{defense}} and {{attack}} in it")
                    cells.append(Cell(id=cell_id, model=model.name, defense=label, attack=attack.name,
                                      settings=tuple(settings.items()), job=job, options=spec.options))
                    step_id = f"{EVALUATE}:{cell_id}"
                    steps[step_id] = Step(id=step_id, kind=EVALUATE, job=job, deps=deps, cell=cell_id)
    return Plan(study=study, out=out, cells=tuple(cells), steps=tuple(steps.values()))


def _calibration_step(study: Study, job: EvaluationJob, defense: defenses.Defense, spec: DefenseSpec,
                      model: ModelSpec, out: Path, calibrations: dict[str, str]) -> Step:
    key = _calibration_key(job, defense)
    digest = _digest(key)
    path = spec.calibration or str(out / STATE_DIR / "calibrations" / f"{model.name}-{spec.name}-{digest}.safetensors")
    if calibrations.setdefault(path, digest) != digest:
        raise StudyFileError(f"study file {study.path!r}: defenses: calibration {path!r} would hold two different "
                             "calibrations (the grid changes the placement): leave calibration out")
    step_id = f"{CALIBRATE}:{model.name}-{spec.name}-{digest}"
    return Step(id=step_id, kind=CALIBRATE, job=replace(job, out=str(Path(path).parent)), path=path)


# ------------------------------------------------------------------------------------------
# is a result.json this cell's?
# ------------------------------------------------------------------------------------------
def _recorded_config(meta: dict[str, Any], config: Any) -> dict[str, Any] | None:
    """The defense config a result's meta records (a dict tagged with the config's type), if any."""
    name = type(config).__name__
    for value in meta.values():
        if isinstance(value, dict) and value.get("_type") == name:
            return value
    return None


def result_mismatch(cell: Cell, result: dict[str, Any]) -> str | None:
    """Why ``result`` (a result.json) is not the finished result of ``cell`` (None: it is)."""
    job, meta = cell.job, result.get("meta", {})
    if not result.get("finished"):
        return "not finished"
    wanted = {"model": job.model, "defense": job.defense, "data": job.data, "split": job.split,
              "weights": job.weights, "defense_weights": job.defense_weights}
    for k, v in wanted.items():
        if meta.get(k) != v:
            return f"meta.{k} is {meta.get(k)!r}, the cell's is {v!r}"
    if result.get("n_examples") != job.n_examples:
        return f"n_examples is {result.get('n_examples')}, the cell's is {job.n_examples}"
    config = result.get("config", {})
    try:  # read as the config reads its files: a field added after the result was written takes its default
        saved = untagged(type(job.attack).from_dict(config).to_dict())
    except (UserError, TypeError, ValueError) as e:
        return f"its attack config cannot be read ({first_line(e)})"
    mine = untagged(job.attack.to_dict())
    ran, asked = list(config.get("attacks", [])), list(mine.pop("attacks"))
    saved.pop("attacks", None)
    if saved != mine:
        return "attack settings differ: " + ", ".join(sorted(k for k in set(saved) | set(mine)
                                                            if saved.get(k) != mine.get(k)))
    skipped = set(meta.get("not_applicable", {}))
    if [a for a in asked if a not in skipped] != list(ran):
        return f"attacks {ran} ran, the cell asks for {asked}"
    if job.defense_config is not None:  # the settings the file gives (a defense file brings the rest)
        recorded = _recorded_config(meta, job.defense_config)
        if recorded is not None:
            mine_cfg = json.loads(json.dumps(untagged(job.defense_config.to_dict())))
            for k in dict((*cell.options, *cell.settings)):
                v = mine_cfg.get(k)
                if recorded.get(k) != v:
                    return f"defense setting {k} is {recorded[k]!r}, the cell's is {v!r}"
    return None
