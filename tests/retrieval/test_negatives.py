"""Hard-negative mining: rank window, never a judged positive, provenance, file round trip, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval.training.negatives import NegativesConfig, read_negatives, run, select_window
from retrieval.training.training_data import judged_positives
from retroflow.config import ConfigError, load_config
from retroflow.data import dataset_input
from retroflow.data.beir import load_dataset
from retroflow.inputs import inputs_of

REPO = Path(__file__).resolve().parents[2]


def test_window_drops_top_ranks_positives_and_self() -> None:
    ranked = [["q1", "a", "pos", "b", "c", "d", None]]
    scores = [[9, 8, 7, 6, 5, 4, 0]]
    negatives, kept_scores, ranks = select_window(["q1"], ranked, scores, {"q1": {"pos"}}, 1, 5)
    assert negatives == {"q1": ["a", "b", "c"]} and ranks == {"q1": [1, 3, 4]} and kept_scores["q1"] == [8, 6, 5]
    capped, _, _ = select_window(["q1"], ranked, scores, {"q1": {"pos"}}, 0, 7, max_negatives=2)
    assert capped == {"q1": ["a", "b"]}  # the query's own id is never a negative (ArguAna-style self hits)


def test_bm25_negatives_never_contain_a_judged_positive(scifact_small: Path, tmp_path: Path) -> None:
    dataset = load_dataset(scifact_small)
    config = NegativesConfig(method="bm25", rank_start=0, rank_end=60)
    metrics = run(config, inputs_of(data=dataset_input(dataset)), tmp_path, tmp_path / "partial")
    mined = read_negatives(tmp_path / "negatives.jsonl")
    judged = judged_positives(dataset)
    assert set(mined.negatives) == set(dataset.split_qrels("train"))
    assert metrics["negatives"] > 50 * len(mined.negatives) * 0.5  # the window is mostly filled
    for qid, docs in mined.negatives.items():
        assert not set(docs) & judged[qid], qid
        assert len(docs) == len(set(docs))
        assert all(0 <= r < 60 for r in mined.ranks[qid])
        assert mined.scores[qid] == sorted(mined.scores[qid], reverse=True)
    prov = mined.provenance
    assert prov["method"] == "bm25" and prov["index"]["kind"] == "bm25s"
    assert prov["dataset_fingerprint"] == dataset.fingerprint and (prov["rank_start"], prov["rank_end"]) == (0, 60)


def test_rank_window_skips_the_top(scifact_small: Path, tmp_path: Path) -> None:
    dataset = load_dataset(scifact_small)
    data = inputs_of(data=dataset_input(dataset))
    run(NegativesConfig(rank_start=0, rank_end=20), data, tmp_path / "all", tmp_path / "all-partial")
    run(NegativesConfig(rank_start=10, rank_end=20), data, tmp_path / "tail", tmp_path / "tail-partial")
    full = read_negatives(tmp_path / "all" / "negatives.jsonl")
    tail = read_negatives(tmp_path / "tail" / "negatives.jsonl")
    for qid, docs in tail.negatives.items():
        assert all(r >= 10 for r in tail.ranks[qid])
        assert docs == [d for d, r in zip(full.negatives[qid], full.ranks[qid]) if r >= 10]


def test_bad_window_and_bad_file_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("rank_start: 50\nrank_end: 10\n")
    with pytest.raises(ConfigError, match="rank_end"):
        load_config(NegativesConfig, path)
    (tmp_path / "neg.jsonl").write_text('{"format": "retroflow-negatives/1", "provenance": {}}\n{"qid": "1"}\n')
    with pytest.raises(ValueError, match="neg.jsonl, line 2: needs fields"):
        read_negatives(tmp_path / "neg.jsonl")
    path.write_text("dataset: scifact\nmodel: minilm\nmethod: dense\n")  # a config written before they became inputs
    with pytest.raises(ConfigError, match="field 'dataset' is an input now: pass --dataset.*field 'model' is an input now"):
        load_config(NegativesConfig, path)


def test_dense_mining_without_a_model_is_a_clear_error(scifact_small: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a model: the stage's `model` input"):
        run(NegativesConfig(method="dense"), inputs_of(data=dataset_input(scifact_small)), tmp_path, tmp_path / "partial")


def test_cli_mine_negatives_prints_json_last(scifact_small: Path, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    code = main(
        [
            "negatives",
            "--config",
            str(REPO / "configs/negatives/bm25-scifact.yaml"),
            "--dataset",
            str(scifact_small),
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["method"] == "bm25" and last["queries"] == 60 and Path(last["negatives_file"]).is_file()


def test_cli_dense_mining_needs_model(scifact_small: Path, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    argv = ["negatives", "--method", "dense", "--dataset", str(scifact_small), "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "retroflow negatives: pass --model" in capsys.readouterr().err
