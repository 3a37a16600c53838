"""The zip download cache answers only for the checksum it verified (issue 22, item 5), and keeps
nothing it refused (item 12)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from retroflow.data.beir import DatasetError, download_and_unzip


def make_zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_changed_file_at_a_cached_url_is_read_with_the_new_checksum(tmp_path):
    archive, cache = tmp_path / "data.zip", tmp_path / "cache"
    make_zip(archive, {"corpus.jsonl": "old\n"})
    old = sha256(archive)
    assert (download_and_unzip(archive.as_uri(), cache, old) / "corpus.jsonl").read_text() == "old\n"
    make_zip(archive, {"corpus.jsonl": "new\n"})  # the file at the URL changed; the user gives its new checksum
    assert (download_and_unzip(archive.as_uri(), cache, sha256(archive)) / "corpus.jsonl").read_text() == "new\n"
    assert (download_and_unzip(archive.as_uri(), cache, old.upper().replace("SHA256", "sha256")) / "corpus.jsonl").read_text() == "old\n"


def test_a_wrong_checksum_is_refused_even_when_the_url_is_cached(tmp_path):
    archive, cache = tmp_path / "data.zip", tmp_path / "cache"
    make_zip(archive, {"corpus.jsonl": "data\n"})
    download_and_unzip(archive.as_uri(), cache, sha256(archive))
    with pytest.raises(DatasetError, match=r"data\.zip: sha256 is"):
        download_and_unzip(archive.as_uri(), cache, "sha256:" + "1" * 64)


def test_a_refused_zip_leaves_nothing_in_the_download_cache(tmp_path):
    archive, cache = tmp_path / "evil.zip", tmp_path / "cache"
    make_zip(archive, {"../escaped.txt": "x", "corpus.jsonl": "data\n"})
    with pytest.raises(DatasetError, match="escape"):
        download_and_unzip(archive.as_uri(), cache, sha256(archive))
    assert list((cache / "downloads").rglob("*")) == []
    with pytest.raises(DatasetError, match="sha256 is"):
        download_and_unzip(archive.as_uri(), cache, "sha256:" + "2" * 64)
    assert list((cache / "downloads").rglob("*")) == []


def test_a_damaged_archive_left_by_an_interrupted_run_is_replaced_not_trusted(tmp_path):
    archive, cache = tmp_path / "data.zip", tmp_path / "cache"
    make_zip(archive, {"corpus.jsonl": "data\n"})
    checksum = sha256(archive)
    download_and_unzip(archive.as_uri(), cache, checksum)
    entry = next(p for p in (cache / "downloads").iterdir())
    (entry / ".complete").unlink()  # killed between the download and the unzip
    (entry / "data.zip").write_bytes(b"garbage")
    assert (download_and_unzip(archive.as_uri(), cache, checksum) / "corpus.jsonl").read_text() == "data\n"
