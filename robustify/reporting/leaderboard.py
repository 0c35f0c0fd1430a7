"""Leaderboard tables from results alone: the "results table" step.

:func:`collect` reads every ``result.json`` below a directory; :func:`build_table` makes one
row per (model, defense, settings), ranked by worst-case robust accuracy (RobustBench ranks
by the best known robust accuracy); :func:`write_leaderboard` runs the registered output formats
(:mod:`robustify.reporting.writers`: the CSV (every column), markdown tables (:mod:`robustify.reporting.tables`:
the columns a reader compares first, at most 12 columns a table), RobustBench-style ``model_info`` JSON
per row, the plots, the web page, the LaTeX table, and the plugins' formats). A defense's setting
(its registered ``setting``, e.g. MeanSparse's ``alpha``) is a column when some row has a value for it
(:mod:`robustify.reporting.settings`). Every file is written atomically and rebuilt from the results,
so rebuilding never duplicates or loses a row.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from robustify.core.errors import UserError
from robustify.attacks import AttackConfig, attack_names, autoattack_gaps, autoattack_suite
from robustify.core.config import format_eps, untagged
from robustify.core.io import atomic_path
from robustify.reporting.settings import setting_columns, setting_names
from robustify.reporting.tables import markdown_tables
from robustify.reporting.writers import WriteContext, run_writers
from robustify.core.significance import LEVEL, ci_text, find_base, paired_comparison, robust_mask
from robustify.evaluation.cost import PHASES, total_passes

logger = logging.getLogger(__name__)

__all__ = ["build_table", "collect", "lead_columns", "model_info", "reproduce_note", "result_row", "to_markdown",
           "write_leaderboard", "write_result_table"]

EPS_MARGIN = 0.2  # percentage points
REPRODUCE_FILE = "REPRODUCE.md"  # in a results directory: the commands that produced its results
#: the first columns; the defenses' setting columns (:func:`lead_columns`) go after ``defense``
LEAD_COLUMNS = ["rank", "model", "defense", "dataset", "threat_model", "eps", "n_examples", "mode", "clean_acc"]
TAIL_COLUMNS = ["standard_acc", "autoattack_acc", "worst_case_acc", "flags", "not_applicable", "attacks", "budgets",
                "precision", "seconds", "settings_id",
                "robustify_version", "torch_version", "pyautoattack_version", "result"]
#: inserted after the worst-case interval: the paired comparison with the base row (significance.py)
PAIRED_COLUMNS = ["delta_worst_case", "discordant", "mcnemar_p", "verdict", "base_settings_id"]
#: inserted after ``flags``: the sanity suite's figures (robustify.evaluation.audit), in percent
AUDIT_COLUMNS = ["audit_unbounded", "audit_newly_broken", "audit_band_share", "audit_noise_broken"]
#: inserted after ``seconds``: forward+backward example-passes in all, per example, and per attack
COST_COLUMNS = ["passes", "passes_per_example", "cost", "seconds_per_attack"]
VOLATILE = ("seconds", "seconds_per_attack", "robustify_version", "torch_version", "pyautoattack_version", "result", "rank")


def lead_columns(settings: list[str]) -> list[str]:
    """:data:`LEAD_COLUMNS` with the setting columns ``settings`` after ``defense``."""
    at = LEAD_COLUMNS.index("defense") + 1
    return LEAD_COLUMNS[:at] + list(settings) + LEAD_COLUMNS[at:]


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
    standard = [a for a in attack_names(standard=True) if a in per]
    if not standard:
        return None
    robust = robust_mask(per, standard)
    return sum(robust) / max(len(robust), 1)


def _autoattack_acc(result: dict[str, Any], cfg: AttackConfig) -> float | None:
    """AutoAttack's robust accuracy, only if its standard suite ran at its standard budgets and saw,
    attack after attack, every example the earlier ones of the suite left robust (else None)."""
    if autoattack_gaps(cfg):
        return None
    per = result["per_example"]
    robust = [c == 1 for c in per["clean_correct"]]
    for attack in autoattack_suite():
        for i, broke in enumerate(per[attack]):
            if robust[i]:
                if broke is None:
                    return None
                robust[i] = broke != 1
    return sum(robust) / max(len(robust), 1)


def _budgets(cfg: AttackConfig, attacks: list[str]) -> str:
    parts = []
    for attack in attacks:  # as recorded: the order they ran in
        b = cfg.budget_for(attack)
        parts.append(f"{attack}(" + ",".join(f"{k}={v}" for k, v in b.items() if v is not None) + ")")
    return " ".join(parts)


def settings_id(result: dict[str, Any]) -> str:
    """The row identity of a result: a hash of its meta (less its start time), attack config and size."""
    identity = {k: v for k, v in result.get("meta", {}).items() if k not in ("started",)}
    key = json.dumps({"meta": identity, "config": untagged(result["config"]), "n": result["n_examples"]},
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def result_row(result: dict[str, Any]) -> dict[str, Any]:
    """Flatten one result into a leaderboard row (accuracies in percent)."""
    meta, config = result.get("meta", {}), result["config"]
    cfg = AttackConfig.from_dict(config)
    row: dict[str, Any] = {
        "model": meta.get("model", "?"),
        "defense": meta.get("defense", "none"),
        **{setting: meta.get(setting) for setting in setting_names()},  # as each defense's meta hook records it
        "dataset": meta.get("dataset", "?"),
        "threat_model": config["norm"],
        "eps": format_eps(config["eps"], config["norm"]),
        "n_examples": result["n_examples"],
        "mode": "individual" if config.get("individual") else "sequential",
        "clean_acc": _pct(result["clean_acc"]),
    }
    shares = {"clean_acc": result["clean_acc"], **{f"{a}_acc": acc for a, acc in result["attack_acc"].items()},
              "standard_acc": _standard_acc(result), "autoattack_acc": _autoattack_acc(result, cfg),
              "worst_case_acc": result["worst_case_acc"]}
    row.update({col: _pct(share) if share is not None else None for col, share in shares.items()})
    _add_intervals(row, shares)
    row["flags"] = ";".join(list(result.get("flags", [])) + list((result.get("audit") or {}).get("flags", [])))
    row.update(_audit_columns(result))
    skipped = meta.get("not_applicable") or {}
    row["not_applicable"] = "; ".join(f"{a}: {why}" for a, why in skipped.items())
    row["attacks"] = ",".join(config["attacks"])
    row["budgets"] = _budgets(cfg, config["attacks"])
    row["precision"] = meta.get("precision", "float32")
    row["seconds"] = round(sum(result.get("seconds", {}).values()), 1)
    row.update(_cost_columns(result))
    row["settings_id"] = settings_id(result)
    versions = result.get("versions", {})
    row["robustify_version"] = versions.get("robustify")
    row["torch_version"] = versions.get("torch")
    row["pyautoattack_version"] = versions.get("pyautoattack")
    row["result"] = result.get("_path", "")
    return row


def _audit_columns(result: dict[str, Any]) -> dict[str, Any]:
    """The sanity suite's figures (percent): accuracy under unbounded APGD, share newly broken by the
    convergence rerun, the largest share of a site's units in the zero-gradient band, share broken by noise."""
    audit = result.get("audit") or {}
    figures = {"audit_unbounded": audit.get("unbounded", {}).get("acc"),
               "audit_newly_broken": audit.get("convergence", {}).get("share"),
               "audit_band_share": audit.get("census", {}).get("max_share"),
               "audit_noise_broken": audit.get("noise", {}).get("share")}
    return {k: (_pct(v) if v is not None else None) for k, v in figures.items()}


def _cost_columns(result: dict[str, Any]) -> dict[str, Any]:
    """``passes`` (forward + backward example-passes of every phase), per example; per attack
    ``cost`` ``attack=F+B`` (forward and backward passes per attacked example) and
    ``seconds_per_attack`` ``attack=S`` (wall seconds per attacked example)."""
    cost = {a: c for a, c in (result.get("cost") or {}).items() if a not in PHASES}
    if not cost:
        return {"passes": None, "passes_per_example": None, "cost": "", "seconds_per_attack": ""}
    total = total_passes(result.get("cost"))
    return {"passes": total, "passes_per_example": round(total / max(result["n_examples"], 1), 1),
            "cost": " ".join(f"{a}={c['forward_per_example']:g}+{c['backward_per_example']:g}" for a, c in cost.items()),
            "seconds_per_attack": " ".join(f"{a}={c['seconds_per_example']:g}" for a, c in cost.items())}


def _add_intervals(row: dict[str, Any], shares: dict[str, float | None]) -> None:
    """A 95% exact interval ``<x>_ci95`` for every accuracy column ``<x>_acc`` of the row, from the exact
    count (``shares``: the unrounded fractions; the row's percentages, rounded to 2 decimals, lose the
    count above 10,000 examples)."""
    for col in [c for c in row if c.endswith("_acc")]:
        share = shares.get(col)
        row[col[:-4] + "_ci95"] = ci_text(100.0 * share if share is not None else row[col], row["n_examples"])


def _add_paired(df: pd.DataFrame, results: list[dict[str, Any]]) -> pd.DataFrame:
    """For every defended row, the paired comparison with its base row (``PAIRED_COLUMNS``).

    ``df``'s index is the position of each row's result in ``results``."""
    df = df.copy()
    kept = [results[i] for i in df.index]
    for col in PAIRED_COLUMNS:
        df[col] = None
    for i in df.index:
        found = find_base(results[i], kept)
        if found is None:
            continue
        base, how = found
        cmp = paired_comparison(results[i], base, how)
        df.at[i, "delta_worst_case"] = round(cmp["difference"], 2)
        df.at[i, "discordant"] = f"{cmp['base_only']}/{cmp['defended_only']}"
        df.at[i, "mcnemar_p"] = float(f"{cmp['p_value']:.4g}")
        df.at[i, "verdict"] = cmp["verdict"]
        df.at[i, "base_settings_id"] = settings_id(base)
    return df


def _with_extras(order: list[str], columns: Any) -> list[str]:
    """``order`` with each accuracy's interval after it and the paired columns after the worst case."""
    out: list[str] = []
    for col in order:
        out.append(col)
        if col.endswith("_acc") and col[:-4] + "_ci95" in columns:
            out.append(col[:-4] + "_ci95")
        if col == "worst_case_acc":
            out.extend(PAIRED_COLUMNS)
        if col == "seconds":
            out.extend(COST_COLUMNS)
        if col == "flags":
            out.extend(AUDIT_COLUMNS)
    return out


def _eps_value(text: str) -> float:
    from robustify.core.config import parse_eps

    return parse_eps(text)


def _flag_eps_monotonicity(df: pd.DataFrame) -> pd.DataFrame:
    """Flag rows whose robust accuracy does not fall as eps grows (same model, defense and settings)."""
    group_cols = ["model", "defense", *setting_columns(df.columns), "dataset", "threat_model", "n_examples", "mode",
                  "attacks"]
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


def _drop_empty_settings(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without the setting columns no row has a value for (a defense's setting shows only where it ran)."""
    empty = [s for s in setting_columns(df.columns) if df[s].isna().all()]
    return df.drop(columns=empty)


def build_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, defense, settings); the newest result wins; ranked by worst case."""
    ordered = sorted(results, key=_written)  # stable: ties keep the path order
    rows = [result_row(r) for r in ordered]
    if not rows:
        return pd.DataFrame(columns=LEAD_COLUMNS + TAIL_COLUMNS)
    df = pd.DataFrame(rows).drop_duplicates(subset="settings_id", keep="last")
    df = _drop_empty_settings(df)
    df = _add_paired(df, ordered)  # df's index is the position in ``ordered``
    df = _flag_eps_monotonicity(df)
    keys = ["worst_case_acc", "clean_acc", "model", "defense", *setting_columns(df.columns)]
    df = df.sort_values(keys, ascending=[False, False] + [True] * (len(keys) - 2), na_position="last",
                        kind="mergesort")
    df.insert(0, "rank", range(1, len(df) + 1))
    attacks = attack_names()
    attack_cols = sorted((c for c in df.columns if c.endswith("_acc") and c not in ("clean_acc", "standard_acc",
                                                                                      "autoattack_acc",
                                                                                      "worst_case_acc")),
                         key=lambda c: (attacks.index(c[:-4]) if c[:-4] in attacks else len(attacks), c))
    order = _with_extras(lead_columns(setting_columns(df.columns)) + attack_cols + TAIL_COLUMNS, df.columns)
    return df[[c for c in order if c in df.columns]].reset_index(drop=True)


def to_markdown(df: pd.DataFrame) -> str:
    """A readable markdown leaderboard (accuracies in percent): the lead table, the other columns in further
    tables of at most 12 columns, the legend and the attack budgets (:func:`robustify.reporting.tables.markdown_tables`)."""
    return markdown_tables(df)


def _settings_text(row: pd.Series) -> str:
    """`` (alpha=0.2)``: the row's defense settings that have a value, or ""."""
    values = [f"{s}={row[s]}" for s in setting_columns(row.index) if not pd.isna(row[s])]
    return f" ({', '.join(values)})" if values else ""


def model_info(row: pd.Series) -> dict[str, Any]:
    """A RobustBench ``model_info`` JSON for one row (accuracies as percent strings).

    ``autoattack_acc`` only when the row ran AutoAttack's standard evaluation; otherwise the
    worst case goes to ``external`` and the footnote says which attacks and budgets were used.
    """
    aa = row.get("autoattack_acc")
    earned = aa is not None and not pd.isna(aa)
    worst = row["worst_case_acc"]
    missing = [a for a in autoattack_suite() if a not in str(row["attacks"]).split(",")]
    used = (f"attacks: {row['budgets']}" if earned else
            "no autoattack_acc: not AutoAttack's standard evaluation ("
            + (f"no {', '.join(missing)}" if missing else "other budgets") + f"); attacks: {row['budgets']}")
    info: dict[str, Any] = {
        "link": "",
        "name": f"{row['model']} + {row['defense']}" + _settings_text(row),
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
    if row.get("passes") is not None and not pd.isna(row.get("passes")):
        info["passes"] = {"total": int(row["passes"]), "per_example": row["passes_per_example"],
                          "per_attack": row["cost"], "seconds_per_attack": row["seconds_per_attack"]}
    audit = {c.removeprefix("audit_"): row[c] for c in AUDIT_COLUMNS if c in row.index and pd.notna(row[c])}
    if audit:
        info["audit_pct"] = audit
    info["intervals_95"] = {c[:-5]: row[c] for c in row.index if c.endswith("_ci95") and isinstance(row[c], str)
                            and row[c]}
    if row.get("verdict"):
        info["paired_with_base"] = {"base_settings_id": row["base_settings_id"],
                                    "delta_worst_case": row["delta_worst_case"], "discordant": row["discordant"],
                                    "mcnemar_p": row["mcnemar_p"], "verdict": row["verdict"], "level": LEVEL}
    return info


def write_result_table(result_dir: str | Path) -> pd.DataFrame:
    """Write ``DIR/result.csv``: the leaderboard row (same columns) of ``DIR/result.json``."""
    path = Path(result_dir) / "result.json"
    result = _read(path)
    if result is None:
        raise UserError(f"cannot read results file {str(path)!r}")
    df = build_table([result])
    with atomic_path(path.with_suffix(".csv")) as tmp:
        df.to_csv(tmp, index=False)
    return df


def reproduce_note(results_root: str | Path) -> str:
    """The text of ``<results_root>/REPRODUCE.md`` (how the results were made), or ""."""
    path = Path(results_root) / REPRODUCE_FILE
    return path.read_text().strip() if path.is_file() else ""


def write_leaderboard(results_root: str | Path, out_dir: str | Path, plots: bool = True,
                      writers: Iterable[str] | None = None) -> pd.DataFrame:
    """Rebuild the leaderboard in ``out_dir`` from the results below ``results_root``: every registered output
    format (:mod:`robustify.reporting.writers`; ``writers`` names some of them): ``leaderboard.csv``,
    ``leaderboard.md``, ``model_info/``, ``plots/`` (unless ``plots`` is False), ``index.html``,
    ``leaderboard.tex`` and the plugins' files. ``<results_root>/REPRODUCE.md``, if present (the commands
    that produced the results), ends ``leaderboard.md``, so the tables rebuild byte-identically from their results.

    Args:
        results_root: the directory searched for ``result.json`` files (recursively).
        out_dir: where the tables go (created).
        plots: write the plots too.
        writers: the output formats to run (None: every registered one).

    Returns:
        The leaderboard table (one row per model, defense and settings, ranked by worst case).

    Examples:
        >>> table = rb.write_leaderboard("leaderboard/results", "rebuilt", plots=False)
        >>> table[["model", "defense"]].iloc[0].tolist(), len(table)
        (['aa-resnet18', 'sparta'], 6)
    """
    out = Path(out_dir)
    df = build_table(collect(results_root))
    written = run_writers(df, out, WriteContext(results_root=Path(results_root), plots=plots), writers)
    logger.info("leaderboard with %d row(s) written to %s (%s)", len(df), out, ", ".join(written))
    return df
