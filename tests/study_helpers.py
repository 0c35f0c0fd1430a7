"""Shared material of the study tests: tiny models (a factory module), data and study files in a directory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


import pytest
from tinynets import write_labelled_npz

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

NETS = '''
import os, time, torch
from tinynets import tiny_cnn

def tiny_a():
    return tiny_cnn()

def tiny_b():
    m = tiny_cnn()
    with torch.no_grad():
        m.fc.weight.mul_(1.5)
    return m

def slow_a():
    """tiny_a, each forward slowed down (so that a study can be interrupted mid-cell). The hook sits on the first
    convolution: inserting a defense rebuilds the top-level module (torch.fx), which would drop a hook on it."""
    m = tiny_cnn()
    m.conv1.register_forward_pre_hook(lambda mod, args: time.sleep(float(os.environ.get("STUDY_TEST_DELAY", "0.1"))))
    return m
'''

ATTACKS = '''
[[attacks]]
name = "ce"
attacks = ["apgd-ce"]
apgd_iters = 2
batch_size = 4

[[attacks]]
name = "bpda"
attacks = ["apgd-dlr", "bpda"]
apgd_iters = 2
batch_size = 4
'''


def make_dir(root: Path) -> Path:
    """``root`` with ``small.npz`` (64 train, 16 test 3x32x32 images, labelled by tiny_cnn) and ``studynets.py``."""
    root.mkdir(parents=True, exist_ok=True)
    write_labelled_npz(str(root / "small.npz"), n_train=64, n_test=16)  # labelled by the model: attacks matter
    (root / "studynets.py").write_text(NETS)
    return root


def env_for(root: Path) -> dict[str, str]:
    """The environment the study's workers (and Slurm jobs) need to import the models and this robustify."""
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), str(root)]), "OMP_NUM_THREADS": "1"}


def study_text(root: Path, models: list[str], alphas: list[float], attacks: str = ATTACKS, extra: str = "",
               n: int = 8, base: bool = True) -> str:
    text = f'[study]\ndata = "{root / "small.npz"}"\nn_examples = {n}\nseed = 0\n{extra}\n'
    for m in models:
        name = m.split(":")[-1]
        text += f'[[models]]\nmodel = "{m}"\nname = "{name}"\n\n'
    if base:
        text += '[[defenses]]\ndefense = "none"\n\n'
    if alphas:
        text += f'[[defenses]]\ndefense = "meansparse"\ngrid = {{ alpha = {alphas} }}\n\n'
    return text + attacks


def write_study(root: Path, name: str, *args: Any, **kwargs: Any) -> Path:
    path = root / name
    path.write_text(study_text(root, *args, **kwargs))
    return path


def per_example(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())["per_example"]


def events(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / "study" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# fixtures (conftest.py imports them)
@pytest.fixture(scope="session")
def study_root(tmp_path_factory: pytest.TempPathFactory):
    """A directory with the data and the model factories; the environment the workers need."""
    root = make_dir(tmp_path_factory.mktemp("study"))
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ.update(env_for(root))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def study_local_run(study_root: Path) -> Path:
    """The tiny study (2 models x 3 settings x 2 attacks) run on the local executor, 2 worker processes."""
    from robustify.jobs.study import load_study, run_study

    root = study_root
    path = write_study(root, "tiny.toml", ["studynets:tiny_a", "studynets:tiny_b"], [0.1, 0.2])
    rows = run_study(load_study(path), root / "local", workers=2, progress=False, report=False)
    assert [r.state for r in rows] == ["done"] * 12, rows
    return root / "local"


