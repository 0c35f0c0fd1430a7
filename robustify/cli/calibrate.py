"""``robustify inspect`` and ``robustify calibrate``: the insertion plan of a defense, and a calibrated
defense's one-pass statistics."""

from __future__ import annotations

import argparse
import json
import logging

from robustify.cli.common import (DATA_FLAGS, add_defense_args, add_model_args, defense_config_from_args,
                                  load_model_from_args, register_command)
from robustify.cli.flags import ConfigFlags
from robustify.core import distributed
from robustify.defenses import defense_names, plan_defense
from robustify.jobs.evaluate import EvaluationJob, calibrate_defense

logger = logging.getLogger("robustify")

__all__: list[str] = []

#: calibrate's ``--batch-size`` is the job's calibration batch size
CALIB_BATCH_FLAGS = ConfigFlags(EvaluationJob, ("calib_batch_size",), names={"calib_batch_size": "batch-size"})


def _inspect_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--defense", default=defense_names()[0], choices=defense_names(),
                   help="show the plan of this defense (any registered one; default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_defense_args(p)


@register_command("inspect", "print the insertion plan (sites, activation, channel axis, channels); builds the "
                  "architecture only, never downloads weights", _inspect_args)
def _cmd_inspect(args: argparse.Namespace) -> int:
    model, info = load_model_from_args(args, download=False)
    config = defense_config_from_args(args, args.defense)
    sites = plan_defense(model, info.example_input(device=args.device), config)
    if args.json:
        print(json.dumps({"model": info.to_dict(), "defense": args.defense, "sites": [s.to_dict() for s in sites]},
                         indent=2))
        return 0
    print(f"{args.defense}: {len(sites)} site(s) in {info.spec}:")
    for s in sites:
        where = s.activation if s.position == "input" else f"out:{s.activation}"
        print(f"  {s.name:40s} {where:10s} dim={s.channel_dim:<3d} C={s.channels}")
    return 0


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    names = defense_names(hook="calibrate")
    p.add_argument("--defense", default=names[0] if names else None, choices=names,
                   help="the calibrated defense to insert (default: %(default)s)")
    add_defense_args(p)
    DATA_FLAGS.add(p)
    CALIB_BATCH_FLAGS.add(p)
    p.add_argument("--out", required=True, help="defense file to write (.safetensors, + .json sidecar)")


@register_command("calibrate", "insert a calibrated defense, run its statistics pass once, save its state",
                  _calibrate_args)
def _cmd_calibrate(args: argparse.Namespace) -> int:
    model, info = load_model_from_args(args)
    _, counts = calibrate_defense(model, info, defense_config_from_args(args, args.defense), args.out,
                                  data=args.data, holdout=args.holdout, n_calib=args.n_calib,
                                  batch_size=args.batch_size, cache_dir=args.cache_dir, workers=args.workers,
                                  device=args.device)
    if distributed.is_main():
        logger.info("wrote %s (%d sites)", args.out, len(counts))
    return 0
