"""The generated pages of the documentation site, made from the code and the committed files.

:mod:`docs._gen.pages` (run by the ``gen-files`` plugin of ``mkdocs build``) writes them; the tests
(``tests/test_docs.py``) call the same functions, so what the site shows is what the code says:

* :func:`cli_markdown`: every command and flag, from the argparse parsers of ``robustify.cli``;
* :func:`api_markdown`: the public API (``robustify.__all__``), rendered by mkdocstrings from the docstrings;
* :func:`leaderboard_markdown`: every flag (``robustify.reporting.page.FLAG_EXPLANATIONS``) and column
  (the column lists of ``robustify.reporting.leaderboard``) of the leaderboard;
* :func:`result_schema_markdown`: the fields of ``result.json`` (``EvalResult``) with a committed example;
* :func:`benchmarks_markdown`: the figures in ``benchmarks/results/`` with the commands that produced them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flag_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, list[argparse.Action]]]:
    """(group title, group description, actions) of a parser, in --help's order, help action left out."""
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if actions:
            out.append((group.title or "", group.description or "", actions))
    return out


def _action_row(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}` (positional)"
    if action.nargs == 0:
        arg = ""
    elif action.choices:
        arg = " \\| ".join(f"`{c}`" for c in action.choices)
    else:
        arg = f"`{action.metavar or action.dest.upper()}`"
    if action.required and action.option_strings:
        arg = (arg + " (required)").strip()
    help_text = formatter._expand_help(action) if action.help not in (None, argparse.SUPPRESS) else ""
    return f"| {names} | {arg} | {_cell(help_text)} |"


def command_markdown(name: str, parser: argparse.ArgumentParser) -> str:
    """One command's section: its description, usage and every flag, by argument group."""
    lines = [f"## `robustify {name}`", "", _cell(parser.description or ""), "", "```text",
             parser.format_usage().strip(), "```", ""]
    for title, description, actions in _flag_rows(parser):
        lines += [f"**{title}**" + (f": {_cell(description)}" if description else ""), "",
                  "| flag | value | what it does |", "|---|---|---|"]
        lines += [_action_row(parser, a) for a in actions]
        lines.append("")
    return "\n".join(lines)


def all_commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command and nested command (``study plan``), in --help's order."""
    out: dict[str, argparse.ArgumentParser] = {}
    for name, sub in _subparsers(parser).items():
        out[prefix + name] = sub
        out.update(all_commands(sub, prefix + name + " "))
    return out


def cli_markdown() -> str:
    """The command-line reference: every ``robustify`` command and flag, from the parsers themselves."""
    from robustify.cli import build_parser

    parser = build_parser()
    commands = all_commands(parser)
    head = [
        "# Command line",
        "",
        "Generated from the argparse parsers of `robustify.cli` when the site is built (`docs/_gen/reference.py`);",
        "`robustify COMMAND --help` prints the same. Global flags (`--debug`, `-v`) go before or after the command.",
        "A flag of a defense (MeanSparse's `--alpha`, Sparta's `--sparta-preset`, the swaps' `--replace`) comes",
        "from that defense's registered options, so an installed plugin adds its own (k-WTA: "
        "[write a defense plugin](../how-to/defense-plugin.md)); they are not listed here.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    head += [f"| [`{n}`](#robustify-{n.replace(' ', '-')}) | {_cell(p.description or '')} |" for n, p in commands.items()]
    head += ["", command_markdown("", parser).replace("## `robustify `", "## `robustify` (global flags)", 1)]
    return "\n".join(head + [command_markdown(n, p) for n, p in commands.items()])


# ------------------------------------------------------------------------------------------------
# Python API
# ------------------------------------------------------------------------------------------------
#: (title, the public names it documents, in this order); every name of robustify.__all__ appears once
API_SECTIONS = (
    ("Load", ("load_model", "ModelInfo", "load_data", "loader", "to_tensors", "parse_eps")),
    ("Insert and calibrate", ("apply_defense", "remove_defense", "calibrate", "save_defense", "load_defense",
                              "bpda", "soft_bpda", "defenses_disabled", "register_defense", "Defense",
                              "DefenseOptions", "register_activation", "Site")),
    ("Attack and evaluate", ("AttackConfig", "evaluate", "EvalResult", "load_result")),
    ("Jobs and reports", ("EvaluationJob", "run_evaluation", "sweep", "TrainConfig", "train_defense",
                          "write_leaderboard")),
    ("Errors", ("UserError", "DataError", "InsertionError", "ModelLoadError", "NotCalibratedError",
                "StateMismatchError")),
)
#: the defense packages' own API, after the generic one
API_MODULES = ("robustify.defenses.meansparse", "robustify.defenses.sparta", "robustify.defenses.activations")


def api_names() -> list[str]:
    import robustify

    return [n for n in robustify.__all__ if n != "__version__"]


def api_markdown() -> str:
    """The Python API page: ``::: robustify.NAME`` for each public name (mkdocstrings renders the docstrings)."""
    documented = [n for _, names in API_SECTIONS for n in names]
    missing = sorted(set(api_names()) - set(documented))
    lines = ["# Python API", "",
             "`import robustify as rb`: the public names (`robustify.__all__`), rendered from their docstrings when",
             "the site is built. Each defense's own functions follow, from its package.", ""]
    sections = list(API_SECTIONS) + ([("Other", tuple(missing))] if missing else [])
    for title, names in sections:
        lines += [f"## {title}", ""]
        for name in names:
            lines += [f"::: robustify.{name}", "    options:", "      heading_level: 3", ""]
    for module in API_MODULES:
        lines += [f"## `{module}`", "", f"::: {module}", "    options:", "      heading_level: 3",
                  "      show_root_heading: false", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# leaderboard flags and columns
# ------------------------------------------------------------------------------------------------
#: What each leaderboard column means. Keyed by the column names of robustify.reporting.leaderboard's column
#: lists (a test fails when a column there has no entry here). Issue 21 item 1 brings the leaderboard's own
#: table of column explanations; this then reads it instead.
COLUMN_EXPLANATIONS: dict[str, str] = {
    "rank": "rank by `worst_case_acc` (highest first)",
    "model": "the model spec (`robustbench:NAME`, `timm:NAME`, `aa-resnet18`, `pkg.module:function`)",
    "defense": "the registered defense (`none` for the base model)",
    "dataset": "the model's dataset (`cifar10`, `cifar100`, `imagenet`, a plugin's)",
    "threat_model": "the norm of the threat model (`Linf`, `L2`, `L1`)",
    "eps": "the perturbation budget, norm-aware text (Linf `8/255`, L2 `0.5`)",
    "n_examples": "how many test images were evaluated",
    "mode": "`sequential` (each attack sees the examples the earlier ones left robust, AutoAttack's convention) "
            "or `individual` (every attack on every correctly classified example)",
    "clean_acc": "accuracy on the unperturbed images, in percent",
    "standard_acc": "worst case over the standard (pyautoattack) attacks only: what AutoAttack-style attacks report",
    "autoattack_acc": "AutoAttack's robust accuracy, only where its standard suite (apgd-ce, apgd-t, fab-t, square) "
                      "ran at its standard budgets and saw every example AutoAttack would show it",
    "worst_case_acc": "the number to compare: the share of images no attack of the row broke (per-example AND "
                      "over attacks)",
    "flags": "gradient-masking and sanity flags (below); any flag means the number is not to be trusted as it stands",
    "not_applicable": "attacks that do not apply to the row, with the reason (shown as `n/a` in their column)",
    "attacks": "the attacks that ran, in the order they ran",
    "budgets": "each attack's budget (iterations, restarts, targets, queries)",
    "precision": "`float32`, `bfloat16` or `float16` (`--precision`): part of the result's identity",
    "seconds": "wall time of the evaluation",
    "settings_id": "digest of the settings that identify a row (rows with equal settings keep the newest result)",
    "robustify_version": "robustify's version that wrote the result",
    "torch_version": "torch's version",
    "pyautoattack_version": "pyautoattack's version",
    "result": "the `result.json` the row comes from",
    "delta_worst_case": "`worst_case_acc` of the row minus that of its base row (same model, examples, attacks), "
                        "in points",
    "discordant": "images robust only on the base / only on the defended model",
    "mcnemar_p": "exact McNemar test on the discordant images",
    "verdict": "`gain` or `loss` when p < 0.05, else `no significant gain` (not evidence of no effect: only that "
               "these images cannot tell)",
    "base_settings_id": "the `settings_id` of the base row the defended row is paired with",
    "audit_unbounded": "accuracy under APGD-CE with an eps covering the whole image space (flag `fails-unbounded` "
                       "above chance)",
    "audit_newly_broken": "share of examples newly broken by the strongest white-box attack at twice the budget "
                          "(`not-converged`)",
    "audit_band_share": "largest share of a thresholding site's units inside the zero-gradient band "
                        "(`masked-gradients`)",
    "audit_noise_broken": "share broken by random points of the eps ball that every white-box attack left "
                          "(`noise-beats-white-box`)",
    "passes": "forward + backward example-passes of the whole evaluation (a batch of B images counts B), "
              "counted by hooks on the model",
    "passes_per_example": "`passes` divided by `n_examples`",
    "cost": "forward+backward passes per attack and attacked example (CSV)",
    "seconds_per_attack": "wall time per attack (CSV)",
    "<attack>_acc": "robust accuracy after that attack (sequential mode: after it and all before it), one column "
                    "per attack that ran (`apgd-ce_acc`, `bpda-apgd-t_acc`, ...)",
    "<x>_ci95": "the exact 95% (Clopper-Pearson) interval of an accuracy column (CSV; markdown shows it after the "
                "number, `[lo, hi]`)",
    "<setting>": "a defense's numeric setting (MeanSparse's `alpha`), a column when some row has a value for it",
}


def leaderboard_columns() -> list[tuple[str, str]]:
    """(column, group) of every fixed column the leaderboard code declares, in the CSV's order of groups."""
    from robustify.reporting import leaderboard as lb

    groups = (("lead", lb.LEAD_COLUMNS), ("tail", lb.TAIL_COLUMNS), ("paired with the base row", lb.PAIRED_COLUMNS),
              ("sanity suite", lb.AUDIT_COLUMNS), ("cost", lb.COST_COLUMNS))
    return [(c, g) for g, cols in groups for c in cols]


def code_legend() -> tuple[list[tuple[str, str]], list[tuple[str, str]]] | None:
    """(columns, flags) as (name, text) from the code's one table of explanations, ``robustify.reporting.legend``
    (issue 21, item 1), where this checkout has it; None where it does not."""
    try:
        from robustify.reporting.legend import COLUMN, FLAG, LEGEND
    except ImportError:
        return None
    return ([(e.name, e.text) for e in LEGEND if e.kind == COLUMN], [(e.name, e.text) for e in LEGEND if e.kind == FLAG])


def leaderboard_markdown() -> str:
    """Every flag and column of the leaderboard, from the code's tables."""
    legend = code_legend()
    if legend is not None:
        columns, flags = legend
        lines = ["# Leaderboard flags and columns", "",
                 "Generated from `robustify.reporting.legend.LEGEND`, the one table of explanations the leaderboard's",
                 "files and page use, when the site is built. "
                 "[How to read a row](../concepts/evaluation.md#how-to-read-a-row) puts them together.", "",
                 "## Flags", "", "| flag | meaning |", "|---|---|"]
        lines += [f"| `{f}` | {_cell(e)} |" for f, e in flags]
        lines += ["", "## Columns", "", "The CSV keeps every column, in this order.", "",
                  "| column | meaning |", "|---|---|"]
        lines += [f"| `{c}` | {_cell(e)} |" for c, e in columns]
        return "\n".join(lines) + "\n"
    from robustify.reporting.page import FLAG_EXPLANATIONS

    lines = ["# Leaderboard flags and columns", "",
             "Generated from `robustify.reporting.page.FLAG_EXPLANATIONS` (the explanations the web page shows) and",
             "the column lists of `robustify.reporting.leaderboard` when the site is built. "
             "[How to read a row](../concepts/evaluation.md#how-to-read-a-row) puts them together.", "",
             "## Flags", "", "| flag | meaning |", "|---|---|"]
    lines += [f"| `{f}` | {_cell(e)} |" for f, e in FLAG_EXPLANATIONS.items()]
    lines += ["", "## Columns", "",
              "The CSV keeps every column; the markdown table leaves out the versions, budgets, settings ids and",
              "per-attack costs, and shows each interval after its number; the web page shows the versions and",
              "budgets in each row's details.", "", "| column | group | meaning |", "|---|---|---|"]
    lines += [f"| `{c}` | {g} | {_cell(COLUMN_EXPLANATIONS.get(c, ''))} |" for c, g in leaderboard_columns()]
    lines += [f"| `{c}` | per attack / setting | {_cell(e)} |" for c, e in COLUMN_EXPLANATIONS.items() if c.startswith("<")]
    lines += ["", "## The compact table", "",
              "!!! note \"Not merged yet\"",
              "    Tables that lead with rank, model, defense, clean, worst case with its interval, difference to the",
              "    base, verdict and flags (per-attack columns behind a toggle): see issue 21, item 1.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# result.json
# ------------------------------------------------------------------------------------------------
#: What each top-level key of result.json holds (a test fails when a field of EvalResult has no entry).
RESULT_FIELDS: dict[str, str] = {
    "meta": "what was evaluated: model spec, defense and its settings (`defense_config`, MeanSparse's sites and "
            "per-site alphas), dataset, data spec and split, weights files, `preprocessing`, `not_applicable` "
            "attacks with the reason; whatever `meta=` the caller added",
    "config": "the `AttackConfig` (`_type`, `_version`): attacks, norm, dataset, eps, seed, batch size, "
              "sequential/individual, every budget",
    "n_examples": "how many images were evaluated",
    "clean_acc": "clean accuracy, a fraction in [0, 1]",
    "attack_acc": "attack name -> robust accuracy after it (a fraction)",
    "worst_case_acc": "share of images no attack broke",
    "flags": "the per-result gradient-masking flags (`robustify.evaluation.results.audit`)",
    "per_example": "`clean_correct` and, per attack, 1 (broke it), 0 (did not) or null (not attacked: already "
                   "broken in sequential mode, or misclassified); the leaderboard's pairing reads these",
    "seconds": "wall time per phase (`clean`, each attack)",
    "versions": "robustify, torch, python, pyautoattack, timm, robustbench",
    "aa_checks": "AutoAttack's own gradient-masking checks that fired",
    "finished": "UTC ISO time the result was written (the newest of equal-settings results wins)",
    "data_fingerprint": "digest of the evaluated images and labels (pairs a defended row with its base row)",
    "cost": "per phase: forward and backward example-passes and seconds",
    "adversarial": "(with `--keep-adversarial`) the file of the worst-case adversarial examples in the result's "
                   "directory",
    "audit": "(after `robustify audit` / `--audit`) the sanity suite: `config` (its thresholds), `unbounded`, "
             "`convergence`, `census`, `noise`, `flags`",
}
EXAMPLE_RESULT = ROOT / "leaderboard" / "results" / "meansparse_0.2" / "result.json"


def _shorten(value: object, depth: int = 0) -> object:
    """A result with long lists cut to three items (the example stays readable)."""
    if isinstance(value, dict):
        return {k: _shorten(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list) and len(value) > 3:
        return [_shorten(v, depth + 1) for v in value[:3]] + [f"... {len(value) - 3} more"]
    return value


def result_schema_markdown() -> str:
    from robustify.evaluation.results import EvalResult

    fields = [(f.name, str(f.type)) for f in dataclasses.fields(EvalResult)] + [("audit", "dict[str, Any] | absent")]
    lines = ["# `result.json`", "",
             "Every evaluation writes `OUT/result.json` (atomically; `rb.load_result(OUT)` reads it back as an",
             "`EvalResult`, extra keys such as `audit` kept in `read_result_file`). The leaderboard is rebuilt from",
             "these files alone. Generated from the fields of `robustify.evaluation.results.EvalResult`.", "",
             "| key | type | what it holds |", "|---|---|---|"]
    lines += [f"| `{n}` | `{_cell(t)}` | {_cell(RESULT_FIELDS.get(n, ''))} |" for n, t in fields]
    if EXAMPLE_RESULT.exists():
        example = _shorten(json.loads(EXAMPLE_RESULT.read_text()))
        lines += ["", f"## An example", "",
                  f"`{EXAMPLE_RESULT.relative_to(ROOT)}` (a row of the committed leaderboard; lists cut to three "
                  "items):", "", "```json", json.dumps(example, indent=2), "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# benchmarks
# ------------------------------------------------------------------------------------------------
BENCH_DIR = ROOT / "benchmarks" / "results"
#: columns about where and how a figure was measured: shown once above a table, not in every row
_CONTEXT_COLUMNS = ("command", "machine", "load_before", "load_after", "torch")
MAX_ROWS = 40


def _csv_markdown(path: Path) -> str:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    if not rows:
        return "_empty_\n"
    columns = [c for c in rows[0] if c not in _CONTEXT_COLUMNS and any(r.get(c) for r in rows)]
    lines = []
    for context in [c for c in _CONTEXT_COLUMNS if c in rows[0]]:
        values = list(dict.fromkeys(r[context] for r in rows if r.get(context)))
        if context == "command":
            lines += ["Command" + ("s" if len(values) > 1 else "") + ":", "", "```text", *values, "```", ""]
        elif values:
            lines += [f"{context}: " + "; ".join(f"`{v}`" for v in values), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        lines += ["", f"_{len(rows) - MAX_ROWS} more rows in `{path.relative_to(ROOT)}`._"]
    return "\n".join(lines) + "\n"


def _md_body(path: Path) -> str:
    """A committed markdown result, its own title dropped (the section heading names the file)."""
    text = path.read_text()
    if text.startswith("# "):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    return text.replace("\n## ", "\n#### ").lstrip() + "\n"


def benchmarks_markdown() -> str:
    """Every figure in ``benchmarks/results/``, with the command that produced it, generated from the files."""
    lines = ["# Benchmarks", "",
             "Generated from the files in `benchmarks/results/` when the site is built: each file's figures with",
             "the command that produced them (its `command` column or line). The scripts are in `benchmarks/`;",
             "ratios were measured side by side in one run. The committed figures are CPU-only (2 shared cores)",
             "unless a file says otherwise.", ""]
    files = sorted(p for p in BENCH_DIR.iterdir() if p.suffix in (".csv", ".md", ".json"))
    stems = {p.stem for p in files if p.suffix == ".md"}
    for path in files:
        rel = path.relative_to(ROOT)
        lines += [f"## `{rel}`", ""]
        if path.suffix == ".md":
            lines.append(_md_body(path))
        elif path.suffix == ".csv":
            if path.stem in stems:
                lines += [f"The rows behind `{path.stem}.md` above.", ""]
                lines += ['??? note "the CSV"', ""]
                lines += ["    " + line if line else "" for line in _csv_markdown(path).splitlines()]
                lines.append("")
            else:
                lines.append(_csv_markdown(path))
        else:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "command" in data:
                lines += ["Command:", "", "```text", str(data["command"]), "```", ""]
            lines += ['??? note "the JSON"', "", "    ```json"]
            lines += ["    " + line for line in json.dumps(data, indent=2).splitlines()]
            lines += ["    ```", ""]
    return "\n".join(lines)
