"""Make RobustBench 1.1.1 importable next to the PyPI AutoAttack (``pyautoattack``)."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

__all__ = ["import_robustbench"]


def import_robustbench() -> ModuleType:
    """Import ``robustbench``, aliasing ``autoattack`` to ``pyautoattack`` if needed.

    The alias is also installed at interpreter start-up by the
    ``robustify-autoattack-alias.pth`` file of the robustify wheel; calling it here covers
    environments where ``.pth`` files are not processed.
    """
    import _robustify_autoattack_alias

    _robustify_autoattack_alias.install()
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
