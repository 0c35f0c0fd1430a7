"""Every RobustBench model zoo entry, architecture only: does it build, and what does robustify plan?

For each ``(dataset, threat_model, name)`` of ``robustbench.model_zoo.model_dicts`` this runs
what ``robustify inspect robustbench:NAME --dataset D --threat-model T`` runs: the public
``load_model(..., pretrained=False)`` (random weights, never a download) and the default
MeanSparse ``plan`` on one example input of the entry's size. Each entry runs in a forked child
process, one thread, with a time limit and the network disabled (a socket connection raises), so
an entry that tries to download is recorded as a failure, and a huge one cannot hold the sweep.

Usage::

    nice -n 19 python benchmarks/zoo_sweep.py                      # every entry (~200)
    python benchmarks/zoo_sweep.py --only 'cifar10/Linf/*' --timeout 120
    python benchmarks/zoo_sweep.py --resume --timeout 900           # skip finished entries, retry timeouts
    python benchmarks/zoo_sweep.py --resume --rerun --only 'cifar100/Linf/Bai*'   # redo some entries, keep the rest

Writes ``benchmarks/results/zoo_sweep.csv`` (one row per entry, appended as it goes) and
``zoo_sweep.md`` beside it (the command, the totals and every failure).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import logging
import multiprocessing as mp
import os
import resource
import shlex
import socket
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

logger = logging.getLogger("zoo_sweep")

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["dataset", "threat_model", "name", "status", "params_m", "sites", "activations", "build_s", "plan_s",
          "peak_rss_mb", "error"]


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise OSError("network disabled by zoo_sweep (architecture only)")


def _probe(dataset: str, threat_model: str, name: str) -> dict[str, Any]:
    """Build one entry without weights and plan MeanSparse on it (runs in the child)."""
    import torch

    from robustify.defenses.meansparse.config import MeanSparseConfig
    from robustify.defenses.meansparse.insert import plan
    from robustify.load.models import first_line, load_model

    torch.set_num_threads(1)
    socket.socket.connect = _no_network  # type: ignore[method-assign]
    socket.getaddrinfo = _no_network
    start = time.perf_counter()
    row: dict[str, Any] = {"status": "build-error"}
    try:
        model, info = load_model(f"robustbench:{name}", dataset=dataset, threat_model=threat_model, pretrained=False)
        row.update(status="plan-error", build_s=round(time.perf_counter() - start, 2),
                   params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2))
        start = time.perf_counter()
        with torch.no_grad():
            _, sites = plan(model, info.example_input(batch=1), MeanSparseConfig())
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        return {**row, "error": f"{type(exc).__name__}: {first_line(exc)}"}
    counts = Counter(s.activation for s in sites)
    return {**row, "status": "ok", "sites": len(sites), "plan_s": round(time.perf_counter() - start, 2),
            "activations": " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))}


def _child(conn: Connection, dataset: str, threat_model: str, name: str) -> None:
    row = _probe(dataset, threat_model, name)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    conn.send(row)
    conn.close()


def run_entry(dataset: str, threat_model: str, name: str, timeout: float) -> dict[str, Any]:
    """Probe one entry in a forked child; a child past ``timeout`` seconds is killed."""
    parent, child = mp.get_context("fork").Pipe(duplex=False)
    process = mp.get_context("fork").Process(target=_child, args=(child, dataset, threat_model, name), daemon=True)
    start = time.perf_counter()
    process.start()
    child.close()
    row: dict[str, Any]
    if parent.poll(timeout):
        try:
            row = parent.recv()
        except EOFError:
            row = {"status": "died", "error": f"child died (exit code {process.exitcode}, e.g. out of memory)"}
    else:
        row = {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    if process.exitcode not in (0, None) and row.get("status") == "ok":
        logger.warning("%s exited with %s after its result", name, process.exitcode)
    logger.info("%s/%s/%s: %s in %.1f s %s", dataset, threat_model, name, row["status"],
                time.perf_counter() - start, row.get("error", f"({row.get('sites')} sites)"))
    return {"dataset": dataset, "threat_model": threat_model, "name": name, **row}


def _keep_finished(csv_path: Path, rerun: list[str] = ()) -> set[tuple[str, str, str]]:
    """Drop the CSV's timeout/died rows, and those of the entries matching a ``rerun`` glob (to run them again);
    return the entries it still holds."""
    if not csv_path.exists():
        return set()
    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["status"] not in ("timeout", "died") and not any(
            fnmatch.fnmatch(f"{r['dataset']}/{r['threat_model']}/{r['name']}", g) for g in rerun)]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return {(r["dataset"], r["threat_model"], r["name"]) for r in rows}


def _previous_commands(md: Path) -> list[str]:
    if not md.exists():
        return []
    return [line.split("`")[1] for line in md.read_text().splitlines() if line.startswith("Command: `")]


def write_summary(csv_path: Path, commands: list[str]) -> Path:
    """The sidecar ``.md``: the command(s) that made the CSV, totals per leaderboard, every failure."""
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    per_board: dict[tuple[str, str], Counter] = {}
    for r in rows:
        per_board.setdefault((r["dataset"], r["threat_model"]), Counter())[r["status"]] += 1
    lines = [
        "# RobustBench model zoo sweep (architecture only)",
        "",
        *(line for command in commands for line in (f"Command: `{command}`", "")),
        f"{sum(r['status'] in ('ok', 'plan-error') for r in rows)} of {len(rows)} entries build without weights; "
        f"{sum(r['status'] == 'ok' for r in rows)} also get a default MeanSparse plan.",
        "",
        "| dataset | threat model | entries | ok | build-error | plan-error | timeout or died |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (dataset, threat), c in per_board.items():
        lines.append(f"| {dataset} | {threat} | {sum(c.values())} | {c['ok']} | {c['build-error']} | "
                     f"{c['plan-error']} | {c['timeout'] + c['died']} |")
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        lines += ["", "## Failures", "", "| entry | status | error |", "| --- | --- | --- |"]
        lines += [f"| {r['dataset']}/{r['threat_model']}/{r['name']} | {r['status']} | {r['error']} |" for r in failures]
    md = csv_path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "zoo_sweep.csv")
    parser.add_argument("--only", action="append", default=None, help="glob on DATASET/THREAT/NAME (repeatable)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per entry")
    parser.add_argument("--resume", action="store_true",
                        help="keep the CSV and skip the entries it holds (timeouts and deaths run again)")
    parser.add_argument("--rerun", action="store_true",
                        help="with --resume: run the entries --only selects again, replacing their rows")
    args = parser.parse_args(argv)
    if args.rerun and not (args.resume and args.only):
        parser.error("--rerun needs --resume and --only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from robustify.load.zoo import zoo_entries

    import robustify.defenses.meansparse.insert  # noqa: F401 - imported once here, shared by every forked child

    entries = [e for e in zoo_entries() if not args.only or any(fnmatch.fnmatch("/".join(e), g) for g in args.only)]
    done = _keep_finished(args.out, args.only if args.rerun else []) if args.resume else set()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not (args.resume and args.out.exists())
    with args.out.open("w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for entry in entries:
            if entry in done:
                continue
            writer.writerow(run_entry(*entry, timeout=args.timeout))
            f.flush()
    niceness = os.nice(0)
    command = (f"nice -n {niceness} " if niceness else "") + "python benchmarks/zoo_sweep.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:]))
    earlier = _previous_commands(args.out.with_suffix(".md")) if args.resume else []
    logger.info("wrote %s and %s", args.out, write_summary(args.out, [*earlier, command.strip()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
