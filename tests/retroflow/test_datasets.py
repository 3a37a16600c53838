"""The BEIR data layer as a user meets it: good data loads and is cached; bad data fails with
an error that names the file, line and field, and leaves nothing half-written in the cache."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retroflow.data.beir import DatasetError, download_and_unzip, load_dataset, safe_unzip


def write_dataset(
    root: Path, corpus_lines: list[str] | bytes, queries: list[dict] | None = None, qrels: dict[str, str] | None = None
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = corpus_lines if isinstance(corpus_lines, bytes) else ("\n".join(corpus_lines) + "\n").encode()
    (root / "corpus.jsonl").write_bytes(data)
    queries = queries if queries is not None else [{"_id": "q1", "text": "what is x"}, {"_id": "q2", "text": "why y"}]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    qrels = qrels if qrels is not None else {"test": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n"}
    for split, text in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text(text)
    return root


GOOD_CORPUS = [json.dumps({"_id": "d1", "title": "X", "text": "x is a letter"}), json.dumps({"_id": "d2", "text": "y is another"})]


def test_real_scifact_loads_with_expected_sizes(scifact_dir, tmp_path):
    ds = load_dataset(scifact_dir, cache_dir=tmp_path)
    assert ds.num_docs == 5183
    assert ds.splits == ["test", "train"]
    assert len(ds.split_queries("test")) == 300
    assert len(ds.split_queries("train")) == 809


def test_second_load_hits_the_cache_and_content_fingerprint_is_route_independent(tmp_path):
    src = write_dataset(tmp_path / "a", GOOD_CORPUS)
    first = load_dataset(src, cache_dir=tmp_path / "cache")
    (src / "corpus.jsonl").chmod(0o000)  # a re-parse would now fail: the cache must answer
    try:
        second = load_dataset(src, cache_dir=tmp_path / "cache")
    finally:
        (src / "corpus.jsonl").chmod(0o644)
    assert second.fingerprint == first.fingerprint
    assert second.corpus.equals(first.corpus)
    # the same content in another directory normalises to the same fingerprint
    copy = write_dataset(tmp_path / "b", GOOD_CORPUS)
    assert load_dataset(copy, cache_dir=tmp_path / "cache").fingerprint == first.fingerprint
    # changed content, new fingerprint
    changed = write_dataset(tmp_path / "c", GOOD_CORPUS[:1] + [json.dumps({"_id": "d2", "text": "changed"})])
    assert load_dataset(changed, cache_dir=tmp_path / "cache").fingerprint != first.fingerprint


def test_a_dataset_input_keeps_the_name_it_was_given_when_another_copy_was_normalised_first(tmp_path, monkeypatch):
    """The cache is shared by content: a stage reading a `dataset_input` still sees (and writes into
    model cards and metrics) the name the user gave, not the first copy's."""
    from retroflow.data import dataset_input, open_dataset

    monkeypatch.setenv("RETROFLOW_CACHE", str(tmp_path / "cache"))
    first = dataset_input(write_dataset(tmp_path / "first-copy", GOOD_CORPUS))
    second = dataset_input(write_dataset(tmp_path / "mine", GOOD_CORPUS))
    assert first.path == second.path  # one normalised copy
    assert (open_dataset(first).name, open_dataset(second).name) == ("first-copy", "mine")


def test_the_content_fingerprint_of_an_unchanged_dataset_reads_no_table(tmp_path, monkeypatch):
    """A cached re-run keys its `data` step by content: for files unchanged since they were
    normalised that answer comes from the cache's index, without reading a table (MS MARCO's
    corpus is gigabytes); edited files are normalised again."""
    import retroflow.data.beir as beir

    src = write_dataset(tmp_path / "a", GOOD_CORPUS)
    first = load_dataset(src, cache_dir=tmp_path / "cache")

    def no_reading(*args, **kwargs):
        raise AssertionError("a table was read")

    with monkeypatch.context() as patched:
        patched.setattr(beir, "read_normalised", no_reading)
        patched.setattr(beir.pq, "read_table", no_reading)
        assert beir.content_fingerprint(src, cache_dir=tmp_path / "cache") == first.fingerprint
    (src / "corpus.jsonl").write_text("\n".join(GOOD_CORPUS[:1] + [json.dumps({"_id": "d2", "text": "edited"})]) + "\n")
    edited = beir.content_fingerprint(src, cache_dir=tmp_path / "cache")
    assert edited != first.fingerprint and edited == load_dataset(src, cache_dir=tmp_path / "cache").fingerprint


def test_missing_title_defaults_to_empty_and_doc_texts_join_like_beir(tmp_path):
    ds = load_dataset(write_dataset(tmp_path / "d", GOOD_CORPUS), cache_dir=tmp_path / "cache")
    assert ds.doc_texts() == ["X x is a letter", "y is another"]


@pytest.mark.parametrize(
    "corpus, message",
    [
        ([GOOD_CORPUS[0], '{"_id": "d2", "text": "unterminated'], r"corpus\.jsonl, line 2: malformed JSON"),
        ([GOOD_CORPUS[0], json.dumps({"_id": "d2", "title": "t"})], r"corpus\.jsonl, line 2: missing field 'text'"),
        ([json.dumps({"text": "no id"})], r"corpus\.jsonl, line 1: missing field '_id'"),
        ([GOOD_CORPUS[0], GOOD_CORPUS[1], GOOD_CORPUS[0]], r"corpus\.jsonl, line 3: duplicate _id 'd1' \(first seen at line 1\)"),
        ([GOOD_CORPUS[0], "[1, 2]"], r"line 2: expected a JSON object"),
        ([GOOD_CORPUS[0], json.dumps({"_id": "d2", "text": 5})], r"line 2: field 'text' must be a string"),
        ([GOOD_CORPUS[0], json.dumps({"_id": " ", "text": "blank id"})], r"line 2: field '_id' is empty"),
        (
            [GOOD_CORPUS[0], json.dumps({"_id": ["d2"], "text": "list id"})],
            r"line 2: field '_id' must be a string \(or an integer\), got list",
        ),
    ],
)
def test_bad_corpus_lines_are_named(tmp_path, corpus, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(write_dataset(tmp_path / "d", corpus), cache_dir=tmp_path / "cache")


def test_non_utf8_bytes_are_named_with_line_and_column(tmp_path):
    raw = (GOOD_CORPUS[0] + "\n").encode() + b'{"_id": "d2", "text": "caf\xff"}\n'
    with pytest.raises(DatasetError, match=r"corpus\.jsonl, line 2: not valid UTF-8 \(byte 0xff at column 27\)"):
        load_dataset(write_dataset(tmp_path / "d", raw), cache_dir=tmp_path / "cache")


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="corpus is empty"):
        load_dataset(write_dataset(tmp_path / "d", b""), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "qrels, message",
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq9\td2\t1\n", r"test\.tsv, line 3: query-id 'q9' is not in the queries file"),
        ("query-id\tcorpus-id\tscore\nq1\td7\t1\n", r"test\.tsv, line 2: corpus-id 'd7' is not in the corpus"),
        ("query-id\tcorpus-id\tscore\nq1\td1\thigh\n", r"test\.tsv, line 2: field 'score' is not an integer: 'high'"),
        ("query-id\tcorpus-id\tscore\nq1\td1\n", r"test\.tsv, line 2: expected 3 tab-separated fields"),
        (
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq1\td1\t0\n",
            r"test\.tsv, line 4: query-id 'q1', corpus-id 'd1' is graded 0 here but 1 at line 2; conflicting judgments",
        ),
    ],
)
def test_bad_qrels_rows_are_named(tmp_path, qrels, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(write_dataset(tmp_path / "d", GOOD_CORPUS, qrels={"test": qrels}), cache_dir=tmp_path / "cache")


def test_byte_order_mark_and_identical_duplicate_judgments_are_accepted(tmp_path):
    qrels = {"test": "\ufeffquery-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t1\nq2\td2\t1\n"}
    ds = load_dataset(write_dataset(tmp_path / "d", GOOD_CORPUS, qrels=qrels), cache_dir=tmp_path / "cache")
    assert ds.split_qrels("test") == {"q1": {"d1": 1}, "q2": {"d2": 1}}


def test_unknown_ids_can_be_dropped_on_request(tmp_path):
    qrels = {"test": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td7\t1\n"}
    ds = load_dataset(write_dataset(tmp_path / "d", GOOD_CORPUS, qrels=qrels), cache_dir=tmp_path / "cache", on_unknown_ids="drop")
    assert ds.split_qrels("test") == {"q1": {"d1": 1}}


def test_missing_split_lists_the_available_ones(tmp_path):
    ds = load_dataset(write_dataset(tmp_path / "d", GOOD_CORPUS), cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match="no split 'dev'; available splits: test"):
        ds.split_qrels("dev")


def test_failed_validation_leaves_no_cache_entry(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError):
        load_dataset(write_dataset(tmp_path / "d", [GOOD_CORPUS[0], "{bad"]), cache_dir=cache)
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == []


def test_missing_source_suggests_the_data_dir_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("RETROFLOW_DATA_DIR", raising=False)
    with pytest.raises(DatasetError, match="RETROFLOW_DATA_DIR"):
        load_dataset("no-such-dataset", cache_dir=tmp_path)


def test_bare_name_resolves_under_data_dir(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("RETROFLOW_DATA_DIR", str(shared_data))
    assert load_dataset("trec-dl-2019-subset5k", cache_dir=tmp_path).num_docs == 5000


def test_huggingface_layout_with_parquet_and_sibling_qrels(tmp_path):
    root = tmp_path / "scifact-hf"
    (root / "corpus").mkdir(parents=True)
    (root / "queries").mkdir()
    pq.write_table(
        pa.table({"_id": ["d1", "d2"], "title": ["X", ""], "text": ["x is a letter", "y is another"]}),
        root / "corpus" / "corpus-00000.parquet",
    )
    (root / "queries" / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what is x"}) + "\n")
    qrels = tmp_path / "scifact-hf-qrels"
    (qrels / "test").mkdir(parents=True)
    pq.write_table(pa.table({"query-id": ["q1"], "corpus-id": ["d1"], "score": [1]}), qrels / "test" / "0000.parquet")
    ds = load_dataset(root, cache_dir=tmp_path / "cache")
    assert ds.doc_ids() == ["d1", "d2"]
    assert ds.split_qrels("test") == {"q1": {"d1": 1}}


def make_zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def test_safe_unzip_refuses_path_escapes(tmp_path):
    archive = make_zip(tmp_path / "evil.zip", {"ok/corpus.jsonl": "{}", "../../escaped.txt": "pwned"})
    with pytest.raises(DatasetError, match="escape"):
        safe_unzip(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert not (tmp_path / "out").exists()


def test_zip_url_is_checksum_verified_downloaded_once_and_loaded(tmp_path):
    src = write_dataset(tmp_path / "toy", GOOD_CORPUS)
    archive = make_zip(tmp_path / "toy.zip", {f"toy/{p.relative_to(src)}": p.read_text() for p in src.rglob("*") if p.is_file()})
    url = archive.as_uri().replace("file://", "file://")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(DatasetError, match="without a checksum"):
        download_and_unzip(url, tmp_path / "cache", None)
    with pytest.raises(DatasetError, match="sha256 is"):
        download_and_unzip(url, tmp_path / "cache", "sha256:" + "0" * 64)
    unpacked = download_and_unzip(url, tmp_path / "cache", f"sha256:{digest}")
    archive.unlink()  # a second call must not download again
    assert download_and_unzip(url, tmp_path / "cache", f"sha256:{digest}") == unpacked
    assert load_dataset(unpacked / "toy", cache_dir=tmp_path / "cache").num_docs == 2


def test_a_beir_style_zip_loads_from_a_file_url_with_the_checksum_flag(tmp_path, capsys):
    from flows.cli import main

    src = write_dataset(tmp_path / "toy", GOOD_CORPUS)
    archive = make_zip(tmp_path / "toy.zip", {f"toy/{p.relative_to(src)}": p.read_text() for p in src.rglob("*") if p.is_file()})
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    # one top-level folder, as BEIR's own zips have it; a file:// URL; the checksum from the CLI
    assert main(["evaluate", "--model", "bm25", "--dataset", archive.as_uri(), "--checksum", f"sha256:{digest}", "--no-registry"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_docs"] == 2


def test_an_unknown_checksum_algorithm_fails_before_downloading_and_leaves_nothing(tmp_path):
    archive = make_zip(tmp_path / "toy.zip", {"toy/corpus.jsonl": GOOD_CORPUS[0] + "\n"})
    with pytest.raises(DatasetError, match=r"unknown algorithm 'sha999'"):
        download_and_unzip(archive.as_uri(), tmp_path / "cache", "sha999:abc")
    assert not list((tmp_path / "cache").rglob("*.part"))
