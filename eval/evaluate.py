"""The evaluation stage: a model (dense encoder or BM25) on one dataset split -> metrics.

    run(config, inputs: {"data", "model", "index", "embeddings"}, out_dir, partial_dir) -> dict
        The `evaluate` stage (the contract of `flows.stages.STAGES`): `config.system` over the inputs;
        out_dir/result.json keeps the per-query values.
    evaluate(config: EvaluateConfig, target: Target, dataset=None) -> dict   # means, per_query, run, ...
    summary(result) -> dict                                                   # without per_query / run
    record_run(result, config, target, registry_path=None, run_id=None) -> run_id

The config says how a system is scored (suite, split, metrics, depth, encoder and fusion settings);
what is scored, the model and the dataset (and an index or embeddings to search), is the `Target`:
`retroflow evaluate` fills it from --model/--dataset/--index/--embeddings, the stage from its inputs.

Suites (`config.suite`):
- `beir` (default): a BEIR-format dataset, metrics from `retroflow.metrics` (nDCG/Recall/MRR/MAP@k).
- `msmarco`: MS MARCO passage / TREC DL (`retroflow.data.msmarco`): official TSV directory or BEIR
  layout; MRR@10, Recall@50/1000, nDCG@10; on graded qrels binary metrics count grade >= 2.
- `nq`: DPR-style open-domain QA (`retroflow.data.nq`): passages + questions with answers; top-k
  retrieval accuracy (`accuracy@k`) with DPR's answer matching.

Plain functions, used by the CLI (`retroflow evaluate`), the stage and the Prefect flows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from retrieval.serving.bm25 import BM25Retriever, BM25Settings
from retrieval.serving.encode import corpus_vectors
from retrieval.serving.encoder import Encoder, EncoderSettings
from retrieval.serving.hybrid import HYBRID_PREFIX, FusionSettings, HybridSearcher, dense_side, dev_hold_out
from retrieval.serving.index import IndexRetriever, read_index_meta
from retrieval.serving.search import DenseRetriever, ExactDenseRetriever, Run, drop_self_hits
from retroflow.config import ConfigError, StageConfig
from retroflow.data.beir import BeirDataset, DatasetError, load_dataset
from retroflow.data.msmarco import MSMARCO_METRICS, TREC_DL_RELEVANCE_LEVEL, binary_relevance_level, load_msmarco, read_run
from retroflow.data.nq import NQ_METRICS, NQDataset, load_nq, parse_accuracy_metric, score_answers
from retroflow.hashing import code_version, hash_json
from retroflow.metrics import DEFAULT_METRICS, evaluate_run, parse_metric
from retroflow.publish import atomic_write_text

log = logging.getLogger(__name__)

Suite = Literal["beir", "msmarco", "nq"]
SUITE_METRICS: dict[str, tuple[str, ...]] = {"beir": tuple(DEFAULT_METRICS), "msmarco": MSMARCO_METRICS, "nq": NQ_METRICS}
# Retrieval depth when the config does not say: NQ's accuracy needs only the top 100.
SUITE_TOP_K = {"beir": 1000, "msmarco": 1000, "nq": 100}


class MsMarcoSettings(StageConfig):
    graded_relevance_level: int = Field(
        TREC_DL_RELEVANCE_LEVEL, ge=1, description="on graded qrels (TREC DL), lowest grade binary metrics count as relevant"
    )


class NQSettings(StageConfig):
    passages: str | None = None  # psgs_w100.tsv-style file; None = find psgs*.tsv under the dataset directory
    questions: str | None = None  # nq-<split>.qa.csv / .json(l); None = find it under the dataset directory
    match: Literal["string", "regex"] = "string"  # DPR: string (NQ, TriviaQA, WebQ), regex (CuratedTREC)
    match_title: bool = False  # DPR searches the passage text only


class EvaluateConfig(StageConfig):
    """How a system is scored; what is scored (model, dataset, index, embeddings) is a `Target`."""

    moved_to_inputs: ClassVar[dict[str, str]] = {
        "model": "pass --model ALIAS|DIR|bm25|hybrid:<model>",
        "dataset": "pass --dataset NAME|DIR",
        "index": "pass --index DIR",
        "embeddings": "pass --embeddings DIR",
    }

    suite: Suite = "beir"
    split: str = "test"
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))  # default: the suite's metrics
    top_k: int = Field(1000, ge=1, description="retrieval depth per query (nq: default 100)")
    relevance_level: int = Field(1, ge=1, description="lowest grade counted as relevant by binary metrics")
    ignore_identical_ids: bool = True  # beir only: MS MARCO/NQ query and passage ids are separate namespaces
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    bm25: BM25Settings = Field(default_factory=BM25Settings)
    fusion: FusionSettings = Field(default_factory=FusionSettings)  # used by hybrid:<model>
    exact_beside_index: bool = Field(
        True,
        description="searched through an approximate index: also search exactly (over "
        "the target's embeddings or the index's own vectors) and report both, so the index's cost is shown",
    )
    system: Literal["dense", "hybrid", "bm25"] | None = None  # the `evaluate` stage: how its `model` input is used
    run_file: str | None = None  # score this ranking file (MS MARCO or TREC format) instead of retrieving
    on_unknown_ids: Literal["error", "drop"] = "error"  # beir: qrels rows naming unknown queries/documents
    checksum: str | None = None  # beir zip URLs: the archive's "sha256:<hex>", checked before unpacking
    msmarco: MsMarcoSettings = Field(default_factory=MsMarcoSettings)
    nq: NQSettings = Field(default_factory=NQSettings)

    @model_validator(mode="before")
    @classmethod
    def _suite_defaults(cls, data: Any) -> Any:
        """Metrics and depth the config leaves out default to the suite's."""
        if isinstance(data, dict):
            suite = data.get("suite", "beir")
            if suite in SUITE_METRICS:
                data = dict(data)
                data.setdefault("metrics", list(SUITE_METRICS[suite]))
                data.setdefault("top_k", SUITE_TOP_K[suite])
        return data

    @model_validator(mode="after")
    def _known_metrics(self) -> EvaluateConfig:
        for name in self.metrics:
            if self.suite == "nq":
                if parse_accuracy_metric(name) > self.top_k:
                    raise ValueError(f"metric {name} needs top_k >= {parse_accuracy_metric(name)} (top_k is {self.top_k})")
            else:
                parse_metric(name)
        if self.suite == "nq" and self.run_file:
            raise ValueError("run_file is not supported by the nq suite")
        return self


@dataclass(frozen=True)
class Target:
    """What an evaluation scores: `model` (an alias, a model directory, a hub id, "bm25", or
    "hybrid:<dense model>": BM25 fused with it) on `dataset` (a directory, a name under
    $RETROFLOW_DATA_DIR, hf:BeIR/x or a zip URL; None for a dataset handed over loaded, or NQ's
    explicit nq.passages/nq.questions), searched through the FAISS index directory `index`, else
    exactly over the vectors of `embeddings` (an `encode` output), else by encoding the corpus."""

    model: str
    dataset: str | None = None
    index: str | None = None
    embeddings: str | None = None

    def __post_init__(self) -> None:
        dense = self.model[len(HYBRID_PREFIX) :] if self.hybrid else None
        if dense == "":
            raise ConfigError("model 'hybrid:' needs a dense model after the colon, e.g. hybrid:minilm")
        if dense is not None and dense.startswith(("bm25", HYBRID_PREFIX)):
            raise ConfigError(
                f"model {self.model!r}: hybrid fuses BM25 with a dense model, so what follows 'hybrid:' must be "
                "a dense model (an alias such as minilm, or a model directory), e.g. hybrid:minilm"
            )

    @property
    def hybrid(self) -> bool:
        return self.model.startswith(HYBRID_PREFIX)

    @property
    def dense_model(self) -> str:
        """The dense model (of a hybrid: what follows 'hybrid:')."""
        return self.model[len(HYBRID_PREFIX) :] if self.hybrid else self.model

    def check(self, config: EvaluateConfig) -> None:
        if self.hybrid and config.run_file:
            raise ConfigError("a hybrid model retrieves with BM25 itself; it cannot score a run_file")

    def config_hash(self, config: EvaluateConfig) -> str:
        """The run registry's `config_hash`: the config with what it scored (the same value as when
        the config itself held the model, dataset, index and embeddings)."""
        located = {"model": self.model, "dataset": self.dataset, "index": self.index, "embeddings": self.embeddings}
        return hash_json({**config.canonical(), **located})


def retrieve_bm25(dataset: BeirDataset, queries: dict[str, str], config: EvaluateConfig) -> tuple[Run, dict[str, Any]]:
    started = time.perf_counter()
    retriever = BM25Retriever(dataset.doc_ids(), dataset.doc_texts(), config.bm25)
    index_s = time.perf_counter() - started
    return retriever.search(queries, config.top_k), {"index_docs_per_s": dataset.num_docs / index_s if index_s else None}


def dense_retriever(dataset: BeirDataset, encoder: Encoder, target: Target) -> DenseRetriever:
    """Through the FAISS index when the target names one, else exact search over the given or encoded corpus."""
    if target.index:
        return IndexRetriever(target.index, encoder)  # the index holds the corpus vectors: only queries are encoded
    vectors = corpus_vectors(target.embeddings, dataset.doc_ids()) if target.embeddings else encoder.encode_passages(dataset.doc_texts())
    return ExactDenseRetriever(encoder, dataset.doc_ids(), vectors)


def retrieve_dense(dataset: BeirDataset, queries: dict[str, str], config: EvaluateConfig, target: Target) -> tuple[Run, dict[str, Any]]:
    encoder = Encoder(target.model, config.encoder)
    retriever = dense_retriever(dataset, encoder, target)
    docs_per_s = encoder.last_docs_per_s if not (target.index or target.embeddings) else None
    # queries/s counts the search alone, as it always has: query encoding is timed apart from it
    query_vectors = encoder.encode_queries(list(queries.values()))
    started = time.perf_counter()
    run = retriever.search_vectors(list(queries), query_vectors, config.top_k)
    search_s = time.perf_counter() - started
    return run, {
        "encode_docs_per_s": docs_per_s,
        "search_queries_per_s": len(queries) / search_s if search_s else None,
        "pooling": encoder.pooling,
        "normalize": encoder.normalize,
    }


def retrieve_hybrid(dataset: BeirDataset, queries: dict[str, str], config: EvaluateConfig, target: Target) -> tuple[Run, dict[str, Any]]:
    """BM25 fused with the dense model; the weight comes from the dev hold-out (or the corpus), never from `queries`."""
    dense_model = target.dense_model
    encoder = Encoder(dense_model, config.encoder)
    texts = dataset.doc_texts()
    vectors = corpus_vectors(target.embeddings, dataset.doc_ids()) if target.embeddings and not target.index else None
    dense = dense_side(encoder, dataset.doc_ids(), texts, index=target.index, doc_vectors=vectors)
    bm25 = BM25Retriever(dataset.doc_ids(), texts, config.bm25)
    searcher = HybridSearcher(dense, bm25, config.fusion, texts, config.bm25)
    held_out = dev_hold_out(dataset, config.fusion, evaluated_split=config.split)
    dev_queries, dev_qrels = held_out if held_out else (None, None)
    if dev_queries and set(dev_queries) & set(queries):
        raise ValueError(
            f"fusion: dev queries of split '{config.fusion.dev_split}' overlap the evaluated queries; "
            "the weight would be chosen on the test queries"
        )
    selection = searcher.select_weight(dev_queries, dev_qrels)
    log.info("hybrid %s: %s fusion, weight %s chosen on %s", dense_model, selection["method"], selection["weight"], selection["chosen_on"])
    run = searcher.search(queries, config.top_k, weight=selection["weight"])
    return run, {"fusion": selection, "dense_model": dense_model, "pooling": encoder.pooling, "normalize": encoder.normalize}


def same_model(recorded: str, used: str) -> bool:
    """Whether two model names (as `encode` records them: an alias, a path, a hub id, or `stage/key`
    inside a store) name one model: each is taken to the folder it stands for where that is known
    here without a download (an alias's packaged folder, a hub id's cached snapshot), and paths
    agree once resolved."""
    return _model_folder(recorded) == _model_folder(used)


def _model_folder(name: str) -> str:
    from retroflow.artifacts import artifact_label
    from retroflow.models import ALIASES, ModelNotFoundError, resolve_model_path

    try:  # never a download: a hub id counts by its cached snapshot, else by name
        name = str(resolve_model_path(name, local_only=True))
    except ModelNotFoundError:
        if name in ALIASES:  # the alias's package is not installed here: aliases still agree by name
            return ALIASES[name].__name__
    name = artifact_label(name)
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def check_index_provenance(target: Target, dataset: BeirDataset) -> dict[str, Any]:
    """An index holds one dataset's documents encoded by one model. Searching it for another
    dataset scores the wrong documents (0.0 with the right document count), so that is refused;
    another model's queries still land in a comparable space only by luck, so that is warned about
    and recorded in the result. Indexes that record neither are used as they are."""
    recorded = read_index_meta(target.index).get("embeddings") or {}
    fingerprint = recorded.get("dataset_fingerprint")
    if fingerprint and fingerprint != dataset.fingerprint:
        raise ValueError(
            f"index {target.index} was built over dataset {recorded.get('dataset')!r} (fingerprint {fingerprint[:12]}), "
            f"not over the evaluated dataset {dataset.name!r} (fingerprint {dataset.fingerprint[:12]}); "
            "build an index over this dataset, or evaluate without --index"
        )
    model = target.dense_model
    index_model = recorded.get("model")
    if index_model and not same_model(str(index_model), model):
        log.warning(
            "index %s was built with model %s, but queries are encoded with %s: scores mix two models", target.index, index_model, model
        )
        return {"index_model_mismatch": {"index_model": index_model, "model": model}}
    return {}


def check_embeddings_provenance(target: Target) -> dict[str, Any]:
    """Corpus vectors encoded by another model than the one encoding the queries: warned about
    and recorded in the result, as for an index (the vectors' ids are checked against the corpus
    where they are read)."""
    from retrieval.serving.encode import open_embeddings

    vectors_model = open_embeddings(target.embeddings, check_finite=False).meta.get("model")
    if vectors_model and not same_model(str(vectors_model), target.dense_model):
        log.warning(
            "embeddings %s were encoded with model %s, but queries are encoded with %s: scores mix two models",
            target.embeddings,
            vectors_model,
            target.dense_model,
        )
        return {"embeddings_model_mismatch": {"embeddings_model": vectors_model, "model": target.dense_model}}
    return {}


def retrieve(dataset: BeirDataset, queries: dict[str, str], config: EvaluateConfig, target: Target) -> tuple[Run, dict[str, Any]]:
    if config.run_file or target.model == "bm25":
        return _retrieve(dataset, queries, config, target)
    checked = {}
    if target.index:
        checked = check_index_provenance(target, dataset)
    elif target.embeddings:
        checked = check_embeddings_provenance(target)
    run, extra = _retrieve(dataset, queries, config, target)
    return run, {**extra, **checked}


def _retrieve(dataset: BeirDataset, queries: dict[str, str], config: EvaluateConfig, target: Target) -> tuple[Run, dict[str, Any]]:
    if config.run_file:
        wanted = set(queries)
        run = {qid: hits for qid, hits in read_run(config.run_file).items() if qid in wanted}
        return run, {}
    if target.model == "bm25":
        return retrieve_bm25(dataset, queries, config)
    if target.hybrid:
        return retrieve_hybrid(dataset, queries, config, target)
    return retrieve_dense(dataset, queries, config, target)


def check_has_relevant(qrels: dict[str, dict[str, int]], name: str, split: str) -> None:
    """Every metric of a split without one positive grade is 0 by construction, which reads as a result."""
    if not any(grade > 0 for docs in qrels.values() for grade in docs.values()):
        raise DatasetError(
            f"dataset '{name}' split '{split}': every judgment has grade 0 (no relevant document), "
            "so every metric would be 0; check the qrels' score column"
        )


def index_search(config: EvaluateConfig, target: Target) -> dict[str, Any] | None:
    """How the dense side was searched: exactly, or through which index with which knobs (None: no dense side)."""
    if config.run_file or target.model == "bm25":
        return None
    if not target.index:
        return {"approximate": False, "label": "exact"}
    from retrieval.serving.index import read_index_meta

    meta = read_index_meta(target.index)
    params = meta.get("search_params") or {}
    knobs = " ".join(f"{k}={int(v) if float(v).is_integer() else v}" for k, v in sorted(params.items()))
    return {
        "approximate": meta["factory"].strip() != "Flat",
        "factory": meta["factory"],
        "search_params": params,
        "label": f"{meta['factory']} {knobs}".strip(),
        "embeddings": (meta.get("embeddings") or {}).get("path"),
    }


def exact_target(target: Target, search: Mapping[str, Any]) -> Target:
    """The same target searched exactly: over the given embeddings, else the vectors the index
    was built from (when they are still where it records them), else by encoding the corpus."""
    embeddings = target.embeddings
    if embeddings is None and search.get("embeddings"):
        from retroflow.artifacts import resolve_artifact_label

        found = Path(resolve_artifact_label(search["embeddings"], near=Path(target.index)))
        embeddings = str(found) if found.is_dir() else None
    return replace(target, index=None, embeddings=embeddings)


def exact_beside(
    dataset: BeirDataset, queries: dict[str, str], qrels, config: EvaluateConfig, target: Target, relevance_level: int
) -> dict[str, float]:
    """The means an exact search of `target` gives on the same queries (the approximate run's reference)."""
    run, _ = retrieve(dataset, queries, config, target)
    if config.suite != "msmarco" and config.ignore_identical_ids:
        run = drop_self_hits(run)
    means, _ = evaluate_run(qrels, run, config.metrics, relevance_level)
    return {m: means[m] for m in config.metrics if m in means}


def warn_shallow_cutoffs(config: EvaluateConfig) -> None:
    deepest = max((parse_metric(m)[1] for m in config.metrics), default=0)
    if deepest > config.top_k:
        log.warning("a metric cuts off at %d but only the top %d documents are retrieved (top_k)", deepest, config.top_k)


def evaluate(config: EvaluateConfig, target: Target, dataset: BeirDataset | NQDataset | None = None) -> dict[str, Any]:
    """Run retrieval for one dataset split and score it. Returns metrics + per-query values.
    `dataset`: the target's dataset already loaded (else it is loaded from `target.dataset`)."""
    target.check(config)
    if config.suite == "nq":
        return evaluate_nq(config, target, dataset)
    warn_shallow_cutoffs(config)
    if dataset is None:
        if target.dataset is None:
            raise ConfigError("evaluate: no dataset to evaluate on: pass --dataset NAME|DIR")
        dataset = (
            load_msmarco(target.dataset)
            if config.suite == "msmarco"
            else load_dataset(target.dataset, checksum=config.checksum, on_unknown_ids=config.on_unknown_ids)
        )
    qrels = dataset.split_qrels(config.split)
    check_has_relevant(qrels, dataset.name, config.split)
    queries = dataset.split_queries(config.split)
    empty = sorted(qid for qid, text in queries.items() if not str(text).strip())
    if empty:
        # An empty query retrieves nothing and scores 0; say how many of the mean are such zeros.
        log.warning(
            "%s/%s: %d of %d queries have empty text (e.g. %s); they score 0 and are counted in the means",
            dataset.name,
            config.split,
            len(empty),
            len(queries),
            ", ".join(empty[:3]),
        )
    log.info("evaluating %s on %s/%s: %d queries, %d docs", target.model, dataset.name, config.split, len(queries), dataset.num_docs)
    started = time.perf_counter()
    run, extra = retrieve(dataset, queries, config, target)
    relevance_level = config.relevance_level
    if config.suite == "msmarco":
        # Query and passage ids are separate number ranges in MS MARCO: an equal id is no self-hit.
        relevance_level = binary_relevance_level(qrels, config.relevance_level, config.msmarco.graded_relevance_level)
    elif config.ignore_identical_ids:
        run = drop_self_hits(run)
    means, per_query = evaluate_run(qrels, run, config.metrics, relevance_level)
    counts = {
        "num_queries": len(queries),
        "num_scored_queries": len(next(iter(per_query.values()), {})),
        "num_docs": dataset.num_docs,
        "relevance_level": relevance_level,
        "num_empty_queries": len(empty),
    }
    search = index_search(config, target)
    if search is not None:
        extra["search"] = {k: v for k, v in search.items() if k != "embeddings"}
    if search is not None and search["approximate"] and config.exact_beside_index:
        # An approximate row beside exact ones (the init model's, say) compares the index as much as the model.
        extra["exact_search"] = exact_beside(dataset, queries, qrels, config, exact_target(target, search), relevance_level)
    return result_record(config, target, config.suite, dataset, counts, means, per_query, run, extra, started)


def result_record(
    config: EvaluateConfig,
    target: Target,
    suite: str,
    dataset,
    counts: dict[str, Any],
    means: dict[str, float],
    per_query: dict,
    run: dict,
    extra: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """The result every suite returns: means, counts, identity, timings, per-query values and the run."""
    return {
        **means,
        "suite": suite,
        **counts,
        "encode_docs_per_s": extra.pop("encode_docs_per_s", None),
        "model": target.model,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "split": config.split,
        "seconds": round(time.perf_counter() - started, 2),
        **extra,
        "per_query": per_query,
        "run": run,
    }


def evaluate_nq(config: EvaluateConfig, target: Target, dataset: NQDataset | None = None) -> dict[str, Any]:
    """DPR retriever evaluation: top-k accuracy of answer-string matches."""
    if dataset is None:
        dataset = load_nq(target.dataset, config.split, config.nq.passages, config.nq.questions)
    log.info(
        "evaluating %s on %s/%s: %d questions, %d passages",
        target.model,
        dataset.name,
        config.split,
        len(dataset.questions),
        dataset.num_docs,
    )
    started = time.perf_counter()
    run, extra = retrieve(dataset.corpus, dataset.questions, config, target)
    passage_text = dataset.passage_text(include_title=config.nq.match_title)
    means, per_query = score_answers(run, dataset.answers, passage_text, config.metrics, config.nq.match)
    counts = {"num_queries": len(dataset.questions), "num_docs": dataset.num_docs}
    return result_record(config, target, "nq", dataset, counts, means, per_query, run, extra, started)


def record_run(
    result: dict[str, Any],
    config: EvaluateConfig,
    target: Target,
    registry_path: str | Path | None = None,
    run_id: str | None = None,
) -> str:
    """Append `result` (of `target`) to the run registry (default `$RETROFLOW_REGISTRY` or runs/registry.parquet)."""
    from eval.registry import append_run

    model = f"run:{config.run_file}" if config.run_file else target.model
    return append_run(
        registry_path,
        result,
        run_id=run_id,
        config_hash=target.config_hash(config),
        code_version=code_version("eval", "retrieval"),
        model=model,
        index=target.index,
        dataset=result["dataset"],
        split=config.split,
        suite=config.suite,
    )


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the bulky per-query values and run (for the JSON line and tables)."""
    return {k: v for k, v in result.items() if k not in ("per_query", "run")}


def write_result(result: dict[str, Any], path: Path, include_run: bool = False) -> None:
    payload = {k: v for k, v in result.items() if include_run or k != "run"}
    atomic_write_text(Path(path), json.dumps(payload, indent=2, default=str))


def run(config: EvaluateConfig, inputs: Mapping[str, Any], out_dir: Path, partial_dir: Path) -> dict[str, Any]:
    """The `evaluate` stage: `config.system` over input `data`: the `model` input (through `index`,
    or exact search over `embeddings`, or encoding the corpus), BM25 fused with it, or BM25 alone.
    `result.json` keeps the per-query values; the returned metrics do not."""
    from retroflow.data import open_dataset
    from retroflow.inputs import model_dir, model_label

    system = config.system or "dense"
    if system != "bm25" and "model" not in inputs:
        raise ValueError(f"evaluate: system {system!r} needs a model input")
    path = "" if system == "bm25" else str(model_dir(inputs["model"]))
    target = Target(
        model={"dense": path, "hybrid": HYBRID_PREFIX + path, "bm25": "bm25"}[system],
        dataset=str(inputs["data"].path),
        index=str(inputs["index"].path) if "index" in inputs else None,
        embeddings=str(inputs["embeddings"].path) if "embeddings" in inputs else None,
    )
    result = evaluate(config, target, dataset=open_dataset(inputs["data"]))
    label = "bm25" if system == "bm25" else model_label(inputs["model"])
    result["model"] = f"hybrid({label})" if system == "hybrid" else label
    result["system"] = system
    write_result(result, Path(out_dir) / "result.json")
    return {k: v for k, v in result.items() if k not in ("per_query", "run")}
