"""Sparta (sparse spatial attention; see :mod:`.module`), registered as the ``sparta`` and ``sparta-nodp`` defenses."""

from robustify.defenses.sparta.module import (SPARTA, Sparta, SpartaConfig, insert_sparta, load_sparta, plan_sparta,
                                              save_sparta, sparta_modules)

__all__ = ["SPARTA", "Sparta", "SpartaConfig", "insert_sparta", "load_sparta", "plan_sparta", "save_sparta",
           "sparta_modules"]
