"""``robustify export``: a robustified model (and its evaluation) in the form RobustBench accepts."""

from __future__ import annotations

import argparse
import logging

from robustify.cli.common import register_command
from robustify.cli.flags import ConfigFlags, field_names
from robustify.jobs.export import ExportJob, export_robustbench

logger = logging.getLogger("robustify")

__all__: list[str] = []

EXPORT_FLAGS = ConfigFlags(ExportJob, field_names(ExportJob))


def _export_args(p: argparse.ArgumentParser) -> None:
    EXPORT_FLAGS.add(p)


@register_command("export", "write a robustified model in RobustBench's format (its MeanSparse class's state dict), "
                  "with an evaluation's model_info JSON and adversarial examples", _export_args)
def _cmd_export(args: argparse.Namespace) -> int:
    for kind, path in export_robustbench(ExportJob(**EXPORT_FLAGS.values(args))).items():
        print(f"{kind:12s} {path}")
    return 0
