"""The result schema of an evaluation: :class:`EvalResult`, ``result.json`` and the per-result flags.

:func:`robustify.evaluation.engine.evaluate` writes an :class:`EvalResult` to ``<out>/result.json``;
:func:`load_result` reads it back. :func:`audit` derives the gradient-masking flags from a
result alone (the cross-row checks live in :mod:`robustify.reporting.leaderboard`; the sanity suite that
reruns attacks is :mod:`robustify.evaluation.audit`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustify.core.errors import UserError
from robustify.attacks import attack_names

__all__ = ["AUDIT_MARGIN", "RESULT_FILE", "EvalResult", "audit", "load_result"]

RESULT_FILE = "result.json"
AUDIT_MARGIN = 0.002  # AutoAttack's check_square_sr tolerance (0.2 points)


@dataclass
class EvalResult:
    """Everything an evaluation found, flat enough for a leaderboard row.

    Attributes:
        meta: what was evaluated (model, defense and its settings, data, preprocessing, ``not_applicable``).
        config: the attack config (``AttackConfig.to_dict()``).
        n_examples: how many images were evaluated.
        clean_acc: clean accuracy (a fraction).
        attack_acc: attack name -> robust accuracy after it (a fraction).
        worst_case_acc: share of the images no attack broke.
        flags: the gradient-masking flags of this result.
        per_example: ``clean_correct`` and, per attack, 1 (broke it), 0 (did not) or None (not attacked).
        seconds: wall time per phase.
        versions: library versions.
        aa_checks: AutoAttack's own checks that fired.
        finished: when the result was written (UTC ISO time).
        data_fingerprint: digest of the evaluated images and labels (pairs rows).
        cost: per phase, forward and backward example-passes and seconds.

    Examples:
        >>> from robustify.attacks import AttackConfig
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> x, y = rb.to_tensors(rb.load_data("../shared/data/cifar10_subset.npz", "test", n=4))
        >>> result = rb.evaluate(model, x, y, AttackConfig(attacks=("apgd-ce",), apgd_iters=1), progress=False)
        >>> result.n_examples, result.per_example["clean_correct"]
        (4, [1, 1, 1, 0])
    """

    meta: dict[str, Any]
    config: dict[str, Any]
    n_examples: int
    clean_acc: float
    attack_acc: dict[str, float]
    worst_case_acc: float
    flags: list[str]
    per_example: dict[str, list[int | None]]
    seconds: dict[str, float]
    versions: dict[str, str]
    aa_checks: list[str] = field(default_factory=list)
    finished: str | None = None  # UTC ISO time the result was written (the newest duplicate wins)
    data_fingerprint: str | None = None  # sha256 of the evaluated images and labels (pairs rows)
    cost: dict[str, dict[str, Any]] = field(default_factory=dict)  # per phase: passes and seconds (cost.py)
    adversarial: str | None = None  # the worst-case adversarial examples' file in the result's directory, if kept

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def read_result_file(path: str | Path) -> dict[str, Any]:
    """The raw dict of a ``result.json`` (or the directory holding one), all keys kept."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read results file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"cannot read results file {str(path)!r}: not a JSON object")
    return data


def load_result(path: str | Path) -> EvalResult:
    """Read a ``result.json`` (or the directory holding one).

    Args:
        path: a ``result.json``, or the ``out_dir`` of an evaluation.

    Returns:
        The :class:`EvalResult` (keys it does not know are left out; ``read_result_file`` keeps them).

    Raises:
        UserError: the file is missing or is not a result.

    Examples:
        >>> from robustify.attacks import AttackConfig
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> x, y = rb.to_tensors(rb.load_data("../shared/data/cifar10_subset.npz", "test", n=4))
        >>> _ = rb.evaluate(model, x, y, AttackConfig(attacks=("apgd-ce",), apgd_iters=1), out_dir="runs/a",
        ...                 progress=False)
        >>> rb.load_result("runs/a").clean_acc
        0.75
    """
    data = read_result_file(path)
    try:
        return EvalResult.from_dict(data)
    except TypeError as exc:
        raise UserError(f"cannot read results file {str(path)!r}: {exc}") from exc


# ------------------------------------------------------------------------------------------
# gradient-masking audit (per result; cross-row checks live in robustify.reporting.leaderboard)
# ------------------------------------------------------------------------------------------
def _breaks(result: EvalResult, attack: str) -> set[int]:
    return {i for i, v in enumerate(result.per_example.get(attack, [])) if v == 1}


def _saw(result: EvalResult, attack: str) -> set[int]:
    """The examples ``attack`` ran on (its per-example record is 0 or 1; None: it never saw the example)."""
    return {i for i, v in enumerate(result.per_example.get(attack, [])) if v is not None}


def _among(attacks: list[str], names: tuple[str, ...]) -> list[str]:
    """The attacks of ``attacks`` that are among ``names``, in ``attacks``' order."""
    return [a for a in attacks if a in names]


def _beaten(result: EvalResult, challengers: list[str], baseline: list[str]) -> set[int]:
    """The examples some attack of ``challengers`` broke that every attack of ``baseline`` saw and left robust.

    An example a baseline attack never ran on (in sequential mode: one broken before it ran) says nothing
    about that attack, so it does not count: a challenger only beats the baseline where the baseline tried.
    """
    broken = set().union(*[_breaks(result, a) for a in challengers]) if challengers else set()
    for attack in baseline:
        broken &= _saw(result, attack) - _breaks(result, attack)
    return broken


def audit(result: EvalResult) -> list[str]:
    """Flags that suggest gradient masking or an unreliable evaluation.

    * ``black-box-beats-white-box``: a black-box attack (Square, transfer) breaks examples that
      every white-box attack run saw and left robust (more than 0.2 points, as AutoAttack's check).
    * ``bpda-beats-standard``: a straight-through (BPDA) attack breaks examples every standard
      white-box attack saw and left robust.
    * ``adaptive-beats-standard``: the adaptive attack breaks examples every standard attack saw and
      left robust.
    * ``autoattack-checks``: one of AutoAttack's own checks fired (see ``aa_checks``).
    * ``random-without-eot``: the model's forward is random (``meta["random_forward"]``) and no attack
      averaged its gradients over several forwards (EoT: ``eot_iter`` 1, or only attacks without EoT such as
      Square): its robust accuracy is an overestimate. (A random model's clean accuracy is one forward per
      example, as AutoAttack's; an example is robust when the forward checking an attack's output is right.)

    Each comparison counts only examples the compared attacks all ran on (:func:`_beaten`): in
    sequential mode an attack never sees what an earlier one broke. What an attack is (white-box,
    black-box, straight-through, standard) is the attack registry's (:func:`robustify.attacks.attack_names`).
    """
    n = max(result.n_examples, 1)
    attacks = list(result.attack_acc)
    white = _among(attacks, attack_names(kind="white-box"))
    flags = []

    def extra(challengers: list[str], baseline: list[str]) -> float:
        return len(_beaten(result, challengers, baseline)) / n

    if white and extra(_among(attacks, attack_names(gradient=False)), white) > AUDIT_MARGIN:
        flags.append("black-box-beats-white-box")
    bpda_attacks = _among(attacks, attack_names(requires="straight_through"))
    standard_white = _among(attacks, attack_names(kind="white-box", standard=True))
    if standard_white and bpda_attacks and extra(bpda_attacks, standard_white) > AUDIT_MARGIN:
        flags.append("bpda-beats-standard")
    standard = _among(attacks, attack_names(standard=True))
    if standard and "adaptive" in attacks and extra(["adaptive"], standard) > AUDIT_MARGIN:
        flags.append("adaptive-beats-standard")
    if result.aa_checks:
        flags.append("autoattack-checks")
    if _random_without_eot(result):
        flags.append("random-without-eot")
    return flags


def _random_without_eot(result: EvalResult) -> bool:
    """The forward is random and no attack of the result ran with EoT (more than one forward per gradient)."""
    if not (result.meta or {}).get("random_forward"):
        return False
    with_eot = _among(list(result.attack_acc), attack_names(eot=True))
    return not with_eot or (result.config.get("eot_iter") or 1) < 2
