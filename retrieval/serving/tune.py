"""Autotuning of search-time knobs (efSearch, nprobe, refine k_factor) against exact search.

The stage's one entry is `run` (the contract of `flows.stages.STAGES`):

    run(config: TuneConfig, inputs: {"index", "embeddings", optional "data", "model"},
        out_dir: Path, partial_dir: Path, *, query_vectors: np.ndarray | None = None,
        report_vectors: np.ndarray | None = None, dev: DevQueries | None = None) -> dict
        Sweep the knobs the `index` input exposes on the tuning queries, measure recall@k against
        an exact (Flat) search over the `embeddings` it was built from and batched queries/s, keep
        the Pareto front; with dev queries (the dev hold-out of the `data` input's training split,
        encoded by the `model` input, with its qrels; or `dev` given as it is) also measure every
        setting's nDCG@k on them beside exact search's, and pick the fastest setting whose nDCG@k
        is within `ndcg_tolerance` of exact search's and whose recall meets `target_recall`
        (without dev queries: recall alone, and the summary says so); then measure that one
        setting on the report queries. `out_dir` becomes a complete index directory (files
        hard-linked from the index; `out_dir` being the index's own directory tunes in place) whose
        index.json carries the chosen search_params, so `search_with_index` uses them; plus
        tune.csv, tune.json and tune.png (recall vs QPS on the tuning queries).

    The inputs are an `index` and an `encode` artifact in the store, or
    `retroflow.inputs.path_input(DIR)` outside it; `query_vectors` and `report_vectors` are query
    vectors (`retroflow tune --queries`/`--dataset`, benchmarks), not artifacts: the stage in the
    store is given neither.

    Tuning and report queries are always disjoint: a setting chosen as the fastest to clear the
    target on some queries is biased upwards on exactly those (it is the one that got lucky), so
    the recall and QPS this stage reports (`recall`, `qps`, `reported_on`) come from queries the
    choice never saw; the sweep's own figures are kept apart under `tuned_on`. `report_vectors`
    names the report queries (e.g. a test split while `query_vectors` is train); without them a
    `holdout_fraction` of the sampled queries is held out. Identical rows in both are refused.

    Why nDCG on dev decides and recall only constrains: recall@10 against exact search counts
    every swapped neighbour alike, while users see the ranking's quality. On SciFact a recall-0.995
    HNSW setting still cost 0.005 nDCG@10 on test (issue 28); a rule stated in nDCG bounds that loss
    directly, on queries neither the model nor any evaluation is scored on.

    With `query_vectors=None` the queries are corpus vectors sampled at random; their nearest
    neighbour is themselves, which makes recall slightly optimistic. Pass real query vectors
    when there are any.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
from pydantic import Field

from retrieval.serving.encode import Embeddings, open_embeddings
from retrieval.serving.encoder import EncoderSettings
from retrieval.serving.index import META_FILE, copy_index_dir, ivf_nlist, knob_ranges, load_index, read_index_meta, search_loaded
from retrieval.serving.search import exact_search_blocks
from retroflow.config import StageConfig
from retroflow.data.splits import dev_split
from retroflow.metrics import evaluate_run
from retroflow.publish import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


class TuneConfig(StageConfig):
    """`retroflow tune`: what to sweep, how close to exact search on dev the choice must stay, what recall it must reach."""

    ndcg_tolerance: float = Field(
        0.001,
        ge=0,
        le=1,
        description="the choice's nDCG@k on the dev queries may fall at most this "
        "far below exact search's (the rule; recall only when there are no dev queries)",
    )
    target_recall: float = Field(0.95, gt=0, le=1, description="recall@k against exact search the choice must also reach")
    k: int = Field(10, ge=1)
    num_queries: int = Field(1000, ge=1, description="queries sampled for the sweep")
    ef_search: list[int] = Field(default_factory=lambda: [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512])
    nprobe: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512])
    k_factor: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    batch_size: int = Field(1024, ge=1, description="queries per search call when timing")
    repeats: int = Field(3, ge=1, description="timings per setting; the best is kept (less noise on shared cores)")
    exact_batch_size: int = Field(100_000, ge=1, description="corpus rows per block of the exact search")
    holdout_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="share of the sampled queries kept out of the sweep and used "
        "only to report the chosen setting (ignored when report queries are given)",
    )
    dev_split: str = Field("train", description="split whose dev hold-out the nDCG rule is measured on (never the evaluated split)")
    dev_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of dev_split's judged queries held out as dev; in a pipeline "
        "fine-tuning's (0 = no dev queries: recall alone decides)",
    )
    dev_seed: int = 0
    encoder: EncoderSettings | None = Field(None, description="how the dev queries are encoded; None = as the corpus was")
    device: str = "auto"
    seed: int = 0


# What a sweep row holds beside the knobs of its setting.
MEASURED = ("recall", "qps", "pareto", "dev_ndcg", "dev_ndcg_loss")


# ---------------------------------------------------------------------------------------
# Ground truth and measurement
# ---------------------------------------------------------------------------------------


def exact_topk(embeddings: Embeddings, queries: np.ndarray, k: int, metric: str, block: int) -> tuple[np.ndarray, float]:
    """Exact top-k positions, the corpus scanned `block` rows at a time (memory-bounded), and the seconds spent searching."""
    blocks = TimedBlocks(embeddings.iter_batches(block))
    started = time.perf_counter()
    _, positions = exact_search_blocks(queries, blocks, k, metric)
    # reading the embeddings is not searching: exact_qps is set against the index's search speed
    return positions, time.perf_counter() - started - blocks.seconds


class TimedBlocks:
    """An iterator of corpus blocks that adds up the time spent producing them."""

    def __init__(self, blocks: Iterator[np.ndarray]):
        self.blocks, self.seconds = blocks, 0.0

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            started = time.perf_counter()
            block = next(self.blocks, None)
            self.seconds += time.perf_counter() - started
            if block is None:
                return
            yield block


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (k-recall@k)."""
    hits = [len(set(f[:k][f[:k] >= 0]) & set(t[:k][t[:k] >= 0])) / max(int((t[:k] >= 0).sum()), 1) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 0.0


def candidate_settings(loaded_index: faiss.Index, config: TuneConfig) -> list[dict[str, int]]:
    """Cartesian product of the configured values of every knob this index has."""
    available = knob_ranges(loaded_index)
    nlist = ivf_nlist(loaded_index)
    grids: dict[str, list[int]] = {}
    if "efSearch" in available:
        grids["efSearch"] = sorted(set(config.ef_search))
    if "quantizer_efSearch" in available:
        grids["quantizer_efSearch"] = sorted({v for v in config.ef_search if v >= 16})[:4] or [64]
    if "nprobe" in available:
        grids["nprobe"] = sorted({v for v in config.nprobe if v <= nlist}) or [nlist]
    if "k_factor_rf" in available:
        grids["k_factor_rf"] = sorted(set(config.k_factor))
    if not grids:
        return [{}]  # exact indexes (Flat, SQ, PQ without IVF): nothing to tune
    names = list(grids)
    return [dict(zip(names, values)) for values in itertools.product(*(grids[n] for n in names))]


def measure(loaded, queries: np.ndarray, truth: np.ndarray, params: dict[str, int], config: TuneConfig) -> dict[str, Any]:
    search_loaded(loaded, queries[: min(len(queries), 32)], config.k, params)  # warm caches
    best = float("inf")
    for _ in range(config.repeats):
        started = time.perf_counter()
        _, found = search_loaded(loaded, queries, config.k, params, batch_size=config.batch_size)
        best = min(best, time.perf_counter() - started)
    return {**params, "recall": round(recall_at_k(found, truth, config.k), 5), "qps": round(len(queries) / best, 1)}


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Settings no other setting beats on both recall and QPS (sorted by QPS, fastest first)."""
    front, best_recall = [], -1.0
    for row in sorted(rows, key=lambda r: (-r["qps"], -r["recall"])):
        if row["recall"] > best_recall:
            front.append(row)
            best_recall = row["recall"]
    return front


def choose(rows: list[dict[str, Any]], target: float, tolerance: float | None = None) -> tuple[dict[str, Any], bool]:
    """Fastest setting reaching `target` recall and, when `tolerance` is given, losing at most that
    much dev nDCG against exact search (`dev_ndcg_loss`); else the most accurate one (not met)."""

    def within(row: dict[str, Any]) -> bool:
        # the figures are rounded to 5 decimals: a loss equal to the tolerance must not fail on the last bit
        return tolerance is None or row["dev_ndcg_loss"] <= tolerance + 1e-9

    meeting = [r for r in rows if r["recall"] >= target and within(r)]
    if meeting:
        return max(meeting, key=lambda r: (r["qps"], r["recall"])), True
    if tolerance is None:
        return max(rows, key=lambda r: (r["recall"], r["qps"])), False
    return max(rows, key=lambda r: (-r["dev_ndcg_loss"], r["recall"], r["qps"])), False


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def table_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_tradeoff(
    rows: list[dict[str, Any]], front: list[dict[str, Any]], chosen: dict[str, Any], target: float, exact_qps: float, title: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([r["recall"] for r in rows], [r["qps"] for r in rows], s=14, color="0.7", label="settings")
    ax.plot([r["recall"] for r in front], [r["qps"] for r in front], "o-", color="tab:blue", label="Pareto front")
    ax.scatter([chosen["recall"]], [chosen["qps"]], marker="*", s=220, color="tab:red", zorder=5, label="chosen")
    ax.axvline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target}")
    ax.axhline(exact_qps, color="0.3", linestyle=":", linewidth=1, label="exact (Flat) QPS")
    ax.set_yscale("log")
    ax.set_xlabel("recall@k vs exact search")
    ax.set_ylabel("queries / s (batched, log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


class QuerySet(NamedTuple):
    vectors: np.ndarray
    source: str  # said in the output, so a reader knows which queries a figure comes from


def sample_queries(embeddings: Embeddings, query_vectors: np.ndarray | None, config: TuneConfig, source: str = "given") -> QuerySet:
    """Up to `num_queries` rows of `query_vectors` (else of the corpus), in their original order."""
    rng = np.random.default_rng(config.seed)
    if query_vectors is not None:
        query_vectors = np.asarray(query_vectors, dtype=np.float32)
        take = np.sort(rng.choice(len(query_vectors), size=min(config.num_queries, len(query_vectors)), replace=False))
        return QuerySet(np.ascontiguousarray(query_vectors[take]), source)
    take = np.sort(rng.choice(embeddings.num_docs, size=min(config.num_queries, embeddings.num_docs), replace=False))
    return QuerySet(embeddings.rows(take), "sampled from corpus")


def distinct_rows(vectors: np.ndarray) -> np.ndarray:
    """First occurrence of every distinct row, in order (a duplicated query must not land on both sides of a split)."""
    _, first = np.unique(vectors, axis=0, return_index=True)
    return vectors[np.sort(first)]


def shared_rows(a: np.ndarray, b: np.ndarray) -> int:
    """How many rows of `b` are byte-identical to some row of `a`."""
    seen = {row.tobytes() for row in np.ascontiguousarray(a)}
    return sum(row.tobytes() in seen for row in np.ascontiguousarray(b))


def split_holdout(queries: QuerySet, fraction: float, seed: int) -> tuple[QuerySet, QuerySet]:
    """(tuning, report): a random `fraction` of the distinct rows held out for reporting."""
    vectors = distinct_rows(queries.vectors)
    if len(vectors) < 2:
        raise ValueError(f"{len(vectors)} distinct query vector(s): tuning and reporting need at least one each")
    held = min(max(1, round(len(vectors) * fraction)), len(vectors) - 1)
    order = np.random.default_rng([seed, 1]).permutation(len(vectors))
    report, tune = np.sort(order[:held]), np.sort(order[held:])
    return (
        QuerySet(vectors[tune], f"{queries.source} ({len(tune)} of {len(vectors)}, tuning part)"),
        QuerySet(vectors[report], f"{queries.source} ({held} of {len(vectors)}, held out)"),
    )


def tuning_and_report_queries(
    embeddings: Embeddings, query_vectors: np.ndarray | None, report_vectors: np.ndarray | None, config: TuneConfig
) -> tuple[QuerySet, QuerySet]:
    """Two disjoint query sets: the sweep chooses on the first, the stage reports on the second."""
    sampled = sample_queries(embeddings, query_vectors, config)
    if report_vectors is None:
        return split_holdout(sampled, config.holdout_fraction, config.seed)
    report = sample_queries(embeddings, report_vectors, config, source="given report queries")
    overlap = shared_rows(sampled.vectors, report.vectors)
    if overlap:
        raise ValueError(
            f"{overlap} of the {len(report.vectors)} report queries are also tuning queries: "
            "reporting on them would show the tuner's own selection bias; pass disjoint sets"
        )
    return sampled, report


class DevQueries(NamedTuple):
    """Held-out dev queries of the training split, encoded, with their qrels: where the nDCG rule is measured."""

    qids: list[str]
    vectors: np.ndarray
    qrels: dict[str, dict[str, int]]
    source: str


def dev_ndcg(positions: np.ndarray, dev: DevQueries, doc_ids: list[str], k: int) -> float:
    """nDCG@k of a search's top positions on the dev queries, self-hits dropped as the evaluation drops them."""
    run = {}
    for qid, row in zip(dev.qids, positions):
        hits = [doc_ids[p] for p in row if p >= 0 and doc_ids[p] != qid][:k]
        run[qid] = {doc: float(len(hits) - rank) for rank, doc in enumerate(hits)}
    return evaluate_run(dev.qrels, run, [f"ndcg@{k}"])[0][f"ndcg@{k}"]


def measure_dev(
    loaded, embeddings: Embeddings, rows: list[dict[str, Any]], dev: DevQueries, metric: str, config: TuneConfig
) -> dict[str, Any]:
    """Exact search's dev nDCG@k, and every row's beside it (`dev_ndcg`, `dev_ndcg_loss`, added to the rows)."""
    depth = min(config.k + 1, embeddings.num_docs)  # one spare: a self-hit is dropped
    truth, _ = exact_topk(embeddings, dev.vectors, depth, metric, config.exact_batch_size)
    exact = dev_ndcg(truth, dev, embeddings.ids.to_pylist(), config.k)
    index_ids = loaded.ids.to_pylist()
    for row in rows:
        params = {n: row[n] for n in row if n not in MEASURED}
        _, found = search_loaded(loaded, dev.vectors, depth, params)
        row["dev_ndcg"] = round(dev_ndcg(found, dev, index_ids, config.k), 5)
        row["dev_ndcg_loss"] = round(exact - row["dev_ndcg"], 5)
    return {"num_queries": len(dev.qids), "query_source": dev.source, f"exact_ndcg@{config.k}": round(exact, 5)}


def dev_hold_out_queries(config: TuneConfig, dataset, encoder) -> tuple[DevQueries | None, str]:
    """The dev hold-out of `config.dev_split` encoded with `encoder`, or None and why there is none.
    The same draw as fine-tuning's (`retroflow.data.splits.dev_split` over the judged queries), so with the
    pipeline's dev_fraction/dev_seed these are queries the model never trained on."""
    if config.dev_split not in dataset.splits:
        return None, f"{dataset.name} has no split '{config.dev_split}' to hold dev queries out of"
    if config.dev_fraction == 0:
        return None, f"no dev hold-out of {dataset.name}/{config.dev_split} (dev_fraction 0: every query of it may be trained on)"
    qrels = dataset.split_qrels(config.dev_split)
    judged = {q: g for q, g in qrels.items() if any(v >= 1 for v in g.values())}
    texts = dataset.split_queries(config.dev_split)
    _, dev = dev_split(judged, config.dev_fraction, config.dev_seed)
    dev = [q for q in dev if q in texts]
    if not dev:
        return None, f"the dev hold-out of {dataset.name}/{config.dev_split} is empty ({len(judged)} judged x {config.dev_fraction})"
    vectors = np.asarray(encoder.encode_queries([texts[q] for q in dev]), dtype=np.float32)
    source = f"{dataset.name}/{config.dev_split} dev hold-out ({len(dev)} queries, fraction {config.dev_fraction}, seed {config.dev_seed})"
    return DevQueries(dev, vectors, {q: judged[q] for q in dev}, source), ""


# ---------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------


def sweep(loaded, queries: np.ndarray, truth: np.ndarray, config: TuneConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every candidate setting measured on `queries` (each row flagged `pareto`), and the Pareto front."""
    rows = [measure(loaded, queries, truth, params, config) for params in candidate_settings(loaded.parts[0], config)]
    front = pareto_front(rows)
    front_keys = {json.dumps({n: r[n] for n in r if n not in ("recall", "qps")}, sort_keys=True) for r in front}
    for row in rows:
        row["pareto"] = json.dumps({n: row[n] for n in row if n not in ("recall", "qps", "pareto")}, sort_keys=True) in front_keys
    return rows, front


def report_setting(
    loaded, embeddings: Embeddings, queries: QuerySet, params: dict[str, int], metric: str, config: TuneConfig
) -> dict[str, Any]:
    """Recall@k and batched QPS of one setting on queries the sweep never saw, and exact search's QPS on them."""
    truth, exact_seconds = exact_topk(embeddings, queries.vectors, config.k, metric, config.exact_batch_size)
    measured = measure(loaded, queries.vectors, truth, params, config)
    return {
        "num_queries": len(queries.vectors),
        "query_source": queries.source,
        "recall": measured["recall"],
        "qps": measured["qps"],
        "exact_qps": round(len(queries.vectors) / exact_seconds, 1),
    }


def run(
    config: TuneConfig,
    inputs: Mapping[str, Any],
    out_dir: Path,
    partial_dir: Path,
    *,
    query_vectors: np.ndarray | None = None,
    report_vectors: np.ndarray | None = None,
    dev: DevQueries | None = None,
) -> dict[str, Any]:
    """The `tune` stage: inputs `index` and the `embeddings` it was built from (their vectors are the
    recall queries unless `query_vectors` are given); with `data` and `model` (the model the
    embeddings came from) also the dev hold-out of `dev_split`, on which the nDCG rule is measured
    (`dev`: dev queries already encoded, instead). See the module docstring."""
    reason = "the stage was given no dataset and model to draw dev queries from"
    if dev is None and "data" in inputs and "model" in inputs:
        from retrieval.serving.encoder import Encoder
        from retroflow.data import open_dataset
        from retroflow.inputs import model_dir

        settings = config.encoder or EncoderSettings(
            **(open_embeddings(inputs["embeddings"].path, check_finite=False).meta.get("encoder") or {})
        )
        encoder = Encoder(model_dir(inputs["model"]), settings.with_overrides(show_progress=False, device=config.device))
        dev, reason = dev_hold_out_queries(config, open_dataset(inputs["data"]), encoder)
    index_dir, embeddings_dir = Path(inputs["index"].path), Path(inputs["embeddings"].path)
    return _tune(config, index_dir, embeddings_dir, query_vectors, Path(out_dir), report_vectors, dev, reason)


def _tune(
    config: TuneConfig,
    index_dir: Path,
    embeddings_dir: Path,
    query_vectors: np.ndarray | None,
    out_dir: Path,
    report_vectors: np.ndarray | None,
    dev: DevQueries | None,
    no_dev_reason: str,
) -> dict[str, Any]:
    """Sweep, choose, and write a tuned index directory to `out_dir` (see the module docstring)."""
    index_dir, out_dir = Path(index_dir), Path(out_dir)
    meta = read_index_meta(index_dir)
    embeddings = open_embeddings(embeddings_dir)
    if embeddings.num_docs != meta["ntotal"] or embeddings.dim != meta["dim"]:
        raise ValueError(
            f"{embeddings_dir} ({embeddings.num_docs} x {embeddings.dim}) is not what {index_dir} "
            f"was built from ({meta['ntotal']} x {meta['dim']})"
        )
    tuning, reporting = tuning_and_report_queries(embeddings, query_vectors, report_vectors, config)
    k = min(config.k, embeddings.num_docs)
    config = config.with_overrides(k=k)
    truth, exact_seconds = exact_topk(embeddings, tuning.vectors, k, meta["metric"], config.exact_batch_size)

    loaded = load_index(index_dir, config.device)
    log.info("tuning %s on %d queries (target recall@%d >= %s)", meta["factory"], len(tuning.vectors), k, config.target_recall)
    rows, front = sweep(loaded, tuning.vectors, truth, config)
    dev_figures = measure_dev(loaded, embeddings, rows, dev, meta["metric"], config) if dev is not None else None
    chosen, met = choose(rows, config.target_recall, config.ndcg_tolerance if dev is not None else None)
    if dev is not None:
        rule = f"fastest with dev nDCG@{k} within {config.ndcg_tolerance} of exact search and recall@{k} >= {config.target_recall}"
        dev_figures.update({f"ndcg@{k}": chosen["dev_ndcg"], f"ndcg@{k}_loss": chosen["dev_ndcg_loss"]})
    else:
        rule = f"fastest with recall@{k} >= {config.target_recall} (recall only: {no_dev_reason})"
        log.warning("tuning %s on recall alone: %s", meta["factory"], no_dev_reason)
    if not met:
        log.warning(
            "no setting of %s meets the rule (%s): keeping the most accurate (recall %.4f%s)",
            meta["factory"],
            rule,
            chosen["recall"],
            f", dev nDCG loss {chosen['dev_ndcg_loss']:.4f}" if dev is not None else "",
        )
    params = {n: chosen[n] for n in chosen if n not in MEASURED}
    tuned_on = {
        "num_queries": len(tuning.vectors),
        "query_source": tuning.source,
        "recall": chosen["recall"],
        "qps": chosen["qps"],
        "exact_qps": round(len(tuning.vectors) / exact_seconds, 1),
    }
    reported_on = report_setting(loaded, embeddings, reporting, params, meta["metric"], config)

    if out_dir.resolve() != index_dir.resolve():
        copy_index_dir(index_dir, out_dir)
    knob_names = sorted({n for r in rows for n in r} - set(MEASURED))
    columns = knob_names + ["recall", "qps"] + (["dev_ndcg", "dev_ndcg_loss"] if dev is not None else []) + ["pareto"]
    atomic_write_text(out_dir / "tune.csv", table_csv(rows, columns))
    summary = {
        "factory": meta["factory"],
        "rule": rule,
        "ndcg_tolerance": config.ndcg_tolerance if dev is not None else None,
        "target_recall": config.target_recall,
        "target_met": met,  # on the tuning (and dev) queries, where the choice was made
        "dev": dev_figures,  # None: no dev queries, the choice is by recall alone (`rule` says why)
        "k": k,
        "search_params": params,
        "recall": reported_on["recall"],  # every unlabelled figure is from the report queries
        "qps": reported_on["qps"],
        "exact_qps": reported_on["exact_qps"],
        "speedup_vs_exact": round(reported_on["qps"] / reported_on["exact_qps"], 2),
        "reported_on": reported_on,
        "tuned_on": tuned_on,
        "chosen": chosen,
        "rows_measured_on": "tuning queries",
        "pareto_front": front,
        "rows": rows,
        "device": "gpu" if loaded.on_gpu else "cpu",
    }
    atomic_write_text(out_dir / "tune.json", json.dumps(summary, indent=2))
    plot_tradeoff(
        rows,
        front,
        chosen,
        config.target_recall,
        tuned_on["exact_qps"],
        f"{meta['factory']}  ({meta['ntotal']} vectors, {len(tuning.vectors)} tuning queries)",
        out_dir / "tune.png",
    )
    headline = (
        "rule",
        "ndcg_tolerance",
        "target_recall",
        "target_met",
        "dev",
        "k",
        "recall",
        "qps",
        "exact_qps",
        "speedup_vs_exact",
        "reported_on",
        "tuned_on",
    )
    tuned_meta = {**meta, "search_params": params, "tuned": True, "tuning": {k_: summary[k_] for k_ in headline}}
    atomic_write_text(out_dir / META_FILE, json.dumps(tuned_meta, indent=2, default=str))  # last: the directory is complete
    return {k_: summary[k_] for k_ in ("factory", "search_params", *headline)} | {"settings_tried": len(rows), "pareto_size": len(front)}
