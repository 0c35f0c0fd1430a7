"""`robustify evaluate` with 1 process vs `torchrun --nproc_per_node=2`: identical results, wall time.

Runs the same evaluation (AT ResNet-18 of ../shared/models, first N CIFAR-10 test images, MeanSparse
alpha 0.2 from one calibration file, APGD-CE + BPDA) once in one process and once under torchrun with two
gloo processes (one thread each, so the two runs use the same cores), checks that result.json's
per-example flags and accuracies are identical, and writes wall times to benchmarks/results/.

Reproduce: python benchmarks/bench_torchrun_eval.py [--n 64 --iters 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from robustify.core.io import atomic_path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict[str, str]) -> None:
    """Run ``cmd``; on failure show its last output lines (the check needs them on a remote GPU)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write("\n".join((proc.stdout + proc.stderr).splitlines()[-30:]) + "\n")
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (with --device cuda: one GPU each)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, process i on cuda:i)")
    p.add_argument("--n-calib", type=int, default=512)
    p.add_argument("--model", default="aa-resnet18", help="aa-resnet18 gets the AT weights of ../shared")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10_subset.npz"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "torchrun_eval.csv"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    data, weights = args.data, SHARED / "models" / "resnet18_at_relu.pt"
    cal = work / "cal.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model = [args.model, "--weights", str(weights)] if args.model == "aa-resnet18" else [args.model]
    run([sys.executable, "-m", "robustify", "calibrate", *model, "--data", str(data),
         "--n-calib", str(args.n_calib), "--device", args.device, "--out", str(cal)], env)
    common = ["evaluate", *model, "--data", str(data), "--defense", "meansparse",
              "--defense-weights", str(cal), "--n-examples", str(args.n), "--attacks", "apgd-ce,bpda",
              "--apgd-iters", str(args.iters), "--attack-batch-size", "16", "--no-progress", "--device", args.device]
    runs = {
        "1 process": [sys.executable, "-m", "robustify", *common, "--out", str(work / "one")],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                                 f"--master_port={free_port()}", "-m", "robustify", *common,
                                 "--out", str(work / "two")],
    }
    wall = {}
    for name, cmd in runs.items():
        start = time.perf_counter()
        run(cmd, env)
        wall[name] = time.perf_counter() - start
    one = json.loads((work / "one" / "result.json").read_text())
    two = json.loads((work / "two" / "result.json").read_text())
    identical = one["per_example"] == two["per_example"] and one["attack_acc"] == two["attack_acc"]
    shutil.rmtree(work)
    row = {
        "command": "python benchmarks/bench_torchrun_eval.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, 1 thread per process",
        "model": args.model, "n_examples": args.n, "apgd_iters": args.iters,
        "device": args.device, "backend": "nccl" if args.device.startswith("cuda") else "gloo", "nproc": args.nproc,
        "wall_1_process_s": round(wall["1 process"], 1), "wall_torchrun_s": round(wall["torchrun"], 1),
        "speedup": round(wall["1 process"] / wall["torchrun"], 3),
        "identical_results": identical, "worst_case_acc": one["worst_case_acc"],
    }
    with atomic_path(args.out) as tmp:
        pd.DataFrame([row]).to_csv(tmp, index=False)
    print(pd.DataFrame([row]).T.to_string())
    if not identical:
        raise SystemExit(f"1-process and {args.nproc}-process results differ")


if __name__ == "__main__":
    main()
