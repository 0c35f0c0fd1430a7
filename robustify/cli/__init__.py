"""The ``robustify`` command line: a thin layer over the public Python API.

Every command parses its flags and calls the same functions users call from Python. An error the
user can fix (:class:`robustify.core.errors.UserError`, a file-system or a missing-package error) is
one line on stderr and exit status 2; anything else is a bug, reported as one (exit status 1, with the
hint to rerun with ``--debug``, which shows the traceback). Commands live in small
``_cmd_*`` functions registered in :data:`COMMANDS` by their modules (:mod:`.calibrate`: inspect,
calibrate; :mod:`.evaluate`: evaluate, audit, sweep, leaderboard, run; :mod:`.train`: train; :mod:`.study`: study;
:mod:`.export`: export),
each importing the library modules it calls; their config flags are made by :mod:`.flags`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from robustify.core import distributed
from robustify.core.errors import UserError, first_line
from robustify.cli import calibrate  # noqa: F401 - they register their commands, in --help's order
from robustify.cli import evaluate
from robustify.cli import train
from robustify.cli import study
from robustify.cli import export  # noqa: F401
from robustify.cli.common import COMMANDS, register_command

logger = logging.getLogger("robustify")

#: errors the user can fix: one line, exit status 2 (file-system and missing-package errors included)
USER_ERRORS = (UserError, OSError, ImportError)

__all__ = ["COMMANDS", "build_parser", "main", "register_command"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustify", description=__doc__.splitlines()[0])
    _add_global_flags(parser, debug=False, verbose=0)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # after the command too; SUPPRESS keeps its parser from resetting what came before it
        _add_global_flags(p, debug=argparse.SUPPRESS, verbose=argparse.SUPPRESS)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def _add_global_flags(p: argparse.ArgumentParser, debug: Any, verbose: Any) -> None:
    p.add_argument("--debug", action="store_true", default=debug, help="show tracebacks")
    p.add_argument("-v", "--verbose", action="count", default=verbose, help="more log output (-vv: debug)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("auto-attack").setLevel(logging.WARNING if args.verbose < 2 else logging.DEBUG)
    try:
        distributed.init_from_env()  # under torchrun: join the process group (gloo on CPU)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("robustify: interrupted; completed work is kept and a rerun resumes it", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"robustify: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: say so, with how to see it
        if args.debug:
            raise
        print(f"robustify: internal error ({type(exc).__name__}: {first_line(exc)}); this is a bug in robustify or "
              "a library it calls: rerun with --debug for the traceback and report it", file=sys.stderr)
        return 1
