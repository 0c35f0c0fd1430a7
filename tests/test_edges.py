"""Edges that gave a mislabelled number or a crash (issue 20, items 1, 3, 4 and 5).

* a ``--dataset`` whose class count the model's logits do not have is one error before any attack, and
  ``--threat-model corruptions`` (not an Lp ball) is not attacked as Linf unless a norm is asked for;
* a timm model evaluates on 32x32 images when built for them (``--image-size``);
* targeted attacks on a model with fewer than 10 classes use classes - 1 targets, and say so;
* under L1 the default attacks are those that support L1, and soft-BPDA after an L1 APGD-CE runs its own
  iteration count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from robustify.attacks import AttackConfig, build_attack, get_attack, make_autoattack
from robustify.cli import main
from robustify.core.errors import ModelLoadError, UserError
from robustify.evaluation.cost import PassCounter
from robustify.evaluation.engine import evaluate
from robustify.jobs.evaluate import EvaluationJob
from robustify.load.datasets import DatasetSpec, register_dataset, unregister_dataset
from robustify.load.models import load_model
from tinynets import tiny_cnn5, write_labelled_npz

FIVE = "five"
TINY_BUDGETS = ["--apgd-iters", "2", "--apgd-t-iters", "2", "--fab-iters", "2", "--square-queries", "5",
                "--adaptive-steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def labelled_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "labelled.npz"
    write_labelled_npz(str(path), n_train=48, n_test=12)
    return path


@pytest.fixture
def five_classes() -> Iterator[DatasetSpec]:
    """A 5-class dataset of 32x32 images (a plugin's registration), for one test."""
    spec = register_dataset(DatasetSpec(name=FIVE, classes=5, input_size=(3, 32, 32),
                                        eps={"Linf": 8 / 255, "L2": 0.5, "L1": 12.0}))
    yield spec
    unregister_dataset(FIVE)


# ------------------------------------------------------------------------------------------
# 1. the dataset must fit the model; corruptions is not an Lp threat model
# ------------------------------------------------------------------------------------------
def test_a_dataset_the_logits_do_not_fit_is_one_error_before_any_attack(labelled_npz: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ModelLoadError, match=r"^tinynets:tiny_cnn has 10 logits but dataset 'cifar100' has 100 "
                                             r"classes"):
        load_model("tinynets:tiny_cnn", dataset="cifar100")
    out = tmp_path / "eval"
    assert main(["evaluate", "tinynets:tiny_cnn", "--dataset", "cifar100", "--data", str(labelled_npz),
                 "--n-examples", "4", "--attacks", "apgd-ce", "--out", str(out), *TINY_BUDGETS]) == 2
    assert "has 10 logits but dataset 'cifar100' has 100 classes" in capsys.readouterr().err
    assert not (out / "result.json").exists()
    model = tiny_cnn5()  # the Python API: evaluate() checks the logits against num_classes before attacking
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="the model has 5 logits but num_classes is 10"):
        evaluate(model, x, torch.zeros(3, dtype=torch.long), AttackConfig(attacks=("apgd-ce",)), num_classes=10,
                 progress=False)


def test_corruptions_is_not_attacked_as_linf(labelled_npz: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError, match="corruptions is not an Lp threat model"):
        EvaluationJob(model="tinynets:tiny_cnn", data=str(labelled_npz), threat_model="corruptions")
    assert main(["evaluate", "tinynets:tiny_cnn", "--threat-model", "corruptions", "--data", str(labelled_npz),
                 "--n-examples", "4", "--attacks", "apgd-ce", "--out", str(tmp_path / "c"), *TINY_BUDGETS]) == 2
    assert "corruptions is not an Lp threat model" in capsys.readouterr().err
    assert not (tmp_path / "c" / "result.json").exists()
    # asked for explicitly, a norm is attacked, and the row says which
    assert main(["evaluate", "tinynets:tiny_cnn", "--threat-model", "corruptions", "--norm", "L2", "--data",
                 str(labelled_npz), "--n-examples", "4", "--attacks", "apgd-ce", "--out", str(tmp_path / "l2"),
                 *TINY_BUDGETS]) == 0
    assert json.loads((tmp_path / "l2" / "result.json").read_text())["config"]["norm"] == "L2"


# ------------------------------------------------------------------------------------------
# 3. timm models on CIFAR-sized images
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_vit", "test_byobnet"])  # a fixed-size ViT (timm's img_size), a CNN
def test_timm_model_built_for_32x32(name: str) -> None:
    model, info = load_model(f"timm:{name}", pretrained=False, image_size=32)
    assert info.input_size == (3, 32, 32) and info.num_classes == 10
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_timm_model_evaluates_on_a_32x32_npz(small_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "vit"
    assert main(["evaluate", "timm:test_vit", "--no-pretrained", "--image-size", "32", "--data", str(small_npz),
                 "--n-examples", "4", "--attacks", "apgd-ce", "--out", str(out), *TINY_BUDGETS]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["n_examples"] == 4 and result["meta"]["image_size"] == 32


def test_timm_size_mismatch_names_the_option(small_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "timm:test_vit", "--no-pretrained", "--data", str(small_npz), "--n-examples", "4",
                 "--attacks", "apgd-ce", "--out", str(tmp_path / "e"), *TINY_BUDGETS]) == 2
    assert "images are 32x32; the model expects 160x160 (--image-size" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# 4. fewer than 10 classes: targets capped at classes - 1
# ------------------------------------------------------------------------------------------
def test_targets_are_capped_at_classes_minus_one() -> None:
    config = AttackConfig(attacks=("apgd-t", "fab-t", "bpda-apgd-t")).for_classes(5)
    assert (config.apgd_t_targets, config.fab_targets) == (4, 4)
    assert config.budget_for("apgd-t")["targets"] == 4 and config.budget_for("fab-t")["targets"] == 4
    assert AttackConfig().for_classes(100) == AttackConfig()


def _five_class_folder(root: Path, per_class: int) -> None:
    """A ``folder:`` tree of 5 classes, 32x32 PNGs, each class holding the random images :func:`tiny_cnn5`
    predicts as it where there are some (so that some examples are classified correctly)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(400, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        pred = tiny_cnn5()(torch.from_numpy(pool).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    for split in ("train", "val"):
        for c in range(5):
            mine = np.flatnonzero(pred == c).tolist() + list(range(400))
            for i, k in enumerate(mine[:per_class] if split == "val" else mine[-per_class:]):
                path = root / split / f"class{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pool[k]).save(path)


def test_five_class_folder_runs_the_default_meansparse_attacks(five_classes: DatasetSpec, tmp_path: Path) -> None:
    root = tmp_path / "folder"
    _five_class_folder(root, per_class=4)
    out = tmp_path / "ms"
    assert main(["evaluate", "tinynets:tiny_cnn5", "--dataset", FIVE, "--data", f"folder:{root}", "--defense",
                 "meansparse", "--n-examples", "10", "--individual", "--workers", "0", "--out", str(out),
                 *TINY_BUDGETS]) == 0
    result = json.loads((out / "result.json").read_text())
    assert "bpda-apgd-t" in result["attack_acc"] and result["clean_acc"] > 0
    assert result["config"]["apgd_t_targets"] == 4 and result["meta"]["dataset"] == FIVE


# ------------------------------------------------------------------------------------------
# 5. L1
# ------------------------------------------------------------------------------------------
def test_l1_defaults_leave_out_the_attacks_without_l1() -> None:
    assert "L1" not in get_attack("adaptive").norms  # the registry says which norms each attack supports
    l1 = AttackConfig(norm="L1")
    assert "adaptive" not in l1.attacks and {"apgd-ce", "apgd-dlr", "bpda-apgd-ce", "transfer"} <= set(l1.attacks)
    assert "adaptive" in AttackConfig(norm="Linf").attacks
    with pytest.raises(UserError, match="attack 'adaptive' does not support the L1 threat model"):
        AttackConfig(norm="L1", attacks=("apgd-ce", "adaptive"))  # asked for by name: still an error


def test_l1_evaluation_runs_its_defaults(labelled_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "l1"
    assert main(["evaluate", "tinynets:tiny_cnn", "--norm", "L1", "--defense", "meansparse", "--data",
                 str(labelled_npz), "--n-examples", "4", "--n-calib", "16", "--eps", "0.5", "--out", str(out),
                 *TINY_BUDGETS]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["norm"] == "L1" and "adaptive" not in result["config"]["attacks"]
    assert {"apgd-ce", "bpda-apgd-t", "transfer"} <= set(result["config"]["attacks"])


def test_soft_bpda_after_l1_apgd_ce_runs_its_own_iterations() -> None:
    """pyautoattack's L1 schedule (3 eps stages) leaves its APGD object with the last stage's iteration
    count: soft-BPDA, after APGD-CE on the same AutoAttack, must still run ``apgd_iters`` per stage."""
    from robustify.attacks.soft_bpda import SOFT_BPDA_TEMPERATURES
    from test_attacks_adaptive import PooledBand

    model = PooledBand().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = (0.53 + 0.2 * (torch.rand(4, 3, 8, 8, generator=g) - 0.5)).clamp(0, 1)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True) + 0.53  # inside the band; L1 eps 1 cannot leave it
    y = torch.zeros(4, dtype=torch.long)
    config = AttackConfig(attacks=("apgd-ce", "soft-bpda"), norm="L1", eps=1.0, apgd_iters=10, apgd_restarts=1)
    aa = make_autoattack(model, config, "cpu")
    build_attack("apgd-ce", model, config, autoattack=aa).perturb(x, y)
    with PassCounter(model) as passes:
        x_adv = build_attack("soft-bpda", model, config, autoattack=aa).perturb(x, y)
    assert (x_adv - x).abs().flatten(1).sum(1).max() <= 1.0 + 1e-4
    # per stage: 1 backward at the start, 1 per iteration; every stage runs (nothing is broken)
    assert passes.backward == 4 * len(SOFT_BPDA_TEMPERATURES) * (1 + 10)
    assert config.budget_for("soft-bpda")["iters"] == 10
