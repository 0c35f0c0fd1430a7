"""CLI commands for studies: ``study plan|run|status|report`` (:mod:`robustify.jobs.study`)."""

from __future__ import annotations

import argparse

from robustify.cli.common import register_command
from robustify.jobs.study import EXECUTORS, load_study, plan_study, report_study, run_study, study_status
from robustify.jobs.study.plan import CALIBRATE, EVALUATE

__all__: list[str] = []


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="study_command", required=True)
    plan = sub.add_parser("plan", help="print the expanded cells and the shared steps, running nothing")
    plan.add_argument("file", help="the study file (TOML)")
    plan.add_argument("--out", default="runs/study", help="the study directory the paths are shown under")
    run = sub.add_parser("run", help="run every cell not done yet (rerun to resume)")
    run.add_argument("file", help="the study file (TOML)")
    run.add_argument("--out", required=True, help="the study directory (results in OUT/results/CELL/)")
    run.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="local: worker processes on this machine; slurm: job arrays through submitit")
    run.add_argument("--workers", type=int, default=None,
                     help="local worker processes on CPU (default 1; on CUDA: one per visible GPU; 0: the steps run "
                          "in this process)")
    run.add_argument("--retry-failed", action="store_true", help="rerun the failed steps (and what they skipped)")
    slurm = run.add_argument_group("Slurm resources (override the file's [resources.*] for every step)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", type=int, default=None, help="minutes per step")
    slurm.add_argument("--mem-gb", type=float, default=None)
    slurm.add_argument("--gpus", type=int, default=None, help="GPUs per step (one task each)")
    slurm.add_argument("--cpus", type=int, default=None, help="CPUs per task")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a bar over cells")
    status = sub.add_parser("status", help="one row per cell: state, time, journal passes, error")
    status.add_argument("dir", help="the study directory")
    report = sub.add_parser("report", help="rebuild the leaderboard of all cells in DIR")
    report.add_argument("dir", help="the study directory")
    report.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)


def _print_status(rows: list) -> None:
    width = max([len(r.cell) for r in rows] + [4])
    print(f"{'cell':<{width}}  {'state':<11} {'time':>8} {'passes':>6}  error")
    for r in rows:
        seconds = f"{r.seconds:.1f}s" if isinstance(r.seconds, (int, float)) else "-"
        print(f"{r.cell:<{width}}  {r.state:<11} {seconds:>8} {r.passes:>6}  {r.error}")


@register_command("study", "a grid of models x defenses x settings x attacks from a TOML file: plan, run "
                           "(locally or on Slurm, resumable), status, report", _args)
def _cmd_study(args: argparse.Namespace) -> int:
    if args.study_command == "plan":
        plan = plan_study(load_study(args.file), args.out)
        shared = [s for s in plan.steps if s.kind == CALIBRATE]
        print(f"study {plan.study.name}: {len(plan.cells)} cell(s), {len(shared)} shared calibration step(s)")
        for step in shared:
            users = [s.cell for s in plan.steps if step.id in s.deps]
            print(f"  {step.id} -> {step.path} (used by {len(users)} cell(s))")
        for cell in plan.cells:
            deps = plan.cell_step(cell).deps
            print(f"  {EVALUATE}:{cell.id}" + (f" after {', '.join(deps)}" if deps else ""))
        return 0
    if args.study_command == "run":
        resources = {"partition": args.partition, "time": args.time, "mem_gb": args.mem_gb, "gpus": args.gpus,
                     "cpus": args.cpus}
        rows = run_study(args.file, args.out, args.executor, workers=args.workers, retry_failed=args.retry_failed,
                         progress=args.progress, resources=resources)
        _print_status(rows)
        return 0 if all(r.state == "done" for r in rows) else 1
    if args.study_command == "status":
        _print_status(study_status(args.dir))
        return 0
    from robustify.reporting.leaderboard import to_markdown

    print(to_markdown(report_study(args.dir, plots=args.plots)))
    return 0
