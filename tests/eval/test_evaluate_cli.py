"""`retroflow evaluate` as a user runs it: a table, then one JSON line; errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows.cli import main


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_bm25_prints_table_then_json_line(scifact_small, capsys, tmp_path):
    out_file = tmp_path / "result.json"
    code = main(["evaluate", "--model", "bm25", "--dataset", str(scifact_small), "--output", str(out_file)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed.splitlines()[0]
    result = last_json_line(printed)
    for key in ("ndcg@10", "recall@100", "mrr@10", "map@100", "num_queries", "num_docs", "encode_docs_per_s", "model", "dataset"):
        assert key in result
    assert result["num_queries"] == 30 and result["model"] == "bm25"
    # BM25 is deterministic: these are its scores on this subset (bm25s defaults), pinned as a regression
    assert result["ndcg@10"] == pytest.approx(0.78945, abs=1e-4) and result["mrr@10"] == pytest.approx(0.77778, abs=1e-4)
    written = json.loads(out_file.read_text())
    assert len(written["per_query"]["ndcg@10"]) == 30
    assert sum(written["per_query"]["ndcg@10"].values()) / 30 == pytest.approx(result["ndcg@10"])


def test_dense_model_on_tiny_bert_reports_throughput(scifact_small, tiny_bert, capsys):
    args = ["evaluate", "--model", str(tiny_bert), "--dataset", str(scifact_small), "--set", "encoder.show_progress=false"]
    assert main(args) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["encode_docs_per_s"] > 0 and result["num_docs"] == 402


def test_bad_input_exits_2_with_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "evaluate", "--model", "bm25", "--dataset", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "error: dataset source" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_config_key_names_the_field(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("topk: 10\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "evaluate", "--config", str(cfg), "--model", "bm25"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "field 'topk'" in proc.stderr and str(cfg) in proc.stderr


@pytest.mark.parametrize(
    ("field", "flag"), [("model", "--model"), ("dataset", "--dataset"), ("index", "--index"), ("embeddings", "--embeddings")]
)
def test_a_config_naming_what_is_evaluated_says_which_flag_to_pass(tmp_path, capsys, field, flag):
    """What is evaluated travels in flags (the stage: its inputs), never in the config: an old YAML gets one line naming both."""
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"{field}: x\ntop_k: 10\n")
    assert main(["evaluate", "--config", str(cfg), "--model", "bm25", "--no-registry"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"field '{field}'" in errors[0] and flag in errors[0] and str(cfg) in errors[0], errors


def test_embeddings_flag_searches_those_vectors_exactly(scifact_small, tiny_bert, tmp_path, capsys):
    """--embeddings (once `--set embeddings=DIR`): exact search over an encoded corpus, the same ranking as encoding it here."""
    common = ["--model", str(tiny_bert), "--dataset", str(scifact_small), "--set", "encoder.precision=fp32"]
    args = ["evaluate", *common, "--no-registry", "--set", "encoder.show_progress=false"]
    assert main(["encode", *common, "--output", str(tmp_path / "emb")]) == 0
    capsys.readouterr()
    assert main(args) == 0
    encoded_here = last_json_line(capsys.readouterr().out)
    assert main([*args, "--embeddings", str(tmp_path / "emb")]) == 0
    given = last_json_line(capsys.readouterr().out)
    assert given["encode_docs_per_s"] is None and encoded_here["encode_docs_per_s"] > 0
    assert given["ndcg@10"] == pytest.approx(encoded_here["ndcg@10"], abs=1e-6)


def test_on_unknown_ids_flag_drops_qrels_rows_naming_unknown_documents(tmp_path, capsys):
    root = tmp_path / "d"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "text": "the alphabet has letters"})
        + "\n"
        + json.dumps({"_id": "d2", "text": "numbers count things"})
        + "\n"
    )
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "alphabet letters"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n")
    base = ["evaluate", "--model", "bm25", "--dataset", str(root), "--no-registry"]
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *base], capture_output=True, text=True)
    assert proc.returncode == 2 and "corpus-id 'd9' is not in the corpus" in proc.stderr
    assert main([*base, "--on-unknown-ids", "drop"]) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["num_queries"] == 1 and result["ndcg@10"] == 1.0
