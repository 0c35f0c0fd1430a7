"""CIFAR-10: 10 classes of 32x32 images; torchvision's download.

RobustBench's eps: Linf 8/255, L2 0.5, and L1 12 (AutoAttack's L1 evaluation, Croce & Hein 2021).
"""

from robustify.load.datasets._files import torchvision_loader
from robustify.load.datasets.registry import DatasetSpec, register_dataset

CIFAR10 = register_dataset(DatasetSpec(
    name="cifar10",
    classes=10,
    input_size=(3, 32, 32),
    eps={"Linf": 8 / 255, "L2": 0.5, "L1": 12.0},
    load=torchvision_loader("cifar10", "CIFAR10"),
))
