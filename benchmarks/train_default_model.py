"""Train the default model of ``robustify run`` (``small-resnet-at``): fast adversarial training from scratch.

Recipe (Wong et al. 2020, "Fast is better than free"): FGSM with a uniform random start, Linf eps 8/255, step
1.25*eps, on random crops (reflect padding 4) and horizontal flips; SGD with Nesterov momentum 0.9, weight decay
5e-4, batch 128, a one-cycle learning rate (linear up to --lr over the first 40% of the steps, then linear down
to 0). Each epoch ends with PGD-10 robust accuracy on the first --monitor test images (monitoring only: the last
epoch is saved, whatever it shows).

Data, either:

* ``--data cifar10_subset.npz``: a file with ``x_train`` (uint8, N x 3 x 32 x 32) and ``y_train``; the project's
  subset holds the first 1017 images of each official CIFAR-10 training batch (5085 images), and its first test
  images are used for monitoring;
* ``--cifar10-root DIR``: the official CIFAR-10 (all 50000 training images), downloaded there by torchvision.

The shipped weights were made by (16 minutes, one thread, on a 2-core CPU shared with other jobs)::

    python benchmarks/train_default_model.py --data ../shared/data/cifar10_subset.npz \
        --out robustify/load/weights/small_resnet_at_cifar10.safetensors

then ``WEIGHTS_SHA256`` in ``robustify/load/small_resnet.py`` set to the digest it prints.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustify.load.small_resnet import SmallResNet, sha256

logger = logging.getLogger("train_default_model")


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: uint8 NCHW images and int64 labels."""
    if args.data:
        d = np.load(args.data)
        return (torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"]).long(),
                torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"]).long())
    from torchvision.datasets import CIFAR10

    train = CIFAR10(args.cifar10_root, train=True, download=True)
    test = CIFAR10(args.cifar10_root, train=False, download=True)

    def tensors(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    return (*tensors(train), *tensors(test))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the reflect-padded (4) images and random horizontal flips."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None].expand(n, 3, 32, 40)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :].expand(n, 3, 32, 32)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
            generator: torch.Generator) -> torch.Tensor:
    """FGSM from a uniform random start in the eps-ball, projected back onto it and onto [0, 1]."""
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    delta.requires_grad_(True)
    loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10) -> tuple[float, float]:
    """Clean and PGD (random start, step eps/4) accuracy, model in eval mode."""
    model.eval()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    delta = (torch.rand_like(x) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + eps / 4 * grad.sign()).clamp(-eps, eps)
    with torch.no_grad():
        robust = (model((x + delta).clamp(0, 1)).argmax(1) == y).float().mean().item()
    model.train()
    return clean, robust


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="an .npz with x_train, y_train, x_test, y_test (uint8 NCHW)")
    src.add_argument("--cifar10-root", help="download the official CIFAR-10 here (torchvision)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--step", type=float, default=1.25, help="FGSM step, in units of eps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--monitor", type=int, default=200, help="test images for the per-epoch PGD-10 check")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    x_train, y_train, x_test, y_test = load_data(args)
    x_train = x_train.float() / 255
    x_mon, y_mon = x_test[: args.monitor].float() / 255, y_test[: args.monitor]
    model = SmallResNet()
    logger.info("%d training images, %d parameters", len(x_train), sum(p.numel() for p in model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.4, anneal_strategy="linear", cycle_momentum=False,
                                                div_factor=25, final_div_factor=1e4)
    start = time.time()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = augment(x_train[idx], generator), y_train[idx]
            x_adv = fgsm_rs(model, x, y, args.eps, args.step * args.eps, generator)
            out = model(x_adv)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(y)
            correct += (out.argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(y)
        clean, robust = pgd_accuracy(model, x_mon, y_mon, args.eps)
        logger.info("epoch %d/%d: train adv loss %.3f acc %.1f%%; first %d test: clean %.1f%% PGD-10 %.1f%% (%.0f s)",
                    epoch + 1, args.epochs, loss_sum / total, 100 * correct / total, args.monitor, 100 * clean,
                    100 * robust, time.time() - start)
        save(model, Path(args.out))  # after every epoch: an interrupted run leaves its last epoch
    logger.info("wrote %s (%.0f s of training); SHA-256 %s", args.out, time.time() - start, sha256(Path(args.out)))


def save(model: nn.Module, path: Path) -> None:
    """The model's state dict as safetensors (written next to ``path``, then moved there)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


if __name__ == "__main__":
    main()
