"""The pretrain-to-BEIR pipeline as plain Python: the chain of stages, written once.

Each step is `flows.stages.build` of a stage (config + upstream artifacts -> a finished,
content-addressed `Artifact`), or one shard of the encoding. `retroflow pipeline` runs the steps
directly; the Prefect flow passes an `execute` that wraps each in a cached task.

Stage configs inside the pipeline YAML are kept as plain mappings and validated through each
stage's own config class when the pipeline loads (`section_config`), so an error names
`<file>: <stage>.<field>` before anything runs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from flows.stages import STAGES, artifact_key, build
from retroflow.artifacts import Artifact, ArtifactStore
from retroflow.config import ConfigError, StageConfig, check_path_component, child_dir, load_config, validate_config
from retroflow.data import data_config
from retroflow.hashing import hash_json
from retroflow.inputs import ExternalInput, Input, external_model, model_dir
from retroflow.publish import atomic_write_text

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


# Below this many documents exact search is at least as fast as HNSW32 at efSearch 64, batched and
# single-threaded at 384 dimensions (docs/indexing.md "Exact or approximate"): an index there costs
# quality and buys no speed.
EXACT_BELOW_DOCS = 20_000


class PipelineConfig(StageConfig):
    name: str = "quickstart"
    store: str = Field(
        "artifacts", description="artifact store: a directory or an fsspec URL such as s3://bucket/prefix (RETROFLOW_STORE overrides)"
    )
    data_dir: str | None = Field(None, description="where bare dataset names are found (else RETROFLOW_DATA_DIR)")
    model: str = "minilm"
    teacher_model: str | None = Field(None, description="the teacher's model (an alias or directory); default: `model`")
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
    seed: int | None = Field(None, description="given once: the seed of every training stage (pretrain.train, teacher, finetune.train)")
    dev_fraction: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="given once: the training queries every dev choice holds out "
        "(finetune.data, teacher, evaluate.fusion), so none of them sees queries the model trains on",
    )
    dev_seed: int | None = Field(None, description="given once: which queries dev_fraction draws")
    regression_threshold: float = Field(0.01, ge=0, description="flag metric drops larger than this vs the previous run")
    train_processes: int = Field(1, ge=1, description="processes (GPUs) per training stage; more than 1 launches torchrun")
    exact_below_docs: int = Field(
        EXACT_BELOW_DOCS,
        ge=0,
        description="a corpus with fewer documents is searched exactly (Flat) even "
        "when an index is built and tuned (their cost is still reported); 0 = always through the index",
    )
    verify: bool = Field(
        False,
        description="re-hash every file of each stored artifact the run reuses (the default check re-hashes "
        "only files whose size or modification time changed)",
    )

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        return check_path_component(name)

    def canonical(self) -> dict[str, Any]:
        # How hard reused artifacts are checked changes nothing a run computes: the config hash in
        # the registry and the report stay those of the same pipeline without it.
        return {k: v for k, v in super().canonical().items() if k != "verify"}


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
    """Each stage section through its own config class (flows.stages), with the values the pipeline gives once."""
    configs = {section: section_config(pipeline, section) for section in SECTIONS}
    check_dev_hold_outs(pipeline, configs["teacher"], configs["finetune"], configs["evaluate"])
    check_tune_hold_out(pipeline, configs["tune"], configs["finetune"])


def check_dev_hold_outs(pipeline: PipelineConfig, teacher: StageConfig, finetune: StageConfig, evaluate: StageConfig) -> None:
    """Every choice a run makes on dev (the teacher's check and the distillation gate, the hybrid's
    weight) must use the training queries fine-tuning holds out; any other draw includes queries
    the model was trained on, and the choice then flatters it."""
    if not pipeline.stages.finetune:
        return
    held_out = (finetune.data.dev_fraction, finetune.data.dev_seed)
    if pipeline.stages.teacher and teacher.dev_fraction and (teacher.dev_fraction, teacher.dev_seed) != held_out:
        raise ConfigError(
            f"teacher.dev_fraction/dev_seed {(teacher.dev_fraction, teacher.dev_seed)} differ from finetune.data's {held_out}: "
            "the teacher would be checked on queries the student trains on"
        )
    fusion = evaluate.fusion
    chooses_on_train = fusion.method == "minmax" and fusion.weight is None and fusion.dev_split == pipeline.train_split
    if (
        pipeline.references.hybrid
        and pipeline.train_dataset in pipeline.eval_datasets
        and chooses_on_train
        and (fusion.dev_fraction, fusion.dev_seed) != held_out
    ):
        raise ConfigError(
            f"evaluate.fusion.dev_fraction/dev_seed {(fusion.dev_fraction, fusion.dev_seed)} differ from finetune.data's {held_out}: "
            f"the hybrid's weight would be chosen on {pipeline.train_dataset} queries the model trains on "
            "(hold out the same dev queries in both, or set evaluate.fusion.weight)"
        )


SECTIONS = ("pretrain", "negatives", "teacher", "finetune", "encode", "index", "tune", "evaluate")
# Values a pipeline gives once, and where in each section they go.
SHARED_VALUES = {
    "seed": {"pretrain": ("train", "seed"), "teacher": ("seed",), "finetune": ("train", "seed")},
    "dev_fraction": {
        "teacher": ("dev_fraction",),
        "finetune": ("data", "dev_fraction"),
        "evaluate": ("fusion", "dev_fraction"),
        "tune": ("dev_fraction",),
    },
    "dev_seed": {"teacher": ("dev_seed",), "finetune": ("data", "dev_seed"), "evaluate": ("fusion", "dev_seed"), "tune": ("dev_seed",)},
}


def tune_defaults(pipeline: PipelineConfig) -> dict[str, Any]:
    """What the tune section takes from the pipeline unless it says otherwise: fine-tuning's dev
    hold-out of the training split, encoded as the evaluation encodes its queries."""
    defaults: dict[str, Any] = {"dev_split": pipeline.train_split}
    held_out = pipeline.finetune.get("data", {}) if pipeline.stages.finetune else {}
    defaults.update({k: held_out[k] for k in ("dev_fraction", "dev_seed") if k in held_out})
    if "encoder" in pipeline.evaluate:
        defaults["encoder"] = pipeline.evaluate["encoder"]
    return defaults


def check_tune_hold_out(pipeline: PipelineConfig, tune: StageConfig, finetune: StageConfig) -> None:
    """The tuner's nDCG rule is measured on dev queries: never the evaluated ones, never trained-on ones."""
    if not (pipeline.stages.index and pipeline.stages.tune and tune.dev_fraction):
        return
    if tune.dev_split == pipeline.eval_split:
        raise ConfigError(f"tune.dev_split is '{tune.dev_split}', the evaluated split: the index would be tuned on the test queries")
    held_out = (finetune.data.dev_fraction, finetune.data.dev_seed)
    if pipeline.stages.finetune and tune.dev_split == finetune.data.split and (tune.dev_fraction, tune.dev_seed) != held_out:
        raise ConfigError(
            f"tune.dev_fraction/dev_seed {(tune.dev_fraction, tune.dev_seed)} differ from finetune.data's {held_out}: "
            "the index would be tuned on queries the model trains on"
        )


def with_shared_values(pipeline: PipelineConfig, section: str, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a section) with the pipeline-level values placed where the section keeps them;
    the same value set in both places differently is an error (which one would win?)."""
    data = copy.deepcopy(data)  # the pipeline's own mapping stays as written
    for name, places in SHARED_VALUES.items():
        value, path = getattr(pipeline, name), places.get(section)
        if value is None or path is None:
            continue
        *parents, leaf = path
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if leaf in node and node[leaf] != value:
            dotted = ".".join((section, *path))
            raise ConfigError(f"pipeline '{pipeline.name}': {name} is {value} but {dotted} is {node[leaf]}; give it once")
        node[leaf] = value
    return data


def section_config(pipeline: PipelineConfig, section: str) -> StageConfig:
    """A pipeline section as its stage's config class, with the values the pipeline sets once
    (the training split, the evaluation split, the model pretraining continues from)."""
    shared: dict[str, Any] = {
        "pretrain": pretrain_init(pipeline),
        "negatives": {"split": pipeline.train_split},
        "teacher": {"split": pipeline.train_split},
        "evaluate": {"split": pipeline.eval_split},
        "tune": tune_defaults(pipeline),
    }.get(section, {})
    data = {**shared, **getattr(pipeline, section)} if section in ("evaluate", "tune") else {**getattr(pipeline, section), **shared}
    data = with_shared_values(pipeline, section, data)
    return validate_config(STAGES[section].config_type(), data, source=f"pipeline '{pipeline.name}', section '{section}'")


def store_for(pipeline: PipelineConfig) -> ArtifactStore:
    """The store of a pipeline (or any config with a `store` field, e.g. an ablation)."""
    return ArtifactStore(os.environ.get("RETROFLOW_STORE") or pipeline.store, full_verify=getattr(pipeline, "verify", False))


def data_root(config: PipelineConfig) -> Path | None:
    """Where a config's bare dataset names are found: its `data_dir`, else RETROFLOW_DATA_DIR."""
    root = config.data_dir or os.environ.get("RETROFLOW_DATA_DIR")
    return Path(root).expanduser().resolve() if root else None


def dataset_source(name: str, data_dir: str | None) -> str:
    """`name` as the data stage reads it: a bare name with a folder under `data_dir` becomes that
    folder's path (passed on, never put in the environment: a step may run in another process);
    anything else as given (a path, a name under RETROFLOW_DATA_DIR, a BEIR name to download)."""
    if data_dir and "/" not in name and "\\" not in name:
        folder = Path(data_dir).expanduser().resolve() / name
        if folder.is_dir():
            return str(folder)
    return name


# ---------------------------------------------------------------------------------------
# Steps: each is `build` of a stage (flows.stages), or a part of one (an encoding shard)
# ---------------------------------------------------------------------------------------


def prepare_data(store: ArtifactStore, source: str, data_dir: str | None = None) -> Artifact:
    """The `data` artifact of `source`, a bare name looked up under `data_dir` first (reading its
    content first: the content is the key, not where it was found)."""
    return build(store, "data", data_config(dataset_source(source, data_dir)), {})


def evaluation(
    config: StageConfig,
    system: str,
    data: Artifact,
    model: Input | None = None,
    index: Artifact | None = None,
    embeddings: Artifact | None = None,
) -> tuple[StageConfig, dict[str, Input | None]]:
    """The `evaluate` stage's (config, inputs) for one system ("dense", "hybrid" or "bm25") on `data`."""
    inputs = {"data": data, "model": None if system == "bm25" else model, "index": index, "embeddings": embeddings}
    return config.with_overrides(system=system), inputs


def encode_shard_count(config: StageConfig, data: Artifact) -> int:
    from retrieval.serving.encode import plan_shards

    return len(plan_shards(data.manifest["metrics"]["num_docs"], config.shard_size))


def encode_shard(store: ArtifactStore, config: StageConfig, inputs: Mapping[str, Input], shard: int) -> dict[str, Any]:
    """One shard of the `encode` stage into its partial directory (atomic; a finished shard is
    skipped). One task per shard, which a distributed task runner may spread over machines.
    Shards of concurrent runs share the directory; a run's merge waits for them (and they for
    it), so publishing the artifact never deletes a shard being written."""
    from retrieval.serving.encode import run_shard

    key = artifact_key("encode", config, inputs)
    if store.lookup("encode", key) is not None:  # merged already (a re-run of the chain): nothing to encode
        return {"shard": shard, "cached": True, "worker_pid": os.getpid()}
    with store.contributing("encode", key) as shards_dir:
        if store.lookup("encode", key) is not None:  # another run merged while we waited
            return {"shard": shard, "cached": True, "worker_pid": os.getpid()}
        shards_dir.mkdir(parents=True, exist_ok=True)
        result = run_shard(config, inputs, shard, shards_dir)
    return {**result, "worker_pid": os.getpid()}  # which process did it (distributed runners)


def merge_encoding(store: ArtifactStore, config: StageConfig, inputs: Mapping[str, Input], after: list | None = None) -> Artifact:
    """The `encode` artifact from the finished shards (encoding any shard still missing).
    `after` (the shard steps' results) only orders this step after them; it is not an input."""
    return build(store, "encode", config, inputs)


def read_evaluation(art: Artifact) -> dict[str, Any]:
    return json.loads(art.file("result.json").read_text())


def direct(step: str, fn, *args):
    return fn(*args)


def direct_map(step: str, fn, calls: list[tuple]) -> list:
    return [fn(*args) for args in calls]


@dataclass
class PipelineResult:
    model: Input
    evaluations: dict[str, Artifact]
    artifacts: dict[str, Any]
    shard_results: list[dict[str, Any]] = field(default_factory=list)
    # per dataset: the reference systems evaluated beside the model ("hybrid", "init", "hybrid(init)", "bm25")
    references: dict[str, dict[str, Artifact]] = field(default_factory=dict)


@dataclass
class ChainRun:
    """One run of a pipeline while it runs: its config and store, how it executes steps, the model
    it started from, and what it has produced so far (so a step shared by two parts runs once)."""

    pipeline: PipelineConfig
    store: ArtifactStore
    execute: Callable
    execute_map: Callable
    init_model: Input
    produced: dict[str, Any] = field(default_factory=dict)

    def build(self, step: str, config: StageConfig, inputs: Mapping[str, Input], *extra) -> Artifact:
        """`step` as one executed step: the stage's `build` of `config` over `inputs`."""
        return self.execute(step, build, self.store, step, config, inputs, *extra)

    def evaluate(self, config: StageConfig, system: str, data: Artifact, *searched: Input | None) -> Artifact:
        """One executed `evaluate` step; `searched` is `evaluation`'s (model, index, embeddings)."""
        return self.execute("evaluate", build, self.store, "evaluate", *evaluation(config, system, data, *searched))


def run_pipeline(pipeline: PipelineConfig, execute=direct, execute_map=direct_map) -> PipelineResult:
    """Run every switched-on stage in order. `execute(step, fn, *args)` runs one step and
    `execute_map(step, fn, [args, ...])` many independent ones (directly, or as cached
    Prefect tasks that a distributed task runner may spread over machines)."""
    run = ChainRun(pipeline, store_for(pipeline), execute, execute_map, external_model(pipeline.model))
    produced = run.produced
    train_data = execute("data", prepare_data, run.store, pipeline.train_dataset, pipeline.data_dir)
    produced["data:" + pipeline.train_dataset] = train_data
    model: Input = run.init_model
    if pipeline.stages.pretrain:
        from retromae.pretrain import needs_tokenizer, tokenizer_config

        config = section_config(pipeline, "pretrain")
        tokenizer = None
        if needs_tokenizer(config):
            tokenizer = run.build("tokenizer", tokenizer_config(config), {"data": train_data})
            produced["tokenizer"] = tokenizer
        model = run.build("pretrain", config, {"data": train_data, "tokenizer": tokenizer}, pipeline.train_processes)
        produced["pretrain"] = model
    if pipeline.stages.finetune:
        model = run_finetuning(run, train_data, model)
    evaluations, references = {}, {}
    evaluate_config = section_config(pipeline, "evaluate")
    for source in pipeline.eval_datasets:
        data = train_data if source == pipeline.train_dataset else execute("data", prepare_data, run.store, source, pipeline.data_dir)
        produced[f"data:{source}"] = data
        index = build_search_index(run, data, model, source) if pipeline.stages.index else None
        index = searched_index(pipeline, data, index)
        evaluations[source] = run.evaluate(evaluate_config, "dense", data, model, index, produced.get(f"encode:{source}"))
        references[source] = evaluate_references(run, evaluate_config, data, model, index, source)
    produced.update({f"evaluate:{k}": v for k, v in evaluations.items()})
    shard_results = produced.pop("_shards", [])
    return PipelineResult(model=model, evaluations=evaluations, artifacts=produced, shard_results=shard_results, references=references)


def evaluate_references(
    run: ChainRun, config: StageConfig, data: Artifact, model: Input, index: Artifact | None, source: str
) -> dict[str, Artifact]:
    """The systems the produced model is compared with on `data`: hybrid(model), the init model,
    hybrid(init) and BM25. Keyed by content like every step, so each is computed once per dataset."""
    switches, out, init_model = run.pipeline.references, {}, run.init_model
    if switches.hybrid:
        out["hybrid"] = run.evaluate(config, "hybrid", data, model, index, run.produced.get(f"encode:{source}"))
    if switches.init and model is not init_model:
        init_vectors = encode_corpus(run, data, init_model, f"init:{source}")
        out["init"] = run.evaluate(config, "dense", data, init_model, None, init_vectors)
        if switches.hybrid:
            out["hybrid(init)"] = run.evaluate(config, "hybrid", data, init_model, None, init_vectors)
    if switches.bm25:
        out["bm25"] = run.evaluate(config, "bm25", data)
    run.produced.update({f"evaluate-{name}:{source}": art for name, art in out.items()})
    return out


def encode_corpus(run: ChainRun, data: Artifact, model: Input, label: str) -> Artifact:
    """Sharded encoding (one step per shard) -> merged `encode` artifact (once per run and label)."""
    if f"encode:{label}" in run.produced:  # e.g. the init model's encoding, made for the fusion teacher
        return run.produced[f"encode:{label}"]
    config, inputs = section_config(run.pipeline, "encode"), {"data": data, "model": model}
    calls = [(run.store, config, inputs, shard) for shard in range(encode_shard_count(config, data))]
    shards = run.execute_map("encode-shard", encode_shard, calls)
    run.produced.setdefault("_shards", []).extend(shards)
    embeddings = run.execute("encode", merge_encoding, run.store, config, inputs, shards)
    run.produced[f"encode:{label}"] = embeddings
    return embeddings


def build_search_index(run: ChainRun, data: Artifact, model: Input, source: str) -> Artifact:
    """Sharded encoding (one step per shard) -> merged embeddings -> FAISS index (-> tuned)."""
    embeddings = encode_corpus(run, data, model, source)
    index = run.build("index", section_config(run.pipeline, "index"), {"embeddings": embeddings})
    run.produced[f"index:{source}"] = index
    if run.pipeline.stages.tune:
        inputs = {"index": index, "embeddings": embeddings, "data": data, "model": model}
        index = run.build("tune", section_config(run.pipeline, "tune"), inputs)
        run.produced[f"tune:{source}"] = index
    return index


def searched_index(pipeline: PipelineConfig, data: Artifact, index: Artifact | None) -> Artifact | None:
    """The index the model is evaluated through: None (exact search over its encoding) for a corpus
    below `exact_below_docs`, where exact search is as fast and loses nothing."""
    if index is not None and data.manifest["metrics"]["num_docs"] < pipeline.exact_below_docs:
        return None
    return index


def run_finetuning(run: ChainRun, data: Artifact, model: Input) -> Input:
    """Negatives -> (teacher) -> DPR fine-tuning, each a step; returns the fine-tuned model."""
    pipeline, negatives, teacher = run.pipeline, None, None
    if pipeline.stages.negatives:
        config = section_config(pipeline, "negatives")
        negatives = run.build("negatives", config, {"data": data, "model": model if config.method == "dense" else None})
        run.produced["negatives"] = negatives
    if pipeline.stages.teacher:
        config = section_config(pipeline, "teacher")
        if negatives is None and config.kind == "cross_encoder":
            raise ConfigError(f"pipeline '{pipeline.name}': the cross-encoder teacher needs stages.negatives on")
        init = external_model(pipeline.teacher_model) if pipeline.teacher_model else run.init_model
        inputs = {"data": data, "init": init}
        if config.kind == "fusion":  # its dense side: by default the init model, whose encoding the init reference reuses
            label = "init" if init is run.init_model else "teacher"  # another model's vectors are never the init row's
            inputs["embeddings"] = encode_corpus(run, data, init, f"{label}:{pipeline.train_dataset}")
        else:
            inputs["negatives"] = negatives
        teacher = run.build("teacher", config, inputs)
        run.produced["teacher"] = teacher
    # after a pretrain stage, the model it started from is the pretrain gate's rival
    rival = run.init_model if model is not run.init_model else None
    inputs = {"data": data, "model": model, "negatives": negatives, "teacher": teacher, "init": rival}
    finetuned = run.build("finetune", section_config(pipeline, "finetune"), inputs, pipeline.train_processes)
    run.produced["finetune"] = finetuned
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


def run_dir(root: Path, name: str) -> Path:
    """`<root>/runs/<name>`: what a run writes (report, latest.json) and replaces (the exported
    model), checked to be a folder directly inside `<root>/runs/` however the name arrived."""
    return child_dir(Path(root) / "runs", name, "pipeline name")


def export_model(pipeline: PipelineConfig, result: PipelineResult, rows: list[dict[str, Any]]) -> Path | None:
    """Copy (hard-link) the produced model to `runs/<name>/model/` with a model card that holds
    the evaluation table and the lineage; the artifact itself stays untouched (content-addressed)."""
    from retroflow.artifacts import key_lock
    from retroflow.publish import publishing

    if isinstance(result.model, ExternalInput):
        return None
    source = model_dir(result.model)
    dest = run_dir(store_for(pipeline).root, pipeline.name) / "model"
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
        tmp,
        name=f"retroflow {pipeline.name}: {pipeline.model} trained on {pipeline.train_dataset}",
        base_model=pipeline.model,
        datasets=[pipeline.train_dataset],
        configs=configs,
        evaluation=rows,
        training={k: result.model.metrics[k] for k in CARD_TRAINING_KEYS if result.model.metrics.get(k) is not None},
        lineage=[{"stage": s["stage"], "key": s["key"], "path": s["path"]} for s in chain],
    )
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
            registry,
            pipeline_model_label(pipeline),
            results[source]["dataset"],
            results[source]["split"],
            before_run_id=run_id if known else None,
        )
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
