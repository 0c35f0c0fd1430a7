"""How much a row's accuracies can be trusted: exact intervals and paired verdicts.

Everything here is computed from the per-example vectors of a ``result.json`` alone
(``per_example["clean_correct"]`` and, per attack, who broke what), with scipy's
statistics:

* :func:`clopper_pearson`: the exact (Clopper-Pearson) interval of a binomial share,
  ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``.
* :func:`mcnemar_exact`: the exact McNemar test of two paired 0/1 vectors on the same
  examples: a two-sided binomial test (p = 1/2) on the discordant pairs.
* :func:`paired_comparison`: a defended row against its base row (same model, same
  examples, same attacks): the difference in worst-case accuracy, the discordant counts,
  the p-value and a verdict, ``gain``, ``no significant gain`` or ``loss`` at
  :data:`LEVEL`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy.stats import binomtest

from robustify.core.errors import UserError
from robustify.core.config import untagged

__all__ = [
    "CONFIDENCE",
    "LEVEL",
    "ci_text",
    "clopper_pearson",
    "find_base",
    "interval_pct",
    "mcnemar_exact",
    "paired_comparison",
    "robust_vector",
    "same_examples",
    "verdict",
]

#: confidence of every interval in the tables
CONFIDENCE = 0.95
#: significance level of the paired verdicts
LEVEL = 0.05


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact interval of the share ``k / n`` (NaNs when ``n == 0``)."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise UserError(f"successes must be in [0, {n}], got {k}")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return (float(ci.low), float(ci.high))


def interval_pct(acc_pct: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact interval, in percent, of an accuracy given in percent over ``n`` examples.

    The count is ``round(acc_pct * n / 100)``: exact for an unrounded percentage, or for one rounded to
    2 decimals up to 10,000 examples only (pass the unrounded share above that)."""
    lo, hi = clopper_pearson(round(acc_pct * n / 100.0), n, confidence)
    return (100.0 * lo, 100.0 * hi)


def ci_text(acc_pct: float | None, n: int) -> str:
    """``"[lo, hi]"`` in percent with two decimals (empty for a missing accuracy)."""
    if acc_pct is None or (isinstance(acc_pct, float) and math.isnan(acc_pct)) or n <= 0:
        return ""
    lo, hi = interval_pct(acc_pct, n)
    return f"[{lo:.2f}, {hi:.2f}]"


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar test of paired outcomes: ``(only_a, only_b, two-sided p)``.

    ``only_a`` counts examples where ``a`` holds and ``b`` does not, ``only_b`` the reverse;
    p is ``binomtest(only_b, only_a + only_b, 0.5)``'s (1 when there is no discordant pair).
    """
    if len(a) != len(b):
        raise UserError(f"paired vectors must have the same length, got {len(a)} and {len(b)}")
    only_a = sum(1 for u, v in zip(a, b) if u and not v)
    only_b = sum(1 for u, v in zip(a, b) if v and not u)
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    return only_a, only_b, float(binomtest(only_b, only_a + only_b, 0.5).pvalue)


def verdict(difference: float, p_value: float, level: float = LEVEL) -> str:
    """``gain`` / ``loss`` when significant at ``level`` (by the sign of the difference), else
    ``no significant gain``."""
    if p_value < level and difference > 0:
        return "gain"
    if p_value < level and difference < 0:
        return "loss"
    return "no significant gain"


def robust_mask(per_example: dict[str, list[Any]], attacks: list[str]) -> list[bool]:
    """Per example: correctly classified and broken by none of ``attacks`` (1 = broke it)."""
    return [c == 1 and not any(per_example[a][i] == 1 for a in attacks)
            for i, c in enumerate(per_example["clean_correct"])]


def robust_vector(result: dict[str, Any]) -> list[bool]:
    """Per example: correctly classified and broken by no attack (the worst case)."""
    per = result["per_example"]
    return robust_mask(per, [a for a in result.get("attack_acc", {}) if a in per])


def _requested(result: dict[str, Any]) -> set[str]:
    skipped = (result.get("meta") or {}).get("not_applicable") or {}
    return set(result["config"]["attacks"]) | set(skipped)


#: config keys that follow the model, not the user's budget: a random defense is attacked with EoT
#: (``eot_iter``) where its deterministic base is not, and is still paired with it
_PER_MODEL = ("attacks", "eot_iter", "accept_no_eot")


def _budget(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in untagged(result["config"]).items() if k not in _PER_MODEL}


def same_examples(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """How ``a`` and ``b`` are known to cover the same examples, or None if they may not.

    By the data fingerprint when both results carry one; otherwise (older results) by the
    data source, split and count recorded in ``meta``.
    """
    if a["n_examples"] != b["n_examples"] or len(a["per_example"]["clean_correct"]) != len(
            b["per_example"]["clean_correct"]):
        return None
    fa, fb = a.get("data_fingerprint"), b.get("data_fingerprint")
    if fa and fb:
        return "fingerprint" if fa == fb else None
    ma, mb = a.get("meta") or {}, b.get("meta") or {}
    keys = ("data", "split", "dataset")
    if any(ma.get(k) != mb.get(k) for k in keys) or ma.get("data") is None:
        return None
    return "data/split/n"


def find_base(result: dict[str, Any], candidates: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    """The undefended row of the same model, examples, threat model, budgets and requested attacks."""
    meta = result.get("meta") or {}
    if meta.get("defense", "none") == "none":
        return None
    for cand in reversed(candidates):  # the newest result wins, as in the table
        cm = cand.get("meta") or {}
        if cm.get("defense", "none") != "none" or cm.get("model") != meta.get("model"):
            continue
        if cm.get("weights") != meta.get("weights") or _budget(cand) != _budget(result):
            continue
        if _requested(cand) != _requested(result):
            continue
        how = same_examples(cand, result)
        if how is not None:
            return cand, how
    return None


def paired_comparison(defended: dict[str, Any], base: dict[str, Any], how: str = "",
                      level: float = LEVEL) -> dict[str, Any]:
    """Worst-case accuracy of ``defended`` minus ``base``: ``difference`` (points), ``base_only`` and
    ``defended_only`` (discordant counts), ``p_value`` (exact McNemar), ``verdict``, ``matched_by``."""
    d, b = robust_vector(defended), robust_vector(base)
    base_only, defended_only, p = mcnemar_exact(b, d)
    n = max(len(d), 1)
    diff = 100.0 * (sum(d) - sum(b)) / n
    return dict(difference=diff, base_only=base_only, defended_only=defended_only, p_value=p,
                            verdict=verdict(diff, p, level), matched_by=how)
