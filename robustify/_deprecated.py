"""The module paths of the first flat layout, kept for one release (issue 18: today's names as deprecated aliases).

``import robustify.pipeline`` (or ``from robustify.meansparse import bpda``, or ``mock.patch("robustify.state.X")``)
imports the module's new home, with a ``DeprecationWarning`` naming it, and binds the old name to that very
module object. Two old modules are not aliased: ``robustify.evaluate`` and ``robustify.calibrate`` are now the
functions ``rb.evaluate`` and ``rb.calibrate`` (an import of the old module would rebind the name on the package).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

__all__ = ["MOVED", "install"]

#: old module -> its new home
MOVED: dict[str, str] = {
    "robustify.config": "robustify.core.config",
    "robustify.errors": "robustify.core.errors",
    "robustify.io": "robustify.core.io",
    "robustify.stats": "robustify.core.stats",
    "robustify.significance": "robustify.core.significance",
    "robustify.memory": "robustify.core.memory",
    "robustify.distributed": "robustify.core.distributed",
    "robustify._compat": "robustify.core.compat",
    "robustify.defense_file": "robustify.defenses.file",
    "robustify.sites": "robustify.defenses.sites",
    "robustify.meansparse": "robustify.defenses.meansparse.module",
    "robustify.insert": "robustify.defenses.meansparse.insert",
    "robustify.published": "robustify.defenses.meansparse.published",
    "robustify.interop": "robustify.defenses.meansparse.interop",
    "robustify.state": "robustify.defenses.meansparse.state",
    "robustify.sparta": "robustify.defenses.sparta.module",
    "robustify.activations": "robustify.defenses.activations.swaps",
    "robustify.smoothrelu": "robustify.defenses.activations.smoothrelu",
    "robustify.models": "robustify.load.models",
    "robustify.zoo": "robustify.load.zoo",
    "robustify.data": "robustify.load.data",
    "robustify.preprocessing": "robustify.load.preprocessing",
    "robustify._loading": "robustify.load._loading",
    "robustify.journal": "robustify.evaluation.journal",
    "robustify.results": "robustify.evaluation.results",
    "robustify.audit": "robustify.evaluation.audit",
    "robustify.fast": "robustify.evaluation.fast",
    "robustify.cost": "robustify.evaluation.cost",
    "robustify.leaderboard": "robustify.reporting.leaderboard",
    "robustify.page": "robustify.reporting.page",
    "robustify.plots": "robustify.reporting.plots",
    "robustify.pipeline": "robustify.jobs.evaluate",
    "robustify.train": "robustify.jobs.train",
}


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: Any) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} is deprecated and will be removed in the next release: use {new}",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The new module is already executed."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader())


def install() -> None:
    """Add the finder once (idempotent); the old paths resolve only where no module of that name exists."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
