"""`evaluate --index` checks what the index was built from (issue 22, item 6): another dataset is
refused, another model is used with a warning that the result records. `evaluate --embeddings`
records another model's vectors the same way (their ids are checked against the corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tiny_bert, write_beir_subset

from flows.cli import main


@pytest.fixture(scope="module")
def flat_index(scifact_small: Path, tiny_bert: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("provenance")
    common = ["--model", str(tiny_bert), "--dataset", str(scifact_small)]
    assert main(["encode", *common, "--output", str(root / "emb"), "--set", "encoder.device=cpu"]) == 0
    assert main(["index", "--embeddings", str(root / "emb"), "--factory", "Flat", "--output", str(root / "flat")]) == 0
    return root / "flat"


def evaluate_args(model: Path, dataset: Path, index: Path) -> list[str]:
    return [
        "evaluate",
        "--model",
        str(model),
        "--dataset",
        str(dataset),
        "--index",
        str(index),
        "--metrics",
        "ndcg@10",
        "--top-k",
        "10",
        "--no-registry",
        "--set",
        "encoder.device=cpu",
    ]


def test_an_index_built_over_another_dataset_is_refused(flat_index, tiny_bert, scifact_dir, tmp_path, capsys):
    other = write_beir_subset(scifact_dir, tmp_path / "other-subset", 30, 60, 300, seed=7)  # same size, other documents
    capsys.readouterr()
    assert main(evaluate_args(tiny_bert, other, flat_index)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "dataset" in err[0] and "other-subset" in err[0], err
    recorded = json.loads((flat_index / "index.json").read_text())["embeddings"]
    assert recorded["dataset_fingerprint"][:12] in err[0] and str(flat_index) in err[0]


def test_an_index_built_with_another_model_is_used_with_a_recorded_warning(flat_index, tiny_bert, scifact_small, tmp_path, capsys):
    texts = [json.loads(line)["text"] for line in (scifact_small / "corpus.jsonl").read_text().splitlines()]
    other_model = build_tiny_bert(tmp_path / "other-bert", texts, seed=1)
    capsys.readouterr()
    assert main(evaluate_args(other_model, scifact_small, flat_index)) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out.strip().splitlines()[-1])
    mismatch = result["index_model_mismatch"]
    assert mismatch["index_model"] == str(tiny_bert) and mismatch["model"] == str(other_model)
    assert any("WARNING" in line and "built with" in line and str(other_model) in line for line in printed.err.splitlines())


def test_the_matching_model_and_dataset_record_nothing_extra(flat_index, tiny_bert, scifact_small, capsys):
    capsys.readouterr()
    assert main(evaluate_args(tiny_bert, scifact_small, flat_index)) == 0
    assert "index_model_mismatch" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_embeddings_encoded_with_another_model_are_used_with_a_recorded_warning(flat_index, tiny_bert, scifact_small, tmp_path, capsys):
    texts = [json.loads(line)["text"] for line in (scifact_small / "corpus.jsonl").read_text().splitlines()]
    other_model = build_tiny_bert(tmp_path / "other-bert", texts, seed=1)
    embeddings = flat_index.parent / "emb"
    args = evaluate_args(other_model, scifact_small, flat_index)
    args[args.index("--index") : args.index("--index") + 2] = ["--embeddings", str(embeddings)]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr()
    mismatch = json.loads(printed.out.strip().splitlines()[-1])["embeddings_model_mismatch"]
    assert mismatch["embeddings_model"] == str(tiny_bert) and mismatch["model"] == str(other_model)
    assert any("WARNING" in line and "encoded with" in line for line in printed.err.splitlines())

    args[args.index("--model") + 1] = str(tiny_bert)  # the model that encoded them: nothing to record
    assert main(args) == 0
    assert "embeddings_model_mismatch" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_vectors_encoded_with_a_relative_model_path_match_it_elsewhere(tiny_bert, scifact_small, tmp_path, monkeypatch, capsys):
    """`encode --model ./models/x` run in one directory, evaluated from another (a Prefect worker,
    a later shell): the vectors name the model by its absolute folder, so the same model is not
    reported as another one."""
    monkeypatch.chdir(tiny_bert.parent)
    relative = ["--model", tiny_bert.name, "--dataset", str(scifact_small), "--set", "encoder.device=cpu"]
    assert main(["encode", *relative, "--output", str(tmp_path / "emb")]) == 0
    assert json.loads((tmp_path / "emb" / "embeddings.json").read_text())["model"] == str(tiny_bert.resolve())

    monkeypatch.chdir(tmp_path)
    args = evaluate_args(tiny_bert, scifact_small, tmp_path)
    args[args.index("--index") : args.index("--index") + 2] = ["--embeddings", str(tmp_path / "emb")]
    capsys.readouterr()
    assert main(args) == 0
    assert "embeddings_model_mismatch" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
