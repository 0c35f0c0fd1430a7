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

import torch

from robustify.core.errors import UserError
from robustify.core import distributed
from robustify.attacks import AttackConfig, threat_norm
from robustify.evaluation.audit import AuditConfig, audit_job
from robustify.core.config import format_eps
from robustify.defenses import defense_names
from robustify.defenses.meansparse.config import MeanSparseConfig
from robustify.load.data import load_model_data, to_tensors
from robustify.evaluation.fast import PRECISIONS
from robustify.reporting.leaderboard import to_markdown, write_leaderboard, write_result_table
from robustify.defenses.meansparse.module import set_alpha
from robustify.load.models import load_model
from robustify.jobs.evaluate import EvaluationJob, not_robust_warning, run_evaluation
from robustify.jobs.sweep import sweep
from robustify.evaluation.results import EvalResult
from robustify.defenses.meansparse.state import load_calibration
from robustify.cli.common import (DATA_FLAGS, MEANSPARSE_DEFAULTS, MODEL_FLAGS, WORKERS_FLAGS, add_meansparse_args,
                     add_model_args, meansparse_config, register_command)
from robustify.cli.flags import ConfigFlags, comma_list, field_names

logger = logging.getLogger("robustify")

__all__ = ["DEFAULT_ATTACKS", "attack_config", "audit_config", "job_from_args"]

#: the attacks of ``evaluate`` and ``audit`` (the BPDA ones run on MeanSparse rows only)
DEFAULT_ATTACKS = "apgd-ce,apgd-dlr,square,bpda,bpda-apgd-t,adaptive,transfer"
#: the defaults of ``sweep`` that differ from an evaluation's
SWEEP_DEFAULTS = {"defense": "meansparse", "n_examples": 200, "holdout": 500, "attacks": "apgd-ce,bpda"}
#: the defaults of the quick main job ``run`` that differ from an evaluation's
RUN_DEFAULTS = {"model": "aa-resnet18", "n_examples": 100, "n_calib": 5000, "out": "runs/quick", "apgd_iters": 20}

ATTACK_FLAGS = ConfigFlags(
    AttackConfig, ("attacks", "eps", "seed", "batch_size", "individual", "apgd_iters", "apgd_restarts", "apgd_t_iters",
                   "apgd_t_targets", "fab_iters", "fab_targets", "square_queries", "adaptive_steps",
                   "adaptive_lambda", "adaptive_step_size"),
    names={"batch_size": "attack-batch-size"}, parse={"attacks": comma_list})
JOB_FLAGS = ConfigFlags(
    EvaluationJob, ("defense", "defense_weights", "n_examples", "calib_batch_size", "out", "leaderboard_dir",
                    "progress", "compile", "precision"),
    choices={"precision": tuple(PRECISIONS)})
AUDIT_FLAGS = ConfigFlags(AuditConfig, field_names(AuditConfig), prefix="audit-")
RUN_FLAGS = {"job": ConfigFlags(EvaluationJob, ("model", "data", "n_examples", "n_calib", "out")),
             "attack": ConfigFlags(AttackConfig, ("eps", "apgd_iters")),
             "meansparse": ConfigFlags(MeanSparseConfig, ("alpha",))}


def add_attack_args(p: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    g = p.add_argument_group("attacks")
    ATTACK_FLAGS.add(g, {"attacks": DEFAULT_ATTACKS, **(defaults or {})})
    g.add_argument("--norm", default=None, help="Linf, L2 or L1 (default: the --threat-model)")


def attack_config(args: argparse.Namespace) -> AttackConfig:
    return AttackConfig(norm=args.norm or threat_norm(args.threat_model), dataset=args.dataset,
                        **ATTACK_FLAGS.values(args))


def _add_job_args(p: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    add_model_args(p)
    add_meansparse_args(p)
    DATA_FLAGS.add(p, defaults)
    JOB_FLAGS.add(p, defaults, required=("out",))
    _list_defenses(p)


def _list_defenses(p: argparse.ArgumentParser) -> None:
    """``--defense`` shows the registered defenses (plugins included) as its choices in ``--help``; the job checks
    the name (its one-line error for an unknown one, where argparse's choices would print the usage)."""
    action = next(a for a in p._actions if a.dest == JOB_FLAGS.dest("defense"))
    action.metavar = "{" + ",".join(("none", *defense_names())) + "}"


def job_from_args(args: argparse.Namespace) -> EvaluationJob:
    return EvaluationJob(model=args.model, **MODEL_FLAGS.values(args), **DATA_FLAGS.values(args),
                         **JOB_FLAGS.values(args), attack=attack_config(args),
                         defense_config=meansparse_config(args) if args.defense == "meansparse" else None)


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
    p.add_argument("--alphas", default="0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4")
    p.add_argument("--max-clean-drop", type=float, default=0.5,
                   help="rule: best robust accuracy with clean accuracy within this many points of the base")


@register_command("sweep", "calibrate once, evaluate a grid of alpha on held-out data, pick alpha", _sweep_args)
def _cmd_sweep(args: argparse.Namespace) -> int:
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    result = sweep(job_from_args(args), alphas, max_clean_drop=args.max_clean_drop)
    for row in result.curve:
        print(f"alpha {row['alpha']:<5g} clean {row['clean_acc']:.2f}%  worst case {row['worst_case_acc']:.2f}%")
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


def _run_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, positional=False)
    RUN_FLAGS["job"].add(p, RUN_DEFAULTS)
    WORKERS_FLAGS.add(p)
    RUN_FLAGS["meansparse"].add(p, MEANSPARSE_DEFAULTS)
    RUN_FLAGS["attack"].add(p, RUN_DEFAULTS)


def _check_identity(job: EvaluationJob, calibration: Path) -> None:
    """Sanity check of the inserted model: at alpha=0 it must reproduce the base model exactly."""
    base, info = load_model(job.model, dataset=job.dataset, threat_model=job.threat_model, weights=job.weights,
                            pretrained=job.pretrained, cache_dir=job.cache_dir, device=job.device)
    x, _ = to_tensors(load_model_data(job.data, "test", info, n=min(16, job.n_examples), cache_dir=job.cache_dir),
                      workers=job.workers)
    x = x.to(job.device)
    with torch.no_grad():
        reference = base(x)
        defended = load_calibration(base, calibration, info.example_input(device=job.device))
        set_alpha(defended, 0.0)
        same = torch.equal(defended(x), reference)
    if not same:
        raise RuntimeError("check failed: MeanSparse at alpha=0 does not reproduce the base model")
    logger.info("check passed: MeanSparse at alpha=0 reproduces the base model exactly")


@register_command("run", "the main job: robustify a model with MeanSparse, check it, and make a quick "
                         "leaderboard (base vs MeanSparse, APGD-CE and BPDA)", _run_args)
def _cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    attack = AttackConfig(attacks=("apgd-ce", "bpda"), norm=threat_norm(args.threat_model), dataset=args.dataset,
                          **RUN_FLAGS["attack"].values(args))
    job = {**RUN_FLAGS["job"].values(args), "out": str(out / "results" / "base")}
    base_job = EvaluationJob(**job, **MODEL_FLAGS.values(args), **WORKERS_FLAGS.values(args), attack=attack)
    base = run_evaluation(base_job)
    defended_dir = out / "results" / f"meansparse_{args.alpha:g}"
    meansparse = MeanSparseConfig(**RUN_FLAGS["meansparse"].values(args))
    defended = run_evaluation(replace(base_job, defense="meansparse", meansparse=meansparse, out=str(defended_dir)))
    _check_identity(base_job, Path(defended_dir) / "calibration.safetensors")
    print(to_markdown(write_leaderboard(out / "results", out / "leaderboard")))
    print(f"base: clean {100 * base.clean_acc:.2f}%, worst case {100 * base.worst_case_acc:.2f}%; "
          f"MeanSparse alpha={args.alpha:g}: clean {100 * defended.clean_acc:.2f}%, "
          f"worst case {100 * defended.worst_case_acc:.2f}% -> {out / 'leaderboard' / 'leaderboard.md'}")
    warning = not_robust_warning(base, args.model)
    if warning:
        logger.warning("%s", warning)
    return 0
