"""Plots from leaderboard tables: accuracy against each defense's setting (MeanSparse's alpha, from the defense
registry: :mod:`robustify.reporting.settings`), base vs defended bars."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from robustify.core.io import atomic_path
from robustify.core.significance import interval_pct
from robustify.reporting.settings import SettingDefense, setting_columns, setting_defenses, setting_symbol

logger = logging.getLogger(__name__)

__all__ = ["plot_alpha_curves", "plot_base_vs_defended", "plot_setting_curves", "plot_sweep"]

#: the x-axis label of a setting's curves where the bare setting name says too little (the committed
#: leaderboard's plots use this text for MeanSparse's alpha; any other setting is labelled by its name)
SETTING_AXIS_LABELS: dict[str, str] = {"alpha": "alpha (threshold in std units)"}
#: (column, legend label, line style) of each curve against a setting
CURVES = (("clean_acc", "clean", "o-"), ("standard_acc", "standard attacks", "s-"),
          ("worst_case_acc", "worst case (all attacks)", "^-"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def _interval(text: Any, value: float, n: int) -> tuple[float, float]:
    """The row's interval: its ``<x>_ci95`` text (from the exact count), else rebuilt from the percentage
    (exact up to 10,000 examples: the table's percentages have 2 decimals)."""
    if isinstance(text, str) and text.startswith("["):
        lo, hi = (float(v) for v in text.strip("[]").split(","))
        return lo, hi
    return interval_pct(value, n)


def _error_bars(rows: pd.DataFrame, col: str, n: int) -> list[list[float]]:
    """Asymmetric error bars ``[below, above]`` of exact 95% intervals of accuracy column ``col`` (percent)."""
    below, above = [], []
    ci = col[:-4] + "_ci95"
    texts = rows[ci].tolist() if ci in rows.columns else [None] * len(rows)
    for v, text in zip(rows[col].tolist(), texts):
        if pd.isna(v):
            below.append(0.0)
            above.append(0.0)
            continue
        lo, hi = _interval(text, float(v), int(n))
        below.append(max(float(v) - lo, 0.0))
        above.append(max(hi - float(v), 0.0))
    return [below, above]


def _groups(df: pd.DataFrame):  # type: ignore[no-untyped-def]
    return df.groupby(["model", "dataset", "threat_model", "eps", "n_examples"], dropna=False)


def _setting_rows(group: pd.DataFrame, defense: SettingDefense) -> pd.DataFrame:
    """The rows of ``group`` of ``defense`` with a value of its setting, ordered by it."""
    if defense.setting not in group.columns:
        return group.iloc[0:0]
    return group[group["defense"] == defense.name].dropna(subset=[defense.setting]).sort_values(defense.setting)


def _curves_file(defense: SettingDefense, model: str, eps: str, shared: bool) -> str:
    """``<setting>_<model>_<eps>.png`` (with the defense's name after the setting when several defenses of
    the model's group plot against a setting of that name)."""
    parts = [defense.setting, defense.name] if shared else [defense.setting]
    return "_".join([*parts, _slug(str(model)), _slug(str(eps))]) + ".png"


def _plot_curves(rows: pd.DataFrame, base: pd.DataFrame, defense: SettingDefense, n: int, title: str,
                 path: Path) -> Path:
    """Clean and robust accuracy of ``rows`` against ``defense``'s setting, the base row's as dotted lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label, style in CURVES:
        if rows[col].notna().any():
            line = ax.errorbar(rows[defense.setting], rows[col], yerr=_error_bars(rows, col, n), fmt=style,
                               capsize=3, label=f"{defense.title}: {label}").lines[0]
            if not base.empty and pd.notna(base[col].iloc[0]):
                ax.axhline(base[col].iloc[0], color=line.get_color(), ls=":", label=f"base: {label}")
    ax.set_xlabel(SETTING_AXIS_LABELS.get(defense.setting, defense.setting))
    ax.set_ylabel("accuracy (%), 95% exact intervals")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_setting_curves(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Clean and robust accuracy against each registered defense's setting (with two values or more), per
    model, with the base model as lines: ``<setting>_<model>_<eps>.png``."""
    written = []
    for (model, dataset, threat, eps, n), group in _groups(df):
        curves = [(d, rows) for d in setting_defenses() if len(rows := _setting_rows(group, d)) >= 2]
        settings = [d.setting for d, _ in curves]
        base = group[group["defense"] == "none"]
        for defense, rows in curves:
            name = _curves_file(defense, model, eps, shared=settings.count(defense.setting) > 1)
            written.append(_plot_curves(rows, base, defense, n, f"{model} {dataset} {threat} eps={eps}, n={n}",
                                        Path(out_dir) / name))
    return written


#: the former name of :func:`plot_setting_curves` (MeanSparse's alpha was the only setting)
plot_alpha_curves = plot_setting_curves


def _settings_label(row: pd.Series, settings: list[str]) -> str:
    """The row's settings with a value, each on a line of its own (``α=0.2``), or ""."""
    return "".join(f"\n{setting_symbol(s)}={row[s]:g}" for s in settings if pd.notna(row[s]))


def plot_base_vs_defended(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Grouped bars: clean, standard-attack and worst-case accuracy of each row of a model."""
    plt = _plt()
    written = []
    for (model, dataset, threat, eps, n), group in _groups(df):
        if len(group) < 2:
            continue
        settings = setting_columns(group.columns)
        group = group.assign(_base=group["defense"] != "none").sort_values(["_base", "defense", *settings],
                                                                         na_position="first")
        labels = [f"{row['defense']}" + _settings_label(row, settings) for _, row in group.iterrows()]
        if "verdict" in group:  # the paired comparison with the base row (significance.py)
            labels = [lab + (f"\nΔ{d:+.1f} p={p:.2g}" if isinstance(v, str) and v else "")
                      for lab, v, d, p in zip(labels, group["verdict"], group["delta_worst_case"], group["mcnemar_p"])]
        metrics = [("clean_acc", "clean"), ("standard_acc", "standard attacks"), ("worst_case_acc", "worst case")]
        width = 0.8 / len(metrics)
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(group)), 4))
        for i, (col, name) in enumerate(metrics):
            values = group[col].fillna(0).tolist()
            xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(group))]
            ax.bar(xs, values, width, label=name, yerr=_error_bars(group, col, n), capsize=2)
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("accuracy (%), 95% exact intervals")
        ax.set_title(f"{model} {dataset} {threat} eps={eps}, n={n}", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(metrics))
        ax.grid(axis="y", alpha=0.3)
        written.append(_save(fig, Path(out_dir) / f"bars_{_slug(str(model))}_{_slug(str(eps))}.png"))
    return written


def plot_sweep(curve: pd.DataFrame, chosen: float | None, base: dict[str, float], path: str | Path,
               setting: str = "alpha") -> Path:
    """Held-out clean and robust accuracy against the swept ``setting``, with the chosen value marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in (("clean_acc", "clean"), ("worst_case_acc", "robust (worst case)")):
        line, = ax.plot(curve[setting], curve[col], "o-", label=label)
        if col in base:
            ax.axhline(base[col], color=line.get_color(), ls=":", label=f"base {label}")
    if chosen is not None:
        ax.axvline(chosen, color="k", ls="--", label=f"chosen {setting}={chosen:g}")
    ax.set_xlabel(setting)
    ax.set_ylabel("accuracy (%) on the held-out split")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))
