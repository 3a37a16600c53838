"""Content-addressed artifact store: `<root>/<stage>/<key>/` with a `manifest.json`.

key = sha256(stage, canonical config, input fingerprints, stage code version). A directory
under its final name is always complete: stages write into `<key>.tmp-<pid>/` and rename it
into place; in-stage checkpoints live in `<key>.partial/`, which a re-run resumes from and
which is removed on success.

The root may also be an fsspec URL (`s3://bucket/retroflow`, `gs://...`, `file:///shared/...`):
the store then mirrors a local working copy to it (see `ArtifactStore`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from retroflow import __version__
from retroflow.config import StageConfig
from retroflow.hashing import code_version, hash_json, sha256_file  # noqa: F401 (the store's helpers, re-exported)
from retroflow.publish import atomic_write_bytes, atomic_write_text, staging_name, sweep_stale  # noqa: F401

MANIFEST = "manifest.json"
log = logging.getLogger("retroflow.artifacts")


class UnsafeArtifactError(ValueError):
    """An artifact whose manifest names a path outside it, or that holds a symlink: a store
    someone tampered with, never used (a ValueError: the CLI prints it as one line)."""


class DamagedArtifactError(ValueError):
    """A damaged artifact the store will not delete to rebuild: it lies behind a symlink, outside
    the store's own folders (a ValueError: the CLI prints it as one line)."""


def check_manifest_path(rel: Any, label: str) -> str:
    """`rel` when it is a plain relative POSIX path (what `list_files` writes); anything else in a
    manifest (absolute, `..`, backslashes, drive letters) can only come from tampering, and joining
    it would reach outside the artifact."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (
        not parts
        or rel == MANIFEST
        or "\\" in rel
        or "\x00" in rel
        or any(part in ("", ".", "..") for part in parts)
        or PureWindowsPath(parts[0]).drive
    ):
        raise UnsafeArtifactError(f"artifact {label}: manifest entry {rel!r} is not a relative path inside the artifact; refusing it")
    return rel


def confined(root: Path, rel: Any, label: str) -> Path:
    """`root / rel`, refused unless it stays inside `root` once symlinks are followed."""
    path = root / check_manifest_path(rel, label)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeArtifactError(f"artifact {label}: manifest entry {rel!r} resolves outside the artifact (a symlink); refusing it")
    return path


def manifest_entries(manifest: Any, label: str) -> dict[str, Any]:
    """The manifest's `files`, every path checked (see `check_manifest_path`)."""
    files = manifest.get("files", {}) if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise UnsafeArtifactError(f"artifact {label}: manifest has no 'files' mapping; refusing it")
    for rel in files:
        check_manifest_path(rel, label)
    return files


def label_of(path: Path) -> str:
    """`stage/key` of an artifact directory (what errors name), from its location in the store."""
    return f"{path.parent.name}/{path.name}"


def cache_root() -> Path:
    """`$RETROFLOW_CACHE`, else `~/.cache/retroflow`: normalised datasets, token caches, store working copies."""
    return Path(os.environ.get("RETROFLOW_CACHE", Path.home() / ".cache" / "retroflow")).expanduser()


@dataclass(frozen=True)
class Artifact:
    """A finished stage output: where it is and what it is (its manifest)."""

    stage: str
    key: str
    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def file(self, name: str) -> Path:
        return self.path / name

    def ref(self) -> dict[str, str]:
        return {"stage": self.stage, "key": self.key, "fingerprint": self.fingerprint, "path": str(self.path)}

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        path = Path(path)
        manifest = json.loads((path / MANIFEST).read_text())
        return cls(stage=manifest["stage"], key=manifest["key"], path=path)


def open_verified(path: str | Path) -> Artifact:
    """An artifact named by its path (not found through the store by key), verified first: its
    fingerprint keys whatever is built from it, and says nothing of damage done since."""
    problems = verify_artifact(Path(path))
    if problems:
        raise DamagedArtifactError(f"{path}: the artifact fails verification ({'; '.join(problems[:3])}); rebuild or restore it")
    return Artifact.open(path)


def list_files(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = file.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
    return files


def stamps_path(path: Path) -> Path:
    """Beside the artifact (which stays as built): each file's (bytes, mtime) when last hashed."""
    return path.with_name(f"{path.name}.stamps.json")


def file_stamp(file: Path) -> list[int]:
    stat = file.stat()
    return [stat.st_size, stat.st_mtime_ns]


def record_stamps(path: Path, files: Mapping[str, Any]) -> None:
    stamps = {rel: file_stamp(path / rel) for rel in files if (path / rel).is_file()}
    atomic_write_text(stamps_path(path), json.dumps(stamps, sort_keys=True))


def read_stamps(path: Path) -> dict[str, list[int]]:
    try:
        return json.loads(stamps_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def artifact_label(path: str | Path) -> str:
    """`stage/key[/sub/path]` for a path inside a store artifact (the same on every machine and
    store root, so files that name it stay content-addressed); other paths as given."""
    path = Path(path)
    for depth, parent in enumerate([path, *path.parents][:4]):
        manifest = parent / MANIFEST
        if manifest.is_file():
            try:
                found = json.loads(manifest.read_text())
                label = f"{found['stage']}/{found['key']}"
            except (OSError, ValueError, KeyError):
                break
            rest = path.relative_to(parent).as_posix()
            return label if rest == "." else f"{label}/{rest}"
    return str(path)


def resolve_artifact_label(name: str, near: Path | None = None) -> str:
    """A recorded `stage/key/...` path (see `artifact_label`): looked up in the store holding
    `near` (an index inside a store), then in the default store; anything else as is."""
    if Path(name).exists():
        return name
    roots = [*Path(near).resolve().parents[:3]] if near is not None else []
    for root in [*roots, default_store().root]:
        if (root / name).exists():
            return str(root / name)
    return name


def verify_artifact(path: Path, full: bool = False, record: bool = True) -> list[str]:
    """Problems found with an artifact directory (empty list = intact).

    Raises UnsafeArtifactError when the manifest names a path outside the artifact. Every
    file's size is checked, and its sha256 whenever the file changed since it was last
    hashed (its size or modification time differs from the stamp recorded then), so a file
    rewritten in place, even to the same size, is caught without rehashing multi-GB embeddings
    on every lookup. `full=True` rehashes every file (what a bit flip that keeps the
    modification time needs). `record=False`: leave no stamps file (a staging directory about to
    be renamed, whose stamps the caller records under the final name).
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path} missing"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        return [f"{manifest_path}: unreadable ({err})"]
    label = label_of(path)
    files = manifest_entries(manifest, label)
    problems, stamps, rehashed = [], read_stamps(path), False
    for rel, meta in files.items():
        file = confined(path, rel, label)
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            problems.append(f"{file}: manifest entry has no sha256 and byte count")
        elif not file.is_file():
            problems.append(f"{file} missing")
        elif file.stat().st_size != meta["bytes"]:
            problems.append(f"{file} has {file.stat().st_size} bytes, manifest says {meta['bytes']}")
        elif full or stamps.get(rel) != file_stamp(file):
            rehashed = True
            if sha256_file(file) != meta["sha256"]:
                problems.append(f"{file} content differs from its manifest hash")
    if rehashed and not problems and record:
        try:
            record_stamps(path, files)
        except OSError:  # a read-only store: verified now, verified again next time
            pass
    return problems


def stage_key(stage: str, config: StageConfig | Mapping[str, Any], inputs: Mapping[str, Artifact], code: str) -> str:
    cfg = config.canonical() if isinstance(config, StageConfig) else dict(config)
    return hash_json(
        {
            "stage": stage,
            "config": cfg,
            "inputs": {name: art.fingerprint for name, art in sorted(inputs.items())},
            "code": code,
        }
    )[:20]


StageBody = Callable[[Path, Path], Mapping[str, Any] | None]


class ArtifactStore:
    """A local directory (the default), or a local working copy mirrored to an fsspec URL.

    With a URL, stages still read and write local files (torch, FAISS and Arrow need them) in
    `cache` (default `$RETROFLOW_STORE_CACHE`, else `$RETROFLOW_CACHE/store/<hash of the URL>`).
    Every finished artifact is uploaded, its files first and its manifest last, so a remote
    manifest always means a complete upload; a lookup that misses locally downloads the remote
    copy and checks every file's sha256 before trusting it. Machines that share one URL thus
    share every finished stage. In-stage checkpoints (`.partial/`) stay on the local disk.
    """

    def __init__(self, root: str | Path, cache: str | Path | None = None, full_verify: bool = False):
        # full_verify: re-hash every file of an artifact before reusing it (once per artifact and
        # store object), not only files whose size or mtime changed.
        self.full_verify = full_verify
        self._fully_verified: set[Path] = set()
        text = str(root)
        self.remote: str | None = None
        if "://" in text:
            self.remote = text.rstrip("/")
            digest = hashlib.sha256(self.remote.encode()).hexdigest()[:16]
            default = cache_root() / "store" / digest
            text = str(cache or os.environ.get("RETROFLOW_STORE_CACHE") or default)
        self.root = Path(os.path.expanduser(text)).resolve()

    @property
    def location(self) -> str:
        """What identifies the store: its URL when mirrored, else its directory."""
        return self.remote or str(self.root)

    def path_for(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.partial"

    def key_for(self, stage: str, config: StageConfig, inputs: Mapping[str, Artifact], code: str) -> str:
        return stage_key(stage, config, inputs, code)

    def check(self, path: Path, full_verify: bool = False) -> list[str]:
        """`verify_artifact` of an artifact of this store, as thoroughly as the store is set to."""
        full = full_verify or (self.full_verify and path not in self._fully_verified)
        problems = verify_artifact(path, full=full)
        if full and not problems:
            self._fully_verified.add(path)
        return problems

    def lookup(self, stage: str, key: str, full_verify: bool = False) -> Artifact | None:
        path = self.path_for(stage, key)
        if path.is_dir() and not self.check(path, full_verify):
            return Artifact(stage, key, path)
        return self._download(stage, key) if self.remote else None

    # ------------------------------------------------------------------ remote mirror
    def _remote_dir(self, stage: str, key: str):
        import fsspec

        fs, base = fsspec.core.url_to_fs(self.remote)
        return fs, f"{base.rstrip('/')}/{stage}/{key}"

    def _upload(self, art: Artifact) -> None:
        fs, dest = self._remote_dir(art.stage, art.key)
        label = f"{art.stage}/{art.key}"
        files = [confined(art.path, rel, label) for rel in manifest_entries(art.manifest, label)]
        for file in [*files, art.path / MANIFEST]:  # the manifest last: it marks the upload complete
            target = f"{dest}/{file.relative_to(art.path).as_posix()}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(file), target)
        log.info("uploaded %s/%s to %s", art.stage, art.key, self.remote)

    def _download(self, stage: str, key: str) -> Artifact | None:
        fs, src = self._remote_dir(stage, key)
        if not fs.exists(f"{src}/{MANIFEST}"):
            return None
        label = f"{stage}/{key}"
        manifest = fs.cat_file(f"{src}/{MANIFEST}")
        final = self.path_for(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / staging_name(f"{key}.download")
        tmp.mkdir()
        try:
            # Paths are checked before anything is fetched: the remote manifest is whatever anyone
            # with write access to the shared store put there.
            files = {rel: confined(tmp, rel, label) for rel in manifest_entries(json.loads(manifest), label)}
            for rel, local in files.items():
                if _remote_is_link(fs, f"{src}/{rel}"):
                    raise UnsafeArtifactError(f"artifact {label} in {self.remote}: {rel!r} is a symlink; refusing it")
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{src}/{rel}", str(local))
            (tmp / MANIFEST).write_bytes(manifest)
            refuse_links(tmp, label)
            problems = verify_artifact(tmp, full=True, record=False)
        except (OSError, json.JSONDecodeError) as err:
            problems = [f"download failed: {err}"]
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if problems:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("remote copy of %s in %s not used (rebuilding): %s", label, self.remote, "; ".join(problems[:3]))
            return None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        record_stamps(final, files)
        log.info("downloaded %s from %s", label, self.remote)
        return Artifact(stage, key, final)

    def build(
        self,
        stage: str,
        config: StageConfig,
        inputs: Mapping[str, Artifact],
        code: str,
        body: StageBody,
        extra_manifest: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> Artifact:
        """Return the cached artifact for this (stage, config, inputs, code), or build it.

        `body(out_dir, partial_dir)` writes the stage's files into `out_dir` and may keep
        resumable checkpoints in `partial_dir`; it returns the stage's metrics.
        `key`: the artifact key when the caller computed it (flows.stages.artifact_key does, for
        every stage); by default the key of (stage, config, inputs, code).
        """
        key = key or self.key_for(stage, config, inputs, code)
        cached = self.lookup(stage, key)
        if cached is not None:
            return cached
        final = self.path_for(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # One builder per key at a time: a second identical run waits here, then finds the
        # first one's artifact; runs of other keys never touch this key's partial directory.
        with key_lock(final.parent / f"{key}.lock"):
            sweep_stale(final.parent)  # temporary directories of killed builds (any key)
            cached = self.lookup(stage, key)
            if cached is not None:
                return cached
            return self._build_locked(stage, key, final, config, inputs, code, body, extra_manifest)

    @contextmanager
    def contributing(self, stage: str, key: str) -> Iterator[Path]:
        """Yield the partial directory of (`stage`, `key`) (not created) for a step that adds a
        piece to it (an encode shard), holding the key's lock shared: several such steps run at once, but never
        while the key's build runs, which would delete the directory under them."""
        final = self.path_for(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with key_lock(final.parent / f"{key}.lock", shared=True):
            yield self.partial_dir(stage, key)

    def _build_locked(self, stage, key, final, config, inputs, code, body, extra_manifest) -> Artifact:
        if final.is_symlink():  # a link someone made (an artifact moved to another disk) to a damaged copy
            problems = "; ".join(self.check(final, True)[:3]) or "its target is missing"
            raise DamagedArtifactError(
                f"{final} is a symlink to {os.path.realpath(final)}, whose artifact fails verification "
                f"({problems}); repair the target, or remove the link to rebuild it here"
            )
        if final.exists():  # present but failed verification: rebuild from scratch
            shutil.rmtree(final)
        partial = self.partial_dir(stage, key)
        partial.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / staging_name(key)
        tmp.mkdir(parents=True)
        started = time.time()
        try:
            metrics = body(tmp, partial) or {}
            manifest = write_manifest(
                tmp,
                stage=stage,
                key=key,
                config=config.canonical(),
                inputs={name: art.ref() for name, art in inputs.items()},
                code=code,
                started=started,
                metrics=dict(metrics),
                extra=extra_manifest,
            )
            os.replace(tmp, final)
        except BaseException:
            # also after the body finished (the manifest or the rename failed): a complete copy
            # under a staging name is swept only once this process is gone
            shutil.rmtree(tmp, ignore_errors=True)  # the checkpoints in `partial` stay for the re-run
            raise
        record_stamps(final, manifest["files"])  # hashed just now
        shutil.rmtree(partial, ignore_errors=True)
        artifact = Artifact(stage, key, final)
        if self.remote:
            self._upload(artifact)
        return artifact


def _remote_is_link(fs, path: str) -> bool:
    """Whether the store's filesystem says `path` is a symlink (object stores have none)."""
    islink = getattr(fs, "islink", None)
    try:
        return bool(islink(path)) if islink else False
    except (OSError, NotImplementedError):
        return False


def refuse_links(root: Path, label: str) -> None:
    """Raise if anything under `root` is a symlink: a downloaded artifact holds plain files only."""
    for entry in root.rglob("*"):
        if entry.is_symlink():
            raise UnsafeArtifactError(f"artifact {label}: {entry.relative_to(root).as_posix()!r} is a symlink; refusing it")


@contextmanager
def key_lock(path: Path, shared: bool = False):
    """An advisory lock (flock) on `path`, held for the block; waits for a conflicting holder.
    Exclusive for the one build of a key; `shared` for steps that write into the key's partial
    directory beside other such steps, and that the build (which deletes that directory when
    it publishes) must not overlap. Local filesystems only (NFS flock support varies); where
    fcntl is missing, no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_manifest(
    directory: Path,
    *,
    stage: str,
    key: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, Any],
    code: str,
    started: float,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    files = list_files(directory)
    manifest = {
        "stage": stage,
        "key": key,
        "config": dict(config),
        "inputs": dict(inputs),
        "code_version": code,
        "retroflow_version": __version__,
        "started_at": started,
        "finished_at": time.time(),
        "seconds": round(time.time() - started, 3),
        "metrics": dict(metrics),
        "files": files,
        "fingerprint": hash_json({k: v["sha256"] for k, v in files.items()}),
    }
    if extra:
        manifest.update(extra)
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return manifest


def lineage(artifact: Artifact) -> list[dict[str, Any]]:
    """Walk parent artifacts depth-first: [this, parents...], each a small summary dict."""
    seen: set[str] = set()
    chain: list[dict[str, Any]] = []

    def visit(path: Path, depth: int) -> None:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file() or str(path) in seen:
            return
        seen.add(str(path))
        manifest = json.loads(manifest_path.read_text())
        chain.append(
            {
                "depth": depth,
                "stage": manifest["stage"],
                "key": manifest["key"],
                "path": str(path),
                "seconds": manifest.get("seconds"),
                "code_version": manifest.get("code_version"),
            }
        )
        for ref in manifest.get("inputs", {}).values():
            if isinstance(ref, Mapping) and "path" in ref:
                visit(Path(ref["path"]), depth + 1)

    visit(artifact.path, 0)
    return chain


def artifact_dirs(root: Path) -> list[Path]:
    """Every artifact directory of a store (`<root>/<stage>/<key>`): not staging, not in-stage
    checkpoints, not the run reports (`runs/`, `ablations/`) or Prefect's records (`.prefect/`)."""
    found = []
    for stage in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ("runs", "ablations")):
        found += [p for p in sorted(stage.iterdir()) if p.is_dir() and ".tmp-" not in p.name and not p.name.endswith(".partial")]
    return found


def verify_all(path: Path) -> tuple[int, dict[str, list[str]]]:
    """Full sha256 check of one artifact (a directory with a manifest) or of every artifact of the
    store at `path`: (artifacts checked, {stage/key: problems} of the damaged ones)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such store or artifact directory")
    targets = [path] if (path / MANIFEST).is_file() else artifact_dirs(path)
    if not targets:
        raise FileNotFoundError(f"{path}: neither an artifact (no {MANIFEST}) nor a store holding any")
    damaged = {}
    for target in targets:
        try:
            problems = verify_artifact(target, full=True)
        except UnsafeArtifactError as err:
            problems = [str(err)]
        if problems:
            damaged[label_of(target)] = problems
    return len(targets), damaged


def default_store() -> ArtifactStore:
    """The store named by `$RETROFLOW_STORE` (a directory or an fsspec URL), else `./artifacts`."""
    return ArtifactStore(os.environ.get("RETROFLOW_STORE") or "artifacts")


def iter_stage_artifacts(store: ArtifactStore, stage: str) -> Iterable[Artifact]:
    stage_dir = store.root / stage
    if not stage_dir.is_dir():
        return []
    return [Artifact(stage, p.name, p) for p in sorted(stage_dir.iterdir()) if (p / MANIFEST).is_file()]
