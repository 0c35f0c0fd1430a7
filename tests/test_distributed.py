"""A 2-process gloo run under torchrun gives the single-process results exactly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from robustify import calibrate
from robustify.defenses.meansparse import MeanSparseConfig
from robustify.defenses.meansparse import insert_meansparse
from robustify.defenses.meansparse import meansparse_modules
from robustify.core.distributed import gather_examples, is_distributed, rank, shard, shard_indices, world_size

REPO = Path(__file__).resolve().parents[1]

# The worker builds the same seeded model and data as the test, calibrates on its shard,
# gathers per-example predictions and flags, and rank 0 saves everything.
WORKER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from robustify import calibrate
    from robustify.core import distributed
    from robustify.defenses.meansparse import MeanSparseConfig, insert_meansparse, meansparse_modules

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
        ).eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
        x = torch.rand(45, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
        return model, x

    assert distributed.init_from_env()
    model, x = build()
    model = insert_meansparse(model, x[:2], MeanSparseConfig(alpha=0.4, stats_mode=sys.argv[2]))
    part = distributed.shard(len(x))
    counts = calibrate(model, x[part.start:part.stop].split(7), progress=False)
    with torch.no_grad():
        logits = model(x[part.start:part.stop])
    preds = distributed.gather_examples(logits.argmax(1))
    flags = distributed.gather_examples(logits.max(1).values > 0)
    order = distributed.gather_examples(distributed.shard_indices(len(x)))
    if distributed.is_main():
        stats = {s: (m.mean, m.var, m.moments.count, m.moments.mean, m.moments.m2)
                 for s, m in meansparse_modules(model).items()}
        torch.save({"stats": stats, "counts": counts, "preds": preds, "flags": flags, "order": order,
                    "world": distributed.world_size()}, sys.argv[1])
    distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


def _build() -> tuple[nn.Module, torch.Tensor]:
    namespace: dict[str, object] = {}
    source = WORKER.split("assert distributed.init_from_env()")[0]
    exec(compile(source, "worker", "exec"), namespace)  # the very same build() as the workers
    return namespace["build"]()  # type: ignore[operator]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, stats_mode: str) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"result_{stats_mode}.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(script), str(out), stats_mode,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("stats_mode", ["exact", "official"])
def test_two_gloo_processes_match_one(tmp_path: Path, stats_mode: str) -> None:
    result = _torchrun(tmp_path, stats_mode)
    assert result["world"] == 2

    model, x = _build()
    model = insert_meansparse(model, x[:2], MeanSparseConfig(alpha=0.4, stats_mode=stats_mode))
    # the same batches as the two ranks (the forward's float32 rounding depends on the batch
    # composition; the merge of the moments must add nothing to that)
    batches = [b for r in range(2) for b in x[shard(len(x), r, 2).start : shard(len(x), r, 2).stop].split(7)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): conv rounding depends on it
    try:
        counts = calibrate(model, batches, progress=False)
        with torch.no_grad():
            logits = model(x)
    finally:
        torch.set_num_threads(threads)
    assert result["counts"] == counts
    modules = meansparse_modules(model)
    assert set(result["stats"]) == set(modules) and len(modules) == 2
    for site, (mean, var, count, m_mean, m_m2) in result["stats"].items():
        m = modules[site]
        assert count == m.moments.count
        if stats_mode == "exact":
            torch.testing.assert_close(m_mean, m.moments.mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(m_m2, m.moments.m2, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(mean, m.mean, rtol=1e-7, atol=1e-9)  # float32 buffers: 1 ulp at most
        torch.testing.assert_close(var, m.var, rtol=1e-7, atol=1e-9)
    assert torch.equal(result["order"], torch.arange(len(x)))
    assert torch.equal(result["preds"], logits.argmax(1))
    assert torch.equal(result["flags"], logits.max(1).values > 0) and result["flags"].dtype == torch.bool


def test_helpers_are_the_identity_in_one_process() -> None:
    assert not is_distributed() and rank() == 0 and world_size() == 1
    assert shard(10) == range(10)
    parts = [shard(10, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 4] and sum((list(p) for p in parts), []) == list(range(10))
    assert torch.equal(shard_indices(5, 1, 2), torch.tensor([2, 3, 4]))
    t = torch.arange(4)
    assert gather_examples(t) is t
    with pytest.raises(ValueError):
        shard(10, 3, 3)


def test_other_ranks_batches_are_journalled_every_round(tmp_path: Path, monkeypatch) -> None:
    """Rank 0 journals rank 1's batches as soon as a round ends, not at the end of the phase."""
    import robustify.core.distributed as distributed_module
    import robustify.evaluation.engine as engine

    monkeypatch.setattr(distributed_module, "world_size", lambda: 2)
    monkeypatch.setattr(distributed_module, "rank", lambda: 0)
    done: list[int] = []

    def compute(k: int, idx: list[int]) -> dict:
        if k == 4:  # rank 0's third batch: a crash in round 2
            raise KeyboardInterrupt
        done.append(k)
        return {"attack": "apgd-ce", "batch": k, "idx": idx, "broken": [k % 2] * len(idx), "seconds": 0.0}

    def all_gather_object(out: list, obj: object) -> None:  # rank 1 ran batch k + 1 of the round
        assert obj is not None and len(out) == 2
        k = obj["batch"] + 1  # type: ignore[index]
        out[:] = [obj, compute(k, chunks[k])]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    chunks = [[2 * k, 2 * k + 1] for k in range(6)]
    journal = engine.Journal(tmp_path, {"config": {}}, writer=True)
    with pytest.raises(KeyboardInterrupt):
        engine._run_phase("apgd-ce", chunks, compute, journal, progress=False)
    journal.close()
    on_disk = engine.Journal(tmp_path, {"config": {}}, writer=False).records
    assert sorted(k for (_, k) in on_disk) == [0, 1, 2, 3] == sorted(done)
    # the rerun (one process) replays those four batches and computes only the other two
    rerun: list[int] = []

    def compute_again(k: int, idx: list[int]) -> dict:
        rerun.append(k)
        return {"attack": "apgd-ce", "batch": k, "idx": idx, "broken": [k % 2] * len(idx), "seconds": 0.0}

    monkeypatch.setattr(distributed_module, "world_size", lambda: 1)
    journal = engine.Journal(tmp_path, {"config": {}}, writer=True)
    records = engine._run_phase("apgd-ce", chunks, compute_again, journal, progress=False)
    journal.close()
    assert rerun == [4, 5]
    assert [r["batch"] for r in records] == list(range(6))
    assert [r["broken"] for r in records] == [[k % 2] * 2 for k in range(6)]
