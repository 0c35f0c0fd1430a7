"""Save and load only the inserted state (PEFT-style adapters): the calibrated statistics.

A calibration file is a safetensors file with keys ``<site>.mean`` and ``<site>.var``
(float32, one value per channel) plus a JSON sidecar ``<file>.json`` with the model spec,
the insertion config and the site list. Loading re-inserts MeanSparse with the saved
config, checks that the sites and channel counts match, and sets the statistics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import MeanSparseConfig
from .insert import insert_meansparse
from .io import atomic_path, write_json
from .meansparse import meansparse_modules

logger = logging.getLogger(__name__)

__all__ = ["StateMismatchError", "load_calibration", "save_calibration", "sidecar_path"]

FORMAT = "robustify-meansparse"
FORMAT_VERSION = 1


class StateMismatchError(ValueError):
    """Saved state does not fit the model, or the file is unreadable."""


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_calibration(
    model: nn.Module,
    path: str | Path,
    *,
    config: MeanSparseConfig,
    model_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the calibrated MeanSparse state of ``model`` to ``path`` (+ JSON sidecar)."""
    modules = meansparse_modules(model)
    if not modules:
        raise ValueError("the model has no MeanSparse modules to save")
    uncalibrated = [s for s, m in modules.items() if not m.calibrated]
    if uncalibrated:
        raise ValueError(f"MeanSparse site(s) {uncalibrated[:5]} are not calibrated; nothing saved")
    tensors: dict[str, torch.Tensor] = {}
    for site, m in modules.items():
        tensors[f"{site}.mean"] = m.mean.detach().cpu().float().contiguous()
        tensors[f"{site}.var"] = m.var.detach().cpu().float().contiguous()
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "robustify_version": __version__,
        "model": model_info or {},
        "config": config.to_dict(),
        "sites": [
            {
                "name": site,
                "channels": m.channels,
                "channel_dim": m.channel_dim,
                "ndim": m.ndim,
                "alpha": m.alpha,
                "count": m.moments.count,
            }
            for site, m in modules.items()
        ],
        **(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    write_json(sidecar_path(path), sidecar)
    logger.info("saved %d MeanSparse site(s) to %s", len(modules), path)
    return path


def read_calibration(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check a calibration file and its sidecar."""
    path = Path(path)
    side = sidecar_path(path)
    for p in (path, side):
        if not p.is_file():
            raise StateMismatchError(f"calibration file {str(p)!r} does not exist")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise StateMismatchError(f"{str(side)!r} is not valid JSON (truncated or corrupted): {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateMismatchError(f"{str(side)!r} is not a robustify MeanSparse calibration sidecar")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StateMismatchError(f"{str(side)!r} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateMismatchError(f"cannot read {str(path)!r} (truncated or corrupted safetensors file): {exc}") from exc
    return tensors, meta


def load_calibration(model: nn.Module, path: str | Path, example: torch.Tensor) -> nn.Module:
    """Insert MeanSparse as saved in ``path`` into a fresh ``model`` and restore its statistics.

    Returns the model to use (see :func:`robustify.insert_meansparse`). Refuses, with a
    message naming the difference, a model whose sites or channel counts do not match.
    """
    tensors, meta = read_calibration(path)
    config = MeanSparseConfig.from_dict(meta["config"])
    saved_model = meta.get("model") or {}
    try:
        model = insert_meansparse(model, example, config)
    except ValueError as exc:
        raise StateMismatchError(f"{str(path)!r} does not fit this model: {exc}") from exc
    modules = meansparse_modules(model)
    saved_sites = {s["name"]: s for s in meta["sites"]}
    missing = sorted(set(saved_sites) - set(modules))
    unexpected = sorted(set(modules) - set(saved_sites))
    if missing or unexpected:
        raise StateMismatchError(
            f"{str(path)!r} does not fit this model (saved for {saved_model.get('spec', 'another model')}): "
            f"{len(missing)} saved site(s) not in the model (e.g. {missing[:3]}), "
            f"{len(unexpected)} model site(s) not in the file (e.g. {unexpected[:3]})"
        )
    for site, m in modules.items():
        mean, var = tensors.get(f"{site}.mean"), tensors.get(f"{site}.var")
        if mean is None or var is None:
            raise StateMismatchError(f"{str(path)!r} lacks the tensors of site {site!r}")
        if mean.numel() != m.channels or saved_sites[site]["channels"] != m.channels:
            raise StateMismatchError(
                f"{str(path)!r} does not fit this model: site {site!r} has {m.channels} channels, "
                f"the file has {mean.numel()}"
            )
        m.set_statistics(mean, var)
        m.alpha = saved_sites[site].get("alpha", config.alpha)
        m.moments.count = int(saved_sites[site].get("count", 0))
    logger.info("loaded %d MeanSparse site(s) from %s", len(modules), path)
    return model
