"""`retroflow evaluate`: score a model on a dataset split and print a table + a JSON line."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.evaluate import EvaluateConfig, evaluate, summary, write_result
from retroflow.config import load_config
from retroflow.console import emit_json, format_table


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a model (or bm25) on a BEIR-format dataset",
        description="Evaluate a dense encoder or BM25 on a dataset split. Flags override --config.",
    )
    parser.add_argument("--config", type=Path, help="YAML EvaluateConfig (flags below override it)")
    parser.add_argument("--model", help="alias (minilm), local HF model dir, hub id, or bm25")
    parser.add_argument("--dataset", help="BEIR directory, name under $RETROFLOW_DATA_DIR, hf:BeIR/NAME, or zip URL")
    parser.add_argument("--split", help="qrels split (default test)")
    parser.add_argument("--metrics", help="comma-separated, e.g. ndcg@10,recall@100,mrr@10,map@100")
    parser.add_argument("--top-k", type=int, help="retrieval depth (default 1000)")
    parser.add_argument("--pooling", choices=["auto", "cls", "mean", "max"])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--index", help="search through this FAISS index artifact instead of exact search")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, e.g. encoder.passage_max_length=256")
    parser.add_argument("--output", type=Path, help="also write the result (with per-query scores) to this JSON file")
    parser.set_defaults(func=run_evaluate_command)


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    overrides = list(args.set)
    for flag, key in (("model", "model"), ("dataset", "dataset"), ("split", "split"), ("top_k", "top_k"), ("index", "index")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.metrics:
        overrides.append(f"metrics=[{args.metrics}]")
    if args.pooling:
        overrides.append(f"encoder.pooling={args.pooling}")
    if args.batch_size:
        overrides.append(f"encoder.batch_size={args.batch_size}")
    return load_config(EvaluateConfig, args.config, overrides)


def run_evaluate_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = evaluate(config)
    short = summary(result)
    metric_row = {"model": config.model, "dataset": short["dataset"], "split": config.split}
    metric_row.update({m: short[m] for m in config.metrics})
    metric_row["queries"] = short["num_queries"]
    print(format_table([metric_row]))
    if args.output:
        write_result(result, args.output)
    emit_json(short)
    return 0
