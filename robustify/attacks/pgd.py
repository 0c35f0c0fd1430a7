"""PGD (Madry et al. 2018) on images in [0, 1]: :func:`pgd`, the one PGD of the ``adaptive`` and ``pgd``
attacks (:mod:`~robustify.attacks.mask_penalty`) and of adversarial training, and :func:`evaluate_pgd`,
the quick check after training."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate_pgd", "pgd"]


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.dim() - 1))
    return delta * (eps / flat).clamp(max=1.0)


def _step(grad: torch.Tensor, step: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return step * grad.sign()
    g = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
    return step * grad / g


def pgd(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str = "Linf",
    random_start: bool = True,
    targeted: bool = False,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    generator: torch.Generator | None = None,
    first_adversarial: bool = False,
    eot_iter: int = 1,
) -> torch.Tensor:
    """PGD (Madry et al.) on images in [0, 1] in the ``norm`` ball (Linf or L2) of radius ``eps``.

    Each step moves by ``step_size`` along the sign (Linf) or the direction (L2) of the gradient
    of ``loss(logits, target)`` (default: mean cross-entropy), projects back onto the ball and
    clips to [0, 1]. Untargeted, ``target`` is ``y`` and the loss rises; ``targeted``, it is a
    random wrong class per example (drawn first) and the loss falls. ``random_start``: uniform
    noise in the Linf cube of radius ``eps``, projected onto the ball. Random numbers come from
    ``generator`` (on its device; None: torch's global one). Returns the last iterate, or with
    ``first_adversarial`` per example the first iterate whose prediction is not ``y`` (the
    last if none is). ``eot_iter`` > 1 averages each step's gradient over that many forwards (EoT, for a
    model whose forward is random; with ``first_adversarial`` any of them misclassifying counts). Only the
    input gets gradients; parameters are untouched. Used by the
    ``adaptive`` and ``pgd`` attacks (:class:`MaskPenaltyPGD`) and by adversarial training.
    """
    if steps == 0:
        return x.detach()
    device = generator.device if generator is not None else torch.device("cpu")
    target = y
    if targeted:
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        shift = torch.randint(1, num_classes, y.shape, generator=generator, device=device).to(y.device)
        target = (y + shift) % num_classes
    delta = torch.zeros_like(x)
    if random_start:
        delta = (torch.rand(x.shape, generator=generator, device=device).to(x.device) * 2 - 1) * eps
        delta = (x + _project(delta, eps, norm)).clamp(0, 1) - x
    best = x.clone()
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(steps):
        delta.requires_grad_(True)
        grad = torch.zeros_like(x)
        for _ in range(eot_iter):
            logits = model(x + delta)
            if first_adversarial:
                fooled = logits.argmax(1) != y
                best[fooled & ~found] = (x + delta)[fooled & ~found].detach()
                found |= fooled
            value = loss(logits, target)
            grad += torch.autograd.grad(-value if targeted else value, delta)[0]
        with torch.no_grad():
            delta = _project(delta + _step(grad, step_size, norm), eps, norm)
            delta = (x + delta).clamp(0, 1) - x
    if not first_adversarial:
        return (x + delta).detach()
    final = (x + delta).detach()
    best[~found] = final[~found]  # fooled only now, or never: the last iterate either way (no forward needed)
    return best.detach()


def evaluate_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 8 / 255,
    steps: int = 10,
    step_size: float | None = None,
    batch_size: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Clean and PGD-``steps`` accuracy (L-inf, step ``eps/4`` by default, random start), in [0, 1]:
    a quick check after training, without the journal (:func:`robustify.evaluation.engine.evaluate` is the
    evaluation)."""
    step_size = eps / 4 if step_size is None else step_size
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    clean = robust = 0
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i: i + batch_size], y[i: i + batch_size]
            with torch.no_grad():
                clean += int((model(xb).argmax(1) == yb).sum())
            adv = pgd(model, xb, yb, eps=eps, steps=steps, step_size=step_size, generator=generator)
            with torch.no_grad():
                robust += int((model(adv).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return {"clean_acc": clean / len(x), "pgd_acc": robust / len(x), "n": len(x), "steps": steps, "eps": eps}
