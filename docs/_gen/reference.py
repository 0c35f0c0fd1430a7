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
        "[write a defense plugin](../how-to/defense-plugin.md)): the flags below are those of the defenses installed "
        "when the site was built.",
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
    ("Studies", ("load_study", "run_study")),
    ("Export to RobustBench", ("ExportJob", "export_robustbench")),
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
def code_legend() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(columns, flags) as (name, text) from the code's one table of explanations, ``robustify.reporting.legend``."""
    from robustify.reporting.legend import COLUMN, FLAG, LEGEND

    return ([(e.name, e.text) for e in LEGEND if e.kind == COLUMN], [(e.name, e.text) for e in LEGEND if e.kind == FLAG])


def leaderboard_markdown() -> str:
    """Every flag and column of the leaderboard, from the code's table of explanations."""
    columns, flags = code_legend()
    lines = ["# Leaderboard flags and columns", "",
             "Generated from `robustify.reporting.legend.LEGEND`, the one table of explanations the leaderboard's",
             "files and page use, when the site is built. "
             "[How to read a row](../concepts/evaluation.md#how-to-read-a-row) puts them together.", "",
             "## The tables", "",
             "One row per (model, defense, settings), ranked by worst case. The tables lead with what a reader "
             "compares: rank, model, defense and its settings (e.g. alpha), `clean_acc` and `worst_case_acc` each "
             "with its 95% interval in one cell (`20.0 [14.7, 26.2]`), `delta_worst_case`, `verdict` and `flags`; "
             "the set-up (dataset, threat model, eps, examples, mode) is said once above them unless rows differ in "
             "it. The per-attack accuracies, `standard_acc`, `autoattack_acc`, the paired test, audit figures and "
             "costs follow: in further tables of at most 12 columns in `leaderboard.md`, behind the *every column* "
             "toggle of `index.html`. `leaderboard.csv` keeps every column under its name (intervals as "
             "`<x>_ci95`, budgets, timing, versions); `leaderboard.md` and the page end with the legend of every "
             "column and flag.", "",
             "## Flags", "", "| flag | meaning |", "|---|---|"]
    lines += [f"| `{f}` | {_cell(e)} |" for f, e in flags]
    lines += ["", "## Columns", "", "The CSV keeps every column, in this order.", "",
              "| column | meaning |", "|---|---|"]
    lines += [f"| `{c}` | {_cell(e)} |" for c, e in columns]
    return "\n".join(lines) + "\n"


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
