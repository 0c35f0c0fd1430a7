"""Adversarial training of inserted defenses, checkpoints/resume, defense files, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustify
from robustify.cli import main
from robustify.defenses.meansparse.state import StateMismatchError
from robustify.defenses import (apply_defense, defense_config, defense_kind, defense_names, defense_parameters,
                                load_defense, save_defense)
from robustify.jobs.train import TrainConfig, evaluate_pgd, pgd, train_defense

DEFENSES = defense_names(trainable=True)


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))) + x)


class Tiny(nn.Module):
    """A two-group residual net on 8x8 images with functional ReLUs (like aa-resnet18)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layer1 = nn.Sequential(Block(6), Block(6))
        self.layer2 = nn.Sequential(Block(6), Block(6))
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose label is the brightest quadrant (learnable, so gradients mean something)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.6
    y = torch.randint(0, 4, (n,), generator=g)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, 4 * r: 4 * r + 4, 4 * c: 4 * c + 4] += 0.4
    return x, y


_PRETRAINED: dict[int, dict[str, torch.Tensor]] = {}


def tiny(seed: int = 0) -> Tiny:
    """A Tiny net briefly trained on clean data (cached), in eval mode."""
    if seed not in _PRETRAINED:
        torch.manual_seed(seed)
        model = Tiny()
        x, y = batch(64, seed=100)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(40):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        _PRETRAINED[seed] = {k: v.clone() for k, v in model.state_dict().items()}
    model = Tiny()
    model.load_state_dict(_PRETRAINED[seed])
    return model.eval()


EXAMPLE = torch.zeros(2, 3, 8, 8)
FAST = dict(batch_size=16, attack_steps=2, eps=8 / 255, step_size=4 / 255, augment=False, lr=0.01,
            schedule="constant")


def adv_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    adv = pgd(model, x, y, eps=8 / 255, steps=3, step_size=4 / 255, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float(F.cross_entropy(model(adv), y))


def test_defense_names_match_the_cli() -> None:
    from robustify.cli.train import _DEFENSES

    assert _DEFENSES == DEFENSES


def test_pgd_stays_in_the_ball_and_raises_the_loss() -> None:
    model = tiny()
    x, y = batch(16)
    adv = pgd(model, x, y, eps=0.05, steps=5, step_size=0.02, generator=torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    assert all(p.grad is None for p in model.parameters())
    target_adv = pgd(model, x, y, eps=0.05, steps=3, step_size=0.02, targeted=True,
                     generator=torch.Generator().manual_seed(0))
    assert float((target_adv - x).abs().max()) <= 0.05 + 1e-6


@pytest.mark.parametrize("name", ["sparta", "sparta-nodp", "pssilu"])
def test_few_steps_lower_the_adversarial_loss_with_frozen_backbone(name: str) -> None:
    model = tiny()
    options = {"init": "identity", "init_logit": 1.0} if name.startswith("sparta") else {}
    model = apply_defense(model, EXAMPLE, defense_config(name, **options))
    x, y = batch(32)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k or "stem" in k}
    before = adv_loss(model, x, y)
    train_defense(model, x, y, TrainConfig(epochs=6, **{**FAST, "lr": 0.05}), progress=False)
    after = adv_loss(model, x, y)
    assert after < 0.99 * before, (before, after)
    for k, v in backbone.items():  # frozen backbone, BatchNorm statistics included
        assert torch.equal(model.state_dict()[k], v), k
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


def test_joint_training_of_a_fixed_swap_moves_the_backbone() -> None:
    model = apply_defense(tiny(), EXAMPLE, defense_config("silu"))
    with pytest.raises(ValueError, match="nothing to train"):
        train_defense(model, *batch(8), TrainConfig(epochs=1, **FAST), progress=False)
    stem = model.stem.weight.detach().clone()
    x, y = batch(32)
    before = adv_loss(model, x, y)
    result = train_defense(model, x, y, TrainConfig(epochs=4, freeze_backbone=False, **{**FAST, "lr": 0.0005}),
                           progress=False)
    assert not torch.equal(model.stem.weight, stem)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert adv_loss(model, x, y) < before
    assert not model.training


def _run(tmp_path: Path, interrupt_after: int | None) -> tuple[nn.Module, list[dict]]:
    base = tiny()
    torch.manual_seed(0)  # the new modules' initial weights
    model = apply_defense(base, EXAMPLE, defense_config("sparta", init="identity"))
    x, y = batch(24)
    config = TrainConfig(epochs=3, **{**FAST, "schedule": "step", "milestones": (2,)})
    ckpt = tmp_path / "run.ckpt"

    def stop(epoch: int, stats: dict) -> None:
        if epoch == interrupt_after:
            raise KeyboardInterrupt

    try:
        result = train_defense(model, x, y, config, checkpoint=ckpt, progress=False, on_epoch_end=stop)
    except KeyboardInterrupt:
        torch.manual_seed(12345)  # whatever the global RNG does in between must not matter
        model = apply_defense(tiny(), EXAMPLE, defense_config("sparta", init="identity"))
        result = train_defense(model, x, y, config, checkpoint=ckpt, progress=False)
        assert result.resumed_from == interrupt_after
    return model, result.history


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full, history_full = _run(tmp_path / "a", None)
    resumed, history_resumed = _run(tmp_path / "b", 1)
    assert len(history_full) == len(history_resumed) == 3
    for a, b in zip(history_full, history_resumed):
        assert (a["loss"], a["adv_acc"], a["lr"]) == (b["loss"], b["adv_acc"], b["lr"])
    assert history_full[-1]["lr"] == pytest.approx(0.001)  # the step schedule survived the resume
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_checkpoint_with_other_settings_is_refused(tmp_path) -> None:
    model = apply_defense(tiny(), EXAMPLE, defense_config("pssilu"))
    x, y = batch(16)
    ckpt = tmp_path / "c.ckpt"
    train_defense(model, x, y, TrainConfig(epochs=1, **FAST), checkpoint=ckpt, progress=False)
    with pytest.raises(StateMismatchError, match="other training settings.*lr"):
        train_defense(model, x, y, TrainConfig(epochs=2, **{**FAST, "lr": 0.5}), checkpoint=ckpt, progress=False)
    result = train_defense(model, x, y, TrainConfig(epochs=2, **FAST), checkpoint=ckpt, progress=False)
    assert result.resumed_from == 1 and result.epochs == 2  # more epochs: continues


@pytest.mark.parametrize("name, joint", [("sparta", False), ("pssilu", True), ("gelu", True)])
def test_load_defense_reproduces_the_trained_model(tmp_path, name: str, joint: bool) -> None:
    config = defense_config(name)
    model = apply_defense(tiny(), EXAMPLE, config)
    x, y = batch(16)
    train_defense(model, x, y, TrainConfig(epochs=1, freeze_backbone=not joint, **FAST), progress=False)
    path = tmp_path / f"{name}.safetensors"
    save_defense(model, path, config, model_info={"spec": "tiny"}, training={"epochs": 1}, backbone=joint)
    assert defense_kind(path) == name
    assert (tmp_path / f"{name}.safetensors.backbone.safetensors").is_file() == joint
    loaded = load_defense(tiny(), path, EXAMPLE)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    if not joint:
        assert len(defense_parameters(loaded)) == len(defense_parameters(model))


def test_evaluate_pgd_reports_clean_and_robust_accuracy() -> None:
    model = tiny()
    x, y = batch(20)
    result = evaluate_pgd(model, x, y, eps=8 / 255, steps=3, batch_size=7)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    assert result["clean_acc"] == pytest.approx(clean)
    assert 0 <= result["pgd_acc"] <= result["clean_acc"]


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
@pytest.fixture
def npz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), y_train=rng.integers(0, 10, 4),
             x_test=rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), y_test=rng.integers(0, 10, 4))
    return path


def test_cli_train_writes_a_loadable_defense_and_resumes(tmp_path, npz, capsys) -> None:
    out = tmp_path / "pssilu.safetensors"
    argv = ["train", "--defense", "pssilu", "aa-resnet18", "--no-pretrained", "--data", str(npz), "--epochs", "1",
            "--out", str(out), "--attack-steps", "1", "--step-size", "10/255", "--batch-size", "4", "--no-progress",
            "--eval-n", "2"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and 0 <= summary["pgd_acc"] <= summary["clean_acc"] <= 1
    meta = json.loads((tmp_path / "pssilu.safetensors.json").read_text())
    assert meta["format"] == "robustify-defense" and meta["defense"] == "pssilu" and len(meta["sites"]) == 17
    assert meta["training"]["freeze_backbone"] is True and meta["training"]["n_train"] == 4
    assert meta["model"]["spec"] == "aa-resnet18" and (tmp_path / "pssilu.safetensors.ckpt").is_file()
    model, info = robustify.load_model("aa-resnet18", pretrained=False)
    loaded = load_defense(model, out, info.example_input())
    assert len(defense_parameters(loaded)) == 2
    # a second run with the same checkpoint has nothing left to do
    assert main([*argv[:-2]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 1


def test_cli_inspect_shows_the_sparta_plan(capsys) -> None:
    assert main(["inspect", "aa-resnet18", "--no-pretrained", "--defense", "sparta", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in plan["sites"]] == [f"layer{g}.1.relu_1" for g in range(1, 5)]
    assert main(["inspect", "aa-resnet18", "--no-pretrained", "--defense", "pssilu", "--include", "layer1.0*"]) == 0
    assert "2 site(s)" in capsys.readouterr().out


def test_cli_transfer_trains_the_backbone_around_a_frozen_pretrained_sparta(tmp_path, npz, capsys) -> None:
    common = ["aa-resnet18", "--no-pretrained", "--data", str(npz), "--epochs", "1", "--attack-steps", "1",
              "--step-size", "10/255", "--batch-size", "4", "--no-progress", "--sparta-preset", "paper",
              "--include", "layer4*"]
    source = tmp_path / "sparta.safetensors"
    assert main(["train", "--defense", "sparta-nodp", *common, "--out", str(source)]) == 0
    target = tmp_path / "transferred.safetensors"
    assert main(["train", "--defense", "sparta-nodp", *common, "--out", str(target), "--transfer", str(source)]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "transferred.safetensors.json").read_text())
    assert meta["training"]["freeze_backbone"] is False and meta["backbone"]
    from safetensors.torch import load_file

    before, after = load_file(str(source)), load_file(str(target))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # frozen
    model, info = robustify.load_model("aa-resnet18", pretrained=False)
    loaded = load_defense(model, target, info.example_input())
    assert list(robustify.defenses.sparta.module.sparta_modules(loaded)) == ["layer4.1.relu_1"]
