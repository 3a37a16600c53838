"""The pretrain-to-BEIR pipeline as plain Python: one step function per stage.

Each step takes the artifact store, its stage config and its upstream artifacts, and returns
an `Artifact` (a finished, content-addressed directory). The Prefect flow in `flows/` wraps
each step in a cached task; `retroflow pipeline` runs the same steps without Prefect.

Stage configs inside the pipeline YAML are kept as plain mappings here and validated by each
stage's own config class when the step runs, so an error names `<file>: <stage>.<field>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import Field

from retroflow.artifacts import Artifact, ArtifactStore, atomic_write_text, code_version
from retroflow.config import ConfigError, StageConfig, hash_json, load_config, validate_config

log = logging.getLogger(__name__)


class StageSwitches(StageConfig):
    """Which stages run. Switched-off stages pass their input through (e.g. evaluate only)."""

    pretrain: bool = True
    negatives: bool = True
    teacher: bool = False
    finetune: bool = True
    index: bool = True
    tune: bool = True


class ReferenceSwitches(StageConfig):
    """Systems evaluated beside the produced model on every dataset (each a cached evaluation)."""

    init: bool = Field(True, description="the untouched init model (exact search)")
    bm25: bool = True
    hybrid: bool = Field(True, description="BM25 fused with the produced model (and with the init model)")


class PipelineConfig(StageConfig):
    name: str = "quickstart"
    store: str = Field("artifacts", description="artifact store: a directory or an fsspec URL such as s3://bucket/prefix (RETROFLOW_STORE overrides)")
    data_dir: str | None = Field(None, description="where bare dataset names are found (else RETROFLOW_DATA_DIR)")
    model: str = "minilm"
    train_dataset: str = "scifact"
    train_split: str = "train"
    eval_datasets: list[str] = Field(default_factory=lambda: ["scifact"])
    eval_split: str = "test"
    stages: StageSwitches = Field(default_factory=StageSwitches)
    references: ReferenceSwitches = Field(default_factory=ReferenceSwitches)
    pretrain: dict[str, Any] = Field(default_factory=dict)
    negatives: dict[str, Any] = Field(default_factory=dict)
    teacher: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)
    encode: dict[str, Any] = Field(default_factory=dict)
    index: dict[str, Any] = Field(default_factory=dict)
    tune: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
    regression_threshold: float = Field(0.01, ge=0, description="flag metric drops larger than this vs the previous run")
    train_processes: int = Field(1, ge=1, description="processes (GPUs) per training stage; more than 1 launches torchrun")


def load_pipeline_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load the pipeline and validate every stage section now, not when the stage starts
    (a typo in `finetune` must not wait for pretraining to finish)."""
    pipeline = load_config(PipelineConfig, path, overrides)
    try:
        validate_sections(pipeline)
    except ConfigError as err:
        raise ConfigError(f"{path or '<defaults>'}: {err}") from None
    return pipeline


def validate_sections(pipeline: PipelineConfig) -> None:
    """Each stage section through its own config class, with the placeholders the chain fills in."""
    from retromae.config import PretrainConfig
    from retrieval.tune import TuneConfig
    from retrieval.finetune import FinetuneConfig
    from retrieval.index import IndexConfig
    from retrieval.negatives import NegativesConfig
    from retrieval.encode import EncodeConfig
    from retrieval.teacher import TeacherConfig

    placeholders = {"dataset": "<input:data>", "split": pipeline.train_split}
    stage_config(PretrainConfig, pipeline, "pretrain", **pretrain_init(pipeline))
    stage_config(NegativesConfig, pipeline, "negatives", **placeholders, model=None)
    teacher = stage_config(TeacherConfig, pipeline, "teacher", **placeholders, init="<input:init>")
    finetune = stage_config(FinetuneConfig, pipeline, "finetune", dataset="<input:data>", init="<input:model>")
    stage_config(EncodeConfig, pipeline, "encode", model="<input:model>", dataset="<input:data>")
    stage_config(IndexConfig, pipeline, "index")
    stage_config(TuneConfig, pipeline, "tune")
    check_dev_hold_outs(pipeline, teacher, finetune, eval_config(pipeline))


def check_dev_hold_outs(pipeline: PipelineConfig, teacher: StageConfig, finetune: StageConfig, evaluate: StageConfig) -> None:
    """Every choice a run makes on dev (the teacher's check and the distillation gate, the hybrid's
    weight) must use the training queries fine-tuning holds out; any other draw includes queries
    the model was trained on, and the choice then flatters it."""
    if not pipeline.stages.finetune:
        return
    held_out = (finetune.data.dev_fraction, finetune.data.dev_seed)
    if pipeline.stages.teacher and teacher.dev_fraction and (teacher.dev_fraction, teacher.dev_seed) != held_out:
        raise ConfigError(f"teacher.dev_fraction/dev_seed {(teacher.dev_fraction, teacher.dev_seed)} differ from finetune.data's {held_out}: "
                          "the teacher would be checked on queries the student trains on")  # fmt: skip
    fusion = evaluate.fusion
    chooses_on_train = fusion.method == "minmax" and fusion.weight is None and fusion.dev_split == pipeline.train_split
    if pipeline.references.hybrid and pipeline.train_dataset in pipeline.eval_datasets and chooses_on_train \
            and (fusion.dev_fraction, fusion.dev_seed) != held_out:  # fmt: skip
        raise ConfigError(f"evaluate.fusion.dev_fraction/dev_seed {(fusion.dev_fraction, fusion.dev_seed)} differ from finetune.data's {held_out}: "
                          f"the hybrid's weight would be chosen on {pipeline.train_dataset} queries the model trains on "
                          "(hold out the same dev queries in both, or set evaluate.fusion.weight)")  # fmt: skip


def stage_config(cls: type[StageConfig], pipeline: PipelineConfig, section: str, **fixed: Any) -> StageConfig:
    data = {**getattr(pipeline, section), **fixed}
    return validate_config(cls, data, source=f"pipeline '{pipeline.name}', section '{section}'")


def store_for(pipeline: PipelineConfig) -> ArtifactStore:
    """The store of a pipeline (or any config with a `store` field, e.g. an ablation)."""
    return ArtifactStore(os.environ.get("RETROFLOW_STORE") or pipeline.store)


def apply_data_dir(pipeline: PipelineConfig) -> None:
    """Point RETROFLOW_DATA_DIR at a config's `data_dir` (a pipeline's or an ablation's)."""
    if pipeline.data_dir:
        os.environ["RETROFLOW_DATA_DIR"] = str(Path(pipeline.data_dir).expanduser().resolve())


# ---------------------------------------------------------------------------------------
# External inputs (a named model or a raw dataset) get fingerprints like artifacts do
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExternalInput:
    """Something the pipeline did not make (a packaged model, a hub model): fingerprinted by content."""

    name: str
    path: Path
    fingerprint: str

    def ref(self) -> dict[str, str]:
        return {"stage": "external", "name": self.name, "fingerprint": self.fingerprint, "path": str(self.path)}

    def file(self, name: str) -> Path:
        return self.path / name


_fingerprints: dict[tuple[str, int], str] = {}


def directory_fingerprint(path: Path) -> str:
    """sha256 over the files of a directory (memoised by path and mtime)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stamp = max((p.stat().st_mtime_ns for p in files), default=0)
    cached = _fingerprints.get((str(path), stamp))
    if cached:
        return cached
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    _fingerprints[(str(path), stamp)] = digest.hexdigest()[:24]
    return _fingerprints[(str(path), stamp)]


def external_model(name: str) -> ExternalInput:
    from retroflow.models import resolve_model_path

    path = resolve_model_path(name)
    return ExternalInput(name=name, path=path, fingerprint=directory_fingerprint(path))


ModelRef = Artifact | ExternalInput


def model_dir(ref: ModelRef) -> Path:
    """The HF model directory inside a model-producing artifact (or the external model itself)."""
    if isinstance(ref, ExternalInput):
        return ref.path
    for candidate in ("model", "encoder"):
        if (ref.path / candidate / "config.json").is_file():
            return ref.path / candidate
    raise FileNotFoundError(f"artifact {ref.path} holds no model directory (model/ or encoder/)")


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------


class DataConfig(StageConfig):
    source: str
    content_fingerprint: str  # part of the key: new content, new artifact


def step_prepare_data(store: ArtifactStore, source: str) -> Artifact:
    """Validate and normalise a dataset into a `data` artifact (corpus/queries/qrels Parquet)."""
    from retroflow.data.beir import load_dataset

    dataset = load_dataset(source)
    config = DataConfig(source=str(source), content_fingerprint=dataset.fingerprint)

    def body(out_dir: Path, _partial: Path) -> dict[str, Any]:
        for name in ("corpus.parquet", "queries.parquet", "qrels.parquet", "dataset.json"):
            shutil.copy2(dataset.path / name, out_dir / name)
        return {"num_docs": dataset.num_docs, "splits": {s: len(q) for s, q in dataset.qrels.items()}, "name": dataset.name}

    return store.build("data", config, {}, step_code("data"), body)


def open_dataset(data: Artifact):
    from retroflow.data.beir import read_normalised

    return read_normalised(data.path)


def step_tokenizer(store: ArtifactStore, config: StageConfig, data: Artifact) -> Artifact:
    """The WordPiece vocabulary of a from-scratch pretraining, trained once on its text."""
    from retromae.stage import run_tokenizer, tokenizer_config

    def body(out_dir: Path, _partial: Path) -> dict[str, Any]:
        return run_tokenizer(config, out_dir, text_files=[data.file("corpus.parquet")])

    return store.build("tokenizer", tokenizer_config(config), {"data": data}, step_code("tokenizer"), body)


def step_pretrain(store: ArtifactStore, config: StageConfig, data: Artifact, processes: int = 1, tokenizer: Artifact | None = None) -> Artifact:
    """`tokenizer`: a `tokenizer` artifact for a from-scratch run; it enters the key by content."""
    from retromae.stage import run_pretrain

    run_config = config if tokenizer is None else config.with_overrides(model={"tokenizer": str(tokenizer.path)})
    inputs = {"data": data} if tokenizer is None else {"data": data, "tokenizer": tokenizer}

    def body(out_dir: Path, partial_dir: Path) -> dict[str, Any]:
        corpus = data.file("corpus.parquet")
        if processes > 1:
            launched = run_config.with_overrides(data={"beir_corpus": None, "files": [str(corpus)]})
            return launch_torchrun("pretrain", launched, processes, out_dir, partial_dir)
        return run_pretrain(run_config, out_dir, partial_dir, text_files=[corpus])

    # the key holds the config as written (no store path) and the tokenizer's fingerprint
    return store.build("pretrain", run_config, inputs, step_code("pretrain"), body, key_config=config)


SYSTEMS = ("dense", "hybrid", "bm25")


def step_evaluate(
    store: ArtifactStore,
    config: StageConfig,
    model: ModelRef | None,
    data: Artifact,
    index: Artifact | None = None,
    system: str = "dense",
    embeddings: Artifact | None = None,
) -> Artifact:
    """Score a system on `data`: `model` through `index` (or exact search over `embeddings`, or
    encoding the corpus), BM25 fused with it (`system="hybrid"`), or BM25 alone. The result
    carries per-query values."""
    from eval.evaluate import evaluate, write_result
    from retrieval.hybrid import HYBRID_PREFIX

    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r} (one of {', '.join(SYSTEMS)})")
    if system != "bm25" and model is None:
        raise ValueError(f"system {system!r} needs a model")
    path = "" if system == "bm25" else str(model_dir(model))
    named = {"dense": path, "hybrid": HYBRID_PREFIX + path, "bm25": "bm25"}[system]
    fixed = {"model": named, "dataset": str(data.path), "index": str(index.path) if index else None,
             "embeddings": str(embeddings.path) if embeddings else None}  # fmt: skip
    run_config = config.with_overrides(**fixed)
    inputs: dict[str, Any] = {"data": data, **({"model": model} if system != "bm25" else {})}
    inputs.update({"index": index} if index else {})
    inputs.update({"embeddings": embeddings} if embeddings else {})
    label = "bm25" if system == "bm25" else model_label(model)

    def body(out_dir: Path, _partial: Path) -> dict[str, Any]:
        result = evaluate(run_config, dataset=open_dataset(data))
        result["model"] = label if system != "hybrid" else f"hybrid({label})"
        result["system"] = system
        write_result(result, out_dir / "result.json")
        return {k: v for k, v in result.items() if k not in ("per_query", "run")}

    # config (without machine-specific paths, with the system) is the key; the inputs enter by fingerprint.
    key_config = config.with_overrides(model={"dense": "<input:model>", "hybrid": HYBRID_PREFIX + "<input:model>", "bm25": "bm25"}[system])
    return store.build("evaluate", run_config, inputs, step_code("evaluate"), body, key_config=key_config)


def step_mine_negatives(store: ArtifactStore, config: StageConfig, data: Artifact, model: ModelRef | None = None) -> Artifact:
    """Hard negatives for the training split (BM25, or dense with `model`), with provenance."""
    from retrieval.negatives import run_mine_negatives

    dense = config.method == "dense"
    inputs: dict[str, Any] = {"data": data, **({"model": model} if dense and model is not None else {})}

    def body(out_dir: Path, _partial: Path) -> dict[str, Any]:
        return run_mine_negatives(config, open_dataset(data), out_dir, model_path=model_dir(model) if dense and model else None)

    return store.build("negatives", config, inputs, step_code("negatives"), body)


def step_train_teacher(store: ArtifactStore, config: StageConfig, data: Artifact, negatives: Artifact | None, teacher_init: ModelRef,
                       embeddings: Artifact | None = None) -> Artifact:  # fmt: skip
    """The distillation teacher's candidate scores: a cross-encoder trained on the same data and
    negatives, or (kind fusion) BM25 fused with `teacher_init` over its corpus `embeddings`."""
    from retrieval.negatives import NEGATIVES_FILE
    from retrieval.teacher import run_fusion_teacher, run_train_teacher

    run_config = config.with_overrides(init=str(model_dir(teacher_init)))
    fusion = config.kind == "fusion"

    def body(out_dir: Path, partial_dir: Path) -> dict[str, Any]:
        if fusion:
            return run_fusion_teacher(run_config, open_dataset(data), out_dir, embeddings.path if embeddings else None)
        return run_train_teacher(run_config, open_dataset(data), negatives.file(NEGATIVES_FILE), out_dir, partial_dir)

    inputs: dict[str, Any] = {"data": data, "init": teacher_init}
    inputs.update({"embeddings": embeddings} if fusion and embeddings else {})
    inputs.update({"negatives": negatives} if not fusion else {})
    return store.build("teacher", run_config, inputs, step_code("teacher"), body, key_config=config)


def step_finetune(
    store: ArtifactStore,
    config: StageConfig,
    data: Artifact,
    model: ModelRef,
    negatives: Artifact | None = None,
    teacher: Artifact | None = None,
    processes: int = 1,
) -> Artifact:
    """DPR fine-tuning (in-batch + hard negatives, ANCE rounds, optional distillation)."""
    from retrieval.finetune import run_finetune
    from retrieval.negatives import NEGATIVES_FILE
    from retrieval.teacher import SCORES_FILE

    inputs: dict[str, Any] = {"data": data, "model": model}
    inputs.update({"negatives": negatives} if negatives else {})
    inputs.update({"teacher": teacher} if teacher else {})

    def body(out_dir: Path, partial_dir: Path) -> dict[str, Any]:
        if processes > 1:
            files = ["--negatives", str(negatives.file(NEGATIVES_FILE))] if negatives else []
            files += ["--teacher-scores", str(teacher.file(SCORES_FILE))] if teacher else []
            args = ["--dataset", str(data.path), "--model", str(model_dir(model)), *files]
            return launch_torchrun("finetune", config, processes, out_dir, partial_dir, *args)
        return run_finetune(
            config, open_dataset(data), model_dir(model), out_dir, partial_dir,
            negatives_file=negatives.file(NEGATIVES_FILE) if negatives else None,
            teacher_scores_file=teacher.file(SCORES_FILE) if teacher else None,
        )  # fmt: skip

    return store.build("finetune", config, inputs, step_code("finetune"), body)


def encode_inputs(data: Artifact, model: ModelRef) -> dict[str, Any]:
    return {"data": data, "model": model}


def encode_run_config(config: StageConfig, data: Artifact, model: ModelRef) -> StageConfig:
    return config.with_overrides(model=str(model_dir(model)), dataset=str(data.path))


def encode_shards_dir(store: ArtifactStore, config: StageConfig, data: Artifact, model: ModelRef) -> Path:
    """Where the shards of this encoding live until merged (the artifact's `.partial` directory)."""
    key = store.key_for("encode", config, encode_inputs(data, model), step_code("encode"))  # the encode artifact's own key
    return store.partial_dir("encode", key)


def encode_shard_count(config: StageConfig, data: Artifact) -> int:
    from retrieval.encode import plan_shards

    return len(plan_shards(data.manifest["metrics"]["num_docs"], config.shard_size))


def step_encode_shard(store: ArtifactStore, config: StageConfig, data: Artifact, model: ModelRef, shard: int) -> dict[str, Any]:
    """One shard of the corpus encoding (atomic; a finished shard is skipped). One task per shard."""
    from retrieval.encode import run_encode_shard

    key = store.key_for("encode", config, encode_inputs(data, model), step_code("encode"))
    if store.lookup("encode", key) is not None:  # merged already (a re-run of the chain): nothing to encode
        return {"shard": shard, "cached": True, "worker_pid": os.getpid()}
    from retroflow.publish import remove_if_empty
    from retrieval.encode import shard_name

    shards_dir = encode_shards_dir(store, config, data, model)
    shards_dir.mkdir(parents=True, exist_ok=True)
    result = run_encode_shard(encode_run_config(config, data, model), open_dataset(data), shard, shards_dir)
    if store.lookup("encode", key) is not None:  # another run merged meanwhile: this copy is surplus
        shutil.rmtree(shards_dir / shard_name(shard), ignore_errors=True)
        remove_if_empty(shards_dir)
    return {**result, "worker_pid": os.getpid()}  # which process did it (distributed runners)


def step_merge_embeddings(store: ArtifactStore, config: StageConfig, data: Artifact, model: ModelRef, after: list | None = None) -> Artifact:
    """Merge the finished shards into the `encode` artifact (encoding any shard still missing).

    `after` (the shard steps' results) only orders this step after them; it is not an input."""
    from retrieval.encode import run_encode

    run_config = encode_run_config(config, data, model)

    def body(out_dir: Path, partial_dir: Path) -> dict[str, Any]:
        return run_encode(run_config, open_dataset(data), out_dir, partial_dir)

    merged = store.build("encode", run_config, encode_inputs(data, model), step_code("encode"), body, key_config=config)
    from retroflow.publish import remove_if_empty

    remove_if_empty(store.partial_dir("encode", merged.key))  # emptied by surplus shard steps of a concurrent run
    return merged


def step_build_index(store: ArtifactStore, config: StageConfig, embeddings: Artifact) -> Artifact:
    from retrieval.index import run_build_index

    def body(out_dir: Path, _partial: Path) -> dict[str, Any]:
        return run_build_index(config, embeddings.path, out_dir)

    return store.build("index", config, {"embeddings": embeddings}, step_code("index"), body)


def step_tune_index(store: ArtifactStore, config: StageConfig, index: Artifact, embeddings: Artifact) -> Artifact:
    """Sweep efSearch / nprobe against exact search; the tuned index keeps the chosen setting."""
    from retrieval.tune import run_tune_index

    def body(out_dir: Path, _partial: Path) -> dict[str, Any]:
        return run_tune_index(config, index.path, embeddings.path, None, out_dir)

    return store.build("tune", config, {"index": index, "embeddings": embeddings}, step_code("tune"), body)


def launch_torchrun(command: str, config: StageConfig, processes: int, out_dir: Path, partial_dir: Path, *extra: str) -> dict[str, Any]:
    """Run a training command under torchrun (one process per GPU; gloo on CPU).

    The run trains into `partial_dir/run` (checkpoints included, so a re-run resumes) and its
    outputs, not its checkpoints, are moved into `out_dir`. Metrics come from the JSON line.
    """
    import subprocess
    import sys

    import yaml

    run_dir = partial_dir / "run"
    config_file = partial_dir / f"{command}.yaml"
    config_file.write_text(yaml.safe_dump(config.canonical(), sort_keys=True))
    resume = ["--resume"] if any(run_dir.glob("*/checkpoint-*")) or any(run_dir.glob("checkpoints/*")) else []
    cli = [sys.executable, "-m", "torch.distributed.run", *single_node_rendezvous(), f"--nproc_per_node={processes}",
           "-m", "flows.cli", command, "--config", str(config_file), "--output", str(run_dir), *resume, *extra]  # fmt: skip
    log.info("launching %s", " ".join(cli))
    finished = subprocess.run(cli, stdout=subprocess.PIPE, text=True, check=False, env=loopback_environment())
    if finished.returncode != 0:
        raise RuntimeError(f"torchrun {command} failed with exit code {finished.returncode}")
    metrics = json.loads(finished.stdout.strip().splitlines()[-1])
    for item in run_dir.iterdir():
        if item.name not in ("checkpoints", "partial"):
            shutil.move(str(item), out_dir / item.name)
    return metrics


def single_node_rendezvous() -> list[str]:
    """torchrun's standalone rendezvous, addressed at the loopback interface and a free port.
    (torch's TCPStore still listens on every interface: it has no bind-address option; the port is
    random and open only while the run lasts. docs/reliability.md says so.)"""
    import uuid

    return ["--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4().hex}"]


def loopback_environment() -> dict[str, str]:
    """The training processes' collective back-ends (gloo, NCCL) talk over loopback: one machine
    needs no other interface, and nothing outside it should reach their sockets."""
    env = dict(os.environ)
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    return env


def model_label(model: ModelRef) -> str:
    return model.name if isinstance(model, ExternalInput) else f"{model.stage}/{model.key}"


def read_evaluation(art: Artifact) -> dict[str, Any]:
    return json.loads(art.file("result.json").read_text())


# ---------------------------------------------------------------------------------------
# The chain, written once for the plain runner and the Prefect flow
# ---------------------------------------------------------------------------------------

STEP_CODE = {
    "data": ("retroflow.data.beir", "flows.chain"),
    "tokenizer": ("retromae.data", "retromae.stage", "flows.chain"),
    "pretrain": ("retromae", "retroflow.checkpoints", "flows.chain"),
    "negatives": ("retrieval", "flows.chain"),
    "teacher": ("retrieval", "flows.chain"),  # its loop is its own (retrieval.teacher)
    "finetune": ("retrieval", "retroflow.checkpoints", "flows.chain"),
    "encode-shard": ("retrieval", "flows.chain"),
    "encode": ("retrieval", "flows.chain"),
    "index": ("retrieval", "flows.chain"),
    "tune": ("retrieval", "flows.chain"),
    "evaluate": ("eval", "retrieval", "flows.chain"),
    "pretraining-corpus": ("retromae.data", "flows.ablation"),
    "scratch-init": ("retromae", "flows.chain", "flows.ablation"),
}


def step_code(step: str) -> str:
    """The code version in a step's cache key: the source of the packages it runs."""
    return code_version(*STEP_CODE[step])


def direct(step: str, fn, *args):
    return fn(*args)


def direct_map(step: str, fn, calls: list[tuple]) -> list:
    return [fn(*args) for args in calls]


@dataclass
class PipelineResult:
    model: ModelRef
    evaluations: dict[str, Artifact]
    artifacts: dict[str, Any]
    shard_results: list[dict[str, Any]] = field(default_factory=list)
    # per dataset: the reference systems evaluated beside the model ("hybrid", "init", "hybrid(init)", "bm25")
    references: dict[str, dict[str, Artifact]] = field(default_factory=dict)


def eval_config(pipeline: PipelineConfig) -> StageConfig:
    from eval.evaluate import EvaluateConfig

    section = {"split": pipeline.eval_split, **pipeline.evaluate}
    return validate_config(EvaluateConfig, section, source=f"pipeline '{pipeline.name}', section 'evaluate'")


def run_pipeline(pipeline: PipelineConfig, execute=direct, execute_map=direct_map) -> PipelineResult:
    """Run every switched-on stage in order. `execute(step, fn, *args)` runs one step and
    `execute_map(step, fn, [args, ...])` many independent ones (directly, or as cached
    Prefect tasks that a distributed task runner may spread over machines)."""
    apply_data_dir(pipeline)
    store = store_for(pipeline)
    produced: dict[str, Any] = {}
    train_data = execute("data", step_prepare_data, store, pipeline.train_dataset)
    produced["data:" + pipeline.train_dataset] = train_data
    init_model: ModelRef = external_model(pipeline.model)
    model: ModelRef = init_model
    if pipeline.stages.pretrain:
        from retromae.config import PretrainConfig

        from retromae.stage import needs_tokenizer

        config = stage_config(PretrainConfig, pipeline, "pretrain", **pretrain_init(pipeline))
        tokenizer = None
        if needs_tokenizer(config):
            tokenizer = execute("tokenizer", step_tokenizer, store, config, train_data)
            produced["tokenizer"] = tokenizer
        model = execute("pretrain", step_pretrain, store, config, train_data, pipeline.train_processes, tokenizer)
        produced["pretrain"] = model
    if pipeline.stages.finetune:
        model = run_finetuning(pipeline, store, execute, execute_map, train_data, model, init_model, produced)
    evaluations, references = {}, {}
    evaluate_config = eval_config(pipeline)
    for source in pipeline.eval_datasets:
        data = train_data if source == pipeline.train_dataset else execute("data", step_prepare_data, store, source)
        produced[f"data:{source}"] = data
        index = build_search_index(pipeline, store, execute, execute_map, data, model, produced, source) if pipeline.stages.index else None
        evaluations[source] = execute("evaluate", step_evaluate, store, evaluate_config, model, data, index)
        references[source] = evaluate_references(pipeline, store, execute, execute_map, evaluate_config, data, model, index, init_model, produced, source)
    produced.update({f"evaluate:{k}": v for k, v in evaluations.items()})
    shard_results = produced.pop("_shards", [])
    return PipelineResult(model=model, evaluations=evaluations, artifacts=produced, shard_results=shard_results, references=references)


def evaluate_references(pipeline: PipelineConfig, store: ArtifactStore, execute, execute_map, config: StageConfig, data: Artifact,
                        model: ModelRef, index: Artifact | None, init_model: ModelRef, produced: dict[str, Any], source: str) -> dict[str, Artifact]:  # fmt: skip
    """The systems the produced model is compared with on `data`: hybrid(model), the init model,
    hybrid(init) and BM25. Keyed by content like every step, so each is computed once per dataset."""
    switches, out = pipeline.references, {}
    if switches.hybrid:
        out["hybrid"] = execute("evaluate", step_evaluate, store, config, model, data, index, "hybrid")
    if switches.init and model is not init_model:
        init_vectors = encode_corpus(pipeline, store, execute, execute_map, data, init_model, produced, f"init:{source}")
        out["init"] = execute("evaluate", step_evaluate, store, config, init_model, data, None, "dense", init_vectors)
        if switches.hybrid:
            out["hybrid(init)"] = execute("evaluate", step_evaluate, store, config, init_model, data, None, "hybrid", init_vectors)
    if switches.bm25:
        out["bm25"] = execute("evaluate", step_evaluate, store, config, None, data, None, "bm25")
    produced.update({f"evaluate-{name}:{source}": art for name, art in out.items()})
    return out


def encode_corpus(pipeline: PipelineConfig, store: ArtifactStore, execute, execute_map, data: Artifact, model: ModelRef,
                  produced: dict[str, Any], label: str) -> Artifact:  # fmt: skip
    """Sharded encoding (one step per shard) -> merged `encode` artifact (once per run and label)."""
    from retrieval.encode import EncodeConfig

    if f"encode:{label}" in produced:  # e.g. the init model's encoding, made for the fusion teacher
        return produced[f"encode:{label}"]

    encode_config = stage_config(EncodeConfig, pipeline, "encode", model="<input:model>", dataset="<input:data>")
    calls = [(store, encode_config, data, model, shard) for shard in range(encode_shard_count(encode_config, data))]
    shards = execute_map("encode-shard", step_encode_shard, calls)
    produced.setdefault("_shards", []).extend(shards)
    embeddings = execute("encode", step_merge_embeddings, store, encode_config, data, model, shards)
    produced[f"encode:{label}"] = embeddings
    return embeddings


def build_search_index(pipeline: PipelineConfig, store: ArtifactStore, execute, execute_map, data: Artifact, model: ModelRef, produced: dict[str, Any], source: str) -> Artifact:
    """Sharded encoding (one step per shard) -> merged embeddings -> FAISS index (-> tuned)."""
    from retrieval.tune import TuneConfig
    from retrieval.index import IndexConfig

    embeddings = encode_corpus(pipeline, store, execute, execute_map, data, model, produced, source)
    index = execute("index", step_build_index, store, stage_config(IndexConfig, pipeline, "index"), embeddings)
    produced[f"index:{source}"] = index
    if pipeline.stages.tune:
        index = execute("tune", step_tune_index, store, stage_config(TuneConfig, pipeline, "tune"), index, embeddings)
        produced[f"tune:{source}"] = index
    return index


def run_finetuning(pipeline: PipelineConfig, store: ArtifactStore, execute, execute_map, data: Artifact, model: ModelRef,
                   init_model: ModelRef, produced: dict[str, Any]) -> ModelRef:  # fmt: skip
    """Negatives -> (teacher) -> DPR fine-tuning, each a step; returns the fine-tuned model."""
    from retrieval.finetune import FinetuneConfig
    from retrieval.negatives import NegativesConfig
    from retrieval.teacher import TeacherConfig

    placeholders = {"dataset": "<input:data>", "split": pipeline.train_split}
    negatives = teacher = None
    if pipeline.stages.negatives:
        config = stage_config(NegativesConfig, pipeline, "negatives", **placeholders, model=None)
        negatives = execute("negatives", step_mine_negatives, store, config, data, model)
        produced["negatives"] = negatives
    if pipeline.stages.teacher:
        config = stage_config(TeacherConfig, pipeline, "teacher", **placeholders, init="<input:init>")
        if negatives is None and config.kind == "cross_encoder":
            raise ConfigError(f"pipeline '{pipeline.name}': the cross-encoder teacher needs stages.negatives on")
        named = pipeline.teacher.get("init")
        init = external_model(named) if named else init_model
        # the fusion teacher's dense side is the init model: its corpus encoding is the one the init reference uses
        vectors = encode_corpus(pipeline, store, execute, execute_map, data, init, produced, f"init:{pipeline.train_dataset}") if config.kind == "fusion" else None
        teacher = execute("teacher", step_train_teacher, store, config, data, negatives, init, vectors)
        produced["teacher"] = teacher
    config = stage_config(FinetuneConfig, pipeline, "finetune", dataset="<input:data>", init="<input:model>")
    finetuned = execute("finetune", step_finetune, store, config, data, model, negatives, teacher, pipeline.train_processes)
    produced["finetune"] = finetuned
    return finetuned


def pretrain_init(pipeline: PipelineConfig) -> dict[str, Any]:
    """Continued pretraining starts from the pipeline's model unless the section says otherwise."""
    section = pipeline.pretrain.get("model", {})
    if "init" in section:  # set explicitly, null included (= from scratch)
        return {}
    return {"model": {**section, "init": pipeline.model}}


def config_digest(pipeline: PipelineConfig) -> str:
    return hash_json(pipeline.canonical())[:12]


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def export_model(pipeline: PipelineConfig, result: PipelineResult, rows: list[dict[str, Any]]) -> Path | None:
    """Copy (hard-link) the produced model to `runs/<name>/model/` with a model card that holds
    the evaluation table and the lineage; the artifact itself stays untouched (content-addressed)."""
    from retroflow.artifacts import key_lock
    from retroflow.publish import publishing

    if isinstance(result.model, ExternalInput):
        return None
    source = model_dir(result.model)
    dest = store_for(pipeline).root / "runs" / pipeline.name / "model"
    # Runs of one pipeline name may finish together: each builds its own copy, and the swap is locked.
    dest.parent.mkdir(parents=True, exist_ok=True)
    with key_lock(dest.parent / ".model.lock"), publishing(dest, replace=True) as tmp:
        fill_export(pipeline, result, rows, source, tmp)
    return dest


def fill_export(pipeline: PipelineConfig, result: PipelineResult, rows: list[dict[str, Any]], source: Path, tmp: Path) -> None:
    from retroflow.artifacts import lineage
    from retroflow.model_card import CARD_TRAINING_KEYS, card_from_model_dir, write_model_card

    tmp.rmdir()
    shutil.copytree(source, tmp, copy_function=_link_or_copy)
    (tmp / "README.md").unlink(missing_ok=True)  # a hard link to the artifact's own card: never write through it
    chain = lineage(result.model)
    made_by = {step["stage"] for step in chain}
    configs = {stage: getattr(pipeline, stage) for stage in ("pretrain", "teacher", "finetune") if stage in made_by}
    card = card_from_model_dir(
        tmp, name=f"retroflow {pipeline.name}: {pipeline.model} trained on {pipeline.train_dataset}", base_model=pipeline.model,
        datasets=[pipeline.train_dataset], configs=configs, evaluation=rows,
        training={k: result.model.metrics[k] for k in CARD_TRAINING_KEYS if result.model.metrics.get(k) is not None},
        lineage=[{"stage": s["stage"], "key": s["key"], "path": s["path"]} for s in chain],
    )  # fmt: skip
    write_model_card(tmp, card)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------
# Run history: every pipeline evaluation goes into the run registry (eval.registry)
# ---------------------------------------------------------------------------------------


def pipeline_model_label(pipeline: PipelineConfig) -> str:
    return f"pipeline:{pipeline.name}"


def evaluation_run_id(pipeline: PipelineConfig, art: Artifact) -> str:
    """Same evaluation artifact, same run id: a cached re-run does not add a duplicate."""
    return f"{pipeline.name}-{art.key}"


def record_evaluations(pipeline: PipelineConfig, arts: Mapping[str, Artifact], results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    from eval.registry import RegistryError, append_run, load_registry

    registry = load_registry()
    known = set(registry["run_id"]) if not registry.empty else set()
    added = []
    for source, art in arts.items():
        run_id = evaluation_run_id(pipeline, art)
        if run_id in known:
            continue
        result = results[source]
        try:
            append_run(
                None,
                result,
                run_id=run_id,
                config_hash=config_digest(pipeline),
                code_version=art.manifest["code_version"],
                model=pipeline_model_label(pipeline),
                index=(art.manifest["inputs"].get("index") or {}).get("path"),
                dataset=result["dataset"],
                split=result["split"],
            )
        except RegistryError:
            if run_id in set(load_registry()["run_id"]):
                continue  # an identical run finishing at the same moment recorded this evaluation first
            raise
        added.append(run_id)
    return added


def previous_records(pipeline: PipelineConfig, arts: Mapping[str, Artifact], results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The registry's previous run of this pipeline on each dataset (None when there is none)."""
    from eval.registry import load_registry, previous_run

    registry = load_registry()
    out = {}
    for source, art in arts.items():
        run_id = evaluation_run_id(pipeline, art)
        known = not registry.empty and run_id in set(registry["run_id"])
        out[source] = previous_run(
            registry, pipeline_model_label(pipeline), results[source]["dataset"], results[source]["split"],
            before_run_id=run_id if known else None,
        )  # fmt: skip
    return out


def regressions(pipeline: PipelineConfig, results: Mapping[str, Mapping[str, Any]], previous: Mapping[str, Any]) -> list[str]:
    """Metric drops beyond the threshold that a paired test over queries finds significant."""
    from eval.compare import compare_runs, find_regressions

    found = []
    for source, before in previous.items():
        if before is None:
            continue
        comparison = compare_runs(before.per_query, results[source]["per_query"])
        for metric in find_regressions(comparison, threshold=pipeline.regression_threshold):
            found.append(
                f"{source}: {metric.metric} {metric.mean_a:.4f} -> {metric.mean_b:.4f} "
                f"(Δ {metric.delta:+.4f}, p={metric.p_randomization:.3g}, run {before.run_id})"
            )
    return found
