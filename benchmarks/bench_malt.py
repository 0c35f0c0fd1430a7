"""MALT-targeted APGD-T against AutoAttack's top-logit APGD-T, side by side on the same images.

Model: the adversarially trained ResNet-18 of ../shared/models (``aa-resnet18``, no defense). Images: the
first --n test images of ../shared/data/cifar10_subset.npz. Both runs use robustify's engine with only
``apgd-t`` (``--targets top-logit`` and ``--targets malt``), the same seed, batch size, eps (Linf 8/255) and
the stated (cut) budget: --iters APGD-T iterations per target, --targets-k target classes (AutoAttack: 100
iterations, 9 targets). Per targeting the JSON/markdown give robust accuracy, APGD-T's forward and backward
example-passes (MALT's ranking included: one forward and one backward per candidate class) and wall time,
and the examples only one of the two broke.

Reproduce (CPU):
    nice -n 10 python benchmarks/bench_malt.py --n 100 --iters 20 --targets-k 9 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import robustify as rb
from robustify.attacks import AttackConfig
from robustify.core.io import atomic_path
from robustify.evaluation.engine import evaluate

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "benchmarks" / "results"
logger = logging.getLogger("bench_malt")


def run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config: AttackConfig) -> dict[str, Any]:
    start = time.perf_counter()
    result = evaluate(model, x, y, config, progress=False)
    cost = result.cost["apgd-t"]
    return {"targeting": config.apgd_t_targeting, "targets": config.apgd_t_targets,
            "clean_acc": 100 * result.clean_acc, "robust_acc": 100 * result.attack_acc["apgd-t"],
            "attacked": cost["examples"], "forward": cost["forward"], "backward": cost["backward"],
            "passes": cost["forward"] + cost["backward"], "apgd_t_seconds": cost["seconds"],
            "seconds": round(time.perf_counter() - start, 1), "broken": result.per_example["apgd-t"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="first N test images")
    p.add_argument("--iters", type=int, default=20, help="APGD-T iterations per target (AutoAttack: 100)")
    p.add_argument("--targets-k", type=int, nargs="+", default=[9], help="target classes (AutoAttack: 9)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT / "malt"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    data = str(SHARED / "data" / "cifar10_subset.npz")
    model, _ = rb.load_model("aa-resnet18", weights=SHARED / "models" / "resnet18_at_relu.pt")
    x, y = rb.to_tensors(rb.load_data(data, "test", n=args.n))
    rows = []
    for k in args.targets_k:
        for targeting in ("top-logit", "malt"):  # side by side, same images and seed
            config = AttackConfig(attacks=("apgd-t",), eps=8 / 255, seed=0, batch_size=args.batch_size,
                                  apgd_t_iters=args.iters, apgd_t_targets=k, apgd_t_targeting=targeting)
            rows.append(run(model.eval(), x, y, config))
            logger.info("k=%d %s: robust %.1f%%, %d passes (%.1f s)", k, targeting, rows[-1]["robust_acc"],
                        rows[-1]["passes"], rows[-1]["seconds"])
    for top, malt in zip(rows[::2], rows[1::2]):
        only_malt = sum(1 for a, b in zip(top["broken"], malt["broken"]) if b == 1 and a == 0)
        only_top = sum(1 for a, b in zip(top["broken"], malt["broken"]) if a == 1 and b == 0)
        malt["only_this_broke"], top["only_this_broke"] = only_malt, only_top
    command = "nice -n 10 python benchmarks/bench_malt.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "model": "aa-resnet18 (../shared/models/resnet18_at_relu.pt), no defense",
              "data": f"first {args.n} test images of ../shared/data/cifar10_subset.npz", "eps": "Linf 8/255",
              "apgd_t_iters": args.iters, "seed": 0, "torch": torch.__version__, "threads": args.threads,
              "machine": platform.processor() or platform.machine(),
              "rows": [{k: v for k, v in r.items() if k != "broken"} for r in rows]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# MALT-targeted vs top-logit APGD-T", "",
             f"{report['model']}; {report['data']}; {report['eps']}; APGD-T {args.iters} iterations per target "
             f"(AutoAttack: 100), seed 0, 1 restart; robustify's engine, `--attacks apgd-t --targets top-logit|malt`.",
             "Passes: APGD-T's forward + backward example-passes (MALT's ranking included); `only this broke`: "
             "examples broken by this targeting and not by the other at the same number of targets.", "",
             "| targets | targeting | clean % | robust % | attacked | forward | backward | passes | "
             "only this broke | APGD-T s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['targets']} | {r['targeting']} | {r['clean_acc']:.1f} | {r['robust_acc']:.1f} | "
                     f"{r['attacked']} | {r['forward']} | {r['backward']} | {r['passes']} | "
                     f"{r.get('only_this_broke', '')} | {r['apgd_t_seconds']:.1f} |")
    lines += ["", "Command:", "", "    " + command, ""]
    with atomic_path(out.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
