"""Sharded, resumable corpus encoding (retrieval/serving/encode.py) on the real SciFact subset with a tiny BERT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.serving.encode import (
    EncodeConfig,
    NonFiniteVectors,
    merge_shards,
    open_embeddings,
    plan_shards,
    run,
    run_shard,
    shard_name,
    shard_texts,
    worker_shards,
    write_embeddings,
)
from retrieval.serving.encoder import Encoder
from retroflow.config import ConfigError, load_config
from retroflow.data import dataset_input
from retroflow.data.beir import load_dataset
from retroflow.inputs import model_input

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(scifact_small):
    return load_dataset(scifact_small)


@pytest.fixture(scope="module")
def config() -> EncodeConfig:
    return EncodeConfig(shard_size=64, encoder={"show_progress": False, "precision": "fp32"})


@pytest.fixture(scope="module")
def inputs(dataset, tiny_bert) -> dict:
    """The stage's inputs outside the store: the dataset and the model."""
    return {"data": dataset_input(dataset), "model": model_input(tiny_bert)}


@pytest.fixture(scope="module")
def encoder(config, tiny_bert) -> Encoder:
    return Encoder(tiny_bert, config.encoder)


def encode_these(config: EncodeConfig, inputs: dict, shards_dir: Path, shards: list[int]) -> None:
    for shard in shards:
        run_shard(config, inputs, shard, shards_dir)


@pytest.fixture(scope="module")
def reference(dataset, encoder) -> np.ndarray:
    """The whole corpus encoded in one go: what any sharded run must reproduce."""
    return encoder.encode_passages(dataset.doc_texts())


def test_plan_covers_every_doc_once():
    plan = plan_shards(1001, 250)
    assert [len(r) for r in plan] == [250, 250, 250, 250, 1]
    assert [i for r in plan for i in r] == list(range(1001))
    assert plan_shards(0, 10) == []
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(10, 0)


def test_worker_assignment_partitions_shards():
    assigned = [worker_shards(10, w, 3) for w in range(3)]
    assert sorted(i for a in assigned for i in a) == list(range(10))
    with pytest.raises(ValueError):
        worker_shards(10, 3, 3)


def test_shard_texts_match_corpus_texts(dataset):
    texts = dataset.doc_texts()
    joined = [t for r in plan_shards(dataset.num_docs, 97) for t in shard_texts(dataset, r)]
    assert joined == texts


def test_resume_after_simulated_kill_has_no_duplicate_or_missing_ids(dataset, config, inputs, reference, tmp_path, monkeypatch):
    partial, out = tmp_path / "partial", tmp_path / "out"
    calls = {"n": 0}
    real_encode = Encoder.encode_passages

    def dies_on_third_shard(self, texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_encode(self, texts)

    monkeypatch.setattr(Encoder, "encode_passages", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run(config, inputs, out, partial)
    finished = sorted(p.name for p in partial.iterdir() if p.name.startswith("shard-"))
    assert finished == [shard_name(0), shard_name(1)]
    assert not list(partial.glob(".shard-*"))  # the interrupted shard left no half-written files
    mtimes = {name: (partial / name / "embeddings.npy").stat().st_mtime_ns for name in finished}
    monkeypatch.setattr(Encoder, "encode_passages", real_encode)

    metrics = run(config, inputs, out, partial)
    assert metrics["shards_skipped"] == 2
    assert metrics["shards_encoded"] == len(plan_shards(dataset.num_docs, config.shard_size)) - 2
    assert {name: (partial / name / "embeddings.npy").stat().st_mtime_ns for name in finished} == mtimes
    emb = open_embeddings(out)
    ids = emb.ids.to_pylist()
    assert ids == dataset.doc_ids() and len(set(ids)) == len(ids)
    np.testing.assert_allclose(emb.vectors(), reference, atol=1e-5)


def test_two_workers_share_a_directory_and_merge(dataset, config, inputs, reference, tmp_path):
    shards_dir = tmp_path / "shards"
    num_shards = len(plan_shards(dataset.num_docs, config.shard_size))
    for worker in range(2):  # what two processes/GPUs do, one after the other here
        encode_these(config, inputs, shards_dir, worker_shards(num_shards, worker, 2))
    again = run_shard(config, inputs, 1, shards_dir)  # a late duplicate task
    assert again["skipped"] is True
    merge_shards(shards_dir, tmp_path / "out", num_shards)
    emb = open_embeddings(tmp_path / "out")
    assert emb.ids.to_pylist() == dataset.doc_ids()
    np.testing.assert_allclose(np.asarray(emb.vectors()), reference, atol=1e-5)


def test_a_corpus_encoded_by_two_forward_passes_says_so(dataset, config, inputs, tmp_path, caplog):
    """Device is not in the shard key (fp32 agrees across devices), but a bf16 corpus whose shards
    came from a CPU's fused forward and a GPU's autocast one agrees only to rounding: the
    embeddings record which forwards made them, and a mixed corpus is a warning, not silent."""
    shards_dir = tmp_path / "shards"
    num_shards = len(plan_shards(dataset.num_docs, config.shard_size))
    encode_these(config, inputs, shards_dir, list(range(num_shards)))
    merged = merge_shards(shards_dir, tmp_path / "one", num_shards, merge=False)
    assert json.loads((tmp_path / "one" / "embeddings.json").read_text())["forwards"] == ["fused float32 on cpu"], merged

    encode_these(config, inputs, shards_dir, list(range(num_shards)))
    meta_file = shards_dir / shard_name(1) / "shard.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "forward": "hf bfloat16 on cuda"}))  # as a GPU worker would record
    with caplog.at_level("WARNING", logger="retrieval.serving.encode"):
        merge_shards(shards_dir, tmp_path / "two", num_shards)
    assert json.loads((tmp_path / "two" / "embeddings.json").read_text())["forwards"] == ["fused float32 on cpu", "hf bfloat16 on cuda"]
    assert "different forward passes" in caplog.text and "agree only to rounding" in caplog.text


def test_merge_refuses_missing_shard(config, inputs, tmp_path):
    encode_these(config, inputs, tmp_path, [0, 2])
    with pytest.raises(ValueError, match=r"missing or incomplete \(1"):
        merge_shards(tmp_path, tmp_path / "out", 3)


def test_shards_from_another_config_are_not_mixed(config, inputs, tmp_path):
    run_shard(config, inputs, 0, tmp_path)
    other = config.with_overrides(encoder={"pooling": "mean"})
    with pytest.raises(ValueError, match="different model/encoder"):
        run_shard(other, inputs, 0, tmp_path)


def test_shards_of_a_model_changed_in_place_are_not_mixed(dataset, config, tiny_bert, tmp_path):
    """A model folder retrained (rewritten) under the same path is another model: shards made
    before are refused, not taken for its own."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    run_shard(config, {"data": dataset_input(dataset), "model": model_input(model)}, 0, tmp_path / "shards")
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")  # the same size, other weights
    with pytest.raises(ValueError, match="different model/encoder"):
        run_shard(config, {"data": dataset_input(dataset), "model": model_input(model)}, 0, tmp_path / "shards")


@pytest.mark.parametrize("dtype, bad", [("float32", np.nan), ("float16", 1e6)])  # 1e6 overflows float16 to inf
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_a_shard_with_non_finite_vectors_is_refused_naming_the_doc(dataset, config, inputs, tmp_path, monkeypatch, dtype, bad):
    """A model producing NaN (or values float16 cannot hold) used to give a shard like any other."""
    real_encode = Encoder.encode_passages

    def poisoned(self, texts):
        vectors = real_encode(self, texts)
        vectors[3, 1] = bad
        return vectors

    monkeypatch.setattr(Encoder, "encode_passages", poisoned)
    doc = dataset.doc_ids()[config.shard_size + 3]
    with pytest.raises(NonFiniteVectors, match=rf"shard-00001: row 3 \(doc id '{doc}'\) is not finite"):
        run_shard(config.with_overrides(dtype=dtype), inputs, 1, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no shard, no staging left


@pytest.mark.parametrize("merge", [True, False])
def test_merge_and_open_refuse_non_finite_vectors(dataset, config, inputs, tmp_path, merge):
    """Shards damaged on disk (or written by another tool) are refused when merged or opened."""
    shards = tmp_path / "shards"
    encode_these(config, inputs, shards, [0, 1])
    vectors = np.load(shards / shard_name(1) / "embeddings.npy", mmap_mode="r+")
    vectors[5, 0] = np.inf
    vectors.flush()
    del vectors
    doc = dataset.doc_ids()[config.shard_size + 5]
    with pytest.raises(NonFiniteVectors, match=rf"shard-00001/embeddings.npy: row 5 \(doc id '{doc}'\)"):
        merge_shards(shards, tmp_path / "out", 2, merge=merge)
    assert (shards / shard_name(1)).is_dir() and not (tmp_path / "out" / "embeddings.json").exists()

    loose = np.ones((6, 3), np.float32)
    loose[4, 2] = np.nan
    written = write_embeddings(tmp_path / "loose", loose, [f"d{i}" for i in range(6)])
    with pytest.raises(NonFiniteVectors, match=r"loose/embeddings.npy: row 4 \(doc id 'd4'\) is not finite"):
        open_embeddings(written)
    assert open_embeddings(written, check_finite=False).num_docs == 6  # metadata only


def test_float16_unmerged_layout_is_memory_mapped(dataset, config, inputs, reference, tmp_path):
    cfg = config.with_overrides(dtype="float16", merge=False)
    metrics = run(cfg, inputs, tmp_path / "out", tmp_path / "partial")
    assert metrics["layout"] == "sharded" and metrics["dtype"] == "float16"
    emb = open_embeddings(tmp_path / "out")
    assert all(isinstance(p, np.memmap) and p.dtype == np.float16 for p in emb.parts)
    assert emb.ids.to_pylist() == dataset.doc_ids()
    np.testing.assert_allclose(emb.vectors(), reference, atol=2e-2)
    rows = np.array([5, 0, dataset.num_docs - 1, 70])
    np.testing.assert_allclose(emb.rows(rows), reference[rows], atol=2e-2)


@pytest.mark.slow
def test_cli_encode_survives_sigkill(scifact_small, tiny_bert, dataset, tmp_path):
    """`retroflow encode` killed with SIGKILL mid-run, then re-run: every id exactly once."""
    out = tmp_path / "emb"
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "encode",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(scifact_small),
        "--output",
        str(out),
        "--shard-size",
        "20",
        "--batch-size",
        "4",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 50
    while time.time() < deadline and len(list((out / "shards").glob("shard-*"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "shards").glob("shard-*")))
    assert 2 <= done_before < len(plan_shards(dataset.num_docs, 20)), "the kill should land mid-run"
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] >= done_before
    ids = open_embeddings(out).ids.to_pylist()
    assert ids == dataset.doc_ids() and len(set(ids)) == len(ids)
    assert not (out / "shards").exists()


def test_a_shard_path_outside_the_embeddings_directory_is_refused(tmp_path):
    """embeddings.json may come from elsewhere: a listed shard `../x` must not make the reader
    open files outside the directory."""
    import json

    from retrieval.serving.encode import META_FILE

    written = write_embeddings(tmp_path / "emb", np.ones((2, 3), np.float32), ["d0", "d1"])
    meta = json.loads((written / META_FILE).read_text())
    meta.update(layout="sharded", shards=[{"path": "../elsewhere"}])
    (written / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"embeddings.json: lists '\.\./elsewhere', which is not a file or folder name inside"):
        open_embeddings(written)


@pytest.mark.parametrize(("field", "flag"), [("model", "--model"), ("dataset", "--dataset")])
def test_a_config_naming_an_input_is_a_one_line_error_naming_the_flag(tmp_path, field, flag):
    """`model` and `dataset` are the stage's inputs now: an old YAML that sets them says what to pass instead."""
    old = tmp_path / "encode.yaml"
    old.write_text(f"{field}: x\nshard_size: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(EncodeConfig, old)
    message = str(info.value)
    assert "\n" not in message and f"field '{field}'" in message and flag in message and str(old) in message


def test_cli_encode_without_its_inputs_names_the_flag(scifact_small, tiny_bert, tmp_path, capsys):
    from flows.cli import main

    assert main(["encode", "--model", str(tiny_bert), "--output", str(tmp_path / "emb")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--dataset" in errors[0], errors
