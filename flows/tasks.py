"""Pipeline steps as cached, retried Prefect tasks.

A task's cache key is the key of the artifact it makes (`flows.stages.artifact_key`, the one
the store and the stage commands use), so Prefect's cache and the store agree; steps that make
no artifact key of their own use the key they stand for (a dataset read by name: its content's
`data` key; an encoding shard: its artifact's key and number), else they hash their arguments.
Prefect's cache does not know whether the files a cached result points to still exist, so every
finished task records its artifact in a small key index and the key function refuses a cached
entry whose artifact is gone or damaged.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.filesystems import LocalFileSystem

from flows.stages import artifact_key
from retroflow.artifacts import Artifact, ArtifactStore
from retroflow.config import StageConfig
from retroflow.hashing import code_version, hash_json
from retroflow.inputs import ExternalInput
from retroflow.progress import reporting_progress_to
from retroflow.publish import atomic_write_bytes, atomic_write_text

log = logging.getLogger("retroflow.flows")

RETRY_DELAYS = [5, 30, 120]  # back-off for transient errors (I/O, a busy GPU, a flaky store)


def canonical_argument(value: Any) -> Any:
    if isinstance(value, StageConfig):
        return {"config": value.canonical(), "type": type(value).__name__}
    if isinstance(value, (Artifact, ExternalInput)):
        return {"input": value.fingerprint}
    if isinstance(value, ArtifactStore):
        return {"store": value.location}
    if isinstance(value, (list, tuple)):
        return [canonical_argument(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical_argument(v) for k, v in sorted(value.items())}
    if isinstance(value, Path):
        return str(value)
    return value


def cache_index_dir(store: ArtifactStore) -> Path:
    return store.root / ".prefect" / "index"


ORDERING_ONLY = {"after"}  # parameters that only sequence steps; never part of a key


def step_cache_key(step: str, parameters: dict[str, Any]) -> str:
    parameters = {k: v for k, v in parameters.items() if k not in ORDERING_ONLY}
    key = f"{step}-{made_artifact_key(step, parameters)}"
    store = parameters.get("store")
    if isinstance(store, ArtifactStore):
        record = cache_index_dir(store) / f"{key}.json"
        if record.is_file():
            paths = json.loads(record.read_text()).get("artifacts", [])
            if any(store.check(Path(p)) for p in paths):
                # the cached result points at missing or damaged files: compute again
                return f"{key}-stale-{int(time.time())}"
    return key


def made_artifact_key(step: str, parameters: dict[str, Any]) -> str:
    """The key of the artifact the step makes (an encoding shard: its artifact's key and number;
    a dataset read by name: the key of its content, so edited files are read again)."""
    if "config" in parameters and "inputs" in parameters:
        key = artifact_key(parameters.get("stage", step.removesuffix("-shard")), parameters["config"], parameters["inputs"])
        return f"{key}-shard{parameters['shard']}" if "shard" in parameters else key
    if step == "data":  # named by source, keyed by content: read it, as the step itself would
        from flows.chain import dataset_source
        from retroflow.data import data_config

        return artifact_key("data", data_config(dataset_source(parameters["source"], parameters.get("data_dir"))), {})
    payload = {"step": step, "code": code_version("flows.chain", "retroflow.data"), "args": canonical_argument(parameters)}
    return hash_json(payload)[:24]


def record_artifacts(store: ArtifactStore, key: str, result: Any) -> None:
    found = [str(a.path) for a in _artifacts_in(result)]
    atomic_write_text(cache_index_dir(store) / f"{key}.json", json.dumps({"artifacts": found}))


def _artifacts_in(value: Any) -> list[Artifact]:
    if isinstance(value, Artifact):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _artifacts_in(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _artifacts_in(v)]
    return []


def make_task(step: str, fn: Callable[..., Any], store: ArtifactStore, task_name: str | None = None):
    """Wrap a pipeline step function as a Prefect task with the stage-key cache policy."""
    signature = inspect.signature(fn)

    def key_fn(_context, parameters: dict[str, Any]) -> str:
        return step_cache_key(step, parameters)

    def run_and_record(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        with reporting_progress_to(ProgressArtifacts(step)):
            result = fn(*bound.args, **bound.kwargs)
        record_artifacts(store, step_cache_key(step, dict(bound.arguments)), result)
        return result

    run_and_record.__name__ = fn.__name__
    run_and_record.__signature__ = signature  # Prefect reads parameters (for the key fn and the UI) from it
    policy = CacheKeyFnPolicy(cache_key_fn=key_fn).configure(key_storage=store.root / ".prefect" / "keys")
    return task(
        run_and_record,
        name=task_name or step,
        cache_policy=policy,
        persist_result=True,
        result_storage=store.root / ".prefect" / "results",
        retries=2,
        retry_delay_seconds=RETRY_DELAYS[:2],
        retry_condition_fn=is_transient_failure,
    )


def _write_by_rename(self: LocalFileSystem, path: str, content: bytes, _sync: bool | None = None) -> str:
    resolved = Path(self._resolve_path(path))
    if resolved.exists() and not resolved.is_file():
        raise ValueError(f"Path {resolved} already exists and is not a file.")
    atomic_write_bytes(resolved, content)
    return str(resolved)


async def _awrite_by_rename(self: LocalFileSystem, path: str, content: bytes) -> str:
    return _write_by_rename(self, path, content)


def write_cache_records_by_rename() -> None:
    """Make Prefect's local storage replace a file by a rename instead of rewriting it in place.

    Flow runs at once on one store finish identical tasks together (the second adopts the first's
    artifact through the store's lock) and each writes the same cache record; Prefect's
    `LocalFileSystem.write_path` truncates and rewrites the file, so a run looking the key up at
    that moment can read half a record (a cache miss, or a failed task when the half comes after
    `exists`). A subclass cannot be used instead: Prefect accepts a block object as a task's
    `result_storage` only once saved on the server. Patched here because only `flows` imports
    Prefect; every local write of a record goes through these two methods (`prefect.results`)."""
    LocalFileSystem.write_path = _write_by_rename
    LocalFileSystem.awrite_path = _awrite_by_rename


write_cache_records_by_rename()


class ProgressArtifacts:
    """Publishes a task's progress bars (training steps, encoded documents) as Prefect progress
    artifacts, one per bar label, updated at most every `min_interval` seconds and at the end."""

    def __init__(self, step: str, min_interval: float = 5.0) -> None:
        self.step, self.min_interval = step, min_interval
        self.ids: dict[str, Any] = {}
        self.last: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if label in self.ids and done < total and now - self.last[label] < self.min_interval:
            return
        self.last[label] = now
        percent = 100.0 * done / total
        description = f"{self.step}: {label} {done}/{total}"
        try:
            if label in self.ids:
                update_progress_artifact(self.ids[label], progress=percent, description=description)
            else:
                key = ui_key("progress", self.step) if label in self.step else ui_key("progress", self.step, label)
                self.ids[label] = create_progress_artifact(percent, key=key, description=description)
        except Exception as exc:  # progress is a courtesy: it must never fail the stage
            log.debug("progress artifact for %s not published: %s", self.step, exc)


def ui_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:100]


def is_transient_failure(_task, _task_run, state) -> bool:
    """Retry transient I/O errors; a bad config, dataset or a bug fails at once."""
    try:
        state.result()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return False
    except (OSError, TimeoutError, ConnectionError):
        return True
    except Exception:
        return False
    return False
