"""`retroflow` command line: one sub-command per stage, each calling the stage's library function.

Each package contributes its commands through `<package>.cli.add_commands(subparsers)`, so
the CLI has no logic of its own and the flows call exactly the same functions.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from flows.stage_cli import run_in_store, runs_in_store
from retroflow import __version__
from retroflow.config import ConfigError
from retroflow.console import setup_logging

COMMAND_MODULES = ["eval.cli", "retromae.cli", "retrieval.cli", "flows.pipeline_cli"]


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


# Spellings from before one word per stage: deprecated, still accepted with a warning until 0.2.
DEPRECATED_COMMANDS = {
    ("index", "build"): ["index"],
    ("index", "tune"): ["tune"],
    ("mine-negatives",): ["negatives"],
    ("train-teacher",): ["teacher"],
}


def modern_argv(argv: list[str]) -> list[str]:
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))  # after global flags (-v)
    head, argv = argv[:at], argv[at:]
    for old, new in DEPRECATED_COMMANDS.items():
        if tuple(argv[: len(old)]) == old:
            print(f"retroflow: '{' '.join(old)}' is deprecated and will be removed in 0.2; use '{' '.join(new)}'", file=sys.stderr)
            return [*head, *new, *argv[len(old) :]]
    return [*head, *argv]


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
    except (ConfigError, FileNotFoundError, ValueError, OSError, RuntimeError) as err:
        message = error_message(err)
        if args.verbose or message is None:
            raise
        logging.getLogger("retroflow").debug("user error", exc_info=True)  # one line on the console, the rest for -v
        print(f"error: {message}", file=sys.stderr)
        return 2


# Faults of the machine rather than of retroflow: each gets one line naming the path and the cause.
ENVIRONMENT_ERRNOS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device (the disk is full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error (a failing disk or network file system)",
    errno.ENAMETOOLONG: "file name too long",
    errno.EISDIR: "is a directory (a file was expected there)",
    errno.EEXIST: "already exists",
}


def error_message(err: BaseException) -> str | None:
    """The one line printed for `err`, or None for a bug (a traceback is more useful then)."""
    if isinstance(err, UnicodeError):  # a ValueError too: a non-UTF-8 path (surrogate-escaped by Python) or text
        text, start = getattr(err, "object", ""), getattr(err, "start", 0)
        if isinstance(text, str):
            line_start = text.rfind("\n", 0, start) + 1
            line_end = text.find("\n", start)
            shown = text[line_start : line_end if line_end >= 0 else len(text)][:200]
        else:
            shown = repr(text[max(0, start - 40) : start + 40])
        return f"a path or text is not valid UTF-8: {shown!r} ({type(err).__name__}); rename it with UTF-8 characters"
    if isinstance(err, (ConfigError, FileNotFoundError, ValueError)):
        return str(err)
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        where = err.filename if err.filename is not None else "(no path given)"
        detail = f" ({err.strerror})" if err.strerror and err.strerror != os.strerror(err.errno) else ""
        return f"{where}: {ENVIRONMENT_ERRNOS[err.errno]}{detail} [{errno.errorcode.get(err.errno, err.errno)}]"
    if isinstance(err, RuntimeError) and "iostream error" in str(err):  # torch.save's only word for a failed write
        return f"writing a file failed (torch: {str(err).splitlines()[0][:160]}); the disk is probably full or read-only"
    return None


if __name__ == "__main__":
    sys.exit(main())
