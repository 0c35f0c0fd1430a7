"""The default model of ``robustify run``: a small adversarially trained CIFAR-10 ResNet shipped inside the package.

``small-resnet-at`` is a ResNet-8 of 3 stages (16, 32 and 64 channels, one basic block each, 78k
parameters) that takes images in [0, 1] (no input normalisation). Its weights,
``weights/small_resnet_at_cifar10.safetensors``, were trained by ``benchmarks/train_default_model.py``
(FGSM with random start at Linf 8/255, 10 epochs, on the CIFAR-10 subset of 5085 training images; the model card is
``benchmarks/results/default_model.md``). They are checked against :data:`WEIGHTS_SHA256` before loading.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustify.core.errors import ModelLoadError

__all__ = ["NAME", "WEIGHTS_FILE", "WEIGHTS_SHA256", "SmallResNet", "load_small_resnet_at"]

#: the model spec naming this model
NAME = "small-resnet-at"
#: the shipped weights, inside the package
WEIGHTS_FILE = Path(__file__).parent / "weights" / "small_resnet_at_cifar10.safetensors"
#: their SHA-256 digest
WEIGHTS_SHA256 = "ba8a397179f18f68dd148f17ec97ae8c870058bdd6752899221544af136311b2"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; each ReLU is its own module (a MeanSparse site before it)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR ResNet: a 3x3 stem, then one stage per width (the first block of each later stage halves the size)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if stage > 0 and block == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_small_resnet_at(pretrained: bool = True) -> nn.Module:
    """:class:`SmallResNet` with the shipped adversarially trained weights (random weights if not ``pretrained``)."""
    model = SmallResNet()
    if not pretrained:
        return model
    if not WEIGHTS_FILE.is_file():
        raise ModelLoadError(f"the weights of {NAME} are missing from the package ({WEIGHTS_FILE}): reinstall robustify")
    digest = sha256(WEIGHTS_FILE)
    if digest != WEIGHTS_SHA256:
        raise ModelLoadError(f"the weights of {NAME} ({WEIGHTS_FILE}) have SHA-256 {digest[:16]}..., expected "
                             f"{WEIGHTS_SHA256[:16]}...: the file is damaged; reinstall robustify")
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(WEIGHTS_FILE)))
    return model
