"""The `evaluate` stage's `run` over inputs, as the chain calls it, outside the store: what is
evaluated comes from the inputs (never the config), and an index the encode and index stages
built from the same model is searched without a model-mismatch warning."""

from __future__ import annotations

import json

import pytest

from eval import evaluate
from retrieval.serving import encode, index
from retroflow.data import dataset_input
from retroflow.inputs import model_input, path_input

ENCODER = {"precision": "fp32", "show_progress": False}


@pytest.fixture(scope="module")
def built(scifact_small, tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-stage")
    inputs = {"data": dataset_input(scifact_small), "model": model_input(tiny_bert)}
    encode.run(encode.EncodeConfig(shard_size=200, encoder=ENCODER), inputs, root / "emb", root / "emb-partial")
    hnsw = index.IndexConfig(factory="HNSW16", ef_search=8)
    index.run(hnsw, {"embeddings": path_input(root / "emb")}, root / "idx", root / "idx-partial")
    return root, inputs


def test_dense_through_the_stages_index_matches_exact_and_records_no_mismatch(built, tiny_bert):
    root, inputs = built
    config = evaluate.EvaluateConfig(metrics=["ndcg@10"], top_k=10, encoder=ENCODER, system="dense")
    searched = {**inputs, "index": path_input(root / "idx"), "embeddings": path_input(root / "emb")}
    through = evaluate.run(config, searched, root / "through", root / "through-partial")
    exact = evaluate.run(config, inputs, root / "exact", root / "exact-partial")
    assert "index_model_mismatch" not in through and through["model"] == str(tiny_bert) and through["system"] == "dense"
    assert through["search"]["approximate"] and through["exact_search"]["ndcg@10"] == pytest.approx(exact["ndcg@10"], abs=1e-6)
    assert exact["search"] == {"approximate": False, "label": "exact"}
    written = json.loads((root / "through" / "result.json").read_text())
    assert set(written["per_query"]["ndcg@10"]) and "per_query" not in through


def test_bm25_needs_no_model_and_a_dense_system_refuses_to_run_without_one(built):
    root, inputs = built
    bm25 = evaluate.run(evaluate.EvaluateConfig(system="bm25"), {"data": inputs["data"]}, root / "bm25", root / "bm25-partial")
    assert bm25["model"] == "bm25" and bm25["num_queries"] == 30 and "search" not in bm25
    with pytest.raises(ValueError, match="needs a model input"):
        evaluate.run(evaluate.EvaluateConfig(system="hybrid"), {"data": inputs["data"]}, root / "h", root / "h-partial")
