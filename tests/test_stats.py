"""Exact one-pass statistics: merged float64 moments equal a direct whole-set computation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from robustify import calibrate, load_model
from robustify.defenses.meansparse import MeanSparseConfig
from robustify.defenses.meansparse import insert_meansparse
from robustify.defenses.meansparse import meansparse_modules
from robustify.defenses.meansparse.module import MeanSparse
from robustify.core.stats import RunningMoments, batch_moments

REL = 1e-6


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def _whole_set(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct per-channel mean and unbiased variance of the whole set, in float64."""
    xd = x.double().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    return xd.mean(dim=0), xd.var(dim=0, unbiased=True)


@pytest.mark.parametrize("channel_dim", [1, -1])
def test_running_moments_equal_whole_set_for_two_batch_sizes(channel_dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 5, 6, 7, generator=g) * 3 + 50  # large offset: naive formulas lose precision
    mean, var = _whole_set(x, channel_dim)
    for batch in (7, 32):
        acc = RunningMoments()
        for chunk in x.split(batch):
            acc.update(chunk, channel_dim)
        assert acc.count == x.numel() // x.shape[channel_dim]
        assert _rel_err(acc.mean, mean) < REL
        assert _rel_err(acc.variance(unbiased=True), var) < REL


def test_merge_is_order_independent_and_merges_accumulators() -> None:
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(int(n), 3, 4, generator=g) + i for i, n in enumerate(torch.randint(1, 9, (12,), generator=g))]
    forward, backward = RunningMoments(), RunningMoments()
    for c in chunks:
        forward.update(c, 1)
    for c in reversed(chunks):
        backward.update(c, 1)
    left, right = RunningMoments(), RunningMoments()
    for c in chunks[:5]:
        left.update(c, 1)
    for c in chunks[5:]:
        right.update(c, 1)
    left.merge_from(right)
    mean, var = _whole_set(torch.cat(chunks), 1)
    for acc in (forward, backward, left):
        assert _rel_err(acc.mean, mean) < 1e-12
        assert _rel_err(acc.variance(), var) < 1e-10


def test_batch_moments_and_empty_accumulator() -> None:
    x = torch.arange(24.0).reshape(2, 3, 4)
    n, mean, m2 = batch_moments(x, 1)
    assert n == 8 and mean.dtype == torch.float64
    torch.testing.assert_close(mean, x.double().mean(dim=(0, 2)))
    torch.testing.assert_close(m2, x.double().var(dim=(0, 2), unbiased=False) * 8)
    with pytest.raises(ValueError, match="no data"):
        RunningMoments().variance()
    acc = RunningMoments()
    acc.update(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="channel count changed"):
        acc.update(torch.zeros(2, 4), 1)


def _calibrate_recording(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Calibrate on ``x`` in batches and return, per site, every activation input the pass saw."""
    modules = meansparse_modules(model)
    seen: dict[str, list[torch.Tensor]] = {site: [] for site in modules}
    handles = [
        model.get_submodule(site).register_forward_pre_hook(lambda m, a, s=site: seen[s].append(a[0].clone()))
        for site in modules
    ]
    try:
        calibrate(model, DataLoader(TensorDataset(x), batch_size=batch_size), progress=False)
    finally:
        for h in handles:
            h.remove()
    return {site: torch.cat(chunks) for site, chunks in seen.items()}


def _assert_exact(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    modules = meansparse_modules(model)
    assert modules and set(inputs) == set(modules)
    for site, m in modules.items():
        mean, var = _whole_set(inputs[site], m.channel_dim)
        assert _rel_err(m.mean, mean) < REL, site
        assert _rel_err(m.var, var) < REL, site
        assert m.moments.count == inputs[site].numel() // m.channels


@pytest.mark.parametrize("batch_size", [7, 32])
def test_calibrate_equals_whole_set_on_tiny_model(tiny_model, batch_size: int) -> None:
    x = torch.rand(45, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = insert_meansparse(tiny_model, x[:2], MeanSparseConfig(alpha=0.3))
    _assert_exact(model, _calibrate_recording(model, x, batch_size))


def test_calibrate_equals_whole_set_on_real_data(at_weights, cifar_npz) -> None:
    """aa-resnet18 (adversarially trained), 17 sites, 48 real CIFAR-10 training images, batches of 16 and 20."""
    with np.load(cifar_npz) as data:
        x = torch.from_numpy(data["x_train"][:48]).float().div(255)
    stats = []
    for batch_size in (16, 20):  # 20 leaves a partial last batch
        model, info = load_model("aa-resnet18", weights=at_weights)
        model = insert_meansparse(model, info.example_input(), MeanSparseConfig(alpha=0.2))
        _assert_exact(model, _calibrate_recording(model, x, batch_size))
        stats.append({s: (m.mean.clone(), m.var.clone()) for s, m in meansparse_modules(model).items()})
    assert len(stats[0]) == 17
    for site, (mean, var) in stats[0].items():  # the two batchings agree up to float32 forward noise
        torch.testing.assert_close(stats[1][site][0], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats[1][site][1], var, rtol=1e-4, atol=1e-5)


def test_official_mode_differs_on_class_sorted_data_exact_does_not() -> None:
    """Class-sorted data (as ImageFolder yields it): per-batch averaging misses the between-batch spread."""
    g = torch.Generator().manual_seed(3)
    classes = [torch.randn(64, 4, 3, 3, generator=g) * 0.5 + 2.0 * k for k in range(4)]
    sorted_x = torch.cat(classes)
    shuffled_x = sorted_x[torch.randperm(len(sorted_x), generator=g)]
    mean, var = _whole_set(sorted_x, 1)

    def run(x: torch.Tensor, mode: str) -> MeanSparse:
        m = MeanSparse(4, site="s", stats_mode=mode)
        for chunk in x.split(64):
            m.observe(chunk)
        m.finalize()
        return m

    exact_sorted, exact_shuffled = run(sorted_x, "exact"), run(shuffled_x, "exact")
    official_sorted, official_shuffled = run(sorted_x, "official"), run(shuffled_x, "official")
    assert _rel_err(exact_sorted.var, var) < REL and _rel_err(exact_shuffled.var, var) < REL
    # official: within-batch variance only -> far too small on sorted data, close when shuffled
    assert float((official_sorted.var / var).max()) < 0.5
    assert _rel_err(official_shuffled.var, var) < 0.2
    # the spec's identity, equal batches of n_b elements: biased exact = (n_b-1)/n_b * official + spread of means
    n_b = 64 * 3 * 3
    batch_means = torch.stack([c.double().mean(dim=(0, 2, 3)) for c in sorted_x.split(64)])
    spread = ((batch_means - mean) ** 2).mean(dim=0)
    biased = var * (sorted_x.numel() // 4 - 1) / (sorted_x.numel() // 4)
    identity = (n_b - 1) / n_b * official_sorted.var.double() + spread
    assert _rel_err(identity, biased) < 1e-5


def test_calibration_is_independent_of_batch_order(tiny_model) -> None:
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    model = insert_meansparse(tiny_model, x[:2], MeanSparseConfig(alpha=0.1))
    batches = list(x.split(6))
    calibrate(model, batches, progress=False)
    first = {s: (m.mean.clone(), m.var.clone()) for s, m in meansparse_modules(model).items()}
    random.Random(0).shuffle(batches)
    calibrate(model, batches, progress=False)
    for s, m in meansparse_modules(model).items():
        torch.testing.assert_close(m.mean, first[s][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.var, first[s][1], rtol=1e-6, atol=1e-7)
