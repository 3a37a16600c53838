"""`retroflow evaluate`, `retroflow compare`, `retroflow runs`: score, register and compare runs.

Each prints a human-readable table, then one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from eval.evaluate import EvaluateConfig, Target, evaluate, record_run, summary, write_result
from eval.report import search_columns
from retroflow.config import flag, load_config
from retroflow.console import emit_json, format_table


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    add_evaluate_command(subparsers)
    add_compare_command(subparsers)
    add_runs_command(subparsers)


def add_registry_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", type=Path, help="run registry Parquet file (default $RETROFLOW_REGISTRY or runs/registry.parquet)")


# ---------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------


def add_evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a model (or bm25) on a BEIR, MS MARCO or NQ dataset and register the run",
        description="Evaluate a dense encoder or BM25 on a dataset split. Flags override --config; "
        "--model, --dataset, --index and --embeddings say what is evaluated (never a config field).",
    )
    parser.add_argument("--config", type=Path, help="YAML EvaluateConfig (flags below override it)")
    parser.add_argument("--suite", choices=["beir", "msmarco", "nq"], help="evaluation suite (default beir)")
    parser.add_argument(
        "--model", default="minilm", help="alias, local HF model dir, hub id, bm25, or hybrid:<dense model> (default minilm)"
    )
    parser.add_argument(
        "--dataset",
        default="scifact",
        help="dataset directory (BEIR, MS MARCO TSV or DPR layout), name under $RETROFLOW_DATA_DIR, hf:BeIR/NAME, "
        "or zip URL (default scifact)",
    )
    parser.add_argument("--split", help="qrels split (default test)")
    parser.add_argument("--metrics", help="comma-separated, e.g. ndcg@10,recall@100,mrr@10,map@100 (nq: accuracy@20,...)")
    parser.add_argument("--top-k", type=int, help="retrieval depth (default 1000; nq 100)")
    parser.add_argument("--pooling", choices=["auto", "cls", "mean", "max"])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--index", help="search through this FAISS index directory instead of exact search")
    parser.add_argument("--embeddings", help="search exactly over this embeddings directory's vectors instead of encoding the corpus")
    parser.add_argument("--run-file", help="score this ranking file (MS MARCO 'qid pid rank' or TREC format) instead of retrieving")
    parser.add_argument(
        "--on-unknown-ids", choices=["error", "drop"], help="qrels rows naming unknown queries/documents: fail (default) or drop them"
    )
    parser.add_argument("--checksum", help="sha256:<hex> (or md5:<hex>) of a zip-URL dataset, verified before it is unpacked")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field, e.g. encoder.passage_max_length=256, nq.passages=PATH",
    )
    parser.add_argument("--output", type=Path, help="also write the result (with per-query scores) to this JSON file")
    add_registry_argument(parser)
    parser.add_argument("--no-registry", action="store_true", help="do not append this run to the registry")
    parser.add_argument("--run-id", help="registry run id (default: time + random suffix); reuse one to group datasets")
    parser.set_defaults(func=run_evaluate_command)


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    overrides = list(args.set)
    flags = (
        ("suite", "suite"),
        ("split", "split"),
        ("top_k", "top_k"),
        ("run_file", "run_file"),
        ("on_unknown_ids", "on_unknown_ids"),
        ("checksum", "checksum"),
    )
    for name, key in flags:
        value = getattr(args, name, None)
        if value is not None:
            overrides.append(flag(key, value))
    if args.metrics:
        overrides.append(flag("metrics", [name.strip() for name in args.metrics.split(",")]))
    if args.pooling:
        overrides.append(flag("encoder.pooling", args.pooling))
    if args.batch_size:
        overrides.append(flag("encoder.batch_size", args.batch_size))
    return load_config(EvaluateConfig, args.config, overrides)


def target_from_args(args: argparse.Namespace) -> Target:
    """What is evaluated: the flags as given (strings, never parsed as YAML)."""
    return Target(model=args.model, dataset=args.dataset, index=args.index, embeddings=args.embeddings)


def run_evaluate_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    target = target_from_args(args)
    result = evaluate(config, target)
    short = summary(result)
    metric_row = {"model": target.model, "dataset": short["dataset"], "split": config.split}
    metric_row.update({m: short[m] for m in config.metrics})
    metric_row["queries"] = short["num_queries"]
    metric_row.update(search_columns(short, config.metrics))
    print(format_table([metric_row]))
    if args.output:
        write_result(result, args.output)
    short["run_id"] = None if args.no_registry else record_run(result, config, target, args.registry, args.run_id)
    emit_json(short)
    return 0


# ---------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------


def add_compare_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare two registered runs with paired significance tests",
        description="Per dataset and metric: mean delta (B - A), paired t-test, randomisation test, bootstrap 95%% CI, "
        "wins/losses, and the queries that changed most.",
    )
    parser.add_argument("run_a", metavar="RUN_A", help="baseline run id (or a unique prefix)")
    parser.add_argument("run_b", metavar="RUN_B", help="candidate run id (or a unique prefix)")
    add_registry_argument(parser)
    parser.add_argument("--metrics", help="comma-separated subset of metrics (default: all both runs have)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--threshold", type=float, default=0.0, help="a drop larger than this that is significant is a regression")
    parser.add_argument(
        "--test", choices=["randomization", "ttest", "bootstrap"], default="randomization", help="test behind 'significant'"
    )
    parser.add_argument("--resamples", type=int, default=10000, help="randomisation/bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=5, help="most-changed queries to show per dataset")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit with status 1 when a regression is found")
    parser.set_defaults(func=run_compare_command)


def fmt_p(p: float | None) -> str:
    return "-" if p is None else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def run_compare_command(args: argparse.Namespace) -> int:
    from eval.compare import compare_registry_runs, find_regressions
    from eval.registry import load_registry, resolve_run_id

    frame = load_registry(args.registry)
    run_a, run_b = resolve_run_id(frame, args.run_a), resolve_run_id(frame, args.run_b)
    comparisons, only_a, only_b = compare_registry_runs(frame, run_a, run_b, n_resamples=args.resamples, seed=args.seed, top_n=args.top)
    wanted = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    rows, datasets, regressions = [], [], []
    different = [f"{item.dataset}/{item.split}" for item in comparisons if not item.same_data]
    for item in comparisons:
        metrics = {k: v for k, v in item.comparison.metrics.items() if wanted is None or k in wanted}
        if not item.same_data:
            # Same name, other content (another copy, subset or version): per-query differences would
            # compare different questions and judgments, so no delta, test or regression is reported.
            for metric in metrics.values():
                rows.append(
                    {
                        "dataset": f"{item.dataset}/{item.split}",
                        "metric": metric.metric,
                        "A": metric.mean_a,
                        "B": metric.mean_b,
                        "delta": "n/a: different data",
                        "95% CI": "-",
                        "p_t": "-",
                        "p_rand": "-",
                        "W/L/T": "-",
                        "sig": "",
                        "n": "-",
                    }
                )
            datasets.append(
                {
                    "dataset": item.dataset,
                    "split": item.split,
                    "same_data": False,
                    "mean_a": {k: m.mean_a for k, m in metrics.items()},
                    "mean_b": {k: m.mean_b for k, m in metrics.items()},
                }
            )
            continue
        for metric in metrics.values():
            rows.append(
                {
                    "dataset": f"{item.dataset}/{item.split}",
                    "metric": metric.metric,
                    "A": metric.mean_a,
                    "B": metric.mean_b,
                    "delta": metric.delta,
                    "95% CI": f"[{metric.ci_low:+.4f}, {metric.ci_high:+.4f}]" if metric.ci_low is not None else "-",
                    "p_t": fmt_p(metric.p_ttest),
                    "p_rand": fmt_p(metric.p_randomization),
                    "W/L/T": f"{metric.wins}/{metric.losses}/{metric.ties}",
                    "sig": "*" if metric.significant(args.alpha, args.test) else "",
                    "n": metric.num_queries,
                }
            )
        item.comparison.metrics = metrics
        found = find_regressions(item.comparison, args.threshold, args.alpha, args.test)
        regressions += [
            {"dataset": item.dataset, "split": item.split, "metric": m.metric, "delta": m.delta, "p": m.p_value(args.test)} for m in found
        ]
        datasets.append(item.to_dict())
    print(f"A = {run_a}\nB = {run_b}   (delta = B - A; * = significant at alpha={args.alpha}, {args.test} test)")
    print(format_table(rows) if rows else "(no dataset/split in common)")
    if different:
        message = (
            f"A and B scored different data under the same name for {', '.join(different)} (dataset fingerprints differ): "
            "no deltas, significance tests or regressions are reported for them"
        )
        print(f"WARNING: {message}")
        logging.getLogger("retroflow.compare").warning("%s", message)
    print_most_changed([item for item in comparisons if item.same_data])
    for label, names in (("only in A", only_a), ("only in B", only_b)):
        if names:
            print(f"{label}: {', '.join(names)}")
    emit_json(
        {
            "run_a": run_a,
            "run_b": run_b,
            "datasets": datasets,
            "only_in_a": only_a,
            "only_in_b": only_b,
            "regressions": regressions,
            "different_data": different,
        }
    )
    return 1 if regressions and args.fail_on_regression else 0


def print_most_changed(comparisons: list[Any]) -> None:
    for item in comparisons:
        if not item.comparison.metrics:
            continue
        first = next(iter(item.comparison.metrics.values()))
        if first.most_changed:
            print(f"\nmost changed queries, {item.dataset}/{item.split}, {first.metric}:")
            print(format_table([{"qid": c.qid, "A": c.a, "B": c.b, "delta": c.delta} for c in first.most_changed]))


# ---------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------


def add_runs_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "runs", help="list the runs in the registry", description="One line per run and dataset split, newest last."
    )
    add_registry_argument(parser)
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--dataset", help="only this dataset")
    parser.add_argument("--last", type=int, default=20, help="show the last N lines (default 20)")
    parser.set_defaults(func=run_runs_command)


def run_runs_command(args: argparse.Namespace) -> int:
    from eval.registry import list_runs, load_registry

    frame = load_registry(args.registry)
    if args.model:
        frame = frame[frame["model"] == args.model]
    if args.dataset:
        frame = frame[frame["dataset"] == args.dataset]
    table = list_runs(frame).tail(args.last)
    rows = table.assign(time=table["time"].astype(str).str[:19]).to_dict("records") if not table.empty else []
    print(format_table(rows))
    emit_json({"runs": json.loads(table.to_json(orient="records", date_format="iso")) if rows else []})
    return 0
