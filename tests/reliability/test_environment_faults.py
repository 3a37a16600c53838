"""Faults of the machine end in one line naming the path and the cause (issue 22, item 8):
a read-only or full disk, torch's iostream error while writing a checkpoint, a non-UTF-8 path.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input_catalogue import beir, evaluate
from test_messages import error_line

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("code, cause", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"), (errno.ENOSPC, "disk is full")])
def test_a_store_that_cannot_be_written_is_one_line(code: int, cause: str, tmp_path: Path, capsys, monkeypatch):
    import eval.evaluate

    target = tmp_path / "out.json"

    def refuse(path, text, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(eval.evaluate, "atomic_write_text", refuse)
    line = error_line(evaluate(beir(tmp_path / "ds"), target), capsys)
    assert str(target) in line and cause in line and errno.errorcode[code] in line


def tiny_pretrain(shared_data: Path, tmp: Path):
    from retromae.config import PretrainConfig

    return PretrainConfig.model_validate(
        {
            "model": {"init": None, "preset": "tiny", "vocab_size": 400, "dropout": 0.0},
            "data": {
                "beir_corpus": str(shared_data / "scifact" / "corpus.jsonl"),
                "max_docs": 30,
                "max_seq_length": 32,
                "cache_dir": str(tmp / "cache"),
            },
            "train": {"seed": 7, "max_steps": 4, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0, "save_every": 2},
        }
    )


def test_a_checkpoint_is_not_started_without_room_for_it(shared_data: Path, tmp_path: Path, monkeypatch):
    import shutil

    import retroflow.checkpoints as checkpoints
    from flows.cli import error_message
    from retromae.pretrain import run as pretrain

    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OSError) as err:
        pretrain(tiny_pretrain(shared_data, tmp_path), {}, tmp_path / "out", tmp_path / "partial")
    line = error_message(err.value)
    assert line.startswith(str(tmp_path / "partial" / "checkpoints")) and "disk is full" in line and "MiB are free" in line
    assert not list((tmp_path / "partial" / "checkpoints").glob("checkpoint-*"))


def test_torch_iostream_error_while_saving_names_the_checkpoint(shared_data: Path, tmp_path: Path, monkeypatch):
    import retroflow.checkpoints as checkpoints
    from flows.cli import error_message
    from retromae.pretrain import run as pretrain

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(OSError) as err:
        pretrain(tiny_pretrain(shared_data, tmp_path), {}, tmp_path / "out", tmp_path / "partial")
    line = error_message(err.value)
    assert "checkpoint-2.tmp-" in line and "writing the checkpoint failed" in line and "\n" not in line
    assert not list((tmp_path / "partial" / "checkpoints").glob("checkpoint-2.tmp*"))  # no half checkpoint left


def test_iostream_runtime_error_is_one_line(capsys):
    from flows.cli import error_message

    assert "disk is probably full" in error_message(RuntimeError("basic_ios::clear: iostream error"))
    assert error_message(RuntimeError("some bug")) is None  # a bug keeps its traceback


def test_a_non_utf8_path_is_one_line(tmp_path: Path):
    name = os.fsencode(tmp_path) + b"/d\xff"
    beir(Path(os.fsdecode(name)))
    argv = [b"evaluate", b"--model", b"bm25", b"--dataset", name, b"--no-registry"]
    done = subprocess.run(
        [sys.executable, b"-m", b"flows.cli", *argv], capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "not valid UTF-8" in line and "d\\udcff" in line


def test_a_damaged_artifact_behind_a_symlink_is_one_line_and_its_target_is_left_alone(tmp_path: Path):
    """An artifact moved to another disk and linked back, then damaged there: the store cannot
    rebuild it in place without deleting what the link points to, so it says so in one line."""
    import os
    import shutil

    from flows.cli import error_message
    from retroflow.artifacts import ArtifactStore, DamagedArtifactError
    from retroflow.config import StageConfig

    class Toy(StageConfig):
        size: int = 3

    def body(out_dir: Path, partial_dir: Path) -> dict:
        (out_dir / "numbers.txt").write_text("1 2 3")
        return {}

    store = ArtifactStore(tmp_path / "store")
    art = store.build("toy", Toy(), {}, "v1", body)
    elsewhere = tmp_path / "other-disk" / art.key
    elsewhere.parent.mkdir()
    shutil.move(str(art.path), elsewhere)
    os.symlink(elsewhere, art.path)
    assert store.build("toy", Toy(), {}, "v1", body).path == art.path  # intact behind the link: used as is
    (elsewhere / "numbers.txt").write_text("1")
    with pytest.raises(DamagedArtifactError) as err:
        store.build("toy", Toy(), {}, "v1", body)
    line = error_message(err.value)
    assert str(art.path) in line and str(elsewhere) in line and "numbers.txt" in line and "\n" not in line
    assert (elsewhere / "numbers.txt").read_text() == "1" and art.path.is_symlink()  # nothing deleted
