"""`retroflow` command line: one sub-command per stage, each calling the stage's library function.

Each package contributes its commands through `<package>.cli.add_commands(subparsers)`, so
the CLI has no logic of its own and the flows call exactly the same functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from retroflow import __version__
from retroflow.config import ConfigError
from retroflow.console import setup_logging
from flows.stage_cli import run_in_store, runs_in_store

COMMAND_MODULES = ["eval.cli", "retromae.cli", "retrieval.cli", "flows.pipeline_cli"]


class UserError(Exception):
    """An error caused by the user's input: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retroflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"retroflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue  # that stage's commands are not installed in this checkout
            raise
        module.add_commands(subparsers)
    return parser


# Spellings from before one word per stage, still accepted (and listed nowhere).
LEGACY_COMMANDS = {("index", "build"): ["index"], ("index", "tune"): ["tune"]}


def modern_argv(argv: list[str]) -> list[str]:
    for old, new in LEGACY_COMMANDS.items():
        if tuple(argv[: len(old)]) == old:
            return [*new, *argv[len(old):]]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(modern_argv(list(sys.argv[1:] if argv is None else argv)))
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        if runs_in_store(args):
            return run_in_store(args)
        return int(args.func(args) or 0)
    except (UserError, ConfigError, FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        logging.getLogger("retroflow").debug("user error", exc_info=True)  # one line on the console, the rest for -v
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
