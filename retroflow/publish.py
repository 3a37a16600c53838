"""Publishing a directory all at once, and sweeping what killed publishers left behind.

Every place that builds a directory (a stage's artifact, a normalised dataset, a converted
MS MARCO or NQ copy, a tokenised corpus) builds it under a staging name beside its final
path and renames it into place, so a reader sees nothing or everything. A staging name
carries its builder's pid and origin (`<name>.tmp-<pid>-<host>-<namespace id>-<token>`): a
later run of the same host and pid namespace can then tell a directory whose builder was killed
(remove it) from one still being written (leave it). A pid says nothing about another container
or host on the same store path, so their staging (and names from before the origin was
recorded) is removed only when nothing was written in it for `STALE_FOREIGN_HOURS` and no build
holds its key's lock.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("retroflow.publish")

# <name>.tmp-<pid>-<host>-<8 hex: namespace id>-<8 hex: token>
STAGING = re.compile(r"\.tmp-(?P<pid>\d+)-(?P<origin>[A-Za-z0-9_-]+-[0-9a-f]{8})-[0-9a-f]{8}$")
LEGACY_STAGING = re.compile(r"\.tmp-\d+(?:-|$)")  # pid only: written before names carried an origin
# Generous: a build elsewhere writes into its staging directory at least this often or is dead.
STALE_FOREIGN_HOURS = 24.0


def origin() -> str:
    """`<host>-<id>`: this host's name, and a digest of what makes its pids one namespace (the pid
    namespace's inode and the boot id, where /proc has them): two containers on one host, or one
    host before and after a reboot, get different ids even under one host name."""
    parts = [socket.gethostname()]
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    host = re.sub(r"[^A-Za-z0-9_-]", "_", parts[0])[:32] or "host"
    return f"{host}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:8]}"


def staging_name(name: str) -> str:
    return f"{name}.tmp-{os.getpid()}-{origin()}-{secrets.token_hex(4)}"


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def sweep_stale(parent: Path) -> list[Path]:
    """Remove staging directories and files in `parent` whose builder no longer runs: this host
    and namespace's whose pid is gone, and others' (or unattributed ones) once stale."""
    removed = []
    if not parent.is_dir():
        return removed
    here = origin()
    for entry in parent.iterdir():
        found = STAGING.search(entry.name)
        if found is not None and found["origin"] == here:
            if process_alive(int(found["pid"])):
                continue
        elif found is not None or LEGACY_STAGING.search(entry.name):
            if not abandoned(entry):
                continue
        else:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("removed %d leftover(s) of killed runs in %s", len(removed), parent)
    return removed


def abandoned(entry: Path) -> bool:
    """Staging of another host or namespace (whose pids mean nothing here) that nobody uses: no
    write inside it for STALE_FOREIGN_HOURS, and, for a store build, its key's lock is free."""
    cutoff = time.time() - STALE_FOREIGN_HOURS * 3600
    try:
        inside = entry.rglob("*") if entry.is_dir() and not entry.is_symlink() else []
        newest = max([entry.lstat().st_mtime, *(p.lstat().st_mtime for p in inside)])
    except OSError:  # vanishing while we look: its owner is at work
        return False
    if newest > cutoff:
        return False
    lock = entry.with_name(entry.name.split(".tmp-", 1)[0].removesuffix(".download") + ".lock")
    return not lock.is_file() or lock_is_free(lock)


def lock_is_free(path: Path) -> bool:
    """Whether nobody holds the flock on `path` (see artifacts.key_lock) at this moment."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return True
    try:
        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True
    except OSError:
        return False


@contextmanager
def publishing(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside `final`; rename it to `final` when the block ends.

    If the block raises, the staging directory is removed and `final` is untouched. If `final`
    appeared meanwhile (another process published the same content first) it is kept and the
    staging copy dropped, unless `replace`: then the old copy is renamed aside, the new one
    renamed in, and only then is the old one deleted, so a kill never leaves `final` half gone.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final.parent)
    staging = final.parent / staging_name(final.name)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists() and not replace:
        shutil.rmtree(staging, ignore_errors=True)
        return
    replace_directory(staging, final)


def replace_directory(staging: Path, final: Path) -> None:
    """Rename the complete directory `staging` to `final`. An existing `final` is renamed aside
    first, in one step, and deleted only once the new copy is in place, so a kill never leaves
    `final` half deleted. If another process publishes `final` meanwhile, theirs is kept and
    `staging` dropped (the same name holds the same content)."""
    old = None
    if final.exists():
        old = final.parent / staging_name(final.name)
        try:
            os.replace(final, old)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    try:
        os.replace(staging, final)
    except OSError:  # lost a race to publish the same name: theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
        if not final.exists():
            if old is not None:
                os.replace(old, final)  # nothing new arrived: the old copy goes back
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a kill here leaves staging that the next sweep removes


def check_replaceable_model_dir(dest: Path) -> None:
    """Refuse to replace `dest` unless it is absent or holds a model (`config.json`): an output
    folder's `model/` that holds something else (notes, data) is the user's, not a stale model."""
    if dest.exists() and not (dest / "config.json").is_file():
        raise FileExistsError(errno.EEXIST, "holds no model, so it is not replaced (move it, or choose another --output)", str(dest))


@contextmanager
def publishing_content(parent: Path) -> Iterator[tuple[Path, Callable[[str], Path]]]:
    """Like `publishing`, for a directory named after its content: yields (staging, publish);
    `publish(name)` moves the staging directory to `parent/name` (an existing one is kept, as
    the same name means the same content) and returns that path."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent)
    staging = parent / staging_name("content")
    staging.mkdir()

    def publish(name: str) -> Path:
        final = parent / name
        if not final.exists():
            try:
                os.replace(staging, final)
            except OSError:
                if not final.exists():
                    raise
        return final

    try:
        yield staging, publish
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published


@contextmanager
def publishing_file(final: Path) -> Iterator[Path]:
    """Yield a staging path beside `final` to write; when the block ends it is synced and renamed
    to `final` (replacing it), so a reader sees the old file or the new one, never half of one.
    If the block raises, the staging file is removed and `final` is untouched."""
    if final.is_dir():  # before any work: the rename at the end would fail with the staging name
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / staging_name(f".{final.name}")
    try:
        yield staging
        with open(staging, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with publishing_file(path) as staging:
        staging.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_if_empty(directory: Path) -> None:
    """Drop a cache directory a failed step created and left empty."""
    try:
        directory.rmdir()
    except OSError:
        pass
