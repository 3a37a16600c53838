"""The evaluation stage: a model (dense encoder or BM25) on one dataset split -> metrics.

Plain function (`evaluate`), used by the CLI (`retroflow evaluate`) and the Prefect flows.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from eval.datasets import BeirDataset, load_dataset
from eval.metrics import DEFAULT_METRICS, evaluate_run, parse_metric
from retroflow.artifacts import atomic_write_text
from retroflow.config import StageConfig
from retrieval.bm25 import BM25Retriever, BM25Settings
from retrieval.encoder import Encoder, EncoderSettings
from retrieval.search import Run, drop_self_hits, exact_search, to_run

log = logging.getLogger(__name__)


class BM25Config(StageConfig):
    k1: float = Field(0.9, gt=0)
    b: float = Field(0.4, ge=0, le=1)
    method: str = "lucene"
    stemmer_language: str | None = "english"
    stopwords: str | None = "en"


class EvaluateConfig(StageConfig):
    model: str = "minilm"  # alias, local HF directory, hub id, or "bm25"
    dataset: str = "scifact"  # directory, name under $RETROFLOW_DATA_DIR, hf:BeIR/x, or zip URL
    split: str = "test"
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))
    top_k: int = Field(1000, ge=1, description="retrieval depth per query")
    relevance_level: int = Field(1, ge=1, description="lowest grade counted as relevant by binary metrics")
    ignore_identical_ids: bool = True
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    bm25: BM25Config = Field(default_factory=BM25Config)
    index: str | None = None  # FAISS index artifact directory; None = exact search

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        for name in names:
            parse_metric(name)
        return names


def retrieve_bm25(dataset: BeirDataset, queries: dict[str, str], config: EvaluateConfig) -> tuple[Run, dict[str, Any]]:
    started = time.perf_counter()
    retriever = BM25Retriever(dataset.doc_ids(), dataset.doc_texts(), BM25Settings(**config.bm25.canonical()))
    index_s = time.perf_counter() - started
    run = retriever.search(list(queries), list(queries.values()), config.top_k)
    return run, {"index_docs_per_s": dataset.num_docs / index_s if index_s else None}


def retrieve_dense(dataset: BeirDataset, queries: dict[str, str], config: EvaluateConfig) -> tuple[Run, dict[str, Any]]:
    encoder = Encoder(config.model, config.encoder)
    query_vectors = encoder.encode_queries(list(queries.values()))
    if config.index:
        # The index already holds the corpus vectors: only the queries are encoded.
        from retrieval.index import search_with_index

        started = time.perf_counter()
        scores, hit_ids = search_with_index(config.index, query_vectors, config.top_k)
        search_s = time.perf_counter() - started
        run = {qid: {d: float(s) for d, s in zip(ids, row) if d is not None} for qid, ids, row in zip(queries, hit_ids, scores)}
        docs_per_s = None
    else:
        doc_vectors = encoder.encode_passages(dataset.doc_texts())
        docs_per_s = encoder.last_docs_per_s
        started = time.perf_counter()
        scores, indices = exact_search(doc_vectors, query_vectors, config.top_k)
        search_s = time.perf_counter() - started
        run = to_run(list(queries), dataset.doc_ids(), scores, indices)
    return run, {
        "encode_docs_per_s": docs_per_s,
        "search_queries_per_s": len(queries) / search_s if search_s else None,
        "pooling": encoder.pooling,
        "normalize": encoder.normalize,
    }


def evaluate(config: EvaluateConfig, dataset: BeirDataset | None = None) -> dict[str, Any]:
    """Run retrieval for one dataset split and score it. Returns metrics + per-query values."""
    dataset = dataset or load_dataset(config.dataset)
    qrels = dataset.split_qrels(config.split)
    queries = dataset.split_queries(config.split)
    log.info("evaluating %s on %s/%s: %d queries, %d docs", config.model, dataset.name, config.split, len(queries), dataset.num_docs)
    started = time.perf_counter()
    if config.model == "bm25":
        run, extra = retrieve_bm25(dataset, queries, config)
    else:
        run, extra = retrieve_dense(dataset, queries, config)
    if config.ignore_identical_ids:
        run = drop_self_hits(run)
    means, per_query = evaluate_run(qrels, run, config.metrics, config.relevance_level)
    return {
        **means,
        "num_queries": len(queries),
        "num_docs": dataset.num_docs,
        "encode_docs_per_s": extra.pop("encode_docs_per_s", None),
        "model": config.model,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "split": config.split,
        "seconds": round(time.perf_counter() - started, 2),
        **extra,
        "per_query": per_query,
        "run": run,
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the bulky per-query values and run (for the JSON line and tables)."""
    return {k: v for k, v in result.items() if k not in ("per_query", "run")}


def write_result(result: dict[str, Any], path: Path, include_run: bool = False) -> None:
    payload = {k: v for k, v in result.items() if include_run or k != "run"}
    atomic_write_text(Path(path), json.dumps(payload, indent=2, default=str))
