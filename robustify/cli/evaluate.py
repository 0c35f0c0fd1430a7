"""CLI commands for evaluation: ``evaluate``, ``audit``, ``sweep``, ``leaderboard`` and the main job ``run``.

Their config flags are made from :class:`~robustify.jobs.evaluate.EvaluationJob`,
:class:`~robustify.attacks.AttackConfig` and :class:`~robustify.evaluation.audit.AuditConfig`; the defaults a
command sets otherwise are the ``*_DEFAULTS`` mappings below.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from robustify.core.errors import UserError
from robustify.core import distributed
from robustify.attacks import DEFAULT_ATTACKS as DEFAULT_ATTACK_LIST
from robustify.attacks import AttackConfig, default_attacks, threat_norm
from robustify.attacks.malt import TARGETINGS
from robustify.evaluation.audit import AuditConfig
from robustify.jobs.audit import audit_job
from robustify.core.config import format_eps
from robustify.defenses import defense_names
from robustify.load.data import load_model_data, to_tensors
from robustify.evaluation.fast import PRECISIONS
from robustify.reporting.leaderboard import to_markdown, write_leaderboard, write_result_table
from robustify.reporting.settings import setting_columns, setting_symbol
from robustify.load.models import load_model
from robustify.jobs.evaluate import EvaluationJob, build_defended_model, not_robust_warning, run_evaluation
from robustify.jobs.sweep import sweep
from robustify.evaluation.results import EvalResult
from robustify import defenses
from robustify.cli.common import (DATA_FLAGS, MODEL_FLAGS, WORKERS_FLAGS, add_defense_args, add_model_args,
                                  defense_config_from_args, register_command)
from robustify.cli.flags import ConfigFlags, comma_list, field_names

logger = logging.getLogger("robustify")

__all__ = ["DEFAULT_ATTACKS", "attack_config", "audit_config", "job_from_args"]

#: the attacks of ``evaluate`` and ``audit``: AttackConfig's default (:data:`~robustify.attacks.DEFAULT_ATTACKS`) as
#: ``--attacks`` text (those needing a defense hook run only where a defense offers it; those without a version for
#: the norm are left out, :func:`~robustify.attacks.default_attacks`)
DEFAULT_ATTACKS = ",".join(DEFAULT_ATTACK_LIST)
#: the defaults of ``sweep`` that differ from an evaluation's
SWEEP_DEFAULTS: dict[str, Any] = {"n_examples": 200, "holdout": 500, "attacks": "apgd-ce,bpda"}
#: the attacks of ``run``: both APGD losses on every row, and BPDA (both losses) through the defense, so that the base
#: and defended rows face the same standard attacks and only BPDA is extra
RUN_ATTACKS = ("apgd-ce", "apgd-dlr", "bpda")
#: the defaults of the quick main job ``run`` that differ from an evaluation's
RUN_DEFAULTS = {"model": "small-resnet-at", "n_examples": 100, "n_calib": 5000, "out": "runs/quick", "apgd_iters": 20}

ATTACK_FLAGS = ConfigFlags(
    AttackConfig, ("attacks", "eps", "seed", "batch_size", "individual", "apgd_iters", "apgd_restarts", "apgd_t_iters",
                   "apgd_t_targets", "apgd_t_targeting", "fab_iters", "fab_targets", "square_queries", "adaptive_steps",
                   "adaptive_lambda", "adaptive_step_size", "eot_iter", "accept_no_eot"),
    names={"batch_size": "attack-batch-size", "apgd_t_targeting": "targets"}, parse={"attacks": comma_list},
    choices={"apgd_t_targeting": TARGETINGS})
JOB_FLAGS = ConfigFlags(
    EvaluationJob, ("defense", "defense_weights", "n_examples", "calib_batch_size", "out", "leaderboard_dir",
                    "progress", "compile", "precision", "keep_adversarial"),
    choices={"precision": tuple(PRECISIONS)})
AUDIT_FLAGS = ConfigFlags(AuditConfig, field_names(AuditConfig), prefix="audit-")
RUN_FLAGS = {"job": ConfigFlags(EvaluationJob, ("model", "data", "n_examples", "n_calib", "out")),
             "attack": ConfigFlags(AttackConfig, ("eps", "apgd_iters"))}


def _default_defense(hook: str) -> str | None:
    """The first registered defense offering ``hook`` (``setting``: a sweepable one): the default of ``sweep``
    and ``run`` (registration order puts the built-in ones first)."""
    return next(iter(defenses.defense_names(hook=hook)), None)


SWEEP_DEFAULTS["defense"] = _default_defense("setting")


def add_attack_args(p: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    g = p.add_argument_group("attacks")
    ATTACK_FLAGS.add(g, {"attacks": None, **(defaults or {})})
    attacks = next(a for a in g._group_actions if a.dest == ATTACK_FLAGS.dest("attacks"))
    if attacks.default is None:
        attacks.help = (attacks.help or "").replace(
            " (None:", " (default:").replace(", ".join(DEFAULT_ATTACK_LIST), DEFAULT_ATTACKS)
    g.add_argument("--norm", default=None, help="Linf, L2 or L1 (default: the --threat-model)")


def attack_config(args: argparse.Namespace) -> AttackConfig:
    norm = args.norm or threat_norm(args.threat_model)
    values = ATTACK_FLAGS.values(args)
    if values["attacks"] is None:  # not given: the defaults that support the norm (no adaptive under L1)
        values["attacks"] = default_attacks(norm, DEFAULT_ATTACKS)
    return AttackConfig(norm=norm, dataset=args.dataset, **values)


def _add_job_args(p: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    add_model_args(p)
    add_defense_args(p)
    DATA_FLAGS.add(p, defaults)
    JOB_FLAGS.add(p, defaults, required=("out",))
    _list_defenses(p)


def _list_defenses(p: argparse.ArgumentParser) -> None:
    """``--defense`` shows the registered defenses (plugins included) as its choices in ``--help``; the job checks
    the name (its one-line error for an unknown one, where argparse's choices would print the usage)."""
    action = next(a for a in p._actions if a.dest == JOB_FLAGS.dest("defense"))
    action.metavar = "{" + ",".join(("none", *defense_names())) + "}"


def job_from_args(args: argparse.Namespace) -> EvaluationJob:
    job = JOB_FLAGS.values(args)
    return EvaluationJob(model=args.model, **MODEL_FLAGS.values(args), **DATA_FLAGS.values(args), **job,
                         attack=attack_config(args), defense_config=defense_config_from_args(args, job["defense"]))


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_job_args(p)
    add_attack_args(p)
    p.add_argument("--audit", action="store_true", help="run the sanity suite (robustify audit) after the evaluation")
    add_audit_args(p)


def add_audit_args(p: argparse.ArgumentParser) -> None:
    """The sanity suite's settings."""
    AUDIT_FLAGS.add(p.add_argument_group("audit (sanity suite)"))


def audit_config(args: argparse.Namespace) -> AuditConfig:
    return AuditConfig(**AUDIT_FLAGS.values(args))


def _print_audit(entry: dict[str, Any]) -> None:
    u, c, n = entry["unbounded"], entry["convergence"], entry["noise"]
    print(f"audit: unbounded APGD {100 * u['acc']:.2f}% (chance {100 * u['chance']:.2f}%); "
          f"convergence rerun of {c.get('attack')} broke {c.get('newly_broken', 0)} more; "
          f"band share max {100 * entry['census'].get('max_share', 0.0):.2f}%; noise broke {n['broken']}; "
          f"flags: {', '.join(entry['flags']) or 'none'}")


def _print_result(result: EvalResult) -> None:
    norm = result.config["norm"]
    print(f"threat model {norm} eps {format_eps(result.config['eps'], norm)}, {result.n_examples} examples")
    print(f"clean {100 * result.clean_acc:.2f}%")
    for attack, acc in result.attack_acc.items():
        print(f"{attack:>14s} {100 * acc:.2f}%")
    print(f"{'worst case':>14s} {100 * result.worst_case_acc:.2f}%" + (f"  flags: {', '.join(result.flags)}" if result.flags else ""))


@register_command("evaluate", "attack a model (and its defense) and write per-example results", _evaluate_args)
def _cmd_evaluate(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    _print_result(run_evaluation(job))
    if args.audit and distributed.is_main():
        _print_audit(audit_job(job, audit_config(args)))
    if distributed.is_main():  # the one-row leaderboard table next to result.json (with the audit, if run)
        write_result_table(args.out)
    return 0


def _audit_args(p: argparse.ArgumentParser) -> None:
    _add_job_args(p)
    add_attack_args(p)  # accepted so that an evaluate command line can be reused; budgets come from result.json
    add_audit_args(p)


@register_command("audit", "sanity suite on a finished evaluation (same arguments and --out as evaluate): "
                           "unbounded eps, convergence, gradient census, noise; stored in result.json", _audit_args)
def _cmd_audit(args: argparse.Namespace) -> int:
    _print_audit(audit_job(job_from_args(args), audit_config(args)))
    return 0


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _add_job_args(p, SWEEP_DEFAULTS)
    add_attack_args(p, SWEEP_DEFAULTS)
    p.add_argument("--values", "--alphas", dest="values", default="0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4",
                   help="the values of the defense's setting to evaluate (e.g. MeanSparse's alpha; --alphas is the "
                        "deprecated name), comma-separated; 0, the base model, is always added")
    p.add_argument("--max-clean-drop", type=float, default=0.5,
                   help="rule: best robust accuracy with clean accuracy within this many points of the base")


@register_command("sweep", "calibrate once, evaluate a grid of the defense's setting (MeanSparse: alpha) on held-out "
                           "data, pick one by a rule", _sweep_args)
def _cmd_sweep(args: argparse.Namespace) -> int:
    try:
        values = [float(a) for a in args.values.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--values must be comma-separated numbers, got {args.values!r}") from None
    result = sweep(job_from_args(args), values, max_clean_drop=args.max_clean_drop)
    for row in result.curve:
        print(f"{result.setting} {row[result.setting]:<5g} clean {row['clean_acc']:.2f}%  "
              f"worst case {row['worst_case_acc']:.2f}%")
    print(f"chosen {result.setting}: {result.chosen}  ({result.rule})")
    return 0


def _leaderboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="directory searched recursively for result.json files")
    p.add_argument("--out", default="leaderboard", help="where to write leaderboard.{csv,md}, model_info/, plots/")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)


@register_command("leaderboard", "rebuild the leaderboard tables and plots from results alone", _leaderboard_args)
def _cmd_leaderboard(args: argparse.Namespace) -> int:
    if not Path(args.results).is_dir():
        raise UserError(f"results directory {args.results!r} does not exist")
    print(to_markdown(write_leaderboard(args.results, args.out, plots=args.plots)))
    return 0


def _cell(value: Any) -> str:
    """A table value as text ("" for a missing one)."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def compact_table(df: pd.DataFrame) -> str:
    """The leaderboard's columns that matter, one aligned line per row, for the terminal: model, defense with its
    setting, clean, each attack's accuracy, the worst case with its interval, the difference to the base row, the
    verdict and flags (the files keep every column and the legend)."""
    settings = setting_columns(df.columns)
    attacks = [c for c in df.columns if c.endswith("_acc") and c not in ("clean_acc", "worst_case_acc",
                                                                          "standard_acc", "autoattack_acc")]
    skipped = [str(text).split("; ") for text in df.get("not_applicable", pd.Series([""] * len(df))).fillna("")]
    header = ["model", "defense", "clean", *(c[:-4] for c in attacks), "worst case [95% CI]", "vs base", "verdict",
              "flags"]
    lines = [header]
    for (_, row), na in zip(df.iterrows(), skipped):
        setting = "".join(f" {setting_symbol(s)}={row[s]:g}" for s in settings if _cell(row[s]))
        na_attacks = {item.split(":", 1)[0] for item in na if item}
        lines.append([
            _cell(row["model"]), f"{row['defense']}{setting}", f"{row['clean_acc']:.1f}",
            *("n/a" if c[:-4] in na_attacks else (f"{row[c]:.1f}" if _cell(row[c]) else "") for c in attacks),
            f"{row['worst_case_acc']:.1f} {_one_decimal(_cell(row.get('worst_case_ci95')))}".strip(),
            f"{row['delta_worst_case']:+.1f}" if _cell(row.get("delta_worst_case")) else "",
            _cell(row.get("verdict")), _cell(row.get("flags")) or "-",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _one_decimal(interval: str) -> str:
    """``"[14.70, 26.20]"`` as ``"[14.7, 26.2]"``."""
    if not interval:
        return ""
    return "[" + ", ".join(f"{float(v):.1f}" for v in interval.strip("[]").split(",")) + "]"


def _run_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, positional=False)
    RUN_FLAGS["job"].add(p, RUN_DEFAULTS)
    WORKERS_FLAGS.add(p)
    p.add_argument("--defense", default=_default_defense("setting"), choices=defenses.defense_names(),
                   help="the defense to compare with the base model (default: %(default)s)")
    add_defense_args(p)
    RUN_FLAGS["attack"].add(p, RUN_DEFAULTS)


def _check_identity(job: EvaluationJob) -> None:
    """Sanity check of the defended model: with its setting at 0 (e.g. MeanSparse's alpha) it must reproduce the
    base model exactly (skipped for a defense without a setting)."""
    defense = defenses.get_defense(job.defense)
    if defense.set_setting is None:
        return
    base, info = load_model(job.model, dataset=job.dataset, threat_model=job.threat_model, weights=job.weights,
                            pretrained=job.pretrained, cache_dir=job.cache_dir, device=job.device,
                            image_size=job.image_size, new_head=job.new_head)
    x, _ = to_tensors(load_model_data(job.data, "test", info, n=min(16, job.n_examples), cache_dir=job.cache_dir),
                      workers=job.workers)
    x = x.to(job.device)
    defended, _, _ = build_defended_model(replace(job, progress=False))  # the cached state of ``job.out``
    with torch.no_grad():
        reference = base(x)
        defense.set_setting(defended, 0.0)
        same = torch.equal(defended(x), reference)
    if not same:
        raise RuntimeError(f"check failed: {defense.title} at {defense.setting}=0 does not reproduce the base model")
    logger.info("check passed: %s at %s=0 reproduces the base model exactly", defense.title, defense.setting)


@register_command("run", "the main job: robustify a model with a defense (default: MeanSparse), check it, and make "
                         "a quick leaderboard (base vs defended, APGD-CE, APGD-DLR and BPDA)", _run_args)
def _cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    attack = AttackConfig(attacks=RUN_ATTACKS, norm=threat_norm(args.threat_model), dataset=args.dataset,
                          **RUN_FLAGS["attack"].values(args))
    job = {**RUN_FLAGS["job"].values(args), "out": str(out / "results" / "base")}
    base_job = EvaluationJob(**job, **MODEL_FLAGS.values(args), **WORKERS_FLAGS.values(args), attack=attack)
    base = run_evaluation(base_job)
    defense = defenses.get_defense(args.defense)
    config = defense_config_from_args(args, args.defense)
    value = getattr(config, defense.setting) if defense.setting else None
    label = args.defense + (f"_{value:g}" if value is not None else "")
    defended_job = replace(base_job, defense=args.defense, defense_config=config, out=str(out / "results" / label))
    defended = run_evaluation(defended_job)
    _check_identity(defended_job)
    table = write_leaderboard(out / "results", out / "leaderboard")
    print(f"threat model {attack.norm} eps {format_eps(base.config['eps'], attack.norm)}, {base.n_examples} test "
          f"examples, accuracies in % with their 95% intervals")
    print(compact_table(table))
    print(f"full results (every column, the legend, the page): {out / 'leaderboard'}/leaderboard.md, "
          f"leaderboard.csv, index.html")
    warning = not_robust_warning(base, args.model)
    if warning:
        logger.warning("%s", warning)
    return 0
