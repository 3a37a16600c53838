"""IR metrics with pytrec_eval: nDCG@k, Recall@k, MRR@k, MAP@k, per query and averaged.

Names are `ndcg@10`, `recall@100`, `mrr@10`, `map@100`, `precision@10`. MRR@k is pytrec_eval's
`recip_rank` over each run truncated to its top k (so a first hit below k scores 0), as
BEIR and MS MARCO define it. Queries without any judged-relevant document are skipped,
as pytrec_eval does; queries with judgments but no retrieved documents count as 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import pytrec_eval

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100")
_METRIC = re.compile(r"^(ndcg|recall|mrr|map|precision|p)@(\d+)$")
_TREC_NAMES = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut", "precision": "P", "p": "P"}


def parse_metric(name: str) -> tuple[str, int]:
    match = _METRIC.match(name.lower())
    if not match:
        raise ValueError(f"unknown metric '{name}' (use ndcg@k, recall@k, mrr@k, map@k, precision@k)")
    return match.group(1), int(match.group(2))


def top_k(run: Run, k: int) -> dict[str, dict[str, float]]:
    """Keep each query's k best documents; ties go to the larger doc id, as in trec_eval's ranking."""
    out = {}
    for qid, docs in run.items():
        ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)
        out[qid] = dict(ranked[:k])
    return out


def per_query_scores(
    qrels: Qrels, run: Run, metrics: Iterable[str] = DEFAULT_METRICS, relevance_level: int = 1
) -> dict[str, dict[str, float]]:
    """{metric: {qid: value}} over every judged query (missing from the run = 0)."""
    qrels = {q: {d: int(g) for d, g in docs.items()} for q, docs in qrels.items() if any(g >= relevance_level for g in docs.values())}
    run = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()}
    results: dict[str, dict[str, float]] = {}
    for name in metrics:
        family, k = parse_metric(name)
        if family == "mrr":
            evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=relevance_level)
            scores = evaluator.evaluate(top_k(run, k))
            values = {q: s["recip_rank"] for q, s in scores.items()}
        else:
            measure = f"{_TREC_NAMES[family]}.{k}"
            evaluator = pytrec_eval.RelevanceEvaluator(qrels, {measure}, relevance_level=relevance_level)
            key = f"{_TREC_NAMES[family]}_{k}"
            values = {q: s[key] for q, s in evaluator.evaluate(run).items()}
        results[name] = {q: float(values.get(q, 0.0)) for q in qrels}
    return results


def mean_scores(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {name: float(np.mean(list(values.values()))) if values else 0.0 for name, values in per_query.items()}


def evaluate_run(
    qrels: Qrels, run: Run, metrics: Iterable[str] = DEFAULT_METRICS, relevance_level: int = 1
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    per_query = per_query_scores(qrels, run, metrics, relevance_level)
    return mean_scores(per_query), per_query
