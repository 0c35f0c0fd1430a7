"""``robustify export``: a robustified DM-WRN in RobustBench's own MeanSparse class with identical logits, the
evaluation's model_info JSON and its worst-case adversarial examples (one per test example, in the eps ball)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import robustify
from robustify.attacks import AttackConfig
from robustify.cli import main as cli_main
from robustify.jobs.evaluate import build_defended_model, load_examples
from robustify.core.errors import UserError
from robustify.defenses import meansparse as ms
from robustify.defenses.meansparse.interop import find_published_meansparse, to_robustbench_meansparse

pytest.importorskip("robustbench")
from robustbench.model_zoo.architectures import Meansparse_wrn_70_16, dm_wide_resnet  # noqa: E402

DEPTH, WIDTH = 10, 1  # one block per group: RobustBench's classes take any depth 6k + 4


def small_dm_wrn() -> nn.Module:
    """RobustBench's DMWideResNet at depth 10, width 1, SiLU (as the published S-WRN models), seeded weights."""
    torch.manual_seed(0)
    model = dm_wide_resnet.DMWideResNet(num_classes=10, depth=DEPTH, width=WIDTH, activation_fn=nn.SiLU)
    for m in model.modules():  # non-trivial batch-norm statistics, so that the sites see varied inputs
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_robustified_dm_wrn_loads_into_robustbench_meansparse_class_with_identical_logits(one_thread):
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = ms.insert_meansparse(small_dm_wrn(), x[:1], ms.MeanSparseConfig(preset="published"))
    robustify.calibrate(model, [x[:8], x[8:]], progress=False)
    sites = ms.meansparse_modules(model)
    ms.set_alpha(model, {name: 0.2 + 0.05 * (i % 5) for i, name in enumerate(sites)})  # per-site thresholds
    target, state = to_robustbench_meansparse(model, x[:1])
    # RobustBench's own class, built independently with the same small depth, loads the exported state strictly
    theirs = Meansparse_wrn_70_16.DMWideResNet(num_classes=10, depth=DEPTH, width=WIDTH, activation_fn=nn.SiLU).eval()
    theirs.load_state_dict(torch.load(_saved(state), weights_only=True), strict=True)
    published = find_published_meansparse(theirs)
    assert len(published) == len(sites) == 3 * 3 + 1
    assert all(set(dict(m.named_buffers())) >= {"running_mean", "running_var", "threshold"} for m in published.values())
    with torch.no_grad():
        ours, rb = model(x), theirs(x)
        with robustify.defenses_disabled(model):
            base = model(x)
    assert torch.equal(ours, rb)
    assert not torch.equal(ours, base)  # the sites do cut: the comparison is not vacuous
    assert torch.equal(target(x), rb)


def _saved(state: dict[str, torch.Tensor]) -> "object":
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_export_needs_the_published_placement(one_thread):
    x = torch.rand(4, 3, 32, 32)
    model = ms.insert_meansparse(small_dm_wrn(), x[:1], ms.MeanSparseConfig(include=("layer.*",)))
    robustify.calibrate(model, [x], progress=False)
    with pytest.raises(UserError, match="forward order"):
        to_robustbench_meansparse(model, x[:1])


def test_export_job_writes_model_model_info_and_adversarial_examples(one_thread, small_npz, tmp_path):
    attack = AttackConfig(attacks=("apgd-ce",), apgd_iters=3, batch_size=8)
    job = robustify.EvaluationJob(model="test_export:small_dm_wrn", defense="meansparse", data=str(small_npz),
                                  defense_config=ms.MeanSparseConfig(alpha=0.3, preset="published"), n_examples=12,
                                  n_calib=32, attack=attack, out=str(tmp_path / "eval"), progress=False,
                                  keep_adversarial=True)
    result = robustify.run_evaluation(job)
    code = cli_main(["export", "--results", str(tmp_path / "eval"), "--out", str(tmp_path / "rb")])
    assert code == 0
    out = tmp_path / "rb"
    described = json.loads((out / "model.json").read_text())
    assert described["class"] == "robustbench.model_zoo.architectures.Meansparse_wrn_70_16.DMWideResNet"
    assert described["arguments"]["depth"] == DEPTH and described["arguments"]["activation_fn"].endswith("SiLU")
    theirs = Meansparse_wrn_70_16.DMWideResNet(num_classes=10, depth=DEPTH, width=WIDTH, activation_fn=nn.SiLU).eval()
    theirs.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)
    model, info, _ = build_defended_model(job)
    x, y = load_examples(job, info)
    with torch.no_grad():
        assert torch.equal(theirs(x), model(x))
    info_json = json.loads((out / "model_info.json").read_text())
    assert "autoattack_acc" not in info_json and info_json["external"] == f"{100 * result.worst_case_acc:.2f}"
    assert "apgd-ce" in info_json["footnote"] and info_json["clean_acc"] == f"{100 * result.clean_acc:.2f}"
    adv = torch.load(out / "adversarial.pt", weights_only=True)
    assert adv.shape == x.shape  # one per evaluated test example
    assert (adv - x).abs().amax() <= attack.eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (theirs(adv).argmax(1) == y).float().mean().item() == pytest.approx(result.worst_case_acc)


def test_export_without_kept_adversarial_examples_is_a_one_line_error(one_thread, small_npz, tmp_path):
    job = robustify.EvaluationJob(model="test_export:small_dm_wrn", defense="meansparse", data=str(small_npz),
                                  defense_config=ms.MeanSparseConfig(alpha=0.3, preset="published"), n_examples=4,
                                  n_calib=16, attack=AttackConfig(attacks=("apgd-ce",), apgd_iters=2),
                                  out=str(tmp_path / "eval"), progress=False)
    robustify.run_evaluation(job)
    with pytest.raises(UserError, match="--keep-adversarial"):
        robustify.export_robustbench(robustify.ExportJob(results=str(tmp_path / "eval"), out=str(tmp_path / "rb")))
