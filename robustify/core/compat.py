"""Make RobustBench 1.1.1 importable next to the PyPI AutoAttack (``pyautoattack``).

RobustBench 1.1.1 does ``from autoattack import AutoAttack`` (the git package's name and API),
while PyPI ships AutoAttack as ``pyautoattack`` with a keyword-only API.
:func:`install_autoattack_alias` (called when ``robustify`` is imported) appends a finder to the
*end* of ``sys.meta_path``: a real ``autoattack`` package, if installed, is always found first.
Otherwise ``autoattack`` resolves to a thin adapter with the git signature over ``pyautoattack``,
and ``autoattack.<sub>`` to ``pyautoattack.<sub>``. So RobustBench's own client code keeps
working in any program that imports robustify first; nothing changes for programs that do not
(no start-up hook is installed into the environment).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from types import ModuleType

__all__ = ["import_robustbench", "install_autoattack_alias"]


def _make_adapter(module: types.ModuleType) -> None:
    pyaa = importlib.import_module("pyautoattack")

    class AutoAttack(pyaa.AutoAttack):  # type: ignore[misc, name-defined]
        """The git AutoAttack signature, delegating to pyautoattack's keyword-only API."""

        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                     version="standard", is_tf_model=False, device="cuda", log_path=None):
            if is_tf_model:
                raise NotImplementedError("pyautoattack has no TensorFlow support")
            attacks = list(attacks_to_run) if version == "custom" else None
            super().__init__(model, attacks=attacks, device=device, eps=eps, norm=norm, seed=seed,
                             version=version)
            self.verbose = verbose

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
            x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)
            return (x_adv, y_adv) if return_labels else x_adv

        def run_standard_evaluation_individual(self, x_orig, y_orig, bs=250, return_labels=False):
            adv = super().run_standard_evaluation_individual(x_orig, y_orig, batch_size=bs)
            return adv if return_labels else {k: v[0] for k, v in adv.items()}

        def set_version(self, version="standard"):
            return self._set_version(version)

    module.AutoAttack = AutoAttack
    module.__version__ = getattr(pyaa, "__version__", "unknown")
    module.__path__ = []  # a package, so that ``autoattack.state`` imports resolve


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):  # noqa: D401 - default module creation
        if spec.name != "autoattack":
            return importlib.import_module("py" + spec.name)
        return None

    def exec_module(self, module):
        if module.__name__ == "autoattack":
            _make_adapter(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "autoattack" and not fullname.startswith("autoattack."):
            return None
        if importlib.util.find_spec("pyautoattack") is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader(), is_package=fullname == "autoattack")


def install_autoattack_alias() -> None:
    """Append the ``autoattack`` -> ``pyautoattack`` finder once (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


def import_robustbench() -> ModuleType:
    """Import ``robustbench``, aliasing ``autoattack`` to ``pyautoattack`` if needed."""
    install_autoattack_alias()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            return importlib.import_module("robustbench")
        except ModuleNotFoundError as exc:
            if exc.name == "pkg_resources":
                raise ImportError(
                    "robustbench 1.1.1 needs pkg_resources: pip install 'setuptools<81'"
                ) from exc
            raise
