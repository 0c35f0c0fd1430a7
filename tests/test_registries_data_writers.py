"""The dataset and writer registries, and the defenses' settings as leaderboard columns.

A dataset registered once (classes, input size, eps per norm, how to load it) is known to load_model, the
attack configs' default eps, EvaluationJob and load_data, and its facts live in its registration only; a
registered writer runs in write_leaderboard; a defense's setting column (MeanSparse's ``alpha``) appears only
where some row has a value for it, and a plugin defense's setting gets its column and its plot the same way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

import robustify  # noqa: F401 - registers the built-in defenses, datasets and writers
from robustify.attacks import DEFAULT_EPS, AttackConfig, default_eps
from robustify.core.errors import DataError, ModelLoadError, UserError
from robustify.defenses import registry as defense_registry
from robustify.defenses.base import Defense
from robustify.evaluation.engine import evaluate
from robustify.jobs.evaluate import EvaluationJob
from robustify.load import datasets as dataset_registry
from robustify.load._loading import DATASET_CLASSES
from robustify.load.data import load_data, reads_image_files
from robustify.load.datasets import DatasetSpec, dataset_names, get_dataset, register_dataset, unregister_dataset
from robustify.load.models import DATASET_INPUT, load_model
from robustify.load.preprocessing import model_preprocessing
from robustify.reporting import writers as writer_registry
from robustify.reporting.leaderboard import build_table, model_info, write_leaderboard
from robustify.reporting.plots import plot_setting_curves
from robustify.reporting.settings import setting_names
from robustify.reporting.writers import BUILTIN_WRITERS, WriteContext, register_writer, unregister_writer, writer_names
from tinynets import tiny_cnn

TOY = "toy5"
TOY_EPS = {"Linf": 3 / 255, "L2": 0.25}


def _toy_data(split: str, cache: Path) -> TensorDataset:
    n = 12 if split == "test" else 20
    x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(len(split)))
    return TensorDataset(x, torch.arange(n) % 5)


@pytest.fixture
def toy_dataset() -> Iterator[DatasetSpec]:
    """A 5-class, 16x16 dataset with its own eps, loadable by name, registered for one test."""
    spec = register_dataset(DatasetSpec(name=TOY, classes=5, input_size=(3, 16, 16), eps=TOY_EPS, load=_toy_data))
    yield spec
    unregister_dataset(TOY)


# ------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------
def test_builtin_datasets_keep_robustbench_facts() -> None:
    assert dataset_names()[:3] == ("cifar10", "cifar100", "imagenet")
    for name in ("cifar10", "cifar100"):
        assert dict(get_dataset(name).eps) == {"Linf": 8 / 255, "L2": 0.5, "L1": 12.0}
        assert get_dataset(name).input_size == (3, 32, 32) and get_dataset(name).load is not None
    assert (get_dataset("cifar10").classes, get_dataset("cifar100").classes) == (10, 100)
    imagenet = get_dataset("imagenet")
    assert (imagenet.classes, imagenet.input_size, dict(imagenet.eps)) == (1000, (3, 224, 224), {"Linf": 4 / 255})
    assert imagenet.preprocessing == "Res256Crop224" and imagenet.load_files is not None
    assert DEFAULT_EPS[("imagenet", "Linf")] == pytest.approx(4 / 255)
    assert DATASET_CLASSES["cifar100"] == 100 and DATASET_INPUT["imagenet"] == (3, 224, 224)
    with pytest.raises(UserError, match=r"^no default eps for imagenet L2 \(RobustBench has no such leaderboard\): "
                                        r"give one \(--eps\)$"):
        default_eps("imagenet", "L2")


def test_toy_dataset_facts_come_from_its_registration(toy_dataset: DatasetSpec) -> None:
    assert TOY in dataset_names()
    assert DATASET_CLASSES[TOY] == 5 and DATASET_INPUT[TOY] == (3, 16, 16)
    assert DEFAULT_EPS[(TOY, "Linf")] == pytest.approx(3 / 255) and (TOY, "L1") not in DEFAULT_EPS
    assert model_preprocessing("factory", "m", TOY, "Linf") == {"source": "default", "name": None}
    unregister_dataset(TOY)  # the old module-level tables are views of the registry, not copies
    assert TOY not in DATASET_CLASSES and TOY not in DATASET_INPUT and (TOY, "Linf") not in DEFAULT_EPS
    register_dataset(toy_dataset)


def test_toy_dataset_is_accepted_by_load_model_attacks_and_jobs(toy_dataset: DatasetSpec) -> None:
    model, info = load_model("tinynets:tiny_cnn5", dataset=TOY)  # 5 logits, any image size
    assert (info.num_classes, info.input_size) == (5, (3, 16, 16))
    assert AttackConfig(dataset=TOY).eps == pytest.approx(3 / 255)
    assert AttackConfig(dataset=TOY, norm="L2").eps == pytest.approx(0.25)
    with pytest.raises(UserError, match=f"no default eps for {TOY} L1"):
        AttackConfig(dataset=TOY, norm="L1")
    job = EvaluationJob(model="tinynets:tiny_cnn5", dataset=TOY, data=TOY)
    assert job.attack is not None and job.attack.eps == pytest.approx(3 / 255) and job.attack.dataset == TOY
    with pytest.raises(ModelLoadError, match="unknown dataset 'toy6'"):
        load_model("tinynets:tiny_cnn", dataset="toy6")


def test_toy_dataset_loads_by_name(toy_dataset: DatasetSpec, tmp_path: Path) -> None:
    test = load_data(TOY, "test", n=4, cache_dir=tmp_path)
    assert len(test) == 4
    assert len(load_data(TOY, "holdout", holdout=5, cache_dir=tmp_path)) == 5
    with pytest.raises(DataError, match=rf"unknown dataset 'toy6': use cifar10, cifar100, {TOY}, imagenet:DIR, "
                                        r"folder:DIR or a \.npz file"):
        load_data("toy6")
    assert not reads_image_files(TOY) and reads_image_files("imagenet:/data") and reads_image_files("folder:/d")


def test_image_files_of_a_registered_dataset(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def load_files(root: Path, split: str, transform: Any) -> TensorDataset:
        seen.update(root=root, split=split, transform=transform)
        return TensorDataset(torch.rand(6, 3, 8, 8), torch.arange(6) % 3)

    register_dataset(DatasetSpec(name="toyfiles", classes=3, input_size=(3, 8, 8), load_files=load_files))
    try:
        assert reads_image_files(f"toyfiles:{tmp_path}") and not reads_image_files("toyfiles")
        assert len(load_data(f"toyfiles:{tmp_path}", "train", transform=str)) == 6
        assert seen == {"root": tmp_path, "split": "train", "transform": str}
    finally:
        unregister_dataset("toyfiles")


def test_datasets_of_plugins_load_through_their_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[str] = []

    def entry_points(group: str) -> list[str]:  # what an installed plugin's module does on import
        groups.append(group)
        if "plugged" not in dataset_names():
            register_dataset(DatasetSpec(name="plugged", classes=2, input_size=(1, 4, 4), eps={"Linf": 0.1}))
        return ["plugged"]

    monkeypatch.setattr(dataset_registry.registry, "load_entry_points", entry_points)
    try:
        assert default_eps("plugged", "Linf") == pytest.approx(0.1)
        assert groups == ["robustify.datasets"]
    finally:
        unregister_dataset("plugged")


def test_a_dataset_registers_once() -> None:
    with pytest.raises(UserError, match="dataset 'cifar10' already registered"):
        register_dataset(DatasetSpec(name="cifar10", classes=10, input_size=(3, 32, 32)))
    with pytest.raises(TypeError, match="without ':'"):
        DatasetSpec(name="a:b", classes=2, input_size=(3, 4, 4))


# ------------------------------------------------------------------------------------------
# results to build tables from: one real evaluation, its meta varied
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real result of a tiny model (APGD-CE at a tiny budget), as ``result.json`` holds it."""
    root = tmp_path_factory.mktemp("base")
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model = tiny_cnn()
    with torch.no_grad():
        y = model(x).argmax(1)
    config = AttackConfig(attacks=("apgd-ce",), eps=2 / 255, apgd_iters=2, batch_size=8)
    evaluate(model, x, y, config, out_dir=root, progress=False,
             meta={"model": "tiny", "defense": "none", "alpha": None, "dataset": "synthetic"})
    return json.loads((root / "result.json").read_text())


def _row(base: dict[str, Any], **meta: Any) -> dict[str, Any]:
    """``base`` as the result of another row (its meta updated)."""
    result = copy.deepcopy(base)
    result["meta"].update(meta)
    return result


def _write_results(root: Path, results: list[dict[str, Any]]) -> Path:
    for i, result in enumerate(results):
        (root / f"r{i}").mkdir(parents=True)
        (root / f"r{i}" / "result.json").write_text(json.dumps(result))
    return root


@pytest.fixture
def width_defense(monkeypatch: pytest.MonkeyPatch) -> Defense:
    """A plugin defense with a setting of its own (``width``), registered for one test."""
    defense = Defense(names=("toywidth",), config_type=dict, title="ToyWidth", plan=lambda m, e, c: [],
                      apply=lambda m, e, c: m, save=lambda *a, **k: Path("x"), load=lambda *a, **k: a[0],
                      modules=lambda m: {}, setting="width", set_setting=lambda m, v: None)
    monkeypatch.setitem(defense_registry._HANDLERS, "toywidth", defense)
    return defense


# ------------------------------------------------------------------------------------------
# setting columns
# ------------------------------------------------------------------------------------------
def test_setting_columns_come_from_the_registry(base_result: dict[str, Any], width_defense: Defense) -> None:
    assert setting_names()[0] == "alpha" and setting_names()[-1] == "width"  # MeanSparse's first, the plugin's last
    without = build_table([base_result, _row(base_result, defense="sparta")])
    assert "alpha" not in without.columns and "width" not in without.columns  # no row has a value: no column
    assert list(without.columns[:4]) == ["rank", "model", "defense", "dataset"]
    with_ms = build_table([base_result, _row(base_result, defense="meansparse", alpha=0.2),
                           _row(base_result, defense="meansparse", alpha=0.1)])
    assert list(with_ms.columns[:5]) == ["rank", "model", "defense", "alpha", "dataset"]
    assert "width" not in with_ms.columns  # the plugin's setting adds no empty column
    both = build_table([base_result, _row(base_result, defense="meansparse", alpha=0.2),
                        _row(base_result, defense="toywidth", width=3.0)])
    assert list(both.columns[:6]) == ["rank", "model", "defense", "alpha", "width", "dataset"]
    names = {model_info(row)["name"] for _, row in both.iterrows()}
    assert names == {"tiny + none", "tiny + meansparse (alpha=0.2)", "tiny + toywidth (width=3.0)"}


def test_setting_curves_for_every_defense_with_a_setting(base_result: dict[str, Any], width_defense: Defense,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = build_table([base_result] + [_row(base_result, defense="meansparse", alpha=a) for a in (0.1, 0.2)]
                        + [_row(base_result, defense="toywidth", width=w) for w in (1.0, 2.0, 4.0)])
    labels: list[str] = []
    from matplotlib.axes import Axes

    errorbar = Axes.errorbar

    def record(self: Axes, *args: Any, **kwargs: Any) -> Any:
        labels.append(kwargs["label"])
        return errorbar(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", record)
    written = plot_setting_curves(table, tmp_path)
    assert [p.name for p in written] == ["alpha_tiny_2_255.png", "width_tiny_2_255.png"]
    assert labels[0] == "MeanSparse: clean" and "ToyWidth: clean" in labels


# ------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------
def test_builtin_writers_are_listed_in_the_order_they_run() -> None:
    assert BUILTIN_WRITERS == ("csv", "markdown", "model_info", "plots", "html", "latex")
    assert writer_names()[:len(BUILTIN_WRITERS)] == BUILTIN_WRITERS


def test_a_registered_writer_runs_in_write_leaderboard(base_result: dict[str, Any], tmp_path: Path) -> None:
    calls: list[tuple[int, list[str]]] = []

    def write_toy(table: pd.DataFrame, out_dir: Path, context: WriteContext) -> list[Path]:
        calls.append((len(table), list(context.written)))
        path = out_dir / "toy.txt"
        path.write_text(f"{len(table)} rows\n")
        return [path]

    root = _write_results(tmp_path / "results", [base_result, _row(base_result, defense="sparta")])
    register_writer("toy", write_toy)
    try:
        write_leaderboard(root, tmp_path / "lb", plots=False)
    finally:
        unregister_writer("toy")
    assert (tmp_path / "lb" / "toy.txt").read_text() == "2 rows\n"
    assert calls == [(2, list(BUILTIN_WRITERS))]  # after the built-in ones, seeing what they wrote
    for name in ("leaderboard.csv", "leaderboard.md", "index.html", "leaderboard.tex"):
        assert (tmp_path / "lb" / name).is_file()
    assert "alpha" not in pd.read_csv(tmp_path / "lb" / "leaderboard.csv").columns


def test_write_leaderboard_runs_the_writers_asked_for(base_result: dict[str, Any], tmp_path: Path) -> None:
    root = _write_results(tmp_path / "results", [base_result])
    write_leaderboard(root, tmp_path / "lb", writers=["csv"])
    assert [p.name for p in (tmp_path / "lb").iterdir()] == ["leaderboard.csv"]
    with pytest.raises(UserError, match="unknown writer 'nope'"):
        write_leaderboard(root, tmp_path / "lb", writers=["nope"])


def test_writers_of_plugins_load_through_their_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[str] = []
    monkeypatch.setattr(writer_registry.registry, "load_entry_points", lambda group: groups.append(group) or [])
    writer_registry.run_writers(build_table([]), Path("/nonexistent"), names=[])
    assert groups == ["robustify.writers"]
    with pytest.raises(UserError, match="writer 'csv' already registered"):
        register_writer("csv", lambda table, out_dir, context: [])
