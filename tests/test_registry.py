"""Issue 12, items 1 and 6: the defense registry drives the generic API, the CLI and the
pipeline, and SmoothReLU (SAT) plugs in through it alone."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from robustify.defenses import sparta as sparta_pkg
from robustify.defenses import meansparse as ms
import robustify as rb
from robustify import defenses
from robustify.cli import main
from robustify.cli import train  # noqa: F401 - registers the "train" command
from robustify.cli.common import COMMANDS
from robustify.jobs.evaluate import EvaluationJob, run_evaluation
from robustify.defenses.activations.smoothrelu import SmoothReLU, SmoothReLUConfig
from robustify.defenses import defense_kind, load_defense, save_defense
from robustify.jobs.train import TrainConfig, train_defense
from tinynets import tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = torch.zeros(2, 3, 32, 32)
FAST = dict(batch_size=8, attack_steps=1, eps=8 / 255, step_size=10 / 255, augment=False, lr=0.05,
            schedule="constant", epochs=1)


def _images(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_smoothrelu_computes_sats_formula() -> None:
    m = SmoothReLU(2.0)  # alpha = 4
    x = torch.tensor([-3.0, -0.1, 0.0, 0.5, 3.0])
    expected = [max(0.0, v - math.log(4 * abs(v) + 1) / 4) for v in x.tolist()]
    assert m(x).tolist() == pytest.approx(expected, abs=1e-6)
    assert SmoothReLUConfig().make().b.item() == 20.0


def test_every_name_is_registered_once_with_its_properties() -> None:
    names = defenses.defense_names()
    assert names[:3] == ("meansparse", "sparta", "sparta-nodp") and "smoothrelu" in names
    assert len(set(names)) == len(names)
    assert not defenses.get_defense("meansparse").differentiable
    assert not defenses.get_defense("meansparse").trainable
    assert defenses.get_defense("smoothrelu").differentiable and defenses.get_defense("smoothrelu").trainable
    assert defenses.defense_names(trainable=True) == tuple(h for h in defenses.defense_names() if defenses.get_defense(h).trainable)
    with pytest.raises(ValueError, match="already registered"):
        rb.register_defense(defenses.get_defense("smoothrelu").__class__(
            **{**vars(defenses.get_defense("smoothrelu")), "names": ("silu",)}))
    with pytest.raises(ValueError, match="unknown defense 'magic'"):
        defenses.get_defense("magic")


def test_apply_records_the_config_and_save_takes_it_from_the_model(tmp_path: Path) -> None:
    config = sparta_pkg.SpartaConfig(init="identity", preset="all")
    model = rb.apply_defense(tiny_cnn(), EXAMPLE, config)
    assert model.robustify_defense == config
    path = save_defense(model, tmp_path / "sparta.safetensors")  # no config: the recorded one
    assert json.loads((tmp_path / "sparta.safetensors.json").read_text())["config"] == config.to_dict()
    loaded = load_defense(tiny_cnn(), path, EXAMPLE)
    assert loaded.robustify_defense == config
    defended = rb.apply_defense(tiny_cnn(), EXAMPLE, ms.MeanSparseConfig(alpha=0.3))
    assert ms.meansparse_modules(defended) and defended.robustify_defense.alpha == 0.3
    rb.remove_defense(defended)
    assert not ms.meansparse_modules(defended) and not hasattr(defended, "robustify_defense")
    with pytest.raises(ValueError, match="carries no defense config"):
        save_defense(tiny_cnn(), tmp_path / "none.safetensors")


def test_smoothrelu_trains_saves_loads_and_evaluates_through_the_generic_path(tmp_path: Path) -> None:
    config = defenses.defense_config("smoothrelu")
    torch.manual_seed(0)
    model = rb.apply_defense(tiny_cnn(), EXAMPLE, config)
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, SmoothReLU)}
    assert len(swapped) == 2  # act1 and the functional relu
    x, y = _images()
    result = train_defense(model, x, y, TrainConfig(**FAST), progress=False)
    assert result.epochs == 1
    assert all(m.b.item() != 20.0 for m in swapped.values())  # b learned (the backbone is frozen)
    path = tmp_path / "smoothrelu.safetensors"
    rb.save_defense(model, path, model_info={"spec": "tinynets:tiny_cnn"})
    assert defense_kind(path) == "smoothrelu"
    loaded = rb.load_defense(tiny_cnn(), path, EXAMPLE)
    assert isinstance(loaded.robustify_defense, SmoothReLUConfig)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert not torch.equal(loaded(x), tiny_cnn()(x))

    npz = tmp_path / "data.npz"
    g = np.random.default_rng(0)
    np.savez(npz, x_train=g.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8), y_train=g.integers(0, 10, 8),
             x_test=g.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), y_test=g.integers(0, 10, 4))
    job = EvaluationJob(model="tinynets:tiny_cnn", defense="smoothrelu", defense_weights=str(path), data=str(npz),
                        out=str(tmp_path / "eval"), n_examples=4, progress=False,
                        attack=rb.AttackConfig(attacks=("apgd-ce", "bpda"), apgd_iters=2))
    evaluated = run_evaluation(job)
    assert evaluated.meta["defense"] == "smoothrelu"
    skipped = evaluated.meta["not_applicable"]
    assert set(skipped) == {"bpda-apgd-ce", "bpda-apgd-dlr"}  # "bpda" expands to both
    assert set(skipped.values()) == {"not applicable: the defense is differentiable"}
    assert set(evaluated.attack_acc) == {"apgd-ce"}


def _parser_choices(command: str, option: str) -> tuple[str, ...]:
    parser = argparse.ArgumentParser()
    COMMANDS[command][1](parser)
    action = next(a for a in parser._actions if option in a.option_strings)
    return tuple(action.choices)


def test_the_registry_drives_the_cli_choices_and_inspect(capsys) -> None:
    assert _parser_choices("train", "--defense") == defenses.defense_names(trainable=True)
    assert _parser_choices("inspect", "--defense") == defenses.defense_names()
    assert "smoothrelu" in _parser_choices("train", "--defense")
    assert main(["inspect", "tinynets:tiny_cnn", "--defense", "smoothrelu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["defense"] == "smoothrelu"
    assert [s["activation"] for s in plan["sites"]] == ["ReLU", "ReLU"]
    assert main(["inspect", "tinynets:tiny_cnn", "--defense", "smoothrelu", "--exclude", "act1"]) == 0
    assert "smoothrelu: 1 site(s)" in capsys.readouterr().out


def test_cli_trains_smoothrelu_and_the_file_loads(tmp_path: Path, capsys) -> None:
    npz = tmp_path / "d.npz"
    g = np.random.default_rng(1)
    np.savez(npz, x_train=g.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), y_train=g.integers(0, 10, 4),
             x_test=g.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), y_test=g.integers(0, 10, 4))
    out = tmp_path / "s.safetensors"
    assert main(["train", "--defense", "smoothrelu", "tinynets:tiny_cnn", "--data", str(npz), "--epochs", "1",
                 "--attack-steps", "1", "--step-size", "10/255", "--batch-size", "4", "--no-progress",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["defense"] == "smoothrelu"
    side = json.loads((tmp_path / "s.safetensors.json").read_text())
    assert side["defense"] == "smoothrelu" and side["config"]["shared"] is False and "backbone" not in side
    loaded = load_defense(tiny_cnn(), out, EXAMPLE)
    assert sum(isinstance(m, SmoothReLU) for m in loaded.modules()) == 2
