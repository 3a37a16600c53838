"""Distillation that can help: the fusion teacher, positive-aware negatives, the dev gate, and the
DPR recipe's data options (one row per (query, positive), prefixes that travel with the model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retrieval.training import finetune
from retrieval.training import teacher as teacher_stage
from retrieval.training.finetune import FinetuneConfig, distillation_gate, standardized, student_dev_check, teacher_pools
from retrieval.training.teacher import TeacherConfig
from retrieval.training.teacher_scores import TeacherScores, read_teacher_scores, write_teacher_scores
from retrieval.training.training_data import BatchPlan, TrainingExample, TrainingSet, training_queries
from retroflow.config import ConfigError, load_config
from retroflow.data import dataset_input
from retroflow.data.beir import load_dataset
from retroflow.data.splits import dev_split
from retroflow.inputs import inputs_of, model_input, path_input

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "finetune" / "tiny.yaml"


@pytest.fixture(scope="module")
def dataset(scifact_small: Path):
    return load_dataset(scifact_small)


def student(dataset, model: Path, teacher_scores: Path | None = None) -> dict:
    """The finetune stage's inputs: the dataset, the start model and (distillation) a teacher's scores file."""
    return inputs_of(data=dataset_input(dataset), model=model_input(model), teacher=path_input(teacher_scores) if teacher_scores else None)


@pytest.fixture(scope="module")
def fusion_teacher(dataset, tiny_bert: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fusion-teacher")
    config = TeacherConfig(kind="fusion", dev_fraction=0.2, candidates_per_query=10, passage_max_length=64)
    inputs = inputs_of(data=dataset_input(dataset), init=model_input(tiny_bert))
    return out, teacher_stage.run(config, inputs, out, out / "partial")


def test_fusion_teacher_scores_positives_and_fused_top_candidates_of_training_queries_only(fusion_teacher, dataset):
    out, metrics = fusion_teacher
    scored = read_teacher_scores(out / "teacher_scores.jsonl")
    provenance, scores = scored.provenance, scored.scores
    train = dataset.split_qrels("train")
    kept, dev = dev_split(list(train), 0.2, 0)
    assert set(scores) == set(kept) and not set(scores) & set(dev)
    for qid, docs in scores.items():
        positives = {d for d, g in train[qid].items() if g >= 1}
        assert positives <= set(docs) and len(set(docs) - positives) == 10
        assert all(0.0 <= v <= 1.0 for v in docs.values())  # min-max fused scores
    check = provenance["dev_check"]
    assert check["dev_queries"] == len(dev) == metrics["dev_queries"]
    assert provenance["fusion"]["chosen_on"] == "dev" and provenance["dataset_fingerprint"] == dataset.fingerprint
    # the cross-fitted figure never exceeds the in-sample best it is an honest estimate of
    assert check["dev_teacher_ndcg@10"] <= check["dev_teacher_ndcg@10_at_chosen_weight"] + 1e-9


def test_fusion_teacher_needs_a_dev_hold_out():
    with pytest.raises(ValueError, match="dev_fraction > 0"):
        TeacherConfig(kind="fusion", dev_fraction=0.0)


def test_positive_aware_filter_drops_candidates_scored_like_the_positive():
    train = TrainingSet([TrainingExample("q", "query", ("p",))], {"p": "", "a": "", "b": "", "c": ""}, {"q": {"p"}})
    scores = {"q": {"p": 0.8, "a": 0.79, "b": 0.5, "c": 0.1}}
    assert teacher_pools(scores, train, 0.9) == {"q": ["b", "c"]}
    assert teacher_pools(scores, train, None) == {"q": ["a", "b", "c"]}
    # a positive the teacher ranks last would lose every negative: the lowest-scored ones are kept
    low = {"q": {"p": 0.1, "a": 0.9, "b": 0.5, "c": 0.3}}
    assert teacher_pools(low, train, 0.9, min_keep=2) == {"q": ["c", "b"]}


def test_gate_distils_only_when_the_teacher_beats_bm25_and_its_dense_model():
    below_bm25 = {"dev_teacher_ndcg@10": 0.70, "dev_bm25_ndcg@10": 0.75, "dev_dense_ndcg@10": 0.60}
    below_dense = {"dev_teacher_ndcg@10": 0.70, "dev_bm25_ndcg@10": 0.65, "dev_dense_ndcg@10": 0.72}
    above = {"dev_teacher_ndcg@10": 0.80, "dev_bm25_ndcg@10": 0.77, "dev_dense_ndcg@10": 0.73}
    cross_encoder_below = {"dev_teacher_ndcg@10": 0.58, "dev_bm25_ndcg@10": 0.77}
    assert distillation_gate(below_bm25)[0] is False and "BM25" in distillation_gate(below_bm25)[1]
    assert distillation_gate(below_dense)[0] is False
    assert distillation_gate(above)[0] is True
    assert distillation_gate(cross_encoder_below)[0] is False
    assert distillation_gate({})[0] is True  # no dev check: ungated
    # the student's own dev score is the third rival
    beaten_by_student = distillation_gate(above, student_dev=0.81)
    assert beaten_by_student[0] is False and "the student" in beaten_by_student[1]
    assert distillation_gate(above, student_dev=0.79)[0] is True


def test_teacher_writes_its_dev_pool_for_the_held_out_queries_only(fusion_teacher, dataset):
    out, _ = fusion_teacher
    teacher = read_teacher_scores(out / "teacher_scores.jsonl")
    _, dev = dev_split(list(dataset.split_qrels("train")), 0.2, 0)
    pool = teacher.dev_pool
    assert set(pool) == set(dev) and not set(pool) & set(teacher.scores)
    assert all(0 < len(docs) <= 20 and len(set(docs)) == len(docs) for docs in pool.values())


def test_student_dev_check_reranks_the_teacher_pool_and_refuses_a_pool_of_training_queries(fusion_teacher, dataset, tiny_bert, tmp_path):
    out, _ = fusion_teacher
    pool = read_teacher_scores(out / "teacher_scores.jsonl").dev_pool
    config = load_config(FinetuneConfig, TINY, ["data.dev_fraction=0.2", "distill.loss=kl"])
    train = training_queries(config.data.selection(), dataset)
    score = student_dev_check(config, dataset, train, tiny_bert, "mean", True, pool, out / "teacher_scores.jsonl")
    qrels = dataset.split_qrels("train")
    # a pool holding only each query's judged documents is ranked perfectly by anyone
    perfect = {q: [d for d in qrels[q]] for q in pool}
    assert student_dev_check(config, dataset, train, tiny_bert, "mean", True, perfect, out / "t.jsonl") == pytest.approx(1.0)
    assert score is not None and 0.0 <= score < 1.0
    other_split = load_config(FinetuneConfig, TINY, ["data.dev_fraction=0.2", "data.dev_seed=7", "distill.loss=kl"])
    with pytest.raises(ValueError, match=r"teacher_scores\.jsonl: the teacher's dev queries .* are training queries"):
        student_dev_check(
            other_split,
            dataset,
            training_queries(other_split.data.selection(), dataset),
            tiny_bert,
            "mean",
            True,
            pool,
            out / "teacher_scores.jsonl",
        )


def test_the_scores_file_round_trips_and_reads_an_older_file_s_dev_check_under_its_one_name(tmp_path):
    teacher = TeacherScores(
        {"kind": "fusion", "dev_check": {"dev_teacher_ndcg@10": 0.7}, "dev_pool": {"q9": ["d1"]}}, {"q1": {"p": 0.912345678, "n": 0.1}}
    )
    write_teacher_scores(tmp_path / "t.jsonl", teacher)
    again = read_teacher_scores(tmp_path / "t.jsonl")
    assert again.provenance == teacher.provenance and again.dev_pool == {"q9": ["d1"]}
    assert again.scores == {"q1": {"p": 0.91235, "n": 0.1}}  # rounded to 5 decimals
    # a cross-encoder's file from before the kinds shared the name
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    header["provenance"]["dev_check"] = {"dev_teacher_rerank_ndcg@10": 0.58, "dev_bm25_ndcg@10": 0.77}
    (tmp_path / "old.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    old = read_teacher_scores(tmp_path / "old.jsonl")
    assert old.dev_check == {"dev_teacher_ndcg@10": 0.58, "dev_bm25_ndcg@10": 0.77}
    assert distillation_gate(old.dev_check)[0] is False
    (tmp_path / "bad.jsonl").write_text('{"format": "x", "provenance": {}}\n')
    with pytest.raises(ValueError, match="not a retroflow teacher scores file"):
        read_teacher_scores(tmp_path / "bad.jsonl")
    (tmp_path / "no-qid.jsonl").write_text(lines[0] + '\n{"doc_ids": ["p"], "scores": [1.0]}\n')
    with pytest.raises(ValueError, match=r"no-qid.jsonl, line 2: no 'qid'"):
        read_teacher_scores(tmp_path / "no-qid.jsonl")


def test_gated_teacher_trains_without_distillation_and_says_so(fusion_teacher, dataset, tiny_bert, tmp_path):
    out, _ = fusion_teacher
    scores_file = tmp_path / "teacher_scores.jsonl"
    lines = (out / "teacher_scores.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    header["provenance"]["dev_check"].update({"dev_teacher_ndcg@10": 0.1, "dev_bm25_ndcg@10": 0.5})
    scores_file.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    config = load_config(
        FinetuneConfig, TINY, ["train.max_steps=2", "data.dev_fraction=0.2", "distill.loss=kl", "negatives.hard_negatives=3"]
    )
    metrics = finetune.run(config, student(dataset, tiny_bert, scores_file), tmp_path / "out", tmp_path / "partial")
    assert metrics["distill"] == "none" and metrics["distill_gate"]["distilled"] is False
    assert "below BM25" in metrics["distill_gate"]["reason"] and metrics["distill_loss_history"] == []
    assert metrics["distill_gate"]["student_dev_ndcg@10"] is not None  # the student was scored on the teacher's dev pool
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "distill_gate" in card


def test_teacher_scores_for_another_dataset_are_rejected_naming_the_file(fusion_teacher, dataset, tiny_bert, tmp_path):
    out, _ = fusion_teacher
    lines = (out / "teacher_scores.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    header["provenance"].update({"dataset": "nfcorpus", "dataset_fingerprint": "0123456789abcdef"})
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    config = load_config(FinetuneConfig, TINY, ["train.max_steps=1", "data.dev_fraction=0.2", "distill.loss=kl"])
    with pytest.raises(ValueError, match=r"other\.jsonl: these teacher scores were made on dataset nfcorpus"):
        finetune.run(config, student(dataset, tiny_bert, other), tmp_path / "out", tmp_path / "partial")


def test_one_row_per_query_positive_pair_visits_every_positive_once_an_epoch():
    examples = [TrainingExample("q1", "a", ("p1", "p2")), TrainingExample("q2", "b", ("p3",))]
    train = TrainingSet(examples, {d: d for d in ("p1", "p2", "p3", "n")}, {"q1": {"p1", "p2"}, "q2": {"p3"}})
    plan = BatchPlan(train, batch_size=3, hard_negatives=0, seed=0, rows="per_positive")
    assert len(plan) == 3
    assert sorted((s.qid, s.positive) for s in plan.global_batch(0, {})) == [("q1", "p1"), ("q1", "p2"), ("q2", "p3")]
    assert len(BatchPlan(train, 2, 0, 0, rows="per_query")) == 2


def test_kl_teacher_scores_are_standardised_per_query():
    z = standardized(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert torch.allclose(z[0], torch.tensor([-1.0, 0.0, 1.0])) and torch.all(z[1] == 0)


def test_prefixes_are_trained_with_and_saved_for_serving(dataset, tiny_bert, tmp_path):
    from retrieval.serving.encoder import Encoder, EncoderSettings

    config = load_config(FinetuneConfig, TINY, ["train.max_steps=1", "model.query_prefix='query: '", "model.passage_prefix='passage: '"])
    finetune.run(config, student(dataset, tiny_bert), tmp_path / "out", tmp_path / "partial")
    saved = json.loads((tmp_path / "out" / "model" / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"query": "query: ", "document": "passage: "}
    encoder = Encoder(tmp_path / "out" / "model", EncoderSettings(show_progress=False))
    assert (encoder.query_prefix, encoder.passage_prefix) == ("query: ", "passage: ")
    assert Encoder(tmp_path / "out" / "model", EncoderSettings(query_prefix="", show_progress=False)).query_prefix == ""


def test_distillation_config_errors_name_the_field(tmp_path):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("distill: {loss: kl, false_negative_fraction: 1.5}\n")
    with pytest.raises(ConfigError, match="distill.false_negative_fraction"):
        load_config(FinetuneConfig, cfg)
