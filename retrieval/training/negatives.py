"""Hard-negative mining with BM25 (`bm25s`) or a dense model (FAISS flat / HNSW), saved with provenance.

The stage is `run(config, inputs, out_dir, partial_dir)` (the contract of `flows.stages.STAGES`;
inputs `data` and, for dense mining, `model`): it writes `out_dir/negatives.jsonl` and returns
metrics. For every training query the retriever's
ranked list is cut to the rank window `[rank_start, rank_end)` (0-based ranks of the full list,
so the top `rank_start` hits are skipped as likely unlabelled positives), and every document
judged relevant to that query in *any* split is removed, as is a document whose id equals the
query id. The file's first line is a header with the provenance (method, model/index settings,
dataset fingerprint, window); each further line is `{"qid", "negatives", "scores", "ranks"}`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from retrieval.serving.bm25 import BM25Settings
from retrieval.serving.encoder import EncoderSettings
from retrieval.serving.search import Run
from retrieval.training.training_data import beir_training_set, judged_positives
from retroflow.config import StageConfig
from retroflow.inputs import Input
from retroflow.publish import atomic_write_text

log = logging.getLogger(__name__)

NEGATIVES_FILE = "negatives.jsonl"
FORMAT = "retroflow-negatives/1"


class NegativesConfig(StageConfig):
    moved_to_inputs: ClassVar[dict[str, str]] = {
        "dataset": "pass --dataset NAME|DIR (a pipeline sets it from train_dataset)",
        "model": "dense mining: pass --model ALIAS|DIR (a pipeline mines with the model it fine-tunes)",
    }

    split: str = "train"
    method: Literal["bm25", "dense"] = "bm25"  # dense: with the stage's `model` input
    rank_start: int = Field(10, ge=0, description="skip hits ranked above this (0-based)")
    rank_end: int = Field(100, ge=1, description="last rank (exclusive) taken from")
    max_negatives: int | None = Field(None, ge=1, description="keep at most this many per query (best first)")
    min_grade: int = Field(1, ge=1)
    index: Literal["flat", "hnsw"] = "flat"  # dense search: exact (FAISS flat IP) or HNSW
    hnsw_m: int = Field(32, ge=4)
    bm25: BM25Settings = Field(default_factory=BM25Settings)
    encoder: EncoderSettings = Field(default_factory=lambda: EncoderSettings(show_progress=False))

    @model_validator(mode="after")
    def _window(self) -> NegativesConfig:
        if self.rank_end <= self.rank_start:
            raise ValueError(f"rank_end ({self.rank_end}) must be larger than rank_start ({self.rank_start})")
        return self


@dataclass
class MinedNegatives:
    provenance: dict[str, Any]
    negatives: dict[str, list[str]]  # qid -> doc ids, best-ranked first
    scores: dict[str, list[float]]
    ranks: dict[str, list[int]]


# ---------------------------------------------------------------------------------------- file format


def write_negatives(path: Path, mined: MinedNegatives) -> None:
    lines = [json.dumps({"format": FORMAT, "provenance": mined.provenance})]
    for qid in mined.negatives:
        lines.append(
            json.dumps(
                {
                    "qid": qid,
                    "negatives": mined.negatives[qid],
                    "scores": [round(float(s), 6) for s in mined.scores.get(qid, [])],
                    "ranks": mined.ranks.get(qid, []),
                }
            )
        )
    atomic_write_text(Path(path), "\n".join(lines) + "\n")


def read_headed_jsonl(path: Path, expected_format: str, kind: str) -> tuple[dict[str, Any], list[tuple[int, dict]]]:
    """(provenance, [(line number, record), ...]) of a retroflow JSONL file whose line 1 names its format."""
    from retroflow.data.beir import iter_jsonl_records

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    records = list(iter_jsonl_records(path))  # errors name the file and line
    if not records:
        raise ValueError(f"{path}: empty {kind} file")
    number, header = records[0]
    if number != 1 or header.get("format") != expected_format:
        raise ValueError(f"{path}, line 1: not a retroflow {kind} file (format {header.get('format')!r})")
    return header["provenance"], records[1:]


def read_negatives(path: Path) -> MinedNegatives:
    provenance, records = read_headed_jsonl(path, FORMAT, "negatives")
    negatives, scores, ranks = {}, {}, {}
    for number, record in records:
        if "qid" not in record or not isinstance(record.get("negatives"), list):
            raise ValueError(f"{path}, line {number}: needs fields 'qid' and 'negatives' (a list)")
        qid = str(record["qid"])
        negatives[qid] = [str(d) for d in record["negatives"]]
        scores[qid] = record.get("scores", [])
        ranks[qid] = record.get("ranks", [])
    return MinedNegatives(provenance, negatives, scores, ranks)


# ---------------------------------------------------------------------------------------- selection


def select_window(
    qids: Sequence[str],
    ranked_doc_ids: Sequence[Sequence[str]],
    ranked_scores: Sequence[Sequence[float]],
    positives: Mapping[str, set[str]],
    rank_start: int,
    rank_end: int,
    max_negatives: int | None = None,
) -> tuple[dict[str, list[str]], dict[str, list[float]], dict[str, list[int]]]:
    """Keep hits with rank in [rank_start, rank_end) that are not judged positives (nor the query itself)."""
    negatives, scores, ranks = {}, {}, {}
    for qid, docs, doc_scores in zip(qids, ranked_doc_ids, ranked_scores):
        banned = positives.get(qid, set())
        kept = [
            (d, float(s), r)
            for r, (d, s) in enumerate(zip(docs, doc_scores))
            if rank_start <= r < rank_end and d is not None and d not in banned and d != qid
        ]
        if max_negatives is not None:
            kept = kept[:max_negatives]
        negatives[qid] = [d for d, _, _ in kept]
        scores[qid] = [s for _, s, _ in kept]
        ranks[qid] = [r for _, _, r in kept]
    return negatives, scores, ranks


# ---------------------------------------------------------------------------------------- retrievers


def qids_or_positions(queries: Sequence[str], qids: Sequence[str] | None) -> list[str]:
    """Ids for a retriever's {qid: text}; without them (the older calls) the positions stand in."""
    return list(qids) if qids is not None else [str(i) for i in range(len(queries))]


def ranked_lists(run: Run, qids: Sequence[str]) -> tuple[list[list[str]], list[list[float]]]:
    """A run -> each query's doc ids and scores in rank order (a retriever's run is best first)."""
    hits = [list(run.get(qid, {}).items()) for qid in qids]
    return [[d for d, _ in row] for row in hits], [[s for _, s in row] for row in hits]


def rank_bm25(
    config: NegativesConfig, doc_ids: Sequence[str], doc_texts: Sequence[str], queries: Sequence[str], qids: Sequence[str] | None = None
):
    from retrieval.serving.bm25 import BM25Retriever

    qids = qids_or_positions(queries, qids)
    run = BM25Retriever(doc_ids, doc_texts, config.bm25).search(dict(zip(qids, queries)), config.rank_end)
    return ranked_lists(run, qids)


def dense_retriever(encoder, doc_ids: Sequence[str], doc_vectors: np.ndarray, index: str = "flat", hnsw_m: int = 32, k: int = 64):
    """Exact (flat) search, or an HNSW graph over the same vectors searched at least `k` wide."""
    import faiss

    from retrieval.serving.search import ExactDenseRetriever, MemoryIndexRetriever

    if index == "flat":
        return ExactDenseRetriever(encoder, doc_ids, doc_vectors)
    hnsw = faiss.IndexHNSWFlat(doc_vectors.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efSearch = max(64, k)
    hnsw.add(np.ascontiguousarray(doc_vectors, dtype=np.float32))
    return MemoryIndexRetriever(encoder, doc_ids, hnsw)


def rank_dense(
    config: NegativesConfig, model: str | Path, doc_ids, doc_texts, queries, doc_vectors=None, qids: Sequence[str] | None = None
):
    """Encode with retroflow's Encoder (pooling as the model's sentence-transformers config says)."""
    from retrieval.serving.encoder import Encoder

    encoder = Encoder(model, config.encoder)
    if doc_vectors is None:
        doc_vectors = encoder.encode_passages(list(doc_texts))
    qids = qids_or_positions(queries, qids)
    retriever = dense_retriever(encoder, doc_ids, doc_vectors, config.index, config.hnsw_m, config.rank_end)
    ranked, scores = ranked_lists(retriever.search(dict(zip(qids, queries)), config.rank_end), qids)
    return ranked, scores, {"pooling": encoder.pooling, "normalize": encoder.normalize}


# ---------------------------------------------------------------------------------------- stage


def mine_negatives(
    config: NegativesConfig, dataset, model_path: Path | str | None = None, query_ids: Sequence[str] | None = None
) -> MinedNegatives:
    """Mine negatives for the judged queries of `config.split` (or just `query_ids`); dense mining
    encodes with `model_path`."""
    train = beir_training_set(dataset, config.split, config.min_grade, on_missing_positive="skip", query_ids=query_ids)
    qids = [ex.qid for ex in train.examples]
    queries = [ex.query for ex in train.examples]
    doc_ids, doc_texts = dataset.doc_ids(), dataset.doc_texts()
    provenance: dict[str, Any] = {
        "method": config.method,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "split": config.split,
        "rank_start": config.rank_start,
        "rank_end": config.rank_end,
        "max_negatives": config.max_negatives,
        "excluded": f"documents judged relevant (grade >= {config.min_grade}) to the query in any split; the query id itself",
    }
    if config.method == "bm25":
        ranked, scores = rank_bm25(config, doc_ids, doc_texts, queries, qids)
        provenance["index"] = {"kind": "bm25s", **config.bm25.canonical()}
    else:
        if model_path is None:
            raise ValueError("negatives: dense mining needs a model: the stage's `model` input (--model ALIAS|DIR)")
        ranked, scores, enc = rank_dense(config, model_path, doc_ids, doc_texts, queries, qids=qids)
        provenance["model"] = str(model_path)
        provenance["index"] = {"kind": f"faiss-{config.index}", "metric": "inner_product", **enc}
    negatives, kept_scores, ranks = select_window(
        qids, ranked, scores, judged_positives(dataset, config.min_grade), config.rank_start, config.rank_end, config.max_negatives
    )
    return MinedNegatives(provenance, negatives, kept_scores, ranks)


def negatives_metrics(mined: MinedNegatives) -> dict[str, Any]:
    counts = [len(v) for v in mined.negatives.values()]
    return {
        "queries": len(counts),
        "negatives": int(sum(counts)),
        "mean_per_query": float(np.mean(counts)) if counts else 0.0,
        "queries_without_negatives": int(sum(c == 0 for c in counts)),
        "method": mined.provenance["method"],
    }


def run(config: NegativesConfig, inputs: Mapping[str, Input], out_dir: Path, partial_dir: Path) -> dict:
    """The `negatives` stage: mine hard negatives for `data`'s training queries with BM25 or, for
    `method: dense`, the `model` input; write `out_dir/negatives.jsonl` (a provenance header
    first) and return metrics."""
    from retroflow.data import open_dataset
    from retroflow.inputs import model_dir

    started = time.perf_counter()
    dense_model = model_dir(inputs["model"]) if config.method == "dense" and "model" in inputs else None
    mined = mine_negatives(config, open_dataset(inputs["data"]), dense_model)
    out_dir = Path(out_dir)
    write_negatives(out_dir / NEGATIVES_FILE, mined)
    metrics = negatives_metrics(mined)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["negatives_file"] = str(out_dir / NEGATIVES_FILE)
    log.info("mined %d negatives for %d queries (%s)", metrics["negatives"], metrics["queries"], config.method)
    return metrics
