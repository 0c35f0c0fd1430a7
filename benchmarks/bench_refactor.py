"""MeanSparse's eager cost before and after a code change, measured in one run (issue 18: the stage
packages must keep the eager and fused speed).

Runs ``benchmarks/bench_meansparse.py`` of two checkouts, alternating (before, after, before, after, ...),
with the same Python and settings, and writes their variant/base ratios side by side. Each run measures
its variants against its own base model in the same process, so the ratios compare across runs even when
the machine's load drifts; alternating the checkouts spreads the drift over both.

Usage::

    git worktree add /tmp/before c16f8d2
    python benchmarks/bench_refactor.py --before /tmp/before --rounds 2 --reps 5

Writes ``benchmarks/results/refactor_meansparse.csv`` and ``refactor_meansparse.md``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = ("fast", "fused", "bpda", "published")

logger = logging.getLogger("bench_refactor")


def _run(checkout: Path, out: Path, args: argparse.Namespace) -> list[dict[str, str]]:
    command = [sys.executable, str(checkout / "benchmarks" / "bench_meansparse.py"), "--models", *args.models,
               "--threads", "1", "--reps", str(args.reps), "--device", "cpu", "--out", str(out)]
    logger.info("%s", shlex.join(command))
    subprocess.run(command, check=True, cwd=checkout, stdout=subprocess.DEVNULL)
    with out.open() as f:
        return list(csv.DictReader(f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    p.add_argument("--after", type=Path, default=REPO, help="checkout of the code after it (default: this one)")
    p.add_argument("--models", nargs="+", default=["aa-resnet18:128"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label, checkout in (("before", args.before), ("after", args.after)):
                for row in _run(checkout, Path(tmp) / f"{label}_{r}.csv", args):
                    if row["variant"] in VARIANTS:
                        rows.append({"code": label, "round": r, "model": row["model"], "metric": row["metric"],
                                     "variant": row["variant"], "ratio_wall_median": float(row["ratio_wall_median"]),
                                     "ratio_wall_min": float(row["ratio_wall_min"])})
    command = shlex.join(["python", "benchmarks/bench_refactor.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "refactor_meansparse.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "command"])
        writer.writeheader()
        writer.writerows({**row, "command": command} for row in rows)
    lines = [f"MeanSparse cost relative to the base model (median wall time ratio; min over {args.rounds} rounds "
             f"in brackets), before and after, alternating in one run: `{command}`", "",
             "| model | metric | variant | before | after |", "|---|---|---|---|---|"]
    keys = sorted({(str(r["model"]), str(r["metric"]), str(r["variant"])) for r in rows})
    for model, metric, variant in keys:
        cells = []
        for label in ("before", "after"):
            ratios = [float(r["ratio_wall_median"]) for r in rows  # type: ignore[arg-type]
                      if (r["code"], r["model"], r["metric"], r["variant"]) == (label, model, metric, variant)]
            cells.append(f"{statistics.median(ratios):.3f} [{min(ratios):.3f}]")
        lines.append(f"| {model} | {metric} | {variant} | {cells[0]} | {cells[1]} |")
    (RESULTS / "refactor_meansparse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
