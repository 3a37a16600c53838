"""Hybrid retrieval: BM25 fused with a dense model's ranking.

    fuse(dense_run, bm25_run, settings, weight) -> Run
    choose_weight(dense_run, bm25_run, qrels, settings) -> (weight, {weight: nDCG@10})
    pseudo_queries(doc_ids, doc_texts, count, seed) -> PseudoQueries
    HybridSearcher(dense, bm25, settings, doc_texts).search(queries, k, weight=None) -> Run
        a `retrieval.search.Retriever`; `dense` is any dense retriever (`DenseSide` picks one)

Two fusions, each over every query's top `depth` from both sides:

- `minmax` (default): each side's scores are min-max normalised over that query's top `depth`
  (best 1, `depth`-th 0) and combined as `w * dense + (1 - w) * bm25`. A document one side did
  not retrieve gets 0 on that side, i.e. it counts as no better than that side's last retrieved
  document. A query one side returns nothing for keeps the other side's ranking.
- `rrf`: reciprocal rank fusion, `sum 1 / (k + rank)` with ranks from 1; no weight.

The dense weight `w` is never chosen on the evaluated queries. `choose_weight` picks it on
queries with judgments the model was not trained on (a dev hold-out of the training split);
on a corpus without any, `pseudo_queries` builds inverse-cloze queries from the corpus itself
(a sentence taken out of a document is the query, the rest of that document its only positive),
so the choice reflects how well each side works *on this corpus*. The grid includes 0 and 1, so
when fusing does not help on the selection queries the hybrid falls back to the better single
system.

The fusion is a few lines of numpy-free Python over the run dictionaries; ranx offers the same
fusions but brings numba and its compile time for nothing we need here.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from pydantic import Field, field_validator

from retroflow.config import StageConfig
from retrieval.search import DenseRetriever, Run, drop_self_hits

HYBRID_PREFIX = "hybrid:"
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))
SELECTION_METRIC = "ndcg@10"


class FusionSettings(StageConfig):
    """How a hybrid system fuses BM25 with a dense model; the `fusion` section of evaluate/teacher configs."""

    method: Literal["minmax", "rrf"] = "minmax"
    weight: float | None = Field(None, ge=0, le=1, description="dense weight of minmax fusion; None = chosen on "
                                 "dev queries (else on pseudo-queries from the corpus)")  # fmt: skip
    rrf_k: int = Field(60, ge=1)
    depth: int = Field(100, ge=1, description="top-N per query taken from each side")
    weight_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID))
    dev_split: str = Field("train", description="split whose dev hold-out chooses the weight")
    dev_fraction: float = Field(0.1, gt=0, lt=1, description="must match fine-tuning's, so dev queries stay unseen")
    dev_seed: int = 0
    pseudo_queries: int = Field(300, ge=10, description="inverse-cloze queries drawn when there are no dev queries")
    pseudo_seed: int = 0

    @field_validator("weight_grid")
    @classmethod
    def _grid_in_range(cls, grid: list[float]) -> list[float]:
        if not grid:
            raise ValueError("weight_grid is empty")
        bad = [w for w in grid if not 0 <= w <= 1]
        if bad:
            raise ValueError(f"weights must lie in [0, 1], got {bad}")
        return sorted(set(grid))


# ---------------------------------------------------------------------------------------- fusion


def top_hits(hits: Mapping[str, float], depth: int) -> list[tuple[str, float]]:
    return sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]


def minmax_scores(hits: Mapping[str, float], depth: int) -> dict[str, float]:
    ranked = top_hits(hits, depth)
    if not ranked:
        return {}
    best, worst = ranked[0][1], ranked[-1][1]
    spread = best - worst
    return {doc: (score - worst) / spread if spread > 0 else 1.0 for doc, score in ranked}


def fuse_minmax(dense: Run, bm25: Run, weight: float, depth: int = 100) -> Run:
    if not 0 <= weight <= 1:
        raise ValueError(f"fusion weight must lie in [0, 1], got {weight}")
    fused: Run = {}
    for qid in dense.keys() | bm25.keys():
        d = minmax_scores(dense.get(qid, {}), depth)
        b = minmax_scores(bm25.get(qid, {}), depth)
        fused[qid] = {doc: weight * d.get(doc, 0.0) + (1 - weight) * b.get(doc, 0.0) for doc in d.keys() | b.keys()}
    return fused


def fuse_rrf(dense: Run, bm25: Run, k: int = 60, depth: int = 100) -> Run:
    fused: Run = {}
    for qid in dense.keys() | bm25.keys():
        scores: dict[str, float] = {}
        for run in (dense, bm25):
            for rank, (doc, _) in enumerate(top_hits(run.get(qid, {}), depth), start=1):
                scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
        fused[qid] = scores
    return fused


def fuse(dense: Run, bm25: Run, settings: FusionSettings, weight: float | None = None) -> Run:
    if settings.method == "rrf":
        return fuse_rrf(dense, bm25, settings.rrf_k, settings.depth)
    chosen = settings.weight if weight is None else weight
    if chosen is None:
        raise ValueError("minmax fusion needs a weight (set fusion.weight or choose one with choose_weight)")
    return fuse_minmax(dense, bm25, chosen, settings.depth)


def choose_weight(dense: Run, bm25: Run, qrels: Mapping[str, Mapping[str, int]], settings: FusionSettings) -> tuple[float, dict[float, float]]:
    """The grid weight with the best nDCG@10 on `qrels`' queries; ties go to the larger dense weight."""
    from retroflow.metrics import evaluate_run

    if not qrels:
        raise ValueError("no selection queries to choose the fusion weight on")
    by_weight = {}
    for w in settings.weight_grid:
        by_weight[w] = evaluate_run(qrels, fuse_minmax(dense, bm25, w, settings.depth), [SELECTION_METRIC])[0][SELECTION_METRIC]
    best = max(by_weight.items(), key=lambda kv: (round(kv[1], 6), kv[0]))[0]
    return best, by_weight


# ---------------------------------------------------------------------------------------- pseudo-queries

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 5, 40


@dataclass
class PseudoQueries:
    """Inverse-cloze selection queries: `queries[q]` was cut out of document `qrels[q]`,
    whose remaining text is `remainders[doc]` (what both sides must retrieve it by)."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    remainders: dict[str, str]


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def pseudo_queries(doc_ids: Sequence[str], doc_texts: Sequence[str], count: int, seed: int = 0) -> PseudoQueries:
    """Up to `count` (query, document) pairs: a sentence of 5-40 words from a document of two or
    more sentences is the query; the document without it is the positive. Seeded."""
    order = list(range(len(doc_ids)))
    random.Random(seed).shuffle(order)
    rng = random.Random(seed + 1)
    queries, qrels, remainders = {}, {}, {}
    for i in order:
        if len(queries) >= count:
            break
        sentences = split_sentences(doc_texts[i])
        if len(sentences) < 2:
            continue
        usable = [j for j, s in enumerate(sentences) if MIN_QUERY_WORDS <= len(s.split()) <= MAX_QUERY_WORDS]
        if not usable:
            continue
        j = rng.choice(usable)
        qid = f"pseudo-{len(queries)}"
        queries[qid] = sentences[j]
        qrels[qid] = {doc_ids[i]: 1}
        remainders[doc_ids[i]] = " ".join(s for k, s in enumerate(sentences) if k != j)
    return PseudoQueries(queries, qrels, remainders)


# ---------------------------------------------------------------------------------------- searcher


def DenseSide(encoder, doc_ids: Sequence[str], doc_texts: Sequence[str] | None = None, *,
              index: str | None = None, doc_vectors=None) -> DenseRetriever:  # fmt: skip
    """The hybrid's dense side: the FAISS index directory `index` when given, else exact search over
    `doc_vectors` (or over the texts, encoded on first use). Kept under its old name for its callers."""
    from retrieval.search import ExactDenseRetriever

    if index:
        from retrieval.index import IndexRetriever

        return IndexRetriever(index, encoder)
    return ExactDenseRetriever(encoder, doc_ids, doc_vectors=doc_vectors, doc_texts=doc_texts)


class HybridSearcher:
    """BM25 + a dense retriever over the same corpus, fused as `settings` says; a `Retriever`.
    `select_weight` picks the dense weight without test queries."""

    def __init__(self, dense: DenseRetriever, bm25, settings: FusionSettings, doc_texts: Sequence[str], bm25_settings=None):
        self.dense, self.bm25, self.settings = dense, bm25, settings
        self.doc_texts, self.bm25_settings = doc_texts, bm25_settings

    @property
    def doc_ids(self) -> list[str]:
        return self.bm25.doc_ids

    def side_runs(self, queries: Mapping[str, str]) -> tuple[Run, Run]:
        """Each side's top `settings.depth`, self-hits dropped so that they take no fusion slot."""
        depth = self.settings.depth
        return drop_self_hits(self.dense.search(queries, depth)), drop_self_hits(self.bm25.search(queries, depth))

    def search(self, queries: Mapping[str, str], k: int, weight: float | None = None) -> Run:
        """The fused top `k` per query; `weight` (minmax) defaults to `settings.weight`."""
        if isinstance(k, float):  # the old search(queries, weight): refuse rather than read a weight as a depth
            raise TypeError("HybridSearcher.search(queries, k, weight=None): pass the fusion weight by keyword")
        fused = fuse(*self.side_runs(queries), self.settings, weight)
        return {qid: dict(top_hits(fused.get(qid, {}), k)) for qid in queries}

    def select_weight(self, dev_queries: Mapping[str, str] | None, dev_qrels: Mapping[str, Mapping[str, int]] | None,
                      dev_runs: tuple[Run, Run] | None = None) -> dict:  # fmt: skip
        """{'weight', 'chosen_on', 'selection_queries', 'by_weight', ...}: from fusion.weight, the dev
        queries when given (`dev_runs`: their (dense, bm25) runs when the caller already has them),
        else inverse-cloze pseudo-queries from the corpus."""
        s = self.settings
        if s.method == "rrf":
            return {"method": "rrf", "rrf_k": s.rrf_k, "weight": None, "chosen_on": "none (rrf has no weight)"}
        if s.weight is not None:
            return {"method": "minmax", "weight": s.weight, "chosen_on": "fixed (fusion.weight)"}
        if dev_queries:
            dense, bm25 = dev_runs or self.side_runs(dev_queries)
            chosen_on = "dev"
            qrels = dev_qrels
        else:
            pseudo = pseudo_queries(self.doc_ids, self.doc_texts, s.pseudo_queries, s.pseudo_seed)
            if not pseudo.queries:
                return {"method": "minmax", "weight": 1.0, "chosen_on": "fallback to dense (no sentence-split documents for pseudo-queries)"}
            dense, bm25 = self.pseudo_runs(pseudo)
            chosen_on, qrels = "pseudo-queries", pseudo.qrels
        weight, by_weight = choose_weight(dense, bm25, qrels, s)
        return {"method": "minmax", "weight": weight, "chosen_on": chosen_on, "selection_queries": len(qrels),
                "selection_ndcg@10": round(by_weight[weight], 4), "selection_dense_ndcg@10": round(by_weight.get(1.0, float("nan")), 4),
                "selection_bm25_ndcg@10": round(by_weight.get(0.0, float("nan")), 4),
                "by_weight": {str(w): round(v, 4) for w, v in by_weight.items()}}  # fmt: skip

    def pseudo_runs(self, pseudo: PseudoQueries) -> tuple[Run, Run]:
        """Both sides' runs for the pseudo-queries, each searching the corpus in which the
        queries' documents have lost the sentence that became their query."""
        from retrieval.bm25 import BM25Retriever

        depth = self.settings.depth
        changed_ids = list(pseudo.remainders)
        texts = [pseudo.remainders.get(d, t) for d, t in zip(self.doc_ids, self.doc_texts)]
        bm25_run = BM25Retriever(self.doc_ids, texts, self.bm25_settings).search(pseudo.queries, depth)
        query_vectors = self.dense.encoder.encode_queries(list(pseudo.queries.values()))
        dense_run = self.dense.search_vectors(list(pseudo.queries), query_vectors, depth)
        # the changed documents' vectors in the corpus still hold the query sentence: rescore them
        changed_vectors = self.dense.encoder.encode_passages([pseudo.remainders[d] for d in changed_ids])
        changed_scores = query_vectors @ changed_vectors.T
        changed = set(changed_ids)
        for row, qid in enumerate(pseudo.queries):
            hits = {d: s for d, s in dense_run[qid].items() if d not in changed}
            hits.update({d: float(v) for d, v in zip(changed_ids, changed_scores[row])})
            dense_run[qid] = dict(top_hits(hits, depth))
        return dense_run, bm25_run


def dev_hold_out(dataset, settings: FusionSettings, evaluated_split: str | None = None) -> tuple[dict[str, str], dict[str, dict[str, int]]] | None:
    """(queries, qrels) of the dev hold-out of `settings.dev_split`, or None when the dataset has no such split."""
    from retrieval.training_data import dev_split

    if settings.dev_split not in dataset.splits or settings.dev_split == evaluated_split:
        return None
    qrels = dataset.split_qrels(settings.dev_split)
    judged = {q: g for q, g in qrels.items() if any(v >= 1 for v in g.values())}
    _, dev = dev_split(judged, settings.dev_fraction, settings.dev_seed)
    if not dev:
        raise ValueError(
            f"fusion: the dev hold-out of {dataset.name} split '{settings.dev_split}' is empty "
            f"({len(judged)} judged queries x fusion.dev_fraction {settings.dev_fraction} rounds to 0); "
            "raise fusion.dev_fraction or set fusion.weight"
        )
    texts = dataset.split_queries(settings.dev_split)
    return {q: texts[q] for q in dev}, {q: judged[q] for q in dev}
