"""RobustBench's model zoo without the network: architectures, the local checkpoint cache, zoo bugs.

* :func:`build_architecture` builds a zoo entry with random weights and never downloads:
  entries that ``robustbench.utils.load_model`` serves through timm are built through timm
  the same way (its zoo lambdas for them ask timm for misspelt names, and for weights), and
  entries whose lambda downloads torchvision weights are built without them; on a machine
  without CUDA, constructors that call ``.cuda()`` leave their tensors on the CPU.
* :func:`checkpoint_paths` is where ``robustbench.utils.load_model`` reads (and downloads)
  an entry's checkpoint under ``model_dir``; a file placed there is loaded offline.
* :func:`check_checkpoint_files` refuses an HTML page saved in place of a checkpoint
  (Google Drive's confirmation or quota page), with a one-line reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustify.load._loading import DATASET_CLASSES, first_line, html_page_error
from robustify.core.errors import ModelLoadError

__all__ = ["build_architecture", "check_checkpoint_files", "checkpoint_paths", "cuda_calls_stay_on_cpu",
           "robustbench_timm_name", "zoo_entries"]


def zoo_entries() -> Iterator[tuple[str, str, str]]:
    """Every ``(dataset, threat_model, name)`` of RobustBench's model zoo, in zoo order."""
    from robustify.core.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts

    for dataset, leaderboards in model_dicts.items():
        for threat_model, zoo in leaderboards.items():
            for name in zoo:
                yield dataset.value, threat_model.value, name


def robustbench_timm_name(name: str, dataset: str, threat_model: str) -> str:
    """The timm model name ``robustbench.utils.load_model`` tries before the zoo entry."""
    return f"{name.lower().replace('-', '_')}_{dataset.lower()}_{threat_model.replace('_3d', '').lower()}"


def checkpoint_paths(model_dir: str | Path, name: str, dataset: str, threat_model: str, entry: dict[str, Any]) -> list[Path]:
    """The checkpoint file(s) ``robustbench.utils.load_model(name, model_dir, ...)`` reads.

    ``model_dir/DATASET/THREAT_MODEL/NAME.pt``; an ensemble's members are ``NAME.pt_m0.pt``,
    ``NAME.pt_m1.pt``, ... Entries served through timm (no ``gdrive_id``) have none.
    """
    path = Path(model_dir) / dataset / threat_model.replace("_3d", "") / f"{name}.pt"
    gdrive = entry.get("gdrive_id")
    if isinstance(gdrive, list):
        return [Path(f"{path}_m{i}.pt") for i in range(len(gdrive))]
    return [path] if gdrive else []


def check_checkpoint_files(paths: list[Path]) -> None:
    """Raise :class:`ModelLoadError` if a cached checkpoint is an HTML page, not weights."""
    for path in paths:
        message = html_page_error(path)
        if message:
            raise ModelLoadError(message)


@contextmanager
def cuda_calls_stay_on_cpu() -> Iterator[None]:
    """Without CUDA, ``tensor.cuda()`` returns the tensor: some zoo constructors put constants on the
    GPU unconditionally (``bit_rn.ResNetV2``'s mean and std, in the ``Bai2023Improving_*`` entries)."""
    if torch.cuda.is_available():
        yield
        return
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda  # type: ignore[method-assign]


def _standard_r50() -> nn.Module:
    """ImageNet ``Standard_R50`` without the torchvision download its zoo lambda does."""
    from robustbench.model_zoo.architectures.utils_architectures import normalize_model
    from robustbench.model_zoo.imagenet import mu, sigma
    from torchvision.models import resnet50

    return normalize_model(resnet50(), mu, sigma)


# zoo entries whose own lambda downloads weights (or cannot build), keyed by (dataset, name)
_ARCHITECTURES: dict[tuple[str, str], Callable[[], nn.Module]] = {
    ("imagenet", "Standard_R50"): _standard_r50,
}


def build_architecture(name: str, dataset: str, threat_model: str, entry: dict[str, Any]) -> nn.Module:
    """Zoo entry ``name`` with random weights, built without the network."""
    import timm

    timm_name = robustbench_timm_name(name, dataset, threat_model)
    if timm.is_model(timm_name):  # how robustbench.utils.load_model builds it, whatever the entry says
        return timm.create_model(timm_name, num_classes=DATASET_CLASSES[dataset], pretrained=False)
    build = _ARCHITECTURES.get((dataset, name), entry["model"])
    try:
        with cuda_calls_stay_on_cpu():
            return build()
    except Exception as exc:  # noqa: BLE001 - a zoo entry can fail in any way
        raise ModelLoadError(
            f"RobustBench's zoo entry {name!r} ({dataset}/{threat_model}) does not build: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc
