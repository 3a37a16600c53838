"""Staging names carry the builder's host and pid namespace: a sweep removes only what a dead
process of this host and namespace left, never a live build of another container or host on the
same store (issue 22, item 11)."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from retroflow.publish import staging_name, sweep_stale


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def ours_with_pid(name: str, pid: int) -> str:
    """`staging_name(name)` as the process `pid` of this host and namespace would have made it."""
    made = staging_name(name)
    return made.replace(f".tmp-{os.getpid()}-", f".tmp-{pid}-", 1)


def age(path: Path, hours: float) -> None:
    then = time.time() - hours * 3600
    for entry in [path, *path.rglob("*")]:
        os.utime(entry, (then, then))


def test_a_staging_name_says_which_host_and_namespace_made_it():
    made = staging_name("key")
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in socket.gethostname())
    assert made.startswith(f"key.tmp-{os.getpid()}-{host[:32]}-")


def test_another_hosts_staging_with_a_pid_dead_here_is_left_alone(tmp_path):
    pid = dead_pid()
    theirs = tmp_path / f"key.tmp-{pid}-otherhost-0123abcd-deadbeef"  # a live build in another container
    (theirs / "half").mkdir(parents=True)
    ours = tmp_path / ours_with_pid("key", pid)  # a build of this host and namespace that was killed
    (ours / "half").mkdir(parents=True)
    assert sweep_stale(tmp_path) == [ours]
    assert theirs.is_dir() and not ours.exists()


def test_another_hosts_staging_goes_once_it_is_a_day_old_and_no_build_holds_its_key(tmp_path):
    theirs = tmp_path / "key.tmp-123-otherhost-0123abcd-deadbeef"
    (theirs / "half").mkdir(parents=True)
    legacy = tmp_path / "old.tmp-456-1234abcd"  # named before names carried a host: its host is unknown
    legacy.mkdir()
    assert sweep_stale(tmp_path) == []
    age(theirs, 25)
    age(legacy, 25)
    with open(tmp_path / "key.lock", "a+") as lock:  # someone still builds `key` (flock works across containers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert sweep_stale(tmp_path) == [legacy]
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert sweep_stale(tmp_path) == [theirs]
    assert not theirs.exists() and not legacy.exists()


def test_a_recent_write_inside_keeps_another_hosts_staging(tmp_path):
    theirs = tmp_path / "key.tmp-123-otherhost-0123abcd-deadbeef"
    (theirs / "sub").mkdir(parents=True)
    age(theirs, 25)
    (theirs / "sub" / "written-now.bin").write_bytes(b"x")  # the build is still writing
    assert sweep_stale(tmp_path) == [] and theirs.is_dir()
