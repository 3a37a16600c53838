"""A store shared with others cannot make this machine write, read or upload outside an artifact
(issue 22, item 1), and a pipeline name cannot point outside `<store>/runs/` (item 2)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from retroflow.artifacts import ArtifactStore, UnsafeArtifactError, verify_artifact
from retroflow.config import StageConfig

PAYLOAD = b"import os  # a .pth file runs at interpreter start\n"


class Config(StageConfig):
    value: int = 1


def body(out_dir: Path, _partial: Path) -> dict:
    (out_dir / "weights.bin").write_bytes(b"\x00" * 64)
    (out_dir / "sub").mkdir()
    (out_dir / "sub" / "more.txt").write_text("more")
    return {}


def published(tmp_path: Path) -> tuple[str, Path, str]:
    """(remote URL, remote artifact directory, key) of an artifact one machine uploaded. The remote
    root is one level deeper than a machine's cache, so a `..` entry lands elsewhere on each side."""
    root = tmp_path / "remote" / "deeper"
    art = ArtifactStore(root.as_uri(), cache=tmp_path / "machine-a").build("toy", Config(), {}, "code", body)
    return root.as_uri(), root / "toy" / art.key, art.key


def add_manifest_entry(artifact_dir: Path, rel: str, data: bytes) -> None:
    manifest_file = artifact_dir / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest_file.write_text(json.dumps(manifest))


def remote_copy(remote_dir: Path, rel: str) -> Path:
    """Where the remote side keeps the file a manifest entry names (`<dir>/<rel>` as a string join)."""
    path = Path(f"{remote_dir}/{rel}".replace("//", "/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "backslash"])
def test_a_downloaded_manifest_cannot_write_outside_the_artifact(kind, tmp_path):
    url, remote_dir, key = published(tmp_path)
    victim = tmp_path / "venv" / "site-packages" / "evil.pth"
    cache = tmp_path / "machine-b"
    rel = {
        "absolute": str(victim),
        "dotdot": os.path.relpath(victim, cache / "toy" / "x"),  # from the staging directory beside the final one
        "backslash": "..\\..\\evil.pth",
    }[kind]
    remote_copy(remote_dir, rel).write_bytes(PAYLOAD)
    add_manifest_entry(remote_dir, rel, PAYLOAD)
    with pytest.raises(UnsafeArtifactError) as err:
        ArtifactStore(url, cache=cache).lookup("toy", key)
    message = str(err.value)
    assert f"toy/{key}" in message and repr(rel) in message and "\n" not in message
    assert not victim.exists()
    assert not any(p.name == "evil.pth" for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "remote"))
    assert [p.name for p in (cache / "toy").iterdir() if ".tmp-" in p.name] == []  # no staging left behind


def test_a_symlink_in_a_remote_artifact_is_refused(tmp_path):
    url, remote_dir, key = published(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"\x00" * 64)  # same content as the file it replaces: the hash matches
    (remote_dir / "weights.bin").unlink()
    (remote_dir / "weights.bin").symlink_to(secret)
    with pytest.raises(UnsafeArtifactError, match="weights.bin.*symlink"):
        ArtifactStore(url, cache=tmp_path / "machine-b").lookup("toy", key)
    assert not (tmp_path / "machine-b" / "toy" / key).exists()


def test_verification_never_reads_outside_the_artifact(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    art = store.build("toy", Config(), {}, "code", body)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(PAYLOAD)
    add_manifest_entry(art.path, "../../outside.txt", PAYLOAD)
    with pytest.raises(UnsafeArtifactError, match=r"'\.\./\.\./outside\.txt'"):
        verify_artifact(art.path)


def test_a_symlink_escaping_a_local_artifact_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    art = store.build("toy", Config(), {}, "code", body)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "more.txt").write_text("more")
    for file in (art.path / "sub").iterdir():
        file.unlink()
    (art.path / "sub").rmdir()
    (art.path / "sub").symlink_to(elsewhere)  # the manifest's 'sub/more.txt' now resolves outside
    with pytest.raises(UnsafeArtifactError, match="sub/more.txt"):
        verify_artifact(art.path, full=True)


def test_an_upload_never_sends_a_file_outside_the_artifact(tmp_path):
    url = (tmp_path / "remote").as_uri()
    store = ArtifactStore(url, cache=tmp_path / "machine-a")
    art = store.build("toy", Config(), {}, "code", body)
    outside = tmp_path / "machine-a" / "private.key"
    outside.write_bytes(PAYLOAD)
    add_manifest_entry(art.path, "../../private.key", PAYLOAD)
    with pytest.raises(UnsafeArtifactError, match="private.key"):
        store._upload(art)
    assert not any(p.name == "private.key" for p in (tmp_path / "remote").rglob("*"))


# ---------------------------------------------------------------------------------------
# Item 2: a pipeline name is one path component under <store>/runs/
# ---------------------------------------------------------------------------------------

BAD_NAMES = ["../../victim", "/tmp/victim", "a/b", "..", ".", "", "x\\..\\y", ".hidden"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_pipeline_name_that_is_not_one_path_component_is_refused_at_load(name):
    from flows.chain import load_pipeline_config
    from retroflow.config import ConfigError

    with pytest.raises(ConfigError, match=r"field 'name'"):
        load_pipeline_config(None, [f"name={name!r}" if name else "name=''"])


def test_an_ablation_name_is_one_path_component_too():
    from flows.ablation import load_ablation_config
    from retroflow.config import ConfigError

    with pytest.raises(ConfigError, match=r"field 'name'"):
        load_ablation_config(None, ["name=../../victim"])


def test_the_cli_refuses_a_name_that_would_delete_outside_the_store(tmp_path, capsys, monkeypatch):
    from flows.cli import main

    victim = tmp_path / "victim" / "model"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store" / "x"))
    assert main(["pipeline", "--config", "configs/pipeline/quickstart.yaml", "--set", "name=../../../victim"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name" in err[0] and "Traceback" not in err[0]
    assert (victim / "keep.txt").read_text() == "precious"
    assert main(["report", "../../victim", "--store", str(tmp_path / "store")]) == 2


def test_every_run_path_resolves_under_the_stores_runs_folder(tmp_path):
    from flows.chain import run_dir
    from retroflow.config import ConfigError

    assert run_dir(tmp_path, "quickstart") == tmp_path.resolve() / "runs" / "quickstart"
    for name in ["../victim", "/abs", "a/b"]:
        with pytest.raises(ConfigError, match="runs"):
            run_dir(tmp_path, name)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere")  # a run folder that leads out of the store
    with pytest.raises(ConfigError, match="linked"):
        run_dir(tmp_path, "linked")
