"""`retroflow pretrain`: RetroMAE pretraining from a YAML config (directly into --output, or into the artifact store)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from retroflow.config import load_config
from retroflow.console import emit_json


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="RetroMAE (or plain MLM) pretraining of a BERT-like encoder",
        description="Pretrain an encoder with RetroMAE. With --output the run writes DIR/encoder (HF model + "
        "tokenizer), DIR/decoder and DIR/checkpoints; without it the result goes to the artifact store "
        "($RETROFLOW_STORE, default ./artifacts). Multi-process: torchrun --nproc_per_node N -m flows.cli pretrain ...",
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML file, e.g. configs/pretrain/tiny.yaml")
    parser.add_argument("--output", type=Path, help="train directly into this directory")
    parser.add_argument("--dataset", help="the dataset whose corpus is the text (default: the files data.files / data.beir_corpus name)")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in DIR/checkpoints")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set train.lr=5e-5 (repeatable)",
    )
    parser.set_defaults(func=run, stage="pretrain", config_from_args=pretrain_config)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def pretrain_config(args: argparse.Namespace):
    from retromae.config import PretrainConfig

    overrides = list(args.overrides) + ([f"train.max_steps={args.max_steps}"] if args.max_steps is not None else [])
    return load_config(PretrainConfig, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    """Pretrain into --output (the store's own path, flows.stage_cli, handles a missing --output)."""
    from retroflow.checkpoints import list_checkpoints
    from retroflow.data import dataset_input
    from retroflow.inputs import inputs_of
    from retromae.pretrain import run as pretrain

    config = pretrain_config(args)
    partial = args.output
    if list_checkpoints(partial / "checkpoints") and not args.resume:
        raise ValueError(f"{partial / 'checkpoints'} already holds checkpoints: pass --resume to continue, or use a new --output")
    inputs = inputs_of(data=dataset_input(args.dataset) if args.dataset else None)
    metrics = pretrain(config, inputs, args.output, partial, resume=args.resume)
    output_dir = args.output
    if _is_main_process():
        emit_json(
            {
                "final_loss": metrics.get("final_loss"),
                "steps": metrics.get("steps"),
                "output_dir": str(output_dir),
                "encoder_dir": str(Path(output_dir) / "encoder"),
                "steps_per_s": metrics.get("steps_per_s"),
                "objective": metrics.get("objective"),
                "resumed_from": metrics.get("resumed_from"),
                "processes": metrics.get("processes"),
            }
        )
    return 0
