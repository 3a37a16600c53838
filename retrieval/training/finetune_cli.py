"""`retroflow negatives`, `retroflow teacher`, `retroflow finetune`.

Each command loads a YAML config (flags and `--set key=value` override it) and runs the stage
into the artifact store (no `--output`: flows.stage_cli, the chain's own key), or into
`--output DIR` (checkpoints in `DIR/partial`, removed on success; `--resume` continues a killed
run) and prints a JSON line last. Both run the stage module's `run(config, inputs, ...)`: what the
stage reads (`--dataset`, `--model`, `--negatives`, `--teacher-scores`) are its inputs, never
config fields.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from retroflow.config import ConfigError, flag, load_config, required_flag
from retroflow.console import emit_json, format_table
from retroflow.publish import atomic_write_text

PARTIAL = "partial"


def _common(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", type=Path, help=config_help)
    parser.add_argument("--dataset", help="the dataset trained on: a BEIR directory or name (required)")
    parser.add_argument(
        "--output", type=Path, help="directory the stage writes into (default: the artifact store, $RETROFLOW_STORE or ./artifacts)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set train.lr=5e-5 (repeatable)",
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    mine = subparsers.add_parser(
        "negatives",
        help="mine hard negatives with BM25 or a dense model",
        description="Mine hard negatives for a dataset's training queries from a rank window, excluding every "
        "judged positive. Writes DIR/negatives.jsonl (first line: provenance).",
    )
    _common(mine, "YAML NegativesConfig, e.g. configs/negatives/bm25-scifact.yaml")
    mine.add_argument("--method", choices=["bm25", "dense"])
    mine.add_argument("--model", help="dense mining: the model that ranks (alias, HF directory, a model artifact)")
    mine.set_defaults(func=negatives_command, stage="negatives", config_from_args=negatives_config)

    teacher = subparsers.add_parser(
        "teacher",
        help="score each training query's candidates with a teacher (BM25+dense fusion or a cross-encoder)",
        description="kind fusion: fuse BM25 with the dense model --model (weight chosen on the dev hold-out) and score "
        "each query's fused top candidates. kind cross_encoder: train a cross-encoder from --model on the training queries + mined "
        "negatives, then score each query's candidates (DIR/teacher/). Both write DIR/teacher_scores.jsonl.",
    )
    _common(teacher, "YAML TeacherConfig, e.g. configs/teacher/fusion-scifact.yaml")
    teacher.add_argument("--model", help="the teacher's model: fusion's dense side, the cross-encoder's start (alias, HF directory)")
    teacher.add_argument("--negatives", type=Path, help="negatives.jsonl from `retroflow negatives` (cross_encoder kind)")
    teacher.add_argument("--resume", action="store_true", help="continue from DIR/partial checkpoints")
    teacher.set_defaults(func=teacher_command, stage="teacher", config_from_args=teacher_config)

    finetune = subparsers.add_parser(
        "finetune",
        help="DPR fine-tuning (hard negatives, ANCE refresh, distillation)",
        description="Fine-tune a bi-encoder on a dataset's training qrels. Writes DIR/model (HF + "
        "sentence-transformers files), DIR/metrics.json. Multi-process: "
        "torchrun --nproc_per_node N -m flows.cli finetune ...",
    )
    _common(finetune, "YAML FinetuneConfig, e.g. configs/finetune/tiny.yaml")
    finetune.add_argument("--model", help="the encoder training starts from (alias, HF directory, pretrain output; required)")
    finetune.add_argument("--negatives", type=Path, help="negatives.jsonl (default: mine with BM25 as negatives.mine says)")
    finetune.add_argument("--teacher-scores", type=Path, help="teacher_scores.jsonl: distil (set distill.loss)")
    finetune.add_argument("--max-steps", type=int, help="override train.max_steps")
    finetune.add_argument("--seed", type=int, help="override train.seed")
    finetune.add_argument("--resume", action="store_true", help="continue from DIR/partial checkpoints")
    finetune.set_defaults(func=finetune_command, stage="finetune", config_from_args=finetune_config)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _data_input(args: argparse.Namespace):
    from retroflow.data import dataset_input

    return dataset_input(required_flag(args, "dataset"))


def _model_input(args: argparse.Namespace):
    from retroflow.inputs import model_input

    return model_input(required_flag(args, "model"))


def _file_input(path: Path | None):
    from retroflow.inputs import path_input

    return path_input(path) if path is not None else None


def _partial_dir(output: Path, resume: bool) -> Path:
    partial = output / PARTIAL
    if _is_main_process() and partial.is_dir() and any(partial.iterdir()) and not resume:
        raise ValueError(f"{partial} holds an unfinished run: pass --resume to continue it, or use a new --output")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def _finish(output: Path, metrics: dict) -> None:
    if _is_main_process():
        short = {k: v for k, v in metrics.items() if k not in ("loss_history", "distill_loss_history")}
        atomic_write_text(output / "metrics.json", json.dumps(metrics, indent=2, default=str))
        shutil.rmtree(output / PARTIAL, ignore_errors=True)
        emit_json({**short, "output_dir": str(output)})


def flag_overrides(args: argparse.Namespace, flags: tuple[tuple[str, str], ...]) -> list:
    """`--set` overrides plus the command's own flags (flag, config field), the flags winning."""
    return list(args.overrides) + [flag(key, getattr(args, name)) for name, key in flags if getattr(args, name, None) is not None]


def negatives_config(args: argparse.Namespace):
    from retrieval.training.negatives import NegativesConfig

    return load_config(NegativesConfig, args.config, flag_overrides(args, (("method", "method"),)))


def teacher_config(args: argparse.Namespace):
    from retrieval.training.teacher import TeacherConfig

    return load_config(TeacherConfig, args.config, flag_overrides(args, ()))


def finetune_config(args: argparse.Namespace):
    from retrieval.training.finetune import FinetuneConfig

    flags = (("max_steps", "train.max_steps"), ("seed", "train.seed"))
    return load_config(FinetuneConfig, args.config, flag_overrides(args, flags))


def negatives_command(args: argparse.Namespace) -> int:
    from retrieval.training.negatives import run
    from retroflow.inputs import inputs_of

    config = negatives_config(args)
    inputs = inputs_of(data=_data_input(args), model=_model_input(args) if config.method == "dense" else None)
    metrics = run(config, inputs, args.output, args.output / PARTIAL)
    print(format_table([{k: metrics[k] for k in ("method", "queries", "negatives", "mean_per_query")}]))
    atomic_write_text(args.output / "metrics.json", json.dumps(metrics, indent=2))
    emit_json({**metrics, "output_dir": str(args.output)})
    return 0


def teacher_command(args: argparse.Namespace) -> int:
    from retrieval.training.teacher import run
    from retroflow.inputs import inputs_of

    config = teacher_config(args)
    if config.kind == "cross_encoder" and args.negatives is None:
        raise ConfigError("retroflow teacher: the cross_encoder kind trains on mined negatives: pass --negatives FILE")
    inputs = inputs_of(
        data=_data_input(args),
        init=_model_input(args),
        negatives=_file_input(args.negatives) if config.kind == "cross_encoder" else None,
    )
    partial = _partial_dir(args.output, args.resume)
    metrics = run(config, inputs, args.output, partial, resume=args.resume)
    _finish(args.output, metrics)
    return 0


def finetune_command(args: argparse.Namespace) -> int:
    from retrieval.training.finetune import run
    from retroflow.inputs import inputs_of

    config = finetune_config(args)
    inputs = inputs_of(
        data=_data_input(args),
        model=_model_input(args),
        negatives=_file_input(args.negatives),
        teacher=_file_input(args.teacher_scores),
    )
    partial = _partial_dir(args.output, args.resume)
    metrics = run(config, inputs, args.output, partial, resume=args.resume)
    if _is_main_process():
        print(format_table([{"steps": metrics["steps"], "final_loss": metrics["final_loss"], "queries": metrics["num_train_queries"]}]))
    _finish(args.output, metrics)
    return 0
