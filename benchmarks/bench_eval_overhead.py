"""Overhead of robustify's evaluation engine over calling pyautoattack directly.

Same model (the adversarially trained ResNet-18 of ../shared/models), same images (first N test
images of ../shared/data), same attack (APGD-CE, same iterations, seed and batch size): one
`pyautoattack.AutoAttack(version='custom').run_standard_evaluation` call against one
`robustify.evaluation.engine` call (with its resumable journal on disk). Runs are interleaved
(direct, robustify, direct, robustify, ...) so machine noise hits both alike; the ratio of
the medians is reported, and the per-example results are checked to be identical.

Reproduce: python benchmarks/bench_eval_overhead.py [--n 64 --iters 10 --reps 3]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import robustify as rb
from robustify.attacks import AttackConfig, _set_apgd_iters
from robustify.evaluation.engine import evaluate
from robustify.core.io import atomic_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meansparse import DATA, REPO as ROOT, load_benchmark_model  # noqa: E402


def direct(model, x, y, iters, batch_size, device):  # type: ignore[no-untyped-def]
    from pyautoattack import AutoAttack

    x, y = x.to(device), y.to(device)
    aa = AutoAttack(model, attacks=["apgd-ce"], version="custom", eps=8 / 255, seed=0, device=device)
    _set_apgd_iters(aa.apgd, iters)
    aa.apgd.n_restarts = 1  # AutoAttack's 'custom' version keeps the constructor's 5; robustify's default is 1
    start = time.perf_counter()
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, (y_adv != y).long().cpu().tolist()


def ours(model, x, y, iters, batch_size, device):  # type: ignore[no-untyped-def]
    out = Path(tempfile.mkdtemp())
    try:
        start = time.perf_counter()
        result = evaluate(model, x, y, AttackConfig(attacks=("apgd-ce",), apgd_iters=iters, batch_size=batch_size),
                          out_dir=out, progress=False, device=device)
        elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(out)
    # pyautoattack counts a misclassified clean example as broken (its y_adv is the clean prediction)
    flags = [1 if c == 0 else v for c, v in zip(result.per_example["clean_correct"], result.per_example["apgd-ce"])]
    return elapsed, [1 if f else 0 for f in flags]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="aa-resnet18")
    p.add_argument("--data", default=str(DATA), help=".npz (x_train, y_train, x_test, y_test)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_overhead.csv"))
    args = p.parse_args()
    device = torch.device(args.device)
    model, _ = load_benchmark_model(args.model, device=device)
    x, y = rb.to_tensors(rb.load_data(str(args.data), "test", n=args.n))
    times = {"pyautoattack": [], "robustify": []}
    flags = {}
    for _ in range(args.reps):
        for name, fn in (("pyautoattack", direct), ("robustify", ours)):
            t, f = fn(model, x, y, args.iters, args.batch_size, device)
            times[name].append(t)
            flags[name] = f
    identical = flags["pyautoattack"] == flags["robustify"]
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "command": "python benchmarks/bench_eval_overhead.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__, "model": args.model,
        "device": device.type, "n_examples": args.n, "apgd_iters": args.iters, "reps": args.reps,
        "pyautoattack_s_median": round(med["pyautoattack"], 3), "robustify_s_median": round(med["robustify"], 3),
        "overhead_ratio": round(med["robustify"] / med["pyautoattack"], 4),
        "all_pyautoattack_s": " ".join(f"{t:.3f}" for t in times["pyautoattack"]),
        "all_robustify_s": " ".join(f"{t:.3f}" for t in times["robustify"]),
        "identical_per_example_results": identical,
    }
    with atomic_path(args.out) as tmp:
        pd.DataFrame([row]).to_csv(tmp, index=False)
    print(pd.DataFrame([row]).T.to_string())
    if not identical:
        raise SystemExit("per-example results of robustify and pyautoattack differ")


if __name__ == "__main__":
    main()
