"""End to end through the CLI, as a user would: encode -> index -> tune -> search -> evaluate --index.

The real MiniLM is used (not a random tiny BERT) so that rankings are meaningful: a random model
retrieves nothing relevant from the subset, and an ANN-vs-exact comparison at nDCG 0 proves nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from flows.cli import main

MODEL = "minilm"


def run_cli(capsys, *argv: str) -> dict:
    code = main([str(a) for a in argv])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    return json.loads(out.strip().splitlines()[-1])  # the last stdout line is one JSON object


EVALUATE = ["evaluate", "--model", MODEL, "--metrics", "ndcg@10,recall@100", "--top-k", "100", "--no-registry"]


@pytest.fixture(scope="module")
def encoded(scifact_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "emb"
    code = main(["encode", "--model", MODEL, "--dataset", str(scifact_small), "--output", str(out), "--shard-size", "100"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def exact(scifact_small) -> dict:
    """`retroflow evaluate` with exact search (it encodes the corpus itself)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*EVALUATE, "--dataset", str(scifact_small)]) == 0
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def test_encode_output_and_rerun_is_a_no_op(encoded, scifact_small, capsys):
    meta = json.loads((encoded / "embeddings.json").read_text())
    assert meta["layout"] == "merged" and meta["num_shards"] >= 4 and meta["model"] == MODEL
    again = run_cli(capsys, "encode", "--model", MODEL, "--dataset", scifact_small, "--output", encoded, "--shard-size", "100")
    assert again["skipped"] is True
    with pytest.raises(ValueError, match="different model"):
        main(["--verbose", "encode", "--model", MODEL, "--dataset", str(scifact_small), "--output", str(encoded), "--shard-size", "50"])


def test_workers_share_the_encoding_and_the_merge_encodes_nothing_again(encoded, scifact_small, capsys, tmp_path):
    """`--worker I --num-workers N` in N processes, then the command without --worker merges: the
    same vectors as one process."""
    import numpy as np

    common = ["encode", "--model", MODEL, "--dataset", scifact_small, "--output", tmp_path / "emb", "--shard-size", "100"]
    parts = [run_cli(capsys, *common, "--worker", worker, "--num-workers", 2) for worker in (0, 1)]
    assert sum(p["shards_encoded"] for p in parts) == parts[0]["shards_total"] >= 4 and all(p["shards_skipped"] == 0 for p in parts)
    merged = run_cli(capsys, *common)
    assert merged["shards_encoded"] == 0 and merged["shards_skipped"] == parts[0]["shards_total"]
    np.testing.assert_array_equal(np.load(tmp_path / "emb" / "embeddings.npy"), np.load(encoded / "embeddings.npy"))


def test_evaluate_through_flat_index_equals_exact(encoded, exact, scifact_small, capsys, tmp_path):
    built = run_cli(capsys, "index", "--embeddings", encoded, "--factory", "Flat", "--output", tmp_path / "flat")
    assert built["ntotal"] == json.loads((encoded / "embeddings.json").read_text())["num_docs"]
    through_index = run_cli(capsys, *EVALUATE, "--dataset", scifact_small, "--index", tmp_path / "flat")
    assert exact["ndcg@10"] > 0.5  # a real ranking, so agreement below means something
    assert through_index["ndcg@10"] == pytest.approx(exact["ndcg@10"], abs=1e-6)
    assert through_index["recall@100"] == pytest.approx(exact["recall@100"], abs=1e-6)


def test_hnsw_tune_search_and_evaluate(encoded, exact, scifact_small, capsys, tmp_path):
    run_cli(capsys, "index", "--config", "configs/index/hnsw32.yaml", "--embeddings", encoded, "--output", tmp_path / "hnsw")
    tuned = run_cli(
        capsys,
        "tune",
        "--index",
        tmp_path / "hnsw",
        "--dataset",
        scifact_small,
        "--split",
        "train",
        "--dev-dataset",
        scifact_small,
        "--dev-fraction",
        "0.2",
        "--output",
        tmp_path / "tuned",
        "--set",
        "repeats=1",
    )
    assert tuned["target_met"] and tuned["recall"] >= 0.95 and Path(tuned["plot"]).is_file()
    assert tuned["dev"]["num_queries"] == 12 and tuned["dev"]["ndcg@10_loss"] <= tuned["ndcg_tolerance"] == 0.001
    hits = run_cli(capsys, "search", "--index", tmp_path / "tuned", "--query", "vitamin D and bone density", "-k", "5")
    assert hits["num_queries"] == 1 and hits["top"][0] is not None and hits["search_params"] == tuned["search_params"]
    code = main([*EVALUATE, "--dataset", str(scifact_small), "--index", str(tmp_path / "tuned")])
    printed = capsys.readouterr().out
    ann = json.loads(printed.strip().splitlines()[-1])
    assert code == 0 and abs(ann["ndcg@10"] - exact["ndcg@10"]) <= 0.005
    # searched through the index, the row carries exact search's figure beside it (over the index's own vectors)
    assert ann["search"]["approximate"] and ann["exact_search"]["ndcg@10"] == pytest.approx(exact["ndcg@10"], abs=1e-6)
    header = printed.splitlines()[0]
    assert "ndcg@10 exact" in header and "ndcg@10 Δ index" in header
    run = tmp_path / "run.json"
    listed = run_cli(capsys, "search", "--index", tmp_path / "tuned", "--dataset", scifact_small, "--output", run)
    assert listed["num_queries"] == len(json.loads(run.read_text())) == 30
