"""The RetroMAE paper's claim in miniature: pretraining arms from scratch on one budget, then
fine-tuned and evaluated identically, over seeds.

    run_ablation(config, execute, execute_map) -> AblationResult     # every step cached

The table (arm x dataset x metric, mean ± std over seeds, paired test against the baseline) and
the report are `flows.ablation_report`'s.

An arm is a pretraining objective (`mlm`, `retromae-basic`, `retromae-enhanced`; `none` = the
random initialisation, no pretraining) or a sweep point of one (`retromae-enhanced@decoder_mask_ratio=0.7`).
Every arm of a seed shares the tokenizer, the architecture, the initial weights, the data order,
the steps and the batch: their pretraining configs differ only in the objective's switches
(`arm_pretrain_configs`). Fine-tuning (DPR with BM25 hard negatives) and evaluation settings are
the same for every arm and fixed in advance. Each pretrained encoder is also scored zero-shot
([CLS] pooling, no fine-tuning), the early signal the paper's analysis relies on.

Steps go through `execute` like the pretrain-to-beir chain (`flows.chain`), so the plain
runner (`retroflow ablation`) and the Prefect flow (`retromae-ablation`) share artifacts, an
interrupted study resumes, and adding a seed or an arm reuses everything already finished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from flows.chain import data_root, direct, direct_map, evaluation, prepare_data, store_for
from flows.stages import build
from retroflow.artifacts import Artifact, ArtifactStore
from retroflow.config import ConfigError, StageConfig, check_path_component, child_dir, load_config, validate_config
from retroflow.hashing import sha256_file
from retroflow.inputs import Input

log = logging.getLogger(__name__)

# The objective switches of each arm; everything else of the pretraining config is shared.
# The decoder mask ratio is part of the objective: the paper's best is ~0.5 with enhanced decoding
# and ~0.7 with basic decoding (the encoder's 0.3 is shared by every arm, MLM included).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "mlm": {"objective": "mlm"},
    "retromae-basic": {"objective": "retromae", "decoding": "basic", "decoder_mask_ratio": 0.7},
    "retromae-enhanced": {"objective": "retromae", "decoding": "enhanced", "decoder_mask_ratio": 0.5},
}
NO_PRETRAINING = "none"
SWEEPABLE = {"decoder_layers": int, "encoder_mask_ratio": float, "decoder_mask_ratio": float, "decoder_target_fraction": float}
OBJECTIVE_FIELDS = {"objective", "decoding", "decoder_mask_ratio"}  # set by the arm, never shared
PHASES = ("zero-shot", "fine-tuned")
CORPUS_FILE = "corpus.parquet"


def parse_arm(arm: str) -> tuple[str, dict[str, Any]]:
    """`retromae-enhanced@decoder_mask_ratio=0.7` -> ("retromae-enhanced", {"decoder_mask_ratio": 0.7})."""
    base, _, sweep = arm.partition("@")
    if base != NO_PRETRAINING and base not in OBJECTIVES:
        raise ValueError(f"unknown arm {arm!r} (arms: {', '.join([NO_PRETRAINING, *OBJECTIVES])}, optionally '@field=value')")
    changes: dict[str, Any] = {}
    for part in filter(None, sweep.split(",")):
        name, _, value = part.partition("=")
        if name not in SWEEPABLE:
            raise ValueError(f"arm {arm!r}: {name!r} cannot be swept (one of {', '.join(SWEEPABLE)})")
        changes[name] = SWEEPABLE[name](value)
    if changes and base == NO_PRETRAINING:
        raise ValueError(f"arm {arm!r}: the '{NO_PRETRAINING}' arm has nothing to sweep")
    return base, changes


class SweepSection(StageConfig):
    """Extra arms: each value becomes `<sweep_arm>@<field>=<value>` (e.g. decoder depth, mask ratios)."""

    arm: str = "retromae-enhanced"
    decoder_layers: list[int] = Field(default_factory=list)
    encoder_mask_ratio: list[float] = Field(default_factory=list)
    decoder_mask_ratio: list[float] = Field(default_factory=list)
    decoder_target_fraction: list[float] = Field(default_factory=list, description="enhanced decoding's share of target rows (issue 15)")

    @field_validator("decoder_target_fraction")
    @classmethod
    def _fractions_in_half_open_interval(cls, values: list[float]) -> list[float]:
        for value in values:
            if not 0 < value <= 1:
                raise ValueError(f"target fraction {value} is outside (0, 1]")
        return values

    @field_validator("encoder_mask_ratio", "decoder_mask_ratio")
    @classmethod
    def _ratios_inside_unit_interval(cls, values: list[float]) -> list[float]:
        for value in values:
            if not 0 < value < 1:
                raise ValueError(f"mask ratio {value} is outside (0, 1)")
        return values

    @field_validator("decoder_layers")
    @classmethod
    def _positive_depth(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError(f"decoder depths must be >= 1, got {values}")
        return values

    def arms(self) -> list[str]:
        return [f"{self.arm}@{name}={value}" for name in SWEEPABLE for value in getattr(self, name)]


class PrimaryComparison(StageConfig):
    """A pre-registered comparison: `arm` against `against` on `dataset`'s `metric` (fine-tuned)."""

    arm: str
    against: str
    dataset: str = "scifact"
    metric: str = "ndcg@10"


class AblationConfig(StageConfig):
    name: str = "miniature"
    init: str | None = Field(
        None,
        description="null: every arm from scratch (the paper's setting); a model (e.g. minilm): "
        "continued pretraining of it, the `none` arm being the init itself",
    )
    store: str = Field("artifacts", description="artifact store (RETROFLOW_STORE overrides)")
    data_dir: str | None = Field(None, description="where dataset names are found (else RETROFLOW_DATA_DIR)")
    arms: list[str] = Field(default_factory=lambda: ["mlm", "retromae-basic", "retromae-enhanced"])
    sweep: SweepSection = Field(default_factory=SweepSection)
    seeds: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    baseline: str = Field("mlm", description="the arm every other arm is tested against")
    pretrain_corpora: list[str] | None = Field(
        None, description="datasets whose corpus is pretraining text; null = every dataset in the data root"
    )
    pretrain_files: list[str] = Field(
        default_factory=list, description="extra pretraining text: .txt (a document per line), .jsonl, .parquet"
    )
    train_dataset: str = "scifact"
    train_split: str = "train"
    eval_datasets: list[str] = Field(default_factory=lambda: ["scifact", "trec-dl-2019-subset5k"], min_length=1)
    eval_split: str = "test"
    zero_shot: bool = Field(True, description="also score each pretrained encoder before fine-tuning")
    metrics: list[str] = Field(default_factory=lambda: ["ndcg@10", "recall@100"], min_length=1)
    pretrain: dict[str, Any] = Field(default_factory=dict, description="the shared PretrainConfig (its objective switches are the arm's)")
    negatives: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
    teacher: dict[str, Any] = Field(
        default_factory=dict,
        description="a fusion teacher from the init (continued mode): the finetune section then distils from it, every arm alike",
    )
    encode: dict[str, Any] = Field(default_factory=dict, description="the init model's encoding the fusion teacher reads")
    primary: list[PrimaryComparison] = Field(default_factory=list, description="pre-registered comparisons: Holm-corrected together")
    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise error rate of the primary comparisons")

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        return check_path_component(name)

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: list[str]) -> list[str]:
        for i, arm in enumerate(arms):
            try:
                parse_arm(arm)
            except ValueError as err:
                raise ValueError(f"arms[{i}]: {err}") from None
        if len(set(arms)) != len(arms):
            raise ValueError(f"arms repeat a name: {arms}")
        return arms

    def all_arms(self) -> list[str]:
        return [*self.arms, *(a for a in self.sweep.arms() if a not in self.arms)]


def load_ablation_config(path: str | Path | None, overrides: list[str] | None = None) -> AblationConfig:
    """Load and validate every section now: the shared pretraining, negatives, fine-tuning and
    evaluation configs, and that the baseline is one of the arms."""
    config = load_config(AblationConfig, path, overrides)
    where = path or "<defaults>"
    if config.baseline not in config.all_arms():
        raise ConfigError(f"{where}: baseline {config.baseline!r} is not one of the arms {config.all_arms()}")
    for i, comparison in enumerate(config.primary):
        for name in (comparison.arm, comparison.against):
            if name not in config.all_arms():
                raise ConfigError(f"{where}: primary[{i}]: {name!r} is not one of the arms {config.all_arms()}")
        if comparison.dataset not in config.eval_datasets:
            raise ConfigError(f"{where}: primary[{i}].dataset {comparison.dataset!r} is not one of eval_datasets {config.eval_datasets}")
    if config.teacher and config.init is None:
        raise ConfigError(f"{where}: teacher: a fusion teacher needs init (continued mode)")
    try:
        arm_pretrain_configs(config, config.seeds[0])
        negatives_config(config)
        finetune_config(config, config.seeds[0])
        evaluate_config(config)
        if config.teacher:
            teacher_config(config)
            encode_config(config)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config


# ---------------------------------------------------------------------------------------
# Per-arm configs
# ---------------------------------------------------------------------------------------


def shared_pretrain_config(config: AblationConfig, seed: int):
    """The pretraining config every arm of `seed` starts from: from scratch (or the study's init),
    the study's seed."""
    from retromae.config import PretrainConfig

    section = dict(config.pretrain)
    clash = OBJECTIVE_FIELDS & set(section)
    if clash:
        raise ConfigError(f"ablation '{config.name}', section 'pretrain': {sorted(clash)} are set per arm (arms, sweep), not here")
    model = {**section.get("model", {}), "init": config.init}
    train = {**section.get("train", {}), "seed": seed}
    return validate_config(
        PretrainConfig, {**section, "model": model, "train": train}, source=f"ablation '{config.name}', section 'pretrain'"
    )


def arm_pretrain_configs(config: AblationConfig, seed: int) -> dict[str, Any]:
    """{arm: PretrainConfig}; `none` maps to the shared config (its weights are the step-0 weights)."""
    shared = shared_pretrain_config(config, seed)
    out = {}
    for arm in config.all_arms():
        base, sweep = parse_arm(arm)
        out[arm] = shared if base == NO_PRETRAINING else shared.with_overrides(**{**OBJECTIVES[base], **sweep})  # a sweep value wins
    return out


def negatives_config(config: AblationConfig):
    from retrieval.training.negatives import NegativesConfig

    section = {"method": "bm25", **config.negatives, "split": config.train_split}
    return validate_config(NegativesConfig, section, source=f"ablation '{config.name}', section 'negatives'")


def finetune_config(config: AblationConfig, seed: int):
    """Every arm's fine-tuning, identical and ungated: the pretrain gate would let arms start from
    the same init and erase the difference the study measures."""
    from retrieval.training.finetune import FinetuneConfig

    section = dict(config.finetune)
    train = {**section.get("train", {}), "seed": seed}
    data = {"split": config.train_split, **section.get("data", {})}
    merged = {**section, "train": train, "data": data, "pretrain_gate": {"enabled": False}}
    return validate_config(FinetuneConfig, merged, source=f"ablation '{config.name}', section 'finetune'")


def teacher_config(config: AblationConfig):
    from retrieval.training.teacher import TeacherConfig

    section = {"kind": "fusion", **config.teacher, "split": config.train_split}
    return validate_config(TeacherConfig, section, source=f"ablation '{config.name}', section 'teacher'")


def encode_config(config: AblationConfig):
    from retrieval.serving.encode import EncodeConfig

    return validate_config(EncodeConfig, dict(config.encode), source=f"ablation '{config.name}', section 'encode'")


def evaluate_config(config: AblationConfig):
    from eval.evaluate import EvaluateConfig

    section = {"split": config.eval_split, **config.evaluate}
    return validate_config(EvaluateConfig, section, source=f"ablation '{config.name}', section 'evaluate'")


# ---------------------------------------------------------------------------------------
# Steps of the study that the pretrain-to-beir chain does not have
# ---------------------------------------------------------------------------------------


class CorpusConfig(StageConfig):
    """The pretraining text: the named datasets' corpora (as inputs) plus files, by content."""

    files: dict[str, str] = Field(default_factory=dict)  # path -> sha256 of its content


def corpus_config(files: list[str]) -> CorpusConfig:
    paths = [Path(p).expanduser().resolve() for p in files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"pretraining file not found: {path}")
    return CorpusConfig(files={str(p): sha256_file(p) for p in paths})


def run(config: CorpusConfig, inputs: dict[str, Artifact], out_dir: Path, partial_dir: Path) -> dict[str, Any]:
    """The `corpus` step: one `corpus.parquet` (title, text) of every document of the input
    datasets (`corpus0`, `corpus1`, ...) and the config's files: the text the tokenizer and every
    arm's pretraining read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retromae.data import iter_documents

    corpora = [inputs[name].file(CORPUS_FILE) for name in sorted(inputs, key=lambda n: int(n.removeprefix("corpus")))]
    counts, texts = {}, []
    for source in [*corpora, *(Path(p) for p in config.files)]:
        before = len(texts)
        texts.extend(doc for doc in iter_documents(source) if doc)
        counts[str(source)] = len(texts) - before
        if len(texts) == before:
            raise ValueError(f"{source}: no pretraining text in it (every document is empty)")
    pq.write_table(pa.table({"title": [""] * len(texts), "text": texts}), Path(out_dir) / CORPUS_FILE)
    return {"documents": len(texts), "per_source": counts, "words": sum(len(t.split()) for t in texts)}


# ---------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------


@dataclass
class ArmRun:
    arm: str
    seed: int
    encoder: Input
    finetuned: Artifact
    evaluations: dict[tuple[str, str], Artifact] = field(default_factory=dict)  # (phase, dataset) -> evaluate artifact


@dataclass
class AblationResult:
    runs: list[ArmRun]
    artifacts: dict[str, Artifact]


def data_root_datasets(config: AblationConfig) -> list[str]:
    """Every BEIR-format dataset (a folder with corpus.jsonl) directly under the config's data root."""
    root = data_root(config)
    if root is None:
        raise ConfigError("pretrain_corpora is null (every dataset in the data root) but neither data_dir nor RETROFLOW_DATA_DIR is set")
    found = sorted(p.name for p in Path(root).iterdir() if (p / "corpus.jsonl").is_file())
    if not found:
        raise FileNotFoundError(f"{root}: no dataset folder with a corpus.jsonl (pretraining text)")
    return found


def store_of(config: AblationConfig) -> ArtifactStore:
    return store_for(config)  # the pipeline's rule: RETROFLOW_STORE, else the config's `store`


def ablation_dir(root: Path, name: str) -> Path:
    """`<root>/ablations/<name>` (its report), checked to be a folder directly inside `<root>/ablations/`."""
    return child_dir(Path(root) / "ablations", name, "ablation name")


def run_ablation(config: AblationConfig, execute=direct, execute_map=direct_map) -> AblationResult:
    """Pretrain every arm for every seed, fine-tune and evaluate each identically."""
    from retroflow.inputs import external_model
    from retromae.pretrain import scratch_config, tokenizer_config

    store = store_for(config)
    names = config.pretrain_corpora if config.pretrain_corpora is not None else data_root_datasets(config)
    datasets = {
        name: execute("data", prepare_data, store, name, config.data_dir)
        for name in dict.fromkeys([*names, config.train_dataset, *config.eval_datasets])
    }
    corpora = {f"corpus{i}": datasets[n] for i, n in enumerate(names)}
    corpus = execute("corpus", build, store, "corpus", corpus_config(list(config.pretrain_files)), corpora)
    produced: dict[str, Artifact] = {"corpus": corpus}
    train_data = datasets[config.train_dataset]
    negatives = execute("negatives", build, store, "negatives", negatives_config(config), {"data": train_data})
    produced["negatives"] = negatives
    evaluate_cfg = evaluate_config(config)
    init = external_model(config.init) if config.init is not None else None
    tokenizer = teacher = None
    if init is None:  # from scratch: one tokenizer (it depends on the text and vocabulary size only) for every seed and arm
        tokenizer = execute(
            "tokenizer", build, store, "tokenizer", tokenizer_config(shared_pretrain_config(config, config.seeds[0])), {"data": corpus}
        )
        produced["tokenizer"] = tokenizer
    if config.teacher:  # one teacher from the init for every arm and seed: the arms differ only in pretraining
        embeddings = execute("encode", build, store, "encode", encode_config(config), {"data": train_data, "model": init})
        teacher = execute(
            "teacher", build, store, "teacher", teacher_config(config), {"data": train_data, "init": init, "embeddings": embeddings}
        )
        produced.update({"encode:init": embeddings, "teacher": teacher})
    runs = []
    for seed in config.seeds:
        for arm, pretrain in arm_pretrain_configs(config, seed).items():
            if parse_arm(arm)[0] == NO_PRETRAINING:
                encoder = (
                    init
                    if init is not None
                    else execute("scratch", build, store, "scratch", scratch_config(pretrain), {"tokenizer": tokenizer})
                )
            else:
                encoder = execute("pretrain", build, store, "pretrain", pretrain, {"data": corpus, "tokenizer": tokenizer})
            produced[f"pretrain:{arm}:{seed}"] = encoder
            inputs = {"data": train_data, "model": encoder, "negatives": negatives, "teacher": teacher}
            finetuned = execute("finetune", build, store, "finetune", finetune_config(config, seed), inputs)
            produced[f"finetune:{arm}:{seed}"] = finetuned
            run = ArmRun(arm, seed, encoder, finetuned)
            for name in config.eval_datasets:
                if config.zero_shot:
                    run.evaluations[("zero-shot", name)] = execute(
                        "evaluate", build, store, "evaluate", *evaluation(evaluate_cfg, "dense", datasets[name], encoder)
                    )
                run.evaluations[("fine-tuned", name)] = execute(
                    "evaluate", build, store, "evaluate", *evaluation(evaluate_cfg, "dense", datasets[name], finetuned)
                )
            runs.append(run)
    return AblationResult(runs=runs, artifacts=produced)
