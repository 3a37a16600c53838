"""Every content hash of the project, in one place: files, directories, JSON values, source code.

Keys and fingerprints are sha256 hex digests, cut where a shorter name is enough (a cut never
changes which content a full digest names; it only makes a collision less unlikely)."""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_lines(lines: Iterable[str]) -> str:
    """The digest of lines joined by newlines (version tags and file digests, say)."""
    return sha256_text("\n".join(lines))


def hash_json(obj: Any) -> str:
    """A JSON value's digest, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def update_with_file(digest: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    update_with_file(digest, Path(path))
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def files_digest(paths: Iterable[Path]) -> str:
    """The digest of several files' bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        update_with_file(digest, Path(path))
    return digest.hexdigest()


def stat_signature(paths: Iterable[Path], *tags: str) -> str:
    """A cheap stand-in for a content hash of source files (path, size, mtime) that a cache of
    their parsed form is keyed by; `tags` (a parser version, say) invalidate it deliberately."""
    parts = sorted(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in paths)
    return sha256_lines([*tags, *parts])[:24]


_directory_digests: dict[tuple[str, int], str] = {}


def directory_fingerprint(path: Path) -> str:
    """sha256 over the relative names, sizes and bytes of a directory's files, each name and size
    length-prefixed so no two layouts hash alike (memoised by every file's name, size and mtime:
    a file added, removed or rewritten misses the memo)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(p.relative_to(path).as_posix(), p.stat()) for p in files]
    memo = (str(path), tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats))
    cached = _directory_digests.get(memo)
    if cached:
        return cached
    digest = hashlib.sha256()
    for file, (name, st) in zip(files, stats):
        encoded = name.encode()
        digest.update(len(encoded).to_bytes(8, "little") + encoded + st.st_size.to_bytes(8, "little"))
        update_with_file(digest, file)
    _directory_digests[memo] = digest.hexdigest()[:24]
    return _directory_digests[memo]


def code_version(*modules: str) -> str:
    """Hash of the source of the given modules/packages (all .py files under a package).

    (Wide by design: a stage's code version is `sources_version` over its import closure,
    `flows.stages.Stage.code_version`; this one versions the registry's records and the
    Prefect cache of non-stage steps.)"""
    from retroflow import __version__

    digest = hashlib.sha256(__version__.encode())
    for name in sorted(modules):
        module = importlib.import_module(name)
        origin = Path(module.__file__)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for file in files:
            digest.update(str(file.relative_to(origin.parent)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


_sources_versions: dict[tuple[str, str], str] = {}


def sources_version(root: Path, files: Iterable[Path]) -> str:
    """Hash of source files: the project's version, then each file's path relative to `root`
    and its bytes, in path order (a stage's code version, over the files its `run` can execute).
    Memoised by the files' paths, sizes and modification times: keys are computed often."""
    from retroflow import __version__

    root = Path(root)
    files = sorted({Path(f) for f in files}, key=lambda f: f.relative_to(root).as_posix())
    memo = (str(root), stat_signature(files, __version__))
    if memo not in _sources_versions:
        digest = hashlib.sha256(__version__.encode())
        for file in files:
            source = file.read_bytes()
            digest.update(f"{file.relative_to(root).as_posix()}\0{len(source)}\0".encode())
            digest.update(source)
        _sources_versions[memo] = digest.hexdigest()[:16]
    return _sources_versions[memo]
