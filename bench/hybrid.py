"""Hybrid retrieval benchmark: is the zero-shot fusion weight safe on real queries?

    python bench/hybrid.py [--models minilm DIR ...] [--datasets scifact trec-dl-2019-subset5k]
                           [--variants real keywords] [--pseudo-seeds 0 1 2] [--cache DIR] [--curves DIR]

For every dense model x corpus x query variant: real-query nDCG@10 (test split) of BM25, the
dense model (exact search), the hybrid at the weight `HybridSearcher.select_weight` chooses on
pseudo-queries (zero-shot: no dev queries, even on SciFact) for each --pseudo-seeds, the hybrid
at the weight chosen on SciFact's dev hold-out (where there is one), and, for reference only,
the best weight on test (never used to choose). For comparison it also reports what the
previous rule (plain argmax of the pseudo-query curve) would have picked from the same
pseudo-queries. The target: the zero-shot hybrid never more than 0.01 nDCG@10 below the better
of its two parts, in every seed, and where fusion helps at least 80% of the best test weight's
gain over that better part.

Query variants: `real` = the corpus's test queries; `keywords` = each real query cut to 2-3 of
its content words (seeded) -- a STRESS TEST standing in for short keyword-style query sets we
do not hold, not a real corpus.

Corpus and query vectors are cached per model under --cache (text hash -> vector), so re-runs
and the pseudo-queries' repeated texts are encoded once. --curves saves every per-query
nDCG@10 x weight matrix (pseudo and real) as .npz for offline analysis of selection rules.
Writes bench/results/hybrid.json with the command and commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.provenance import shown_command, shown_path  # noqa: E402
from retrieval.serving.bm25 import BM25Retriever  # noqa: E402
from retrieval.serving.encoder import Encoder, EncoderSettings  # noqa: E402
from retrieval.serving.hybrid import FusionSettings, HybridSearcher, content_words, curve_matrix, dev_hold_out, fuse_rrf  # noqa: E402
from retrieval.serving.search import ExactDenseRetriever  # noqa: E402
from retroflow.data.beir import load_dataset  # noqa: E402
from retroflow.metrics import evaluate_run  # noqa: E402
from retroflow.publish import atomic_write_text  # noqa: E402

TOLERANCE, GAIN_KEPT = 0.01, 0.8


class CachedEncoder:
    """An Encoder whose outputs are kept on disk by text hash: one chunk file per call that
    encoded something new, so concurrent or interrupted runs never corrupt the cache."""

    def __init__(self, encoder: Encoder, root: Path):
        self.encoder, self.root = encoder, root
        root.mkdir(parents=True, exist_ok=True)
        self.vectors: dict[str, dict[str, np.ndarray]] = {"q": {}, "p": {}}
        for chunk in sorted(root.glob("[qp]-*.npz")):
            with np.load(chunk) as z:
                self.vectors[chunk.name[0]].update(zip(z["keys"].tolist(), z["vecs"]))

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def _encode(self, kind: str, texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        known = self.vectors[kind]
        missing = dict((k, t) for k, t in zip(keys, texts) if k not in known)
        if missing:
            encode = self.encoder.encode_queries if kind == "q" else self.encoder.encode_passages
            fresh = encode(list(missing.values()))
            known.update(zip(missing, fresh))
            tmp = self.root / f".{uuid.uuid4().hex}.npz"
            np.savez(tmp, keys=np.array(list(missing)), vecs=fresh)
            os.replace(tmp, self.root / f"{kind}-{uuid.uuid4().hex}.npz")
        if not keys:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        return np.stack([known[k] for k in keys]).astype(np.float32)

    def encode_queries(self, texts) -> np.ndarray:
        return self._encode("q", list(texts))

    def encode_passages(self, texts) -> np.ndarray:
        return self._encode("p", list(texts))


def keyword_queries(queries: dict[str, str]) -> dict[str, str]:
    """Each query cut to 2-3 of its content words, in order (seeded by the query id)."""
    out = {}
    for qid, text in queries.items():
        words = content_words(text)
        if len(words) <= 2:
            out[qid] = " ".join(words) or text
            continue
        rng = random.Random(int(hashlib.sha1(qid.encode()).hexdigest()[:8], 16))
        out[qid] = " ".join(words[i] for i in sorted(rng.sample(range(len(words)), rng.randint(2, 3))))
    return out


def argmax_weight(scores: np.ndarray, grid: list[float]) -> float:
    means = scores.mean(axis=0)
    return max(zip(grid, means), key=lambda wv: (round(float(wv[1]), 6), wv[0]))[0]


def model_key(model: str) -> str:
    return Path(model).name if model in ("minilm",) else hashlib.sha1(str(Path(model).resolve()).encode()).hexdigest()[:10]


def bench_model_corpus(model: str, encoder: CachedEncoder, path: Path, variants: list[str], seeds: list[int], curves: Path | None) -> dict:
    dataset = load_dataset(str(path))
    ids, texts = dataset.doc_ids(), dataset.doc_texts()
    started = time.perf_counter()
    dense_side = ExactDenseRetriever(encoder, ids, doc_vectors=encoder.encode_passages(texts))
    bm25 = BM25Retriever(ids, texts)
    settings = FusionSettings()
    grid, depth = settings.weight_grid, settings.depth
    out: dict = {"docs": dataset.num_docs, "pseudo": [], "variants": {}}

    selections = []
    for seed in seeds:
        searcher = HybridSearcher(dense_side, bm25, settings.model_copy(update={"pseudo_seed": seed}), texts)
        pseudo, qids, scores = searcher.pseudo_curves()
        selection = searcher.select_on_pseudo_queries((pseudo, qids, scores))
        sentence_only = np.array([pseudo.styles[q] == "sentence" for q in qids])
        previous = argmax_weight(scores[sentence_only], grid) if sentence_only.any() else None
        selections.append((seed, selection, previous))
        out["pseudo"].append(
            {
                "seed": seed,
                "weight": selection["weight"],
                "reason": selection["reason"],
                "queries": selection.get("selection_queries"),
                "documents": selection.get("pseudo_documents"),
                "pseudo_dense": selection.get("selection_dense_ndcg@10"),
                "pseudo_bm25": selection.get("selection_bm25_ndcg@10"),
                "pseudo_at_weight": selection.get("selection_ndcg@10"),
                "argmax_all_styles": argmax_weight(scores, grid) if qids else None,
                "argmax_sentences_previous_rule": previous,
            }
        )
        if curves is not None and qids:
            np.savez(
                curves / f"{model_key(model)}-{path.name}-pseudo-{seed}.npz",
                scores=scores,
                grid=np.array(grid),
                clusters=np.array([pseudo.source[q] for q in qids]),
                styles=np.array([pseudo.styles[q] for q in qids]),
            )

    split = "test" if "test" in dataset.splits else dataset.splits[0]
    held_out = dev_hold_out(dataset, settings, evaluated_split=split)
    for variant in variants:
        queries, qrels = dataset.split_queries(split), dataset.split_qrels(split)
        if variant == "keywords":
            queries = keyword_queries(queries)
        searcher = HybridSearcher(dense_side, bm25, settings, texts)
        dense, sparse = searcher.side_runs(queries)
        qids, scores = curve_matrix(dense, sparse, qrels, grid, depth)
        if curves is not None:
            np.savez(curves / f"{model_key(model)}-{path.name}-{variant}.npz", scores=scores, grid=np.array(grid))
        at = {w: round(float(v), 4) for w, v in zip(grid, scores.mean(axis=0))}
        bm25_score, dense_score = at[0.0], at[1.0]
        better = max(bm25_score, dense_score)
        best_w = max(at, key=lambda w: (at[w], w))
        rrf = evaluate_run(qrels, fuse_rrf(dense, sparse, settings.rrf_k, depth), ["ndcg@10"])[0]["ndcg@10"]
        row = {
            "queries": len(qids),
            "example_query": next(iter(queries.values())),
            "bm25": bm25_score,
            "dense": dense_score,
            "rrf_k60": round(rrf, 4),
            "best_test_weight_reference_only": {
                "weight": best_w,
                "ndcg@10": at[best_w],
                "gain_over_better_part": round(at[best_w] - better, 4),
            },
            "zero_shot": [
                {
                    "seed": seed,
                    "weight": sel["weight"],
                    "ndcg@10": at[sel["weight"]],
                    "delta_vs_better_part": round(at[sel["weight"]] - better, 4),
                    "previous_rule_weight": prev,
                    "previous_rule_delta": round(at[prev] - better, 4) if prev is not None else None,
                }
                for seed, sel, prev in selections
            ],
        }
        deltas = [z["delta_vs_better_part"] for z in row["zero_shot"]]
        gain = at[best_w] - better
        row["zero_shot_worst_delta"] = min(deltas)
        row["zero_shot_within_tolerance"] = min(deltas) >= -TOLERANCE
        row["zero_shot_gain_kept"] = round(min(deltas) / gain, 3) if gain > TOLERANCE else None
        if held_out and variant == "real":
            dev_queries, dev_qrels = held_out
            selection = searcher.select_weight(dev_queries, dev_qrels)
            if curves is not None:
                dev_ids, dev_scores = curve_matrix(*searcher.side_runs(dev_queries), dev_qrels, grid, depth)
                np.savez(
                    curves / f"{model_key(model)}-{path.name}-dev.npz", scores=dev_scores, grid=np.array(grid), clusters=np.array(dev_ids)
                )
            row["dev"] = {
                "weight": selection["weight"],
                "queries": selection["selection_queries"],
                "ndcg@10": at[selection["weight"]],
                "delta_vs_better_part": round(at[selection["weight"]] - better, 4),
            }
        out["variants"][variant] = row
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm"])
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--datasets", nargs="+", default=["scifact", "trec-dl-2019-subset5k"])
    parser.add_argument("--variants", nargs="+", choices=["real", "keywords"], default=["real", "keywords"])
    parser.add_argument("--pseudo-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/retroflow-hybrid-cache"))
    parser.add_argument("--curves", type=Path, default=None, help="save per-query curves (.npz) here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cores are shared)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/hybrid.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.curves:
        args.curves.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(
        subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    )
    report = {
        "command": shown_command("hybrid.py", sys.argv[1:] if argv is None else argv),
        "commit": commit + ("-dirty" if dirty else ""),
        "settings": FusionSettings().model_dump(exclude={"weight_grid"}),
        "tolerance": TOLERANCE,
        "results": {},
    }
    for model in args.models:
        encoder = CachedEncoder(Encoder(model, EncoderSettings(show_progress=False)), args.cache / model_key(model))
        for name in args.datasets:
            report["results"][f"{shown_path(model) if model.startswith('/') else model} | {name}"] = bench_model_corpus(
                model, encoder, args.data_dir / name, args.variants, args.pseudo_seeds, args.curves
            )
            atomic_write_text(args.out, json.dumps(report, indent=2))
    summary = {
        k: {
            v: (
                r["bm25"],
                r["dense"],
                [z["weight"] for z in r["zero_shot"]],
                r["zero_shot_worst_delta"],
                r["best_test_weight_reference_only"],
            )
            for v, r in res["variants"].items()
        }
        for k, res in report["results"].items()
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
