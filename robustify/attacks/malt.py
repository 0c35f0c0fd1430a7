"""MALT targeting (Melamed, Yehudai & Shamir, "MALT Powers Up Adversarial Attacks", NeurIPS 2024) for APGD-T.

AutoAttack's APGD-T attacks the classes with the highest logits after the true one. MALT ranks the
classes by a first-order estimate of the distance to each class's decision boundary instead: for the
true class ``y`` and a class ``c``, the model linearised at ``x`` reaches the boundary ``z_y = z_c`` at

    d_c = (z_y - z_c) / ||grad_x (z_y - z_c)||_q

where ``q`` is the dual norm of the threat model (L1 for Linf, L2 for L2, Linf for L1). The ``k``
classes with the smallest ``d_c`` are the targets, nearest first; targeted APGD then runs on them as
APGD-T does (one target after the other, each on the examples no earlier target broke). As in the
authors' code, the candidates are the :data:`MALT_CANDIDATES` classes with the highest logits (all
of them below 101 classes). A class whose margin has a zero gradient is estimated infinitely far (the
linearisation never reaches it) and comes last; ties keep the logit order.

:func:`malt_targets` ranks; :func:`targeted_apgd` runs pyautoattack's ``APGDAttack_targeted`` (its
``attack_single_run``, unchanged; under L1 its schedule of decreasing radii) towards given targets per example. With the top-logit ranking
(:func:`top_logit_targets`) it returns what ``APGDAttack_targeted.perturb`` returns.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["DUAL_NORM", "MALT_CANDIDATES", "TARGETINGS", "malt_targets", "targeted_apgd", "top_logit_targets"]

#: how APGD-T picks its target classes: AutoAttack's (highest logits first) or MALT's (nearest boundary first)
TARGETINGS = ("top-logit", "malt")
#: classes MALT ranks per example: the highest logits after the true class (the authors' ``testk``)
MALT_CANDIDATES = 100
#: the norm of the gradient in the distance estimate: the dual of the threat model's
DUAL_NORM = {"Linf": 1.0, "L2": 2.0, "L1": math.inf}


def _others_by_logit(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` classes other than ``y`` with the highest logits, highest first (``(B, k)``)."""
    others = logits.detach().float().scatter(1, y[:, None], -math.inf)
    return others.topk(k, dim=1).indices


def top_logit_targets(model: Any, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """AutoAttack's APGD-T targets: the ``k`` classes other than ``y`` with the highest logits (``(B, k)``)."""
    with torch.no_grad():
        logits = model(x)
    return _others_by_logit(logits, y, min(k, logits.shape[1] - 1))


def malt_targets(model: Any, x: torch.Tensor, y: torch.Tensor, norm: str, k: int,
                 candidates: int = MALT_CANDIDATES) -> torch.Tensor:
    """MALT's ``k`` target classes per example, nearest estimated boundary first (``(B, min(k, classes - 1))``).

    One forward pass and one backward pass per candidate class (the gradient of each margin ``z_y - z_c``;
    rows of a batch do not interact in an eval-mode model, so one backward serves the whole batch).
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        m = min(candidates, logits.shape[1] - 1)
        cand = _others_by_logit(logits, y, m)
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        distance = torch.full(cand.shape, math.inf, device=x.device)
        for j in range(m):
            margin = z_y - logits.gather(1, cand[:, j : j + 1]).squeeze(1)
            (grad,) = torch.autograd.grad(margin.sum(), x, retain_graph=j < m - 1)
            size = grad.detach().flatten(1).float().norm(p=DUAL_NORM[norm], dim=1)
            distance[:, j] = torch.where(size > 0, margin.detach().float() / size.clamp_min(1e-30),
                                         torch.full_like(size, math.inf))
    order = distance.argsort(dim=1, stable=True)[:, : min(k, m)]
    return cand.gather(1, order)


def _single_run(apgd: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One run of ``apgd`` towards ``apgd.y_target``; under AutoAttack's L1 settings (``use_largereps``) its
    schedule of decreasing radii (3, 2, 1 times eps over 30%, 30%, 40% of the iterations), as ``perturb`` runs it."""
    if not apgd.use_largereps:
        return apgd.attack_single_run(x, y)
    iters = [math.ceil(0.3 * apgd.n_iter_orig)] * 2
    iters.append(apgd.n_iter_orig - sum(iters))
    return apgd.decr_eps_pgd(x, y, [3.0 * apgd.eps_orig, 2.0 * apgd.eps_orig, 1.0 * apgd.eps_orig], iters)


def targeted_apgd(apgd: Any, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """pyautoattack's ``APGDAttack_targeted`` towards ``targets[:, 0]``, then ``targets[:, 1]``, ... per example.

    As ``APGDAttack_targeted.perturb`` runs: seeded once with ``apgd.seed``, ``apgd.n_restarts`` runs
    per target, each on the correctly classified examples no earlier run broke; returns the adversarial
    images (the clean ones where nothing succeeded).
    """
    apgd.init_hyperparam(x)
    x = x.detach().clone().float().to(apgd.device)
    y = y.detach().clone().long().to(apgd.device)
    targets = targets.to(apgd.device)
    with torch.no_grad():
        robust = apgd.model(x).argmax(1) == y
    adv = x.clone()
    torch.random.manual_seed(apgd.seed)
    torch.cuda.random.manual_seed(apgd.seed)
    for column in targets.T:
        for _ in range(apgd.n_restarts):
            idx = robust.nonzero().flatten()
            if idx.numel() == 0:
                return adv
            apgd.y_target = column[idx]
            _, acc, _, adv_run = _single_run(apgd, x[idx], y[idx])
            fooled = (acc == 0).nonzero().flatten()
            robust[idx[fooled]] = False
            adv[idx[fooled]] = adv_run[fooled].detach()
    return adv
