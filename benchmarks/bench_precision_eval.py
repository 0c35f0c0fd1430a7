"""Mixed-precision evaluation (``--precision bfloat16|float16``) against float32.

The adversarially trained ResNet-18 of ../shared/models with MeanSparse (alpha 0.2, calibrated
in float32 on the shared CIFAR-10 training images), the first N test images, APGD-CE and
BPDA-APGD-CE: one ``robustify.evaluation.engine`` per precision (``robustify.evaluation.fast.for_evaluation``
with autocast). Reported: wall time, clean/worst-case accuracy and per-example agreement with
float32 (rounding differs, so examples near a decision boundary may differ). What must hold
exactly: the MeanSparse statistics stay float32 and unchanged by every mixed-precision
evaluation; otherwise the script exits non-zero (after writing the CSV).

Reproduce: python benchmarks/bench_precision_eval.py [--n 64 --iters 10 --device cuda]
Writes ``benchmarks/results/precision_eval.csv``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compiled_eval import _defended, _run, add_eval_args, start  # noqa: E402
from bench_meansparse import RESULTS, load_average, write_rows  # noqa: E402

from robustify.defenses import meansparse as ms
import robustify as rb  # noqa: E402
from robustify.attacks import AttackConfig  # noqa: E402
from robustify.evaluation.fast import for_evaluation  # noqa: E402

logger = logging.getLogger("bench_precision_eval")


def statistics_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every MeanSparse site's mean and variance (copies)."""
    return {f"{site}.{name}": getattr(m, name).detach().clone()
            for site, m in ms.meansparse_modules(model).items() for name in ("mean", "var")}


def same_float32_statistics(reference: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    now = statistics_of(model)
    return now.keys() == reference.keys() and all(
        t.dtype == torch.float32 and torch.equal(t, reference[k]) for k, t in now.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(p)
    p.add_argument("--precisions", nargs="+", default=["bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=RESULTS / "precision_eval.csv")
    args = p.parse_args(argv)
    device, info = start(args)
    defended = _defended(device, args.n_calib, args.model, args.data)
    reference = statistics_of(defended)
    x, y = rb.to_tensors(rb.load_data(str(args.data), "test", n=args.n))
    config = AttackConfig(attacks=("apgd-ce", "bpda-apgd-ce"), apgd_iters=args.iters, batch_size=args.batch_size)
    results = {}
    for precision in ["float32", *args.precisions]:
        model = copy.deepcopy(defended)
        seconds, per_example = _run(for_evaluation(model, precision=precision, device=device), x, y, config, device)
        results[precision] = (seconds, per_example, same_float32_statistics(reference, model))
        logger.info("%s: %.1f s", precision, seconds)
    base_seconds, base_flags, _ = results["float32"]
    rows = []
    for precision, (seconds, flags, stats_ok) in results.items():
        robust = [c == 1 and not any(flags[a][i] == 1 for a in config.attacks)
                  for i, c in enumerate(flags["clean_correct"])]
        rows.append({
            **info, "model": args.model, "device": device.type, "precision": precision, "n_examples": args.n,
            "apgd_iters": args.iters,
            "attacks": ",".join(config.attacks), "seconds": seconds, "speedup_vs_float32": base_seconds / seconds,
            "clean_acc": sum(flags["clean_correct"]) / args.n, "worst_case_acc": sum(robust) / args.n,
            **{f"agreement_{k}": sum(u == v for u, v in zip(flags[k], base_flags[k])) / args.n for k in flags},
            "statistics_float32_unchanged": stats_ok, "load_after": load_average(),
        })
    write_rows(args.out, rows)
    for row in rows:
        logger.info("%s", {k: v for k, v in row.items() if k not in ("command", "machine")})
    if not all(r["statistics_float32_unchanged"] for r in rows):
        logger.error("MeanSparse statistics changed dtype or value during a mixed-precision evaluation")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
