"""`retroflow encode`, `retroflow index`, `retroflow tune`, `retroflow search`: thin wrappers over the stages' `run`.

With --output each command runs its stage's `run` into that directory, its inputs built by the
`retroflow.inputs` helpers; without it, `flows.stage_cli` runs the stage into the artifact store.
The flags that name inputs (`--model`, `--dataset`, `--embeddings`, `--index`) never enter a config.

retroflow encode --model minilm --dataset scifact --output runs/scifact-minilm [--shard-size 50000]
                 [--dtype float16] [--no-merge] [--worker I --num-workers N] [--devices cuda:0,cuda:1]
retroflow index --embeddings runs/scifact-minilm --factory HNSW32 [--output DIR] [--num-shards N]
retroflow tune --index DIR [--dataset scifact --split test | --queries q.npy] [--target-recall 0.95]
               [--dev-dataset scifact --dev-fraction 0.1 [--ndcg-tolerance 0.001]]
retroflow search --index DIR --query "text" [--query ...] | --dataset D --split test --output run.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from retroflow.config import flag, load_config, required_flag
from retroflow.console import emit_json, format_table

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    _add_encode(subparsers)
    _add_index_and_tune(subparsers)
    _add_search(subparsers)


def _common(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", type=Path, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field (repeatable)")


def _overrides(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> list:
    overrides: list = list(args.set)
    for name, key in pairs:
        value = getattr(args, name, None)
        if value is not None:
            overrides.append(flag(key, value))
    return overrides


# ---------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------


def _add_encode(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="encode a corpus into sharded, resumable embeddings",
        description="Encode every passage of a BEIR corpus in fixed-size shards. Finished shards survive a "
        "kill (re-run the same command to resume). Parallel: run `--worker I --num-workers N` in N processes "
        "(or machines sharing OUTPUT), then the command without --worker to merge; or --devices cuda:0,cuda:1.",
    )
    _common(parser, "YAML EncodeConfig, e.g. configs/encode/scifact.yaml")
    parser.add_argument("--model", help="the encoder (required): alias (minilm), local HF model dir or hub id")
    parser.add_argument("--dataset", help="the corpus (required): BEIR directory, name, hf:BeIR/NAME or zip URL")
    parser.add_argument(
        "--output", type=Path, help="embeddings directory (shards go to OUTPUT/shards until merged); default: the artifact store"
    )
    parser.add_argument("--shard-size", type=int)
    parser.add_argument("--dtype", choices=["float32", "float16"])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--no-merge", action="store_true", help="keep per-shard files instead of one embeddings.npy")
    parser.add_argument("--worker", type=int, help="encode only this worker's shards (no merge)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--devices", help="comma-separated devices, one worker process each (cuda:0,cuda:1)")
    parser.set_defaults(func=run_encode_command, stage="encode", config_from_args=encode_config)


def encode_config(args: argparse.Namespace):
    from retrieval.serving.encode import EncodeConfig

    overrides = _overrides(args, [("shard_size", "shard_size"), ("dtype", "dtype"), ("batch_size", "encoder.batch_size")])
    if args.no_merge:
        overrides.append("merge=false")
    return load_config(EncodeConfig, args.config, overrides)


def run_encode_command(args: argparse.Namespace) -> int:
    from retrieval.serving.encode import META_FILE, compatibility_key, plan_shards, run, run_shards, worker_shards
    from retroflow.data import dataset_input
    from retroflow.data.beir import load_dataset
    from retroflow.inputs import model_input

    config = encode_config(args)
    dataset = load_dataset(required_flag(args, "dataset", "encode"))
    inputs = {"data": dataset_input(dataset), "model": model_input(required_flag(args, "model", "encode"))}
    out_dir, shards_dir = args.output, args.output / "shards"
    if (out_dir / META_FILE).is_file():
        existing = json.loads((out_dir / META_FILE).read_text())
        if existing.get("compat_key") != compatibility_key(config, inputs["model"], dataset):
            raise ValueError(f"{out_dir} already holds embeddings from a different model/config/dataset; choose another --output")
        print(f"{out_dir} is already complete ({existing['num_docs']} vectors)")
        emit_json({"output": str(out_dir), "num_docs": existing["num_docs"], "dim": existing["dim"], "skipped": True})
        return 0
    if args.worker is not None:
        plan = plan_shards(dataset.num_docs, config.shard_size)
        mine = worker_shards(len(plan), args.worker, args.num_workers)
        stats = run_shards(config, inputs, mine, shards_dir)
        emit_json({"output": str(shards_dir), "worker": args.worker, "num_workers": args.num_workers, **stats})
        return 0
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    metrics = run(config, inputs, out_dir, shards_dir, devices=devices)
    shutil.rmtree(shards_dir, ignore_errors=True)  # merged (or moved) into OUTPUT: drop the second copy
    print(
        format_table(
            [{k: metrics.get(k) for k in ("num_docs", "dim", "dtype", "num_shards", "shards_encoded", "shards_skipped", "docs_per_s")}]
        )
    )
    emit_json({"output": str(out_dir), **metrics})
    return 0


# ---------------------------------------------------------------------------------------
# index / tune
# ---------------------------------------------------------------------------------------


def _add_index_and_tune(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "index",
        help="train + fill a FAISS index from a factory string",
        description="Build a FAISS index (Flat, HNSW32, IVF1024,PQ48, OPQ48,IVF1024,PQ48, SQ8, ...).",
    )
    _common(build, "YAML IndexConfig, e.g. configs/index/hnsw32.yaml")
    build.add_argument("--embeddings", type=Path, required=True, help="directory written by `retroflow encode`")
    build.add_argument("--factory", help="FAISS index_factory string")
    build.add_argument("--output", type=Path, help="index directory (default: beside the embeddings, named after the factory)")
    build.add_argument("--num-shards", type=int, help="sub-indexes searched together with IndexShards")
    build.add_argument("--metric", choices=["ip", "l2"])
    build.set_defaults(func=run_index_build_command, stage="index", config_from_args=index_config)

    tune = subparsers.add_parser(
        "tune",
        help="sweep efSearch/nprobe/k_factor against exact search, keep the fastest that stays within "
        "an nDCG tolerance of exact search on dev queries (else: meeting a recall target)",
        description="Writes tune.csv, tune.json, tune.png and stores the chosen search parameters in index.json.",
    )
    _common(tune, "YAML TuneConfig, e.g. configs/tune/default.yaml")
    tune.add_argument("--index", type=Path, required=True)
    tune.add_argument("--embeddings", type=Path, help="default: the directory the index was built from")
    tune.add_argument("--queries", type=Path, help=".npy query vectors")
    tune.add_argument("--dataset", help="encode this dataset's queries (with the index's model) as tuning queries")
    tune.add_argument("--split", default="test")
    tune.add_argument("--model", help="query encoder (default: the model recorded in the index)")
    tune.add_argument("--output", type=Path, help="tuned index directory (default: tune --index in place)")
    tune.add_argument("--target-recall", type=float)
    tune.add_argument("--num-queries", type=int)
    tune.add_argument("--k", type=int)
    tune.add_argument("--dev-dataset", help="hold dev queries out of this dataset's dev_split (default train) and choose by nDCG on them")
    tune.add_argument("--dev-fraction", type=float, help="share of the dev split's queries held out (use fine-tuning's)")
    tune.add_argument("--ndcg-tolerance", type=float, help="nDCG@k the choice may lose against exact search on dev (default 0.001)")
    tune.set_defaults(func=run_index_tune_command, stage="tune", config_from_args=tune_config)


def factory_slug(factory: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", factory).strip("-").lower()


def index_config(args: argparse.Namespace):
    from retrieval.serving.index import IndexConfig

    return load_config(
        IndexConfig, args.config, _overrides(args, [("factory", "factory"), ("num_shards", "num_shards"), ("metric", "metric")])
    )


def tune_config(args: argparse.Namespace):
    from retrieval.serving.tune import TuneConfig

    flags = [
        ("target_recall", "target_recall"),
        ("num_queries", "num_queries"),
        ("k", "k"),
        ("dev_fraction", "dev_fraction"),
        ("ndcg_tolerance", "ndcg_tolerance"),
    ]
    return load_config(TuneConfig, args.config, _overrides(args, flags))


def run_index_build_command(args: argparse.Namespace) -> int:
    from retrieval.serving.index import run
    from retroflow.inputs import path_input

    config = index_config(args)
    embeddings = args.embeddings.resolve()
    out_dir = args.output or embeddings.parent / f"{embeddings.name}.index-{factory_slug(config.factory)}"
    metrics = run(config, {"embeddings": path_input(embeddings)}, out_dir, out_dir)
    print(format_table([{k: metrics[k] for k in ("factory", "ntotal", "num_shards", "bytes_per_vector", "train_seconds", "add_seconds")}]))
    emit_json({"output": str(out_dir), **metrics})
    return 0


def recorded_model(index_meta: dict[str, Any], model: str | None) -> str:
    """`model`, else the model the index's vectors came from (as `encode` recorded it)."""
    from retroflow.artifacts import resolve_artifact_label

    name = model or index_meta.get("embeddings", {}).get("model")
    if not name:
        raise ValueError("the index does not record its model: pass --model")
    return resolve_artifact_label(name)


def query_encoder(index_meta: dict[str, Any], model: str | None):
    """The encoder the index's vectors came from (same model, pooling, normalisation, prefixes)."""
    from retrieval.serving.encoder import Encoder, EncoderSettings

    settings = dict(index_meta.get("embeddings", {}).get("encoder") or {})
    settings.update({"show_progress": False, "device": "auto"})
    return Encoder(recorded_model(index_meta, model), EncoderSettings(**settings))


def _dataset_query_vectors(meta: dict[str, Any], dataset_source: str, split: str, model: str | None) -> tuple[list[str], np.ndarray]:
    from retroflow.data.beir import load_dataset

    queries = load_dataset(dataset_source).split_queries(split)
    return list(queries), query_encoder(meta, model).encode_queries(list(queries.values()))


def run_index_tune_command(args: argparse.Namespace) -> int:
    from retrieval.serving.index import read_index_meta
    from retrieval.serving.tune import run
    from retroflow.artifacts import resolve_artifact_label
    from retroflow.data import dataset_input
    from retroflow.inputs import artifact_containing, inputs_of, model_input, path_input

    config = tune_config(args)
    if args.output is None and artifact_containing(args.index) is not None:
        raise ValueError(
            f"{args.index} is a store artifact: tuning it in place would change a finished artifact; "
            "pass --output DIR (or drop --dataset/--queries: the tune stage then writes a new artifact)"
        )
    meta = read_index_meta(args.index)
    embeddings = args.embeddings or Path(resolve_artifact_label(meta["embeddings"]["path"], near=Path(args.index)))
    if args.queries:
        query_vectors = np.load(args.queries)
    elif args.dataset:
        _, query_vectors = _dataset_query_vectors(meta, args.dataset, args.split, args.model)
    else:
        query_vectors = None
    inputs = inputs_of(
        index=path_input(args.index),
        embeddings=path_input(embeddings),
        data=dataset_input(args.dev_dataset) if args.dev_dataset else None,  # dev queries: its dev hold-out
        model=model_input(recorded_model(meta, args.model)) if args.dev_dataset else None,  # encoded as the corpus was
    )
    out_dir = args.output or args.index
    metrics = run(config, inputs, out_dir, out_dir, query_vectors=query_vectors)
    print(format_table(json.loads((Path(out_dir) / "tune.json").read_text())["pareto_front"]))
    emit_json({"output": str(out_dir), "plot": str(Path(out_dir) / "tune.png"), **metrics})
    return 0


# ---------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------


def _add_search(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search an index with text queries or a dataset's queries",
        description="Encode queries with the index's model and search the index.",
    )
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--query", action="append", default=[], help="query text (repeatable)")
    parser.add_argument("--dataset", help="search every query of this dataset split instead")
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", help="query encoder (default: the model recorded in the index)")
    parser.add_argument("-k", "--k", type=int, default=10)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="search knob, e.g. nprobe=64 or efSearch=256")
    parser.add_argument("--output", type=Path, help="write the run {qid: {docid: score}} as JSON")
    parser.set_defaults(func=run_search_command)


def run_search_command(args: argparse.Namespace) -> int:
    from retrieval.serving.index import IndexRetriever, read_index_meta
    from retroflow.publish import atomic_write_text

    meta = read_index_meta(args.index)
    params = None
    if args.param:
        from retrieval.serving.index import KNOBS, parse_search_params

        params = dict(meta.get("search_params", {}))
        # an index.json from before search_params were recorded: any FAISS knob name we know
        params.update(parse_search_params(args.param, args.index, params if "search_params" in meta else KNOBS))
    if args.dataset:
        from retroflow.data.beir import load_dataset

        queries = load_dataset(args.dataset).split_queries(args.split)
    elif args.query:
        queries = {f"q{i}": text for i, text in enumerate(args.query)}
    else:
        raise ValueError("give --query TEXT (repeatable) or --dataset")
    retriever = IndexRetriever(args.index, query_encoder(meta, args.model), params=params)
    # encoded apart from the search so that queries/s times the index alone
    qids, vectors = list(queries), retriever.encoder.encode_queries(list(queries.values()))
    started = time.perf_counter()
    run = retriever.search_vectors(qids, vectors, args.k)
    seconds = time.perf_counter() - started
    if args.query:
        rows = [
            {"query": text, "rank": r + 1, "doc_id": d, "score": s}
            for qid, text in queries.items()
            for r, (d, s) in enumerate(run[qid].items())
        ]
        print(format_table(rows))
    if args.output:
        atomic_write_text(args.output, json.dumps(run))
    emit_json(
        {
            "index": str(args.index),
            "factory": meta["factory"],
            "num_queries": len(qids),
            "k": args.k,
            "search_params": params if params is not None else meta.get("search_params"),
            "queries_per_s": round(len(qids) / seconds, 1) if seconds > 0 else None,
            "top": [next(iter(run[q]), None) for q in qids[:5]],
            "output": str(args.output) if args.output else None,
        }
    )
    return 0
