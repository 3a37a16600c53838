"""Where exact search stops being as fast as HNSW: the measurement behind `exact_below_docs`.

    OMP_NUM_THREADS=1 python bench/exact_crossover.py [SIZES ...]   # default 2000 5000 10000 20000 50000 100000

One thread, batched (500 queries per search call, as evaluation searches), k = 10, 384-d unit
vectors around 200 Gaussian centres; Flat (IndexFlatIP) against HNSW32 (efConstruction 200) at
efSearch 64, 128 and 256, best of 3 timings. One JSON line per corpus size. Results:
docs/indexing.md, "Exact or approximate".
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

DIM, QUERIES, CENTRES = 384, 500, 200


def clustered(rng: np.random.Generator, n: int) -> np.ndarray:
    centres = rng.normal(size=(CENTRES, DIM)).astype(np.float32)
    x = centres[rng.integers(0, CENTRES, n)] + 0.7 * rng.normal(size=(n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def batched_qps(index: faiss.Index, queries: np.ndarray, repeats: int = 3) -> float:
    index.search(queries[:16], 10)  # warm caches
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        index.search(queries, 10)
        best = min(best, time.perf_counter() - started)
    return len(queries) / best


def main(sizes: list[int]) -> None:
    faiss.omp_set_num_threads(1)
    vectors = clustered(np.random.default_rng(0), max(sizes) + QUERIES)
    queries, corpus = vectors[-QUERIES:], vectors[:-QUERIES]
    for n in sizes:
        flat = faiss.IndexFlatIP(DIM)
        flat.add(corpus[:n])
        row = {"docs": n, "flat_qps": round(batched_qps(flat, queries), 1)}
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 200
        hnsw.add(corpus[:n])
        row["hnsw_build_s"] = round(time.perf_counter() - started, 1)
        for ef in (64, 128, 256):
            hnsw.hnsw.efSearch = ef
            row[f"hnsw_ef{ef}_qps"] = round(batched_qps(hnsw, queries), 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [2000, 5000, 10000, 20000, 50000, 100000])
