"""The one retrieval interface: text queries in, a top-k run out, whatever does the retrieving.

    class Retriever(Protocol):
        def search(self, queries: Mapping[qid, text], k: int) -> Run   # {qid: {docid: score}}

Implementations:

- `retrieval.serving.bm25.BM25Retriever`               BM25 over document texts
- `ExactDenseRetriever` (here)                 exact inner-product search over corpus vectors
- `MemoryIndexRetriever` (here)                any FAISS index built in memory over the corpus vectors
- `retrieval.serving.index.IndexRetriever`             an index directory built by `retroflow index`
- `retrieval.serving.hybrid.HybridSearcher`            BM25 fused with one of the dense retrievers

A run holds at most k hits per query, best first (dict order is rank order, so callers that need
ranks, such as negative mining, read them off the run), and only real hits: FAISS's -1 padding and
BM25's zero-score padding are dropped.

Dense retrievers also offer `search_vectors(query_ids, query_vectors, k)`, for callers that
already hold query vectors or time the search apart from query encoding. Below the interface,
the exact top-k over vectors: `exact_search` for vectors in memory (FAISS's flat inner-product
index) and `exact_search_blocks` for a corpus read block by block (FAISS's `knn_ground_truth`;
the index tuner's ground truth).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

Run = dict[str, dict[str, float]]
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: Mapping[str, str], k: int) -> Run:
        """The top `k` documents of every query in `queries` ({qid: text}), best first."""
        ...


class QueryEncoder(Protocol):
    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------- vectors


def flat_index(doc_vectors: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(np.ascontiguousarray(doc_vectors, dtype=np.float32))
    return index


def exact_search(doc_vectors: np.ndarray, query_vectors: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product over all documents: (scores, indices), each (num_queries, k)."""
    return search_index(flat_index(doc_vectors), query_vectors, k, batch_size)


def exact_search_blocks(
    query_vectors: np.ndarray, blocks: Iterable[np.ndarray], k: int, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over a corpus given block by block (one that need not fit in memory): (scores,
    row indices), rows numbered across the blocks, -1 where the corpus has fewer than k rows.
    `metric` is "ip" (inner product) or "l2". FAISS's `knn_ground_truth` scans and merges the blocks."""
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    # on the CPU even where FAISS sees a GPU: the truth indexes are measured against must not move with the hardware
    scores, indices = knn_ground_truth(queries, blocks, k, METRICS[metric], ngpu=0)
    # FAISS pads a block smaller than k with score +-FLT_MAX (and, once merged, an index that looks real)
    indices[np.abs(scores) == np.finfo(np.float32).max] = -1
    return scores, indices


def search_index(index: faiss.Index, query_vectors: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row indices) from an in-memory FAISS index; k is capped at the corpus size."""
    return search_in_batches(index, query_vectors, min(k, index.ntotal), batch_size)


def search_in_batches(index: faiss.Index, query_vectors: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` a batch of queries at a time, so FAISS's per-call buffers stay bounded;
    rows past the index's size come back as FAISS pads them (index -1)."""
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


# ---------------------------------------------------------------------------------------- dense retrievers


class DenseRetriever:
    """A `Retriever` that encodes the queries and searches vectors; subclasses provide `search_vectors`."""

    encoder: QueryEncoder

    def search(self, queries: Mapping[str, str], k: int) -> Run:
        return self.search_vectors(list(queries), self.encoder.encode_queries(list(queries.values())), k)

    def search_vectors(self, query_ids: Sequence[str], query_vectors: np.ndarray, k: int) -> Run:
        raise NotImplementedError


class MemoryIndexRetriever(DenseRetriever):
    """A FAISS index built in memory over the corpus vectors, row i = `doc_ids[i]` (e.g. HNSW for mining)."""

    def __init__(self, encoder: QueryEncoder, doc_ids: Sequence[str], index: faiss.Index):
        self.encoder, self.doc_ids, self._index = encoder, list(doc_ids), index

    @property
    def index(self) -> faiss.Index:
        return self._index

    def search_vectors(self, query_ids: Sequence[str], query_vectors: np.ndarray, k: int) -> Run:
        scores, indices = search_index(self.index, query_vectors, k)
        return to_run(list(query_ids), self.doc_ids, scores, indices)


class ExactDenseRetriever(MemoryIndexRetriever):
    """Exact inner-product search over the corpus vectors: given, or encoded from `doc_texts` on first use
    (so a caller that never searches never pays for encoding the corpus)."""

    def __init__(self, encoder, doc_ids: Sequence[str], doc_vectors: np.ndarray | None = None, doc_texts: Sequence[str] | None = None):
        if doc_vectors is None and doc_texts is None:
            raise ValueError("exact dense search needs the corpus vectors or its texts to encode")
        super().__init__(encoder, doc_ids, index=None)
        self._doc_vectors, self.doc_texts = doc_vectors, doc_texts

    def doc_vectors(self) -> np.ndarray:
        if self._doc_vectors is None:
            self._doc_vectors = self.encoder.encode_passages(list(self.doc_texts))
        return self._doc_vectors

    @property
    def index(self) -> faiss.Index:
        if self._index is None:
            self._index = flat_index(self.doc_vectors())
        return self._index
