"""MS MARCO / TREC DL: readers, MRR@10 and graded conventions checked against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eval.evaluate import EvaluateConfig, Target, evaluate
from flows.cli import main
from retroflow.data.beir import DatasetError
from retroflow.data.msmarco import (
    binary_relevance_level,
    iter_triples,
    load_msmarco,
    read_collection,
    read_qrels,
    read_queries,
    read_run,
    read_top1000,
)


@pytest.fixture(autouse=True)
def _tmp_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETROFLOW_REGISTRY", str(tmp_path / "registry.parquet"))


PASSAGES = {
    "0": "The Manhattan Project produced the first nuclear weapons during World War II.",
    "1": "Photosynthesis converts light energy into chemical energy in plants.",
    "2": "The mitochondria is the powerhouse of the cell and makes ATP.",
    "3": "Paris is the capital and most populous city of France.",
    "4": "Rome was the capital of the Roman Empire for centuries.",
    "5": "Chlorophyll absorbs light most strongly in the blue and red wavelengths.",
    "6": "Berlin is the capital of Germany since reunification.",
    "7": "ATP synthase produces adenosine triphosphate in mitochondria.",
    "8": "The Eiffel Tower is a wrought iron tower in Paris, France.",
    "9": "Nuclear fission splits heavy atoms and releases energy.",
    "10": "Glucose is produced by photosynthesis in chloroplasts.",
    "11": "A passage about nothing in particular.",
}
QUERIES = {"100": "capital of France", "101": "what makes ATP in the cell", "102": "photosynthesis light energy"}


def write_msmarco_dir(root: Path, qrels_lines: list[str], queries: dict[str, str] = QUERIES, split: str = "dev.small") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "collection.tsv").write_text("".join(f"{pid}\t{text}\n" for pid, text in PASSAGES.items()))
    (root / f"queries.{split}.tsv").write_text("".join(f"{qid}\t{text}\n" for qid, text in queries.items()))
    (root / f"qrels.{split}.tsv").write_text("".join(line + "\n" for line in qrels_lines))
    return root


def write_run(path: Path, ranking: dict[str, list[str]]) -> Path:
    """MS MARCO run format: qid<TAB>pid<TAB>rank."""
    path.write_text("".join(f"{qid}\t{pid}\t{rank}\n" for qid, pids in ranking.items() for rank, pid in enumerate(pids, start=1)))
    return path


def score_run_file(dataset_dir: Path, run_path: Path, split: str = "dev.small", **config) -> dict:
    config = EvaluateConfig(suite="msmarco", split=split, run_file=str(run_path), **config)
    return evaluate(config, Target(model="minilm", dataset=str(dataset_dir)), load_msmarco(dataset_dir))


# --- readers ---------------------------------------------------------------------------


def test_readers_parse_the_official_formats(tmp_path: Path) -> None:
    root = write_msmarco_dir(tmp_path / "ms", ["100\t0\t3\t1", "100\t0\t8\t1", "101 0 2 1"])
    corpus = read_collection(root / "collection.tsv")
    assert corpus.column_names == ["_id", "title", "text"]
    assert corpus.num_rows == len(PASSAGES) and corpus.column("text")[3].as_py() == PASSAGES["3"]
    assert read_queries(root / "queries.dev.small.tsv") == QUERIES
    assert read_qrels(root / "qrels.dev.small.tsv") == {"100": {"3": 1, "8": 1}, "101": {"2": 1}}

    (tmp_path / "top1000.dev").write_text(
        "100\t3\tcapital of France\tParis is...\n100\t4\tcapital of France\tRome was...\n101\t2\tATP\tThe mito...\n"
    )
    top = read_top1000(tmp_path / "top1000.dev")
    assert top.candidates == {"100": ["3", "4"], "101": ["2"]}
    assert top.queries["101"] == "ATP" and top.passages["4"] == "Rome was..."

    (tmp_path / "triples.train.small.tsv").write_text("q one\tpositive one\tnegative one\nq two\tpos two\tneg two\n")
    assert list(iter_triples(tmp_path / "triples.train.small.tsv")) == [
        ("q one", "positive one", "negative one"),
        ("q two", "pos two", "neg two"),
    ]

    (tmp_path / "run.trec").write_text("100 Q0 3 1 12.5 bm25\n100 Q0 4 2 11.0 bm25\n")
    assert read_run(tmp_path / "run.trec") == {"100": {"3": 12.5, "4": 11.0}}


@pytest.mark.parametrize(
    "filename, content, message",
    [
        ("collection.tsv", "0\tfine\n1\tbroken\textra field\n", "line 2: expected 2 tab-separated fields"),
        ("collection.tsv", "0\tfirst\n1\tsecond\n0\tagain\n", "line 3: duplicate passage id '0' (first seen at line 1)"),
        ("queries.dev.tsv", "1\tok\n2\n", "line 2: expected 2 tab-separated fields"),
        ("qrels.dev.tsv", "1 0 5 1\n1 0 6 high\n", "line 2: field 'grade' is not an integer"),
        ("run.tsv", "1\t5\t1\n1\t5\t2\n", "line 2: passage '5' appears twice"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path: Path, filename: str, content: str, message: str) -> None:
    path = tmp_path / filename
    path.write_text(content)
    reader = {"collection.tsv": read_collection, "queries.dev.tsv": read_queries, "qrels.dev.tsv": read_qrels, "run.tsv": read_run}[
        filename
    ]
    with pytest.raises(DatasetError) as err:
        reader(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_directory_with_unmatched_qrels_is_refused(tmp_path: Path) -> None:
    root = write_msmarco_dir(tmp_path / "ms", ["100\t0\t3\t1"])
    (root / "qrels.train.tsv").write_text("100\t0\t3\t1\n")
    with pytest.raises(DatasetError, match="qrels.train.tsv: no matching queries file"):
        load_msmarco(root)


def test_official_directory_becomes_a_dataset_with_its_splits(tmp_path: Path) -> None:
    root = write_msmarco_dir(tmp_path / "msmarco-mini", ["100\t0\t3\t1", "101\t0\t2\t1"])
    dataset = load_msmarco(root)
    assert dataset.name == "msmarco-mini" and dataset.num_docs == len(PASSAGES)
    assert dataset.split_qrels("dev.small") == {"100": {"3": 1}, "101": {"2": 1}}
    assert dataset.split_queries("dev.small") == {"100": QUERIES["100"], "101": QUERIES["101"]}
    assert load_msmarco(root).fingerprint == dataset.fingerprint  # second load: cached conversion


# --- MRR@10 and friends, by hand -------------------------------------------------------


def test_mrr_at_10_follows_msmarco_conventions(tmp_path: Path) -> None:
    queries = {**QUERIES, "103": "nuclear weapons", "104": "unanswered query"}
    root = write_msmarco_dir(
        tmp_path / "ms", ["100\t0\t3\t1", "101\t0\t7\t1", "101\t0\t2\t1", "102\t0\t11\t1", "103\t0\t0\t1", "104\t0\t9\t1"], queries
    )
    filler = [str(i) for i in range(12) if i not in (11,)]
    run = {
        "100": ["8", "3", "4"],  # first relevant at rank 2 -> 1/2
        "101": ["2", "7"],  # rank 1 -> 1 (a second relevant one does not add)
        "102": filler[:10] + ["11"],  # relevant at rank 11: outside the top 10 -> 0
        "103": ["9", "5", "0"],  # rank 3 -> 1/3
        # 104 is judged but missing from the run: counts as 0, as msmarco_eval.py divides by all judged queries
    }
    result = score_run_file(root, write_run(tmp_path / "run.tsv", run), metrics=["mrr@10", "recall@50"])
    assert result["per_query"]["mrr@10"] == pytest.approx({"100": 0.5, "101": 1.0, "102": 0.0, "103": 1 / 3, "104": 0.0})
    assert result["mrr@10"] == pytest.approx((0.5 + 1 + 0 + 1 / 3 + 0) / 5)
    assert result["per_query"]["recall@50"] == pytest.approx({"100": 1.0, "101": 1.0, "102": 1.0, "103": 1.0, "104": 0.0})
    assert result["relevance_level"] == 1  # binary qrels


def test_ties_are_broken_by_descending_passage_id(tmp_path: Path) -> None:
    root = write_msmarco_dir(tmp_path / "ms", ["100\t0\t3\t1"], {"100": QUERIES["100"]})
    run_path = tmp_path / "tied.trec"
    # All three tie; trec_eval's order for ties is passage id descending: 8, 4, 3 -> relevant at rank 3.
    run_path.write_text("100 Q0 3 1 1.0 t\n100 Q0 8 2 1.0 t\n100 Q0 4 3 1.0 t\n")
    result = score_run_file(root, run_path, metrics=["mrr@10"])
    assert result["mrr@10"] == pytest.approx(1 / 3)


def test_graded_qrels_count_grade_two_and_up_for_binary_metrics(tmp_path: Path) -> None:
    # TREC DL style grades 0-3; query 101 has only grade-1 judgments: not relevant at level 2, so not scored.
    qrels = ["100 Q0 8 1", "100 Q0 3 3", "100 Q0 4 2", "100 Q0 6 0", "101 Q0 2 1", "101 Q0 7 1"]
    root = write_msmarco_dir(tmp_path / "dl", qrels, split="dl19")
    run = {"100": ["8", "3", "6", "1"], "101": ["2", "7"]}
    result = score_run_file(root, write_run(tmp_path / "run.tsv", run), split="dl19", metrics=["mrr@10", "recall@50", "ndcg@10"])
    assert result["relevance_level"] == 2
    assert result["num_scored_queries"] == 1 and set(result["per_query"]["mrr@10"]) == {"100"}
    assert result["mrr@10"] == pytest.approx(0.5)  # grade-1 passage 8 at rank 1 does not count
    assert result["recall@50"] == pytest.approx(0.5)  # passages 3 (grade 3) found, 4 (grade 2) not
    # nDCG uses the grades themselves as gains (trec_eval): ranks 1..4 hold grades 1, 3, 0, 0.
    dcg = 1 / math.log2(2) + 3 / math.log2(3)
    ideal = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert result["ndcg@10"] == pytest.approx(dcg / ideal)


def test_graded_level_is_configurable_and_binary_qrels_keep_level_one() -> None:
    assert binary_relevance_level({"q": {"d": 1, "e": 0}}) == 1
    assert binary_relevance_level({"q": {"d": 3}}) == 2
    assert binary_relevance_level({"q": {"d": 3}}, graded_level=1) == 1


def test_query_id_equal_to_a_passage_id_is_not_a_self_hit(tmp_path: Path) -> None:
    # MS MARCO query ids and passage ids are separate number ranges: passage "3" relevant to query "3".
    root = write_msmarco_dir(tmp_path / "ms", ["3\t0\t3\t1"], {"3": "capital of France"})
    result = score_run_file(root, write_run(tmp_path / "run.tsv", {"3": ["3"]}), metrics=["mrr@10"])
    assert result["mrr@10"] == 1.0


# --- the command a user runs -----------------------------------------------------------


def last_json(capsys: pytest.CaptureFixture) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_msmarco_suite_with_bm25_registers_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_msmarco_dir(tmp_path / "ms", ["100\t0\t3\t1", "101\t0\t2\t1", "101\t0\t7\t1", "102\t0\t1\t1"])
    registry = tmp_path / "runs.parquet"
    code = main(
        ["evaluate", "--suite", "msmarco", "--model", "bm25", "--dataset", str(root), "--split", "dev.small", "--registry", str(registry)]
    )
    assert code == 0
    line = last_json(capsys)
    assert set(line) >= {"mrr@10", "recall@50", "recall@1000", "ndcg@10", "run_id"}
    assert line["mrr@10"] == 1.0  # each query shares its key words with its relevant passage only
    import pandas as pd

    table = pd.read_parquet(registry)
    assert set(table["metric"]) == {"mrr@10", "recall@50", "recall@1000", "ndcg@10"}
    assert set(table["run_id"]) == {line["run_id"]} and set(table["suite"]) == {"msmarco"}


def test_cli_on_the_real_trec_dl_subset_with_bm25(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        ["evaluate", "--suite", "msmarco", "--model", "bm25", "--dataset", str(shared_data / "trec-dl-2019-subset5k"), "--no-registry"]
    )
    assert code == 0
    line = last_json(capsys)
    assert line["run_id"] is None and not (tmp_path / "registry.parquet").exists()
    assert line["num_queries"] == 43 and line["num_docs"] == 5000 and line["relevance_level"] == 2
    # BM25 is deterministic: its scores on this subset, pinned as a regression (on the full 8.8M-passage
    # collection DL19 BM25 gets 0.48-0.51 nDCG@10; over 5k passages with graded qrels it is higher)
    assert line["ndcg@10"] == pytest.approx(0.72883, abs=1e-4) and line["mrr@10"] == pytest.approx(0.80216, abs=1e-4)
