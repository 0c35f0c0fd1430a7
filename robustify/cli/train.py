"""``robustify train``: apply a trainable defense (Sparta, an activation swap...), train
adversarially, save the defense. The choices and configs come from the defense registry.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch

from robustify.core.errors import UserError
from robustify.core.config import parse_eps
from robustify.load.data import load_model_data, to_tensors
from robustify.defenses import (applied_config, apply_defense, defense_names, file_defense, get_defense, load_defense,
                                save_defense)
from robustify.jobs.train import SCHEDULES, TrainConfig, evaluate_pgd, train_defense
from robustify.cli.common import (DATA_FLAGS, add_defense_args, add_model_args, defense_config_from_args,
                                  load_model_from_args, register_command)
from robustify.cli.flags import ConfigFlags, field_names

logger = logging.getLogger("robustify")

__all__: list[str] = []

_DEFENSES = defense_names(trainable=True)  # as registered at import (the parser reads the registry)
#: every training setting but ``freeze_backbone``, whose default depends on the defense (see _frozen_default)
TRAIN_FLAGS = ConfigFlags(TrainConfig, field_names(TrainConfig, exclude=("freeze_backbone",)),
                          parse={"eps": parse_eps, "step_size": parse_eps},
                          choices={"schedule": SCHEDULES})


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--defense", required=True, choices=defense_names(trainable=True),
                   help="what to insert or swap in")
    add_model_args(p)
    DATA_FLAGS.add(p)
    p.add_argument("--n-train", type=int, default=None, help="train on the first N training examples only")
    p.add_argument("--out", required=True, help="defense file to write (.safetensors, + .json sidecar)")
    p.add_argument("--checkpoint", default=None, help="per-epoch checkpoint (default: OUT.ckpt)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from an existing checkpoint (default: yes)")
    p.add_argument("--transfer", default=None,
                   help="a pretrained defense file (e.g. Sparta from another model) to insert frozen: training then "
                        "updates the backbone only")
    add_defense_args(p, trainable=True)
    t = p.add_argument_group("training")
    TRAIN_FLAGS.add(t)
    t.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="train only the inserted parameters (default: yes, except for fixed activations "
                        "such as silu, which have none, and with --transfer)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    t.add_argument("--eval-n", type=int, default=0, help="afterwards, clean and PGD-10 accuracy on the first N test images")


def _frozen_default(args: argparse.Namespace) -> bool:
    if args.freeze_backbone is not None:
        return bool(args.freeze_backbone)
    if args.transfer:
        return False
    return args.defense in get_defense(args.defense).learnable


def _transferred(model: Any, path: str, example: torch.Tensor, name: str) -> Any:
    """``model`` with the defense of file ``path`` inserted and its parameters frozen (``--transfer``)."""
    found, handler = file_defense(path)
    if handler is not get_defense(name):
        raise UserError(f"--transfer {path} holds a {found!r} defense, not {name!r}")
    if handler.transfer is not None:  # the defense maps its sites onto another model itself
        return handler.transfer(model, path, example)
    model = load_defense(model, path, example)
    for p in handler.parameters(model):
        p.requires_grad_(False)
    return model


@register_command("train", "insert a trainable defense (Sparta, an activation swap...), train adversarially, save it",
                  _train_args)
def _cmd_train(args: argparse.Namespace) -> int:
    frozen = _frozen_default(args)
    config = TrainConfig(**TRAIN_FLAGS.values(args), freeze_backbone=frozen)
    model, info = load_model_from_args(args)
    example = info.example_input(device=args.device)
    torch.manual_seed(args.seed)  # the inserted modules' initial weights
    if args.transfer:
        model = _transferred(model, args.transfer, example, args.defense)
        defense = applied_config(model)  # the file's config, recorded by the loader
    else:
        defense = defense_config_from_args(args, args.defense)
        model = apply_defense(model, example, defense)
    n = args.n_train
    x, y = to_tensors(load_model_data(args.data, "train", info, n=n, holdout=args.holdout, cache_dir=args.cache_dir))
    result = train_defense(model, x.to(args.device), y.to(args.device), config,
                           checkpoint=args.checkpoint or f"{args.out}.ckpt", resume=args.resume, progress=args.progress)
    training = {**config.to_dict(), "data": args.data, "n_train": len(x), "holdout": args.holdout,
                "history": result.history, "transfer": args.transfer}
    save_defense(model, args.out, defense, model_info=info.to_dict(), training=training, backbone=not frozen)
    last = result.history[-1] if result.history else {}
    summary: dict[str, Any] = {"defense": args.defense, "out": args.out, "epochs": result.epochs,
                               "adv_loss": last.get("loss"), "adv_acc": last.get("adv_acc")}
    if args.eval_n:
        xt, yt = to_tensors(load_model_data(args.data, "test", info, n=args.eval_n, cache_dir=args.cache_dir))
        summary.update(evaluate_pgd(model, xt.to(args.device), yt.to(args.device), eps=config.eps, steps=10))
    print(json.dumps(summary))
    return 0
