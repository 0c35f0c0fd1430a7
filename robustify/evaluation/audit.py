"""The sanity suite: checks that an evaluation's attacks could have found what is there.

:func:`run_audit` takes a model, the evaluated examples and their :class:`EvalResult` and runs
four checks, each with its figure and a flag when it fails (thresholds in :class:`AuditConfig`):

* **unbounded** (``fails-unbounded``): APGD-CE at an eps covering the whole image space
  (Linf 1, L2 ``sqrt(D)``, L1 ``D``) must bring accuracy to chance (``1 / classes``) or below;
  otherwise the attack cannot reach the decision boundary (gradients are masked).
* **convergence** (``not-converged``): the gradient-based attack that broke most examples (on a
  thresholding defense: of the BPDA / soft-BPDA ones) runs again on the examples still unbroken, with twice the iterations, twice the restarts
  (at least one more) and another seed; it must not break more than ``convergence_tolerance``
  of all examples.
* **gradient census** (``masked-gradients``): per site of every defense with site inputs (its ``blocked``
  hook: MeanSparse's band, a plugin's k-WTA losers), the share of units inside
  the zero-gradient band on clean and on adversarial inputs (APGD-CE, the evaluation's
  budget), and the mean input-gradient norm with and without BPDA; flagged when a site's
  share exceeds ``masked_share``.
* **noise** (``noise-beats-white-box``): ``noise_draws`` uniform random points in the eps ball
  of every example that all gradient-based attacks tried and left unbroken; they must not break more than
  ``noise_tolerance`` of all examples.

The result is the ``audit`` entry of ``result.json`` (:func:`audit_result_file`); the
leaderboard shows its figures and flags. The flags of :func:`robustify.evaluation.results.audit`
(black-box beats white-box, BPDA beats standard, ...) and the leaderboard's
eps-monotonicity check stay as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustify.core.errors import UserError
from robustify.attacks import AttackConfig, attack_names, build_attack
from robustify.evaluation.engine import _attack_batch, _batch_seed, _chunks, _parameters_frozen, _predict
from robustify.core.config import SerializableConfig
from robustify.core.io import write_json
from robustify.defenses.registry import blocked, site_inputs, straight_through, with_hook
from robustify.evaluation.results import AUDIT_MARGIN, RESULT_FILE, EvalResult, read_result_file
from robustify.core.significance import robust_mask

logger = logging.getLogger(__name__)

__all__ = ["AuditConfig", "audit_result_file", "gradient_census", "run_audit", "unbounded_eps"]


@dataclass(frozen=True)
class AuditConfig(SerializableConfig):
    """Budgets and thresholds of the sanity suite (each stated in the results).

    Attributes:
        unbounded_examples: examples attacked at an unbounded eps.
        unbounded_iters: APGD-CE iterations of the unbounded check.
        convergence_factor: the convergence rerun's iterations and restarts, as multiples of the evaluation's.
        convergence_tolerance: share of all examples the convergence rerun may newly break (AutoAttack's
            0.2-point margin).
        census_examples: examples of the gradient census.
        masked_share: a site's largest allowed share of units inside the zero-gradient band.
        noise_draws: uniform random points drawn in the eps ball of each unbroken example.
        noise_tolerance: share of all examples random noise may break (AutoAttack's 0.2-point margin).
    """

    unbounded_examples: int = 64
    unbounded_iters: int = 20
    convergence_factor: int = 2
    convergence_tolerance: float = AUDIT_MARGIN  # share of all examples (AutoAttack's 0.2-point margin)
    census_examples: int = 32
    masked_share: float = 0.10
    noise_draws: int = 20
    noise_tolerance: float = AUDIT_MARGIN

    def __post_init__(self) -> None:
        for name in ("unbounded_examples", "unbounded_iters", "convergence_factor", "census_examples", "noise_draws"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name in ("convergence_tolerance", "masked_share", "noise_tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise UserError(f"{name} must be a share in [0, 1], got {value!r}")


def _gradient_attacks(attacks: list[str]) -> list[str]:
    """The gradient-based attacks of a run (white-box and adaptive: every kind but black-box)."""
    gradient = attack_names(gradient=True)
    return [a for a in attacks if a in gradient]


def unbounded_eps(norm: str, x: torch.Tensor) -> float:
    """A radius covering ``[0, 1]^D`` in the threat model's norm."""
    d = x[0].numel()
    return {"Linf": 1.0, "L2": math.sqrt(d), "L1": float(d)}[norm]


def _breaks(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, idx: list[int], config: AttackConfig,
            device: Any) -> tuple[list[int], int]:
    """Indices among ``idx`` that attack ``name`` breaks, and the example-passes it took."""
    broken: list[int] = []
    passes = 0
    attack = build_attack(name, model, config, device=device)
    for k, chunk in enumerate(_chunks(idx, config.batch_size)):
        rec = _attack_batch(model, attack, x, y, chunk, k, config, device)
        broken += [i for i, b in zip(chunk, rec["broken"]) if b]
        passes += rec["forward"] + rec["backward"]
    return broken, passes


def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: Any,
                   seed: int | None = None) -> list[bool]:
    """Whether the model classifies each example correctly (in batches of ``batch_size``); ``seed``: each batch
    under the evaluation's seed for its clean batch (a random model then repeats the evaluation's draws)."""
    out: list[bool] = []
    for k, chunk in enumerate(_chunks(list(range(len(x))), batch_size)):
        with _batch_seed(seed is not None, seed or 0, "clean", k, device):
            out += [bool(c) for c in (_predict(model, x[chunk].to(device)).cpu() == y[chunk]).tolist()]
    return out


def check_unbounded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: AttackConfig, audit: AuditConfig,
                    device: Any = "cpu", clean_correct: list[bool] | None = None) -> dict[str, Any]:
    """APGD-CE at an unbounded eps on the first examples: accuracy must fall to chance
    (``clean_correct``: the examples' clean correctness, if known)."""
    xs, ys = x[: audit.unbounded_examples], y[: audit.unbounded_examples]
    with torch.no_grad():
        n_classes = int(model(xs[:1].to(device)).shape[1])
    known = (clean_correct[: len(xs)] if clean_correct is not None
             else _clean_correct(model, xs, ys, config.batch_size, device))
    correct = [i for i, c in enumerate(known) if c]
    cfg = replace(config, attacks=("apgd-ce",), eps=unbounded_eps(config.norm, xs), apgd_iters=audit.unbounded_iters,
                  apgd_restarts=1)
    broken, passes = _breaks(model, "apgd-ce", xs, ys, correct, cfg, device)
    acc = (len(correct) - len(broken)) / max(len(xs), 1)
    chance = 1.0 / n_classes
    return {"examples": len(xs), "eps": cfg.eps, "iters": audit.unbounded_iters, "acc": acc, "chance": chance,
            "passes": passes, "flag": acc > chance}


def _per_example_robust(result: EvalResult, attacks: list[str]) -> list[int]:
    return [i for i, robust in enumerate(robust_mask(result.per_example, attacks)) if robust]


def _strongest(result: EvalResult) -> str | None:
    """The gradient-based attack that broke most examples; on a thresholding defense, among the attacks
    with a straight-through or smooth backward (the standard gradients are the masked ones)."""
    attacks = _gradient_attacks([a for a in result.attack_acc if a in result.per_example])
    surrogate = attack_names(surrogate_backward=True)
    through = [a for a in attacks if a in surrogate]
    attacks = through or attacks
    if not attacks:
        return None
    return max(attacks, key=lambda a: sum(1 for v in result.per_example[a] if v == 1))


def check_convergence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: EvalResult, config: AttackConfig,
                      audit: AuditConfig, device: Any = "cpu") -> dict[str, Any]:
    """The strongest gradient-based attack again, with a bigger budget, on the still-unbroken examples."""
    name = _strongest(result)
    if name is None:
        return {"attack": None, "flag": False}
    f = audit.convergence_factor
    cfg = replace(config, attacks=(name,), seed=config.seed + 1, apgd_iters=f * config.apgd_iters,
                  apgd_restarts=max(f * config.apgd_restarts, config.apgd_restarts + 1),
                  apgd_t_iters=f * config.apgd_t_iters, fab_iters=f * config.fab_iters,
                  adaptive_steps=f * config.adaptive_steps)
    unbroken = _per_example_robust(result, list(result.attack_acc))
    broken, passes = _breaks(model, name, x, y, unbroken, cfg, device) if unbroken else ([], 0)
    share = len(broken) / max(result.n_examples, 1)
    return {"attack": name, "budget": cfg.budget_for(name), "seed": cfg.seed, "unbroken": len(unbroken),
            "newly_broken": len(broken), "share": share, "tolerance": audit.convergence_tolerance, "passes": passes,
            "flag": share > audit.convergence_tolerance}


def _band_shares(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per defense site: the share of its input units whose gradient the defense blocks (its ``blocked`` hook;
    MeanSparse: inside the band ``|z - mean| < crop``)."""
    with torch.no_grad(), site_inputs(model) as captured:
        model(x)
    return {site: float(mask.float().mean()) for site, mask in blocked(model, captured).items()}


def _grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    return float(grad.flatten(1).norm(dim=1).mean())


def gradient_census(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None = None,
                    masked_share: float = AuditConfig.masked_share) -> dict[str, Any]:
    """Band shares per site on clean (and adversarial) inputs; input-gradient norm with/without BPDA."""
    if not with_hook(model, "site_inputs"):
        return {"sites": {}, "flag": False}
    clean = _band_shares(model, x)
    adv = _band_shares(model, x_adv) if x_adv is not None else {}
    sites = {s: {"clean": clean[s], **({"adversarial": adv[s]} if s in adv else {})} for s in clean}
    plain = _grad_norm(model, x, y)
    with straight_through(model):
        straight = _grad_norm(model, x, y)
    top = max(max(v.values()) for v in sites.values()) if sites else 0.0
    return {"examples": int(x.shape[0]), "sites": sites, "max_share": top, "grad_norm": plain,
            "grad_norm_bpda": straight, "masked_share": masked_share, "flag": top > masked_share}


def check_census(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: AttackConfig, audit: AuditConfig,
                 device: Any = "cpu", clean_correct: list[bool] | None = None) -> dict[str, Any]:
    """:func:`gradient_census` on the first correctly classified examples and their APGD-CE points
    (``clean_correct``: the examples' clean correctness, if known)."""
    if not with_hook(model, "site_inputs"):
        return {"sites": {}, "flag": False}
    known = clean_correct if clean_correct is not None else _clean_correct(model, x, y, config.batch_size, device)
    correct = torch.tensor([i for i, c in enumerate(known) if c][: audit.census_examples], dtype=torch.long)
    xs, ys = x[correct].to(device), y[correct].to(device)
    if not len(xs):
        return {"sites": {}, "flag": False}
    cfg = replace(config, attacks=("apgd-ce",))
    x_adv = build_attack("apgd-ce", model, cfg, device=device).perturb(xs, ys).detach()
    return gradient_census(model, xs, ys, x_adv, audit.masked_share)


def _noise(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """Uniform random points of the eps ball (Linf: the cube; L2/L1: radius eps, random direction)."""
    if norm == "Linf":
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    else:
        g = torch.randn(x.shape, generator=generator)
        if norm == "L1":
            g = g.sign() * torch.empty(x.shape).exponential_(generator=generator)
        size = g.flatten(1).norm(p=2 if norm == "L2" else 1, dim=1).clamp_min(1e-12)
        delta = g * (eps / size).view(-1, *[1] * (x.dim() - 1))
    return (x + delta.to(x.device)).clamp(0, 1)


def check_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: EvalResult, config: AttackConfig,
                audit: AuditConfig, device: Any = "cpu") -> dict[str, Any]:
    """Random points in the eps ball of the examples every gradient-based attack tried and left unbroken (in
    sequential mode, not those a black-box attack broke before a gradient attack could try them)."""
    gradient = _gradient_attacks([a for a in result.attack_acc if a in result.per_example])
    left = [i for i in _per_example_robust(result, gradient) if all(result.per_example[a][i] == 0 for a in gradient)]
    generator = torch.Generator().manual_seed(config.seed)
    broken = set()
    for chunk in _chunks(left, config.batch_size):
        xb, yb = x[chunk], y[chunk]
        for _ in range(audit.noise_draws):
            pred = _predict(model, _noise(xb, config.eps, config.norm, generator).to(device)).cpu()
            broken |= {i for i, p, t in zip(chunk, pred.tolist(), yb.tolist()) if p != t}
    share = len(broken) / max(result.n_examples, 1)
    return {"draws": audit.noise_draws, "examples": len(left), "broken": len(broken), "share": share,
            "tolerance": audit.noise_tolerance, "flag": share > audit.noise_tolerance}


def _check_same_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: EvalResult, config: AttackConfig,
                      device: Any) -> list[bool]:
    """The audited model must classify the examples exactly as the evaluated one did (a random model under
    the evaluation's seeds); returns their clean correctness."""
    seed = config.seed if (result.meta or {}).get("random_forward") else None
    clean = _clean_correct(model, x, y, config.batch_size, device, seed)
    differ = sum(c != bool(e) for c, e in zip(clean, result.per_example["clean_correct"]))
    if differ:
        raise UserError(f"the audited model or examples differ from the evaluated ones: clean predictions "
                         f"disagree on {differ} example(s)")
    return clean


FLAGS = {"unbounded": "fails-unbounded", "convergence": "not-converged", "census": "masked-gradients",
         "noise": "noise-beats-white-box"}


def run_audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: EvalResult,
              audit: AuditConfig | None = None, *, device: Any = "cpu") -> dict[str, Any]:
    """Run the four checks on an evaluated model; returns the ``audit`` entry of ``result.json``.

    ``model`` must be the evaluated model (eager, not compiled: the census hooks the defense's
    modules), ``x``/``y`` the evaluated examples in order.
    """
    audit = audit or AuditConfig()
    if x.shape[0] != result.n_examples:
        raise UserError(f"the audit needs the {result.n_examples} evaluated examples, got {x.shape[0]}")
    config = AttackConfig.from_dict(result.config)
    model.eval()
    clean = _check_same_model(model, x, y, result, config, device)
    with _parameters_frozen(model):
        checks = {
            "unbounded": check_unbounded(model, x, y, config, audit, device, clean),
            "convergence": check_convergence(model, x, y, result, config, audit, device),
            "census": check_census(model, x, y, config, audit, device, clean),
            "noise": check_noise(model, x, y, result, config, audit, device),
        }
    flags = [FLAGS[name] for name, check in checks.items() if check.get("flag")]
    for name, check in checks.items():
        logger.info("audit %s: %s", name, {k: v for k, v in check.items() if k != "sites"})
    return {"config": audit.to_dict(), **checks, "flags": flags}


def audit_result_file(out_dir: str | Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      audit: AuditConfig | None = None, *, device: Any = "cpu") -> dict[str, Any]:
    """Audit the evaluation in ``out_dir`` and store the outcome as its ``result.json``'s ``audit``."""
    path = Path(out_dir) / RESULT_FILE
    data = read_result_file(path)
    entry = run_audit(model, x, y, EvalResult.from_dict(data), audit, device=device)
    data["audit"] = entry
    write_json(path, data)
    logger.info("audit flags: %s (written to %s)", entry["flags"] or "none", path)
    return entry
