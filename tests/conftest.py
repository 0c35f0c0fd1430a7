"""Shared test fixtures. Names are stable: other test files rely on them.

=================  ========  ===================================================================
fixture            scope     what
=================  ========  ===================================================================
``shared_dir``     session   ``Path`` of ``../shared`` (beside the repo root); skips if absent
``cifar_npz``      session   ``Path`` of ``../shared/data/cifar10_subset.npz``; skips if absent
``small_npz``      session   ``Path`` of a synthetic ``.npz`` (64 train / 16 test random uint8
                             3x32x32 images, labels 0..9); always available, for fast CLI runs
``at_weights``     session   ``Path`` of ``../shared/models/resnet18_at_relu.pt``; skips if absent
``aa_model``       function  fresh ``(model, info)`` of ``load_model("aa-resnet18")`` (AutoAttack's
                             example ResNet-18, weights from the pyautoattack wheel, 17 F.relu)
``aa_at_model``    function  fresh ``(model, info)``: aa-resnet18 with the adversarially trained
                             weights of ``at_weights``; skips if absent
``tiny_model``     function  fresh small CNN (eval mode, seeded) taking ``(N, 3, 8, 8)`` in [0, 1],
                             10 classes, with 4 activation sites: ``act1`` (nn.ReLU module),
                             an ``F.relu`` call, ``act3`` (nn.SiLU) and ``x.relu()``
``one_thread``     function  run the test with ``torch.set_num_threads(1)`` (for tiny-tensor tests)
``no_network``     function  every socket connection and DNS look-up raises ``OSError``: the test
                             proves that a code path never downloads
``tiny_input``     function  ``torch.rand(6, 3, 8, 8)``, seeded
``check_insertion`` session  ``check(spec, side, n_sites, activation, dims, channels)``: loads
                             ``spec`` without weights, inserts and calibrates MeanSparse, asserts
                             the site count/activation/channel axes/channel counts (``channels``
                             may be None) and that alpha=0 gives the base output exactly
``study_root``     session   ``Path`` of a directory with ``small.npz`` (labelled by tiny_cnn) and
                             ``studynets.py`` (tiny_a, tiny_b, slow_a); puts it on PYTHONPATH
``study_local_run`` session  ``Path`` of the tiny study (2 models x 3 settings x 2 attacks) run on
                             the local executor (tests/study_helpers.py)
=================  ========  ===================================================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study_helpers import study_local_run, study_root  # noqa: F401 - the study tests' fixtures

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


class TinyNet(nn.Module):
    """Conv-BN-ReLU (module), conv-BN-F.relu (functional), linear-SiLU (module), linear-relu (method)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 12)
        self.act3 = nn.SiLU()
        self.fc2 = nn.Linear(12, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        x = self.act3(self.fc1(x))
        x = self.fc2(x).relu()
        return self.head(x)


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, so that eval-mode activations are not all standardised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection or DNS look-up raises, so a download attempt fails at once."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def one_thread():
    """Small tensors only: one thread avoids thread-sync overhead on a busy CPU (and is deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared material not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def cifar_npz(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "cifar10_subset.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def at_weights(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "resnet18_at_relu.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8),
        y_train=rng.integers(0, 10, size=64).astype(np.int64),
        x_test=rng.integers(0, 256, size=(16, 3, 32, 32), dtype=np.uint8),
        y_test=rng.integers(0, 10, size=16).astype(np.int64),
    )
    return path


@pytest.fixture
def aa_model():
    from robustify import load_model

    return load_model("aa-resnet18")


@pytest.fixture
def aa_at_model(at_weights: Path):
    from robustify import load_model

    return load_model("aa-resnet18", weights=at_weights)


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet()
    _randomize_bn(model, 0)
    return model.eval()


@pytest.fixture
def tiny_input() -> torch.Tensor:
    return torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))



def _check_insertion(spec: str, side: int, n_sites: int, activation: str, dims: set[int], channels: list[int] | None) -> None:
    from robustify import calibrate, load_model
    from robustify.defenses.meansparse import MeanSparseConfig
    from robustify.defenses.meansparse import insert_meansparse
    from robustify.defenses.meansparse import meansparse_modules
    from robustify.defenses.meansparse import set_alpha

    model, _ = load_model(spec, pretrained=False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, side, side, generator=g)  # one image per forward: WRN-28-10 is 5 GFLOPs each
    shared = [m for m in model.modules() if type(m).__name__ == "PSSiLU"]
    calls = [0]
    handles = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in shared]
    with torch.no_grad():
        base = model(x)
    for h in handles:
        h.remove()
    if shared:  # the PAF network calls its single PSSiLU once per activation site
        assert len(shared) == 1 and calls[0] == n_sites
    ms_model = insert_meansparse(model, x, MeanSparseConfig(alpha=0.0))
    calibrate(ms_model, [torch.rand(1, 3, side, side, generator=g) for _ in range(2)], progress=False)
    modules = meansparse_modules(ms_model)
    assert len(modules) == n_sites
    assert {type(ms_model.get_submodule(s)).__name__ for s in modules} == {activation}
    assert {m.channel_dim for m in modules.values()} == dims
    if channels is not None:
        assert sorted(m.channels for m in modules.values()) == sorted(channels)
    if shared:  # one parameter-sharing copy per call
        assert len({ms_model.get_submodule(s).alpha.data_ptr() for s in modules}) == 1
    with torch.no_grad():
        assert torch.equal(ms_model(x), base)  # alpha = 0 is exactly the identity
        set_alpha(ms_model, 0.5)
        assert not torch.equal(ms_model(x), base)


@pytest.fixture(scope="session")
def check_insertion():
    return _check_insertion
