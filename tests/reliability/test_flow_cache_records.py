"""Prefect's cache records under flow runs at once: a record is never read half-written.

Two flow runs on one store finish identical tasks together (the second adopts the first's
artifact through the store's lock) and both write the same cache record. Prefect's local storage
truncated and rewrote the file in place, so a third run looking the key up could read half a
record: before `flows.tasks` replaced files by a rename, this test's reader saw a partial file in
3618 of 3638 reads.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from prefect.filesystems import LocalFileSystem

import flows.tasks  # noqa: F401  (makes the writes of LocalFileSystem, which tasks' storage paths resolve to, whole)


def partial_reads(storage, seconds: float = 1.0) -> tuple[int, int]:
    """(reads, reads that were neither complete payload) while another thread rewrites the key."""
    payloads = (b"a" * 2_000_000, b"b" * 2_000_000)
    storage.write_path("key", payloads[0], _sync=True)
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            storage.write_path("key", payloads[i % 2], _sync=True)
            i += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads = bad = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or reads < 50:
            reads += 1
            bad += storage.read_path("key", _sync=True) not in payloads
    finally:
        stop.set()
        writer.join()
    return reads, bad


def test_a_cache_record_being_rewritten_is_read_whole(tmp_path: Path):
    reads, bad = partial_reads(LocalFileSystem(basepath=str(tmp_path)))  # what Prefect resolves a task's storage path to
    assert bad == 0, f"{bad} of {reads} reads saw a half-written record"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no staging file left beside it
