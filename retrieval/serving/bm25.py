"""BM25 baseline with `bm25s` (Lucene-style scoring, English stemmer and stopwords); a `retrieval.serving.search.Retriever`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import bm25s
import numpy as np
from pydantic import Field

from retrieval.serving.search import Run
from retroflow.config import StageConfig


class BM25Settings(StageConfig):
    """BM25 scoring and text processing; the `bm25` section of every config that uses BM25."""

    k1: float = Field(0.9, gt=0)
    b: float = Field(0.4, ge=0, le=1)
    method: str = "lucene"
    stemmer_language: str | None = "english"
    stopwords: str | None = "en"


class BM25Retriever:
    def __init__(self, doc_ids: Sequence[str], doc_texts: Sequence[str], settings: BM25Settings | None = None):
        self.settings = settings or BM25Settings()
        self.doc_ids = list(doc_ids)
        self.stemmer = self._make_stemmer()
        tokens = bm25s.tokenize(list(doc_texts), stopwords=self.settings.stopwords, stemmer=self.stemmer, show_progress=False)
        if not self.doc_ids or not tokens.vocab:
            raise ValueError(
                f"BM25 cannot index this corpus: {len(self.doc_ids)} documents and no indexable term in them "
                "(empty texts, or stopwords only); BM25 and hybrid retrieval need document text"
            )
        self.model = bm25s.BM25(k1=self.settings.k1, b=self.settings.b, method=self.settings.method)
        self.model.index(tokens, show_progress=False)

    def _make_stemmer(self):
        if not self.settings.stemmer_language:
            return None
        import Stemmer

        return Stemmer.Stemmer(self.settings.stemmer_language)

    def search_arrays(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc indices, scores), each (num_queries, k)."""
        k = min(k, len(self.doc_ids))
        tokens = bm25s.tokenize(list(queries), stopwords=self.settings.stopwords, stemmer=self.stemmer, show_progress=False)
        indices, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return np.asarray(indices), np.asarray(scores)

    def search(self, queries: Mapping[str, str], k: int) -> Run:
        """The `Retriever` search: `search({qid: text}, k)`."""
        indices, scores = self.search_arrays(list(queries.values()), k)
        run: Run = {}
        for qid, row_idx, row_scores in zip(queries, indices, scores):
            # bm25s pads with score 0 when fewer documents match: those are not hits.
            run[qid] = {self.doc_ids[j]: float(s) for j, s in zip(row_idx, row_scores) if s > 0}
        return run
