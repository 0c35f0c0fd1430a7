"""OOM batch-size backoff: simulated allocation failures, results unchanged."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from robustify import calibrate
from robustify.defenses.meansparse import MeanSparseConfig
from robustify.defenses.meansparse import insert_meansparse
from robustify.defenses.meansparse import meansparse_modules
from robustify.core.memory import BatchPlan, OutOfMemory, is_oom, run_batched, split_on_oom


def _fails_above(limit: int, calls: list[tuple[int, int]]):
    def fn(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        if stop - start > limit:
            raise torch.OutOfMemoryError(f"simulated: CUDA out of memory. Tried to allocate {stop - start} examples")
        return torch.arange(start, stop) * 2

    return fn


def test_run_batched_halves_on_oom_and_logs_the_batch_size(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[int, int]] = []
    plan: BatchPlan[torch.Tensor] = BatchPlan()
    with caplog.at_level(logging.INFO, logger="robustify.core.memory"):
        results = run_batched(_fails_above(10, calls), 50, 32, what="attack", plan=plan)
    assert torch.equal(torch.cat(results), torch.arange(50) * 2)
    assert plan.batch_size == 8 and plan.backoffs == [16, 8]
    # 32 and 16 failed on the first examples, then batches of 8 cover everything once
    assert calls[:2] == [(0, 32), (0, 16)]
    assert [c for c in calls[2:]] == [(s, min(50, s + 8)) for s in range(0, 50, 8)]
    assert "ran with batch size 8 (requested 32" in caplog.text
    assert "retrying with batch size 16" in caplog.text


def test_run_batched_without_oom_keeps_the_batch_size() -> None:
    calls: list[tuple[int, int]] = []
    plan: BatchPlan[torch.Tensor] = BatchPlan()
    run_batched(_fails_above(100, calls), 50, 20, plan=plan)
    assert calls == [(0, 20), (20, 40), (40, 50)] and plan.batch_size == 20 and not plan.backoffs


def test_run_batched_gives_up_below_the_minimum_and_reraises_other_errors() -> None:
    with pytest.raises(OutOfMemory, match="even with batch size"):
        run_batched(_fails_above(3, []), 20, 16, min_batch_size=4)

    def broken(start: int, stop: int) -> None:
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        run_batched(broken, 10, 4)


def test_is_oom_recognises_the_usual_messages() -> None:
    assert is_oom(torch.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


def test_split_on_oom_remembers_the_working_size() -> None:
    seen: list[int] = []

    def fn(x: torch.Tensor) -> int:
        seen.append(len(x))
        if len(x) > 5:
            raise torch.OutOfMemoryError("simulated")
        return int(x.sum())

    state: dict[str, int] = {}
    x = torch.arange(12)
    assert sum(split_on_oom(fn, x, state=state)) == int(x.sum())
    assert state["batch_size"] == 3
    seen.clear()
    assert sum(split_on_oom(fn, x, state=state)) == int(x.sum())
    assert seen == [3, 3, 3, 3]  # starts from the remembered size: no failed attempt


class _OOMAbove(torch.nn.Module):
    """Raises a simulated OOM when the batch is larger than ``limit`` (placed mid-network)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.failures = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.failures += 1
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return x


def test_calibrate_backs_off_and_gives_the_same_statistics(tiny_model, caplog: pytest.LogCaptureFixture) -> None:
    """The OOM strikes after the first site has already observed the batch: it must be undone."""
    import copy

    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = insert_meansparse(copy.deepcopy(tiny_model), x[:2], MeanSparseConfig(alpha=0.2))
    calibrate(reference, DataLoader(TensorDataset(x), batch_size=16), progress=False)

    flaky = copy.deepcopy(tiny_model)
    guard = _OOMAbove(5)
    flaky.conv2 = torch.nn.Sequential(guard, flaky.conv2)  # after act1's site, before the others
    flaky = insert_meansparse(flaky, x[:2], MeanSparseConfig(alpha=0.2))
    guard.limit = 5
    with caplog.at_level(logging.INFO, logger="robustify.core.memory"):
        counts = calibrate(flaky, DataLoader(TensorDataset(x), batch_size=16), progress=False)
    assert guard.failures >= 2
    assert "calibration: ran with batch size 4" in caplog.text
    ref_modules = meansparse_modules(reference)
    for site, m in meansparse_modules(flaky).items():
        ref = ref_modules[site]
        assert counts[site] == ref.moments.count  # nothing observed twice
        torch.testing.assert_close(m.mean, ref.mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.var, ref.var, rtol=1e-6, atol=1e-7)
