"""Issue 11, items 6-9, 11, 12: a job records what it applied, ensembles keep all their MeanSparse
modules, in-place activations stay activations, official statistics keep their batch size,
save_defense saves a MeanSparse calibration, wrongly sized images get a one-line message."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robustify.defenses import meansparse as ms
import robustify as rb
from robustify.cli import main
from robustify.core.memory import OutOfMemory
from robustify.jobs.evaluate import EvaluationJob, _job_meta, build_defended_model
from robustify.defenses.meansparse.state import sidecar_path
from tinynets import tiny_cnn


def _npz(path: Path, n_train: int, side: int = 32, n_test: int = 8) -> Path:
    g = np.random.default_rng(0)
    np.savez(path, x_train=g.integers(0, 256, size=(n_train, 3, side, side), dtype=np.uint8),
             y_train=g.integers(0, 10, size=n_train), x_test=g.integers(0, 256, size=(n_test, 3, side, side),
                                                                           dtype=np.uint8),
             y_test=g.integers(0, 10, size=n_test))
    return path


@pytest.fixture(scope="module")
def npz32(tmp_path_factory) -> Path:
    return _npz(tmp_path_factory.mktemp("data") / "tiny32.npz", 48)


def _job(npz: Path, out: Path, **meansparse) -> EvaluationJob:
    return EvaluationJob(model="tinynets:tiny_cnn", defense="meansparse", data=str(npz), out=str(out),
                         n_examples=8, progress=False, defense_config=ms.MeanSparseConfig(**meansparse))


def _alphas(model: nn.Module) -> dict[str, float]:
    return {site: m.alpha for site, m in ms.meansparse_modules(model).items()}


# ------------------------------------------------------------------------------------------
# 6. a calibration file does not silently override the job
# ------------------------------------------------------------------------------------------
def test_defense_weights_keep_the_jobs_per_site_alpha_and_record_what_was_applied(npz32, tmp_path) -> None:
    calibrated = _job(npz32, tmp_path / "calib", alpha=0.2)
    build_defended_model(calibrated)
    file = tmp_path / "calib" / "calibration.safetensors"
    job = replace(_job(npz32, tmp_path / "eval", alpha=0.1, site_alpha={"act1": 0.5}), defense_weights=str(file))
    model, info, _ = build_defended_model(job)
    assert _alphas(model) == {"act1": 0.5, "relu_0": 0.1}  # the job's, not the file's 0.2 nor a blanket 0.1
    meta = _job_meta(job, info, model)
    assert meta["alpha"] == 0.1
    assert meta["meansparse"]["sites"] == ["act1", "relu_0"]
    assert meta["meansparse"]["site_alpha"] == {"act1": 0.5}


def test_meansparse_that_came_with_the_model_is_recorded_as_it_is(npz32, tmp_path) -> None:
    """defense=none on a model that has MeanSparse (as RobustBench's published ones): the record
    holds the model's thresholds, not the job's unused MeanSparse settings."""
    model, info = rb.load_model("tinynets:tiny_cnn")
    model = ms.insert_meansparse(model, info.example_input(), ms.MeanSparseConfig(alpha=0.25, site_alpha={"act1": 0.5}))
    job = replace(_job(npz32, tmp_path, alpha=0.1), defense="none")
    assert _job_meta(job, info, model)["meansparse"] == {"alpha": 0.25, "site_alpha": {"act1": 0.5},
                                                         "sites": ["act1", "relu_0"]}


def test_a_file_with_another_placement_is_refused_in_one_line(npz32, tmp_path) -> None:
    build_defended_model(_job(npz32, tmp_path / "calib", alpha=0.2, exclude=("act1",)))
    file = tmp_path / "calib" / "calibration.safetensors"
    job = replace(_job(npz32, tmp_path / "eval", alpha=0.2), defense_weights=str(file))
    with pytest.raises(rb.StateMismatchError, match="placement") as err:
        build_defended_model(job)
    assert "\n" not in str(err.value) and "act1" in str(err.value)
    # the same sites selected another way are fine
    model, _, _ = build_defended_model(replace(job, defense_config=ms.MeanSparseConfig(alpha=0.2, include=("relu_*",))))
    assert list(_alphas(model)) == ["relu_0"]


def test_a_cached_calibration_of_another_placement_is_refused(npz32, tmp_path) -> None:
    build_defended_model(_job(npz32, tmp_path / "run", alpha=0.2))
    with pytest.raises(rb.StateMismatchError, match="placement"):
        build_defended_model(_job(npz32, tmp_path / "run", alpha=0.2, exclude=("relu_*",)))


def test_a_calibration_cached_from_other_data_is_refused(npz32, tmp_path) -> None:
    build_defended_model(_job(npz32, tmp_path / "run", alpha=0.2))
    with pytest.raises(rb.StateMismatchError, match="n_calib=None, the job asks for n_calib=16"):
        build_defended_model(replace(_job(npz32, tmp_path / "run", alpha=0.2), n_calib=16))


def test_official_statistics_cached_with_another_batch_size_are_refused(npz32, tmp_path) -> None:
    job = _job(npz32, tmp_path / "run", alpha=0.2, stats_mode="official")
    build_defended_model(job)
    build_defended_model(job)  # the same job reuses its cache
    with pytest.raises(rb.StateMismatchError, match="batch_size=512, the job asks for batch_size=16"):
        build_defended_model(replace(job, calib_batch_size=16))


def test_a_file_of_another_stats_mode_is_refused(npz32, tmp_path) -> None:
    build_defended_model(_job(npz32, tmp_path / "run", alpha=0.2))
    with pytest.raises(rb.StateMismatchError, match="stats_mode"):
        build_defended_model(_job(npz32, tmp_path / "run", alpha=0.2, stats_mode="official"))


# ------------------------------------------------------------------------------------------
# 7. ensembles keep every MeanSparse module
# ------------------------------------------------------------------------------------------
class _Ensemble(nn.Module):
    def __init__(self, *members: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def test_an_ensemble_of_two_robustified_models_keeps_both(tiny_model, tiny_input) -> None:
    config = ms.MeanSparseConfig(alpha=0.0)
    members = [ms.insert_meansparse(copy.deepcopy(tiny_model), tiny_input, config) for _ in range(2)]
    ensemble = _Ensemble(*members)
    modules = ms.meansparse_modules(ensemble)
    assert len(modules) == 8 and len({id(m) for m in modules.values()}) == 8
    counts = rb.calibrate(ensemble, [tiny_input], progress=False)  # every member calibrated
    assert all(m.calibrated for m in modules.values()) and list(counts) == list(modules)
    ms.set_alpha(ensemble, 0.3)
    assert all(m.alpha == 0.3 for member in members for m in ms.meansparse_modules(member).values())
    ms.set_alpha(ensemble, {"act1": 0.5})  # a site name reaches that site of every member
    assert [ms.meansparse_modules(member)["act1"].alpha for member in members] == [0.5, 0.5]
    with rb.bpda(ensemble):
        assert all(m.straight_through for member in members for m in ms.meansparse_modules(member).values())
    with torch.no_grad():
        assert torch.equal(ensemble(tiny_input), torch.stack([m(tiny_input) for m in members]).mean(0))


def test_an_ensembles_calibration_round_trips(tiny_model, tiny_input, tmp_path) -> None:
    config = ms.MeanSparseConfig(alpha=0.3)
    members = [ms.insert_meansparse(copy.deepcopy(tiny_model), tiny_input, config) for _ in range(2)]
    ensemble = _Ensemble(*members)
    rb.calibrate(ensemble, [tiny_input, tiny_input.flip(0) * 0.5], progress=False)
    path = ms.save_calibration(ensemble, tmp_path / "ens.safetensors", config=config)
    restored = ms.load_calibration(_Ensemble(copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)), path, tiny_input)
    with torch.no_grad():
        assert torch.equal(restored(tiny_input), ensemble(tiny_input))


# ------------------------------------------------------------------------------------------
# 8. in-place activations stay in place
# ------------------------------------------------------------------------------------------
class _InPlace(nn.Module):
    """Four in-place spellings whose results are unused: the code goes on with ``x``."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv4 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.inplace:
            torch.relu_(x)
        else:
            x = torch.relu(x)
        x = self.conv2(x)
        if self.inplace:
            F.relu(x, inplace=True)
        else:
            x = F.relu(x)
        x = self.conv3(x)
        if self.inplace:
            x.relu_()
        else:
            x = x.relu()
        x = self.conv4(x)
        if self.inplace:
            F.relu_(x)
        else:
            x = F.relu(x)
        return self.head(x.mean(dim=(2, 3)))


def test_in_place_activations_survive_modularize_and_insertion() -> None:
    torch.manual_seed(0)
    model = _InPlace().eval()
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        reference = model(x.clone())
        assert torch.equal(rb.defenses.sites.modularize(model)(x.clone()), reference)
        inserted = ms.insert_meansparse(copy.deepcopy(model), x, ms.MeanSparseConfig(alpha=0.0))
        assert len(ms.meansparse_modules(inserted)) == 4
        rb.calibrate(inserted, [x.clone()], progress=False)
        assert torch.equal(inserted(x.clone()), reference)


def test_in_place_activations_are_sparsified_like_their_out_of_place_twins() -> None:
    torch.manual_seed(0)
    model = _InPlace().eval()
    twin = copy.deepcopy(model)
    twin.inplace = False
    x = torch.randn(8, 3, 6, 6)
    config = ms.MeanSparseConfig(alpha=0.4)
    a, b = (ms.insert_meansparse(m, x, config) for m in (model, twin))
    for m in (a, b):
        rb.calibrate(m, [x.clone()], progress=False)
    assert list(ms.meansparse_modules(a)) == list(ms.meansparse_modules(b))
    with torch.no_grad():
        assert torch.equal(a(x.clone()), b(x.clone()))
        assert not torch.equal(a(x.clone()), twin(x.clone()))  # the defense acts (twin is not modified)


# ------------------------------------------------------------------------------------------
# 9. stats_mode="official": the published batch of 512, never changed silently
# ------------------------------------------------------------------------------------------
def test_official_statistics_default_to_the_published_batch_size() -> None:
    assert ms.MeanSparseConfig(stats_mode="official").calibration_batch_size() == 512
    assert ms.MeanSparseConfig().calibration_batch_size() == 256
    assert ms.MeanSparseConfig(stats_mode="official").calibration_batch_size(64) == 64


def test_calibrate_cli_official_uses_batches_of_512(tmp_path) -> None:
    npz = _npz(tmp_path / "big.npz", 600)
    out = tmp_path / "official.safetensors"
    assert main(["calibrate", "tinynets:tiny_cnn", "--data", str(npz), "--stats-mode", "official",
                 "--out", str(out)]) == 0
    assert json.loads(sidecar_path(out).read_text())["batch_size"] == 512
    x = torch.from_numpy(np.load(npz)["x_train"]).float() / 255
    reference = ms.insert_meansparse(tiny_cnn(), x[:2], ms.MeanSparseConfig(stats_mode="official"))
    rb.calibrate(reference, DataLoader(TensorDataset(x), batch_size=512), progress=False)
    restored = ms.load_calibration(tiny_cnn(), out, x[:2])
    for site, m in ms.meansparse_modules(restored).items():
        assert torch.equal(m.var, ms.meansparse_modules(reference)[site].var)


class _OOMAbove(nn.Module):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return x


def test_official_calibration_refuses_to_shrink_the_batch_on_oom(tiny_model, tiny_input) -> None:
    tiny_model.conv2 = nn.Sequential(_OOMAbove(3), tiny_model.conv2)
    twin = copy.deepcopy(tiny_model)
    model = ms.insert_meansparse(tiny_model, tiny_input[:2], ms.MeanSparseConfig(stats_mode="official"))
    with pytest.raises(OutOfMemory, match="official") as err:
        rb.calibrate(model, [tiny_input], progress=False)
    assert "\n" not in str(err.value) and "batch size 6" in str(err.value)
    exact = ms.insert_meansparse(twin, tiny_input[:2], ms.MeanSparseConfig())
    rb.calibrate(exact, [tiny_input], progress=False)  # exact moments do not care: it backs off


# ------------------------------------------------------------------------------------------
# 11. save_defense saves a MeanSparse calibration
# ------------------------------------------------------------------------------------------
def test_save_defense_saves_a_meansparse_calibration(tiny_model, tiny_input, tmp_path) -> None:
    fresh = copy.deepcopy(tiny_model)
    config = ms.MeanSparseConfig(alpha=0.3)
    model = ms.insert_meansparse(tiny_model, tiny_input, config)
    rb.calibrate(model, [tiny_input], progress=False)
    path = rb.save_defense(model, tmp_path / "ms.safetensors", config, model_info={"spec": "tiny"})
    restored = rb.load_defense(fresh, path, tiny_input)
    with torch.no_grad():
        assert torch.equal(restored(tiny_input), model(tiny_input))
    assert json.loads(sidecar_path(path).read_text())["model"] == {"spec": "tiny"}


# ------------------------------------------------------------------------------------------
# 12. images of the wrong size
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["evaluate", "calibrate"])
def test_wrongly_sized_images_get_a_one_line_message(command, tmp_path, capsys) -> None:
    npz = _npz(tmp_path / "small16.npz", 8, side=16)
    extra = ["--n-examples", "4", "--attacks", "apgd-ce", "--apgd-iters", "1", "--no-progress"] if command == "evaluate" else []
    out = tmp_path / ("out" if command == "evaluate" else "calib.safetensors")
    assert main([command, "tinynets:tiny_cnn", "--data", str(npz), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "images are 16x16; the model expects 32x32" in err, err
