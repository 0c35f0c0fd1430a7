"""Plots from leaderboard tables only (no torch): accuracy vs alpha, base vs defended bars."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from robustify.core.io import atomic_path
from robustify.core.significance import interval_pct

logger = logging.getLogger(__name__)

__all__ = ["plot_alpha_curves", "plot_base_vs_defended", "plot_sweep"]


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


def _error_bars(values: list[float], n: int) -> list[list[float]]:
    """Asymmetric error bars ``[below, above]`` of exact 95% intervals (accuracies in percent)."""
    below, above = [], []
    for v in values:
        if pd.isna(v):
            below.append(0.0)
            above.append(0.0)
            continue
        lo, hi = interval_pct(float(v), int(n))
        below.append(max(float(v) - lo, 0.0))
        above.append(max(hi - float(v), 0.0))
    return [below, above]


def _groups(df: pd.DataFrame):  # type: ignore[no-untyped-def]
    return df.groupby(["model", "dataset", "threat_model", "eps", "n_examples"], dropna=False)


def plot_alpha_curves(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Clean and robust accuracy against alpha, per model, with the base model as lines."""
    plt = _plt()
    written = []
    for (model, dataset, threat, eps, n), group in _groups(df):
        ms = group[group["defense"] == "meansparse"].dropna(subset=["alpha"]).sort_values("alpha")
        if len(ms) < 2:
            continue
        base = group[group["defense"] == "none"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for col, label, style in (("clean_acc", "clean", "o-"), ("standard_acc", "standard attacks", "s-"),
                                  ("worst_case_acc", "worst case (all attacks)", "^-")):
            if ms[col].notna().any():
                line = ax.errorbar(ms["alpha"], ms[col], yerr=_error_bars(ms[col].tolist(), n), fmt=style,
                                   capsize=3, label=f"MeanSparse: {label}").lines[0]
                if not base.empty and pd.notna(base[col].iloc[0]):
                    ax.axhline(base[col].iloc[0], color=line.get_color(), ls=":", label=f"base: {label}")
        ax.set_xlabel("alpha (threshold in std units)")
        ax.set_ylabel("accuracy (%), 95% exact intervals")
        ax.set_title(f"{model} {dataset} {threat} eps={eps}, n={n}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, Path(out_dir) / f"alpha_{_slug(str(model))}_{_slug(str(eps))}.png"))
    return written


def plot_base_vs_defended(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Grouped bars: clean, standard-attack and worst-case accuracy of each row of a model."""
    plt = _plt()
    written = []
    for (model, dataset, threat, eps, n), group in _groups(df):
        if len(group) < 2:
            continue
        group = group.assign(_base=group["defense"] != "none").sort_values(["_base", "defense", "alpha"],
                                                                         na_position="first")
        labels = [f"{d}" + (f"\nα={a:g}" if pd.notna(a) else "") for d, a in zip(group["defense"], group["alpha"])]
        if "verdict" in group:  # the paired comparison with the base row (significance.py)
            labels = [lab + (f"\nΔ{d:+.1f} p={p:.2g}" if isinstance(v, str) and v else "")
                      for lab, v, d, p in zip(labels, group["verdict"], group["delta_worst_case"], group["mcnemar_p"])]
        metrics = [("clean_acc", "clean"), ("standard_acc", "standard attacks"), ("worst_case_acc", "worst case")]
        width = 0.8 / len(metrics)
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(group)), 4))
        for i, (col, name) in enumerate(metrics):
            values = group[col].fillna(0).tolist()
            xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(group))]
            ax.bar(xs, values, width, label=name, yerr=_error_bars(group[col].tolist(), n), capsize=2)
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
