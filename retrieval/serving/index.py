"""FAISS indexes over an embeddings directory: build (train on a sample, add in batches), save, load, search.

The stage's one entry is `run` (the contract of `flows.stages.STAGES`); searching goes through the
functions below:

    run(config: IndexConfig, inputs: {"embeddings"}, out_dir: Path, partial_dir: Path) -> dict
        Train once on a sample of the `embeddings` input's vectors (an `encode` artifact, or
        `retroflow.inputs.path_input(DIR)`), then build `config.num_shards` sub-indexes and write
        the index directory `out_dir`. Same as `train_index_template` followed by
        `build_index_shard` for every shard and `finalize_index_dir` (a flow may map one task per
        shard; shards are independent files).
    search_with_index(index_dir: str | Path, query_vectors: np.ndarray, k: int, *, device="auto",
                      params: dict | None = None) -> tuple[np.ndarray, list[list[str | None]]]
        (nq, k) scores and doc ids (None where FAISS pads with -1), using the search parameters
        stored in the directory (set by the autotuner) unless `params` overrides them.
    load_index(index_dir, device="auto") -> LoadedIndex
    IndexRetriever(index_dir, encoder, params=None, device="auto")
        The index with its query encoder as a `retrieval.serving.search.Retriever`.

Index directory (every file written under a temporary name, then renamed):

    index.json           factory, metric, dim, ntotal, shard files, search_params, embeddings info
    index-00000.faiss    one file per shard; searched together through faiss.IndexShards
    trained.faiss        the trained, empty index every shard was cloned from (IVF/PQ/OPQ codebooks)
    build.json           what the template and shards were built from: a rerun reuses them only if it matches
    ids.parquet          column `_id`: FAISS id i (shard offsets applied) -> document id
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from retrieval.serving.encode import Embeddings, open_embeddings, write_ids
from retrieval.serving.search import METRICS, DenseRetriever, QueryEncoder, Run, search_in_batches
from retroflow.artifacts import artifact_label
from retroflow.config import StageConfig, listed_part
from retroflow.publish import atomic_write_text, publishing_file

log = logging.getLogger(__name__)

FORMAT = "retroflow-index/1"
META_FILE = "index.json"
IDS_FILE = "ids.parquet"
TEMPLATE_FILE = "trained.faiss"
BUILD_FILE = "build.json"
BUILD_FORMAT = "retroflow-index-build/1"

# Config fields that never change the template or shard files (search defaults go to index.json,
# the rest is speed or placement): a rerun differing only in these still resumes.
_NOT_IN_FILES = {"ef_search", "nprobe", "k_factor", "add_batch_size", "gpu", "threads"}
# Embeddings metadata that says which vectors they are (absent for hand-written embeddings).
_EMBEDDINGS_IDENTITY = ("compat_key", "dataset_fingerprint", "model", "dtype")
_SAMPLE_ROWS = 64

# Search-time knobs as FAISS's ParameterSpace names them -> our config/param names.
KNOBS = {"efSearch": "efSearch", "nprobe": "nprobe", "k_factor_rf": "k_factor_rf", "quantizer_efSearch": "quantizer_efSearch"}


class IndexConfig(StageConfig):
    """`retroflow index`: which FAISS index, how it is trained, and its default search knobs."""

    factory: str = Field("HNSW32", description="FAISS index_factory string: Flat, HNSW32, IVF1024,PQ48, OPQ48,IVF1024,PQ48, SQ8, ...")
    metric: Literal["ip", "l2"] = "ip"
    ef_construction: int = Field(200, ge=8, description="HNSW graph quality at build time")
    ef_search: int = Field(128, ge=1, description="HNSW search breadth (default until tuned)")
    nprobe: int = Field(32, ge=1, description="IVF lists visited per query (default until tuned)")
    k_factor: int = Field(4, ge=1, description="refine stage: candidates re-ranked per result")
    train_size: int = Field(200_000, ge=1, description="vectors sampled for training (IVF k-means, PQ/OPQ codebooks)")
    opq_iterations: int = Field(20, ge=1, description="OPQ rotation iterations (FAISS default 50; slow on CPU)")
    add_batch_size: int = Field(65_536, ge=1)
    num_shards: int = Field(1, ge=1, description="sub-indexes, searched together with faiss.IndexShards")
    gpu: Literal["auto", "never", "always"] = Field("auto", description="train/search on GPU FAISS when present")
    threads: int | None = Field(None, ge=1, description="OpenMP threads (None = FAISS default)")
    seed: int = 0

    @field_validator("factory")
    @classmethod
    def _parsable(cls, factory: str) -> str:
        check_factory(factory)
        return factory


@dataclasses.dataclass
class LoadedIndex:
    """An index directory in memory: the searchable index, its sub-indexes, ids and metadata."""

    path: Path
    meta: dict[str, Any]
    index: faiss.Index
    parts: list[faiss.Index]  # kept so Python owns the sub-indexes of an IndexShards
    ids: pa.ChunkedArray
    on_gpu: bool = False


# ---------------------------------------------------------------------------------------
# GPU (guarded: faiss-cpu has no StandardGpuResources)
# ---------------------------------------------------------------------------------------


def gpu_count() -> int:
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a faiss-gpu build without a usable driver
        return 0


def use_gpu(mode: str) -> bool:
    count = gpu_count()
    if mode == "always" and count == 0:
        raise RuntimeError("gpu='always' but FAISS sees no GPU (faiss-cpu installed, or no CUDA device)")
    return mode != "never" and count > 0


def to_gpu(index: faiss.Index, mode: str = "auto") -> tuple[faiss.Index, bool]:
    """Copy `index` to all visible GPUs (sharded across them when several); CPU fallback.

    HNSW and some refine indexes have no GPU implementation: FAISS raises, we keep the CPU index.
    """
    if not use_gpu(mode):
        return index, False
    try:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True  # split the database over GPUs rather than replicate it
        options.useFloat16 = True
        return faiss.index_cpu_to_all_gpus(index, co=options), True
    except Exception as err:  # unsupported index type on GPU
        if mode == "always":
            raise
        log.warning("GPU FAISS cannot hold this index (%s); searching on CPU", str(err).splitlines()[0])
        return index, False


# ---------------------------------------------------------------------------------------
# Factory strings and knobs
# ---------------------------------------------------------------------------------------


# Divisible by every usual PQ/OPQ sub-quantizer count, so a syntax check does not fail on
# divisibility; the real dimension is checked when the index is built.
_SYNTAX_CHECK_DIM = 3840


def check_factory(factory: str, dim: int = _SYNTAX_CHECK_DIM) -> None:
    """Raise ValueError naming the factory string if FAISS cannot build it for `dim`."""
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"invalid FAISS factory string {factory!r} for dimension {dim}: {_faiss_message(err)}") from None


def _faiss_message(err: Exception) -> str:
    """FAISS's own reason without the C++ function signature and source location."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = next((x for x in lines if x.startswith("Error")), lines[-1] if lines else str(err))
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", line)


def nested_indexes(index: faiss.Index) -> Iterator[faiss.Index]:
    """The index and every index inside it (pre-transform, refine base, IVF quantizer, shards)."""
    index = faiss.downcast_index(index)
    yield index
    for attr in ("index", "base_index", "quantizer"):
        child = getattr(index, attr, None)
        if isinstance(child, faiss.Index):
            yield from nested_indexes(child)
    if isinstance(index, faiss.IndexShards):
        for i in range(index.count()):
            yield from nested_indexes(index.at(i))


def prepare_for_training(index: faiss.Index, config: IndexConfig) -> None:
    """Apply build-time settings the factory string cannot express."""
    for inner in nested_indexes(index):
        if hasattr(inner, "hnsw"):
            inner.hnsw.efConstruction = config.ef_construction
        if hasattr(inner, "do_polysemous_training"):
            # Polysemous codes are only used with Hamming thresholds we never set, and their
            # training (simulated annealing) takes minutes: skip it.
            inner.do_polysemous_training = False
        if isinstance(inner, faiss.IndexPreTransform):
            for i in range(inner.chain.size()):
                transform = faiss.downcast_VectorTransform(inner.chain.at(i))
                if isinstance(transform, faiss.OPQMatrix):
                    transform.niter = config.opq_iterations


def knob_ranges(index: faiss.Index) -> dict[str, list[float]]:
    """Search-time knobs FAISS exposes for this index, with the value ranges it suggests."""
    space = faiss.ParameterSpace()
    space.initialize(index)
    ranges = {}
    for i in range(space.parameter_ranges.size()):
        parameter = space.parameter_ranges.at(i)
        if parameter.name in KNOBS:
            ranges[parameter.name] = [float(v) for v in faiss.vector_to_array(parameter.values)]
    return ranges


def default_search_params(index: faiss.Index, config: IndexConfig) -> dict[str, int]:
    values = {"efSearch": config.ef_search, "nprobe": config.nprobe, "k_factor_rf": config.k_factor, "quantizer_efSearch": config.ef_search}
    available = knob_ranges(index)
    params = {name: values[name] for name in available}
    if "nprobe" in params:
        params["nprobe"] = min(params["nprobe"], ivf_nlist(index))
    return params


def ivf_nlist(index: faiss.Index) -> int:
    for inner in nested_indexes(index):
        if isinstance(inner, faiss.IndexIVF):
            return int(inner.nlist)
    return 0


def parse_search_params(texts: list[str], index_dir, available) -> dict[str, float]:
    """`NAME=VALUE` search knobs checked against the index's own knobs: FAISS accepts a misspelt name
    or a negative efSearch silently (efSearch=-5 returned 1 hit for k 10)."""
    available = sorted(available)
    params: dict[str, float] = {}
    for text in texts:
        name, sep, raw = (part.strip() for part in text.partition("="))
        if not sep or not name:
            raise ValueError(f"--param {text!r}: expected NAME=VALUE, e.g. efSearch=256")
        if name not in available:
            known = f"its knobs are {', '.join(available)}" if available else "it has no search-time knobs (exact search)"
            raise ValueError(f"--param {name!r} does not apply to the index {index_dir}: {known}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"--param {name}={raw!r}: not a number") from None
        integer = name != "k_factor_rf"
        if not math.isfinite(value) or value < 1 or (integer and value != int(value)):
            raise ValueError(f"--param {name}={raw}: must be {'a whole number' if integer else 'a number'} >= 1")
        params[name] = value
    return params


def set_search_params(index: faiss.Index, params: dict[str, float]) -> None:
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, float(value))


# ---------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------


def shard_rows(num_docs: int, num_shards: int) -> list[range]:
    """Contiguous, near-equal row ranges, one per index shard."""
    bounds = np.linspace(0, num_docs, num_shards + 1).astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def index_shard_name(shard: int) -> str:
    return f"index-{shard:05d}.faiss"


def write_index_file(index: faiss.Index, path: Path) -> None:
    with publishing_file(path) as staging:
        faiss.write_index(index, str(staging))


def _set_threads(config: IndexConfig) -> None:
    if config.threads:
        faiss.omp_set_num_threads(config.threads)


def build_record(config: IndexConfig, embeddings: Embeddings) -> dict[str, Any]:
    """What the template and shards depend on: the build settings and which vectors (their
    metadata, shape, and a digest of evenly spaced rows and ids, so re-encoded vectors of the
    same shape differ too; cheap at any corpus size)."""
    settings = {k: v for k, v in config.canonical().items() if k not in _NOT_IN_FILES}
    positions = np.unique(np.linspace(0, embeddings.num_docs - 1, min(_SAMPLE_ROWS, embeddings.num_docs)).astype(np.int64))
    digest = hashlib.sha256(embeddings.rows(positions).tobytes())
    digest.update("\n".join(map(str, embeddings.ids.take(pa.array(positions)).to_pylist())).encode())
    vectors = {k: embeddings.meta.get(k) for k in _EMBEDDINGS_IDENTITY}
    vectors.update(dim=embeddings.dim, ntotal=embeddings.num_docs, vectors_sample=digest.hexdigest()[:16])
    record = {"format": BUILD_FORMAT, "config": settings, "embeddings": vectors}
    return json.loads(json.dumps(record, default=str))  # as build.json reads back, so the two compare equal


def check_reusable(out_dir: Path, record: dict[str, Any]) -> None:
    """Refuse a directory holding a template or shards built from anything but `record` (an
    older index left in --output would otherwise be kept under the new index.json)."""
    built = [p.name for p in sorted(out_dir.glob("*.faiss"))] if out_dir.is_dir() else []
    if not built:
        return
    try:
        recorded = json.loads((out_dir / BUILD_FILE).read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded == record:
        return
    differs = _record_differences(recorded, record) if isinstance(recorded, dict) else f"no readable {BUILD_FILE}"
    raise ValueError(
        f"{out_dir} holds an index ({built[0]}) that is not this build's ({differs}); use a fresh output directory or delete it"
    )


def _record_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`name old -> new` for each setting or embeddings field that changed."""
    changes = []
    for section in ("config", "embeddings"):
        before, after = old.get(section) or {}, new[section]
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                changes.append(f"{name} {before.get(name)!r} -> {after.get(name)!r}")
    return ", ".join(changes) or f"{BUILD_FILE} format {old.get('format')!r}"


def train_index_template(config: IndexConfig, embeddings: Embeddings, out_dir: Path) -> dict[str, Any]:
    """Create the index from the factory string, train it on a random sample, save it empty.

    Skipped when `out_dir` already holds the template of this very build (see `check_reusable`).
    """
    out_dir = Path(out_dir)
    path = out_dir / TEMPLATE_FILE
    record = build_record(config, embeddings)
    check_reusable(out_dir, record)
    if path.is_file():
        return {"train_seconds": 0.0, "trained_on": None, "skipped": True}
    _set_threads(config)
    try:
        index = faiss.index_factory(embeddings.dim, config.factory, METRICS[config.metric])
    except RuntimeError as err:
        raise ValueError(f"invalid FAISS factory string {config.factory!r} for dimension {embeddings.dim}: {_faiss_message(err)}") from None
    prepare_for_training(index, config)
    started, trained_on = time.perf_counter(), 0
    if not index.is_trained:
        rng = np.random.default_rng(config.seed)
        size = min(config.train_size, embeddings.num_docs)
        sample = embeddings.rows(np.sort(rng.choice(embeddings.num_docs, size=size, replace=False)))
        trained_on = len(sample)
        _train(index, sample, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The record goes first: a template is never on disk without the record of what it was built from.
    atomic_write_text(out_dir / BUILD_FILE, json.dumps(record, indent=2, sort_keys=True))
    write_index_file(index, path)
    return {"train_seconds": round(time.perf_counter() - started, 3), "trained_on": trained_on, "skipped": False}


def _train(index: faiss.Index, sample: np.ndarray, config: IndexConfig) -> None:
    gpu_clustering = None
    ivf = next((i for i in nested_indexes(index) if isinstance(i, faiss.IndexIVF)), None)
    if ivf is not None and use_gpu(config.gpu):
        # k-means assignment is the expensive part of IVF training: run it on the GPUs.
        gpu_clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        ivf.clustering_index = gpu_clustering
    nlist = ivf.nlist if ivf is not None else 0
    if nlist and len(sample) < nlist:
        raise ValueError(
            f"{config.factory!r} has {nlist} IVF lists but only {len(sample)} training vectors: use fewer lists (about sqrt(N)..4*sqrt(N))"
        )
    try:
        index.train(sample)
    except RuntimeError as err:
        raise ValueError(f"training {config.factory!r} on {len(sample)} vectors failed: {_faiss_message(err)}") from None
    finally:
        if gpu_clustering is not None:
            ivf.clustering_index = None


def build_index_shard(config: IndexConfig, embeddings: Embeddings, out_dir: Path, shard: int) -> dict[str, Any]:
    """Add shard `shard`'s rows (in batches) to a copy of the trained template and save it.

    Independent of the other shards, so separate processes/machines may build them. An existing
    shard file is kept only when the directory's build record matches this build.
    """
    out_dir = Path(out_dir)
    path = out_dir / index_shard_name(shard)
    rows = shard_rows(embeddings.num_docs, config.num_shards)[shard]
    check_reusable(out_dir, build_record(config, embeddings))
    if path.is_file():
        return {"shard": shard, "num_docs": len(rows), "add_seconds": 0.0, "skipped": True}
    _set_threads(config)
    index = faiss.read_index(str(out_dir / TEMPLATE_FILE))
    started = time.perf_counter()
    for start in range(rows.start, rows.stop, config.add_batch_size):
        stop = min(start + config.add_batch_size, rows.stop)
        index.add(embeddings.rows(np.arange(start, stop)))
    seconds = time.perf_counter() - started
    write_index_file(index, path)
    return {"shard": shard, "num_docs": len(rows), "add_seconds": round(seconds, 3), "skipped": False}


def finalize_index_dir(config: IndexConfig, embeddings: Embeddings, out_dir: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """Write ids and index.json once every shard file exists (index.json last = complete)."""
    out_dir = Path(out_dir)
    files = [index_shard_name(s) for s in range(config.num_shards)]
    missing = [f for f in files if not (out_dir / f).is_file()]
    if missing:
        raise ValueError(f"{out_dir}: index shards missing: {', '.join(missing)}")
    write_ids(out_dir / IDS_FILE, embeddings.ids)
    template = faiss.read_index(str(out_dir / TEMPLATE_FILE))
    index_bytes = sum((out_dir / f).stat().st_size for f in files)
    # Codebooks, centroids and OPQ rotations are paid once per shard: on a small corpus they
    # dominate bytes/vector, so the per-vector cost at scale is reported separately.
    fixed_bytes = (out_dir / TEMPLATE_FILE).stat().st_size * len(files)
    meta = {
        "format": FORMAT,
        "factory": config.factory,
        "metric": config.metric,
        "dim": embeddings.dim,
        "ntotal": embeddings.num_docs,
        "shards": files,
        "search_params": default_search_params(template, config),
        "tuned": False,
        "bytes_per_vector": round(index_bytes / max(embeddings.num_docs, 1), 2),
        "index_bytes": index_bytes,
        "marginal_bytes_per_vector": round((index_bytes - fixed_bytes) / max(embeddings.num_docs, 1), 2),
        "config": config.canonical(),
        "embeddings": {
            "path": artifact_label(embeddings.path),  # stage/key inside a store: the same on every store root
            **{
                k: embeddings.meta.get(k)
                for k in ("model", "dataset", "dataset_fingerprint", "pooling", "normalize", "compat_key", "encoder", "dtype")
            },
        },
        "build": {"trained_on": stats.get("trained_on")},  # timings go to the metrics: same index, same file
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2, default=str))
    return meta


# ---------------------------------------------------------------------------------------
# Load and search
# ---------------------------------------------------------------------------------------


def read_index_meta(index_dir: str | Path) -> dict[str, Any]:
    meta_file = Path(index_dir) / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{index_dir} is not a finished index directory ({META_FILE} missing): run `retroflow index`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def load_index(index_dir: str | Path, device: str = "auto") -> LoadedIndex:
    """Read every shard; one shard is searched directly, several through a threaded IndexShards."""
    path = Path(index_dir).resolve()
    meta_file = path / META_FILE
    mtime = meta_file.stat().st_mtime_ns if meta_file.is_file() else 0
    return _load_index_cached(str(path), mtime, device)


def read_faiss_file(path: Path) -> faiss.Index:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: index file missing; rebuild the index")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:  # FAISS raises RuntimeError with a C++ trace on damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable FAISS index (damaged or truncated: {first[:200]}); rebuild the index") from None


@functools.lru_cache(maxsize=4)
def _load_index_cached(path_text: str, mtime_ns: int, device: str) -> LoadedIndex:
    path = Path(path_text)
    meta = read_index_meta(path)
    parts = [read_faiss_file(listed_part(path, name, path / META_FILE)) for name in meta["shards"]]
    if len(parts) == 1:
        index = parts[0]
    else:
        index = faiss.IndexShards(meta["dim"], True, True)  # threaded, successive ids
        for part in parts:
            index.add_shard(part)
    index, on_gpu = to_gpu(index, device)
    ids = pq.read_table(path / IDS_FILE).column("_id")
    if index.ntotal != len(ids):
        raise ValueError(f"{path}: index holds {index.ntotal} vectors but {IDS_FILE} has {len(ids)} ids")
    return LoadedIndex(path=path, meta=meta, index=index, parts=parts, ids=ids, on_gpu=on_gpu)


def search_loaded(
    loaded: LoadedIndex, query_vectors: np.ndarray, k: int, params: dict[str, float] | None = None, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Raw FAISS search: (scores, positions) with -1 where fewer than k hits exist."""
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != loaded.meta["dim"]:
        raise ValueError(f"query vectors have shape {queries.shape}; index {loaded.path} expects dimension {loaded.meta['dim']}")
    set_search_params(loaded.index, params if params is not None else loaded.meta.get("search_params", {}))
    return search_in_batches(loaded.index, queries, k, batch_size)


def positions_to_ids(ids: pa.ChunkedArray, positions: np.ndarray) -> list[list[str | None]]:
    flat = positions.reshape(-1)
    taken = ids.take(pa.array(np.where(flat >= 0, flat, 0))).to_pylist()
    out = [doc if pos >= 0 else None for doc, pos in zip(taken, flat.tolist())]
    k = positions.shape[1] if positions.ndim == 2 else 0
    return [out[row * k : (row + 1) * k] for row in range(len(positions))]


def search_with_index(
    index_dir: str | Path,
    query_vectors: np.ndarray,
    k: int,
    *,
    device: str = "auto",
    params: dict[str, float] | None = None,
) -> tuple[np.ndarray, list[list[str | None]]]:
    """Top-k documents per query through the index in `index_dir`: ((nq, k) scores, (nq, k) doc ids).

    Uses the search parameters stored in index.json (the autotuner's choice once tuned);
    ids are None where FAISS found fewer than k results.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    loaded = load_index(index_dir, device)
    scores, positions = search_loaded(loaded, query_vectors, k, params)
    return scores, positions_to_ids(loaded.ids, positions)


def hits_to_run(query_ids: Sequence[str], hit_ids: Sequence[Sequence[str | None]], scores: np.ndarray) -> Run:
    """`search_with_index` output -> run; the None ids (FAISS's -1 padding) are not hits."""
    return {qid: {d: float(s) for d, s in zip(ids, row) if d is not None} for qid, ids, row in zip(query_ids, hit_ids, scores)}


class IndexRetriever(DenseRetriever):
    """An index directory searched with its query encoder (which must be the model its vectors came from).

    `params` overrides the search knobs stored in index.json (the tuner's choice once tuned)."""

    def __init__(self, index_dir: str | Path, encoder: QueryEncoder, *, params: dict[str, float] | None = None, device: str = "auto"):
        self.index_dir, self.encoder, self.params, self.device = index_dir, encoder, params, device

    def search_vectors(self, query_ids: Sequence[str], query_vectors: np.ndarray, k: int) -> Run:
        scores, hit_ids = search_with_index(self.index_dir, query_vectors, k, device=self.device, params=self.params)
        return hits_to_run(query_ids, hit_ids, scores)


def copy_index_dir(src: Path, dest: Path) -> None:
    """Hard-link (else copy) an index directory's files into `dest` (tuning writes a new directory)."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if not file.is_file() or file.name.startswith("."):
            continue
        target = dest / file.name
        if target.exists():
            target.unlink()
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)


def run(config: IndexConfig, inputs: Mapping[str, Any], out_dir: Path, partial_dir: Path) -> dict[str, Any]:
    """The `index` stage: input `embeddings` (an embeddings directory) -> the index directory
    `out_dir` (resumable: finished shard files of the same build are kept there)."""
    out_dir = Path(out_dir)
    embeddings = open_embeddings(inputs["embeddings"].path)
    if config.num_shards > embeddings.num_docs:
        raise ValueError(f"num_shards={config.num_shards} exceeds the {embeddings.num_docs} documents")
    started = time.perf_counter()
    trained = train_index_template(config, embeddings, out_dir)
    shards = [build_index_shard(config, embeddings, out_dir, s) for s in range(config.num_shards)]
    add_seconds = sum(s["add_seconds"] for s in shards)
    stats = {
        "train_seconds": trained["train_seconds"],
        "trained_on": trained["trained_on"],
        "add_seconds": round(add_seconds, 3),
        "build_seconds": round(time.perf_counter() - started, 3),
        "add_docs_per_s": round(embeddings.num_docs / add_seconds, 1) if add_seconds > 0 else None,
    }
    meta = finalize_index_dir(config, embeddings, out_dir, stats)
    log.info(
        "built %s over %d vectors (%d shard(s)) in %.1fs: %.1f bytes/vector",
        config.factory,
        embeddings.num_docs,
        config.num_shards,
        stats["build_seconds"],
        meta["bytes_per_vector"],
    )
    return {
        "factory": config.factory,
        "ntotal": meta["ntotal"],
        "dim": meta["dim"],
        "num_shards": config.num_shards,
        "bytes_per_vector": meta["bytes_per_vector"],
        "marginal_bytes_per_vector": meta["marginal_bytes_per_vector"],
        "search_params": meta["search_params"],
        **stats,
    }
