"""Hybrid retrieval: BM25 fused with a dense model's ranking.

    fuse(dense_run, bm25_run, settings, weight) -> Run
    choose_weight(dense_run, bm25_run, qrels, settings) -> (weight, {weight: nDCG@10})
    pseudo_queries(doc_ids, doc_texts, count, seed, styles, keep_fraction) -> PseudoQueries
    guarded_weight(scores, clusters, grid, margin, confidence, styles) -> {'weight', 'reason', ...}
    HybridSearcher(dense, bm25, settings, doc_texts).search(queries, k, weight=None) -> Run
        a `retrieval.serving.search.Retriever`; `dense` is any dense retriever (`dense_side` picks one)

Two fusions, each over every query's top `depth` from both sides:

- `minmax` (default): each side's scores are min-max normalised over that query's top `depth`
  (best 1, `depth`-th 0) and combined as `w * dense + (1 - w) * bm25`. A document one side did
  not retrieve gets 0 on that side, i.e. it counts as no better than that side's last retrieved
  document. A query one side returns nothing for keeps the other side's ranking.
- `rrf`: reciprocal rank fusion, `sum 1 / (k + rank)` with ranks from 1; no weight.

The dense weight `w` is never chosen on the evaluated queries. `choose_weight` picks it on
queries with judgments the model was not trained on (a dev hold-out of the training split). On
a corpus without any, `pseudo_queries` cuts a sentence out of documents drawn across the corpus
(Inverse Cloze Task: the rest of the document is the positive) and writes it as keywords, a
phrase and the whole sentence, and `guarded_weight` keeps the dense model alone unless some
weight beats it beyond the bootstrap noise and a margin in *every* style: pseudo-queries cannot
know how the users' queries look, and they lean to BM25 (docs/evaluation.md has the
measurements). Too few usable documents: dense alone, with the reason logged.

The fusion is a few lines of plain Python over the run dictionaries; ranx offers the same
fusions but brings numba and its compile time for nothing we need here.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from retrieval.serving.search import DenseRetriever, Run, drop_self_hits
from retroflow.config import StageConfig
from retroflow.data.splits import dev_split

log = logging.getLogger(__name__)

HYBRID_PREFIX = "hybrid:"
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))
SELECTION_METRIC = "ndcg@10"
PseudoStyle = Literal["keywords", "phrase", "sentence"]
DEFAULT_STYLES = ("keywords", "keywords", "phrase", "sentence")


class FusionSettings(StageConfig):
    """How a hybrid system fuses BM25 with a dense model; the `fusion` section of evaluate/teacher configs."""

    method: Literal["minmax", "rrf"] = "minmax"
    weight: float | None = Field(
        None, ge=0, le=1, description="dense weight of minmax fusion; None = chosen on dev queries (else on pseudo-queries from the corpus)"
    )
    rrf_k: int = Field(60, ge=1)
    depth: int = Field(100, ge=1, description="top-N per query taken from each side")
    weight_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID))
    dev_split: str = Field("train", description="split whose dev hold-out chooses the weight")
    dev_fraction: float = Field(0.1, gt=0, lt=1, description="must match fine-tuning's, so dev queries stay unseen")
    dev_seed: int = 0
    pseudo_queries: int = Field(300, ge=10, description="documents pseudo-queries are cut from when there are no dev queries")
    pseudo_styles: list[PseudoStyle] = Field(
        default_factory=lambda: list(DEFAULT_STYLES), min_length=1, description="the queries written from each cut sentence"
    )
    pseudo_keep_fraction: float = Field(0.1, ge=0, le=1, description="share of documents that keep their query sentence")
    pseudo_seed: int = 0
    min_pseudo_documents: int = Field(30, ge=1, description="fewer usable documents: dense alone, no choice")
    pseudo_margin: float = Field(0.005, ge=0, description="the nDCG@10 gain over dense alone a pseudo-query choice must clear")
    pseudo_confidence: float = Field(0.95, gt=0.5, lt=1, description="...at this bootstrap confidence")

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


def choose_weight(
    dense: Run, bm25: Run, qrels: Mapping[str, Mapping[str, int]], settings: FusionSettings
) -> tuple[float, dict[float, float]]:
    """The grid weight with the best nDCG@10 on `qrels`' queries; ties go to the larger dense weight."""
    from retroflow.metrics import evaluate_run

    if not qrels:
        raise ValueError("no selection queries to choose the fusion weight on")
    by_weight = {}
    for w in settings.weight_grid:
        by_weight[w] = evaluate_run(qrels, fuse_minmax(dense, bm25, w, settings.depth), [SELECTION_METRIC])[0][SELECTION_METRIC]
    best = max(by_weight.items(), key=lambda kv: (round(kv[1], 6), kv[0]))[0]
    return best, by_weight


def curve_matrix(
    dense: Run, bm25: Run, qrels: Mapping[str, Mapping[str, int]], grid: Sequence[float], depth: int
) -> tuple[list[str], np.ndarray]:
    """(query ids, their nDCG@10 at every grid weight): queries x weights."""
    from retroflow.metrics import evaluate_run

    qids = list(qrels)
    scores = np.empty((len(qids), len(grid)))
    for j, w in enumerate(grid):
        per_query = evaluate_run(qrels, fuse_minmax(dense, bm25, w, depth), [SELECTION_METRIC])[1][SELECTION_METRIC]
        scores[:, j] = [per_query[q] for q in qids]
    return qids, scores


def guarded_weight(
    scores: np.ndarray,
    clusters: Sequence[str],
    grid: Sequence[float],
    margin: float,
    confidence: float = 0.95,
    styles: Sequence[str] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """The dense weight pseudo-queries justify, anchored on the dense model alone.

    `scores` is queries x grid weights (nDCG@10), `clusters` each query's source document (queries
    cut from one document are not independent, so the bootstrap resamples documents), `styles`
    each query's style (None: one style). A weight other than the dense model's own (the grid's
    largest) is eligible only when, in *every* style, the paired bootstrap's lower `1 - confidence`
    quantile of its gain over dense alone exceeds `margin`; the eligible weight with the highest
    such bound over its worst style wins (the gain most sure to be real whatever the users' queries
    look like), ties going to the weight nearest the better single system. None eligible: dense
    alone. Why dense is the anchor and why every style must agree: docs/evaluation.md."""
    grid = list(grid)
    anchor, bm25_only = int(np.argmax(grid)), int(np.argmin(grid))
    labels = np.asarray(styles) if styles is not None else np.zeros(len(scores), dtype=int)
    groups, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    # how often each document is drawn in each resample: resamples x documents
    draws = np.random.default_rng(seed).multinomial(len(groups), np.full(len(groups), 1 / len(groups)), size=resamples)
    lower, per_style = {}, {}
    for style in dict.fromkeys(labels.tolist()):
        rows = labels == style
        sums = np.zeros((len(groups), len(grid)))
        np.add.at(sums, inverse[rows], scores[rows])
        counts = np.bincount(inverse[rows], minlength=len(groups)).astype(float)
        boot = (draws @ sums) / np.maximum(draws @ counts, 1)[:, None]
        lower[style] = np.quantile(boot - boot[:, [anchor]], 1 - confidence, axis=0)
        per_style[style] = scores[rows].mean(axis=0)
    worst = np.min(np.stack(list(lower.values())), axis=0)
    means = scores.mean(axis=0)
    eligible = [j for j in range(len(grid)) if j != anchor and worst[j] > margin]
    # equal bounds (a plateau, e.g. one side already perfect) go to the weight nearest the better single system
    better = anchor if means[anchor] >= means[bm25_only] else bm25_only
    chosen = max(eligible, key=lambda j: (round(float(worst[j]), 6), -abs(grid[j] - grid[better]))) if eligible else anchor
    named = {str(k): v for k, v in per_style.items()} if styles is not None else {}
    if eligible:
        reason = (
            f"w={grid[chosen]} beats dense alone on pseudo-queries by {means[chosen] - means[anchor]:+.4f}"
            f"{' in every style' if len(lower) > 1 else ''}: bootstrap {confidence:.0%} lower bound {worst[chosen]:+.4f}"
            f"{' (worst style)' if len(lower) > 1 else ''} > margin {margin}"
        )
    else:
        reason = (
            f"dense alone: no weight beats it on pseudo-queries by more than the margin {margin} at {confidence:.0%} "
            f"confidence{' in every style' if len(lower) > 1 else ''}"
        )
    return {
        "weight": grid[chosen],
        "reason": reason,
        "margin": margin,
        "confidence": confidence,
        "gain_lower_bound": {str(w): round(float(v), 4) for w, v in zip(grid, worst)},
        "by_style": {
            style: {
                "dense": round(float(m[anchor]), 4),
                "bm25": round(float(m[bm25_only]), 4),
                "at_weight": round(float(m[chosen]), 4),
                "gain_lower_bound": round(float(lower[style][chosen]), 4) if chosen != anchor else None,
            }
            for style, m in named.items()
        },
    }


# ---------------------------------------------------------------------------------------- pseudo-queries

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'\-]*[A-Za-z0-9]")
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 5, 40


@dataclass
class PseudoQueries:
    """Inverse-cloze selection queries. `queries[q]` came from a sentence of document `qrels[q]`
    (`source[q]`, the bootstrap's cluster), written in style `styles[q]`; `remainders[doc]` is
    that document without the sentence, for the documents that lost it (what both sides must
    retrieve it by). `skipped` counts documents no query could be cut from, by reason."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    remainders: dict[str, str]
    source: dict[str, str] = field(default_factory=dict)
    styles: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return len(set(self.source.values()))


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def content_words(sentence: str) -> list[str]:
    """The sentence's distinct non-stopword words of 3+ characters, lower-cased, in order."""
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    seen: dict[str, None] = {}
    for word in _WORD.findall(sentence):
        w = word.lower()
        if len(w) >= 3 and w not in STOPWORDS_EN_PLUS:
            seen.setdefault(w)
    return list(seen)


def styled_query(sentence: str, style: str, rng: random.Random) -> str | None:
    """`sentence` as a query of `style`: `keywords` = 2-4 of its content words (sampled, kept in
    order, lower-cased: what short keyword queries look like), `phrase` = a 4-8-word window of
    it, `sentence` = all of it. None when it has too few words for the style."""
    if style == "sentence":
        return sentence
    if style == "phrase":
        words = sentence.split()
        n = min(len(words), rng.randint(4, 8))
        start = rng.randint(0, len(words) - n)
        return " ".join(words[start : start + n])
    if style == "keywords":
        words = content_words(sentence)
        if len(words) < 2:
            return None
        picked = sorted(rng.sample(range(len(words)), min(len(words), rng.randint(2, 4))))
        return " ".join(words[i] for i in picked)
    raise ValueError(f"unknown pseudo-query style '{style}' (use keywords, phrase or sentence)")


def pseudo_queries(
    doc_ids: Sequence[str],
    doc_texts: Sequence[str],
    count: int,
    seed: int = 0,
    styles: Sequence[str] = ("sentence",),
    keep_fraction: float = 0.0,
) -> PseudoQueries:
    """Queries cut from up to `count` documents drawn at random across the corpus: from each, a
    sentence of 5-40 words (the document must have two or more), written once in each of `styles`.
    The Inverse Cloze Task convention: the sentence leaves its document (the positive) except in
    a `keep_fraction` of documents, where it stays, as a real query's words sometimes stand
    verbatim in its answer. Seeded."""
    order = list(range(len(doc_ids)))
    random.Random(seed).shuffle(order)
    rng = random.Random(seed + 1)
    out = PseudoQueries({}, {}, {})
    for i in order:
        if out.documents >= count:
            break
        sentences = split_sentences(doc_texts[i])
        if len(sentences) < 2:
            out.skipped["fewer than two sentences"] = out.skipped.get("fewer than two sentences", 0) + 1
            continue
        usable = [j for j, s in enumerate(sentences) if MIN_QUERY_WORDS <= len(s.split()) <= MAX_QUERY_WORDS]
        if not usable:
            out.skipped["no 5-40-word sentence"] = out.skipped.get("no 5-40-word sentence", 0) + 1
            continue
        j = rng.choice(usable)
        keep, cut = rng.random() < keep_fraction, False
        for style in styles:
            query = styled_query(sentences[j], style, rng)
            if query is None:
                continue
            qid = f"pseudo-{len(out.queries)}"
            out.queries[qid], out.qrels[qid] = query, {doc_ids[i]: 1}
            out.source[qid], out.styles[qid], cut = doc_ids[i], style, True
        if cut and not keep:
            out.remainders[doc_ids[i]] = " ".join(s for k, s in enumerate(sentences) if k != j)
    return out


# ---------------------------------------------------------------------------------------- searcher


def dense_side(
    encoder, doc_ids: Sequence[str], doc_texts: Sequence[str] | None = None, *, index: str | None = None, doc_vectors=None
) -> DenseRetriever:
    """The hybrid's dense side: the FAISS index directory `index` when given, else exact search over
    `doc_vectors` (or over the texts, encoded on first use)."""
    from retrieval.serving.search import ExactDenseRetriever

    if index:
        from retrieval.serving.index import IndexRetriever

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

    def select_weight(
        self,
        dev_queries: Mapping[str, str] | None,
        dev_qrels: Mapping[str, Mapping[str, int]] | None,
        dev_runs: tuple[Run, Run] | None = None,
    ) -> dict:
        """{'weight', 'chosen_on', 'reason', ...}: from fusion.weight, the dev queries when given
        (`dev_runs`: their (dense, bm25) runs when the caller already has them), else pseudo-queries
        from the corpus under `guarded_weight`'s rule."""
        s = self.settings
        if s.method == "rrf":
            return {"method": "rrf", "rrf_k": s.rrf_k, "weight": None, "chosen_on": "none (rrf has no weight)"}
        if s.weight is not None:
            return {"method": "minmax", "weight": s.weight, "chosen_on": "fixed (fusion.weight)"}
        if dev_queries:
            dense, bm25 = dev_runs or self.side_runs(dev_queries)
            weight, by_weight = choose_weight(dense, bm25, dev_qrels, s)
            return {
                "method": "minmax",
                "weight": weight,
                "chosen_on": "dev",
                "reason": "best nDCG@10 on the dev hold-out",
                "selection_queries": len(dev_qrels),
                **curve_summary(by_weight, weight),
            }
        return self.select_on_pseudo_queries()

    def pseudo_curves(self) -> tuple[PseudoQueries, list[str], np.ndarray]:
        """The pseudo-queries `settings` asks for and their queries x weights nDCG@10."""
        s = self.settings
        pseudo = pseudo_queries(self.doc_ids, self.doc_texts, s.pseudo_queries, s.pseudo_seed, s.pseudo_styles, s.pseudo_keep_fraction)
        if pseudo.documents < s.min_pseudo_documents:
            return pseudo, [], np.empty((0, len(s.weight_grid)))
        dense, bm25 = self.pseudo_runs(pseudo)
        qids, scores = curve_matrix(dense, bm25, pseudo.qrels, s.weight_grid, s.depth)
        return pseudo, qids, scores

    def select_on_pseudo_queries(self, curves: tuple[PseudoQueries, list[str], np.ndarray] | None = None) -> dict:
        """`curves`: `pseudo_curves()`'s output when the caller already has it (the benchmark)."""
        s = self.settings
        pseudo, qids, scores = curves or self.pseudo_curves()
        if not qids:
            skipped = ", ".join(f"{n} {why}" for why, n in pseudo.skipped.items()) or "no documents"
            reason = (
                f"fallback to dense alone: only {pseudo.documents} documents could give pseudo-queries "
                f"(fusion.min_pseudo_documents {s.min_pseudo_documents}; skipped: {skipped})"
            )
            log.warning("hybrid: %s", reason)
            return {
                "method": "minmax",
                "weight": 1.0,
                "chosen_on": "fallback (too few pseudo-queries)",
                "reason": reason,
                "selection_queries": len(pseudo.queries),
                "pseudo_documents": pseudo.documents,
            }
        guarded = guarded_weight(
            scores,
            [pseudo.source[q] for q in qids],
            s.weight_grid,
            s.pseudo_margin,
            s.pseudo_confidence,
            styles=[pseudo.styles[q] for q in qids],
            seed=s.pseudo_seed,
        )
        by_weight = dict(zip(s.weight_grid, scores.mean(axis=0).tolist()))
        return {
            "method": "minmax",
            "weight": guarded["weight"],
            "chosen_on": "pseudo-queries",
            "reason": guarded["reason"],
            "selection_queries": len(qids),
            "pseudo_documents": pseudo.documents,
            "pseudo_styles": list(s.pseudo_styles),
            "pseudo_keep_fraction": s.pseudo_keep_fraction,
            "pseudo_seed": s.pseudo_seed,
            "margin": guarded["margin"],
            "confidence": guarded["confidence"],
            "gain_lower_bound": guarded["gain_lower_bound"],
            "by_style": guarded["by_style"],
            **curve_summary(by_weight, guarded["weight"]),
        }

    def pseudo_runs(self, pseudo: PseudoQueries) -> tuple[Run, Run]:
        """Both sides' runs for the pseudo-queries, each searching the corpus in which the
        queries' documents have lost the sentence that became their query."""
        from retrieval.serving.bm25 import BM25Retriever

        depth = self.settings.depth
        changed_ids = list(pseudo.remainders)
        texts = [pseudo.remainders.get(d, t) for d, t in zip(self.doc_ids, self.doc_texts)]
        bm25_run = BM25Retriever(self.doc_ids, texts, self.bm25_settings).search(pseudo.queries, depth)
        query_vectors = self.dense.encoder.encode_queries(list(pseudo.queries.values()))
        dense_run = self.dense.search_vectors(list(pseudo.queries), query_vectors, depth)
        if not changed_ids:
            return dense_run, bm25_run
        # the changed documents' vectors in the corpus still hold the query sentence: rescore them
        changed_vectors = self.dense.encoder.encode_passages([pseudo.remainders[d] for d in changed_ids])
        changed_scores = query_vectors @ changed_vectors.T
        changed = set(changed_ids)
        for row, qid in enumerate(pseudo.queries):
            hits = {d: s for d, s in dense_run[qid].items() if d not in changed}
            hits.update({d: float(v) for d, v in zip(changed_ids, changed_scores[row])})
            dense_run[qid] = dict(top_hits(hits, depth))
        return dense_run, bm25_run


def curve_summary(by_weight: Mapping[float, float], weight: float) -> dict:
    return {
        "selection_ndcg@10": round(by_weight[weight], 4),
        "selection_dense_ndcg@10": round(by_weight.get(1.0, float("nan")), 4),
        "selection_bm25_ndcg@10": round(by_weight.get(0.0, float("nan")), 4),
        "by_weight": {str(w): round(v, 4) for w, v in by_weight.items()},
    }


def dev_hold_out(
    dataset, settings: FusionSettings, evaluated_split: str | None = None
) -> tuple[dict[str, str], dict[str, dict[str, int]]] | None:
    """(queries, qrels) of the dev hold-out of `settings.dev_split`, or None when the dataset has no such split."""
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
