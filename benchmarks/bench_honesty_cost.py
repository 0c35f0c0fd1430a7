"""What honesty costs: robustify's default evaluation against AutoAttack's standard suite.

Same model (the adversarially trained ResNet-18 of ../shared/models with MeanSparse at
alpha=0.2, calibrated on the first --n-calib training images of ../shared/data), same images
(the first --n test images), same seed, batch size and (cut) budgets, stated in the CSV:

* ``pyautoattack``: ``AutoAttack(version='standard').run_standard_evaluation`` (APGD-CE,
  APGD-T, FAB-T, Square), as RobustBench runs it;
* ``robustify-autoattack``: robustify's engine running the same suite (``--attacks autoattack``):
  its per-example results must be identical to pyautoattack's;
* ``robustify-default``: robustify's default evaluation (``DEFAULT_ATTACKS``: standard
  APGD-CE/DLR and Square, then BPDA-APGD-CE/DLR, BPDA-APGD-T, the adaptive attack and the
  transfer attack, in sequence on the still-unbroken examples).

Forward and backward example-passes are counted with :class:`robustify.evaluation.cost.PassCounter`
hooks on the model around each whole run (AutoAttack's own checks included in both), and
wall time is measured (after a warm-up pass, runs interleaved, the minimum of --reps: other jobs
share this machine's two cores, and a disturbed run can take several times longer); the CSV gives
the ratios to pyautoattack's, of passes and of the minimum wall times.

Reproduce (about 10 minutes on 2 busy CPU cores):
    python benchmarks/bench_honesty_cost.py --n 16 --iters 5 --square-queries 50 --n-calib 256 --reps 3 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from robustify.defenses import meansparse as ms
import robustify as rb
from robustify.attacks import AttackConfig, make_autoattack
from robustify.evaluation.cost import PassCounter
from robustify.evaluation.engine import evaluate
from robustify.cli.evaluate import DEFAULT_ATTACKS
from robustify.core.io import atomic_path
from robustify.jobs.evaluate import _applicable

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def budgets(args: argparse.Namespace, attacks: tuple[str, ...]) -> AttackConfig:
    return AttackConfig(attacks=attacks, eps=8 / 255, seed=0, batch_size=args.batch_size, apgd_iters=args.iters,
                        apgd_t_iters=args.iters, fab_iters=args.iters, square_queries=args.square_queries,
                        adaptive_steps=args.iters)


def defended_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    data = str(SHARED / "data" / "cifar10_subset.npz")
    model, info = rb.load_model("aa-resnet18", weights=SHARED / "models" / "resnet18_at_relu.pt")
    xc, _ = rb.to_tensors(rb.load_data(data, "train", n=args.n_calib))
    model = ms.insert_meansparse(model, info.example_input(), ms.MeanSparseConfig(alpha=args.alpha))
    rb.calibrate(model, [xc[i : i + 128] for i in range(0, len(xc), 128)], progress=False)
    x, y = rb.to_tensors(rb.load_data(data, "test", n=args.n))
    return model.eval(), x, y


def run_pyautoattack(model, x, y, config):  # type: ignore[no-untyped-def]
    aa = make_autoattack(model, config, "cpu")
    with PassCounter(model) as passes:
        start = time.perf_counter()
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=config.batch_size)
        seconds = time.perf_counter() - start
    return {"robust": (y_adv == y).tolist(), "forward": passes.forward, "backward": passes.backward,
            "seconds": seconds}


def run_robustify(model, x, y, config):  # type: ignore[no-untyped-def]
    with PassCounter(model) as passes:
        start = time.perf_counter()
        result = evaluate(model, x, y, config, progress=False)
        seconds = time.perf_counter() - start
    per = result.per_example
    robust = [c == 1 and not any(per[a][i] == 1 for a in result.attack_acc) for i, c in enumerate(per["clean_correct"])]
    return {"robust": robust, "forward": passes.forward, "backward": passes.backward, "seconds": seconds,
            "per_example": per, "cost": result.cost}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--iters", type=int, default=5, help="APGD-CE/DLR/T, FAB-T and adaptive iterations (published: 100/50)")
    p.add_argument("--square-queries", type=int, default=50, help="published: 5000")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared machine, more threads than free cores makes OpenMP "
                        "barriers stall and timings jump by 10x)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "honesty_cost.csv"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, x, y = defended_model(args)
    for q in model.parameters():
        q.requires_grad_(False)
    suite = budgets(args, ("autoattack",))
    default, _ = _applicable(budgets(args, tuple(DEFAULT_ATTACKS.split(","))), model, "meansparse")
    log = logging.getLogger("bench_honesty_cost")
    with torch.enable_grad():  # warm-up outside the timings (first-call allocations and thread pools)
        xw = x[:4].clone().requires_grad_(True)
        model(xw).sum().backward()
    runs: dict[str, dict] = {}
    times: dict[str, list[float]] = {}
    plan = (("pyautoattack", run_pyautoattack, suite), ("robustify-autoattack", run_robustify, suite),
            ("robustify-default", run_robustify, default))
    for _ in range(args.reps):  # interleaved, so machine noise hits every run alike
        for name, fn, config in plan:
            runs[name] = fn(model, x, y, config)
            times.setdefault(name, []).append(runs[name]["seconds"])
            log.warning("%s: %.1f s, %d forward + %d backward example-passes", name, runs[name]["seconds"],
                        runs[name]["forward"], runs[name]["backward"])
    for name in runs:  # the least disturbed run: other jobs share this machine's cores
        runs[name]["seconds"] = min(times[name])
    aa = runs["pyautoattack"]
    same_suite = runs["robustify-autoattack"]["robust"] == aa["robust"]
    # the attacks both robustify runs share (APGD-CE first, same seed, same examples) must agree exactly
    same_apgd_ce = runs["robustify-autoattack"]["per_example"]["apgd-ce"] == runs["robustify-default"]["per_example"]["apgd-ce"]
    rows = []
    for name, run in runs.items():
        passes = run["forward"] + run["backward"]
        rows.append({
            "command": "python benchmarks/bench_honesty_cost.py " + " ".join(sys.argv[1:]),
            "run": name,
            "attacks": ",".join(suite.attacks if name != "robustify-default" else default.attacks),
            "n_examples": args.n, "alpha": args.alpha, "n_calib": args.n_calib,
            "budgets": f"apgd/apgd-t/fab/adaptive iters={args.iters}, apgd-t/fab targets=9, square queries="
                       f"{args.square_queries}, restarts=1, batch={args.batch_size}",
            "robust_acc": round(100 * sum(run["robust"]) / args.n, 2),
            "forward_passes": run["forward"], "backward_passes": run["backward"], "passes": passes,
            "passes_per_example": round(passes / args.n, 1),
            "seconds_min": round(run["seconds"], 2), "seconds_median": round(statistics.median(times[name]), 2),
            "reps": args.reps,
            "all_seconds": " ".join(f"{t:.2f}" for t in times[name]),
            "passes_ratio_vs_pyautoattack": round(passes / max(aa["forward"] + aa["backward"], 1), 3),
            "seconds_ratio_vs_pyautoattack": round(run["seconds"] / aa["seconds"], 3),
            "identical_per_example_to_pyautoattack": same_suite if name == "robustify-autoattack" else "",
            "identical_apgd_ce_to_robustify_autoattack": same_apgd_ce if name == "robustify-default" else "",
            "cost_per_attack": " ".join(f"{a}={c['forward_per_example']:g}+{c['backward_per_example']:g}/ex"
                                        for a, c in run.get("cost", {}).items() if a != "clean"),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__,
        })
    df = pd.DataFrame(rows)
    with atomic_path(args.out) as tmp:
        df.to_csv(tmp, index=False)
    print(df.drop(columns=["command", "budgets", "machine", "torch"]).to_string())
    if not same_suite:
        raise SystemExit("robustify's autoattack suite gave other per-example results than pyautoattack's")


if __name__ == "__main__":
    main()
