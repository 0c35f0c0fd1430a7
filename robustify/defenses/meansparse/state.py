"""Save and load only the inserted state (PEFT-style adapters): the calibrated statistics.

A calibration file is a defense file (:mod:`robustify.defenses.file`) with keys
``<site>.mean`` and ``<site>.var`` (float32, one value per channel); its JSON sidecar
``<file>.json`` holds the model spec, the insertion config, the site list and the digest.
Loading re-inserts MeanSparse with the saved config, checks that the sites and channel
counts match, and sets the statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustify.core.errors import UserError
from robustify.defenses.meansparse.config import MeanSparseConfig
from robustify.defenses.file import content_digest, read_defense_file, saved_defense, sidecar_path, write_defense_file
from robustify.core.errors import InsertionError, StateMismatchError
from robustify.defenses.meansparse.insert import insert_meansparse, plan, remove_meansparse
from robustify.defenses.meansparse.module import meansparse_modules

logger = logging.getLogger(__name__)

__all__ = [
    "StateMismatchError",
    "content_digest",
    "is_calibration_file",
    "load_calibration",
    "read_calibration",
    "save_calibration",
    "sidecar_path",
]


def save_calibration(
    model: nn.Module,
    path: str | Path,
    *,
    config: MeanSparseConfig,
    model_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the calibrated MeanSparse state of ``model`` to ``path`` (+ JSON sidecar).

    The one defense file format (:mod:`robustify.defenses.file`): tensors ``<site>.mean`` and
    ``<site>.var``, a sidecar with the config, the sites and the tensors' content digest, so a
    pair left inconsistent by a crash between the two writes is refused on load instead of being
    silently mixed. The same state gives byte-identical files.
    """
    modules = meansparse_modules(model)
    if not modules:
        raise UserError("the model has no MeanSparse modules to save")
    uncalibrated = [s for s, m in modules.items() if not m.calibrated]
    if uncalibrated:
        raise UserError(f"MeanSparse site(s) {uncalibrated[:5]} are not calibrated; nothing saved")
    tensors: dict[str, torch.Tensor] = {}
    for site, m in modules.items():
        tensors[f"{site}.mean"] = m.mean.float()
        tensors[f"{site}.var"] = m.var.float()
    sites = [
        {"name": site, "channels": m.channels, "channel_dim": m.channel_dim, "ndim": m.ndim, "alpha": m.alpha,
         "count": m.moments.count}
        for site, m in modules.items()
    ]
    write_defense_file(path, tensors, defense="meansparse", config=config, sites=sites, model_info=model_info,
                       extra=extra)
    logger.info("saved %d MeanSparse site(s) to %s", len(modules), path)
    return Path(path)


def is_calibration_file(path: str | Path) -> bool:
    """True when ``path`` has the JSON sidecar of a MeanSparse calibration file."""
    return saved_defense(path) == "meansparse"


def read_calibration(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check a calibration file and its sidecar (format, integrity, pairing)."""
    return read_defense_file(path, "meansparse")


def _placement(config: MeanSparseConfig) -> str:
    return (f"include={list(config.include)}, exclude={list(config.exclude)}, preset={config.preset!r}, "
            f"skip_se={config.skip_se}")


def _check_job(path: Path, saved: MeanSparseConfig, job: MeanSparseConfig, sites: set[str], selected: set[str]) -> None:
    """Refuse a job whose placement or stats mode the file cannot honour (one line)."""
    if job.stats_mode != saved.stats_mode:
        raise StateMismatchError(
            f"{str(path)!r} holds stats_mode={saved.stats_mode!r} statistics, the job asks for {job.stats_mode!r}: "
            "ask for the file's mode or calibrate again"
        )
    if sites != selected:
        extra, left_out = sorted(selected - sites), sorted(sites - selected)
        parts = [f"selects {len(extra)} site(s) the file lacks (e.g. {extra[:3]})"] if extra else []
        parts += [f"leaves out {len(left_out)} of the file's site(s) (e.g. {left_out[:3]})"] if left_out else []
        raise StateMismatchError(
            f"{str(path)!r} was calibrated for another placement ({_placement(saved)}): the job's "
            f"({_placement(job)}) {' and '.join(parts)}; ask for the file's placement or calibrate again"
        )


def _restore(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    config: MeanSparseConfig,
    path: Path,
    job: MeanSparseConfig | None = None,
) -> None:
    """Check the inserted sites against the file and set their statistics (and the file's
    thresholds, unless a ``job``'s were inserted)."""
    saved_model = meta.get("model") or {}
    modules = meansparse_modules(model)
    saved_sites = {s["name"]: s for s in meta["sites"]}
    if job is not None:
        _check_job(path, config, job, set(saved_sites), set(modules))
    missing = sorted(set(saved_sites) - set(modules))
    unexpected = sorted(set(modules) - set(saved_sites))
    if missing or unexpected:
        raise StateMismatchError(
            f"{str(path)!r} does not fit this model (saved for {saved_model.get('spec', 'another model')}): "
            f"{len(missing)} saved site(s) not in the model (e.g. {missing[:3]}), "
            f"{len(unexpected)} model site(s) not in the file (e.g. {unexpected[:3]})"
        )
    for site, m in modules.items():
        saved = saved_sites[site]
        mean, var = tensors.get(f"{site}.mean"), tensors.get(f"{site}.var")
        if mean is None or var is None:
            raise StateMismatchError(f"{str(path)!r} lacks the tensors of site {site!r}")
        if mean.numel() != m.channels or var.numel() != m.channels or saved["channels"] != m.channels:
            raise StateMismatchError(
                f"{str(path)!r} does not fit this model: site {site!r} has {m.channels} channels, "
                f"the file has {mean.numel()}"
            )
        if saved.get("channel_dim", m.channel_dim) != m.channel_dim:
            raise StateMismatchError(
                f"{str(path)!r} does not fit this model: site {site!r} has its channels on dim {m.channel_dim}, "
                f"the file on dim {saved['channel_dim']}"
            )
        try:
            m.set_statistics(mean, var)
            if job is None:
                m.alpha = saved.get("alpha", config.alpha)
        except (TypeError, ValueError) as exc:
            raise StateMismatchError(f"{str(path)!r} holds unusable statistics: {exc}") from exc
        m.moments.count = int(saved.get("count", 0))


def load_calibration(
    model: nn.Module, path: str | Path, example: torch.Tensor, config: MeanSparseConfig | None = None
) -> nn.Module:
    """Insert MeanSparse as saved in ``path`` into a fresh ``model`` and restore its statistics.

    Returns the model to use (see :func:`robustify.insert_meansparse`). Refuses, with a
    message naming the difference, a model whose sites or channel counts do not match, and
    damaged or mismatched files; on refusal ``model`` is left without MeanSparse modules.

    ``config`` (a job's settings) is inserted instead of the file's: its thresholds
    (``alpha``, ``site_alpha``) are applied, and a placement that selects other sites than
    the file's, or another ``stats_mode``, is refused. Without it, the file's config and
    per-site thresholds are restored.
    """
    path = Path(path)
    tensors, meta = read_calibration(path)
    try:
        saved = MeanSparseConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise StateMismatchError(f"{str(path)!r} has an unusable insertion config: {exc}") from exc
    try:
        prepared = insert_meansparse(model, example, config or saved)
    except ValueError as exc:
        if config is not None and isinstance(exc, InsertionError):
            raise  # the job's own settings select nothing or name unknown sites
        raise StateMismatchError(f"{str(path)!r} does not fit this model: {exc}") from exc
    try:
        _restore(prepared, tensors, meta, saved, path, job=config)
    except BaseException:
        remove_meansparse(prepared)
        raise
    logger.info("loaded %d MeanSparse site(s) from %s", len(meansparse_modules(prepared)), path)
    return prepared
