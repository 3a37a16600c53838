"""Metrics against hand-computed values, and agreement with BEIR's own evaluator."""

from __future__ import annotations

import math

import pytest

from retroflow.metrics import evaluate_run, parse_metric, top_k

QRELS = {"q1": {"a": 1, "c": 1}, "q2": {"x": 1}, "q3": {"z": 2}}
RUN = {
    "q1": {"a": 0.9, "b": 0.8, "c": 0.7},  # relevant at ranks 1 and 3
    "q2": {"y": 0.5, "x": 0.4},  # relevant at rank 2
    # q3 retrieved nothing: counts as 0
}


def test_hand_computed_values():
    means, per_query = evaluate_run(QRELS, RUN, ["ndcg@10", "recall@1", "mrr@10", "map@100", "mrr@1"])
    ndcg_q1 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg_q2 = (1 / math.log2(3)) / 1
    assert per_query["ndcg@10"]["q1"] == pytest.approx(ndcg_q1)
    assert per_query["ndcg@10"]["q2"] == pytest.approx(ndcg_q2)
    assert per_query["ndcg@10"]["q3"] == 0.0
    assert means["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 3)
    assert per_query["recall@1"] == {"q1": 0.5, "q2": 0.0, "q3": 0.0}
    assert per_query["mrr@10"] == {"q1": 1.0, "q2": 0.5, "q3": 0.0}
    assert per_query["mrr@1"] == {"q1": 1.0, "q2": 0.0, "q3": 0.0}  # first hit below the cut-off scores 0
    assert per_query["map@100"]["q1"] == pytest.approx((1 + 2 / 3) / 2)


def test_queries_without_relevant_documents_are_skipped():
    _, per_query = evaluate_run({"q1": {"a": 1}, "q2": {"b": 0}}, {"q1": {"a": 1.0}, "q2": {"b": 1.0}}, ["ndcg@10"])
    assert set(per_query["ndcg@10"]) == {"q1"}


def test_relevance_level_makes_grade_one_non_relevant_for_binary_metrics():
    qrels = {"q": {"a": 1, "b": 2}}
    run = {"q": {"a": 0.9, "b": 0.8}}
    _, lenient = evaluate_run(qrels, run, ["mrr@10"], relevance_level=1)
    _, strict = evaluate_run(qrels, run, ["mrr@10"], relevance_level=2)
    assert lenient["mrr@10"]["q"] == 1.0 and strict["mrr@10"]["q"] == 0.5


def test_top_k_truncation_breaks_ties_deterministically():
    kept = top_k({"q": {"a": 1.0, "b": 1.0, "c": 0.5}}, 1)
    assert kept == {"q": {"b": 1.0}}


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric("bleu@4")


def test_agrees_with_beir_evaluator_on_a_real_run(scifact_small):
    from beir.retrieval.evaluation import EvaluateRetrieval

    from retrieval.serving.bm25 import BM25Retriever
    from retroflow.data.beir import load_dataset

    ds = load_dataset(scifact_small)
    queries = ds.split_queries("test")
    run = BM25Retriever(ds.doc_ids(), ds.doc_texts()).search(queries, 100)
    qrels = ds.split_qrels("test")
    ours, _ = evaluate_run(qrels, run, ["ndcg@10", "recall@100", "map@100", "mrr@10"])
    ndcg, _map, recall, _ = EvaluateRetrieval.evaluate(qrels, run, [10, 100])
    mrr = EvaluateRetrieval.evaluate_custom(qrels, run, [10], metric="mrr")
    assert ours["ndcg@10"] == pytest.approx(ndcg["NDCG@10"], abs=1e-4)
    assert ours["recall@100"] == pytest.approx(recall["Recall@100"], abs=1e-4)
    assert ours["map@100"] == pytest.approx(_map["MAP@100"], abs=1e-4)
    assert ours["mrr@10"] == pytest.approx(mrr["MRR@10"], abs=1e-4)
