"""Intervals and paired verdicts equal scipy's statistics computed independently on hand-made vectors."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy.stats import beta, binom

from robustify.reporting.leaderboard import build_table, to_markdown
from robustify.core.significance import clopper_pearson, find_base, mcnemar_exact, paired_comparison, verdict


def _cp_by_beta(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    a = 1 - conf
    lo = 0.0 if k == 0 else beta.ppf(a / 2, k, n - k + 1)
    hi = 1.0 if k == n else beta.ppf(1 - a / 2, k + 1, n - k)
    return lo, hi


def _mcnemar_by_binom(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    return min(1.0, 2 * binom.cdf(k, n, 0.5))


@pytest.mark.parametrize("k,n", [(0, 10), (3, 200), (43, 200), (146, 200), (10, 10), (1, 1)])
def test_clopper_pearson_equals_beta_quantiles(k, n):
    lo, hi = clopper_pearson(k, n)
    elo, ehi = _cp_by_beta(k, n)
    assert lo == pytest.approx(elo, abs=1e-9) and hi == pytest.approx(ehi, abs=1e-9)


def test_clopper_pearson_empty_and_bad_input():
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(5, 3)


def test_mcnemar_on_hand_made_vectors():
    base = [1, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 1]
    defended = [1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1]
    # base only: positions 1, 10 -> 2; defended only: 2, 3, 5, 8, 9 -> 5
    only_base, only_def, p = mcnemar_exact([bool(v) for v in base], [bool(v) for v in defended])
    assert (only_base, only_def) == (2, 5)
    assert p == pytest.approx(_mcnemar_by_binom(2, 5), abs=1e-12)
    assert mcnemar_exact([True, False], [True, False])[2] == 1.0
    # a large one-sided difference is significant
    _, _, p = mcnemar_exact([False] * 20, [True] * 20)
    assert p == pytest.approx(2 * 0.5 ** 20) and p < 0.05


def test_verdict_rule():
    assert verdict(1.5, 0.01) == "gain"
    assert verdict(-1.5, 0.01) == "loss"
    assert verdict(1.5, 0.45) == "no significant gain"
    assert verdict(-1.5, 0.2) == "no significant gain"


def _result(defense, robust, clean=None, *, data="d.npz", attacks=("apgd-ce",), skipped=None, fp=None):
    n = len(robust)
    clean = clean or [1] * n
    broken = [None if c == 0 else int(not r) for c, r in zip(clean, robust)]
    return {
        "meta": {"model": "m", "defense": defense, "dataset": "cifar10", "data": data, "split": "test",
                 "weights": "w.pt", "not_applicable": skipped or {}},
        "config": {"attacks": list(attacks), "norm": "Linf", "eps": 8 / 255, "individual": False},
        "n_examples": n, "clean_acc": sum(clean) / n, "attack_acc": {a: sum(robust) / n for a in attacks},
        "worst_case_acc": sum(robust) / n, "flags": [], "seconds": {},
        "per_example": {"clean_correct": clean, **{a: broken for a in attacks}}, "data_fingerprint": fp,
    }


def test_paired_comparison_and_table_columns():
    base = _result("none", [1, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 1], skipped={"bpda-apgd-ce": "n/a"})
    defended = _result("meansparse", [1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1], attacks=("apgd-ce", "bpda-apgd-ce"))
    other_data = _result("meansparse", [1] * 12, data="other.npz", attacks=("apgd-ce", "bpda-apgd-ce"))
    found = find_base(defended, [base])
    assert found is not None and found[1] == "data/split/n"
    assert find_base(other_data, [base]) is None  # other examples: never paired
    cmp = paired_comparison(defended, base)
    assert cmp["difference"] == pytest.approx(100 * 3 / 12)
    assert cmp["p_value"] == pytest.approx(_mcnemar_by_binom(2, 5))
    assert cmp["verdict"] == "no significant gain"

    df = build_table([base, defended, other_data])
    row = df[(df["defense"] == "meansparse") & (df["worst_case_acc"] < 100)].iloc[0]
    lo, hi = _cp_by_beta(10, 12)
    assert row["worst_case_ci95"] == f"[{100 * lo:.2f}, {100 * hi:.2f}]"
    assert row["verdict"] == "no significant gain" and row["discordant"] == "2/5"
    assert row["mcnemar_p"] == pytest.approx(_mcnemar_by_binom(2, 5), rel=1e-3)
    assert df[df["worst_case_acc"] == 100]["verdict"].isna().all()  # no base with the same examples
    lo, hi = _cp_by_beta(12, 12)
    # the table rounds its interval outward to 0.1 (the shown interval contains the exact one)
    assert f"100.0 [{math.floor(1000 * lo) / 10:.1f}, {math.ceil(1000 * hi) / 10:.1f}]" in to_markdown(df)


def test_verdicts_stay_on_their_rows_when_results_were_written_in_another_order():
    """build_table orders results by when they were written (the newest duplicate wins): the paired
    columns must follow their own rows, not the position in the list the caller passed."""
    base = _result("none", [1, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 1], skipped={"bpda-apgd-ce": "n/a"})
    defended = _result("meansparse", [1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1], attacks=("apgd-ce", "bpda-apgd-ce"))
    base["finished"], defended["finished"] = "2026-01-02T00:00:00+00:00", "2026-01-01T00:00:00+00:00"
    df = build_table([base, defended])
    by_defense = df.set_index("defense")
    assert pd.isna(by_defense.loc["none", "verdict"])  # the base row is never compared with itself
    assert by_defense.loc["meansparse", "discordant"] == "2/5"


def test_fingerprints_decide_when_present():
    base = _result("none", [1, 0, 1], fp="aaa")
    same = _result("meansparse", [1, 1, 1], fp="aaa")
    other = _result("meansparse", [1, 1, 1], fp="bbb")
    assert find_base(same, [base])[1] == "fingerprint"
    assert find_base(other, [base]) is None


def test_model_info_is_valid_json_with_missing_attacks(tmp_path):
    import json

    from robustify.reporting.leaderboard import model_info

    base = _result("none", [1, 0, 1, 1])
    defended = _result("meansparse", [1, 1, 1, 1], attacks=("apgd-ce", "bpda-apgd-ce"))
    df = build_table([base, defended])
    for _, row in df.iterrows():
        text = json.dumps(model_info(row), allow_nan=False)  # no NaN for attacks a row did not run
        assert "worst_case" in json.loads(text)["intervals_95"]
