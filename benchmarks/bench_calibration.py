"""Calibration throughput, alpha-sweep cost and 1 vs 2 torchrun processes (issues 2 and 5).

Sections (all in one run, variants interleaved round-robin as in bench_meansparse.py):

* ``calibration``: ``robustify.defenses.meansparse.calibrate`` over N real CIFAR-10 training images vs a plain
  no-grad forward of the base model over the same batches; also the previous statistics
  code (one float64 ``var_mean`` per site and batch) for reference.
* ``alpha_sweep``: a K-point alpha sweep (one calibration, then ``set_alpha`` + clean
  evaluation per point) vs K separate runs (load, insert, calibrate, evaluate each time).
* ``torchrun``: calibration of aa-resnet18 with ``torchrun --nproc_per_node=1`` and ``=2``
  (gloo, one thread per process, the same batches): wall time and whether the statistics
  are identical.

Usage::

    python benchmarks/bench_calibration.py [--images 512] [--batch 128] [--reps 3]

Writes ``benchmarks/results/bench_calibration.csv``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meansparse import (  # noqa: E402
    REPO,
    RESULTS,
    SHARED,
    benchmark_devices,
    command_line,
    interleaved,
    load_average,
    load_benchmark_model,
    machine,
    write_rows,
)

from robustify.defenses import meansparse as ms
import robustify as rb  # noqa: E402
from robustify.core import stats as rstats  # noqa: E402

logger = logging.getLogger("bench_calibration")
WEIGHTS = SHARED / "models" / "resnet18_at_relu.pt"
NPZ = SHARED / "data" / "cifar10_subset.npz"


def _load(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(NPZ) as data:
        x = torch.from_numpy(data[f"x_{split}"][:n]).float().div(255)
        y = torch.from_numpy(data[f"y_{split}"][:n])
    return x, y


MODEL = "aa-resnet18"  # --model


def _model(alpha: float = 0.2, insert: bool = True, device: torch.device | str = "cpu") -> nn.Module:
    model, info = load_benchmark_model(MODEL)
    model.eval().to(device)
    if insert:
        model = ms.insert_meansparse(model, info.example_input(device=device), ms.MeanSparseConfig(alpha=alpha))
    return model


def _old_batch_moments(x: torch.Tensor, channel_dim: int, shift: torch.Tensor | None = None):
    """The statistics code before this change: one float64 var_mean over the whole batch."""
    channel_dim = channel_dim % x.dim()
    dims = [d for d in range(x.dim()) if d != channel_dim]
    n = x.numel() // x.shape[channel_dim]
    var, mean = torch.var_mean(x.detach().to(torch.float64), dim=dims, correction=0)
    return n, mean, var * n


def bench_calibration(args: argparse.Namespace, common: dict[str, object]) -> list[dict[str, object]]:
    device = args.device
    x, _ = _load("train", args.images)
    batches = [b.to(device) for b in x.split(args.batch)]
    base, robust = _model(insert=False, device=device), _model(device=device)

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                base(b)

    def calibrate() -> None:
        rb.calibrate(robust, batches, progress=False)

    def calibrate_old() -> None:
        new = rstats.batch_moments
        rstats.batch_moments = _old_batch_moments
        try:
            rb.calibrate(robust, batches, progress=False)
        finally:
            rstats.batch_moments = new

    times = interleaved({"forward": forward, "calibrate": calibrate, "calibrate_float64_var_mean": calibrate_old},
                        args.reps, device)
    rows = []
    for name, t in times.items():
        ref = times["forward"]
        rows.append({
            **common, "section": "calibration", "variant": name, "images": args.images, "batch": args.batch, **t,
            "throughput_vs_forward_wall": ref["wall_median_ms"] / t["wall_median_ms"],
            "throughput_vs_forward_wall_min": ref["wall_min_ms"] / t["wall_min_ms"],
            "throughput_vs_forward_cpu": ref["cpu_median_ms"] / t["cpu_median_ms"],
        })
    return rows


def bench_alpha_sweep(args: argparse.Namespace, common: dict[str, object]) -> list[dict[str, object]]:
    device = args.device
    xc, _ = _load("train", args.images)
    xt, yt = _load("test", args.eval_images)
    xt, yt = xt.to(device), yt.to(device)
    alphas = [0.05, 0.1, 0.2, 0.3][: args.sweep]
    calib = [b.to(device) for b in xc.split(args.batch)]

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float(torch.cat([model(b).argmax(1) for b in xt.split(args.batch)]).eq(yt).float().mean())

    def sweep() -> list[float]:
        model = _model(device=device)
        rb.calibrate(model, calib, progress=False)
        out = []
        for a in alphas:
            ms.set_alpha(model, a)
            out.append(accuracy(model))
        return out

    def separate() -> list[float]:
        out = []
        for a in alphas:
            model = _model(alpha=a, device=device)
            rb.calibrate(model, calib, progress=False)
            out.append(accuracy(model))
        return out

    if sweep() != separate():
        raise AssertionError("the alpha sweep and separate runs give different accuracies")
    times = interleaved({"separate_runs": separate, "sweep": sweep}, args.sweep_reps, device, warmup=0)
    rows = []
    for name, t in times.items():
        rows.append({
            **common, "section": "alpha_sweep", "variant": name, "points": len(alphas), "images": args.images,
            "eval_images": args.eval_images, **t,
            "ratio_wall_median": t["wall_median_ms"] / times["separate_runs"]["wall_median_ms"],
            "ratio_cpu_median": t["cpu_median_ms"] / times["separate_runs"]["cpu_median_ms"],
        })
    return rows


TORCHRUN_WORKER = textwrap.dedent(
    """
    import sys, time, numpy as np, torch, robustify as rb
    from robustify import distributed
    distributed.init_from_env()
    images, batch, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with np.load(sys.argv[4]) as data:
        x = torch.from_numpy(data["x_train"][:images]).float().div(255)
    model, info = rb.load_model("aa-resnet18", weights=sys.argv[5])
    model = ms.insert_meansparse(model.eval(), info.example_input(), ms.MeanSparseConfig(alpha=0.2))
    part = distributed.shard(images)
    distributed.barrier()
    t0 = time.perf_counter()
    rb.calibrate(model, x[part.start:part.stop].split(batch), progress=False)
    distributed.barrier()
    seconds = time.perf_counter() - t0
    if distributed.is_main():
        torch.save({"seconds": seconds, "stats": {s: (m.moments.count, m.moments.mean, m.moments.m2, m.mean, m.var)
                    for s, m in ms.meansparse_modules(model).items()}}, out)
    """
)


def bench_torchrun(args: argparse.Namespace, common: dict[str, object]) -> list[dict[str, object]]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(TORCHRUN_WORKER)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        for nproc in (1, 2):
            out = Path(tmp) / f"out{nproc}.pt"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={29500 + nproc}", str(script),
                   str(args.torchrun_images), str(args.batch), str(out), str(NPZ), str(WEIGHTS)]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
            total = time.perf_counter() - t0
            results[nproc] = (torch.load(out, weights_only=False), total)
    one, two = results[1][0], results[2][0]
    max_rel = 0.0
    identical = True
    for site, (count, mean, m2, fmean, fvar) in one["stats"].items():
        c2, mean2, m22, fmean2, fvar2 = two["stats"][site]
        identical &= count == c2 and torch.equal(fmean, fmean2) and torch.equal(fvar, fvar2)
        max_rel = max(max_rel, float(((mean - mean2).abs() / mean.abs().clamp_min(1e-30)).max()),
                      float(((m2 - m22).abs() / m2.abs().clamp_min(1e-30)).max()))
    rows = []
    for nproc, (res, total) in results.items():
        rows.append({
            **common, "section": "torchrun", "variant": f"nproc_{nproc}", "images": args.torchrun_images,
            "batch": args.batch, "calibration_s": res["seconds"], "process_wall_s": total,
            "speedup_calibration": results[1][0]["seconds"] / res["seconds"],
            "float32_stats_identical": identical, "float64_moments_max_rel_diff": max_rel,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    global MODEL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sweep", type=int, default=4, help="points of the alpha sweep (at most 4)")
    p.add_argument("--sweep-reps", type=int, default=1)
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--torchrun-images", type=int, default=1024)
    p.add_argument("--sections", nargs="+", default=["calibration", "alpha_sweep", "torchrun"])
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cpu, then cuda too when available; torchrun runs on CPU/gloo)")
    p.add_argument("--model", default=MODEL, help="calibration and alpha_sweep sections (torchrun: aa-resnet18)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_calibration.csv")
    args = p.parse_args(argv)
    MODEL = args.model
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not NPZ.is_file():
        raise SystemExit(f"{NPZ} not found: this benchmark uses the shared CIFAR-10 subset")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = benchmark_devices(args.device)
    info = {"command": command_line(), "machine": machine(), "load_before": load_average()}
    rows: list[dict[str, object]] = []
    sections = {"calibration": bench_calibration, "alpha_sweep": bench_alpha_sweep, "torchrun": bench_torchrun}
    for device in devices:
        args.device = device
        common = {"model": args.model, "device": device.type, "threads": torch.get_num_threads(), "reps": args.reps}
        for name in args.sections:
            if name == "torchrun" and device.type != "cpu":
                continue  # the torchrun section measures CPU processes (gloo)
            t0 = time.time()
            rows += sections[name](args, common)
            logger.info("%s %s done in %.0f s", device.type, name, time.time() - t0)
    info["load_after"] = load_average()
    write_rows(args.out, [{**row, **info} for row in rows])
    for row in rows:
        logger.info("%s", {k: v for k, v in row.items() if k not in ("command", "machine")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
