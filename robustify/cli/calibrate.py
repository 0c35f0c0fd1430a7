"""``robustify inspect`` and ``robustify calibrate``: the insertion plan of a defense, and MeanSparse's
one-pass calibration."""

from __future__ import annotations

import argparse
import json
import logging

from robustify.core import distributed
from robustify.defenses import defense_config, defense_names, get_defense, plan_defense
from robustify.defenses.meansparse.insert import plan
from robustify.jobs.evaluate import EvaluationJob, calibrate_defense
from robustify.cli.common import (DATA_FLAGS, add_meansparse_args, add_model_args, load_model_from_args, meansparse_config,
                     register_command)
from robustify.cli.flags import ConfigFlags

logger = logging.getLogger("robustify")

__all__: list[str] = []

#: calibrate's ``--batch-size`` is the job's calibration batch size
CALIB_BATCH_FLAGS = ConfigFlags(EvaluationJob, ("calib_batch_size",), names={"calib_batch_size": "batch-size"})


def _inspect_args(p: argparse.ArgumentParser) -> None:
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
    DATA_FLAGS.add(p)
    CALIB_BATCH_FLAGS.add(p)
    p.add_argument("--out", required=True, help="calibration file to write (.safetensors, + .json sidecar)")


@register_command("calibrate", "insert MeanSparse, calibrate in one pass, save the statistics", _calibrate_args)
def _cmd_calibrate(args: argparse.Namespace) -> int:
    model, info = load_model_from_args(args)
    _, counts = calibrate_defense(model, info, meansparse_config(args), args.out, data=args.data,
                                     holdout=args.holdout, n_calib=args.n_calib, batch_size=args.batch_size,
                                     cache_dir=args.cache_dir, workers=args.workers, device=args.device)
    if distributed.is_main():
        logger.info("wrote %s (%d sites)", args.out, len(counts))
    return 0
