"""Sharded, resumable corpus encoding: a corpus -> fixed-size shards of vectors -> one embeddings directory.

The stage's one entry is `run` (the contract of `flows.stages.STAGES`); a flow maps `run_shard` over
the shards first (one task per shard, any machine), then `run` merges them:

    run(config: EncodeConfig, inputs: {"data", "model"}, out_dir: Path, partial_dir: Path,
        *, devices: list[str] | None = None) -> dict
        Every shard into `partial_dir` (finished ones are kept, so a killed run resumes), then
        merged into `out_dir`. `devices=["cuda:0", "cuda:1"]` runs one worker process per device.
    run_shard(config: EncodeConfig, inputs: {"data", "model"}, shard: int, shards_dir: Path) -> dict
        Encode one shard into `shards_dir/shard-NNNNN/` atomically; skipped when already there.
        Safe to call from separate processes/machines sharing `shards_dir`.
    run_shards(config, inputs, shards: Sequence[int], shards_dir: Path) -> dict
        Several shards in one process (one model load, a progress bar): one worker's share.
    plan_shards(num_docs: int, shard_size: int) -> list[range]
    merge_shards(shards_dir: Path, out_dir: Path, num_shards: int, merge: bool = True,
                 extra_meta: dict | None = None) -> dict
    open_embeddings(path: str | Path, check_finite: bool = True) -> Embeddings
        Memory-mapped vectors + ids + meta. NaN or infinite vectors are refused wherever vectors
        enter (an encoded shard, a merge, an opened directory) with the file, row and doc id.

`inputs["data"]` is a `data` artifact or `retroflow.inputs.dataset_input(...)`; `inputs["model"]` a
model artifact or `retroflow.inputs.model_input(alias_or_dir)`.

On disk (every file written under a temporary name, then renamed):

    shard-00003/embeddings.npy   (n, dim) float32 or float16, memory-mappable
    shard-00003/ids.parquet      column `_id`, row i = vector i
    shard-00003/shard.json       range, model, dtype, compatibility key, docs/s
    <out>/embeddings.npy + ids.parquet          (merge: true)  or  <out>/shard-*/ (merge: false)
    <out>/embeddings.json        written last: its presence means the directory is complete
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from retrieval.serving.encoder import Encoder, EncoderSettings
from retroflow.config import StageConfig, listed_part
from retroflow.data.beir import BeirDataset
from retroflow.devices import resolve_precision
from retroflow.hashing import hash_json
from retroflow.inputs import ExternalInput, Input, model_dir, model_folder_label, open_input
from retroflow.progress import progress_bar
from retroflow.publish import atomic_write_text, publishing_file, staging_name, sweep_stale

log = logging.getLogger(__name__)

FORMAT = "retroflow-embeddings/1"
META_FILE = "embeddings.json"
VECTORS_FILE = "embeddings.npy"
IDS_FILE = "ids.parquet"
SHARD_META = "shard.json"

# Encoder settings that change only speed or where it runs, not the vectors: shards encoded
# with different values of these (e.g. one worker per GPU) may be mixed in one corpus. Precision
# changes the vectors: it enters the shard key as it resolves (bf16 shards never join fp32 ones).
_RUNTIME_ONLY = {"batch_size", "max_tokens_per_batch", "device", "precision", "show_progress"}


class EncodeConfig(StageConfig):
    """`retroflow encode`: how a corpus is encoded and laid out (the corpus and the model are the
    stage's inputs `data` and `model`)."""

    moved_to_inputs: ClassVar[dict[str, str]] = {"model": "pass --model ALIAS|DIR", "dataset": "pass --dataset NAME|DIR"}

    shard_size: int = Field(50_000, ge=1, description="documents per shard (the unit of resume and of parallelism)")
    dtype: Literal["float32", "float16"] = "float32"
    merge: bool = Field(True, description="one embeddings.npy; false keeps per-shard files (for 100M-scale corpora)")
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)


@dataclasses.dataclass
class Embeddings:
    """An embeddings directory opened for reading: vectors stay on disk (memory-mapped)."""

    path: Path
    meta: dict[str, Any]
    parts: list[np.ndarray]  # one memmap per shard, or a single one when merged
    ids: pa.ChunkedArray

    @property
    def num_docs(self) -> int:
        return int(sum(len(p) for p in self.parts))

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def vectors(self) -> np.ndarray:
        """All vectors as one array (a memmap when merged; a float32 copy when sharded)."""
        if len(self.parts) == 1:
            return self.parts[0]
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in self.parts])

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """float32 batches in id order, never more than `batch_size` rows in memory."""
        for part in self.parts:
            for start in range(0, len(part), batch_size):
                yield np.ascontiguousarray(part[start : start + batch_size], dtype=np.float32)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """float32 rows at global positions `indices` (sorted internally for sequential reads)."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        offsets = np.cumsum([0] + [len(p) for p in self.parts])
        sorted_idx = indices[order]
        for part_no, part in enumerate(self.parts):
            lo, hi = np.searchsorted(sorted_idx, [offsets[part_no], offsets[part_no + 1]])
            if hi > lo:
                out[order[lo:hi]] = part[sorted_idx[lo:hi] - offsets[part_no]]
        return out


class NonFiniteVectors(ValueError):
    """A vector holds NaN or infinity (e.g. fp16 overflow): it would poison every search score."""


# Rows scanned at a time by `require_finite`: about 64 MB of float32, whatever the dimension.
_FINITE_CHECK_VALUES = 1 << 24


def require_finite(vectors: np.ndarray, ids: pa.Array | pa.ChunkedArray | Sequence[str], source: Path | str) -> None:
    """Raise NonFiniteVectors naming `source`, the first bad row and its doc id (`ids[row]`).

    Reads `vectors` once, in blocks, so a memory-mapped file is never loaded whole.
    """
    step = max(1, _FINITE_CHECK_VALUES // max(1, int(np.prod(vectors.shape[1:]))))
    for start in range(0, len(vectors), step):
        block = np.asarray(vectors[start : start + step])
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            doc = ids[row].as_py() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids[row]
            raise NonFiniteVectors(
                f"{source}: row {row} (doc id {doc!r}) is not finite (NaN or infinity); "
                "the encoder overflowed (try precision fp32 / dtype float32) or the file is damaged: re-encode"
            )


# ---------------------------------------------------------------------------------------
# Planning and compatibility
# ---------------------------------------------------------------------------------------


def plan_shards(num_docs: int, shard_size: int) -> list[range]:
    """Contiguous document ranges of `shard_size` (the last one shorter); fixed for a corpus."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [range(start, min(start + shard_size, num_docs)) for start in range(0, num_docs, shard_size)]


def worker_shards(num_shards: int, worker: int, num_workers: int) -> list[int]:
    """Round-robin assignment of shards to workers (worker i of n takes i, i+n, i+2n, ...)."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, {num_workers}), got {worker}")
    return list(range(worker, num_shards, num_workers))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def model_identity(model: Input) -> str:
    """A store model by stage/key (the same on every store root); any other model (an alias, a
    folder) by its name and the fingerprint of its files, so a model retrained in place does not
    pass for the one that encoded the shards already there."""
    label = model_folder_label(model)
    return f"{label}@{model.fingerprint}" if isinstance(model, ExternalInput) else label


def compatibility_key(config: EncodeConfig, model: Input, dataset: BeirDataset) -> str:
    """Shards with the same key hold interchangeable vectors (same model, text, layout)."""
    encoder = {k: v for k, v in config.encoder.canonical().items() if k not in _RUNTIME_ONLY}
    return hash_json(
        {
            "model": model_identity(model),
            "encoder": encoder,
            "precision": resolve_precision(config.encoder.device, config.encoder.precision),
            "dtype": config.dtype,
            "shard_size": config.shard_size,
            "dataset": dataset.fingerprint,
        }
    )[:16]


# ---------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------


def read_shard_meta(shard_dir: Path) -> dict[str, Any] | None:
    """The shard's metadata if the shard is complete and consistent, else None."""
    meta_file = shard_dir / SHARD_META
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        vectors = np.load(shard_dir / VECTORS_FILE, mmap_mode="r")
        num_ids = pq.read_metadata(shard_dir / IDS_FILE).num_rows
    except (OSError, ValueError, json.JSONDecodeError, pa.ArrowInvalid):
        return None
    if vectors.shape != (meta["num_docs"], meta["dim"]) or num_ids != meta["num_docs"]:
        return None
    return meta


def forward_label(encoder: Encoder) -> str:
    """Which forward pass made a shard's vectors. The compatibility key leaves the device out (fp32
    vectors agree across devices to ~1e-6), but in bf16 a CPU's fused forward and a GPU's
    autocast one agree only to bf16 rounding, so a corpus encoded by both says so."""
    return f"{encoder.backend} {str(encoder.dtype).replace('torch.', '')} on {encoder.device.type}"


def _check_compatible(meta: dict[str, Any], key: str, shard_dir: Path) -> None:
    if meta.get("compat_key") != key:
        raise ValueError(
            f"{shard_dir} was encoded with a different model/encoder/dtype/shard_size/dataset "
            f"(key {meta.get('compat_key')} != {key}); use a fresh output directory or delete the old shards"
        )


def shard_texts(dataset: BeirDataset, rows: range) -> list[str]:
    """The shard's passages, joined exactly as `BeirDataset.doc_texts` does for the whole corpus."""
    part = dataclasses.replace(dataset, corpus=dataset.corpus.slice(rows.start, len(rows)))
    return part.doc_texts()


def write_vectors(path: Path, vectors: np.ndarray) -> None:
    with publishing_file(path) as staging, open(staging, "wb") as handle:  # a handle: np.save would append .npy to a name
        np.save(handle, vectors)


def write_ids(path: Path, ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> None:
    with publishing_file(path) as staging:
        pq.write_table(
            pa.table({"_id": ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())}), staging
        )


def _encode_shard(
    config: EncodeConfig,
    model: Input,
    dataset: BeirDataset,
    shard_index: int,
    out_dir: Path,
    encoder: Encoder | None = None,
) -> dict[str, Any]:
    """Encode shard `shard_index` into `out_dir/shard-NNNNN/`; a no-op if it is already complete (see `run_shard`)."""
    out_dir = Path(out_dir)
    shards = plan_shards(dataset.num_docs, config.shard_size)
    if not 0 <= shard_index < len(shards):
        raise ValueError(f"shard {shard_index} out of range: {dataset.num_docs} docs make {len(shards)} shards")
    rows = shards[shard_index]
    key = compatibility_key(config, model, dataset)
    final = out_dir / shard_name(shard_index)
    existing = read_shard_meta(final)
    if existing is not None:
        _check_compatible(existing, key, final)
        return {**existing, "skipped": True}
    if final.exists():  # an incomplete or damaged shard (not ours: ours are renamed whole)
        log.warning("%s is incomplete; re-encoding it", final)
        shutil.rmtree(final)

    encoder = encoder or Encoder(model_dir(model), config.encoder)
    started = time.perf_counter()
    vectors = encoder.encode_passages(shard_texts(dataset, rows)).astype(config.dtype, copy=False)
    seconds = time.perf_counter() - started
    shard_ids = dataset.corpus.column("_id").slice(rows.start, len(rows))
    require_finite(vectors, shard_ids, final)  # after the cast: float16 overflows to inf
    meta = {
        "shard": shard_index,
        "start": rows.start,
        "stop": rows.stop,
        "num_docs": len(rows),
        "dim": int(vectors.shape[1]),
        "dtype": config.dtype,
        "model": model_folder_label(model),
        "pooling": encoder.pooling,
        "normalize": bool(encoder.normalize),
        "compat_key": key,
        "forward": forward_label(encoder),
        "seconds": round(seconds, 3),
        "docs_per_s": round(len(rows) / seconds, 2) if seconds > 0 else None,
        "host_pid": f"{os.uname().nodename}:{os.getpid()}",
    }
    tmp = out_dir / staging_name(f".{final.name}")
    tmp.mkdir(parents=True)
    try:
        write_vectors(tmp / VECTORS_FILE, vectors)
        write_ids(tmp / IDS_FILE, shard_ids)
        atomic_write_text(tmp / SHARD_META, json.dumps(meta, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:  # another worker finished this shard first: keep theirs
            if read_shard_meta(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return {**read_shard_meta(final), "skipped": True}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**meta, "skipped": False}


# ---------------------------------------------------------------------------------------
# Many shards
# ---------------------------------------------------------------------------------------


def _encode_shards(
    config: EncodeConfig,
    model: Input,
    dataset: BeirDataset,
    shards_dir: Path,
    shard_indices: Sequence[int] | None = None,
    encoder: Encoder | None = None,
) -> dict[str, Any]:
    """Encode the given shards (default: all) in this process; finished shards are skipped."""
    shards_dir = Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(dataset.num_docs, config.shard_size)
    todo = list(range(len(plan))) if shard_indices is None else list(shard_indices)
    key = compatibility_key(config, model, dataset)
    done, pending = [], []
    for index in todo:
        meta = read_shard_meta(shards_dir / shard_name(index))
        if meta is not None:
            _check_compatible(meta, key, shards_dir / shard_name(index))
            done.append(index)
        else:
            pending.append(index)
    total_docs = sum(len(plan[i]) for i in todo)
    done_docs = sum(len(plan[i]) for i in done)
    if done:
        log.info("resuming: %d of %d shards already encoded in %s", len(done), len(todo), shards_dir)
    encoded_docs, started = 0, time.perf_counter()
    if pending and encoder is None:
        encoder = Encoder(model_dir(model), config.encoder)
    bar = progress_bar(
        total=total_docs,
        initial=done_docs,
        desc="encode",
        unit="doc",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not config.encoder.show_progress,
    )
    for index in pending:
        result = _encode_shard(config, model, dataset, index, shards_dir, encoder=encoder)
        if not result["skipped"]:
            encoded_docs += result["num_docs"]
        bar.update(result["num_docs"])
        bar.set_postfix(shard=f"{index + 1}/{len(plan)}", docs_per_s=f"{encoded_docs / max(time.perf_counter() - started, 1e-9):.0f}")
    bar.close()
    seconds = time.perf_counter() - started
    return {
        "shards_total": len(plan),
        "shards_requested": len(todo),
        "shards_skipped": len(done),
        "shards_encoded": len(pending),
        "docs_encoded": encoded_docs,
        "encode_seconds": round(seconds, 3),
        "docs_per_s": round(encoded_docs / seconds, 2) if encoded_docs and seconds > 0 else None,
    }


def _worker_main(
    config_json: str, model_ref: dict[str, str], dataset_dir: str, fingerprint: str, shards_dir: str, indices: list[int]
) -> dict[str, Any]:
    """Entry point of one encoding process (one per GPU): reads the normalised dataset again."""
    from retroflow.data.beir import read_normalised

    config = EncodeConfig.model_validate_json(config_json)
    dataset = read_normalised(Path(dataset_dir))
    if dataset.fingerprint != fingerprint:
        raise ValueError(f"worker read a different dataset from {dataset_dir} (fingerprint {dataset.fingerprint})")
    return _encode_shards(config, open_input(model_ref), dataset, Path(shards_dir), indices)


def _encode_in_processes(
    config: EncodeConfig, model: Input, dataset: BeirDataset, shards_dir: Path, devices: Sequence[str]
) -> dict[str, Any]:
    """One worker process per device (`cuda:0`, `cuda:1`, ... or `cpu`), shards dealt round-robin."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    num_shards = len(plan_shards(dataset.num_docs, config.shard_size))
    jobs = []
    for worker, device in enumerate(devices):
        worker_config = config.with_overrides(encoder={"device": device, "show_progress": False})
        jobs.append(
            (
                worker_config.model_dump_json(),
                model.ref(),
                str(dataset.path),
                dataset.fingerprint,
                str(shards_dir),
                worker_shards(num_shards, worker, len(devices)),
            )
        )
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_worker_main, *zip(*jobs)))
    seconds = time.perf_counter() - started
    encoded = sum(r["docs_encoded"] for r in results)
    return {
        "shards_total": num_shards,
        "shards_skipped": sum(r["shards_skipped"] for r in results),
        "shards_encoded": sum(r["shards_encoded"] for r in results),
        "docs_encoded": encoded,
        "encode_seconds": round(seconds, 3),
        "docs_per_s": round(encoded / seconds, 2) if encoded and seconds > 0 else None,
        "workers": list(devices),
    }


def run(
    config: EncodeConfig,
    inputs: Mapping[str, Input],
    out_dir: Path,
    partial_dir: Path,
    *,
    devices: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The `encode` stage: the corpus of input `data` encoded by input `model`, every shard into
    `partial_dir` (shards already there are kept: a killed run resumes), then merged into `out_dir`.
    `devices` (`retroflow encode --devices`): one worker process per device, or this one device."""
    from retroflow.data import open_dataset

    model, dataset = inputs["model"], open_dataset(inputs["data"])
    out_dir, partial_dir = Path(out_dir), Path(partial_dir)
    if devices and len(devices) > 1:
        stats = _encode_in_processes(config, model, dataset, partial_dir, devices)
    else:
        if devices:
            config = config.with_overrides(encoder={"device": devices[0]})
        stats = _encode_shards(config, model, dataset, partial_dir)
    merged = merge_shards(
        partial_dir,
        out_dir,
        stats["shards_total"],
        merge=config.merge,
        extra_meta={
            "model": model_folder_label(model),
            "dataset": dataset.name,
            "dataset_fingerprint": dataset.fingerprint,
            "encoder": config.encoder.canonical(),
            "shard_size": config.shard_size,
        },
    )
    return {**stats, **merged}


def run_shard(config: EncodeConfig, inputs: Mapping[str, Input], shard: int, shards_dir: Path) -> dict[str, Any]:
    """One shard of the `encode` stage into `shards_dir` (the artifact's partial directory); a
    no-op when it is already there. `run` then merges the shards (encoding any still missing).

    The shard is built in a private temporary directory and renamed into place, so a kill
    leaves either nothing or a whole shard, and two processes racing on one shard cannot
    interleave their files (the loser discards its copy). Vectors with NaN or infinity are
    refused (NonFiniteVectors naming the shard and the first bad doc id); nothing is written."""
    from retroflow.data import open_dataset

    return _encode_shard(config, inputs["model"], open_dataset(inputs["data"]), shard, Path(shards_dir))


def run_shards(config: EncodeConfig, inputs: Mapping[str, Input], shards: Sequence[int], shards_dir: Path) -> dict[str, Any]:
    """`run_shard` for several shards in this process (one model load, one dataset read, a docs/s
    progress bar): what one of several workers sharing `shards_dir` runs. Returns counts and speed."""
    from retroflow.data import open_dataset

    return _encode_shards(config, inputs["model"], open_dataset(inputs["data"]), Path(shards_dir), shards)


# ---------------------------------------------------------------------------------------
# Merge and read
# ---------------------------------------------------------------------------------------


def _collect_shards(shards_dir: Path, num_shards: int) -> list[dict[str, Any]]:
    metas, missing = [], []
    for index in range(num_shards):
        meta = read_shard_meta(shards_dir / shard_name(index))
        (missing.append(index) if meta is None else metas.append(meta))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{shards_dir}: {len(missing)} of {num_shards} shards missing or incomplete ({shown}); re-run encode to finish them"
        )
    keys = {m["compat_key"] for m in metas}
    if len(keys) > 1:
        raise ValueError(f"{shards_dir}: shards come from different encode configs ({sorted(keys)}); cannot merge")
    for before, after in zip(metas, metas[1:]):
        if before["stop"] != after["start"]:
            raise ValueError(f"{shards_dir}: shard {after['shard']} starts at {after['start']}, expected {before['stop']}")
    return metas


def merge_shards(
    shards_dir: Path,
    out_dir: Path,
    num_shards: int,
    merge: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check shards 0..num_shards-1 (complete, contiguous, unique ids, finite vectors) and publish them in `out_dir`.

    merge=True streams them into one memory-mappable `embeddings.npy` (never all in RAM);
    merge=False moves the shard directories as they are (no second copy on disk).
    """
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metas = _collect_shards(shards_dir, num_shards)
    ids = pa.chunked_array([pq.read_table(shards_dir / shard_name(m["shard"]) / IDS_FILE).column("_id").combine_chunks() for m in metas])
    num_docs = sum(m["num_docs"] for m in metas)
    if len(ids) != num_docs or len(ids.unique()) != num_docs:
        raise ValueError(f"{shards_dir}: {len(ids)} ids for {num_docs} vectors, {len(ids.unique())} distinct: duplicate or missing ids")
    dim, dtype = metas[0]["dim"], metas[0]["dtype"]
    if merge:
        _concatenate_vectors(shards_dir, metas, ids, out_dir / VECTORS_FILE, num_docs, dim, dtype)
        write_ids(out_dir / IDS_FILE, ids)
        layout, shard_list = "merged", []
    else:
        layout, shard_list = "sharded", []
        for m in metas:  # every shard checked before any is moved: a refused merge leaves them in place
            vectors_file = shards_dir / shard_name(m["shard"]) / VECTORS_FILE
            require_finite(load_vectors(vectors_file), ids.slice(m["start"], m["num_docs"]), vectors_file)
        for m in metas:
            name = shard_name(m["shard"])
            if shards_dir.resolve() != out_dir.resolve():
                target = out_dir / name
                if target.exists():
                    shutil.rmtree(target)
                os.replace(shards_dir / name, target)
            shard_list.append({"path": name, "num_docs": m["num_docs"]})
    sweep_stale(out_dir)  # shards of killed workers; a live one (an identical run beside this one) keeps its own
    seconds = [m["seconds"] for m in metas]
    forwards = sorted({m.get("forward", "unrecorded") for m in metas})
    if len(forwards) > 1:
        log.warning("%s: shards encoded by different forward passes (%s) agree only to rounding", out_dir, "; ".join(forwards))
    meta = {
        "format": FORMAT,
        "layout": layout,
        "num_docs": num_docs,
        "dim": dim,
        "dtype": dtype,
        "num_shards": num_shards,
        "shards": shard_list,
        "pooling": metas[0]["pooling"],
        "normalize": metas[0]["normalize"],
        "compat_key": metas[0]["compat_key"],
        "forwards": forwards,
        **(extra_meta or {}),
    }  # no timings here: same vectors, same file (the artifact's fingerprint depends on it)
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2, default=str))
    return {
        "num_docs": num_docs,
        "dim": dim,
        "dtype": dtype,
        "num_shards": num_shards,
        "layout": layout,
        "encode_seconds_sum": round(sum(seconds), 3),
        "bytes": _vector_bytes(out_dir, meta),
    }


def _concatenate_vectors(
    shards_dir: Path, metas: list[dict[str, Any]], ids: pa.ChunkedArray, path: Path, num_docs: int, dim: int, dtype: str
) -> None:
    with publishing_file(path) as staging:
        merged = np.lib.format.open_memmap(staging, mode="w+", dtype=dtype, shape=(num_docs, dim))
        for m in metas:
            vectors_file = shards_dir / shard_name(m["shard"]) / VECTORS_FILE
            shard = np.load(vectors_file, mmap_mode="r")
            require_finite(shard, ids.slice(m["start"], m["num_docs"]), vectors_file)  # while it is read for the copy anyway
            merged[m["start"] : m["stop"]] = shard
        merged.flush()
        del merged


def _vector_bytes(out_dir: Path, meta: dict[str, Any]) -> int:
    if meta["layout"] == "merged":
        return (out_dir / VECTORS_FILE).stat().st_size
    return sum((out_dir / s["path"] / VECTORS_FILE).stat().st_size for s in meta["shards"])


def load_vectors(path: Path) -> np.ndarray:
    """A memory-mapped .npy, with an error naming the file when it is missing, truncated or not .npy."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: vectors file missing; re-run the encoding") from None
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a complete .npy vectors file ({err}); re-run the encoding") from None


def open_embeddings(path: str | Path, check_finite: bool = True) -> Embeddings:
    """Open an embeddings directory written by the encode stage (merged or sharded layout).

    `check_finite` reads every vector once and refuses NaN or infinity (NonFiniteVectors naming
    the file, row and doc id): directories written by other tools or older versions are not
    checked otherwise. Pass False when only the metadata is needed.
    """
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a finished embeddings directory ({META_FILE} missing): run `retroflow encode` first")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    if meta["layout"] == "merged":
        parts = [load_vectors(path / VECTORS_FILE)]
        ids = pq.read_table(path / IDS_FILE).column("_id")
    else:
        shard_dirs = [listed_part(path, s["path"], meta_file) for s in meta["shards"]]
        parts = [load_vectors(shard / VECTORS_FILE) for shard in shard_dirs]
        ids = pa.chunked_array([pq.read_table(shard / IDS_FILE).column("_id").combine_chunks() for shard in shard_dirs])
    embeddings = Embeddings(path=path, meta=meta, parts=parts, ids=ids)
    if embeddings.num_docs != len(ids) or embeddings.num_docs != meta["num_docs"]:
        raise ValueError(f"{path}: {embeddings.num_docs} vectors, {len(ids)} ids, meta says {meta['num_docs']}")
    if check_finite:
        files = [path / VECTORS_FILE] if meta["layout"] == "merged" else [shard / VECTORS_FILE for shard in shard_dirs]
        offset = 0
        for part, file in zip(parts, files):
            require_finite(part, ids.slice(offset, len(part)), file)
            offset += len(part)
    return embeddings


def corpus_vectors(embeddings_dir: str | Path, doc_ids: Sequence[str]) -> np.ndarray:
    """An embeddings directory's vectors as float32, checked to be this corpus' documents in order."""
    embeddings = open_embeddings(embeddings_dir)
    if embeddings.ids.to_pylist() != list(doc_ids):
        raise ValueError(f"{embeddings_dir}: its ids are not this corpus' documents in corpus order; encode this dataset")
    return np.asarray(embeddings.vectors(), dtype=np.float32)


def write_embeddings(out_dir: Path, vectors: np.ndarray, ids: Sequence[str], **meta: Any) -> Path:
    """Publish in-memory vectors as a merged embeddings directory (benchmarks, tests, imports)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(vectors) != len(ids):
        raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
    write_vectors(out_dir / VECTORS_FILE, np.ascontiguousarray(vectors))
    write_ids(out_dir / IDS_FILE, ids)
    info = {
        "format": FORMAT,
        "layout": "merged",
        "num_docs": len(ids),
        "dim": int(vectors.shape[1]),
        "dtype": str(vectors.dtype),
        "num_shards": 1,
        "shards": [],
        **meta,
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(info, indent=2, default=str))
    return out_dir
