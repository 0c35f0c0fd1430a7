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
from collections.abc import Sequence
from typing import Any

from .cli_common import (  # noqa: F401 - the shared helpers, also reachable here as before
    CALIB_BATCH_HELP,
    COMMANDS,
    add_data_args,
    add_meansparse_args,
    add_model_args,
    load_model_from_args,
    meansparse_config,
    register_command,
)
from .errors import first_line

logger = logging.getLogger("robustify")

__all__ = ["main", "register_command"]

# ------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    from .defenses import defense_names

    add_model_args(p)
    add_meansparse_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--defense", default="meansparse", choices=defense_names(),
                   help="show the plan of this defense (any registered one; default MeanSparse)")
    g = p.add_argument_group("Sparta / activation-swap placement")
    g.add_argument("--sparta-preset", default="paper", choices=["paper", "blocks", "all"])
    g.add_argument("--site", action="append", default=None, dest="sites")
    g.add_argument("--replace", action="append", default=None)


@register_command("inspect", "print the insertion plan (sites, activation, channel axis, channels); builds the "
                  "architecture only, never downloads weights", _inspect_args)
def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.defense != "meansparse":
        return _inspect_defense(args)
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


def _inspect_defense(args: argparse.Namespace) -> int:
    """``inspect --defense NAME``: the registry builds the config and plans it."""
    from .defenses import defense_config, get_defense, plan_defense

    handler = get_defense(args.defense)
    model, info = load_model_from_args(args, download=False)
    options = handler.cli_options(args, False) if handler.cli_options else {}
    sites = plan_defense(model, info.example_input(device=args.device), defense_config(args.defense, **options))
    if args.json:
        print(json.dumps({"model": info.to_dict(), "defense": args.defense, "sites": [s.to_dict() for s in sites]},
                         indent=2))
    else:
        print(f"{args.defense}: {len(sites)} site(s) in {info.spec}:")
        for s in sites:
            print(f"  {s.name:40s} {s.activation:10s} dim={s.channel_dim:<3d} C={s.channels}")
    return 0


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_meansparse_args(p)
    add_data_args(p, batch_size=None, batch_help=CALIB_BATCH_HELP)
    p.add_argument("--out", required=True, help="calibration file to write (.safetensors, + .json sidecar)")


@register_command("calibrate", "insert MeanSparse, calibrate in one pass, save the statistics", _calibrate_args)
def _cmd_calibrate(args: argparse.Namespace) -> int:
    from . import distributed
    from .pipeline import calibrate_meansparse

    model, info = load_model_from_args(args)
    _, counts = calibrate_meansparse(model, info, meansparse_config(args), args.out, data=args.data,
                                     holdout=args.holdout, n_calib=args.n_calib, batch_size=args.batch_size,
                                     cache_dir=args.cache_dir, workers=args.workers, device=args.device)
    if distributed.is_main():
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
    """Import the modules that register further commands (evaluation, training...), after this
    module's own commands so that the order of ``robustify --help`` stays the same."""
    from . import evaluate_cli, train_cli  # noqa: F401 - they register their commands on import


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
        print(f"robustify: error: {first_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
