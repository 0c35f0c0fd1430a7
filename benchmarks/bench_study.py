"""The study machinery's cost: a 6-cell study (1 model x base + MeanSparse at 2 alphas x 2 attack sets) run by
``robustify study run`` on 1 and on 2 local workers, against the same cells as separate commands (one
``robustify calibrate``, then one ``robustify evaluate --defense-weights`` per cell, as the leaderboard script did),
side by side in one run, alternating the variants over ``--rounds``. Every variant's per-example results are checked
identical to the separate commands'.

Usage (from the repository root)::

    python benchmarks/bench_study.py --rounds 2

Writes ``benchmarks/results/bench_study.csv`` and ``bench_study.md`` (with the command).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ATTACKS = {"ce": ["apgd-ce"], "bpda": ["apgd-dlr", "bpda"]}
ALPHAS = (0.1, 0.2)


def _study(path: Path, args: argparse.Namespace) -> None:
    text = (f'[study]\ndata = "{args.data}"\nn_examples = {args.n}\nn_calib = {args.n_calib}\nseed = 0\n\n'
            f'[[models]]\nname = "m"\nmodel = "{args.model}"\n'
            + (f'weights = "{args.weights}"\n' if args.weights else "")
            + '\n[[defenses]]\ndefense = "none"\n\n'
            f'[[defenses]]\ndefense = "meansparse"\ngrid = {{ alpha = {list(ALPHAS)} }}\n\n')
    for name, attacks in ATTACKS.items():
        text += (f'[[attacks]]\nname = "{name}"\nattacks = {json.dumps(attacks)}\napgd_iters = {args.iters}\n'
                 f'batch_size = {args.n}\n\n')
    path.write_text(text)


def _robustify(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "robustify", *argv], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _separate(out: Path, args: argparse.Namespace) -> None:
    model = [args.model, "--data", args.data] + (["--weights", args.weights] if args.weights else [])
    cal = out / "calibration.safetensors"
    _robustify("calibrate", *model, "--out", str(cal), "--n-calib", str(args.n_calib))
    for name, attacks in ATTACKS.items():
        common = ["--n-examples", str(args.n), "--attacks", ",".join(attacks), "--apgd-iters", str(args.iters),
                  "--attack-batch-size", str(args.n), "--seed", "0", "--no-progress"]
        _robustify("evaluate", *model, "--defense", "none", "--out", str(out / "m" / "base" / name), *common)
        for a in ALPHAS:
            _robustify("evaluate", *model, "--defense", "meansparse", "--defense-weights", str(cal), "--alpha", str(a),
                       "--out", str(out / "m" / f"meansparse_{a:g}" / name), *common)


def _per_example(root: Path) -> dict[str, object]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text())["per_example"]
            for p in sorted(root.rglob("result.json"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="aa-resnet18")
    p.add_argument("--weights", default=str(REPO.parent / "shared" / "models" / "resnet18_at_relu.pt"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10_subset.npz"))
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--n-calib", type=int, default=512)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = tmp / "bench.toml"
        _study(study, args)
        variants = {
            "separate commands": lambda out: _separate(out, args),
            "study, 1 worker": lambda out: _robustify("study", "run", str(study), "--out", str(out), "--workers", "1",
                                                      "--no-progress"),
            "study, 2 workers": lambda out: _robustify("study", "run", str(study), "--out", str(out), "--workers", "2",
                                                       "--no-progress"),
        }
        reference = None
        for r in range(args.rounds):
            for name, run in variants.items():
                out = tmp / f"{r}-{name.replace(' ', '_').replace(',', '')}"
                start = time.perf_counter()
                run(out)
                seconds = time.perf_counter() - start
                results = _per_example(out / "results" if (out / "results").is_dir() else out)
                reference = reference or results
                assert results == reference, f"{name}: per-example results differ from the separate commands'"
                rows.append({"round": r, "variant": name, "seconds": round(seconds, 2), "cells": len(results)})
                print(f"round {r}: {name}: {seconds:.1f}s ({len(results)} cells)", flush=True)
                shutil.rmtree(out)
    base = {r["round"]: r["seconds"] for r in rows if r["variant"] == "separate commands"}
    for row in rows:
        row["ratio_vs_separate"] = round(float(row["seconds"]) / float(base[row["round"]]), 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "bench_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    median = {v: statistics.median(float(r["ratio_vs_separate"]) for r in rows if r["variant"] == v)
              for v in variants}
    command = shlex.join(["python", "benchmarks/bench_study.py", *sys.argv[1:]])
    lines = [f"# Study machinery vs separate commands ({args.model}, {args.n} examples, APGD {args.iters} iterations, "
             f"6 cells, {args.rounds} round(s), {os.cpu_count()} CPUs)", "",
             f"Command: `{command}` (per-example results of every variant checked identical).", "",
             "| variant | median wall time / separate commands |", "|---|---|"]
    lines += [f"| {v} | {m:.3f} |" for v, m in median.items()]
    (RESULTS / "bench_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
