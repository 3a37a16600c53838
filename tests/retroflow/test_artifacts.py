"""The stage contract: content-addressed, atomic, verified artifacts and typed configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from retroflow.artifacts import ArtifactStore, lineage, verify_artifact
from retroflow.config import ConfigError, StageConfig, load_config


class ToyConfig(StageConfig):
    size: int = 3
    name: str = "toy"


def write_numbers(calls: list):
    def body(out_dir: Path, partial_dir: Path) -> dict:
        calls.append(out_dir)
        (out_dir / "numbers.txt").write_text("1 2 3")
        return {"count": 3}

    return body


def test_same_config_and_inputs_build_once(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    first = store.build("toy", ToyConfig(), {}, "v1", write_numbers(calls))
    second = store.build("toy", ToyConfig(), {}, "v1", write_numbers(calls))
    assert first.path == second.path and len(calls) == 1
    assert first.metrics == {"count": 3}
    assert store.build("toy", ToyConfig(size=4), {}, "v1", write_numbers(calls)).key != first.key
    assert store.build("toy", ToyConfig(), {}, "v2", write_numbers(calls)).key != first.key  # code version counts


def test_downstream_key_follows_upstream_content(tmp_path):
    store = ArtifactStore(tmp_path)
    up = store.build("up", ToyConfig(), {}, "v1", write_numbers([]))
    down = store.build("down", ToyConfig(), {"data": up}, "v1", write_numbers([]))
    chain = lineage(down)
    assert [c["stage"] for c in chain] == ["down", "up"]
    assert down.manifest["inputs"]["data"]["fingerprint"] == up.fingerprint


def test_a_missing_or_truncated_file_invalidates_the_cache(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    art = store.build("toy", ToyConfig(), {}, "v1", write_numbers(calls))
    (art.path / "numbers.txt").write_text("1")
    assert verify_artifact(art.path)
    rebuilt = store.build("toy", ToyConfig(), {}, "v1", write_numbers(calls))
    assert len(calls) == 2 and (rebuilt.path / "numbers.txt").read_text() == "1 2 3"


def test_a_failing_stage_leaves_no_final_directory_and_keeps_partial_checkpoints(tmp_path):
    store = ArtifactStore(tmp_path)

    def crash(out_dir: Path, partial_dir: Path) -> dict:
        (partial_dir / "step-10.ckpt").write_text("state")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.build("toy", ToyConfig(), {}, "v1", crash)
    key_dirs = [p.name for p in (tmp_path / "toy").iterdir()]
    assert not any(name.isalnum() for name in key_dirs)  # no finished <key>/ directory
    partial = next(p for p in (tmp_path / "toy").iterdir() if p.name.endswith(".partial"))
    assert (partial / "step-10.ckpt").read_text() == "state"

    def resume(out_dir: Path, partial_dir: Path) -> dict:
        assert (partial_dir / "step-10.ckpt").exists()
        (out_dir / "model.bin").write_text("done")
        return {}

    art = store.build("toy", ToyConfig(), {}, "v1", resume)
    assert not partial.exists() and (art.path / "model.bin").exists()


def test_config_errors_name_file_and_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("size: lots\nextra: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(ToyConfig, cfg)
    text = str(info.value)
    assert str(cfg) in text and "field 'size'" in text and "field 'extra'" in text


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(ToyConfig, None, ["size=7", "name=big"])
    assert cfg.size == 7 and cfg.name == "big"


def test_a_remote_store_shares_finished_artifacts_between_machines(tmp_path):
    """Two machines (separate local working copies) on one fsspec URL: the second one downloads
    what the first built instead of building it again; an incomplete or damaged upload is not trusted."""
    url = f"file://{tmp_path / 'remote'}"
    calls: list = []
    first = ArtifactStore(url, cache=tmp_path / "machine-a").build("toy", ToyConfig(), {}, "v1", write_numbers(calls))
    assert (tmp_path / "remote" / "toy" / first.key / "manifest.json").is_file()

    second = ArtifactStore(url, cache=tmp_path / "machine-b").build("toy", ToyConfig(), {}, "v1", write_numbers(calls))
    assert len(calls) == 1, "the second machine rebuilt instead of downloading"
    assert second.path.parent.parent == (tmp_path / "machine-b").resolve()
    assert second.fingerprint == first.fingerprint and (second.path / "numbers.txt").read_text() == "1 2 3"
    assert not verify_artifact(second.path, full=True)

    (tmp_path / "remote" / "toy" / first.key / "numbers.txt").write_text("1 2")  # damaged in the bucket
    third = ArtifactStore(url, cache=tmp_path / "machine-c").build("toy", ToyConfig(), {}, "v1", write_numbers(calls))
    assert len(calls) == 2 and (third.path / "numbers.txt").read_text() == "1 2 3"
    assert (tmp_path / "remote" / "toy" / first.key / "numbers.txt").read_text() == "1 2 3"  # the rebuild re-uploads

    (tmp_path / "remote" / "toy" / first.key / "manifest.json").unlink()  # an upload that never finished
    ArtifactStore(url, cache=tmp_path / "machine-d").build("toy", ToyConfig(), {}, "v1", write_numbers(calls))
    assert len(calls) == 3


def test_a_build_waits_for_pieces_being_written_into_its_partial_directory(tmp_path):
    """Two runs of one pipeline at once: run A still writes an encode shard into the key's partial
    directory when run B publishes the artifact (which deletes that directory). B must wait."""
    import threading

    store = ArtifactStore(tmp_path)
    key = store.key_for("toy", ToyConfig(), {}, "v1")
    writing, finish, events = threading.Event(), threading.Event(), []

    def contribute():
        with store.contributing("toy", key) as partial:
            partial.mkdir(parents=True, exist_ok=True)
            writing.set()
            finish.wait(timeout=10)
            (partial / "shard-00000").write_text("vectors")
            events.append("shard written")

    def merge(out_dir: Path, partial_dir: Path) -> dict:
        events.append("build")
        (out_dir / "merged.txt").write_text((partial_dir / "shard-00000").read_text())
        return {}

    writer = threading.Thread(target=contribute)
    writer.start()
    assert writing.wait(timeout=10)
    builder = threading.Thread(target=store.build, args=("toy", ToyConfig(), {}, "v1", merge))
    builder.start()
    builder.join(timeout=0.5)
    assert builder.is_alive() and events == []  # held off while the shard is written
    finish.set()
    writer.join(timeout=10)
    builder.join(timeout=10)
    assert events == ["shard written", "build"]
    assert (store.lookup("toy", key).path / "merged.txt").read_text() == "vectors"
    assert not store.partial_dir("toy", key).exists()


def test_an_artifact_named_by_path_is_verified_before_it_keys_anything(tmp_path):
    """`retroflow encode --model <store>/finetune/<key>/model` and reevaluate's `model`/`index`
    parameters name artifacts by path: a file changed since (even to the same size) is refused,
    not used under the intact artifact's fingerprint."""
    import os

    from retroflow.artifacts import DamagedArtifactError
    from retroflow.inputs import artifact_containing

    art = ArtifactStore(tmp_path).build("toy", ToyConfig(), {}, "v1", write_numbers([]))
    assert artifact_containing(art.path / "numbers.txt").fingerprint == art.fingerprint
    numbers = art.path / "numbers.txt"
    numbers.write_text("9 9 9")  # same size, other content
    os.utime(numbers, (1, 1))
    with pytest.raises(DamagedArtifactError, match=r"fails verification \(.*numbers\.txt"):
        artifact_containing(art.path / "numbers.txt")


def test_a_directory_fingerprint_tells_apart_layouts_with_the_same_bytes(tmp_path):
    import os

    from retroflow.hashing import directory_fingerprint

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a").write_text("bc")
    (two / "ab").write_text("c")  # name + content concatenate to the same bytes
    assert directory_fingerprint(one) != directory_fingerprint(two)
    before = directory_fingerprint(one)
    (one / "extra").write_text("")  # an empty file added, older than the rest: it still counts
    os.utime(one / "extra", (1, 1))
    assert directory_fingerprint(one) != before
