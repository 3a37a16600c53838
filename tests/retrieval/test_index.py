"""FAISS index build / save / load / search (retrieval/serving/index.py) on small clustered synthetic vectors."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import clustered

from retrieval.serving.encode import write_embeddings
from retrieval.serving.index import (
    IndexConfig,
    _load_index_cached,
    gpu_count,
    load_index,
    run,
    search_with_index,
    to_gpu,
)
from retrieval.serving.search import exact_search
from retroflow.config import ConfigError, load_config
from retroflow.inputs import path_input

REPO = Path(__file__).resolve().parents[2]


def build_index(config: IndexConfig, embeddings: Path, out: Path) -> dict:
    """The index stage over an embeddings directory outside the store."""
    return run(config, {"embeddings": path_input(embeddings)}, out, out.parent / "partial")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray, list[str]]:
    docs = clustered(3000, 32, 40, seed=0)
    # queries near (not on) corpus points, like real queries near their relevant passages
    queries = docs[np.random.default_rng(2).choice(len(docs), 200, replace=False)] + 0.05 * np.random.default_rng(3).normal(
        size=(200, 32)
    ).astype(np.float32)
    ids = [f"doc-{i}" for i in range(len(docs))]
    path = write_embeddings(tmp_path_factory.mktemp("emb") / "emb", docs, ids, model="synthetic")
    return path, docs, queries.astype(np.float32), ids


def exact_ids(docs, queries, ids, k):
    scores, idx = exact_search(docs, queries, k)
    return scores, [[ids[j] for j in row] for row in idx]


def recall(found: list[list[str | None]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_flat_index_matches_exact_search(data, tmp_path):
    emb, docs, queries, ids = data
    build_index(IndexConfig(factory="Flat"), emb, tmp_path / "flat")
    scores, found = search_with_index(tmp_path / "flat", queries, 10)
    ref_scores, ref_ids = exact_ids(docs, queries, ids, 10)
    assert found == ref_ids
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,PQ8x4", "OPQ4,IVF16,PQ4x4", "IVF16,SQ8"])
def test_save_load_round_trip_gives_identical_results(data, tmp_path, factory):
    emb, docs, queries, ids = data
    out = tmp_path / "idx"
    build_index(IndexConfig(factory=factory, opq_iterations=2, train_size=1000), emb, out)
    before = search_with_index(out, queries, 10)
    _load_index_cached.cache_clear()  # force a fresh read of the files
    index = faiss.read_index(str(out / "index-00000.faiss"))
    assert index.ntotal == len(docs)
    after = search_with_index(out, queries, 10)
    np.testing.assert_array_equal(before[0], after[0])
    assert before[1] == after[1]


def test_hnsw_recall_against_exact(data, tmp_path):
    emb, docs, queries, ids = data
    build_index(IndexConfig(factory="HNSW32", ef_search=64), emb, tmp_path / "hnsw")
    _, found = search_with_index(tmp_path / "hnsw", queries, 10)
    assert recall(found, exact_ids(docs, queries, ids, 10)[1]) >= 0.97


def test_index_shards_search_equals_single_index(data, tmp_path):
    emb, docs, queries, ids = data
    metrics = build_index(IndexConfig(factory="Flat", num_shards=3), emb, tmp_path / "sharded")
    assert metrics["num_shards"] == 3 and len(list((tmp_path / "sharded").glob("index-*.faiss"))) == 3
    loaded = load_index(tmp_path / "sharded")
    assert isinstance(loaded.index, faiss.IndexShards) and loaded.index.ntotal == len(docs)
    scores, found = search_with_index(tmp_path / "sharded", queries, 10)
    ref_scores, ref_ids = exact_ids(docs, queries, ids, 10)
    assert found == ref_ids
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_sharded_ivf_shares_one_trained_quantizer(data, tmp_path):
    emb, docs, queries, ids = data
    build_index(IndexConfig(factory="IVF16,Flat", num_shards=2, nprobe=16), emb, tmp_path / "ivf")
    indexes = [faiss.read_index(str(p)) for p in sorted((tmp_path / "ivf").glob("index-*.faiss"))]  # keep them alive
    centroids = [faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 16) for index in indexes]
    np.testing.assert_array_equal(centroids[0], centroids[1])
    _, found = search_with_index(tmp_path / "ivf", queries, 10)  # nprobe = nlist: exhaustive
    assert found == exact_ids(docs, queries, ids, 10)[1]


def test_stored_params_are_used_and_can_be_overridden(data, tmp_path):
    emb, docs, queries, ids = data
    out = tmp_path / "ivf"
    build_index(IndexConfig(factory="IVF32,Flat", nprobe=1), emb, out)
    assert json.loads((out / "index.json").read_text())["search_params"] == {"nprobe": 1}
    truth = exact_ids(docs, queries, ids, 10)[1]
    low = recall(search_with_index(out, queries, 10)[1], truth)
    full = recall(search_with_index(out, queries, 10, params={"nprobe": 32})[1], truth)
    assert full == 1.0 and low < full


def test_fewer_docs_than_k_pads_with_none(tmp_path):
    docs = clustered(5, 8, 2, seed=0)
    emb = write_embeddings(tmp_path / "emb", docs, list("abcde"))
    build_index(IndexConfig(factory="Flat"), emb, tmp_path / "idx")
    scores, found = search_with_index(tmp_path / "idx", docs[:2], 7)
    assert scores.shape == (2, 7)
    assert found[0][0] == "a" and found[0][5:] == [None, None] and sorted(found[1][:5]) == list("abcde")


def test_bad_inputs_give_clear_errors(data, tmp_path):
    emb, docs, queries, ids = data
    with pytest.raises(ConfigError, match="IVFxx"):
        load_config(IndexConfig, None, ["factory=IVFxx,PQ"])
    with pytest.raises(ValueError, match="PQ7"):  # 7 sub-quantisers do not divide 32 dims
        build_index(IndexConfig(factory="IVF16,PQ7"), emb, tmp_path / "a")
    with pytest.raises(ValueError, match="4096 IVF lists but only 3000"):
        build_index(IndexConfig(factory="IVF4096,Flat"), emb, tmp_path / "b")
    build_index(IndexConfig(factory="Flat"), emb, tmp_path / "c")
    with pytest.raises(ValueError, match="expects dimension 32"):
        search_with_index(tmp_path / "c", np.zeros((2, 16), np.float32), 5)
    with pytest.raises(FileNotFoundError, match="index.json"):
        search_with_index(tmp_path / "missing", queries, 5)


def test_an_index_of_other_settings_or_vectors_left_in_the_output_is_refused_not_reused(tmp_path):
    """A rerun into the same directory used to keep the old trained.faiss and shards whatever the
    factory, vectors or dimension, then wrote index.json for the new build over them."""
    small = write_embeddings(tmp_path / "e1", clustered(40, 8, 4, seed=0), [f"a{i}" for i in range(40)])
    wider = write_embeddings(tmp_path / "e2", clustered(60, 16, 4, seed=1), [f"b{i}" for i in range(60)])
    build_index(IndexConfig(factory="HNSW16"), small, tmp_path / "out")
    meta = (tmp_path / "out" / "index.json").read_bytes()
    with pytest.raises(ValueError, match=r"out holds an index .*factory 'HNSW16' -> 'Flat', .*dim 8 -> 16, ntotal 40 -> 60.*fresh output"):
        build_index(IndexConfig(factory="Flat"), wider, tmp_path / "out")
    assert (tmp_path / "out" / "index.json").read_bytes() == meta
    # re-encoded vectors of the same shape and no metadata to tell them apart: their rows differ
    write_embeddings(tmp_path / "e3", clustered(40, 8, 4, seed=5), [f"a{i}" for i in range(40)])
    with pytest.raises(ValueError, match=r"vectors_sample '\w+' -> '\w+'"):
        build_index(IndexConfig(factory="HNSW16"), tmp_path / "e3", tmp_path / "out")


def test_an_index_without_a_build_record_is_refused(tmp_path):
    """Files of an older build (or anything else) cannot be told from this build's: refused."""
    emb = write_embeddings(tmp_path / "emb", clustered(40, 8, 4, seed=0), [f"a{i}" for i in range(40)])
    build_index(IndexConfig(factory="Flat"), emb, tmp_path / "out")
    (tmp_path / "out" / "build.json").unlink()
    with pytest.raises(ValueError, match=r"\(no readable build.json\); use a fresh output directory"):
        build_index(IndexConfig(factory="Flat"), emb, tmp_path / "out")


def test_an_interrupted_identical_build_resumes_from_its_template_and_shards(data, tmp_path):
    """The template and finished shards of the same build are kept (a changed search default
    only changes index.json); the missing shard is built and the result equals a fresh build."""
    emb, docs, queries, ids = data
    build_index(IndexConfig(factory="IVF16,Flat", num_shards=2), emb, tmp_path / "fresh")
    out = tmp_path / "out"
    build_index(IndexConfig(factory="IVF16,Flat", num_shards=2), emb, out)
    kept = {name: (out / name).stat().st_ino for name in ("trained.faiss", "index-00000.faiss")}
    for name in ("index-00001.faiss", "index.json", "ids.parquet"):  # killed before these
        (out / name).unlink()
    build_index(IndexConfig(factory="IVF16,Flat", num_shards=2, nprobe=16), emb, out)
    assert {name: (out / name).stat().st_ino for name in kept} == kept
    assert json.loads((out / "index.json").read_text())["search_params"] == {"nprobe": 16}
    assert (
        search_with_index(out, queries, 10, params={"nprobe": 16})[1]
        == search_with_index(tmp_path / "fresh", queries, 10, params={"nprobe": 16})[1]
    )


def test_every_index_preset_builds_in_faiss():
    """Each preset's factory string is one FAISS accepts (on MiniLM-sized vectors), not just a parsed field."""
    for path in sorted((REPO / "configs" / "index").glob("*.yaml")):
        if "encode" in path.name or "tune" in path.name:
            continue
        factory = load_config(IndexConfig, path).factory
        index = faiss.index_factory(384, factory, faiss.METRIC_INNER_PRODUCT)
        assert index.d == 384 and index.ntotal == 0, path.name


@pytest.mark.parametrize(("preset", "code_bytes"), [("pq192", 192), ("ivfpq-fastscan", 48 + 8 + 384)])
def test_memory_and_speed_presets_cost_what_they_say(tmp_path, preset, code_bytes):
    """Bytes per 384-d vector as the presets' comments state: pq192 is 1/8 of Flat's 1536, the fast one 440."""
    config = load_config(IndexConfig, REPO / "configs" / "index" / f"{preset}.yaml")
    # few lists and a small training sample: the per-vector cost does not depend on them, the test's time does
    config = config.with_overrides(factory=config.factory.replace("IVF1024", "IVF8"), train_size=300)
    vectors = clustered(2048, 384, 16, seed=0)
    emb = write_embeddings(tmp_path / "emb", vectors, [f"d{i}" for i in range(len(vectors))])
    built = build_index(config, emb, tmp_path / "idx")
    # fast-scan lists are padded to blocks of 32 codes: a little over the code size on a tiny corpus
    assert code_bytes <= built["marginal_bytes_per_vector"] <= code_bytes * 1.05
    _, found = search_with_index(tmp_path / "idx", vectors[:50], 10)
    assert np.mean([row[0] == f"d{i}" for i, row in enumerate(found)]) >= 0.9  # a corpus vector finds itself


def test_gpu_mode_without_gpu_falls_back_or_fails_clearly(data, tmp_path):
    if gpu_count() > 0:
        pytest.skip("a GPU is present: covered by test_gpu_search_matches_cpu")
    index = faiss.IndexFlatIP(8)
    assert to_gpu(index, "auto") == (index, False)
    with pytest.raises(RuntimeError, match="no GPU"):
        to_gpu(index, "always")


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="no GPU FAISS (faiss-cpu or no CUDA device)")
def test_gpu_search_matches_cpu(data, tmp_path):
    emb, docs, queries, ids = data
    build_index(IndexConfig(factory="IVF16,Flat", nprobe=16, gpu="always"), emb, tmp_path / "ivf")
    cpu = search_with_index(tmp_path / "ivf", queries, 10, device="never")
    gpu = search_with_index(tmp_path / "ivf", queries, 10, device="always")
    assert load_index(tmp_path / "ivf", "always").on_gpu
    assert recall(gpu[1], cpu[1]) >= 0.99
