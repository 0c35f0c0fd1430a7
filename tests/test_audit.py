"""The sanity suite fires on the failures it is for and stays quiet on healthy evaluations."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustify.defenses import meansparse as ms
import robustify as rb
from robustify.attacks import AttackConfig
from robustify.evaluation.audit import AuditConfig, audit_result_file, check_convergence, check_unbounded, gradient_census
from robustify.evaluation.engine import evaluate
from tinynets import tiny_cnn


class PooledLinear(nn.Module):
    """Class 0 while the (optionally hard-quantised) pixel mean is below 1/2, class 1 above."""

    def __init__(self, quantise: bool) -> None:
        super().__init__()
        self.quantise = quantise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantise:
            x = torch.round(x)  # zero gradient everywhere: masks the gradient completely
        s = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        rest = torch.full((x.shape[0], 8), -5.0)
        return torch.cat([1 - 2 * s, 2 * s - 1, rest], dim=1)


def _dark_images(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x = 0.2 + 0.05 * torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("quantise,flag", [(True, True), (False, False)])
def test_unbounded_check_fails_only_on_a_hard_quantiser(quantise, flag):
    x, y = _dark_images()
    model = PooledLinear(quantise)
    assert (model(x).argmax(1) == y).all()
    out = check_unbounded(model, x, y, AttackConfig(attacks=("apgd-ce",)), AuditConfig(unbounded_iters=5))
    assert out["flag"] is flag
    assert out["chance"] == pytest.approx(0.1) and out["eps"] == 1.0
    assert out["acc"] == (1.0 if quantise else 0.0)


def test_unbounded_check_passes_on_a_cnn():
    model = tiny_cnn()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    out = check_unbounded(model, x, y, AttackConfig(attacks=("apgd-ce",)), AuditConfig(unbounded_iters=5))
    assert not out["flag"] and out["acc"] <= 0.1


class Wavy(nn.Module):
    """A CNN on sin(100 x): the loss surface is rough at the eps scale, one APGD step is not enough."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.sin(100 * x))


@pytest.mark.parametrize("iters,flag", [(1, True), (20, False)])
def test_not_converged_fires_after_a_1_iteration_run(iters, flag):
    model = Wavy().eval()
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(1)
    config = AttackConfig(attacks=("apgd-ce",), eps=8 / 255, apgd_iters=iters, batch_size=32)
    result = evaluate(model, x, y, config, progress=False)
    out = check_convergence(model, x, y, result, config, AuditConfig())
    assert out["attack"] == "apgd-ce" and out["budget"] == {"iters": 2 * iters, "restarts": 2}
    assert out["flag"] is flag and (out["newly_broken"] > 0) is flag
    assert out["share"] == out["newly_broken"] / 24


def test_census_equals_a_direct_count_of_band_membership():
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model = ms.insert_meansparse(tiny_cnn(), x[:2], ms.MeanSparseConfig(alpha=0.5))
    rb.calibrate(model, [x], progress=False)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    counted: dict[str, list[float]] = {}
    handles = []
    for site, module in ms.meansparse_modules(model).items():
        def hook(mod, args, site=site):
            z = args[0]
            inside = (z - mod.mean.view(1, -1, 1, 1)).abs() < mod.crop.view(1, -1, 1, 1)
            counted.setdefault(site, []).append(inside.sum().item() / z.numel())
        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
        model(x_adv)
    for h in handles:
        h.remove()
    census = gradient_census(model, x, y, x_adv, masked_share=0.05)
    assert set(census["sites"]) == set(counted) and len(counted) == 2
    for site, (clean, adv) in counted.items():
        assert census["sites"][site]["clean"] == pytest.approx(clean, abs=1e-7)
        assert census["sites"][site]["adversarial"] == pytest.approx(adv, abs=1e-7)
    assert census["flag"] is (census["max_share"] > 0.05) and census["max_share"] > 0
    assert census["grad_norm_bpda"] > 0 and census["grad_norm"] > 0
    assert not gradient_census(tiny_cnn(), x, y)["flag"]  # no thresholding site: nothing to flag


def test_audit_is_stored_in_result_json_and_shown_in_the_leaderboard(tmp_path):
    from robustify.reporting.leaderboard import build_table, collect

    model = tiny_cnn()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = model(x).argmax(1)
    evaluate(model, x, y, AttackConfig(attacks=("apgd-ce",), eps=1 / 255, apgd_iters=2, batch_size=8),
             out_dir=tmp_path / "r", meta={"model": "tiny"}, progress=False)
    entry = audit_result_file(tmp_path / "r", model, x, y, AuditConfig(unbounded_iters=3, noise_draws=2))
    saved = json.loads((tmp_path / "r" / "result.json").read_text())["audit"]
    assert saved["flags"] == entry["flags"] and set(saved) >= {"unbounded", "convergence", "census", "noise"}
    row = build_table(collect(tmp_path)).iloc[0]
    assert row["audit_unbounded"] == pytest.approx(100 * entry["unbounded"]["acc"], abs=0.01)
    assert all(f in row["flags"].split(";") for f in entry["flags"])


def test_audit_command_and_evaluate_flag(tmp_path):
    import numpy as np

    from robustify.cli import main

    g = np.random.default_rng(0)
    x = g.integers(0, 256, size=(24, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        y = tiny_cnn()(torch.from_numpy(x).float() / 255).argmax(1).numpy()
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    common = ["tinynets:tiny_cnn", "--data", str(npz), "--n-examples", "8", "--no-progress"]
    quick = ["--attacks", "apgd-ce,bpda", "--apgd-iters", "2", "--audit-unbounded-iters", "2", "--audit-noise-draws", "2",
             "--audit-census-examples", "4"]
    out = tmp_path / "ms"
    assert main(["evaluate", *common, "--defense", "meansparse", "--alpha", "0.3", "--out", str(out), *quick,
                 "--audit"]) == 0
    first = json.loads((out / "result.json").read_text())["audit"]
    assert first["census"]["sites"] and first["config"]["noise_draws"] == 2
    assert main(["audit", *common, "--defense", "meansparse", "--alpha", "0.3", "--out", str(out), *quick]) == 0
    again = json.loads((out / "result.json").read_text())["audit"]
    assert again["census"]["sites"] == first["census"]["sites"]  # the same model, examples and checks


def test_audit_refuses_another_model():
    from robustify.evaluation.audit import run_audit

    model = tiny_cnn()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x).argmax(1)
    result = evaluate(model, x, y, AttackConfig(attacks=("apgd-ce",), eps=1 / 255, apgd_iters=1), progress=False)
    with pytest.raises(ValueError, match="differ from the evaluated"):
        run_audit(model, x, (y + 1) % 10, result)


def test_strongest_attack_prefers_the_straight_through_ones():
    from robustify.evaluation.audit import _strongest
    from robustify.evaluation.engine import EvalResult

    per = {"clean_correct": [1, 1, 1, 1], "apgd-ce": [1, 1, 0, 0], "bpda-apgd-ce": [None, None, 1, 0],
           "square": [None, None, 0, 0]}
    result = EvalResult(meta={}, config={}, n_examples=4, clean_acc=1.0,
                        attack_acc={"apgd-ce": 0.5, "square": 0.5, "bpda-apgd-ce": 0.25}, worst_case_acc=0.25,
                        flags=[], per_example=per, seconds={}, versions={})
    assert _strongest(result) == "bpda-apgd-ce"
    del per["bpda-apgd-ce"]
    result.attack_acc.pop("bpda-apgd-ce")
    assert _strongest(result) == "apgd-ce"


def test_audit_job_audits_the_examples_the_evaluation_saw(tmp_path, monkeypatch):
    """On image files the audit loads the examples as the evaluation does: in the model's preprocessing
    (timm's config for a timm model: 160x160 for test_vit), not the default transform (224x224)."""
    from test_imagenet_data import _folder

    from robustify.jobs import audit as audit_module
    from robustify.attacks import AttackConfig
    from robustify.jobs.evaluate import EvaluationJob

    root = tmp_path / "d"
    classes = [f"n0{c:07d}" for c in range(3)]
    _folder(root / "train", classes, 2)
    _folder(root / "val", classes, 2)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "result.json").write_text("{}")  # audit_job only needs the evaluation to exist; the audit is captured
    job = EvaluationJob(model="timm:test_vit", pretrained=False, dataset="imagenet", data=f"folder:{root}", n_examples=6,
                        attack=AttackConfig(attacks=("apgd-ce",), dataset="imagenet"), out=str(out))
    seen = {}
    monkeypatch.setattr(audit_module, "audit_result_file",
                        lambda out_dir, model, x, y, audit=None, device="cpu": seen.update(x=x, y=y) or {})
    audit_module.audit_job(job)
    assert tuple(seen["x"].shape) == (6, 3, 160, 160)  # the model's preprocessing, as run_evaluation loads them
    assert torch.bincount(seen["y"]).tolist() == [2, 2, 2]
