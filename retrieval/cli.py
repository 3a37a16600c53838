"""`retroflow` commands of the retrieval package, collected from its two jobs' command modules."""

from __future__ import annotations

import argparse
import importlib

SUBMODULES = ["retrieval.training.finetune_cli", "retrieval.serving.index_cli"]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    for name in SUBMODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.add_commands(subparsers)
