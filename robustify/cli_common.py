"""What every ``robustify`` command module shares: the command registry and the argument groups.

:mod:`robustify.cli` builds the parser from :data:`COMMANDS`; the command modules
(``cli``, ``evaluate_cli``, ``train_cli``) import this module, never each other.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["COMMANDS", "register_command"]

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register_command(
    name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorator registering ``run(args) -> int`` as ``robustify NAME``."""

    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return decorate


# ------------------------------------------------------------------------------------------
# shared argument groups
# ------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", help="robustbench:NAME, timm:NAME, aa-resnet18 or package.module:function")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 or imagenet (the model's leaderboard)")
    p.add_argument("--threat-model", default="Linf", choices=["Linf", "L2", "corruptions"])
    p.add_argument("--weights", help="local checkpoint (safetensors or weights-only PyTorch file)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="download pretrained weights (default: yes, unless --weights is given)")
    p.add_argument("--cache-dir", help="where downloads are cached (default: $ROBUSTIFY_CACHE or ~/.cache/robustify)")
    p.add_argument("--device", default="cpu")


def add_meansparse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, default=0.2, help="MeanSparse threshold in standard deviations")
    p.add_argument("--site-alpha", default=None,
                   help="per-site thresholds overriding --alpha, e.g. 'relu_0=0.1,layer4.1.relu_1=0.3'")
    p.add_argument("--include", action="append", default=None, help="glob of site names to use (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="glob of site names to skip (repeatable)")
    p.add_argument("--outputs", action="append", default=[],
                   help="glob of module names whose output gets a MeanSparse site, e.g. 'layer.*.block.?' (repeatable)")
    p.add_argument("--preset", default="all", help="placement preset: all, no-final, published")
    p.add_argument("--skip-se", action=argparse.BooleanOptionalAction, default=True,
                   help="skip activations inside squeeze-and-excitation blocks")
    p.add_argument("--channel-dim", type=int, default=None, help="force the channel axis of every site")
    p.add_argument("--stats-mode", default="exact", choices=["exact", "official"])


CALIB_BATCH_HELP = "calibration batch size (default: 256, or the published 512 with --stats-mode official)"


def add_data_args(p: argparse.ArgumentParser, required: bool = False, batch_size: int | None = 128,
                  batch_help: str | None = None) -> None:
    p.add_argument("--data", default=None if required else "cifar10", required=required,
                   help="cifar10, cifar100, imagenet:DIR, folder:DIR or a .npz file (x_train, y_train, x_test, y_test)")
    p.add_argument("--holdout", type=int, default=0,
                   help="training examples held out from calibration (for choosing alpha)")
    p.add_argument("--n-calib", type=int, default=None,
                   help="use only N calibration examples (the first; class-spread on an image folder)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    add_workers_arg(p)


def add_workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes (default: one per CPU, at most 8, for image folders; 0 for tensors)")


def meansparse_config(args: argparse.Namespace) -> Any:
    from .config import MeanSparseConfig, parse_site_alpha

    return MeanSparseConfig(
        alpha=args.alpha,
        site_alpha=parse_site_alpha(args.site_alpha) if args.site_alpha else {},
        include=tuple(args.include or ("*",)),
        exclude=tuple(args.exclude),
        outputs=tuple(args.outputs),
        skip_se=args.skip_se,
        preset=args.preset,
        channel_dim=args.channel_dim,
        stats_mode=args.stats_mode,
    )


def load_model_from_args(args: argparse.Namespace, spec: str | None = None, download: bool = True) -> tuple[Any, Any]:
    """``load_model`` with the model flags; ``download=False`` builds the architecture only
    (a local ``--weights`` file is still read), as planning needs no weights."""
    from .models import load_model

    return load_model(
        spec or args.model,
        dataset=args.dataset,
        threat_model=args.threat_model,
        weights=args.weights,
        pretrained=args.pretrained and download,
        cache_dir=args.cache_dir,
        device=args.device,
    )
