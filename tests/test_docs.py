"""The documentation: every example runs, the generated reference is complete, the site loads nothing remote.

* every ``python`` and ``bash`` block of ``docs/`` and ``README.md`` runs (Sybil), or is marked with
  ``<!-- skip: next "why" -->`` (the reason is reported as the skip reason);
* the CLI reference lists every flag of every command; every public name has a docstring with an example;
* ``mkdocs build --strict`` (in ``.ci/run``) builds a site with no remote script, style or image
  (:func:`test_built_site_is_offline`, on the site ``.ci/run`` built or on a build of its own).
"""

from __future__ import annotations

import argparse
import doctest
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import unittest
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
#: what the pages' code may be written in: python and bash run, the others are data or output
LANGUAGES = {"python", "bash", "toml", "json", "text"}
#: repository folders an example may read, linked into its working directory
LINKED = ("plugins", "benchmarks", "leaderboard")

sybil = pytest.importorskip("sybil", reason="the docs extra is not installed: pip install -e '.[docs]'")
from sybil import Document  # noqa: E402
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser  # noqa: E402


def _reference():
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "_gen" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


def run_bash(example) -> None:
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", example.parsed], cwd=os.getcwd(), env=_env(),
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise AssertionError(f"{example.path}, line {example.line}: exit status {done.returncode}\n"
                             f"{example.parsed}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


def _plugin_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def parse(page: Path) -> Document:
    document = Document.parse(str(page), PythonCodeBlockParser(), CodeBlockParser("bash", run_bash), SkipParser())
    document.namespace.update(KWTA_INSTALLED=_plugin_installed("robustify_kwta"))
    return document


def fenced_languages(page: Path) -> list[tuple[int, str]]:
    """(line, language) of every fenced block of ``page``."""
    out, fence = [], None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        match = re.match(r"^\s*(`{3,}|~{3,})\s*([^\s`]*)", line)
        if match and fence is None:
            fence = match.group(1)
            out.append((number, match.group(2)))
        elif match and line.strip() == fence:
            fence = None
    return out


def _workdir(tmp_path: Path) -> Path:
    """A fresh directory laid out like the repository root: ``../shared`` and the folders examples read."""
    work = tmp_path / "repo"
    work.mkdir()
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED)
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    return work


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def shown_outputs(page: Path) -> dict[int, str]:
    """A python block's output as the page shows it: the ``text`` block right after it, by the python block's line."""
    text = page.read_text()
    return {text[:m.start()].count("\n") + 1: m.group(1)
            for m in re.finditer(r"^```python\n.*?^```\n\n```text\n(.*?)^```$", text, re.M | re.S)}


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """Every python and bash block of ``page`` runs, in order, in a fresh directory (one namespace per page); a
    python block followed by a ``text`` block prints exactly that text (the README's example and its output)."""
    if "../shared" in page.read_text() and not SHARED.exists():
        pytest.skip(f"{_id(page)} reads ../shared, which is not beside this checkout")
    monkeypatch.chdir(_workdir(tmp_path))
    ran, marked, outputs = 0, [], shown_outputs(page)
    for example in parse(page):
        capsys.readouterr()
        try:
            example.evaluate()
        except unittest.SkipTest as skip:
            marked.append(f"line {example.line}: {skip}")
            continue
        if example.region.evaluator is not None and not isinstance(example.parsed, tuple):
            ran += 1
            if example.line in outputs:
                assert capsys.readouterr().out == outputs[example.line], f"{_id(page)}, line {example.line}"
    with capsys.disabled():
        print(f"\n{_id(page)}: {ran} block(s) ran; marked: {marked}")


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_page_code_languages(page: Path) -> None:
    """Code is python or bash (run) or a data/output language: no example hides behind another name."""
    bad = [(line, lang) for line, lang in fenced_languages(page) if lang not in LANGUAGES]
    assert not bad, f"{_id(page)}: fenced blocks in other languages (line, language): {bad}; use one of {LANGUAGES}"


def test_every_runnable_block_is_seen() -> None:
    """The runner finds every python/bash fence (a block it missed would silently not run)."""
    for page in PAGES:
        fences = [line for line, lang in fenced_languages(page) if lang in ("python", "bash")]
        found = [e for e in parse(page) if not isinstance(e.parsed, tuple)]
        assert len(found) == len(fences), f"{_id(page)}: {len(fences)} python/bash fences, runner found {len(found)}"


def test_skip_markers_give_a_reason() -> None:
    for page in PAGES:
        for line in page.read_text().splitlines():
            if "<!-- skip:" in line:
                assert re.search(r'skip: next (if\(.+, )?"[^"]{10,}"', line), f"{_id(page)}: {line!r} gives no reason"


# ------------------------------------------------------------------------------------------------
# the generated reference
# ------------------------------------------------------------------------------------------------
def _help_flags(parser) -> set[str]:
    """The option strings ``--help`` lists (its option column: ``-v, --verbose``, ``--dataset DATASET``)."""
    flags = set()
    for line in parser.format_help().splitlines():
        match = re.match(r"^ {2}(-\S.*?)(?: {2,}|$)", line)
        if match:
            flags |= set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", match.group(1)))
    return flags - {"-h", "--help"}


def test_cli_reference_lists_every_flag() -> None:
    from robustify.cli import build_parser

    reference = _reference()
    parser = build_parser()
    commands = reference.all_commands(parser)
    assert commands, "no subcommands found"
    page = reference.cli_markdown()
    for name, sub in commands.items():
        section = reference.command_markdown(name, sub)
        assert f"## `robustify {name}`" in page
        assert section in page
        missing = sorted(f for f in _help_flags(sub) if f"`{f}`" not in section)
        assert not missing, f"robustify {name}: flags missing from the reference: {missing}"
        positionals = [a.dest for a in sub._actions if not a.option_strings and a.dest != "help"
                       and not isinstance(a, argparse._SubParsersAction)]
        assert all(f"`{p}` (positional)" in section for p in positionals)


def test_cli_reference_catches_a_missing_flag() -> None:
    """The check above fails when a flag is left out (so it can fail)."""
    from robustify.cli import build_parser

    reference = _reference()
    name, sub = next(iter(reference._subparsers(build_parser()).items()))
    flag = sorted(_help_flags(sub))[0]
    section = reference.command_markdown(name, sub).replace(f"`{flag}`", "`(left out)`")
    assert f"`{flag}`" not in section


def test_leaderboard_reference_explains_every_column_and_flag() -> None:
    reference = _reference()
    page = reference.leaderboard_markdown()
    columns, flags = reference.code_legend()
    assert columns and flags
    for name, text in columns + flags:  # the code's one table of explanations: every entry is on the page
        assert f"| `{name}` | {' '.join(text.split())} |" in page.replace("\\|", "|")


def test_study_file_reference_lists_every_key() -> None:
    """docs/reference/study-file.md has a row for every key the study file parser accepts."""
    from robustify.jobs.study import spec

    page = (DOCS / "reference" / "study-file.md").read_text()
    keys = {*spec.STUDY_KEYS, *spec.MODEL_KEYS, *spec.DEFENSE_KEYS, *spec.RESOURCE_KEYS}
    missing = sorted(k for k in keys if f"| `{k}` |" not in page)
    assert not missing, f"study file keys without a row in docs/reference/study-file.md: {missing}"
    assert all(f"[resources.{kind}]" in page for kind in spec.STEP_KINDS)


def test_result_schema_documents_every_field() -> None:
    import dataclasses

    from robustify.evaluation.results import EvalResult

    reference = _reference()
    missing = [f.name for f in dataclasses.fields(EvalResult) if not reference.RESULT_FIELDS.get(f.name)]
    assert not missing, f"result.json fields without a description in docs/_gen/reference.py: {missing}"
    page = reference.result_schema_markdown()
    assert all(f"| `{f.name}` |" in page for f in dataclasses.fields(EvalResult))


def test_api_reference_covers_the_public_api() -> None:
    reference = _reference()
    page = reference.api_markdown()
    for name in reference.api_names():
        assert page.count(f"::: robustify.{name}\n") == 1, name


def test_benchmarks_page_has_every_result_file_and_command() -> None:
    reference = _reference()
    page = reference.benchmarks_markdown()
    for path in sorted(reference.BENCH_DIR.iterdir()):
        if path.suffix in (".csv", ".md", ".json"):
            assert f"## `benchmarks/results/{path.name}`" in page
    assert "python benchmarks/bench_meansparse.py" in page


# ------------------------------------------------------------------------------------------------
# docstrings of the public API
# ------------------------------------------------------------------------------------------------
def _public():
    import robustify

    return [(n, getattr(robustify, n)) for n in robustify.__all__ if n != "__version__"]


def test_public_names_have_docstrings_with_an_example() -> None:
    bad = []
    for name, obj in _public():
        doc = inspect.getdoc(obj) or ""
        if not doc.strip() or ">>>" not in doc:
            bad.append(name)
    assert not bad, f"public names without a docstring or without an example (>>>): {bad}"


def test_public_functions_document_every_parameter() -> None:
    bad = []
    for name, obj in _public():
        if not inspect.isfunction(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        for param in inspect.signature(obj).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if param.annotation is inspect.Parameter.empty or not re.search(rf"^\s+{param.name}\b.*:", doc, re.M):
                bad.append(f"{name}({param.name})")
    assert not bad, f"parameters without a type annotation or an Args entry: {bad}"


@pytest.mark.parametrize("name", [n for n, _ in _public()] if importlib.util.find_spec("robustify") else [])
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import robustify

    if not SHARED.exists():
        pytest.skip("the examples read ../shared, which is not beside this checkout")
    monkeypatch.chdir(_workdir(tmp_path))
    obj = getattr(robustify, name)
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(obj, f"robustify.{name}", globs={"rb": robustify, "robustify": robustify}):
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert attempted, f"robustify.{name} has no example"
    assert not failed, f"robustify.{name}: {failed} of {attempted} example line(s) failed (see the output above)"


# ------------------------------------------------------------------------------------------------
# the built site
# ------------------------------------------------------------------------------------------------
class _RemoteRefs(HTMLParser):
    """Remote URLs the browser would load: src of script/img/iframe/source, href of link (styles, icons...)."""

    LOADS = {"script": "src", "img": "src", "iframe": "src", "source": "src", "link": "href", "embed": "src",
             "video": "src", "audio": "src"}

    def __init__(self) -> None:
        super().__init__()
        self.remote: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = self.LOADS.get(tag)
        values = dict(attrs)
        if attr and re.match(r"^(https?:)?//", values.get(attr) or ""):
            if tag == "link" and (values.get("rel") or "") in ("canonical", "alternate", "author", "license"):
                return  # a link to a page, not a resource
            self.remote.append(f"<{tag} {attr}={values[attr]}>")
        style = values.get("style") or ""
        self.remote += [f"<{tag} style=url({u})>" for u in re.findall(r"url\(['\"]?((?:https?:)?//[^)'\"]+)", style)]


def remote_references(site: Path) -> list[str]:
    found = []
    for page in sorted(site.rglob("*.html")):
        parser = _RemoteRefs()
        parser.feed(page.read_text(errors="replace"))
        found += [f"{page.relative_to(site)}: {r}" for r in parser.remote]
    for css in sorted(site.rglob("*.css")):
        found += [f"{css.relative_to(site)}: @import/url({u})"
                  for u in re.findall(r"(?:@import\s+|url\()['\"]?((?:https?:)?//[^)'\"\s;]+)", css.read_text())]
    return found


def test_remote_reference_check_finds_one(tmp_path: Path) -> None:
    (tmp_path / "a.html").write_text('<p><a href="https://example.org">text link, allowed</a></p>'
                                     '<script src="https://cdn.example.org/x.js"></script>')
    assert remote_references(tmp_path) == ["a.html: <script src=https://cdn.example.org/x.js>"]


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site ``.ci/run`` built (``$ROBUSTIFY_SITE_DIR``), else one built here with ``mkdocs build --strict``."""
    given = os.environ.get("ROBUSTIFY_SITE_DIR")
    if given:
        return Path(given)
    if shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    site = tmp_path_factory.mktemp("site")
    env = _env() | {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return site


def test_built_site_is_offline(built_site: Path) -> None:
    assert (built_site / "index.html").exists()
    assert (built_site / "reference" / "cli.html").exists()
    assert not remote_references(built_site)


def test_built_api_reference_has_no_empty_entry(built_site: Path) -> None:
    html = (built_site / "reference" / "api.html").read_text()
    for name, _ in _public():
        assert f'id="robustify.{name}"' in html, f"robustify.{name} is not on the API page"
    # mkdocstrings renders an object without a docstring as a heading followed directly by the next one
    assert 'class="doc doc-contents first">\n</div>' not in html


def test_ci_runs_the_readme_test_command() -> None:
    """``.ci/run`` runs the README's test command (each of its steps, in order; it may add steps between)."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "pytest" in line and line.startswith("python3 -m venv"))
    ci = (ROOT / ".ci" / "run").read_text()
    line = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    steps = [s.strip() for s in command.split("&&")]
    positions = [line.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), (steps, line)
    assert "mkdocs build --strict" in line
