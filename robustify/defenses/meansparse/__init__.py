"""MeanSparse (Amini et al., arXiv 2406.05927): mean-centred per-channel sparsification before activations.

The package: :mod:`.config` (where to insert it, how to calibrate), :mod:`.module` (the operator,
its fused ReLU and its modes), :mod:`.insert` (sites, insert/remove/fuse), :mod:`.calibrate` (the
single statistics pass), :mod:`.state` (save/load in the one defense file format),
:mod:`.published` (the published models' placement) and :mod:`.interop` (RobustBench's modules).
This file is its one registration: every generic stage reaches MeanSparse through these hooks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import nn

from robustify.defenses.base import Defense, DefenseOptions
from robustify.defenses.meansparse.calibrate import calibrate, calibrating
from robustify.defenses.meansparse.config import MeanSparseConfig, check_alpha, parse_site_alpha
from robustify.defenses.meansparse.insert import (fuse_meansparse, insert_meansparse, plan, remove_meansparse,
                                                  unfuse_meansparse)
from robustify.defenses.meansparse.interop import (convert_published_meansparse, find_published_meansparse,
                                                  to_robustbench_meansparse)
from robustify.defenses.meansparse.module import (MeanSparse, MeanSparseReLU, bpda, capture_site_inputs,
                                                  defenses_disabled, in_band, meansparse_modules, set_alpha, soft_bpda)
from robustify.defenses.meansparse.state import load_calibration, save_calibration
from robustify.defenses.file import register_legacy_format
from robustify.defenses.registry import register_defense
from robustify.defenses.sites import register_preset

__all__ = ["MEANSPARSE", "MeanSparse", "MeanSparseConfig", "MeanSparseReLU", "bpda", "calibrate", "calibrating",
           "check_alpha", "convert_published_meansparse", "defenses_disabled", "fuse_meansparse", "insert_meansparse",
           "load_calibration", "meansparse_modules", "parse_site_alpha", "plan", "remove_meansparse",
           "save_calibration", "set_alpha", "soft_bpda", "unfuse_meansparse"]


def _record(model: nn.Module, config: MeanSparseConfig | None) -> dict[str, Any]:
    """``alpha`` (the job's, None when MeanSparse is not the job's defense) and ``meansparse``: the settings in
    force read back from the modules (sites and the per-site thresholds differing from ``alpha``), also for
    MeanSparse that came with the model (RobustBench's published ones: their commonest alpha); None without it."""
    alphas = {site: m.alpha for site, m in meansparse_modules(model).items()}
    if not alphas:
        return {"alpha": config.alpha if config is not None else None, "meansparse": None}
    if config is not None:  # inserted with the job's placement (a file's is checked to match)
        record, alpha = config.to_dict(), config.alpha
    else:
        counts = Counter(alphas.values())
        record, alpha = {}, min(counts, key=lambda a: (-counts[a], a))
    record.update(alpha=alpha, site_alpha={s: a for s, a in alphas.items() if a != alpha}, sites=list(alphas))
    return {"alpha": config.alpha if config is not None else None, "meansparse": record}


def _adopt(model: nn.Module, example: Any) -> nn.Module | None:
    """RobustBench's published MeanSparse modules (``Amini2024MeanSparse_*``) become robustify's (same outputs)."""
    if not find_published_meansparse(model):
        return None
    return convert_published_meansparse(model, example)


def _save(model: nn.Module, path: Any, config: MeanSparseConfig, *, model_info: dict[str, Any] | None = None,
          extra: dict[str, Any] | None = None) -> Any:
    return save_calibration(model, path, config=config, model_info=model_info, extra=extra)


# calibration files written before the one defense format (format "robustify-meansparse", version 1)
register_legacy_format("robustify-meansparse", 1, "meansparse")
register_preset("published", "the published MeanSparse models' modules and positions, per architecture family "
                "(robustify.defenses.meansparse.published; an architecture without a published rule is an error)",
                by_family="robustify.defenses.meansparse.insert.plan")

MEANSPARSE = register_defense(Defense(
    names=("meansparse",),
    config_type=MeanSparseConfig,
    title="MeanSparse",
    plan=lambda model, example, config: plan(model, example, config)[1],
    apply=insert_meansparse,
    remove=remove_meansparse,
    save=_save,
    load=load_calibration,
    modules=meansparse_modules,
    calibrate=calibrate,
    calibration_batch_size=lambda config, requested: config.calibration_batch_size(requested),
    batch_dependent=lambda config: config.stats_mode == "official",
    straight_through=bpda,
    soft_backward=soft_bpda,
    disabled=defenses_disabled,
    site_inputs=capture_site_inputs,
    blocked=in_band,
    options=DefenseOptions(
        fields=("alpha", "site_alpha", "include", "exclude", "outputs", "preset", "skip_se", "channel_dim",
                "stats_mode"),
        defaults=MeanSparseConfig(alpha=0.2),  # the one default of every command (and job) with MeanSparse
        parse={"site_alpha": parse_site_alpha}, choices={"stats_mode": ("exact", "official")},
        group="MeanSparse"),
    meta=_record,
    setting="alpha",
    set_setting=set_alpha,
    adopt=_adopt,
    fuse=fuse_meansparse,
    export=to_robustbench_meansparse,
))
