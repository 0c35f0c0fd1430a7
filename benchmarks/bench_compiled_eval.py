"""Is ``--compile`` worth it? ``robustify.evaluation.engine`` on the eager vs the compiled model.

The adversarially trained ResNet-18 of ../shared/models with MeanSparse (alpha 0.2,
calibrated on the shared CIFAR-10 training images), the first N test images, APGD-CE and
BPDA-APGD-CE: one evaluation of the eager (fused) model and one of the compiled model
(``robustify.evaluation.fast.for_evaluation(compile=True)``), interleaved over the repetitions. The
compiled wall time of the first repetition includes compilation; later ones reuse it (as a
long evaluation would). Per-example agreement is reported (float32 rounding differs between
the two, so an example on the edge of a band may differ).

Reproduce: python benchmarks/bench_compiled_eval.py [--n 64 --iters 10 --reps 3 --threads 1]
Writes ``benchmarks/results/compiled_eval.csv``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meansparse import (  # noqa: E402
    DATA, RESULTS, command_line, load_average, load_benchmark_model, machine, write_rows,
)

from robustify.defenses import meansparse as ms
import robustify as rb  # noqa: E402
from robustify.attacks import AttackConfig  # noqa: E402
from robustify.evaluation.engine import evaluate  # noqa: E402
from robustify.evaluation.fast import for_evaluation  # noqa: E402

logger = logging.getLogger("bench_compiled_eval")


def _defended(device: torch.device, n_calib: int = 1024, spec: str = "aa-resnet18",
              data: str | Path = DATA) -> torch.nn.Module:
    model, info = load_benchmark_model(spec, device=device)
    model = ms.insert_meansparse(model, info.example_input(device=device), ms.MeanSparseConfig(alpha=0.2))
    calib = rb.load_data(str(data), "train", n=n_calib)
    rb.calibrate(model, rb.loader(calib, batch_size=256), device=device, progress=False)
    return model


def _run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config: AttackConfig,
         device: torch.device) -> tuple[float, dict]:
    out = Path(tempfile.mkdtemp())
    try:
        start = time.perf_counter()
        result = evaluate(model, x, y, config, out_dir=out, progress=False, device=device)
        return time.perf_counter() - start, result.per_example
    finally:
        shutil.rmtree(out)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with bench_precision_eval.py: images, attack budget, model, data, device."""
    for flag, default in (("--n", 64), ("--iters", 10), ("--batch-size", 64), ("--n-calib", 1024)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="aa-resnet18")
    p.add_argument("--data", type=Path, default=DATA, help=".npz (x_train, y_train, x_test, y_test)")


def start(args: argparse.Namespace) -> tuple[torch.device, dict[str, str]]:
    """Logging and threads; the device and the machine description."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device), {"command": command_line(), "machine": machine(), "load_before": load_average()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(p)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "compiled_eval.csv")
    args = p.parse_args(argv)
    device, info = start(args)
    eager = for_evaluation(_defended(device, args.n_calib, args.model, args.data), device=device)
    compiled = for_evaluation(copy.deepcopy(eager), compile=True, device=device)
    x, y = rb.to_tensors(rb.load_data(str(args.data), "test", n=args.n))
    config = AttackConfig(attacks=("apgd-ce", "bpda-apgd-ce"), apgd_iters=args.iters, batch_size=args.batch_size)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    flags: dict[str, dict] = {}
    for rep in range(args.reps):
        for name, model in (("eager", eager), ("compiled", compiled))[:: 1 if rep % 2 == 0 else -1]:
            t, flags[name] = _run(model, x, y, config, device)
            times[name].append(t)
            logger.info("rep %d %s: %.1f s", rep, name, t)
    agree = {a: sum(u == v for u, v in zip(flags["eager"][a], flags["compiled"][a])) / args.n
             for a in flags["eager"]}
    later = {k: statistics.median(v[1:]) if len(v) > 1 else v[0] for k, v in times.items()}
    row = {
        **info, "device": device.type, "threads": torch.get_num_threads(), "n_examples": args.n,
        "apgd_iters": args.iters, "reps": args.reps, "attacks": ",".join(config.attacks),
        "eager_first_s": times["eager"][0], "compiled_first_s_incl_compile": times["compiled"][0],
        "eager_later_median_s": later["eager"], "compiled_later_median_s": later["compiled"],
        "speedup_later": later["eager"] / later["compiled"],
        "speedup_first": times["eager"][0] / times["compiled"][0],
        **{f"agreement_{a}": v for a, v in agree.items()},
        "load_after": load_average(),
    }
    write_rows(args.out, [row])
    for k, v in row.items():
        logger.info("%s: %s", k, v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
