"""Tiny deterministic models for fast CPU tests (importable as a factory spec ``tinynets:NAME``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """Conv-BN-ReLU (module), Conv-BN-F.relu (functional), linear head; 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=4, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial BN statistics so MeanSparse has something to cut
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def seeded_resnet18() -> tuple[nn.Module, torch.Tensor]:
    """AutoAttack's example ResNet-18, random init with seed 0 (no weights), and its example input."""
    import robustify

    torch.manual_seed(0)
    model, info = robustify.load_model("aa-resnet18", pretrained=False)
    return model, info.example_input()


def small_dm_wrn() -> nn.Module:
    """RobustBench's DMWideResNet (SiLU) at depth 10, width 1: 3 residual blocks, random init, seed 0."""
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet

    torch.manual_seed(0)
    return DMWideResNet(num_classes=10, depth=10, width=1, activation_fn=nn.SiLU).eval()


def write_labelled_npz(path: str, n_train: int = 96, n_test: int = 40) -> None:
    """Random uint8 images labelled by :func:`tiny_cnn` itself (100% clean accuracy: attacks matter)."""
    import numpy as np

    g = np.random.default_rng(0)
    x_train = g.integers(0, 256, size=(n_train, 3, 32, 32), dtype=np.uint8)
    x_test = g.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    model = tiny_cnn()
    with torch.no_grad():
        y_train, y_test = (model(torch.from_numpy(x).float() / 255).argmax(1).numpy() for x in (x_train, x_test))
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


class TinyPooledCNN(nn.Module):
    """Conv-BN-ReLU (module), Conv-BN-F.relu (functional), global mean, linear head: any image size, ``classes``
    logits."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_cnn5() -> nn.Module:
    """:class:`TinyPooledCNN` with 5 classes, seed 0, non-trivial BN statistics."""
    torch.manual_seed(0)
    model = TinyPooledCNN(5)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


class StochasticJitter(nn.Module):
    """A random input transformation with stochastic gradients: ``x + (c/k) * n * sin(k x)``, ``n ~ N(0, 1)``
    drawn per forward from torch's global generator (so seeded runs repeat).

    Its value moves each pixel by at most ``c/k * |n|`` (0.004 |n|): predictions barely change. Its Jacobian
    ``1 + c n cos(k x)`` has a random sign per pixel, so one forward's gradient is mostly noise, while the
    average over forwards is the wrapped model's own (E[n] = 0): what expectation over transformation (EoT)
    recovers and a single-sample attack does not."""

    def __init__(self, c: float = 4.0, k: float = 1000.0) -> None:
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.c / self.k) * torch.randn_like(x) * torch.sin(self.k * x)


def random_tiny_cnn() -> nn.Module:
    """:func:`tiny_cnn` behind :class:`StochasticJitter`: a model whose forward is random."""
    return nn.Sequential(StochasticJitter(), tiny_cnn()).eval()
