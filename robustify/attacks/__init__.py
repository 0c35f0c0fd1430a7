"""Attacks, all on images in [0, 1]: standard ones through pyautoattack, adaptive ones here.

Every attack is a :class:`Attack`: ``perturb(x, y) -> x_adv`` on one batch, deterministic
given its seed (each batch reseeds, as AutoAttack does), so a batch can be re-run after an
interruption with the same result. The evaluation engine (:mod:`robustify.evaluation.engine`)
decides which examples each attack sees and records who broke what.

Standard (pyautoattack's own attack objects, configured as ``AutoAttack`` configures them):
``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab-t``, ``square``; ``autoattack`` expands to the
``standard`` version's sequence ``apgd-ce, apgd-t, fab-t, square``.

Adaptive:
``bpda-apgd-ce`` / ``bpda-apgd-dlr`` (``bpda`` expands to both): APGD with every MeanSparse
backward replaced by the identity; ``bpda-apgd-t`` / ``bpda-fab-t``: targeted APGD (AutoAttack's
9 targets) and FAB-T the same way (``bpda-autoattack`` expands to the standard suite with the
straight-through backward everywhere: ``bpda-apgd-ce, bpda-apgd-t, bpda-fab-t, square``);
``soft-bpda``: APGD-CE back-propagating through a smooth surrogate of the band (a sigmoid whose
temperature is annealed over :data:`SOFT_BPDA_TEMPERATURES`, each stage starting from the
previous stage's best point) instead of the identity; ``adaptive``: the MeanSparse paper's attack (PGD on
cross-entropy minus a penalty on feature changes at the sites MeanSparse blocks; lambda=0 is
plain PGD); ``pgd``: plain PGD with the same budget (both run :func:`pgd`, adversarial training's
attack too); ``transfer``: APGD-CE crafted on the undefended base model, evaluated on the defended one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustify.core.errors import UserError
from robustify.core.config import SerializableConfig, format_eps, parse_eps
from robustify.defenses.registry import (blocked, defenses_in, disabled, site_inputs, soft_backward, straight_through,
                                         with_hook)

logger = logging.getLogger(__name__)

__all__ = ["ATTACKS", "not_applicable", "DEFAULT_EPS", "Attack", "AttackConfig", "autoattack_budgets", "autoattack_gaps", "build_attack",
           "default_eps", "evaluate_pgd", "expand_attacks", "pgd", "threat_norm"]

STANDARD = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
ADAPTIVE = ("bpda-apgd-ce", "bpda-apgd-dlr", "bpda-apgd-t", "bpda-fab-t", "soft-bpda", "adaptive", "pgd",
            "transfer")
#: soft-BPDA's temperatures (relative to each band's half-width), one APGD-CE stage each
SOFT_BPDA_TEMPERATURES = (1.0, 0.3, 0.1)
ATTACKS = STANDARD + ADAPTIVE
ALIASES = {
    "autoattack": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "bpda": ("bpda-apgd-ce", "bpda-apgd-dlr"),
    "bpda-autoattack": ("bpda-apgd-ce", "bpda-apgd-t", "bpda-fab-t", "square"),
}
NORMS = {
    "apgd-ce": ("Linf", "L2", "L1"), "apgd-dlr": ("Linf", "L2", "L1"), "apgd-t": ("Linf", "L2", "L1"),
    "fab-t": ("Linf", "L2", "L1"), "square": ("Linf", "L2", "L1"), "bpda-apgd-ce": ("Linf", "L2", "L1"),
    "bpda-apgd-dlr": ("Linf", "L2", "L1"), "bpda-apgd-t": ("Linf", "L2", "L1"), "bpda-fab-t": ("Linf", "L2", "L1"),
    "soft-bpda": ("Linf", "L2", "L1"), "adaptive": ("Linf", "L2"), "pgd": ("Linf", "L2"),
    "transfer": ("Linf", "L2", "L1"),
}
WHITE_BOX = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "pgd")
BLACK_BOX = ("square", "transfer")
#: AutoAttack's standard version, in its order: the suite behind an ``autoattack_acc``
AUTOATTACK_SUITE = ALIASES["autoattack"]
#: the order attacks run in (sequential mode) whatever order they are given in: AutoAttack's standard
#: suite, the other standard attacks, then the adaptive ones
RUN_ORDER = AUTOATTACK_SUITE + tuple(a for a in STANDARD if a not in AUTOATTACK_SUITE)

#: RobustBench's eps per (dataset, threat model): a live view of the dataset registry (each dataset's registration)
from robustify.load.datasets import EPS as DEFAULT_EPS  # noqa: E402 - here, not above: one spot to merge


def threat_norm(threat_model: str) -> str:
    """The norm attacks use for a RobustBench threat model (``corruptions``: Linf)."""
    return threat_model if threat_model in ("Linf", "L2", "L1") else "Linf"


def default_eps(dataset: str, norm: str) -> float:
    """RobustBench's eps for ``dataset`` under ``norm``: the dataset's registration (:data:`DEFAULT_EPS`);
    a one-line error "no default eps for {dataset} {norm} (RobustBench has no such leaderboard): give one (--eps)"."""
    from robustify.load.datasets import dataset_eps

    return dataset_eps(dataset, norm)


@functools.lru_cache(maxsize=None)
def autoattack_budgets(norm: str) -> dict[str, int]:
    """AutoAttack's standard-version budgets for ``norm`` as :class:`AttackConfig` fields, read from
    pyautoattack's own ``AutoAttack(version="standard")`` (L1: 5 APGD restarts, 5 target classes)."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(nn.Identity(), norm=norm, eps=1.0, version="standard")  # the model is not called
    return {"apgd_iters": aa.apgd.n_iter, "apgd_restarts": aa.apgd.n_restarts, "apgd_t_iters": aa.apgd_targeted.n_iter,
            "apgd_t_targets": aa.apgd_targeted.n_target_classes, "fab_iters": aa.fab.n_iter,
            "fab_targets": aa.fab.n_target_classes, "square_queries": aa.square.n_queries}


@dataclass(frozen=True)
class AttackConfig(SerializableConfig):
    """Threat model, attack list and budgets. Defaults are the published ones.

    ``eps`` None is RobustBench's for ``dataset`` and ``norm`` (:data:`DEFAULT_EPS`: CIFAR
    Linf 8/255, L2 0.5, L1 12; ImageNet Linf 4/255). Attacks run in :data:`RUN_ORDER`
    whatever order they are listed in. ``apgd_iters``/``apgd_restarts`` apply to APGD-CE/DLR
    (and their BPDA versions); AutoAttack's standard version uses 100 iterations, 1 restart
    (5 for L1), 9 target classes for APGD-T (5 for L1) and FAB-T, and 5000 queries for
    Square (None: these, :func:`autoattack_budgets`). The adaptive attack uses 50 steps
    (MeanSparse paper, A.4); its lambda and step size were not published (we default to
    lambda=1 and a step of 2.5*eps/steps).

    Attributes:
        attacks: the attacks (comma-separated on the command line): apgd-ce, apgd-dlr, apgd-t, fab-t,
            square, autoattack, bpda (bpda-apgd-ce + bpda-apgd-dlr), bpda-apgd-t, bpda-fab-t,
            bpda-autoattack, soft-bpda, adaptive, pgd, transfer.
        norm: the threat model: Linf, L2 or L1.
        dataset: whose RobustBench eps is the default.
        eps: perturbation budget: a float or a fraction like 8/255 (None: RobustBench's for the
            dataset and norm: CIFAR Linf 8/255, L2 0.5, L1 12; ImageNet Linf 4/255).
        seed: seeds the attacks' random starts and queries.
        batch_size: examples per attack batch.
        individual: run every attack on every correctly classified example (else only on the
            examples no earlier attack broke).
        apgd_iters: APGD-CE/DLR iterations (also of their BPDA versions and the transfer attack).
        apgd_restarts: APGD-CE/DLR restarts (None: AutoAttack's for the norm, 1; 5 for L1).
        apgd_t_iters: APGD-T iterations.
        apgd_t_targets: APGD-T target classes (None: AutoAttack's for the norm, 9; 5 for L1).
        fab_iters: FAB-T iterations.
        fab_targets: FAB-T target classes.
        square_queries: Square's query budget.
        adaptive_steps: steps of the adaptive attack.
        adaptive_lambda: the adaptive attack's lambda.
        adaptive_step_size: the adaptive attack's step size (None: 2.5*eps/steps).
    """

    VERSION: ClassVar[int] = 1
    attacks: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "square", "bpda", "adaptive", "transfer")
    norm: str = "Linf"
    dataset: str = "cifar10"
    eps: float | str | None = None
    seed: int = 0
    batch_size: int = 128
    individual: bool = False
    apgd_iters: int = 100
    apgd_restarts: int | None = None
    apgd_t_iters: int = 100
    apgd_t_targets: int | None = None
    fab_iters: int = 100
    fab_targets: int = 9
    square_queries: int = 5000
    adaptive_steps: int = 50
    adaptive_lambda: float = 1.0
    adaptive_step_size: float | None = None

    def __post_init__(self) -> None:
        if self.norm not in ("Linf", "L2", "L1"):
            raise UserError(f"unknown threat model {self.norm!r}; choose Linf, L2 or L1")
        if self.eps is None:
            object.__setattr__(self, "eps", default_eps(self.dataset, self.norm))
            logger.debug("eps not given: RobustBench's %s %s default, %s", self.dataset, self.norm,
                         format_eps(self.eps, self.norm))
        object.__setattr__(self, "eps", parse_eps(self.eps))
        for name in ("apgd_restarts", "apgd_t_targets"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, autoattack_budgets(self.norm)[name])
        object.__setattr__(self, "attacks", expand_attacks(self.attacks))
        for attack in self.attacks:
            if self.norm not in NORMS[attack]:
                raise UserError(f"attack {attack!r} does not support the {self.norm} threat model")
        for name in ("batch_size", "apgd_iters", "apgd_restarts", "apgd_t_iters", "apgd_t_targets",
                     "fab_iters", "fab_targets", "square_queries", "adaptive_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if not math.isfinite(self.adaptive_lambda) or self.adaptive_lambda < 0:
            raise UserError(f"adaptive_lambda must be >= 0, got {self.adaptive_lambda!r}")

    def budget_for(self, attack: str) -> dict[str, Any]:
        """The budget settings that affect ``attack`` (recorded in results)."""
        if attack in ("apgd-ce", "apgd-dlr", "bpda-apgd-ce", "bpda-apgd-dlr", "transfer"):
            return {"iters": self.apgd_iters, "restarts": self.apgd_restarts}
        if attack in ("apgd-t", "bpda-apgd-t"):
            return {"iters": self.apgd_t_iters, "targets": self.apgd_t_targets}
        if attack == "soft-bpda":
            return {"iters": self.apgd_iters, "stages": len(SOFT_BPDA_TEMPERATURES),
                    "temperatures": "/".join(f"{t:g}" for t in SOFT_BPDA_TEMPERATURES)}
        if attack in ("fab-t", "bpda-fab-t"):
            return {"iters": self.fab_iters, "targets": self.fab_targets}
        if attack == "square":
            return {"queries": self.square_queries}
        return {"steps": self.adaptive_steps, "lambda": self.adaptive_lambda if attack == "adaptive" else 0.0,
                "step_size": self.adaptive_step_size}


#: the defense hook an attack needs (an attack not listed needs none)
REQUIRES = {"bpda-apgd-ce": "straight_through", "bpda-apgd-dlr": "straight_through", "bpda-apgd-t": "straight_through",
            "bpda-fab-t": "straight_through", "soft-bpda": "soft_backward", "transfer": "disabled"}
#: why an attack needing a hook does not apply: to a model with no defense, and to one whose defenses lack the hook
NOT_APPLICABLE = {
    "straight_through": ("no defense with a straight-through backward (equals standard APGD)", "the defense is differentiable"),
    "soft_backward": ("no defense with a smooth-surrogate backward (equals standard APGD)", "the defense is differentiable"),
    "disabled": ("the source would be the model itself", "the defense cannot be switched off (no base model to craft on)"),
}


def not_applicable(attack: str, model: nn.Module, *, defended: bool) -> str | None:
    """Why ``attack`` does not apply to ``model`` (``defended``: the job applied a defense), None if it does."""
    hook = REQUIRES.get(attack)
    if hook == "disabled" and not defended:  # a defense that came with the model is part of the model evaluated
        return NOT_APPLICABLE[hook][0]
    if hook is None or with_hook(model, hook):
        return None
    absent, lacking = NOT_APPLICABLE[hook]
    return lacking if defenses_in(model) else absent


def autoattack_gaps(config: AttackConfig) -> list[str]:
    """How ``config`` differs from AutoAttack's standard evaluation (empty: it is that evaluation)."""
    gaps = [f"no {attack}" for attack in AUTOATTACK_SUITE if attack not in config.attacks]
    gaps += [f"{name}={getattr(config, name)} (standard {value})"
             for name, value in autoattack_budgets(config.norm).items() if getattr(config, name) != value]
    return gaps


def _run_rank(attack: str) -> tuple[int, int]:
    return (0, RUN_ORDER.index(attack)) if attack in RUN_ORDER else (1, ATTACKS.index(attack))


def expand_attacks(names: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """Expand aliases (``autoattack``, ``bpda``), drop duplicates, validate names, and put them in
    the run order (:data:`RUN_ORDER`, then the adaptive attacks): results never depend on the
    order attacks are listed in."""
    if isinstance(names, str):
        names = tuple(n.strip() for n in names.split(",") if n.strip())
    out: list[str] = []
    for name in names:
        name = name.strip().lower()
        for attack in ALIASES.get(name, (name,)):
            if attack not in ATTACKS:
                raise UserError(
                    f"unknown attack {name!r}; choose from {list(ATTACKS) + list(ALIASES)}"
                )
            if attack not in out:
                out.append(attack)
    if not out:
        raise UserError("no attack given")
    return tuple(sorted(out, key=_run_rank))


class Attack:
    """One configured attack: ``perturb(x, y)`` returns adversarial images for a batch."""

    name: str

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------------
# pyautoattack
# ------------------------------------------------------------------------------------------
def _set_apgd_iters(apgd: Any, n_iter: int) -> None:
    """Change an APGD budget the way its constructor derives the checkpoint schedule."""
    apgd.n_iter = n_iter
    apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def make_autoattack(model: Callable[[torch.Tensor], torch.Tensor], config: AttackConfig, device: Any) -> Any:
    """A pyautoattack ``AutoAttack`` (standard version settings) with the config's budgets."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm=config.norm, eps=config.eps, seed=config.seed, device=device, version="standard")
    _set_apgd_iters(aa.apgd, config.apgd_iters)
    aa.apgd.n_restarts = config.apgd_restarts
    _set_apgd_iters(aa.apgd_targeted, config.apgd_t_iters)
    aa.apgd_targeted.n_target_classes = config.apgd_t_targets
    aa.fab.n_iter = config.fab_iters
    aa.fab.n_target_classes = config.fab_targets
    aa.square.n_queries = config.square_queries
    return aa


class PyAutoAttack(Attack):
    """One of pyautoattack's attacks, called exactly as ``AutoAttack.run_standard_evaluation`` does."""

    def __init__(self, name: str, aa: Any, context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None):
        self.name = name
        self.aa = aa
        self.context = context or contextlib.nullcontext

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        aa, base = self.aa, self.name.removeprefix("bpda-")
        with self.context():
            if base in ("apgd-ce", "apgd-dlr"):
                aa.apgd.loss = "ce" if base == "apgd-ce" else "dlr"
                aa.apgd.seed = aa.get_seed()
                return aa.apgd.perturb(x, y)
            if base == "apgd-t":
                aa.apgd_targeted.seed = aa.get_seed()
                return aa.apgd_targeted.perturb(x, y)
            if base == "fab-t":
                aa.fab.targeted = True
                aa.fab.n_restarts = 1
                aa.fab.seed = aa.get_seed()
                return aa.fab.perturb(x, y)
            if base == "square":
                aa.square.seed = aa.get_seed()
                return aa.square.perturb(x, y)
        raise UserError(f"not a pyautoattack attack: {self.name!r}")


# ------------------------------------------------------------------------------------------
# adaptive attacks
# ------------------------------------------------------------------------------------------
class _BaseModelView(nn.Module):
    """The defended model with every MeanSparse module disabled: the undefended base model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with disabled(self.model):
            return self.model(x)


class TransferAttack(Attack):
    """APGD-CE crafted on a source model (default: the undefended base model)."""

    name = "transfer"

    def __init__(self, source: Callable[[torch.Tensor], torch.Tensor], config: AttackConfig, device: Any):
        self.aa = make_autoattack(source, config, device)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.aa.apgd.loss = "ce"
        self.aa.apgd.seed = self.aa.get_seed()
        return self.aa.apgd.perturb(x, y)


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
) -> torch.Tensor:
    """PGD (Madry et al.) on images in [0, 1] in the ``norm`` ball (Linf or L2) of radius ``eps``.

    Each step moves by ``step_size`` along the sign (Linf) or the direction (L2) of the gradient
    of ``loss(logits, target)`` (default: mean cross-entropy), projects back onto the ball and
    clips to [0, 1]. Untargeted, ``target`` is ``y`` and the loss rises; ``targeted``, it is a
    random wrong class per example (drawn first) and the loss falls. ``random_start``: uniform
    noise in the Linf cube of radius ``eps``, projected onto the ball. Random numbers come from
    ``generator`` (on its device; None: torch's global one). Returns the last iterate, or with
    ``first_adversarial`` per example the first iterate whose prediction is not ``y`` (the
    last if none is). Only the input gets gradients; parameters are untouched. Used by the
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
        logits = model(x + delta)
        if first_adversarial:
            fooled = logits.argmax(1) != y
            best[fooled & ~found] = (x + delta)[fooled & ~found].detach()
            found |= fooled
        value = loss(logits, target)
        (grad,) = torch.autograd.grad(-value if targeted else value, delta)
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


class MaskPenaltyPGD(Attack):
    """The MeanSparse paper's adaptive attack (appendix A.4, reconstructed).

    Maximises ``CE(f(x+d), y) - lambda * sum_l ||M_l * (z_l(x+d) - z_l(x))||_2`` by PGD with
    a random start (:func:`pgd`), where ``z_l`` is the input of MeanSparse site ``l`` and ``M_l``
    marks the entries of the clean input that site ``l`` replaces by the mean. ``lambda = 0`` is
    plain PGD. Returns, per example, the first iterate that is misclassified (else the last).
    """

    def __init__(self, model: nn.Module, config: AttackConfig, lam: float, name: str):
        self.name = name
        self.model = model
        self.eps, self.norm = config.eps, config.norm
        self.steps = config.adaptive_steps
        self.step_size = config.adaptive_step_size or 2.5 * config.eps / config.adaptive_steps
        self.lam = lam
        self.seed = config.seed

    def _masks(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad(), site_inputs(self.model) as captured:
            self.model(x)
        # in z's dtype, as the forward's (autocast too)
        return {site: (z.detach(), blocked(self.model, site, z)) for site, z in captured.items()}

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        masks = self._masks(x) if self.lam > 0 else {}
        with site_inputs(self.model) as captured:
            def objective(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                value = F.cross_entropy(logits, target, reduction="sum")
                for site, (z0, mask) in masks.items():
                    diff = (captured[site] - z0) * mask
                    value = value - self.lam * diff.flatten(1).norm(dim=1).sum()
                return value

            return pgd(self.model, x, y, eps=self.eps, steps=self.steps, step_size=self.step_size, norm=self.norm,
                       loss=objective, generator=generator, first_adversarial=True)


class SoftBPDA(Attack):
    """APGD-CE through the smooth surrogate of every MeanSparse band, temperature annealed.

    One APGD-CE run (``apgd_iters`` iterations) per temperature of
    :data:`SOFT_BPDA_TEMPERATURES`, from hot (smooth, informative gradients inside the band)
    to cold (close to the true band); each stage starts from the previous stage's
    highest-loss point. Per example the first adversarial point found is returned (else
    the last stage's best). The forward is always the true model's.
    """

    name = "soft-bpda"

    def __init__(self, model: nn.Module, aa: Any, temperatures: tuple[float, ...] = SOFT_BPDA_TEMPERATURES):
        self.model, self.aa, self.temperatures = model, aa, temperatures

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        apgd = self.aa.apgd
        apgd.loss, apgd.seed = "ce", self.aa.get_seed()
        x = x.detach().clone().float()
        apgd.init_hyperparam(x)
        torch.random.manual_seed(apgd.seed)
        adv, start = x.clone(), None
        with torch.no_grad():
            todo = self.model(x).argmax(1) == y
        for temperature in self.temperatures:
            if not todo.any():
                break
            idx = todo.nonzero().flatten()
            with soft_backward(self.model, temperature):
                best, acc, _, best_adv = apgd.attack_single_run(x[idx], y[idx],
                                                                x_init=None if start is None else start[idx])
            fooled = acc == 0
            adv[idx[fooled]] = best_adv[fooled]
            start = adv.clone() if start is None else start
            start[idx] = torch.where(fooled.view(-1, *[1] * (x.dim() - 1)), best_adv, best)
            todo[idx[fooled]] = False
        return adv


# ------------------------------------------------------------------------------------------
# factory
# ------------------------------------------------------------------------------------------
def build_attack(
    name: str,
    model: nn.Module,
    config: AttackConfig,
    *,
    device: Any = "cpu",
    source_model: nn.Module | None = None,
    autoattack: Any = None,
) -> Attack:
    """Configure attack ``name`` against ``model``.

    ``source_model`` is the transfer attack's source (default: ``model`` with MeanSparse
    disabled). ``autoattack`` lets several attacks share one pyautoattack object.
    """
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; choose from {list(ATTACKS)}")
    if name == "soft-bpda":
        return SoftBPDA(model, autoattack or make_autoattack(model, config, device))
    if name in STANDARD or name.startswith("bpda-"):
        aa = autoattack or make_autoattack(model, config, device)
        context = (lambda: straight_through(model)) if name.startswith("bpda-") else None
        return PyAutoAttack(name, aa, context)
    if name == "transfer":
        source = source_model if source_model is not None else _BaseModelView(model)
        return TransferAttack(source, config, device)
    lam = config.adaptive_lambda if name == "adaptive" else 0.0
    return MaskPenaltyPGD(_eager(model) if lam > 0 else model, config, lam, name)


def _eager(model: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile``'d one. The adaptive attack's penalty reads the
    MeanSparse inputs through forward pre-hooks, which a compiled MeanSparse+ReLU pair never
    calls (:mod:`robustify.evaluation.fast`): under compile that attack would be plain PGD."""
    eager = getattr(model, "_orig_mod", model)
    if eager is not model:
        logger.info("the adaptive attack runs on the eager model (its penalty needs MeanSparse's inputs)")
    return eager
