"""MeanSparse cost vs the base model, measured side by side in one run (issues 2 and 5).

Variants, interleaved round-robin (the starting variant rotates every repetition) so
that load from other processes hits all of them alike:

* ``base``: the model without MeanSparse (a separate copy, no hooks);
* ``fast``: robustify's MeanSparse, eager fast path (alpha 0.2, every activation site), as
  ``insert_meansparse`` leaves the model;
* ``fused``: the same after ``fuse_meansparse`` (what ``robustify evaluate`` attacks): ReLU
  hosts rectify MeanSparse's output in place;
* ``published``: the operator exactly as the published module computes it,
  ``torch.where(abs(x - mean) < crop, mean * ones_like(x), x)`` behind ``if threshold == 0``;
* ``bpda``: the fast path in BPDA mode (identity backward), forward+backward only;
* ``compiled_base`` / ``compiled``: ``torch.compile`` of each (``--compile``).

Metrics: ``forward`` (no grad, eval) and ``forward_backward`` (cross-entropy gradient
with respect to the input, as one attack step computes it; parameters frozen, as
``robustify.evaluation.engine`` freezes them during attacks). ``compiled`` is
``robustify.evaluation.fast.compile_model``, which fuses MeanSparse with its ReLU hosts. For every variant the CSV
holds the median and minimum wall time and the median process CPU time; ratios are
variant / base of the same metric (compiled variants / compiled base).

Usage::

    python benchmarks/bench_meansparse.py                    # aa-resnet18 b128 + ViT-tiny b16
    python benchmarks/bench_meansparse.py --compile          # + torch.compile rows
    python benchmarks/bench_meansparse.py --threads 1 --reps 9

Writes ``benchmarks/results/bench_meansparse.csv`` (one row per model/metric/variant).
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from robustify.defenses import meansparse as ms
import robustify as rb  # noqa: E402
from robustify.core.io import write_text  # noqa: E402
from robustify.defenses.meansparse.module import MeanSparse  # noqa: E402

logger = logging.getLogger("bench_meansparse")
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"


# -- measurement helpers (also used by bench_calibration.py) ------------------------------
def machine() -> str:
    """One-line description of the machine and the software."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__}; {torch.get_num_threads()} threads; "
        f"{gpu}; python {platform.python_version()}; {platform.system()} {platform.release()}"
    )


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return ""


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def benchmark_devices(requested: str | None) -> list[torch.device]:
    """The requested device, or the CPU followed by CUDA when it is available."""
    if requested:
        return [torch.device(requested)]
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    variants: dict[str, Callable[[], object]], reps: int, device: torch.device, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Time every variant ``reps`` times, round-robin, rotating the starting variant."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
            sync(device)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            variants[name]()
            sync(device)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {
        n: {
            "wall_median_ms": 1e3 * statistics.median(wall[n]),
            "wall_min_ms": 1e3 * min(wall[n]),
            "cpu_median_ms": 1e3 * statistics.median(cpu[n]),
        }
        for n in names
    }


def write_rows(path: Path, rows: list[dict[str, object]]) -> None:
    """Write rows as CSV, atomically; the columns are the union of the rows' keys, in order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buf.getvalue())
    logger.info("wrote %s", path)


def ratio_rows(
    times: dict[str, dict[str, float]], base: dict[str, str], common: dict[str, object]
) -> list[dict[str, object]]:
    """Rows with ratios of each variant to its base variant (``base[variant]``)."""
    rows = []
    for name, t in times.items():
        ref = times[base.get(name, "base")]
        rows.append(
            {
                **common,
                "variant": name,
                **t,
                "ratio_wall_median": t["wall_median_ms"] / ref["wall_median_ms"],
                "ratio_wall_min": t["wall_min_ms"] / ref["wall_min_ms"],
                "ratio_cpu_median": t["cpu_median_ms"] / ref["cpu_median_ms"],
            }
        )
    return rows


# -- the published operator ----------------------------------------------------------------
def _published_forward(self: MeanSparse, x: torch.Tensor) -> torch.Tensor:
    """The published module's forward (threshold as a tensor, as in its state dict)."""
    threshold = self._published_threshold
    if threshold == 0:
        return x
    shape = self._broadcast_shape(x.dim())
    mean = self.mean.view(shape)
    crop = threshold * torch.sqrt(self.var).view(shape)
    return torch.where(abs(x - mean) < crop, mean * torch.ones_like(x), x)


def use_published(model: nn.Module, on: bool) -> None:
    """Swap every MeanSparse forward for the published operator (``on``) or back."""
    for m in ms.meansparse_modules(model).values():
        if on:
            m._published_threshold = torch.tensor(m.alpha, device=m.mean.device)
            m.forward = types.MethodType(_published_forward, m)
        elif "forward" in m.__dict__:
            del m.forward


# -- models ----------------------------------------------------------------------------------
AT_WEIGHTS = SHARED / "models" / "resnet18_at_relu.pt"
DATA = SHARED / "data" / "cifar10_subset.npz"  # the evaluation benchmarks' --data default


def load_benchmark_model(spec: str = "aa-resnet18", device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """``spec`` as the benchmarks load it: aa-resnet18 with the adversarially trained weights of ../shared,
    timm models untrained; a tiny model (tests' ``tinynets:tiny_cnn``) makes a quick dry run."""
    kwargs: dict[str, object] = {"device": device}
    if spec == "aa-resnet18" and AT_WEIGHTS.is_file():
        kwargs["weights"] = AT_WEIGHTS
    if spec.startswith("timm:"):
        kwargs["pretrained"] = False
    return rb.load_model(spec, **kwargs)


def build(
    spec: str, batch: int, alpha: float, device: torch.device
) -> tuple[nn.Module, nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Base model, robustified copy (calibrated), a fused copy of that, inputs and labels."""
    base, info = load_benchmark_model(spec)
    robust, _ = load_benchmark_model(spec)
    if spec.startswith("timm:"):
        robust.load_state_dict(base.state_dict())
    base, robust = base.eval().to(device), robust.eval().to(device)
    for p in [*base.parameters(), *robust.parameters()]:
        p.requires_grad_(False)  # as during evaluation: input gradients only
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *info.input_size, generator=g)
    npz = DATA
    if tuple(info.input_size) == (3, 32, 32) and npz.is_file():
        import numpy as np

        with np.load(npz) as data:
            x = torch.from_numpy(data["x_test"][:batch]).float().div(255)
    y = torch.randint(0, info.num_classes, (batch,), generator=g)
    x, y = x.to(device), y.to(device)
    robust = ms.insert_meansparse(robust, x[:2], ms.MeanSparseConfig(alpha=alpha))
    rb.calibrate(robust, [x], progress=False)
    fused = copy.deepcopy(robust)
    ms.fuse_meansparse(fused)
    return base, robust, fused, x, y


def forward_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def forward_backward_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bpda: bool = False) -> Callable[[], object]:
    def run() -> object:
        xa = x.clone().requires_grad_(True)
        if bpda:
            with rb.bpda(model):
                loss = nn.functional.cross_entropy(model(xa), y)
        else:
            loss = nn.functional.cross_entropy(model(xa), y)
        (grad,) = torch.autograd.grad(loss, xa)
        return grad

    return run


class _Published:
    """Callable that runs ``fn`` with the published operator swapped in."""

    def __init__(self, model: nn.Module, fn: Callable[[], object]) -> None:
        self.model, self.fn = model, fn

    def __call__(self) -> object:
        use_published(self.model, True)
        try:
            return self.fn()
        finally:
            use_published(self.model, False)


def bench_model(spec: str, batch: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, object]]:
    base, robust, fused, x, y = build(spec, batch, args.alpha, device)
    n_sites = len(ms.meansparse_modules(robust))
    common = {
        "model": spec, "batch": batch, "alpha": args.alpha, "sites": n_sites, "device": device.type,
        "threads": torch.get_num_threads(), "reps": args.reps,
    }
    rows: list[dict[str, object]] = []
    logger.info("%s: %d MeanSparse sites, batch %d", spec, n_sites, batch)
    # correctness guard: the fast path and the published operator agree exactly
    with torch.no_grad():
        fast_out = robust(x)
        published_out = _Published(robust, lambda: robust(x))()
        fused_out = fused(x)
    if not torch.equal(fast_out, published_out) or not torch.equal(fast_out, fused_out):
        raise AssertionError(f"{spec}: fast path, fused path and published operator disagree")
    fwd = {
        "base": forward_fn(base, x),
        "fast": forward_fn(robust, x),
        "fused": forward_fn(fused, x),
        "published": _Published(robust, forward_fn(robust, x)),
    }
    t0 = time.time()
    rows += ratio_rows(interleaved(fwd, args.reps, device), {}, {**common, "metric": "forward"})
    logger.info("%s forward done in %.0f s", spec, time.time() - t0)
    fb = {
        "base": forward_backward_fn(base, x, y),
        "fast": forward_backward_fn(robust, x, y),
        "fused": forward_backward_fn(fused, x, y),
        "bpda": forward_backward_fn(robust, x, y, bpda=True),
        "published": _Published(robust, forward_backward_fn(robust, x, y)),
    }
    fb_reps = max(3, args.reps // 2)
    t0 = time.time()
    rows += ratio_rows(interleaved(fb, fb_reps, device), {}, {**common, "metric": "forward_backward", "reps": fb_reps})
    logger.info("%s forward_backward done in %.0f s", spec, time.time() - t0)
    if args.compile:
        rows += bench_compiled(base, robust, x, y, args, common, device)
    return rows


def bench_compiled(
    base: nn.Module, robust: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
    common: dict[str, object], device: torch.device,
) -> list[dict[str, object]]:
    from robustify.evaluation.fast import compile_model

    t0 = time.time()
    cbase, crobust = compile_model(base), compile_model(robust)
    rows: list[dict[str, object]] = []
    with torch.no_grad():
        cbase(x), crobust(x)
    logger.info("compiled forward in %.0f s", time.time() - t0)
    fwd = {"compiled_base": forward_fn(cbase, x), "compiled": forward_fn(crobust, x)}
    times = interleaved(fwd, args.reps, device)
    rows += ratio_rows(times, {"compiled": "compiled_base", "compiled_base": "compiled_base"}, {**common, "metric": "forward"})
    fb = {"compiled_base": forward_backward_fn(cbase, x, y), "compiled": forward_backward_fn(crobust, x, y)}
    fb_reps = max(3, args.reps // 2)
    times = interleaved(fb, fb_reps, device)
    rows += ratio_rows(
        times, {"compiled": "compiled_base", "compiled_base": "compiled_base"},
        {**common, "metric": "forward_backward", "reps": fb_reps},
    )
    logger.info("compiled section done in %.0f s", time.time() - t0)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["aa-resnet18:128", "timm:vit_tiny_patch16_224:16"],
                   help="SPEC:BATCH items")
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--device", default=None, help="cpu, cuda (default: both when CUDA is available)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_meansparse.csv")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = benchmark_devices(args.device)
    info = {"command": command_line(), "machine": machine(), "load_before": load_average()}
    rows: list[dict[str, object]] = []
    for device in devices:
        for item in args.models:
            spec, batch = item.rsplit(":", 1)
            rows += bench_model(spec, int(batch), args, device)
    info["load_after"] = load_average()
    write_rows(args.out, [{**row, **info} for row in rows])
    for row in rows:
        logger.info("%-28s %-16s %-14s wall %9.1f ms  x%.3f (min x%.3f, cpu x%.3f)", row["model"], row["metric"],
                    row["variant"], row["wall_median_ms"], row["ratio_wall_median"], row["ratio_wall_min"],
                    row["ratio_cpu_median"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
