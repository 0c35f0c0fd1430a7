"""What every leaderboard column and flag means: the one table of explanations (:data:`LEGEND`).

Every writer that explains a column or a flag reads it here: the legend under ``leaderboard.md``
(:func:`legend_markdown`), the page's column tooltips and its *Columns* and *Flags* sections
(:mod:`robustify.reporting.page`), and the documentation's reference. A column family is one entry
with a placeholder: ``<attack>_acc`` (one column per attack), ``<x>_ci95`` (the interval of ``<x>_acc``)
and ``<setting>`` (a defense's registered ``setting``, e.g. MeanSparse's ``alpha``, named by the defense
registry, never here). Flags come from ``robustify.evaluation.results.audit``, the cross-row checks of
``robustify.reporting.leaderboard`` and the sanity suite of ``robustify.evaluation.audit``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from robustify.core.significance import LEVEL
from robustify.reporting.settings import setting_defenses

__all__ = ["COLUMN", "FLAG", "FLAG_EXPLANATIONS", "LEGEND", "UNKNOWN", "Explanation", "column_entry", "column_legend",
           "explain_column", "explain_flag", "legend_markdown"]

COLUMN, FLAG = "column", "flag"
UNKNOWN = "no explanation recorded for this {kind}"
ATTACK, INTERVAL, SETTING = "<attack>_acc", "<x>_ci95", "<setting>"


@dataclass(frozen=True)
class Explanation:
    """One leaderboard column (or column family) or flag and what it means.

    Attributes:
        name: the column as the CSV names it (``worst_case_acc``), a family (``<attack>_acc``), or the flag.
        kind: :data:`COLUMN` or :data:`FLAG`.
        text: the explanation, one or two sentences of markdown (backticks for names).
    """

    name: str
    kind: str
    text: str


def _column(name: str, text: str) -> Explanation:
    return Explanation(name, COLUMN, text)


def _flag(name: str, text: str) -> Explanation:
    return Explanation(name, FLAG, text)


#: Every column (in the CSV's order) and every flag of the leaderboard, with what it means.
LEGEND: tuple[Explanation, ...] = (
    _column("rank", "Position when ranked by `worst_case_acc` (ties: higher `clean_acc` first)."),
    _column("model", "The model, as the evaluation recorded it."),
    _column("defense", "The post-training defense; `none` is the base model, the first row of its group."),
    _column(SETTING, "A defense's numeric setting (its registered `setting`, the one a sweep varies), as the defense "
                     "recorded it; empty on rows of other defenses."),
    _column("dataset", "The evaluation data set."),
    _column("threat_model", "The norm of the perturbation (`Linf` or `L2`)."),
    _column("eps", "The perturbation budget, as a fraction of 255 where it is one."),
    _column("n_examples", "How many test images were evaluated (the base and defended rows of a model on the same "
                          "images)."),
    _column("mode", "`sequential`: each attack column is the robust accuracy after that attack and all attacks "
                    "before it (AutoAttack's convention); `individual`: each attack ran alone on every correctly "
                    "classified example."),
    _column("clean_acc", "Accuracy on the unperturbed images, in percent."),
    _column(ATTACK, "Robust accuracy under that attack (see `mode`), in percent; `n/a`: the attack does not apply "
                    "(BPDA without MeanSparse equals APGD; Sparta and smooth activations are differentiable; a "
                    "transfer attack from the base model onto itself is a white-box attack); the page says why on "
                    "hover."),
    _column(INTERVAL, "The exact 95% (Clopper-Pearson) interval `[lo, hi]` of `<x>_acc` over the `n_examples` "
                      "images, in percent. The tables show it after its accuracy, in one cell, rounded to 0.1; "
                      "the CSV keeps it in its own column, to 0.01."),
    _column("standard_acc", "Worst case over the standard (pyautoattack) attacks only."),
    _column("autoattack_acc", "AutoAttack's robust accuracy, only where its standard suite (apgd-ce, apgd-t, fab-t, "
                              "square) ran at its standard budgets; empty otherwise."),
    _column("worst_case_acc", "The share of examples that no attack broke (per example, AND over all attacks, "
                              "standard and adaptive): the ranking key and the figure to compare."),
    _column("delta_worst_case", "`worst_case_acc` of the row minus that of its base row (same model, same "
                                "examples, same attacks), in points; empty on base rows."),
    _column("discordant", "Examples robust only on the base row / only on this row."),
    _column("mcnemar_p", "The exact McNemar test's p-value on the discordant examples."),
    _column("verdict", f"`gain` or `loss` when `mcnemar_p` < {LEVEL}, else `no significant gain`; empty on base "
                       "rows."),
    _column("base_settings_id", "The `settings_id` of the base row this row is compared with."),
    _column("flags", "Warnings that the row's robust accuracy may be too high (see the flags below)."),
    _column("audit_unbounded", "Sanity suite (`robustify audit` or `--audit`): accuracy under APGD-CE with an "
                               "unbounded eps (flag `fails-unbounded` above chance)."),
    _column("audit_newly_broken", "Sanity suite: share of examples newly broken by the strongest white-box attack "
                                  "with twice the budget (flag `not-converged`)."),
    _column("audit_band_share", "Sanity suite: the largest share of a thresholding site's units inside the "
                                "zero-gradient band (flag `masked-gradients`)."),
    _column("audit_noise_broken", "Sanity suite: share broken by random points of the eps ball that every "
                                  "white-box attack left robust (flag `noise-beats-white-box`). The thresholds are in "
                                  "the `audit.config` entry of each result.json."),
    _column("not_applicable", "The attacks that do not apply to the row, and why (their columns read `n/a`)."),
    _column("attacks", "The attacks that ran, in the order they ran: AutoAttack's suite, other standard attacks, "
                       "then the adaptive ones."),
    _column("budgets", "Each attack's budget (iterations, restarts, queries, targets)."),
    _column("precision", "The floating-point precision of the evaluation."),
    _column("seconds", "Wall time of the whole evaluation, in seconds."),
    _column("passes", "Forward + backward example-passes of the whole evaluation (a pass over a batch of B images "
                      "counts B), counted by hooks on the model."),
    _column("passes_per_example", "`passes` divided by `n_examples`."),
    _column("cost", "Per attack, `attack=F+B`: forward and backward passes per attacked example."),
    _column("seconds_per_attack", "Per attack, `attack=S`: wall seconds per attacked example."),
    _column("settings_id", "The row's identity: a hash of its result's meta, attack config and size (results with "
                           "the same id are one row; the newest wins). Ten hex digits: read it as text (pandas: "
                           "`dtype={'settings_id': str}`; an id like 242e955690 would parse as a number)."),
    _column("robustify_version", "The robustify version that produced the result."),
    _column("torch_version", "The PyTorch version that produced the result."),
    _column("pyautoattack_version", "The pyautoattack version that produced the result."),
    _column("result", "The path of the row's result.json."),
    _column("settings", "Markdown only, when the setting columns would not fit: every setting of the row's "
                        "defense, `name=value`."),
    _column("setup", "Markdown only, when the columns would not fit: `dataset`, `threat_model`, `eps`, "
                     "`n_examples` and `mode` of the row, where they differ between rows."),
    _flag("black-box-beats-white-box", "Square or the transfer attack broke examples every white-box attack tried "
                                       "and left robust (more than 0.2 points): the gradients are probably masked."),
    _flag("bpda-beats-standard", "BPDA (identity backward through MeanSparse) broke examples the standard white-box "
                                 "attacks tried and left robust: MeanSparse's zero gradients hide adversarial "
                                 "examples from plain APGD."),
    _flag("adaptive-beats-standard", "The adaptive attack broke examples the standard attacks did not: the standard "
                                     "attacks underestimate this defense."),
    _flag("autoattack-checks", "One of AutoAttack's own gradient-masking checks fired (see aa_checks in "
                               "result.json)."),
    _flag("random-without-eot", "The model's forward is random and no attack averaged its gradients over several "
                                "forwards (EoT): single-sample gradients underestimate a randomized defense, so its "
                                "robust accuracy is too high. (A random model's clean accuracy is one forward per "
                                "example, as AutoAttack's.)"),
    _flag("robust-acc-rises-with-eps", "Robust accuracy rises with a larger eps for the same model and defense "
                                       "(more than 0.2 points): a sign of gradient masking or a too weak attack."),
    _flag("fails-unbounded", "APGD at an eps covering the whole image space left accuracy above chance: the attack "
                             "cannot reach the decision boundary, so its robust accuracy means little."),
    _flag("not-converged", "Rerunning the strongest white-box attack with twice the iterations and more restarts "
                           "broke more examples than the stated tolerance: the reported robust accuracy is too "
                           "high."),
    _flag("masked-gradients", "At some thresholding site (MeanSparse) more than the stated share of units sit in "
                              "the zero-gradient band: plain gradients are masked, trust only the BPDA and adaptive "
                              "columns."),
    _flag("noise-beats-white-box", "Random points in the eps ball broke examples every white-box attack tried and "
                                   "left robust: the white-box attacks are not working on this model."),
)

#: flag -> what it means (the flag entries of :data:`LEGEND`)
FLAG_EXPLANATIONS: dict[str, str] = {e.name: e.text for e in LEGEND if e.kind == FLAG}
_COLUMNS: dict[str, Explanation] = {e.name: e for e in LEGEND if e.kind == COLUMN}


def column_entry(column: str) -> Explanation | None:
    """The :data:`LEGEND` entry that explains ``column``: its own, its family's (``<attack>_acc``, ``<x>_ci95``,
    ``<setting>``), or None."""
    if column in _COLUMNS:
        return _COLUMNS[column]
    if column.endswith("_ci95"):
        return _COLUMNS[INTERVAL]
    if column.endswith("_acc"):
        return _COLUMNS[ATTACK]
    if any(d.setting == column for d in setting_defenses()):
        return _COLUMNS[SETTING]
    return None


def explain_column(column: str) -> str:
    """What ``column`` means (a setting column also says whose setting it is)."""
    entry = column_entry(column)
    if entry is None:
        return UNKNOWN.format(kind=COLUMN)
    if entry.name == SETTING:
        owners = ", ".join(dict.fromkeys(d.title for d in setting_defenses() if d.setting == column))
        return f"The setting of {owners}. {entry.text}"
    return entry.text


def explain_flag(flag: str) -> str:
    """What ``flag`` means."""
    return FLAG_EXPLANATIONS.get(flag, UNKNOWN.format(kind=FLAG))


def column_legend(columns: Iterable[str]) -> list[tuple[str, str]]:
    """``(name, explanation)`` of ``columns``, each once, in :data:`LEGEND`'s order: a column family
    (``<attack>_acc``, ``<x>_ci95``) under its placeholder, a setting column under its own name."""
    listed: dict[str, str] = {}
    for name in columns:
        entry = column_entry(name)
        key = name if entry is None or entry.name == SETTING else entry.name
        listed.setdefault(key, explain_column(name))
    order = {e.name: i for i, e in enumerate(LEGEND)}
    return sorted(listed.items(), key=lambda kv: order.get(kv[0], order[SETTING]))


def legend_markdown(columns: Iterable[str], extra_columns: Iterable[str] = (), flags: Iterable[str] = ()) -> str:
    """The legend as markdown lists: ``columns`` (those of the tables above), then ``extra_columns`` (only in the
    CSV), then every flag (``flags``: those some row has, marked as such), each entry once, in :data:`LEGEND`'s order.

    A column family is listed once under its placeholder name; a setting column under its own name.
    """

    shown = column_legend(columns)
    keys = {k for k, _ in shown}
    more = [(k, t) for k, t in column_legend(extra_columns) if k not in keys]
    seen = set(flags)
    text = "Columns:\n" + "".join(f"- `{k}`: {t}\n" for k, t in shown)
    if more:
        text += "\nOnly in `leaderboard.csv`:\n" + "".join(f"- `{k}`: {t}\n" for k, t in more)
    text += "\nFlags (**bold**: some row has it):\n"
    for name, explanation in FLAG_EXPLANATIONS.items():
        text += f"- {f'**`{name}`**' if name in seen else f'`{name}`'}: {explanation}\n"
    text += "".join(f"- **`{name}`**: {explain_flag(name)}\n" for name in sorted(seen - set(FLAG_EXPLANATIONS)))
    return text
