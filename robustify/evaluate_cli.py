"""CLI commands for evaluation: ``evaluate``, ``sweep``, ``leaderboard`` and the main job ``run``."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from .cli_common import (CALIB_BATCH_HELP, add_meansparse_args, add_model_args, add_workers_arg, meansparse_config,
                         register_command)
from .defenses import defense_names

logger = logging.getLogger("robustify")

DEFAULT_ATTACKS = "apgd-ce,apgd-dlr,square,bpda,bpda-apgd-t,adaptive,transfer"  # BPDA ones: MeanSparse rows only


def add_attack_args(p: argparse.ArgumentParser, attacks: str = DEFAULT_ATTACKS) -> None:
    g = p.add_argument_group("attacks")
    g.add_argument("--attacks", default=attacks,
                   help="comma-separated: apgd-ce, apgd-dlr, apgd-t, fab-t, square, autoattack, bpda "
                        "(bpda-apgd-ce + bpda-apgd-dlr), bpda-apgd-t, bpda-fab-t, bpda-autoattack, soft-bpda, "
                        "adaptive, pgd, transfer")
    g.add_argument("--eps", default=None,
                   help="perturbation budget: a float or a fraction like 8/255 (default: RobustBench's for the "
                        "dataset and norm: CIFAR Linf 8/255, L2 0.5, L1 12; ImageNet Linf 4/255)")
    g.add_argument("--norm", default=None, help="Linf, L2 or L1 (default: the --threat-model)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--attack-batch-size", type=int, default=None)
    g.add_argument("--individual", action="store_true",
                   help="run every attack on every correctly classified example (default: only on unbroken ones)")
    # budgets: unset flags take AttackConfig's defaults (AutoAttack's standard ones for the norm)
    for flag, kind in (("apgd-iters", int), ("apgd-restarts", int), ("apgd-t-iters", int), ("apgd-t-targets", int),
                       ("fab-iters", int), ("fab-targets", int), ("square-queries", int), ("adaptive-steps", int),
                       ("adaptive-lambda", float), ("adaptive-step-size", float)):
        g.add_argument(f"--{flag}", type=kind, default=None)


def attack_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .attacks import AttackConfig, threat_norm

    norm = args.norm or threat_norm(args.threat_model)
    given = {
        "eps": args.eps, "seed": args.seed, "batch_size": args.attack_batch_size, "apgd_iters": args.apgd_iters,
        "apgd_restarts": args.apgd_restarts, "apgd_t_iters": args.apgd_t_iters, "apgd_t_targets": args.apgd_t_targets,
        "fab_iters": args.fab_iters, "fab_targets": args.fab_targets, "square_queries": args.square_queries,
        "adaptive_steps": args.adaptive_steps, "adaptive_lambda": args.adaptive_lambda,
        "adaptive_step_size": args.adaptive_step_size,
    }
    return AttackConfig(attacks=tuple(a for a in args.attacks.split(",") if a.strip()), norm=norm,
                        dataset=args.dataset, individual=args.individual,
                        **{k: v for k, v in given.items() if v is not None})


def _add_job_args(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    add_model_args(p)
    p.add_argument("--defense", default="meansparse" if sweep else "none",
                   help=", ".join(("none", *defense_names())))
    p.add_argument("--defense-weights", default=None,
                   help="MeanSparse calibration file, or trained defense parameters from `robustify train` "
                        "(a --weights file with a robustify sidecar is taken as this too)")
    add_meansparse_args(p)
    p.add_argument("--data", default="cifar10", help="cifar10, cifar100, imagenet:DIR, folder:DIR or a .npz file")
    p.add_argument("--n-examples", type=int, default=200 if sweep else 1000)
    p.add_argument("--holdout", type=int, default=500 if sweep else 0,
                   help="training examples held out from calibration")
    p.add_argument("--n-calib", type=int, default=None,
                   help="calibrate on N training examples only (the first; class-spread on an image folder)")
    p.add_argument("--calib-batch-size", type=int, default=None, help=CALIB_BATCH_HELP)
    add_workers_arg(p)
    p.add_argument("--out", required=True, help="results directory (resumable: rerun the same command to resume)")
    p.add_argument("--leaderboard-dir", default=None,
                   help="rebuild this leaderboard from every result next to --out when done")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="attack the torch.compile'd model (MeanSparse fused into ReLU): about a minute of "
                        "compilation, then ~1.5x faster on CPU (benchmarks/results/compiled_eval.csv)")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast the attacked model (MeanSparse statistics stay float32)")


def job_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .pipeline import EvaluationJob

    return EvaluationJob(
        model=args.model, defense=args.defense, data=args.data, dataset=args.dataset,
        threat_model=args.threat_model, weights=args.weights, defense_weights=args.defense_weights,
        pretrained=args.pretrained, cache_dir=args.cache_dir, device=args.device, n_examples=args.n_examples,
        holdout=args.holdout, n_calib=args.n_calib, calib_batch_size=args.calib_batch_size, workers=args.workers,
        meansparse=meansparse_config(args), attack=attack_config(args), out=args.out,
        leaderboard_dir=args.leaderboard_dir, progress=args.progress, compile=args.compile,
        precision=args.precision,
    )


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_job_args(p)
    add_attack_args(p)
    p.add_argument("--audit", action="store_true", help="run the sanity suite (robustify audit) after the evaluation")
    add_audit_args(p)


def add_audit_args(p: argparse.ArgumentParser) -> None:
    """The sanity suite's settings; unset ones keep AuditConfig's defaults."""
    g = p.add_argument_group("audit (sanity suite)")
    for name, kind in (("unbounded-examples", int), ("unbounded-iters", int), ("convergence-factor", int),
                       ("convergence-tolerance", float), ("census-examples", int), ("masked-share", float),
                       ("noise-draws", int), ("noise-tolerance", float)):
        g.add_argument(f"--audit-{name}", type=kind, default=None)


def audit_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .audit import AuditConfig

    given = {f: getattr(args, f"audit_{f}") for f in AuditConfig.__dataclass_fields__
             if getattr(args, f"audit_{f}", None) is not None}
    return AuditConfig(**given)


def _print_audit(entry) -> None:  # type: ignore[no-untyped-def]
    u, c, n = entry["unbounded"], entry["convergence"], entry["noise"]
    print(f"audit: unbounded APGD {100 * u['acc']:.2f}% (chance {100 * u['chance']:.2f}%); "
          f"convergence rerun of {c.get('attack')} broke {c.get('newly_broken', 0)} more; "
          f"band share max {100 * entry['census'].get('max_share', 0.0):.2f}%; noise broke {n['broken']}; "
          f"flags: {', '.join(entry['flags']) or 'none'}")


def _print_result(result) -> None:  # type: ignore[no-untyped-def]
    from .config import format_eps

    norm = result.config["norm"]
    print(f"threat model {norm} eps {format_eps(result.config['eps'], norm)}, {result.n_examples} examples")
    print(f"clean {100 * result.clean_acc:.2f}%")
    for attack, acc in result.attack_acc.items():
        print(f"{attack:>14s} {100 * acc:.2f}%")
    print(f"{'worst case':>14s} {100 * result.worst_case_acc:.2f}%" + (f"  flags: {', '.join(result.flags)}" if result.flags else ""))


@register_command("evaluate", "attack a model (and its defense) and write per-example results", _evaluate_args)
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import distributed
    from .leaderboard import write_result_table
    from .pipeline import run_evaluation

    job = job_from_args(args)
    _print_result(run_evaluation(job))
    if args.audit and distributed.is_main():
        from .audit import audit_job

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
    from .audit import audit_job

    _print_audit(audit_job(job_from_args(args), audit_config(args)))
    return 0


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _add_job_args(p, sweep=True)
    add_attack_args(p, attacks="apgd-ce,bpda")
    p.add_argument("--alphas", default="0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4")
    p.add_argument("--max-clean-drop", type=float, default=0.5,
                   help="rule: best robust accuracy with clean accuracy within this many points of the base")


@register_command("sweep", "calibrate once, evaluate a grid of alpha on held-out data, pick alpha", _sweep_args)
def _cmd_sweep(args: argparse.Namespace) -> int:
    from .pipeline import sweep_alpha

    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    result = sweep_alpha(job_from_args(args), alphas, max_clean_drop=args.max_clean_drop)
    for row in result.curve:
        print(f"alpha {row['alpha']:<5g} clean {row['clean_acc']:.2f}%  worst case {row['worst_case_acc']:.2f}%")
    print(f"chosen alpha: {result.chosen_alpha}  ({result.rule})")
    return 0


def _leaderboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="directory searched recursively for result.json files")
    p.add_argument("--out", default="leaderboard", help="where to write leaderboard.{csv,md}, model_info/, plots/")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)


@register_command("leaderboard", "rebuild the leaderboard tables and plots from results alone", _leaderboard_args)
def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import to_markdown, write_leaderboard

    if not Path(args.results).is_dir():
        raise ValueError(f"results directory {args.results!r} does not exist")
    print(to_markdown(write_leaderboard(args.results, args.out, plots=args.plots)))
    return 0


def _run_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, positional=False)
    p.add_argument("--model", default="aa-resnet18")
    p.add_argument("--data", default="cifar10", help="cifar10 (downloaded), or offline: a .npz file, imagenet:DIR")
    add_workers_arg(p)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--n-examples", type=int, default=100)
    p.add_argument("--n-calib", type=int, default=5000)
    p.add_argument("--eps", default=None, help="default: RobustBench's for the dataset and threat model")
    p.add_argument("--apgd-iters", type=int, default=20)
    p.add_argument("--out", default="runs/quick")


def _check_identity(job, calibration: Path) -> None:  # type: ignore[no-untyped-def]
    """Sanity check of the inserted model: at alpha=0 it must reproduce the base model exactly."""
    import torch

    from .data import load_model_data, to_tensors
    from .meansparse import set_alpha
    from .models import load_model
    from .state import load_calibration

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
    from .attacks import AttackConfig, threat_norm
    from .config import MeanSparseConfig
    from .leaderboard import to_markdown, write_leaderboard
    from .pipeline import EvaluationJob, not_robust_warning, run_evaluation

    out = Path(args.out)
    attack = AttackConfig(attacks=("apgd-ce", "bpda"), norm=threat_norm(args.threat_model), dataset=args.dataset,
                          eps=args.eps, apgd_iters=args.apgd_iters)
    base_job = EvaluationJob(
        model=args.model, data=args.data, dataset=args.dataset, threat_model=args.threat_model,
        weights=args.weights, pretrained=args.pretrained, cache_dir=args.cache_dir, device=args.device,
        n_examples=args.n_examples, n_calib=args.n_calib, attack=attack, out=str(out / "results" / "base"),
        workers=args.workers,
    )
    base = run_evaluation(base_job)
    defended_dir = out / "results" / f"meansparse_{args.alpha:g}"
    defended = run_evaluation(replace(base_job, defense="meansparse", meansparse=MeanSparseConfig(alpha=args.alpha),
                                      out=str(defended_dir)))
    _check_identity(base_job, Path(defended_dir) / "calibration.safetensors")
    print(to_markdown(write_leaderboard(out / "results", out / "leaderboard")))
    print(f"base: clean {100 * base.clean_acc:.2f}%, worst case {100 * base.worst_case_acc:.2f}%; "
          f"MeanSparse alpha={args.alpha:g}: clean {100 * defended.clean_acc:.2f}%, "
          f"worst case {100 * defended.worst_case_acc:.2f}% -> {out / 'leaderboard' / 'leaderboard.md'}")
    warning = not_robust_warning(base, args.model)
    if warning:
        logger.warning("%s", warning)
    return 0
