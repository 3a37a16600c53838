"""Results labelled and summarised truthfully (issue 22, item 9): a renamed copy keeps its name,
compare refuses deltas across different data, an all-zero split fails, empty queries are counted,
search knobs are validated.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_bad_input_catalogue import beir, evaluate
from test_messages import error_line

from flows.cli import main


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_a_renamed_copy_is_registered_under_its_own_name(tmp_path: Path, capsys):
    from retroflow.data.beir import load_dataset

    first = beir(tmp_path / "original")
    copy = tmp_path / "renamed"
    shutil.copytree(first, copy)
    assert load_dataset(first).name == "original"
    assert load_dataset(copy).name == "renamed"
    assert main(evaluate(copy, tmp_path / "out")) == 0
    assert last_json(capsys.readouterr().out)["dataset"] == "renamed"


def test_compare_of_same_name_runs_on_different_data_reports_no_deltas(tmp_path: Path, capsys):
    registry = tmp_path / "registry.parquet"
    run_ids = []
    for version, qrels in (
        ("a", "query-id\tcorpus-id\tscore\nq1\td0\t1\nq2\td1\t1\n"),
        ("b", "query-id\tcorpus-id\tscore\nq1\td2\t1\nq2\td1\t1\n"),
    ):
        dataset = beir(tmp_path / version / "ds", qrels=qrels)
        assert main(["evaluate", "--model", "bm25", "--dataset", str(dataset), "--registry", str(registry)]) == 0
        run_ids.append(last_json(capsys.readouterr().out)["run_id"])
    assert main(["compare", *run_ids, "--registry", str(registry), "--fail-on-regression", "--threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "different data" in out and "ds/test" in out
    line = last_json(out)
    assert line["different_data"] == ["ds/test"] and line["regressions"] == []
    [dataset] = line["datasets"]
    assert dataset["same_data"] is False and "metrics" not in dataset


def test_a_split_whose_grades_are_all_zero_fails(tmp_path: Path, capsys):
    dataset = beir(tmp_path / "ds", qrels="query-id\tcorpus-id\tscore\nq1\td0\t0\nq2\td1\t0\n")
    line = error_line(evaluate(dataset, tmp_path / "out"), capsys)
    assert "'ds' split 'test'" in line and "grade 0" in line


def test_empty_query_texts_are_warned_about_and_counted(tmp_path: Path, capsys):
    queries = '{"_id": "q1", "text": "  "}\n{"_id": "q2", "text": "gamma"}\n'
    assert main(evaluate(beir(tmp_path / "ds", queries=queries), tmp_path / "out")) == 0
    captured = capsys.readouterr()
    assert "1 of 2 queries have empty text (e.g. q1)" in captured.err
    assert last_json(captured.out)["num_empty_queries"] == 1


@pytest.fixture(scope="module")
def hnsw_index(tmp_path_factory) -> Path:
    from retrieval.serving.encode import write_embeddings

    tmp = tmp_path_factory.mktemp("hnsw")
    vectors = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    write_embeddings(tmp / "emb", vectors, [f"d{i}" for i in range(200)])
    assert main(["index", "--embeddings", str(tmp / "emb"), "--factory", "HNSW8", "--output", str(tmp / "index")]) == 0
    return tmp / "index"


@pytest.mark.parametrize(
    "param, expected",
    [
        ("efSearch=-5", r"efSearch=-5: must be a whole number >= 1"),
        ("efSearch=2.5", r"efSearch=2\.5: must be a whole number >= 1"),
        ("efSearch=many", r"efSearch='many': not a number"),
        ("efSerch=64", r"'efSerch' does not apply to the index .*index: its knobs are efSearch"),
        ("nprobe=4", r"'nprobe' does not apply"),
        ("efSearch", r"expected NAME=VALUE"),
    ],
)
def test_search_params_are_validated(hnsw_index: Path, param: str, expected: str, capsys):
    import re

    capsys.readouterr()
    line = error_line(["search", "--index", hnsw_index, "--query", "alpha", "-k", "10", "--param", param], capsys)
    assert re.search(expected, line), line
