"""The export job: a robustified model and its evaluation in the form RobustBench accepts.

``robustify export`` (and :func:`export_robustbench`) writes into ``out``:

* ``model.pt``: the state dict of RobustBench's own MeanSparse class for the model's architecture (the
  defense's ``export`` hook; MeanSparse: ``running_mean``, ``running_var``, ``threshold`` per site, read by
  ``robustbench.utils.load_model`` as a checkpoint), and ``model.json``: that class and its constructor arguments;
* ``model_info.json``: RobustBench's ``model_info`` of the evaluation (``external``/``footnote`` when it was not
  AutoAttack's standard evaluation), when an evaluation's results directory is given;
* ``adversarial.pt``: that evaluation's worst-case adversarial examples, one per evaluated test example (the
  evaluation must have kept them: ``robustify evaluate --keep-adversarial``).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robustify import defenses
from robustify.core.config import SerializableConfig
from robustify.core.errors import UserError
from robustify.core.io import atomic_path, write_json
from robustify.defenses.file import read_sidecar, saved_defense
from robustify.evaluation.engine import ADVERSARIAL_FILE
from robustify.evaluation.results import read_result_file
from robustify.jobs.evaluate import CALIBRATION_FILE, EvaluationJob, build_defended_model

logger = logging.getLogger(__name__)

__all__ = ["ExportJob", "export_robustbench"]

MODEL_FILE = "model.pt"
MODEL_INFO_FILE = "model_info.json"


@dataclass
class ExportJob(SerializableConfig):
    """What to export to RobustBench (:func:`export_robustbench`); the CLI's flags are made from these fields.

    Attributes:
        results: an evaluation's results directory (``robustify evaluate --out``): its model, weights and
            defense file are exported, with its ``model_info`` and kept adversarial examples.
        model: the model (robustbench:NAME, ...), when no results directory gives it.
        defense_weights: the defense's file (``robustify calibrate``), when no results directory gives it.
        dataset: the model's leaderboard (cifar10, cifar100, imagenet), when no results directory gives it.
        threat_model: Linf, L2 or corruptions, when no results directory gives it.
        weights: the base model's checkpoint, when no results directory gives it.
        pretrained: download pretrained weights (unless a weights file is given).
        cache_dir: where downloads are cached (None: $ROBUSTIFY_CACHE or ~/.cache/robustify).
        device: torch device.
        out: the export directory.

    Examples:
        >>> job = rb.ExportJob(results="runs/wrn70", out="runs/wrn70-rb")
        >>> job.results, job.out, job.device
        ('runs/wrn70', 'runs/wrn70-rb', 'cpu')
    """

    results: str | None = None
    model: str | None = None
    defense_weights: str | None = None
    dataset: str | None = None
    threat_model: str | None = None
    weights: str | None = None
    pretrained: bool = True
    cache_dir: str | None = None
    device: str = "cpu"
    out: str = "runs/export"


def _from_results(job: ExportJob) -> tuple[EvaluationJob, dict[str, Any] | None]:
    """The evaluation job that rebuilds the robustified model, and the evaluation's result (if given)."""
    result = read_result_file(job.results) if job.results else None
    meta = (result or {}).get("meta", {})
    defense_weights = job.defense_weights or meta.get("defense_weights")
    if defense_weights is None and job.results and (Path(job.results) / CALIBRATION_FILE).is_file():
        defense_weights = str(Path(job.results) / CALIBRATION_FILE)
    model = job.model or meta.get("model")
    if not model or not defense_weights:
        raise UserError("export needs the robustified model: an evaluation's results directory (--results DIR) or "
                        "--model SPEC with --defense-weights FILE")
    defense = saved_defense(defense_weights)
    if defense is None:
        raise UserError(f"{defense_weights!r} is not a defense file (no robustify sidecar)")
    evaluation = EvaluationJob(
        model=model, defense=defense, defense_weights=defense_weights,
        defense_config=read_sidecar(defense_weights).get("config"),  # the file's own settings
        dataset=job.dataset or meta.get("dataset", "cifar10"),
        threat_model=job.threat_model or meta.get("threat_model") or _threat_of(result) or "Linf",
        weights=job.weights or meta.get("weights"), pretrained=job.pretrained, cache_dir=job.cache_dir,
        device=job.device, progress=False)
    return evaluation, result


def _threat_of(result: dict[str, Any] | None) -> str | None:
    norm = (result or {}).get("config", {}).get("norm")
    return norm if norm in ("Linf", "L2") else None


def _model_info(result: dict[str, Any]) -> dict[str, Any]:
    from robustify.reporting.leaderboard import build_table, model_info

    return model_info(build_table([result]).iloc[0])


def _copy_adversarial(results: Path, result: dict[str, Any], out: Path) -> Path:
    name = result.get("adversarial")
    source = results / (name or ADVERSARIAL_FILE)
    if not name or not source.is_file():
        raise UserError(f"{str(results)!r} has no adversarial examples: evaluate with --keep-adversarial "
                        "(RobustBench's external evaluations ask for them)")
    adv = torch.load(source, map_location="cpu", weights_only=True)
    if adv.shape[0] != result["n_examples"]:
        raise UserError(f"{str(source)!r} holds {adv.shape[0]} examples, the evaluation {result['n_examples']}")
    target = out / ADVERSARIAL_FILE
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def export_robustbench(job: ExportJob) -> dict[str, Path]:
    """Write the robustified model in RobustBench's format (and, from an evaluation, its ``model_info`` and
    adversarial examples) into ``job.out``.

    ``model.pt`` is the state dict of RobustBench's own class for the defended architecture (MeanSparse:
    ``running_mean``, ``running_var``, ``threshold`` per site; it loads strictly, with the same logits) and
    ``model.json`` names that class and its constructor arguments.

    Args:
        job: what to export: an evaluation's results directory (``robustify evaluate --out``, with
            ``--keep-adversarial`` for ``adversarial.pt``), or a model and its defense file.

    Returns:
        The files written by kind: ``model``, ``class`` and, from an evaluation, ``model_info`` and ``adversarial``.

    Raises:
        UserError: no robustified model is given, no defense in it offers an export to RobustBench's format
            (MeanSparse on ``dm-wrn`` models placed with ``preset="published"`` does), or the evaluation kept no
            adversarial examples.

    Examples:
        >>> written = rb.export_robustbench(rb.ExportJob(results="runs/wrn70", out="runs/wrn70-rb"))  # doctest: +SKIP
        >>> sorted(written)  # doctest: +SKIP
        ['adversarial', 'class', 'model', 'model_info']
        >>> rb.export_robustbench(rb.ExportJob(out="runs/nothing"))
        Traceback (most recent call last):
        ...
        robustify.core.errors.UserError: export needs the robustified model: ...
    """
    evaluation, result = _from_results(job)
    model, info, _ = build_defended_model(evaluation)
    exporters = defenses.with_hook(model, "export")
    if not exporters:
        raise UserError(f"no defense in the model offers an export to RobustBench's format "
                        f"(defenses offering it: {list(defenses.defense_names(hook='export'))})")
    target, state = exporters[0].export(model, info.example_input(device=job.device))  # type: ignore[misc]
    out = Path(job.out)
    written: dict[str, Path] = {"model": out / MODEL_FILE, "class": out / "model.json"}
    with atomic_path(written["model"]) as tmp:
        torch.save(state, tmp)
    cls = type(target)
    write_json(written["class"], {"class": f"{cls.__module__}.{cls.__qualname__}",
                                  "arguments": getattr(target, "robustify_arguments", {}),
                                  "model": evaluation.model, "defense_weights": evaluation.defense_weights})
    if result is not None:
        written["model_info"] = out / MODEL_INFO_FILE
        write_json(written["model_info"], _model_info(result))
        written["adversarial"] = _copy_adversarial(Path(job.results), result, out)  # type: ignore[arg-type]
    logger.info("exported %s to %s (%s)", evaluation.model, out, ", ".join(p.name for p in written.values()))
    return written
