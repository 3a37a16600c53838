"""Hybrid retrieval benchmark: BM25, a dense model and their fusions on each corpus, weight chosen without test queries.

    python bench/hybrid.py [--model minilm] [--datasets scifact trec-dl-2019-subset5k] [--pseudo-seeds 0 1]

For every corpus (under --data-dir): BM25, the dense model (exact search), min-max fusion with
the weight chosen on the dev hold-out of `train` when the corpus has one, with the weight chosen
on inverse-cloze pseudo-queries from the corpus (each --pseudo-seeds), RRF (k=60), and, for
reference only, the test-set curve over the weight grid (never used to choose). The target: a
zero-shot hybrid never more than 0.01 nDCG@10 below the better of its two parts. Writes
bench/results/hybrid.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retroflow.data.beir import load_dataset  # noqa: E402
from retroflow.metrics import evaluate_run  # noqa: E402
from retroflow.publish import atomic_write_text  # noqa: E402
from retrieval.bm25 import BM25Retriever  # noqa: E402
from retrieval.encoder import Encoder, EncoderSettings  # noqa: E402
from retrieval.hybrid import DenseSide, FusionSettings, HybridSearcher, dev_hold_out, fuse_minmax, fuse_rrf  # noqa: E402


def ndcg(qrels, run) -> float:
    return round(evaluate_run(qrels, run, ["ndcg@10"])[0]["ndcg@10"], 4)


def bench_corpus(path: Path, model: str, pseudo_seeds: list[int]) -> dict:
    dataset = load_dataset(str(path))
    split = "test" if "test" in dataset.splits else dataset.splits[0]
    encoder = Encoder(model, EncoderSettings(show_progress=False))
    texts = dataset.doc_texts()
    started = time.perf_counter()
    dense_side = DenseSide(encoder, dataset.doc_ids(), texts)
    dense_side.doc_vectors()
    encode_s = time.perf_counter() - started
    bm25 = BM25Retriever(dataset.doc_ids(), texts)
    settings = FusionSettings()
    searcher = HybridSearcher(dense_side, bm25, settings, texts)
    queries, qrels = dataset.split_queries(split), dataset.split_qrels(split)
    dense, sparse = searcher.side_runs(queries)
    out = {"split": split, "queries": len(queries), "docs": dataset.num_docs, "encode_seconds": round(encode_s, 1),
           "bm25": ndcg(qrels, sparse), "dense": ndcg(qrels, dense), "rrf_k60": ndcg(qrels, fuse_rrf(dense, sparse, 60, settings.depth)),
           "test_curve_reference_only": {str(w): ndcg(qrels, fuse_minmax(dense, sparse, w, settings.depth)) for w in settings.weight_grid}}  # fmt: skip
    held_out = dev_hold_out(dataset, settings, evaluated_split=split)
    if held_out:
        selection = searcher.select_weight(*held_out)
        out["dev"] = {"weight": selection["weight"], "selection_queries": selection["selection_queries"],
                      "test": ndcg(qrels, fuse_minmax(dense, sparse, selection["weight"], settings.depth))}  # fmt: skip
    out["pseudo"] = []
    for seed in pseudo_seeds:
        seeded = HybridSearcher(dense_side, bm25, settings.model_copy(update={"pseudo_seed": seed}), texts)
        selection = seeded.select_weight(None, None)
        out["pseudo"].append({"seed": seed, "weight": selection["weight"], "selection_queries": selection.get("selection_queries"),
                              "test": ndcg(qrels, fuse_minmax(dense, sparse, selection["weight"], settings.depth))})  # fmt: skip
    better = max(out["bm25"], out["dense"])
    out["zero_shot_worst_delta_vs_better_part"] = round(min(p["test"] for p in out["pseudo"]) - better, 4) if out["pseudo"] else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--datasets", nargs="+", default=["scifact", "trec-dl-2019-subset5k"])
    parser.add_argument("--pseudo-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/hybrid.json")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {"model": args.model, "commit": commit, "command": "python bench/hybrid.py " + " ".join(argv or sys.argv[1:]), "corpora": {}}
    for name in args.datasets:
        report["corpora"][name] = bench_corpus(args.data_dir / name, args.model, args.pseudo_seeds)
        atomic_write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps({n: {k: v for k, v in r.items() if k != "test_curve_reference_only"} for n, r in report["corpora"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
