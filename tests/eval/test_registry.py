"""Run registry: appends are atomic and never lose rows; runs read back exactly; previous run lookup."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pandas as pd
import pytest

from eval import registry as reg
from eval.registry import RegistryError, append_run, default_registry_path, load_registry, previous_run, run_records


def fake_result(scale: float = 1.0, dataset: str = "scifact") -> dict:
    per_query = {"ndcg@10": {"q1": 0.5 * scale, "q2": 1.0 * scale}, "recall@100": {"q1": 1.0, "q2": 0.0}}
    return {
        "ndcg@10": 0.75 * scale,
        "recall@100": 0.5,
        "num_queries": 2,
        "dataset": dataset,
        "dataset_fingerprint": "fp-" + dataset,
        "seconds": 1.5,
        "per_query": per_query,
        "run": {"q1": {"d": 1.0}},
    }


def add(path: Path, result: dict, model: str = "minilm", dataset: str = "scifact", split: str = "test", run_id: str | None = None) -> str:
    return append_run(
        path, result, run_id=run_id, config_hash="cfg", code_version="code", model=model, index=None, dataset=dataset, split=split
    )


def test_append_and_read_back_with_pandas(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "registry.parquet"
    run_id = add(path, fake_result())
    frame = pd.read_parquet(path)  # plain pandas reads it
    assert len(frame) == 2 and set(frame["metric"]) == {"ndcg@10", "recall@100"}
    row = frame[frame["metric"] == "ndcg@10"].iloc[0]
    assert row["run_id"] == run_id and row["value"] == 0.75 and row["num_queries"] == 2
    assert row["model"] == "minilm" and row["dataset_fingerprint"] == "fp-scifact" and row["config_hash"] == "cfg"
    assert str(row["time"].tz) == "UTC"
    [record] = run_records(path, run_id)
    assert record.metrics == {"ndcg@10": 0.75, "recall@100": 0.5}
    assert record.per_query == fake_result()["per_query"]


def test_runs_accumulate_and_previous_run_finds_the_latest_earlier_one(tmp_path: Path) -> None:
    path = tmp_path / "registry.parquet"
    first = add(path, fake_result(0.8))
    add(path, fake_result(0.9), model="bm25")
    second = add(path, fake_result(1.0))
    add(path, fake_result(0.7), dataset="nfcorpus")
    assert load_registry(path)["run_id"].nunique() == 4
    assert previous_run(path, "minilm", "scifact", "test").run_id == second
    assert previous_run(path, "minilm", "scifact", "test", before_run_id=second).run_id == first
    assert previous_run(path, "minilm", "scifact", "test", before_run_id=first) is None
    assert previous_run(path, "minilm", "scifact", "dev") is None
    assert previous_run(load_registry(path), "bm25", "scifact", "test").metrics["ndcg@10"] == pytest.approx(0.675)


def test_one_run_id_can_cover_several_datasets_but_not_twice_the_same(tmp_path: Path) -> None:
    path = tmp_path / "registry.parquet"
    run_id = add(path, fake_result(), dataset="scifact", run_id="suite-run")
    add(path, fake_result(dataset="fiqa"), dataset="fiqa", run_id=run_id)
    assert [(r.dataset, r.split) for r in run_records(path, "suite-")] == [("scifact", "test"), ("fiqa", "test")]  # prefix works
    with pytest.raises(RegistryError, match="already has results for scifact/test"):
        add(path, fake_result(), dataset="scifact", run_id=run_id)
    assert len(load_registry(path)) == 4
    with pytest.raises(RegistryError, match="'nope' is not in the registry"):
        run_records(path, "nope")


def test_a_failed_write_leaves_the_old_registry_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "registry.parquet"
    add(path, fake_result())
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reg.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        add(path, fake_result(0.5))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def append_many(path: str, worker: int) -> None:
    for i in range(5):
        add(Path(path), fake_result(), run_id=f"w{worker}-{i}")


def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "registry.parquet"
    context = multiprocessing.get_context("spawn")  # fork after earlier tests started threads (Prefect, torch) can deadlock the child
    workers = [context.Process(target=append_many, args=(str(path), w)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)  # generous: a loaded CI machine fsyncs slowly
    assert [w.exitcode for w in workers] == [0, 0, 0]  # None: still running (hung on the lock)
    assert load_registry(path)["run_id"].nunique() == 15


def test_reading_while_another_run_appends_never_sees_half_a_registry(tmp_path: Path) -> None:
    """A flow run compares with earlier runs (load_registry) while another one appends: the reader
    must get the old registry or the new one. Reading by path let Arrow size the file before
    opening it, so a registry replaced in between was read at the wrong offsets (CI, stop 31:
    "Couldn't deserialize thrift")."""
    path = tmp_path / "registry.parquet"
    add(path, fake_result(), run_id="first")
    done = threading.Event()

    def append_runs() -> None:
        try:
            for i in range(40):
                add(path, fake_result(), run_id=f"writer-{i}")
        finally:
            done.set()

    writer = threading.Thread(target=append_runs)
    writer.start()
    sizes = []
    while not done.is_set():
        sizes.append(load_registry(path)["run_id"].nunique())
    writer.join()
    assert sizes == sorted(sizes) and len(sizes) > 10
    assert load_registry(path)["run_id"].nunique() == 41


def test_default_path_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETROFLOW_REGISTRY", str(tmp_path / "r.parquet"))
    assert default_registry_path() == tmp_path / "r.parquet"
    add(None, fake_result())
    assert (tmp_path / "r.parquet").is_file()
    monkeypatch.delenv("RETROFLOW_REGISTRY")
    assert default_registry_path() == Path("runs/registry.parquet")
    assert load_registry(tmp_path / "missing.parquet").empty


def test_a_result_without_per_query_values_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no per-query values"):
        add(tmp_path / "r.parquet", {"ndcg@10": 0.5})
