"""Leaderboard tables from results alone: the "results table" step.

:func:`collect` reads every ``result.json`` below a directory; :func:`build_table` makes one
row per (model, defense, settings), ranked by worst-case robust accuracy (RobustBench ranks
by the best known robust accuracy); :func:`write_leaderboard` writes the CSV, a markdown
table, RobustBench-style ``model_info`` JSON per row and the plots. Every file is written
atomically and rebuilt from the results, so rebuilding never duplicates or loses a row.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from .attacks import ATTACKS, AUTOATTACK_SUITE, STANDARD, AttackConfig, autoattack_gaps
from .config import format_eps
from .io import atomic_path, write_json, write_text
from .page import write_latex, write_page

logger = logging.getLogger(__name__)

__all__ = ["build_table", "collect", "result_row", "write_leaderboard", "write_result_table"]

EPS_MARGIN = 0.2  # percentage points
LEAD_COLUMNS = ["rank", "model", "defense", "alpha", "dataset", "threat_model", "eps", "n_examples", "mode",
                "clean_acc"]
TAIL_COLUMNS = ["standard_acc", "autoattack_acc", "worst_case_acc", "flags", "not_applicable", "attacks", "budgets",
                "precision", "seconds", "settings_id",
                "robustify_version", "torch_version", "pyautoattack_version", "result"]
VOLATILE = ("seconds", "robustify_version", "torch_version", "pyautoattack_version", "result", "rank")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        data["_mtime"] = path.stat().st_mtime
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("skipping unreadable results file %s: %s", path, exc)
        return None
    data["_path"] = str(path)
    return data


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Read every ``result.json`` below ``root`` (skipping unreadable ones with a warning)."""
    return [data for data in map(_read, sorted(Path(root).rglob("result.json"))) if data is not None]


def _written(result: dict[str, Any]) -> float:
    """When ``result`` was written: its ``finished`` timestamp, else its file's modification time."""
    if result.get("finished"):
        return datetime.datetime.fromisoformat(result["finished"]).timestamp()
    return float(result.get("_mtime", 0.0))


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def _standard_acc(result: dict[str, Any]) -> float | None:
    per = result.get("per_example", {})
    standard = [a for a in STANDARD if a in per]
    if not standard:
        return None
    correct = per["clean_correct"]
    robust = [c == 1 and not any(per[a][i] == 1 for a in standard) for i, c in enumerate(correct)]
    return sum(robust) / max(len(robust), 1)


def _autoattack_acc(result: dict[str, Any]) -> float | None:
    """AutoAttack's robust accuracy, only if its standard suite ran at its standard budgets and saw,
    attack after attack, every example the earlier ones of the suite left robust (else None)."""
    if autoattack_gaps(AttackConfig.from_dict(result["config"])):
        return None
    per = result["per_example"]
    robust = [c == 1 for c in per["clean_correct"]]
    for attack in AUTOATTACK_SUITE:
        for i, broke in enumerate(per[attack]):
            if robust[i]:
                if broke is None:
                    return None
                robust[i] = broke != 1
    return sum(robust) / max(len(robust), 1)


def _budgets(config: dict[str, Any]) -> str:
    cfg = AttackConfig.from_dict(config)
    parts = []
    for attack in config["attacks"]:  # as recorded: the order they ran in
        b = cfg.budget_for(attack)
        parts.append(f"{attack}(" + ",".join(f"{k}={v}" for k, v in b.items() if v is not None) + ")")
    return " ".join(parts)


def result_row(result: dict[str, Any]) -> dict[str, Any]:
    """Flatten one result into a leaderboard row (accuracies in percent)."""
    meta, config = result.get("meta", {}), result["config"]
    row: dict[str, Any] = {
        "model": meta.get("model", "?"),
        "defense": meta.get("defense", "none"),
        "alpha": meta.get("alpha"),
        "dataset": meta.get("dataset", "?"),
        "threat_model": config["norm"],
        "eps": format_eps(config["eps"], config["norm"]),
        "n_examples": result["n_examples"],
        "mode": "individual" if config.get("individual") else "sequential",
        "clean_acc": _pct(result["clean_acc"]),
    }
    for attack, acc in result["attack_acc"].items():
        row[f"{attack}_acc"] = _pct(acc)
    std = _standard_acc(result)
    row["standard_acc"] = _pct(std) if std is not None else None
    aa = _autoattack_acc(result)
    row["autoattack_acc"] = _pct(aa) if aa is not None else None
    row["worst_case_acc"] = _pct(result["worst_case_acc"])
    row["flags"] = ";".join(result.get("flags", []))
    skipped = meta.get("not_applicable") or {}
    row["not_applicable"] = "; ".join(f"{a}: {why}" for a, why in skipped.items())
    row["attacks"] = ",".join(config["attacks"])
    row["budgets"] = _budgets(config)
    row["precision"] = meta.get("precision", "float32")
    row["seconds"] = round(sum(result.get("seconds", {}).values()), 1)
    identity = {k: v for k, v in meta.items() if k not in ("started",)}
    key = json.dumps({"meta": identity, "config": config, "n": result["n_examples"]}, sort_keys=True, default=str)
    row["settings_id"] = hashlib.sha256(key.encode()).hexdigest()[:10]
    versions = result.get("versions", {})
    row["robustify_version"] = versions.get("robustify")
    row["torch_version"] = versions.get("torch")
    row["pyautoattack_version"] = versions.get("pyautoattack")
    row["result"] = result.get("_path", "")
    return row


def _eps_value(text: str) -> float:
    from .config import parse_eps

    return parse_eps(text)


def _flag_eps_monotonicity(df: pd.DataFrame) -> pd.DataFrame:
    """Flag rows whose robust accuracy does not fall as eps grows (same model/defense/alpha)."""
    group_cols = ["model", "defense", "alpha", "dataset", "threat_model", "n_examples", "mode", "attacks"]
    df = df.copy()
    df["_eps"] = df["eps"].map(_eps_value)
    for _, group in df.groupby(group_cols, dropna=False):
        if len(group) < 2:
            continue
        ordered = group.sort_values("_eps")
        best_smaller = None
        for idx, row in ordered.iterrows():
            if best_smaller is not None and row["worst_case_acc"] > best_smaller + EPS_MARGIN:
                df.at[idx, "flags"] = ";".join(f for f in [df.at[idx, "flags"], "robust-acc-rises-with-eps"] if f)
            best_smaller = row["worst_case_acc"] if best_smaller is None else min(best_smaller, row["worst_case_acc"])
    return df.drop(columns="_eps")


def build_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, defense, settings); the newest result wins; ranked by worst case."""
    rows = [result_row(r) for r in sorted(results, key=_written)]  # stable: ties keep the path order
    if not rows:
        return pd.DataFrame(columns=LEAD_COLUMNS + TAIL_COLUMNS)
    df = pd.DataFrame(rows).drop_duplicates(subset="settings_id", keep="last")
    df = _flag_eps_monotonicity(df)
    df = df.sort_values(["worst_case_acc", "clean_acc", "model", "defense", "alpha"],
                        ascending=[False, False, True, True, True], na_position="last", kind="mergesort")
    df.insert(0, "rank", range(1, len(df) + 1))
    attack_cols = sorted((c for c in df.columns if c.endswith("_acc") and c not in ("clean_acc", "standard_acc",
                                                                                      "autoattack_acc",
                                                                                      "worst_case_acc")),
                         key=lambda c: (ATTACKS.index(c[:-4]) if c[:-4] in ATTACKS else len(ATTACKS), c))
    order = LEAD_COLUMNS + attack_cols + TAIL_COLUMNS
    return df[[c for c in order if c in df.columns]].reset_index(drop=True)


def to_markdown(df: pd.DataFrame) -> str:
    """A readable markdown leaderboard (accuracies in percent)."""
    if df.empty:
        return "_no results yet_\n"
    show = [c for c in df.columns if c not in ("settings_id", "result", "robustify_version", "torch_version",
                                                "pyautoattack_version", "budgets", "attacks")]
    show = [c for c in show if c != "not_applicable"]
    view = df[show].copy().astype(object)
    for col in view.columns:
        view[col] = view[col].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v)) else v)
    for i, text in enumerate(df.get("not_applicable", pd.Series([""] * len(df))).fillna("")):
        for item in filter(None, str(text).split("; ")):
            col = item.split(":", 1)[0] + "_acc"
            if col in view.columns:
                view.iloc[i, view.columns.get_loc(col)] = "n/a"
    header = "| " + " | ".join(show) + " |\n|" + "---|" * len(show) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in view.itertuples(index=False))
    budgets = sorted(set(df["budgets"]))
    notes = (
        "\nRanked by `worst_case_acc`: the share of examples that no attack broke (per-example AND over attacks).\n"
        "`standard_acc`: worst case over the standard (pyautoattack) attacks only. `autoattack_acc`: only where\n"
        "AutoAttack's standard suite (apgd-ce, apgd-t, fab-t, square) ran at its standard budgets. Attacks run in one\n"
        "order (AutoAttack's suite, other standard attacks, then adaptive ones). In `sequential` mode each attack\n"
        "column is the robust accuracy after that attack and all attacks before it (AutoAttack's convention); in\n"
        "`individual` mode each attack ran alone on every correctly classified example.\n"
        "`n/a`: the attack does not apply (BPDA without MeanSparse equals APGD; Sparta and smooth activations are\n"
        "differentiable; a transfer attack from the base model onto itself is a white-box attack).\n\n"
        "Attack budgets:\n" + "".join(f"- `{b}`\n" for b in budgets)
    )
    return header + body + notes


def model_info(row: pd.Series) -> dict[str, Any]:
    """A RobustBench ``model_info`` JSON for one row (accuracies as percent strings).

    ``autoattack_acc`` only when the row ran AutoAttack's standard evaluation; otherwise the
    worst case goes to ``external`` and the footnote says which attacks and budgets were used.
    """
    aa = row.get("autoattack_acc")
    earned = aa is not None and not pd.isna(aa)
    worst = row["worst_case_acc"]
    missing = [a for a in AUTOATTACK_SUITE if a not in str(row["attacks"]).split(",")]
    used = (f"attacks: {row['budgets']}" if earned else
            "no autoattack_acc: not AutoAttack's standard evaluation ("
            + (f"no {', '.join(missing)}" if missing else "other budgets") + f"); attacks: {row['budgets']}")
    info: dict[str, Any] = {
        "link": "",
        "name": f"{row['model']} + {row['defense']}" + (f" (alpha={row['alpha']})" if row["defense"] == "meansparse" else ""),
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": row["dataset"],
        "venue": "",
        "architecture": str(row["model"]),
        "eps": row["eps"],
        "clean_acc": f"{row['clean_acc']:.2f}",
        "reported": "",
        **({"autoattack_acc": f"{aa:.2f}"} if earned else {}),
        "footnote": f"robustify {row['robustify_version']}; {row['n_examples']} examples; {used}",
        "unreliable": bool(row["flags"]),
    }
    if not earned or worst < aa:
        info["external"] = f"{worst:.2f}"
    return info


def write_result_table(result_dir: str | Path) -> pd.DataFrame:
    """Write ``DIR/result.csv``: the leaderboard row (same columns) of ``DIR/result.json``."""
    path = Path(result_dir) / "result.json"
    result = _read(path)
    if result is None:
        raise ValueError(f"cannot read results file {str(path)!r}")
    df = build_table([result])
    with atomic_path(path.with_suffix(".csv")) as tmp:
        df.to_csv(tmp, index=False)
    return df


def write_leaderboard(results_root: str | Path, out_dir: str | Path, plots: bool = True) -> pd.DataFrame:
    """Rebuild ``leaderboard.csv``, ``leaderboard.md``, ``index.html``, ``leaderboard.tex``, ``model_info/`` and
    plots from results."""
    out = Path(out_dir)
    df = build_table(collect(results_root))
    with atomic_path(out / "leaderboard.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_text(out / "leaderboard.md", "# robustify leaderboard\n\n" + to_markdown(df))
    for _, row in df.iterrows():
        write_json(out / "model_info" / str(row["dataset"]) / str(row["threat_model"]) / f"{row['settings_id']}.json",
                   model_info(row))
    plot_files: list[Path] = []
    if plots and not df.empty:
        from .plots import plot_alpha_curves, plot_base_vs_defended

        plot_files += plot_alpha_curves(df, out / "plots")
        plot_files += plot_base_vs_defended(df, out / "plots")
    write_page(df, out, plot_files)
    write_latex(df, out)
    logger.info("leaderboard with %d row(s) written to %s", len(df), out)
    return df
