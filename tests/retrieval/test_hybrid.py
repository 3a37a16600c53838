"""Hybrid retrieval (retrieval.serving.hybrid): fusion arithmetic, weight choice off the test queries,
pseudo-queries for corpora without dev queries, and `retroflow evaluate --model hybrid:...`."""

from __future__ import annotations

import json
import shutil

import pytest

from eval.evaluate import EvaluateConfig, Target, evaluate
from flows.cli import main
from retrieval.serving.hybrid import FusionSettings, choose_weight, dev_hold_out, fuse_minmax, fuse_rrf, pseudo_queries, split_sentences
from retroflow.config import ConfigError, load_config
from retroflow.data.beir import load_dataset

DENSE = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}
BM25 = {"q": {"c": 12.0, "d": 8.0, "a": 4.0}}


def test_minmax_fusion_normalises_each_side_and_gives_missing_documents_zero():
    fused = fuse_minmax(DENSE, BM25, weight=0.5)["q"]
    # dense a=1, b=0.5, c=0; bm25 c=1, d=0.5, a=0; b has no bm25 score, d no dense score
    assert fused == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.5, "d": 0.25})
    assert max(fuse_minmax(DENSE, BM25, 1.0)["q"].items(), key=lambda kv: kv[1])[0] == "a"
    assert max(fuse_minmax(DENSE, BM25, 0.0)["q"].items(), key=lambda kv: kv[1])[0] == "c"


def test_minmax_keeps_one_sided_queries_and_rejects_weights_outside_0_1():
    assert set(fuse_minmax(DENSE, {}, 0.3)["q"]) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="weight must lie in"):
        fuse_minmax(DENSE, BM25, 1.5)


def test_rrf_sums_reciprocal_ranks():
    fused = fuse_rrf(DENSE, BM25, k=60)["q"]
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 63)
    assert fused["d"] == pytest.approx(1 / 62)


def test_choose_weight_picks_the_best_grid_point_and_prefers_dense_on_ties():
    settings = FusionSettings(weight_grid=[0.0, 0.5, 1.0])
    best, by_weight = choose_weight(DENSE, BM25, {"q": {"c": 1}}, settings)
    assert by_weight[0.0] == 1.0 and best == 0.5  # c first at w=0 and w=0.5 (tie with a broken by id): larger dense weight wins
    best, _ = choose_weight(DENSE, BM25, {"q": {"b": 1}}, settings)
    assert best == 1.0


def test_fusion_weight_outside_0_1_is_a_config_error_naming_the_field(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("fusion: {weight: 1.2}\n")
    with pytest.raises(ConfigError, match=r"field 'fusion.weight'"):
        load_config(EvaluateConfig, cfg)
    with pytest.raises(ConfigError, match="'hybrid:' needs a dense model"):
        Target(model="hybrid:")
    with pytest.raises(ConfigError, match="cannot score a run_file"):
        evaluate(EvaluateConfig(run_file=str(tmp_path / "run.txt")), Target(model="hybrid:minilm", dataset="scifact"))


def test_empty_dev_hold_out_is_an_error_naming_the_split(scifact_small):
    dataset = load_dataset(str(scifact_small))
    with pytest.raises(ValueError, match=r"dev hold-out of .* split 'train' is empty"):
        dev_hold_out(dataset, FusionSettings(dev_fraction=0.001))
    queries, qrels = dev_hold_out(dataset, FusionSettings(dev_fraction=0.2))
    assert len(queries) == 12 and set(queries) == set(qrels)
    assert dev_hold_out(dataset, FusionSettings(), evaluated_split="train") is None


def test_pseudo_queries_take_a_sentence_out_of_its_document():
    texts = ["Title one. The first sentence is here and long enough. A second sentence follows it closely.", "short"]
    first = pseudo_queries(["d1", "d2"], texts, count=5, seed=3)
    again = pseudo_queries(["d1", "d2"], texts, count=5, seed=3)
    assert first == again and len(first.queries) == 1  # "short" has one sentence: no query from it
    ((qid, query),) = first.queries.items()
    assert first.qrels[qid] == {"d1": 1}
    assert query not in first.remainders["d1"] and query in texts[0]
    assert split_sentences("A b c. D e f! G h?") == ["A b c.", "D e f!", "G h?"]


def test_hybrid_cli_chooses_the_weight_on_dev_queries_never_on_test(scifact_small, tiny_bert, capsys, monkeypatch):
    import retrieval.serving.hybrid as hybrid

    seen = []
    real = hybrid.choose_weight

    def recording(dense, bm25, qrels, settings):
        seen.append(set(qrels))
        return real(dense, bm25, qrels, settings)

    monkeypatch.setattr(hybrid, "choose_weight", recording)
    args = [
        "evaluate",
        "--model",
        f"hybrid:{tiny_bert}",
        "--dataset",
        str(scifact_small),
        "--set",
        "encoder.show_progress=false",
        "--set",
        "fusion.dev_fraction=0.2",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fusion = result["fusion"]
    assert fusion["chosen_on"] == "dev" and fusion["selection_queries"] == 12
    test_ids = set(load_dataset(str(scifact_small)).split_qrels("test"))
    assert seen and all(not (ids & test_ids) for ids in seen)
    assert fusion["selection_ndcg@10"] == max(fusion["by_weight"].values())
    assert result["model"] == f"hybrid:{tiny_bert}"


def test_hybrid_on_a_corpus_without_dev_queries_uses_pseudo_queries(scifact_small, tiny_bert, tmp_path):
    zero_shot = tmp_path / "zero-shot"
    shutil.copytree(scifact_small, zero_shot)
    (zero_shot / "qrels" / "train.tsv").unlink()
    config = EvaluateConfig(encoder={"show_progress": False}, fusion={"pseudo_queries": 40})
    result = evaluate(config, Target(model=f"hybrid:{tiny_bert}", dataset=str(zero_shot)))
    fusion = result["fusion"]
    assert fusion["chosen_on"] == "pseudo-queries" and fusion["pseudo_documents"] == 40
    assert fusion["selection_queries"] > 40  # several queries (styles) per document
    assert fusion["weight"] in FusionSettings().weight_grid and fusion["reason"] and fusion["margin"] == FusionSettings().pseudo_margin
    # the fused run is the fusion of the two sides at that weight
    bm25 = evaluate(EvaluateConfig(), Target(model="bm25", dataset=str(zero_shot)))
    assert bm25["num_queries"] == result["num_queries"]


def test_fusion_on_a_corpus_bm25_cannot_index_is_a_clear_error():
    from retrieval.serving.bm25 import BM25Retriever

    with pytest.raises(ValueError, match="BM25 cannot index this corpus: 2 documents"):
        BM25Retriever(["d1", "d2"], ["the a", ""])
