"""ImageNet-sized calibration throughput: robustify's data path vs a plain torchvision DataLoader loop (issue 10).

A generated ImageFolder of ImageNet-sized JPEGs (500x375, smooth random content plus noise, 10
class folders; written once into ``--root``, never committed) is calibrated with MeanSparse on an
ImageNet architecture (torchvision MobileNetV3-Small, random init, 1000 classes, preprocessing
``Res256Crop224``; ResNet-18 has 30x its FLOPs: on a shared 2-core CPU its forward would
hide the data path entirely). Variants, timed round-robin in one run (the starting variant rotates):

* ``robustify``: ``robustify.jobs.evaluate.calibration_loader("folder:ROOT", info, workers=W)`` +
  ``robustify.defenses.meansparse.calibrate`` — what ``robustify calibrate`` / ``evaluate`` / ``sweep`` do.
* ``plain``: ``torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(ROOT/train,
  PREPROCESSINGS["Res256Crop224"]), num_workers=W)`` feeding the same calibrating forward (the same
  MeanSparse model inside ``ms.calibrating``, no grad): same transform, workers and forward.
* ``plain_base_forward`` (reference, ``--base-forward``): the same plain loop with the base model's
  forward (no statistics), to show what the statistics cost.
* ``robustify_workers0`` (reference, ``--workers0``): robustify's loader with no worker process.

Usage::

    python benchmarks/bench_imagenet_calibration.py [--images 2000] [--workers 2] [--batch 100] [--reps 2] [--threads 1]

Writes ``benchmarks/results/bench_imagenet_calibration.csv`` (with the command and machine).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meansparse import RESULTS, command_line, interleaved, load_average, machine, write_rows  # noqa: E402

from robustify.defenses import meansparse as ms
import robustify as rb  # noqa: E402
from robustify.jobs.evaluate import calibration_loader  # noqa: E402

logger = logging.getLogger("bench_imagenet_calibration")
CLASSES = 10
SIZE = (500, 375)
MODEL = "torchvision.models:mobilenet_v3_small"


def _image(seed: int) -> Image.Image:
    """Smooth random content (a small random image upsampled) plus pixel noise: JPEGs of ImageNet-like size."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).resize(SIZE, Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, size=(SIZE[1], SIZE[0], 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def generate(root: Path, images: int) -> Path:
    """Write ``images`` JPEGs into ``root/train/<class>/`` once (kept if already complete)."""
    train = root / "train"
    if len(list(train.glob("*/*.JPEG"))) == images:
        logger.info("reusing %d images in %s", images, train)
        return root
    t0 = time.perf_counter()
    for i in range(images):
        path = train / f"n{i % CLASSES:08d}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        _image(i).save(path, quality=90)
    (root / "val").mkdir(exist_ok=True)
    logger.info("wrote %d images into %s in %.0f s", images, train, time.perf_counter() - t0)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/robustify_bench_imagenet", help="where the JPEGs are generated")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--base-forward", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--workers0", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--out", default=str(RESULTS / "bench_imagenet_calibration.csv"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = generate(Path(args.root), args.images)
    load_before = load_average()

    from robustbench.data import PREPROCESSINGS  # importable: robustify.load.preprocessing imported robustbench
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    base, info = rb.load_model(MODEL, dataset="imagenet")
    assert info.preprocessing == {"source": "default", "name": "Res256Crop224"}, info.preprocessing
    model = ms.insert_meansparse(base, info.example_input(), ms.MeanSparseConfig())
    spec = f"folder:{root}"

    def plain_loop(net: torch.nn.Module) -> None:  # builds its dataset each time, as robustify does
        plain_data = ImageFolder(str(root / "train"), transform=PREPROCESSINGS["Res256Crop224"])
        with torch.no_grad():
            for x, _ in DataLoader(plain_data, batch_size=args.batch, shuffle=False, num_workers=args.workers):
                net(x)

    def plain() -> None:
        with ms.calibrating(model):
            plain_loop(model)

    def plain_base() -> None:
        with rb.defenses_disabled(model):
            plain_loop(model)

    def robustify(workers: int | None = args.workers) -> None:
        batches = calibration_loader(spec, info, batch_size=args.batch, workers=workers)
        rb.calibrate(model, batches, progress=False)

    variants = {"robustify": robustify, "plain": plain}
    if args.base_forward:
        variants["plain_base_forward"] = plain_base
    if args.workers0:
        variants["robustify_workers0"] = lambda: robustify(0)
    times = interleaved(variants, args.reps, torch.device("cpu"), warmup=0)
    common = {"model": MODEL, "preprocessing": "Res256Crop224", "images": args.images,
              "image_size": f"{SIZE[0]}x{SIZE[1]}", "batch": args.batch, "workers": args.workers,
              "threads": torch.get_num_threads(), "reps": args.reps}
    rows = []
    for name, t in times.items():
        workers = 0 if name == "robustify_workers0" else args.workers
        rows.append({**common, "variant": name, "workers": workers, **t,
                     "images_per_s_median": args.images / (t["wall_median_ms"] / 1e3),
                     "throughput_vs_plain_median": times["plain"]["wall_median_ms"] / t["wall_median_ms"],
                     "throughput_vs_plain_min": times["plain"]["wall_min_ms"] / t["wall_min_ms"],
                     "command": command_line(), "machine": machine(), "load_before": load_before,
                     "load_after": load_average()})
        logger.info("%-20s %7.1f images/s  x%.3f of plain", name, rows[-1]["images_per_s_median"],
                    rows[-1]["throughput_vs_plain_median"])
    write_rows(Path(args.out), rows)


if __name__ == "__main__":
    main()
