"""A stored file changed in place is not trusted; what killed or failed runs leave behind is swept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from retroflow.artifacts import ArtifactStore, stamps_path
from retroflow.config import StageConfig
from retroflow.publish import publishing, staging_name, sweep_stale


class Config(StageConfig):
    value: int = 1


def counting_body(calls: list[int]):
    def body(out_dir: Path, _partial: Path) -> dict:
        calls.append(1)
        (out_dir / "index.faiss").write_bytes(bytes(range(256)) * 4)
        return {}

    return body


def test_a_same_size_rewrite_of_a_stored_file_is_caught_and_rebuilt(tmp_path):
    store, calls = ArtifactStore(tmp_path / "store"), []
    first = store.build("index", Config(), {}, "code", counting_body(calls))
    assert store.build("index", Config(), {}, "code", counting_body(calls)).path == first.path and len(calls) == 1
    with open(first.file("index.faiss"), "r+b") as handle:  # one flipped byte, same size
        handle.seek(100)
        handle.write(b"\xff")
    assert store.lookup("index", first.key) is None
    rebuilt = store.build("index", Config(), {}, "code", counting_body(calls))
    assert len(calls) == 2 and rebuilt.file("index.faiss").read_bytes() == bytes(range(256)) * 4


def test_an_untouched_artifact_is_not_rehashed_on_lookup(tmp_path, monkeypatch):
    import retroflow.artifacts as artifacts

    store = ArtifactStore(tmp_path / "store")
    art = store.build("index", Config(), {}, "code", counting_body([]))
    assert stamps_path(art.path).is_file()
    hashed = []
    monkeypatch.setattr(artifacts, "sha256_file", lambda path, *a: hashed.append(path) or "x")
    assert store.lookup("index", art.key) is not None and hashed == []
    assert store.lookup("index", art.key, full_verify=True) is None  # the fake hash now differs: full checks hash


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_temporary_directories_of_killed_builds_are_swept_on_the_next_build(tmp_path):
    stage_dir = tmp_path / "store" / "index"
    stage_dir.mkdir(parents=True)

    def killed_here(name: str) -> str:  # a staging name of this host and namespace, with a dead pid
        return staging_name(name).replace(f".tmp-{os.getpid()}-", f".tmp-{dead_pid()}-", 1)

    killed = stage_dir / killed_here("otherkey")
    (killed / "half").mkdir(parents=True)
    download = stage_dir / killed_here("otherkey.download")
    download.mkdir()
    running = stage_dir / staging_name("busykey")  # ours: still being written
    running.mkdir()
    ArtifactStore(tmp_path / "store").build("index", Config(), {}, "code", counting_body([]))
    assert not killed.exists() and not download.exists() and running.exists()


def test_publishing_leaves_nothing_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with publishing(tmp_path / "final") as staging:
            (staging / "part").write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    assert sweep_stale(tmp_path) == []


def test_a_failed_msmarco_conversion_leaves_no_cache_folder_and_names_the_users_file(tmp_path):
    from retroflow.data.beir import DatasetError
    from retroflow.data.msmarco import load_msmarco

    source = tmp_path / "msmarco"
    source.mkdir()
    (source / "collection.tsv").write_text("")
    (source / "queries.dev.tsv").write_text("1\twhat is a test\n")
    (source / "qrels.dev.tsv").write_text("1\t0\t7\t1\n")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=r"msmarco/collection\.tsv: the collection is empty"):
        load_msmarco(source, cache_dir=cache)
    assert [p for p in cache.rglob("*") if p.name != "msmarco"] == []


def test_a_failed_download_leaves_no_cache_folder(tmp_path):
    from retroflow.data.beir import DatasetError, download_and_unzip

    with pytest.raises(DatasetError, match="could not download"):
        download_and_unzip((tmp_path / "missing.zip").as_uri(), tmp_path / "cache", "sha256:" + "0" * 64)
    assert not any((tmp_path / "cache" / "downloads").iterdir())
