"""The run registry: every evaluation appended to one Parquet table, readable with pandas.

One row per (run, dataset, split, metric): run_id, time (UTC), suite, model, index,
dataset, dataset_fingerprint, split, metric, value, num_queries, per_query (JSON
`{qid: value}`), config_hash, code_version, extra (JSON of the run's other scalars).
A run id may cover several datasets (a suite run, a re-evaluation); (run_id, dataset,
split, metric) is unique.

    append_run(registry_path, result, *, run_id=None, config_hash, code_version, model,
               index, dataset, split, suite=None) -> run_id
    load_registry(path=None) -> pandas.DataFrame
    run_records(registry, run_id) -> list[RunRecord]          # one per (dataset, split)
    previous_run(registry, model, dataset, split, before_run_id=None) -> RunRecord | None

Appends are atomic and serialised: under an exclusive lock on `<path>.lock`, the table is
read, extended and written to a temporary file that is renamed over the old one, so a
reader never sees half a table and two concurrent appends do not lose each other's rows.
Default path: `$RETROFLOW_REGISTRY`, else `./runs/registry.parquet`.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retroflow.publish import publishing_file

REGISTRY_ENV = "RETROFLOW_REGISTRY"
DEFAULT_REGISTRY = Path("runs") / "registry.parquet"

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("suite", pa.string()),
        ("model", pa.string()),
        ("index", pa.string()),
        ("dataset", pa.string()),
        ("dataset_fingerprint", pa.string()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("num_queries", pa.int64()),
        ("per_query", pa.string()),
        ("config_hash", pa.string()),
        ("code_version", pa.string()),
        ("extra", pa.string()),
    ]
)


class RegistryError(ValueError):
    """A run that is not in the registry, or an append that would duplicate rows."""


def default_registry_path() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def new_run_id(now: datetime | None = None) -> str:
    """Sortable and unique: `20250131T120501Z-3fa2b1`."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_table(path: Path) -> pa.Table:
    """The registry as Arrow in the current schema (columns added later are filled with nulls)."""
    try:
        # Through one open handle: given a path, Arrow sizes the file and opens it separately, and
        # another run's append can replace the registry in between (read at the old size: garbage).
        with open(path, "rb") as handle:
            table = pq.read_table(handle)
    except FileNotFoundError:
        return SCHEMA.empty_table()
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in SCHEMA]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def scalar_extras(result: Mapping[str, Any], metrics: set[str]) -> dict[str, Any]:
    """The result's other scalars (timings, sizes), kept as JSON for reports."""
    keep = {}
    for key, value in result.items():
        if key in metrics or key in ("per_query", "run"):
            continue
        if isinstance(value, (str, int, bool)) or value is None:
            keep[key] = value
        elif isinstance(value, float):
            keep[key] = None if math.isnan(value) or math.isinf(value) else value
    return keep


def result_rows(result: Mapping[str, Any], identity: Mapping[str, Any]) -> list[dict[str, Any]]:
    per_query: Mapping[str, Mapping[str, float]] = result.get("per_query") or {}
    if not per_query:
        raise RegistryError("the result has no per-query values ('per_query'); nothing to register")
    extra = json.dumps(scalar_extras(result, set(per_query)), sort_keys=True, default=str)
    rows = []
    for metric, values in per_query.items():
        value = result.get(metric)
        if value is None:
            value = sum(values.values()) / len(values) if values else 0.0
        rows.append(
            {
                **identity,
                "metric": metric,
                "value": float(value),
                "num_queries": len(values),
                "per_query": json.dumps({str(q): float(v) for q, v in values.items()}, sort_keys=True),
                "extra": extra,
            }
        )
    return rows


def append_run(
    registry_path: str | Path | None,
    result: Mapping[str, Any],
    *,
    run_id: str | None = None,
    config_hash: str,
    code_version: str,
    model: str,
    index: str | None,
    dataset: str,
    split: str,
    suite: str | None = None,
) -> str:
    """Append one evaluation result (means + `per_query`) and return its run id."""
    path = Path(registry_path) if registry_path else default_registry_path()
    now = datetime.now(UTC)
    run_id = run_id or new_run_id(now)
    identity = {
        "run_id": run_id,
        "time": now,
        "suite": suite or result.get("suite"),
        "model": str(model),
        "index": None if index is None else str(index),
        "dataset": str(dataset),
        "dataset_fingerprint": result.get("dataset_fingerprint"),
        "split": str(split),
        "config_hash": config_hash,
        "code_version": code_version,
    }
    new = pa.Table.from_pylist(result_rows(result, identity), schema=SCHEMA)
    with locked(path):
        old = read_table(path)
        same_run = pc.equal(old.column("run_id"), run_id)
        same_data = pc.and_(pc.equal(old.column("dataset"), str(dataset)), pc.equal(old.column("split"), str(split)))
        clash = old.filter(pc.and_(same_run, same_data))
        if clash.num_rows:
            raise RegistryError(f"{path}: run '{run_id}' already has results for {dataset}/{split}")
        combined = pa.concat_tables([old, new])
        with publishing_file(path) as staging:
            pq.write_table(combined, staging)
    return run_id


def load_registry(path: str | Path | None = None) -> pd.DataFrame:
    """The whole registry as a DataFrame (empty, with the columns, when there is none yet)."""
    return read_table(Path(path) if path else default_registry_path()).to_pandas()


# ---------------------------------------------------------------------------------------
# Reading runs back
# ---------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One run on one dataset split: means, per-query values and identity."""

    run_id: str
    time: Any
    suite: str | None
    model: str
    index: str | None
    dataset: str
    dataset_fingerprint: str | None
    split: str
    config_hash: str
    code_version: str
    metrics: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self, with_per_query: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "per_query"}
        out["time"] = str(self.time)
        if with_per_query:
            out["per_query"] = self.per_query
        return out


def as_frame(registry: pd.DataFrame | str | Path | None) -> pd.DataFrame:
    return registry if isinstance(registry, pd.DataFrame) else load_registry(registry)


def resolve_run_id(frame: pd.DataFrame, run_id: str) -> str:
    """Exact id, or a unique prefix of one (`2025013` is enough when only one run matches)."""
    ids = frame["run_id"].drop_duplicates().tolist()
    if run_id in ids:
        return run_id
    matches = [i for i in ids if i.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RegistryError(f"run '{run_id}' is not in the registry ({len(ids)} runs; list them with `retroflow runs`)")
    raise RegistryError(f"run id prefix '{run_id}' is ambiguous: {', '.join(matches[:5])}")


def records_from_rows(rows: pd.DataFrame) -> list[RunRecord]:
    records: dict[tuple[str, str], RunRecord] = {}
    for row in rows.itertuples(index=False):
        key = (row.dataset, row.split)
        if key not in records:
            records[key] = RunRecord(
                run_id=row.run_id,
                time=row.time,
                suite=row.suite,
                model=row.model,
                index=row.index,
                dataset=row.dataset,
                dataset_fingerprint=row.dataset_fingerprint,
                split=row.split,
                config_hash=row.config_hash,
                code_version=row.code_version,
            )
        records[key].metrics[row.metric] = float(row.value)
        records[key].per_query[row.metric] = json.loads(row.per_query) if row.per_query else {}
    return list(records.values())


def run_records(registry: pd.DataFrame | str | Path | None, run_id: str) -> list[RunRecord]:
    """Every (dataset, split) result of one run, in the order they were appended."""
    frame = as_frame(registry)
    run_id = resolve_run_id(frame, run_id)
    return records_from_rows(frame[frame["run_id"] == run_id])


def previous_run(
    registry: pd.DataFrame | str | Path | None, model: str, dataset: str, split: str, before_run_id: str | None = None
) -> RunRecord | None:
    """The latest earlier run of `model` on `dataset`/`split` (appended before `before_run_id`, if given)."""
    frame = as_frame(registry).reset_index(drop=True)
    if before_run_id is not None:
        before_run_id = resolve_run_id(frame, before_run_id)
        first_row = frame.index[frame["run_id"] == before_run_id].min()
        frame = frame.iloc[:first_row]
    match = frame[(frame["model"] == model) & (frame["dataset"] == dataset) & (frame["split"] == split)]
    if match.empty:
        return None
    last_id = match["run_id"].iloc[-1]
    return records_from_rows(match[match["run_id"] == last_id])[0]


def list_runs(registry: pd.DataFrame | str | Path | None) -> pd.DataFrame:
    """One line per (run, dataset, split): identity + the metric means side by side."""
    frame = as_frame(registry)
    if frame.empty:
        return frame
    keys = ["run_id", "time", "suite", "model", "index", "dataset", "split"]
    frame = frame.assign(suite=frame["suite"].fillna(""), index=frame["index"].fillna(""))  # groupby drops null keys
    wide = frame.pivot_table(index=keys, columns="metric", values="value", aggfunc="first", sort=False)
    return wide.reset_index()
