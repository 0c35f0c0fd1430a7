"""Measure the default model (``small-resnet-at``) for its model card: clean accuracy, APGD-CE, and MeanSparse at a
few alphas under APGD-CE, APGD-DLR and BPDA, on the first N test images of the CIFAR-10 subset (Linf 8/255).

    python benchmarks/eval_default_model.py --data ../shared/data/cifar10_subset.npz

writes ``benchmarks/results/default_model_eval.md`` (the compact table of ``robustify run``, with this command);
every per-example result is in ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from robustify.attacks import AttackConfig
from robustify.cli.evaluate import compact_table
from robustify.defenses.meansparse import MeanSparseConfig
from robustify.jobs.evaluate import EvaluationJob, run_evaluation
from robustify.load.small_resnet import NAME
from robustify.reporting.leaderboard import write_leaderboard

RESULTS = Path(__file__).parent / "results" / "default_model_eval.md"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--n-examples", type=int, default=1000)
    p.add_argument("--n-calib", type=int, default=5000)
    p.add_argument("--apgd-iters", type=int, default=20)
    p.add_argument("--alphas", default="0.1,0.2,0.3")
    p.add_argument("--out", default="runs/default_model")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    attack = AttackConfig(attacks=("apgd-ce", "apgd-dlr", "bpda"), apgd_iters=args.apgd_iters)
    base = EvaluationJob(model=NAME, data=args.data, n_examples=args.n_examples, n_calib=args.n_calib,
                         attack=attack, out=f"{args.out}/results/base", progress=False)
    start = time.time()
    run_evaluation(base)
    for alpha in (float(a) for a in args.alphas.split(",")):
        run_evaluation(replace(base, defense="meansparse", defense_config=MeanSparseConfig(alpha=alpha),
                               out=f"{args.out}/results/meansparse_{alpha:g}"))
    seconds = time.time() - start
    table = write_leaderboard(f"{args.out}/results", f"{args.out}/leaderboard", plots=False)
    command = "python benchmarks/eval_default_model.py " + shlex.join(sys.argv[1:])
    RESULTS.write_text(
        f"# {NAME}: measured\n\nCommand: `{command}` ({seconds:.0f} s on a shared 2-core CPU, one thread).\n\n"
        f"Linf eps 8/255, the first {args.n_examples} test images of the CIFAR-10 subset, APGD-CE, APGD-DLR and BPDA "
        f"(APGD-CE and APGD-DLR through MeanSparse's straight-through gradient), {args.apgd_iters} iterations, "
        "1 restart, "
        f"seed 0; MeanSparse calibrated on the first {args.n_calib} training images; accuracies in % with their "
        "exact 95% intervals; `vs base` and `verdict`: paired comparison (exact McNemar) with the base row.\n\n"
        f"```\n{compact_table(table)}\n```\n")
    logging.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()
