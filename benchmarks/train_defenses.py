"""Fine-tune Sparta (frozen backbone) and one activation swap on the adversarially trained ResNet-18.

Model: ``../shared/models/resnet18_at_relu.pt`` (AutoAttack's example ResNet-18, FGSM-RS
adversarially fine-tuned, functional ReLU). Data: ``../shared/data/cifar10_subset.npz``.

* Sparta: the paper's placement (G1-G4.B2, four sites), identity init (phi = sigmoid(3) at
  start), backbone frozen: only the ~12.5M Sparta parameters learn.
* Activation swap: every ReLU -> PSSiLU (one shared alpha, beta, PAF), alpha initialised to 8
  (close to the trained ReLU; PAF's alpha = 1 drops this model to ~12% clean accuracy before
  fine-tuning), fine-tuned jointly with the backbone (BatchNorm statistics kept).

CPU budget (stated in the results): FGSM-RS training (1 step of 1.25*eps from a random
start, eps 8/255) for ``--epochs`` passes over the first ``--n-train`` training images.
Evaluation: clean and PGD-10 (step eps/4, random start, seed 0) accuracy on the first
``--n-eval`` test images, before and after. Defense files go to ``runs/defenses/``
(git-ignored); the summary to ``benchmarks/results/train_defenses.{csv,md,json}``.

Reproduce: ``python benchmarks/train_defenses.py`` (defaults = the committed run).
"""

from __future__ import annotations

import argparse
import csv
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import robustify  # noqa: E402
from robustify.core.io import write_json, write_text  # noqa: E402
from robustify.defenses import apply_defense, defense_config, defense_parameters, save_defense  # noqa: E402
from robustify.jobs.train import TrainConfig, evaluate_pgd, train_defense  # noqa: E402

logger = logging.getLogger("benchmarks.train_defenses")

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "resnet18_at_relu.pt"
DATA = SHARED / "data" / "cifar10_subset.npz"
RESULTS = ROOT / "benchmarks" / "results"
EPS = 8 / 255


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=1536, help="first N training images")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n-eval", type=int, default=200, help="first N test images for clean/PGD-10")
    p.add_argument("--sparta-lr", type=float, default=0.05)
    p.add_argument("--swap", default="pssilu", help="activation swap to fine-tune jointly")
    p.add_argument("--swap-lr", type=float, default=0.005)
    p.add_argument("--swap-alpha-init", type=float, default=8.0,
                   help="initial alpha of a parametric swap (8: close to the trained ReLU; PAF uses 1 from scratch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "defenses"))
    p.add_argument("--results", default=str(RESULTS / "train_defenses"), help="summary path prefix")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def load_data(n_train: int, n_eval: int) -> tuple[torch.Tensor, ...]:
    with np.load(DATA) as d:
        x_train = torch.from_numpy(d["x_train"][:n_train]).float() / 255
        y_train = torch.from_numpy(d["y_train"][:n_train]).long()
        x_test = torch.from_numpy(d["x_test"][:n_eval]).float() / 255
        y_test = torch.from_numpy(d["y_test"][:n_eval]).long()
    return x_train, y_train, x_test, y_test


def base_model() -> tuple[torch.nn.Module, robustify.ModelInfo]:
    return robustify.load_model("aa-resnet18", weights=str(MODEL))


def train_config(args: argparse.Namespace, lr: float, frozen: bool) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, momentum=0.9, weight_decay=5e-4,
                       schedule="constant", eps=EPS, attack_steps=1, step_size=1.25 * EPS, random_start=True,
                       freeze_backbone=frozen, augment=True, seed=0)


def run_defense(name: str, options: dict, frozen: bool, lr: float, args: argparse.Namespace,
                data: tuple[torch.Tensor, ...]) -> dict:
    x_train, y_train, x_test, y_test = data
    model, info = base_model()
    example = info.example_input()
    torch.manual_seed(0)
    config = defense_config(name, **options)
    model = apply_defense(model, example, config)
    start = time.perf_counter()
    with torch.no_grad():
        clean_at_insertion = float((model(x_test).argmax(1) == y_test).float().mean())
    tconfig = train_config(args, lr, frozen)
    out = Path(args.out_dir) / f"{name}_resnet18_at_relu.safetensors"
    t0 = time.perf_counter()
    result = train_defense(model, x_train, y_train, tconfig, checkpoint=out.with_name(out.name + ".ckpt"),
                           resume=False, progress=sys.stderr.isatty())
    train_seconds = time.perf_counter() - t0
    save_defense(model, out, config, model_info=info.to_dict(), backbone=not frozen,
                 training={**tconfig.to_dict(), "data": str(DATA.name), "n_train": len(x_train),
                           "history": result.history})
    after = evaluate_pgd(model, x_test, y_test, eps=EPS, steps=10)
    trained = defense_parameters(model) if frozen else [p for p in model.parameters() if p.requires_grad]
    logger.info("%s: clean at insertion %.3f, after %s (%.0f s)", name, clean_at_insertion, after,
                time.perf_counter() - start)
    return {
        "defense": name,
        "backbone": "frozen" if frozen else "joint",
        "lr": lr,
        "options": options,
        "clean_at_insertion": clean_at_insertion,
        "clean_after": after["clean_acc"],
        "pgd10_after": after["pgd_acc"],
        "train_adv_acc_last_epoch": result.history[-1]["adv_acc"],
        "train_seconds": round(train_seconds, 1),
        "file": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
        "trained_params": sum(p.numel() for p in trained),
    }


def write_results(prefix: Path, base: dict, rows: list[dict], args: argparse.Namespace, command: str) -> None:
    budget = (f"FGSM-RS (eps 8/255, step 10/255, random start), {args.epochs} epoch(s) over the first "
              f"{args.n_train} training images, batch {args.batch_size}, SGD momentum 0.9, wd 5e-4, constant lr, "
              f"random crop + flip; CPU, {torch.get_num_threads()} thread(s), shared with other jobs")
    fields = ["defense", "backbone", "lr", "clean_before", "pgd10_before", "clean_at_insertion",
              "clean_after", "pgd10_after", "train_adv_acc_last_epoch", "train_seconds", "file"]
    table = [{"defense": "none (base)", "backbone": "-", "lr": "", "clean_before": base["clean_acc"],
              "pgd10_before": base["pgd_acc"], "clean_at_insertion": "",
              "clean_after": base["clean_acc"], "pgd10_after": base["pgd_acc"], "train_adv_acc_last_epoch": "",
              "train_seconds": "", "file": ""}]
    for r in rows:
        table.append({**{k: r.get(k, "") for k in fields}, "clean_before": base["clean_acc"],
                      "pgd10_before": base["pgd_acc"]})
    prefix.parent.mkdir(parents=True, exist_ok=True)
    from robustify.core.io import atomic_path

    with atomic_path(prefix.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)

    def pct(v: object) -> str:
        return f"{100 * v:.1f}" if isinstance(v, float) else str(v)

    lines = [
        "# Fine-tuning Sparta and an activation swap on the adversarially trained ResNet-18",
        "",
        f"Model `resnet18_at_relu.pt` (shared/models), data `cifar10_subset.npz` (shared/data). "
        f"Evaluation: first {args.n_eval} test images, clean and PGD-10 (L-inf eps 8/255, step eps/4, random "
        "start, seed 0) accuracy in %. PGD is a quick check, not AutoAttack: the leaderboard rows with the "
        "full evaluation suite are produced from the saved defense files. Sparta is differentiable, so BPDA "
        "does not apply to it (nor to activation swaps).",
        "",
        f"Budget: {budget}.",
        "",
        "| defense | options | trained | clean at insertion | clean after | PGD-10 after | train s | file |",
        "|---|---|---|---|---|---|---|---|",
        f"| none (base) | - | - | {pct(base['clean_acc'])} | {pct(base['clean_acc'])} | {pct(base['pgd_acc'])} | - | - |",
    ]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        lines.append(f"| {r['defense']} | {options} | {r['backbone']}, {r['trained_params']:,} params, lr {r['lr']} | "
                     f"{pct(r['clean_at_insertion'])} | {pct(r['clean_after'])} | {pct(r['pgd10_after'])} | "
                     f"{r['train_seconds']:.0f} | `{r['file']}` |")
    lines += ["", f"Reproduce: `{command}`", "",
              f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}.", ""]
    write_text(prefix.with_suffix(".md"), "\n".join(lines))
    write_json(prefix.with_suffix(".json"), {"budget": budget, "command": command, "base": base, "rows": rows,
                                             "args": vars(args)})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not MODEL.is_file() or not DATA.is_file():
        logger.error("needs %s and %s", MODEL, DATA)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/train_defenses.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    data = load_data(args.n_train, args.n_eval)
    model, _ = base_model()
    base = evaluate_pgd(model, data[2], data[3], eps=EPS, steps=10)
    logger.info("base model: %s", base)
    rows = [
        run_defense("sparta", {"init": "identity", "init_logit": 3.0}, True, args.sparta_lr, args, data),
        run_defense(args.swap, {"alpha_init": args.swap_alpha_init} if args.swap.startswith("p") else {}, False,
                    args.swap_lr, args, data),
    ]
    write_results(Path(args.results), base, rows, args, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
