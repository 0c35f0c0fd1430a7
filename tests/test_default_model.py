"""The default model of ``robustify run``: robustify's small adversarially trained CIFAR-10 ResNet, shipped in the
package (weights checked by digest), and the compact table ``run`` prints."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import robustify
from robustify.cli import main
from robustify.cli import evaluate as evaluate_cli
from robustify.core.errors import ModelLoadError
from robustify.load import small_resnet
from robustify.load.models import load_model


def test_weights_ship_inside_the_package_and_match_their_digest():
    package = Path(robustify.__file__).parent
    assert small_resnet.WEIGHTS_FILE.is_relative_to(package) and small_resnet.WEIGHTS_FILE.is_file()
    assert small_resnet.WEIGHTS_FILE.stat().st_size < 4 * 2**20
    assert small_resnet.sha256(small_resnet.WEIGHTS_FILE) == small_resnet.WEIGHTS_SHA256


def test_default_model_of_run_is_the_shipped_one():
    assert evaluate_cli.RUN_DEFAULTS["model"] == small_resnet.NAME


def test_loads_by_name_with_its_weights():
    model, info = load_model(small_resnet.NAME)
    random, _ = load_model(small_resnet.NAME, pretrained=False)
    assert info.source == "robustify" and info.input_size == (3, 32, 32) and info.num_classes == 10
    assert not model.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 10) and not torch.allclose(out, random.eval()(x))
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    from safetensors.torch import load_file

    shipped = load_file(str(small_resnet.WEIGHTS_FILE))
    assert all(torch.equal(state[k], shipped[k]) for k in state)


def test_damaged_weights_are_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "w.safetensors"
    shutil.copy(small_resnet.WEIGHTS_FILE, damaged)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(small_resnet, "WEIGHTS_FILE", damaged)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_model(small_resnet.NAME)
    monkeypatch.setattr(small_resnet, "WEIGHTS_FILE", tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(small_resnet.NAME)


def test_it_is_trained_on_real_images(cifar_npz):
    data = np.load(cifar_npz)
    x = torch.from_numpy(data["x_test"][:100]).float() / 255
    y = torch.from_numpy(data["y_test"][:100])
    model, _ = load_model(small_resnet.NAME)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.4  # chance is 0.1; the model card gives its measured accuracies


def test_run_on_its_defaults_uses_the_shipped_model_and_prints_a_compact_table(small_npz, tmp_path, capsys):
    assert main(["run", "--data", str(small_npz), "--n-examples", "4", "--n-calib", "32", "--apgd-iters", "1",
                 "--out", str(tmp_path)]) == 0
    board = pd.read_csv(tmp_path / "leaderboard" / "leaderboard.csv")
    assert set(board["model"]) == {small_resnet.NAME}
    assert sorted(board["defense"]) == ["meansparse", "none"]
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    header = next(line for line in lines if line.startswith("model"))
    for column in ("clean", "apgd-ce", "apgd-dlr", "bpda-apgd-ce", "bpda-apgd-dlr", "worst case [95% CI]", "vs base",
                   "verdict", "flags"):
        assert column in header
    rows = [line for line in lines if line.startswith(small_resnet.NAME)]
    assert len(rows) == 2 and any("meansparse α=0.2" in row for row in rows)
    assert "|" not in out and "Ranked by" not in out  # not the markdown leaderboard with its legend
    assert str(tmp_path / "leaderboard") in lines[-1]


def test_compact_table_cells():
    df = pd.DataFrame([
        {"model": "m", "defense": "none", "alpha": None, "clean_acc": 50.0, "apgd-ce_acc": 25.0,
         "bpda-apgd-ce_acc": None, "worst_case_acc": 25.0, "worst_case_ci95": "[16.88, 34.66]",
         "delta_worst_case": None, "verdict": None, "flags": "", "not_applicable": "bpda-apgd-ce: no defense"},
        {"model": "m", "defense": "meansparse", "alpha": 0.25, "clean_acc": 49.0, "apgd-ce_acc": 28.0,
         "bpda-apgd-ce_acc": 21.0, "worst_case_acc": 21.0, "worst_case_ci95": "[13.51, 30.28]",
         "delta_worst_case": -4.0, "verdict": "no significant gain", "flags": "bpda-beats-standard",
         "not_applicable": ""},
    ])
    header, base, defended = evaluate_cli.compact_table(df).splitlines()
    assert header.split()[:4] == ["model", "defense", "clean", "apgd-ce"]
    assert "25.0 [16.9, 34.7]" in base and "n/a" in base and base.rstrip().endswith("-")
    assert "meansparse α=0.25" in defended and "21.0 [13.5, 30.3]" in defended and "-4.0" in defended
    assert defended.rstrip().endswith("no significant gain  bpda-beats-standard")
