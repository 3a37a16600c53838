"""Exact inner-product search with FAISS and the `{qid: {docid: score}}` run format.

ANN indexes (HNSW, IVF-PQ, OPQ) live in `retrieval.index`; this module is the exact
reference they are measured against.
"""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np

Run = dict[str, dict[str, float]]


def exact_search(doc_vectors: np.ndarray, query_vectors: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product over all documents: (scores, indices), each (num_queries, k)."""
    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(np.ascontiguousarray(doc_vectors, dtype=np.float32))
    return search_index(index, query_vectors, k, batch_size)


def search_index(index: "faiss.Index", query_vectors: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, index.ntotal)
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    scores = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        s, i = index.search(queries[start : start + batch_size], k)
        scores[start : start + batch_size], indices[start : start + batch_size] = s, i
    return scores, indices


def to_run(query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray, indices: np.ndarray) -> Run:
    """Search output -> BEIR-style run; FAISS's -1 padding (fewer hits than k) is skipped."""
    run: Run = {}
    for qid, row_scores, row_indices in zip(query_ids, scores, indices):
        run[qid] = {doc_ids[j]: float(s) for s, j in zip(row_scores, row_indices) if j >= 0}
    return run


def drop_self_hits(run: Run) -> Run:
    """BEIR ignores a document whose id equals the query id (ArguAna, Quora); so do we."""
    return {qid: {d: s for d, s in hits.items() if d != qid} for qid, hits in run.items()}
