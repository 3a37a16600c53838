"""Fine-tuning data loaders: BEIR qrels, MS MARCO qrels/triples, NQ in DPR JSON, dev hold-out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval.training.training_data import (
    TrainingDataError,
    beir_training_set,
    dev_split,
    dpr_json_training_set,
    judged_positives,
    msmarco_qrels_training_set,
    msmarco_triples_training_set,
)
from retroflow.data.beir import load_dataset


def test_beir_train_qrels_give_one_example_per_judged_query(scifact_small: Path) -> None:
    dataset = load_dataset(scifact_small)
    train = beir_training_set(dataset, "train")
    qrels = dataset.split_qrels("train")
    assert sorted(ex.qid for ex in train.examples) == sorted(qrels)
    for ex in train.examples:
        assert set(ex.positives) == {d for d, g in qrels[ex.qid].items() if g >= 1}
        assert all(d in train.passages for d in ex.positives)
    # passages are title + text, as the encoder sees them at evaluation time
    doc = dataset.doc_ids()[0]
    assert train.passages[doc] == dataset.doc_texts()[0]


def test_query_without_positive_is_a_clear_error(scifact_small: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(scifact_small, copy)
    lines = (copy / "qrels" / "train.tsv").read_text().splitlines()
    qid, doc, _ = lines[1].split("\t")
    lines = [line for line in lines if not line.startswith(qid + "\t")] + [f"{qid}\t{doc}\t0"]
    (copy / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n")
    dataset = load_dataset(copy)
    with pytest.raises(TrainingDataError, match=f"query '{qid}' has no positive"):
        beir_training_set(dataset, "train")
    skipped = beir_training_set(dataset, "train", on_missing_positive="skip")
    assert qid not in {ex.qid for ex in skipped.examples}


def test_judged_positives_cover_every_split(scifact_small: Path) -> None:
    dataset = load_dataset(scifact_small)
    judged = judged_positives(dataset)
    for split in ("train", "test"):
        for qid, docs in dataset.split_qrels(split).items():
            assert {d for d, g in docs.items() if g >= 1} <= judged[qid]


def test_msmarco_qrels_and_triples(tmp_path: Path) -> None:
    (tmp_path / "qrels.tsv").write_text("1\t0\t10\t1\n2\t0\t20\t1\n3\t0\t10\t0\n")
    (tmp_path / "queries.tsv").write_text("1\twhat is a cat\n2\twhat is a dog\n3\tnothing relevant\n")
    (tmp_path / "collection.tsv").write_text("10\tcats are animals\n20\tdogs are animals\n30\tunrelated\n")
    with pytest.raises(TrainingDataError, match="query '3' has no positive"):
        msmarco_qrels_training_set(tmp_path / "qrels.tsv", tmp_path / "queries.tsv", tmp_path / "collection.tsv")
    train = msmarco_qrels_training_set(tmp_path / "qrels.tsv", tmp_path / "queries.tsv", tmp_path / "collection.tsv", "skip")
    assert [(ex.qid, ex.positives) for ex in train.examples] == [("1", ("10",)), ("2", ("20",))]
    assert train.passages["20"] == "dogs are animals"

    (tmp_path / "triples.tsv").write_text("q one\tpos a\tneg b\nq one\tpos a\tneg c\nq two\tpos d\tneg b\n")
    triples = msmarco_triples_training_set(tmp_path / "triples.tsv")
    by_query = {ex.query: ex for ex in triples.examples}
    assert len(by_query["q one"].positives) == 1 and len(by_query["q one"].negatives) == 2
    assert triples.passages[by_query["q two"].positives[0]] == "pos d"
    (tmp_path / "bad.tsv").write_text("only\ttwo\n")
    with pytest.raises(TrainingDataError, match="bad.tsv, line 1: expected 3"):
        msmarco_triples_training_set(tmp_path / "bad.tsv")


def test_dpr_json(tmp_path: Path) -> None:
    records = [
        {
            "question": "who wrote hamlet",
            "positive_ctxs": [{"title": "Hamlet", "text": "by Shakespeare", "passage_id": "7"}],
            "negative_ctxs": [{"title": "X", "text": "random", "passage_id": "8"}],
            "hard_negative_ctxs": [{"title": "Macbeth", "text": "also Shakespeare", "passage_id": "9"}],
        },
        {"question": "no answer", "positive_ctxs": [], "hard_negative_ctxs": []},
    ]
    path = tmp_path / "nq-train.json"
    path.write_text(json.dumps(records))
    with pytest.raises(TrainingDataError, match="record 1: query '1' has no positive"):
        dpr_json_training_set(path)
    train = dpr_json_training_set(path, on_missing_positive="skip")
    (ex,) = train.examples
    assert ex.positives == ("7",) and ex.negatives == ("9",)
    assert train.passages["7"] == "Hamlet by Shakespeare"
    path.write_text("{not json")
    with pytest.raises(TrainingDataError, match="malformed JSON"):
        dpr_json_training_set(path)


def test_dev_split_is_seeded_and_disjoint() -> None:
    qids = [str(i) for i in range(100)]
    train, dev = dev_split(qids, 0.1, seed=0)
    assert len(dev) == 10 and not set(train) & set(dev) and len(train) + len(dev) == 100
    assert dev_split(qids, 0.1, seed=0) == (train, dev)
    assert dev_split(qids, 0.1, seed=1)[1] != dev
