"""The ``robustify`` command line: a thin layer over the public Python API.

Every command parses its flags, calls the same functions users call from Python, and
reports errors in one line (``--debug`` shows the traceback). Commands live in small
``_cmd_*`` functions registered in :data:`COMMANDS`; other modules add theirs through
:func:`register_command`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("robustify")

__all__ = ["main", "register_command"]

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


# ------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_meansparse_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


@register_command("inspect", "print the insertion plan (sites, activation, channel axis, channels); builds the "
                  "architecture only, never downloads weights", _inspect_args)
def _cmd_inspect(args: argparse.Namespace) -> int:
    from .insert import plan

    model, info = load_model_from_args(args, download=False)
    _, sites = plan(model, info.example_input(device=args.device), meansparse_config(args))
    if args.json:
        print(json.dumps({"model": info.to_dict(), "sites": [s.to_dict() for s in sites]}, indent=2))
    else:
        print(f"{len(sites)} site(s) in {info.spec}:")
        for s in sites:
            where = s.activation if s.position == "input" else f"out:{s.activation}"
            print(f"  {s.name:40s} {where:10s} dim={s.channel_dim:<3d} C={s.channels}")
    return 0


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_meansparse_args(p)
    add_data_args(p, batch_size=None, batch_help=CALIB_BATCH_HELP)
    p.add_argument("--out", required=True, help="calibration file to write (.safetensors, + .json sidecar)")


@register_command("calibrate", "insert MeanSparse, calibrate in one pass, save the statistics", _calibrate_args)
def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate
    from .insert import insert_meansparse
    from .pipeline import calibration_loader
    from .state import save_calibration

    config = meansparse_config(args)
    model, info = load_model_from_args(args)
    model = insert_meansparse(model, info.example_input(device=args.device), config)
    batch_size = config.calibration_batch_size(args.batch_size)
    batches = calibration_loader(args.data, info, holdout=args.holdout, n_calib=args.n_calib,
                                 batch_size=batch_size, cache_dir=args.cache_dir, workers=args.workers,
                                 device=args.device)
    counts = calibrate(model, batches, device=args.device)
    from . import distributed

    if distributed.is_main():  # under torchrun every rank holds the merged statistics
        save_calibration(model, args.out, config=config, model_info=info.to_dict(),
                         extra={"data": args.data, "holdout": args.holdout, "n_calib": args.n_calib,
                                "batch_size": batch_size})
        logger.info("wrote %s (%d sites)", args.out, len(counts))
    return 0


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(prog="robustify", description=__doc__.splitlines()[0])
    _add_global_flags(parser, debug=False, verbose=0)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # after the command too; SUPPRESS keeps its parser from resetting what came before it
        _add_global_flags(p, debug=argparse.SUPPRESS, verbose=argparse.SUPPRESS)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def _add_global_flags(p: argparse.ArgumentParser, debug: Any, verbose: Any) -> None:
    p.add_argument("--debug", action="store_true", default=debug, help="show tracebacks")
    p.add_argument("-v", "--verbose", action="count", default=verbose, help="more log output (-vv: debug)")


def _load_command_modules() -> None:
    """Import the modules that register further commands (evaluation, training...)."""
    import importlib

    for module in ("robustify.evaluate_cli", "robustify.train_cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("auto-attack").setLevel(logging.WARNING if args.verbose < 2 else logging.DEBUG)
    try:
        from . import distributed

        distributed.init_from_env()  # under torchrun: join the process group (gloo on CPU)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("robustify: interrupted; completed work is kept and a rerun resumes it", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports every error in one line
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"robustify: error: {message} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
