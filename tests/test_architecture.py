"""Issue 18: the architecture is checked, not described. The import-linter contracts in pyproject.toml
(stages as layers, generic code never importing a specific defense, defense packages independent) hold on
the code, and a deliberate violation breaks them; the generic stages name no defense; plugins load by
entry point."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import robustify as rb
from robustify import defenses
from robustify.core import plugins

REPO = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def lint_available() -> None:
    if not Path(LINT).is_file():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "robustify", root / "robustify", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    return root


@pytest.mark.parametrize("module, line, contract", [
    ("evaluation/engine.py", "from robustify.defenses.meansparse import bpda", "never imports a specific defense"),
    ("defenses/sparta/module.py", "from robustify.defenses.meansparse import set_alpha", "independent of each other"),
    ("load/data.py", "from robustify.evaluation import engine", "stages:"),
])
def test_a_deliberate_violation_breaks_its_contract(tmp_path, lint_available, module, line, contract) -> None:
    root = _copy(tmp_path)
    kept = _lint(root)
    assert kept.returncode == 0, kept.stdout[-2000:]
    target = root / "robustify" / module
    target.write_text(target.read_text() + f"\n{line}  # deliberate violation\n")
    broken = _lint(root)
    assert broken.returncode != 0
    assert re.search(re.escape(contract) + r".*BROKEN", broken.stdout), broken.stdout[-2000:]


def test_generic_code_names_no_defense_but_in_documentation() -> None:
    """Outside the MeanSparse package, the code that mentions MeanSparse is its registration in the public API
    (import + deprecated names in ``__init__``, old module paths in ``_deprecated``), documentation and the legacy
    table: no generic module branches on it."""
    package = REPO / "robustify"
    code_hits = []
    for path in package.rglob("*.py"):
        if "defenses/meansparse" in path.as_posix() or path in (package / "__init__.py", package / "_deprecated.py"):
            continue
        for number, text in enumerate(path.read_text().splitlines(), 1):
            stripped = text.strip()
            if "meansparse" in stripped.lower() and re.search(r"\bimport\b.*meansparse|==\s*['\"]meansparse['\"]|"
                                                               r"['\"]meansparse['\"]\s*(==|in\b)", stripped):
                code_hits.append(f"{path.relative_to(REPO)}:{number}: {stripped}")
    assert code_hits == []


def test_deprecated_public_names_warn_and_resolve_to_their_new_homes() -> None:
    from robustify.defenses import meansparse as ms

    with pytest.warns(DeprecationWarning, match="robustify.insert_meansparse is deprecated.*defenses.meansparse"):
        assert rb.insert_meansparse is ms.insert_meansparse
    for name, (module, attr) in rb._DEPRECATED.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            getattr(rb, name)
        assert any(issubclass(w.category, DeprecationWarning) for w in caught), name
    with pytest.raises(AttributeError):
        rb.no_such_name  # noqa: B018


def test_old_module_paths_warn_and_are_the_new_modules() -> None:
    """The flat layout's module paths still import (one release), as the very module objects of their new homes,
    so ``from robustify.pipeline import EvaluationJob`` and ``mock.patch("robustify.state.X")`` keep working."""
    import importlib

    from robustify._deprecated import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=re.escape(f"{old} is deprecated") + ".*" + re.escape(new)):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
    assert callable(rb.evaluate) and callable(rb.calibrate)  # the functions, never rebound by an old import
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("robustify.no_such_module")


def test_built_in_defenses_register_in_a_fixed_order_and_plugins_by_entry_point() -> None:
    names = defenses.defense_names()
    assert names[:3] == ("meansparse", "sparta", "sparta-nodp") and "smoothrelu" in names
    assert defenses.ENTRY_POINT_GROUP in plugins.GROUPS
    assert "robustify.attacks" in plugins.GROUPS


def test_a_broken_plugin_is_logged_and_skipped(monkeypatch, caplog) -> None:
    import importlib.metadata as md

    class Broken:
        name, value = "broken", "robustify_no_such_plugin_module"

        def load(self):
            raise ImportError("No module named 'robustify_no_such_plugin_module'")

    monkeypatch.setattr(md, "entry_points", lambda group: [Broken()] if group == "robustify.test" else [])
    monkeypatch.setattr(plugins, "_loaded", {})
    with caplog.at_level("WARNING"):
        assert plugins.load_entry_points("robustify.test") == []
    assert "failed to load and is skipped" in caplog.text
