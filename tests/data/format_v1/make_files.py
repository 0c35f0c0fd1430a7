"""Write the defense files of the format robustify used before issue 12 (one file per format).

Run once, on commit 75da625 (the last code writing these formats), from the repository root:
``PYTHONPATH=.:tests python tests/data/format_v1/make_files.py``. The files and the logits they
give (``expected_logits.safetensors``) are committed; ``tests/test_defense_file.py`` loads them with
today's code and checks the logits exactly, so old files keep loading.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import robustify as rb
from tinynets import tiny_cnn

OUT = Path(__file__).resolve().parent
EXAMPLE = torch.zeros(2, 3, 32, 32)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move the inserted parameters off their initial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rb.train.defense_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def main() -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    logits: dict[str, torch.Tensor] = {}

    ms = rb.insert_meansparse(tiny_cnn(), EXAMPLE, rb.MeanSparseConfig(alpha=0.3))
    rb.calibrate(ms, [x], progress=False)
    rb.save_calibration(ms, OUT / "meansparse.safetensors", config=rb.MeanSparseConfig(alpha=0.3),
                        model_info={"spec": "tinynets:tiny_cnn"})
    configs = {"sparta": rb.SpartaConfig(preset="all", init="identity"),
               "pssilu": rb.ActivationConfig(name="pssilu"),
               "smoothrelu": rb.SmoothReLUConfig()}
    models = {"meansparse": ms}
    for seed, (name, config) in enumerate(configs.items()):
        model = rb.apply_defense(tiny_cnn(), EXAMPLE, config)
        _perturb(model, seed)
        if name == "pssilu":  # jointly trained: the backbone file differs from tiny_cnn's weights
            with torch.no_grad():
                model.fc.bias.add_(0.5)
        rb.save_defense(model, OUT / f"{name}.safetensors", model_info={"spec": "tinynets:tiny_cnn"},
                        backbone=name == "pssilu")
        models[name] = model
    with torch.no_grad():
        for name, model in models.items():
            logits[name] = model(x)
    save_file({"x": x, **logits}, str(OUT / "expected_logits.safetensors"))


if __name__ == "__main__":
    main()
