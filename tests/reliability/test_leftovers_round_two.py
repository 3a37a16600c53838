"""What failed or finished runs used to leave behind (issue 22, item 12): a complete staging
directory when a build fails after its body finished, a stamps file per remote download, an empty
checkpoint directory after a full disk. (Refused zips: test_download_cache.py.)"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import retroflow.artifacts as artifacts
from retroflow.artifacts import ArtifactStore
from retroflow.config import StageConfig


class Config(StageConfig):
    value: int = 1


def body(out_dir: Path, _partial: Path) -> dict:
    (out_dir / "weights.bin").write_bytes(b"\x01" * 128)
    return {}


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_build_failing_after_its_body_finished_leaves_no_staging_directory(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    monkeypatch.setattr(artifacts, "write_manifest", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.build("index", Config(), {}, "code", body)
    assert [p.name for p in (tmp_path / "store" / "index").iterdir() if ".tmp-" in p.name] == []


def test_a_remote_download_leaves_one_stamps_file_beside_the_artifact_and_nothing_else(tmp_path):
    url = (tmp_path / "remote").as_uri()
    art = ArtifactStore(url, cache=tmp_path / "machine-a").build("toy", Config(), {}, "code", body)
    downloaded = ArtifactStore(url, cache=tmp_path / "machine-b").lookup("toy", art.key)
    assert downloaded is not None
    assert sorted(p.name for p in (tmp_path / "machine-b" / "toy").iterdir()) == [art.key, f"{art.key}.stamps.json"]


class OneProcess:
    """The accelerate surface save_checkpoint uses, for a single process."""

    is_main_process, process_index, num_processes, scaler = True, 0, 1, None

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, model):
        return model


def test_a_checkpoint_that_hits_a_full_disk_leaves_no_empty_directory(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from retroflow.checkpoints import save_checkpoint

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    directory = tmp_path / "partial" / "checkpoints"
    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(OneProcess(), directory, 10, {}, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not directory.exists()  # neither checkpoint-10.tmp nor an empty checkpoints folder
    monkeypatch.undo()
    first = save_checkpoint(OneProcess(), directory, 10, {}, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(OneProcess(), directory, 20, {}, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    assert sorted(p.name for p in directory.iterdir()) == [first.name]  # the earlier checkpoint stays, the half one goes


def test_a_replace_that_cannot_move_the_old_copy_aside_leaves_no_staging(tmp_path, monkeypatch):
    import os

    import retroflow.publish as publish

    final = tmp_path / "model"
    final.mkdir()
    real_replace = os.replace

    def refuse_final(source, target, *args, **kwargs):
        if Path(source) == final:
            raise PermissionError(errno.EACCES, "Permission denied", str(source))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(publish.os, "replace", refuse_final)
    with pytest.raises(PermissionError):
        with publish.publishing(final, replace=True) as staging:
            (staging / "weights.bin").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replacing_a_published_folder_never_leaves_it_half_deleted(tmp_path, monkeypatch):
    """`publishing(replace=True)` deletes the old copy only after the new one is in place: a kill
    while the old one is being deleted leaves the new copy, complete, under the final name."""
    import shutil

    import retroflow.publish as publish

    final = tmp_path / "model"
    with publish.publishing(final):
        pass
    for name in ("a.bin", "b.bin"):
        (final / name).write_text("old")
    seen = []
    real_rmtree = shutil.rmtree

    def observing_rmtree(path, *args, **kwargs):
        seen.append(sorted((p.name, p.read_text()) for p in final.iterdir()))  # what a reader sees at that moment
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(publish.shutil, "rmtree", observing_rmtree)
    with publish.publishing(final, replace=True) as staging:
        (staging / "a.bin").write_text("new")
    assert seen == [[("a.bin", "new")]]  # the old copy was deleted with the new one already in place
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # and nothing else is left
