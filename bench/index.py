"""Benchmark: FAISS index types against exact `Flat` search, in the same run, through retroflow's own stages.

Part 1 (scale): N x D clustered synthetic unit vectors (default 100k x 384, the size of MiniLM
vectors; real embeddings of 100k passages are not available offline here). Part 2 (real): an
embeddings directory written by `retroflow encode` (SciFact + minilm) with real query vectors,
reporting recall@10 against exact search and nDCG@10 on the qrels.

For every index: build time (train + add), bytes per vector (index file / N), the search knobs
chosen by `retroflow index tune` (fastest setting reaching the target recall@10: 0.99 for HNSW,
0.95 otherwise), recall@10 against Flat, queries/s batched (1024 per call) and single-query.

    python bench/index.py                                    # synthetic 100k x 384
    python bench/index.py --scifact-embeddings /tmp/scifact_minilm/emb --scifact-queries /tmp/scifact_minilm
    python bench/index.py --n 20000 --quick                  # smoke run

Writes bench/results/index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retroflow.artifacts import atomic_write_text  # noqa: E402
from retrieval.autotune import TuneConfig, run_tune_index  # noqa: E402
from retrieval.index import IndexConfig, load_index, run_build_index, search_loaded, search_with_index  # noqa: E402
from retrieval.shards import open_embeddings, write_embeddings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "index.json"


def synthetic_factories(n: int) -> list[str]:
    nlist = 1024 if n >= 50_000 else 256
    return [
        "Flat",
        "HNSW32",
        f"IVF{nlist},Flat",
        f"IVF{nlist},SQ8",
        f"IVF{nlist},PQ48",
        f"OPQ48,IVF{nlist},PQ48",
        f"IVF{nlist},PQ96",
        f"IVF{nlist},PQ48,Refine(SQ4)",
    ]


def real_factories(n: int) -> list[str]:
    nlist = max(16, int(round(np.sqrt(n) / 16)) * 16)  # ~sqrt(N): 64 for SciFact's 5k
    return [
        "Flat",
        "HNSW32",
        f"IVF{nlist},SQ8",
        f"IVF{nlist},PQ48",
        f"OPQ48,IVF{nlist},PQ48",
        f"IVF{nlist},PQ96",
        f"IVF{nlist},PQ48,Refine(SQ4)",
    ]


def clustered_vectors(n: int, dim: int, clusters: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around Gaussian centres (+ the same structure for held-out queries)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        x = centres[rng.integers(0, clusters, count)] + spread * rng.normal(size=(count, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n).astype(np.float32), draw(1000).astype(np.float32)


def single_query_qps(index_dir: Path, queries: np.ndarray, k: int, count: int = 200) -> float:
    loaded = load_index(index_dir, "never")
    search_loaded(loaded, queries[:5], k)  # warm-up, applies the stored params
    started = time.perf_counter()
    for row in queries[:count]:
        loaded.index.search(row[None, :], k)
    return count / (time.perf_counter() - started)


def bench_factory(factory: str, emb: Path, queries: np.ndarray, work: Path, args, train_size: int) -> dict:
    index_dir = work / factory.replace(",", "_").replace("(", "").replace(")", "")
    if factory.startswith("OPQ"):  # OPQ training cost grows with the sample; 20k is plenty for a 384x384 rotation
        train_size = min(train_size, args.opq_train_size)
    config = IndexConfig(factory=factory, train_size=train_size, opq_iterations=args.opq_iterations, gpu="never")
    built = run_build_index(config, emb, index_dir)
    target = 0.99 if factory.startswith("HNSW") else 0.95
    tune = TuneConfig(target_recall=target, num_queries=len(queries), repeats=args.repeats,
                      ef_search=[16, 32, 48, 64, 96, 128, 192, 256, 384, 512], nprobe=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                      k_factor=[1, 2, 4, 8, 16, 32], device="never")  # fmt: skip
    tuned = run_tune_index(tune, index_dir, emb, queries, index_dir)
    row = {
        "factory": factory,
        "bytes_per_vector": built["bytes_per_vector"],
        "marginal_bytes_per_vector": built.get("marginal_bytes_per_vector"),
        "train_s": built["train_seconds"],
        "add_s": built["add_seconds"],
        "build_s": built["build_seconds"],
        "target_recall": target,
        "target_met": tuned["target_met"],
        "search_params": tuned["search_params"],
        "recall@10": tuned["recall"],
        "qps_batch": tuned["qps"],
        "qps_single": round(single_query_qps(index_dir, queries, 10), 1),
        "flat_qps_in_tuner": tuned["exact_qps"],
        "pareto_front": json.loads((index_dir / "tune.json").read_text())["pareto_front"],
    }
    print(json.dumps({k: v for k, v in row.items() if k != "pareto_front"}), flush=True)
    return row


def add_ratios(rows: list[dict]) -> None:
    flat = next(r for r in rows if r["factory"] == "Flat")
    for row in rows:
        row["qps_batch_vs_flat"] = round(row["qps_batch"] / flat["qps_batch"], 2)
        row["qps_single_vs_flat"] = round(row["qps_single"] / flat["qps_single"], 2)
        row["bytes_vs_flat"] = round(row["bytes_per_vector"] / flat["bytes_per_vector"], 4)


def run_synthetic(args, work: Path) -> dict:
    started = time.perf_counter()
    docs, queries = clustered_vectors(args.n, args.dim, args.clusters, args.seed, args.spread)
    emb = write_embeddings(work / "synthetic-emb", docs, [f"s{i}" for i in range(len(docs))], model="synthetic")
    del docs
    factories = args.factories.split(";") if args.factories else synthetic_factories(args.n)
    if args.quick:
        factories = factories[:3]
    rows = [bench_factory(f, emb, queries[: args.queries], work, args, train_size=min(args.n, 100_000)) for f in factories]
    add_ratios(rows)
    return {"n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread, "queries": args.queries,
            "rows": rows, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def ndcg_at_10(index_dir: Path, query_vectors: np.ndarray, qids: list[str], qrels_source: str) -> float:
    from eval.datasets import load_dataset
    from eval.metrics import evaluate_run

    qrels = load_dataset(qrels_source).split_qrels("test")
    scores, ids = search_with_index(index_dir, query_vectors, 10, device="never")
    run = {q: {d: float(s) for d, s in zip(row_ids, row) if d is not None and d != q} for q, row_ids, row in zip(qids, ids, scores)}
    means, _ = evaluate_run(qrels, run, ["ndcg@10"])
    return round(means["ndcg@10"], 4)


def run_real(args, work: Path) -> dict:
    started = time.perf_counter()
    emb_dir = Path(args.scifact_embeddings)
    embeddings = open_embeddings(emb_dir)
    qdir = Path(args.scifact_queries)
    test_q, train_q = np.load(qdir / "queries_test.npy"), np.load(qdir / "queries_train.npy")
    test_ids = json.loads((qdir / "queries_test_ids.json").read_text())
    tune_queries = np.concatenate([test_q, train_q])  # all 1,109 SciFact queries for recall
    factories = args.real_factories.split(";") if args.real_factories else real_factories(embeddings.num_docs)
    rows = []
    for factory in factories:
        row = bench_factory(factory, emb_dir, tune_queries, work / "real", args, train_size=embeddings.num_docs)
        row["ndcg@10_test_k10"] = ndcg_at_10(work / "real" / factory.replace(",", "_").replace("(", "").replace(")", ""), test_q, test_ids, args.scifact_dataset)
        print(json.dumps({"factory": factory, "ndcg@10": row["ndcg@10_test_k10"]}), flush=True)
        rows.append(row)
    add_ratios(rows)
    flat = next(r for r in rows if r["factory"] == "Flat")
    for row in rows:
        row["ndcg@10_delta_vs_flat"] = round(row["ndcg@10_test_k10"] - flat["ndcg@10_test_k10"], 4)
    return {"embeddings": str(emb_dir), "n": embeddings.num_docs, "dim": embeddings.dim, "model": embeddings.meta.get("model"),
            "queries": len(tune_queries), "rows": rows, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.5, help="noise std per dimension, relative to the centres' (N(0,1) per dimension)")
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (1 = per-core figures; shared cores make more threads noisy)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--opq-iterations", type=int, default=10)
    parser.add_argument("--opq-train-size", type=int, default=20_000)
    parser.add_argument("--factories", help="';'-separated factory strings (synthetic part)")
    parser.add_argument("--real-factories", help="';'-separated factory strings (real part)")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--scifact-embeddings", help="embeddings directory from `retroflow encode` (SciFact)")
    parser.add_argument("--scifact-queries", help="directory with queries_{test,train}.npy and queries_test_ids.json")
    parser.add_argument("--scifact-dataset", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
    parser.add_argument("--quick", action="store_true", help="first three index types only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)

    result = {
        "benchmark": "index",
        "reference": "faiss IndexFlatIP (exact search), same run",
        "faiss": faiss.__version__,
        "machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(), "platform": platform.platform(),
                    "load_avg_at_start": os.getloadavg()},  # fmt: skip
        "recall": "k-recall@10: fraction of the exact top-10 found in the index's top-10",
    }
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        work = Path(tmp)
        result["synthetic"] = previous.get("synthetic") if args.skip_synthetic else run_synthetic(args, work)
        if args.scifact_embeddings:
            result["scifact_real"] = run_real(args, work)
        elif "scifact_real" in previous:
            result["scifact_real"] = previous["scifact_real"]
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=2, default=str))
    print(json.dumps({"output": str(args.output), "synthetic_rows": len((result.get("synthetic") or {}).get("rows", [])),
                      "real_rows": len((result.get("scifact_real") or {}).get("rows", []))}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
