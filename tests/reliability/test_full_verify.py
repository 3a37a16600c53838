"""Damage that keeps a file's size and modification time passes the cheap stamp check; `retroflow
verify` and the pipeline's `verify` option re-hash every file (issue 22, item 7)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.cli import main
from retroflow.artifacts import ArtifactStore
from retroflow.config import StageConfig


class Config(StageConfig):
    value: int = 1


def body(out_dir: Path, _partial: Path) -> dict:
    (out_dir / "weights.bin").write_bytes(bytes(range(256)) * 4)
    return {}


def flip_keeping_stamp(file: Path) -> None:
    """One byte changed in place, size and modification time restored (a bit rot, a careless copy)."""
    before = file.stat()
    with open(file, "r+b") as handle:
        handle.seek(10)
        handle.write(b"\xee")
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.fixture
def store_with_damage(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    good = store.build("index", Config(value=1), {}, "code", body)
    bad = store.build("finetune", Config(value=2), {}, "code", body)
    flip_keeping_stamp(bad.file("weights.bin"))
    return store, good, bad


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_the_stamp_check_alone_trusts_such_damage(store_with_damage):
    store, _, bad = store_with_damage
    assert store.lookup("finetune", bad.key) is not None  # the documented limit of the cheap check


def test_verify_a_whole_store_lists_the_damaged_artifacts_and_exits_non_zero(store_with_damage, capsys):
    store, good, bad = store_with_damage
    assert main(["verify", str(store.root)]) == 1
    out = capsys.readouterr().out
    summary = last_json(out)
    assert summary["verified"] == 2 and list(summary["damaged"]) == [f"finetune/{bad.key}"]
    assert f"finetune/{bad.key}" in out and "weights.bin" in out


def test_verify_one_artifact(store_with_damage, capsys):
    _, good, bad = store_with_damage
    assert main(["verify", str(good.path)]) == 0
    assert last_json(capsys.readouterr().out)["damaged"] == {}
    assert main(["verify", str(bad.path)]) == 1


def test_verify_reports_a_tampered_manifest_as_damage_not_a_crash(store_with_damage, capsys):
    _, good, _ = store_with_damage
    manifest = json.loads((good.path / "manifest.json").read_text())
    manifest["files"]["../../elsewhere"] = {"sha256": "0" * 64, "bytes": 1}
    (good.path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(good.path)]) == 1
    assert "elsewhere" in json.dumps(last_json(capsys.readouterr().out)["damaged"])


def test_verify_of_a_missing_path_is_one_clear_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


def test_a_store_set_to_verify_rehashes_what_it_reuses_and_rebuilds_the_damaged(store_with_damage):
    store, _, bad = store_with_damage
    strict = ArtifactStore(store.root, full_verify=True)
    assert strict.lookup("finetune", bad.key) is None
    calls = []
    rebuilt = strict.build("finetune", Config(value=2), {}, "code", lambda out, part: calls.append(1) or body(out, part))
    assert calls == [1] and rebuilt.file("weights.bin").read_bytes() == bytes(range(256)) * 4


def test_the_pipeline_verify_option_reaches_its_store(monkeypatch, tmp_path):
    from flows.chain import load_pipeline_config, store_for

    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    config = "configs/pipeline/quickstart.yaml"
    assert store_for(load_pipeline_config(config, ["verify=true"])).full_verify is True
    assert store_for(load_pipeline_config(config)).full_verify is False
    # not part of what the run computes: the same pipeline with and without it is one configuration
    assert load_pipeline_config(config, ["verify=true"]).canonical() == load_pipeline_config(config).canonical()


def test_retroflow_pipeline_verify_flag_sets_the_option(monkeypatch):
    import flows.chain

    seen = {}

    def stop(pipeline, *_args, **_kwargs):
        seen["verify"] = pipeline.verify
        raise ValueError("stopped before running")

    monkeypatch.setattr(flows.chain, "run_pipeline", stop)
    assert main(["pipeline", "--config", "configs/pipeline/quickstart.yaml", "--verify"]) == 2
    assert seen == {"verify": True}


def test_the_flow_takes_a_verify_parameter():
    import inspect

    from flows.pretrain_to_beir import pretrain_to_beir

    assert inspect.signature(pretrain_to_beir.fn).parameters["verify"].default is False
