"""DPR fine-tuning with in-batch + hard negatives, ANCE-style negative refresh, and distillation.

The stage is `run(config, inputs, out_dir, partial_dir, *, resume=True, stop_after=None)` (the
contract of `flows.stages.STAGES`). Inputs: `data` (the dataset whose training qrels are trained
on), `model` (where training starts), and optionally `negatives` (a mined negatives file; without
it the stage mines its own as `negatives.mine` says), `teacher` (its scores file: distillation)
and `init` (the model `model` was pretrained from: the pretrain gate's rival). It
writes `out_dir/model` (HF weights + tokenizer + sentence-transformers files, so both
`SentenceTransformer(out_dir/model)` and `retroflow evaluate --model out_dir/model` load it;
with `model.shared_encoder: false`, `out_dir/query_model` and `out_dir/passage_model`),
`out_dir/loss_history.json`, and returns metrics (final_loss, steps, loss_history, ...).
Training runs on retroflow.training's loop: checkpoints (model, optimizer, scheduler, RNG, loss
history) go to `partial_dir/checkpoints` every `train.save_every` steps and a re-run resumes from
the latest one; ANCE rounds write their re-mined negatives to `partial_dir/ance/` so a resumed
run reuses them.

Related stages: `retrieval.training.negatives` and `retrieval.training.teacher`, whose scores file
(`retrieval.training.teacher_scores`) distillation reads.

Design notes
- The data order (`retrieval.training.training_data.BatchPlan`) is a pure function of (seed, step): a
  resumed run replays exactly the batches the killed run would have seen, and every DDP rank
  can compute the doc ids of the whole global batch without communication (used to mask
  in-batch false negatives).
- One forward call encodes queries and passages together, so DDP sees one forward per backward.
- Training pools and normalises exactly as the saved sentence-transformers config says, so the
  trained similarity is the one used at search time.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrieval.serving.encoder import check_vocabulary
from retrieval.training.losses import contrastive_loss, group_scores, kl_distillation_loss, margin_mse_loss, rank_and_world
from retrieval.training.negatives import NegativesConfig, mine_negatives, read_negatives, write_negatives
from retrieval.training.teacher_scores import DEV_BM25, DEV_DENSE, DEV_TEACHER, SCORES_FILE, TeacherScores, read_teacher_scores
from retrieval.training.training_data import BatchPlan, QuerySelection, Sample, TrainingSet, beir_training_set, training_queries
from retroflow.checkpoints import rng_state, set_rng_state
from retroflow.config import StageConfig
from retroflow.data.splits import dev_split
from retroflow.devices import seed_everything
from retroflow.inputs import Input, model_folder_label
from retroflow.models import ModelFormatError, read_sentence_transformer_settings, resolve_model_path, write_sentence_transformer_files
from retroflow.publish import atomic_write_text, check_replaceable_model_dir, publishing
from retroflow.training import (
    LoopSettings,
    TrainerState,
    TrainingHook,
    TrainingLoop,
    apply_gradients,
    make_accelerator,
    make_optimizer,
    mean_over_processes,
    run_identity,
)

log = logging.getLogger("retroflow.finetune")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelSection(_Section):
    pooling: Literal["auto", "cls", "mean"] = "auto"  # auto = the init model's sentence-transformers config, else cls
    normalize: bool | None = None  # None = as the init model's sentence-transformers config says
    shared_encoder: bool = True  # False: separate query and passage encoders (DPR's original setup)
    query_max_length: int = Field(64, ge=4)
    passage_max_length: int = Field(256, ge=8, description="passage tokens seen in training")
    # what the saved sentence-transformers config declares (used at encoding time); None = passage_max_length.
    # Training on shorter passages than the model serves is a cheap, common trade on CPUs.
    serve_max_length: int | None = Field(None, ge=8)
    gradient_checkpointing: bool = False
    allow_pooling_change: bool = Field(
        False,
        description="fine-tune with a pooling other than the one the start model "
        "declares (what it was trained with): refused unless set, then reported",
    )
    # e5/bge-style instructions; saved as the model's sentence-transformers prompts so serving uses them too
    query_prefix: str = ""
    passage_prefix: str = ""


class DataSection(_Section):
    split: str = "train"
    min_grade: int = Field(1, ge=1)
    dev_fraction: float = Field(0.0, ge=0, lt=1, description="train queries held out as dev (never trained on)")
    dev_seed: int = 0
    max_queries: int | None = Field(None, ge=1, description="use only the first N training queries")
    rows: Literal["per_positive", "per_query"] = Field(
        "per_positive",
        description="per_positive: one training row per (query, judged positive), as sentence-transformers "
        "recipes do; per_query: one row per query with a random positive each time",
    )

    def selection(self) -> QuerySelection:
        return QuerySelection(self.split, self.min_grade, self.dev_fraction, self.dev_seed, self.max_queries)


class NegativesSection(_Section):
    hard_negatives: int = Field(1, ge=0, description="hard negatives per query in each batch")
    # used when the stage gets no `negatives` input and hard_negatives > 0; dense mining encodes
    # with the model training starts from
    mine: NegativesConfig = Field(default_factory=NegativesConfig)


class TrainSection(_Section):
    seed: int = 42
    epochs: float | None = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs")
    batch_size: int = Field(32, ge=1, description="queries per optimizer step (all processes, all micro-batches)")
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    temperature: float | None = Field(None, gt=0, description="None = 0.05 for normalised embeddings, else 1")
    mask_false_negatives: bool = True  # hide in-batch passages judged relevant to the query
    grad_cache_chunk: int | None = Field(
        None,
        ge=1,
        description="GradCache: embed the batch in chunks of this many "
        "queries without a graph, take the loss over the whole batch, then backpropagate "
        "chunk by chunk; the same gradient as one big batch, in a chunk's memory (one process)",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    save_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)


class AnceSection(_Section):
    rounds: int = Field(0, ge=0, description="number of negative refreshes (0 = off)")
    refresh_every: int | None = Field(None, ge=1, description="steps between refreshes; None = total / (rounds + 1)")
    rank_start: int = Field(0, ge=0)
    rank_end: int = Field(100, ge=1)
    max_negatives: int | None = Field(None, ge=1)
    index: Literal["flat", "hnsw"] = "flat"
    encode_batch_size: int = Field(64, ge=1)


class DistillSection(_Section):
    loss: Literal["none", "kl", "margin_mse"] = "none"
    temperature: float = Field(1.0, gt=0, description="kl: both distributions are softmax(scores / temperature)")
    standardize: bool = Field(
        True,
        description="kl: z-score the teacher's scores over each query's candidates first "
        "(teachers' score scales differ; the temperature then sets the teacher's sharpness)",
    )
    teacher_temperature: float = Field(0.5, gt=0, description="kl with standardize: teacher = softmax(z / teacher_temperature)")
    weight: float = Field(1.0, ge=0, description="weight of the distillation term")
    contrastive_weight: float = Field(1.0, ge=0, description="weight of the in-batch contrastive term")
    false_negative_fraction: float | None = Field(
        0.9,
        gt=0,
        le=1,
        description="drop a candidate negative whose teacher "
        "score reaches this fraction of the query's best positive (likely unjudged relevant); None = keep all",
    )
    gate: bool = Field(
        True,
        description="distil only if the teacher's dev check beats BM25, its dense model and the "
        "student's own dev score (the untrained student reranking the teacher's dev pool)",
    )


class PretrainGateSection(_Section):
    enabled: bool = Field(
        True,
        description="with an `init` input (the model pretraining started from), start from the "
        "pretrained model only if it is not worse than the init on the dev hold-out",
    )
    tolerance: float = Field(
        0.0, ge=0, le=1, description="keep the pretrained start unless its dev nDCG@10 is more than this below the init's"
    )
    pool_depth: int = Field(30, ge=1, description="BM25 candidates reranked per dev query when the teacher has no dev pool")
    bootstrap: int = Field(1000, ge=0, description="paired bootstrap resamples over dev queries for the reported interval")


class FinetuneConfig(StageConfig):
    moved_to_inputs: ClassVar[dict[str, str]] = {
        "dataset": "pass --dataset NAME|DIR (a pipeline sets it from train_dataset)",
        "init": "pass --model ALIAS|DIR (where training starts)",
    }

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    negatives: NegativesSection = Field(default_factory=NegativesSection)
    train: TrainSection = Field(default_factory=TrainSection)
    ance: AnceSection = Field(default_factory=AnceSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    pretrain_gate: PretrainGateSection = Field(default_factory=PretrainGateSection)

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.train.batch_size % self.train.grad_accum_steps:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} is not divisible by train.grad_accum_steps={self.train.grad_accum_steps}"
            )
        if self.train.epochs is None and self.train.max_steps is None:
            raise ValueError("set train.epochs or train.max_steps")
        if self.distill.loss != "none" and self.negatives.hard_negatives < 1:
            raise ValueError("distillation needs negatives.hard_negatives >= 1 (the candidate list is positive + negatives)")
        if self.distill.loss != "none" and self.ance.rounds:
            raise ValueError("ance.rounds > 0 with distillation: refreshed negatives have no teacher scores; use one or the other")
        if self.train.grad_cache_chunk and self.train.grad_accum_steps > 1:
            raise ValueError(
                "train.grad_cache_chunk replaces train.grad_accum_steps (whose micro-batches see only their own negatives): set one"
            )
        if self.ance.rank_end <= self.ance.rank_start:
            raise ValueError("ance.rank_end must be larger than ance.rank_start")
        return self


# ---------------------------------------------------------------------------------------- model


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class BiEncoder(torch.nn.Module):
    """Query and passage towers (one shared module by default); forward encodes both in one call."""

    def __init__(self, query_model, passage_model, pooling: str, normalize: bool):
        super().__init__()
        self.query_model = query_model
        # registered only when separate: a shared tower must appear once in the state dict
        self.separate_passage_model = passage_model
        self.shared = passage_model is None
        self.pooling, self.normalize = pooling, normalize

    @property
    def passage_model(self):
        return self.query_model if self.shared else self.separate_passage_model

    def _embed(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        vectors = pool_hidden(hidden.float(), batch["attention_mask"], self.pooling)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def forward(self, queries: dict[str, torch.Tensor], passages: dict[str, torch.Tensor]):
        return self._embed(self.query_model, queries), self._embed(self.passage_model, passages)


def load_backbone(path: Path, gradient_checkpointing: bool):
    from retrieval.serving.encoder import load_encoder_model

    # the encoder's loader: one load at a time, a bad directory named in one line, transformers'
    # load report (a RetroMAE encoder has no pooler) silenced and real missing weights warned about
    model = load_encoder_model(path)
    if getattr(model, "pooler", None) is not None:
        # BERT's pooler is unused by cls/mean pooling: frozen, so DDP does not wait for its gradients
        model.pooler.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def pooling_change(config: FinetuneConfig, model_path: Path) -> dict[str, str] | None:
    """{"declared", "used"} when fine-tuning would pool differently from what the start model
    declares (the vector its training shaped); refused unless `model.allow_pooling_change`."""
    declared = read_sentence_transformer_settings(model_path).pooling
    used = config.model.pooling
    if used == "auto" or declared is None or declared == used:
        return None
    if not config.model.allow_pooling_change:
        raise ValueError(
            f"finetune.model.pooling: {model_path} declares {declared} pooling (what it was trained with), the config asks "
            f"{used}; set model.pooling to auto or {declared}, or model.allow_pooling_change: true to change it knowingly"
        )
    log.warning("fine-tuning %s with %s pooling although it declares %s (model.allow_pooling_change)", model_path, used, declared)
    return {"declared": declared, "used": used}


def resolve_pooling(config: FinetuneConfig, model_path: Path) -> tuple[str, bool, float]:
    st = read_sentence_transformer_settings(model_path)
    # The saved model keeps only the transformer and a Pooling: a Dense head would be dropped, and
    # another pooling trained as cls would be served as the original one.
    if st.dense:
        raise ModelFormatError(
            f"{model_path}: fine-tuning does not train sentence-transformers Dense modules "
            f"({st.dense[0].path.name}); start from a model without one"
        )
    if config.model.pooling == "auto" and st.pooling not in (None, "cls", "mean"):
        raise ModelFormatError(
            f"{model_path}: fine-tuning supports cls and mean pooling, the model uses {st.pooling!r}; "
            "set model.pooling to cls or mean to retrain it that way"
        )
    pooling = config.model.pooling if config.model.pooling != "auto" else (st.pooling or "cls")
    normalize = config.model.normalize if config.model.normalize is not None else st.normalize
    temperature = config.train.temperature or (0.05 if normalize else 1.0)
    return pooling, normalize, temperature


def save_encoder(
    model, tokenizer, dest: Path, pooling: str, normalize: bool, max_seq_length: int, prefixes: tuple[str, str] = ("", "")
) -> None:
    """HF weights + tokenizer + sentence-transformers files, published whole (retroflow.publish)."""
    check_replaceable_model_dir(dest)
    with publishing(dest, replace=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_sentence_transformer_files(staging, pooling, normalize, max_seq_length, int(model.config.hidden_size), prompts=prefixes)


# ---------------------------------------------------------------------------------------- batches


def micro_batches(batch: list[Sample], rank: int, world: int, accum: int) -> list[list[list[Sample]]]:
    """[micro][rank] -> samples: rank r's contiguous share cut into `accum` micro-batches."""
    if len(batch) % (world * accum):
        raise ValueError(f"batch_size {len(batch)} does not split into {world} processes x {accum} micro-batches")
    share = len(batch) // world
    micro = share // accum
    return [[batch[r * share + m * micro : r * share + (m + 1) * micro] for r in range(world)] for m in range(accum)]


def false_negative_mask(local: list[Sample], everyone: list[list[Sample]], train: TrainingSet, group: int) -> torch.Tensor:
    """(B_local, P_global) True where a passage is judged relevant to the query (but is not its label)."""
    doc_ids = [d for rank_samples in everyone for s in rank_samples for d in [s.positive, *s.negatives]]
    mask = torch.zeros(len(local), len(doc_ids), dtype=torch.bool)
    for i, sample in enumerate(local):
        relevant = train.positives_of(sample.qid) | {sample.positive}
        for j, doc in enumerate(doc_ids):
            mask[i, j] = doc in relevant
    return mask  # the label column is re-enabled inside contrastive_loss


# ---------------------------------------------------------------------------------------- distillation and the dev gates


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """Per-row z-scores (a row of equal scores becomes zeros)."""
    centred = scores - scores.mean(-1, keepdim=True)
    return centred / scores.std(-1, keepdim=True).clamp(min=1e-6)


def teacher_pools(
    scores: dict[str, dict[str, float]], train: TrainingSet, false_negative_fraction: float | None, min_keep: int = 1
) -> dict[str, list[str]]:
    """Each query's teacher-scored candidates that are not judged positive, minus those the teacher
    scores at `false_negative_fraction` of the best positive or more (likely unjudged relevant).
    When that leaves fewer than `min_keep`, the `min_keep` lowest-scored candidates are kept (a
    query whose positive the teacher ranks low would otherwise lose every negative)."""
    pools = {}
    for qid, docs in scores.items():
        positives = train.positives_of(qid)
        candidates = [d for d in docs if d not in positives]
        best = max((docs[d] for d in positives if d in docs), default=None)
        if false_negative_fraction is None or best is None or best <= 0:
            pools[qid] = candidates
            continue
        kept = [d for d in candidates if docs[d] < false_negative_fraction * best]
        pools[qid] = kept if len(kept) >= min_keep else sorted(candidates, key=lambda d: docs[d])[:min_keep]
    return pools


def distillation_gate(dev_check: Mapping[str, Any], student_dev: float | None = None) -> tuple[bool, str]:
    """(distil?, why) from the teacher's dev check (`TeacherScores.dev_check`): it must beat BM25,
    its own dense model and the student's own dev score (`student_dev`, see `student_dev_check`)."""
    teacher = dev_check.get(DEV_TEACHER)
    if teacher is None:
        return True, "the teacher has no dev check (dev_fraction 0): distilling ungated"
    rivals = {
        "BM25": dev_check.get(DEV_BM25),
        "its dense model": dev_check.get(DEV_DENSE),
        "the student (reranking the teacher's dev pool)": student_dev,
    }
    for name, value in rivals.items():
        if value is not None and teacher < value:
            return False, f"the teacher's dev nDCG@10 {teacher:.4f} is below {name}'s {value:.4f}: trained without distillation"
    known = ", ".join(f"{n} {v:.4f}" for n, v in rivals.items() if v is not None)
    return True, f"the teacher's dev nDCG@10 {teacher:.4f} beats {known}: distilling"


def rerank_dev_scores(
    config: FinetuneConfig,
    dataset,
    passages: Mapping[str, str],
    model_path: Path,
    pooling: str,
    normalize: bool,
    dev_pool: Mapping[str, Sequence[str]],
) -> dict[str, float]:
    """{dev qid: nDCG@10} of `model_path` reranking each judged dev query's candidates in `dev_pool`."""
    from retrieval.serving.encoder import Encoder, EncoderSettings
    from retroflow.metrics import evaluate_run

    qrels_all = dataset.split_qrels(config.data.split)
    qrels = {q: qrels_all[q] for q in dev_pool if q in qrels_all}
    if not qrels:
        return {}
    m = config.model
    encoder = Encoder(
        model_path,
        EncoderSettings(
            pooling=pooling,
            normalize=normalize,
            query_max_length=m.query_max_length,
            passage_max_length=m.serve_max_length or m.passage_max_length,
            query_prefix=m.query_prefix,
            passage_prefix=m.passage_prefix,
            device=config.train.device,
            precision=config.train.precision,
            show_progress=False,
        ),
    )
    query_text = dataset.split_queries(config.data.split)
    docs = sorted({d for q in qrels for d in dev_pool[q]})
    doc_vectors = dict(zip(docs, encoder.encode_passages([passages[d] for d in docs])))
    query_vectors = encoder.encode_queries([query_text[q] for q in qrels])
    run = {q: {d: float(vector @ doc_vectors[d]) for d in dev_pool[q]} for q, vector in zip(qrels, query_vectors)}
    _, per_query = evaluate_run(qrels, run, ["ndcg@10"])
    return {q: float(value) for q, value in per_query["ndcg@10"].items()}


def check_pool_is_held_out(dev_pool: Mapping[str, Sequence[str]], train: TrainingSet, teacher_file: Path) -> None:
    overlap = sorted(set(dev_pool) & {ex.qid for ex in train.examples})
    if overlap:
        raise ValueError(
            f"{teacher_file}: the teacher's dev queries (e.g. {overlap[0]}) are training queries of this run; "
            "data.dev_fraction / data.dev_seed must equal the teacher's"
        )


def student_dev_check(
    config: FinetuneConfig,
    dataset,
    train: TrainingSet,
    model_path: Path,
    pooling: str,
    normalize: bool,
    dev_pool: Mapping[str, Sequence[str]],
    teacher_file: Path,
) -> float | None:
    """The untrained student's nDCG@10 on the held-out dev queries, reranking each query's
    candidates in the teacher's dev pool (its top documents for that query).

    Reranking the teacher's own candidates flatters the student (every document it could rank
    into the top 10 has already passed the teacher), so a teacher that still beats this figure
    beats the student; and it costs the pool's few thousand passages, not a corpus encoding."""
    if not dev_pool or dataset is None:
        return None
    check_pool_is_held_out(dev_pool, train, teacher_file)
    scores = rerank_dev_scores(config, dataset, train.passages, model_path, pooling, normalize, dev_pool)
    return round(float(np.mean(list(scores.values()))), 4) if scores else None


TEACHER_POOL = "the teacher's dev pool"


def chosen_start_dev_score(verdict: dict[str, Any] | None) -> float | None:
    """The pretrain gate's dev nDCG@10 of the start it chose, when it scored on the teacher's dev
    pool: then it is the distillation gate's student figure, already computed."""
    if not verdict or verdict.get("pool") != TEACHER_POOL:
        return None
    return verdict.get(f"{verdict['start']}_dev_ndcg@10")


def dev_pool_for_gate(
    config: FinetuneConfig, dataset, train: TrainingSet, teacher_pool: Mapping[str, Sequence[str]] | None
) -> tuple[dict, str]:
    """(dev qid -> candidate doc ids, where they came from): the teacher's dev pool when it has
    one, else BM25's top `pretrain_gate.pool_depth` for the dev hold-out's queries."""
    if teacher_pool:
        return dict(teacher_pool), TEACHER_POOL
    from retrieval.serving.bm25 import BM25Retriever

    everyone = beir_training_set(dataset, config.data.split, config.data.min_grade)
    _, dev = dev_split([ex.qid for ex in everyone.examples], config.data.dev_fraction, config.data.dev_seed)
    if not dev:
        return {}, "no dev hold-out"
    texts = dataset.split_queries(config.data.split)
    ids = list(train.passages)
    run = BM25Retriever(ids, [train.passages[d] for d in ids]).search({q: texts[q] for q in dev}, config.pretrain_gate.pool_depth)
    return {q: list(docs) for q, docs in run.items()}, f"BM25's top {config.pretrain_gate.pool_depth}"


def paired_bootstrap_interval(deltas: Sequence[float], resamples: int, seed: int = 0) -> list[float] | None:
    """95% interval of the mean of paired per-query differences (resampling queries)."""
    if resamples == 0 or len(deltas) < 2:
        return None
    values = np.asarray(deltas, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[draws].mean(axis=1)
    return [round(float(np.quantile(means, 0.025)), 4), round(float(np.quantile(means, 0.975)), 4)]


def pretrain_gate(
    config: FinetuneConfig, dataset, train: TrainingSet, pretrained: Path, init: Path, teacher_pool: Mapping[str, Sequence[str]] | None
) -> tuple[Path, dict[str, Any]]:
    """(where fine-tuning starts, the verdict): the pretrained model, unless it reranks the dev
    hold-out's candidates worse than the init it was pretrained from (by more than the tolerance)."""
    gate = config.pretrain_gate
    pool, source = dev_pool_for_gate(config, dataset, train, teacher_pool)
    if not pool:
        verdict = {"start": "pretrained", "reason": "no dev hold-out (data.dev_fraction 0): the pretrained start is unchecked"}
        log.warning("pretrain gate: %s", verdict["reason"])
        return pretrained, verdict
    scores = {}
    for name, path in (("pretrained", pretrained), ("init", init)):
        pooling, normalize, _ = resolve_pooling(config, path)
        scores[name] = rerank_dev_scores(config, dataset, train.passages, path, pooling, normalize, pool)
    queries = sorted(scores["pretrained"])
    deltas = [scores["pretrained"][q] - scores["init"][q] for q in queries]
    pre, ini = (round(float(np.mean([scores[n][q] for q in queries])), 4) for n in ("pretrained", "init"))
    delta = round(float(np.mean(deltas)), 4)
    keep = delta >= -gate.tolerance
    verdict = {
        "start": "pretrained" if keep else "init",
        "pretrained_dev_ndcg@10": pre,
        "init_dev_ndcg@10": ini,
        "delta": delta,
        "delta_ci95": paired_bootstrap_interval(deltas, gate.bootstrap),
        "dev_queries": len(queries),
        "tolerance": gate.tolerance,
        "pool": source,
        "reason": (
            f"pretrained start {pre:.4f} vs init {ini:.4f} on {len(queries)} dev queries ({source}): "
            + ("kept the pretrained model" if keep else f"more than {gate.tolerance} worse: fine-tuning starts from the init instead")
        ),
    }
    (log.info if keep else log.warning)("pretrain gate: %s", verdict["reason"])
    return (pretrained if keep else init), verdict


# ---------------------------------------------------------------------------------------- training


def total_steps(config: FinetuneConfig, num_examples: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    return max(1, math.ceil(config.train.epochs * num_examples / config.train.batch_size))


def refresh_steps(config: FinetuneConfig, steps: int) -> list[int]:
    """Steps after which ANCE re-mines negatives (strictly inside the run)."""
    rounds = config.ance.rounds
    if not rounds:
        return []
    every = config.ance.refresh_every or max(1, steps // (rounds + 1))
    return [every * (i + 1) for i in range(rounds) if every * (i + 1) < steps]


class AnceRefresh(TrainingHook):
    """ANCE: at each refresh step, re-mine the negatives with the weights trained so far, before
    that step draws its batch. A resumed run first reloads the last round it had passed."""

    def __init__(self, trainer: FinetuneTrainer, refresh_at: list[int]):
        self.trainer, self.refresh_at = trainer, refresh_at

    def on_train_begin(self, loop: TrainingLoop) -> None:
        passed = [s for s in self.refresh_at if s <= loop.state.global_step]
        if passed:
            self.refresh(len(passed))

    def on_step_begin(self, loop: TrainingLoop, step: int) -> None:
        if step not in self.refresh_at:
            return
        round_index = self.refresh_at.index(step) + 1
        if round_index > self.trainer.ance_rounds_done:  # a run resumed at this very step reloaded it already
            self.refresh(round_index)

    def refresh(self, round_index: int) -> None:
        self.trainer.pools = self.trainer.ance_refresh(round_index)
        self.trainer.ance_rounds_done = round_index


class FinetuneTrainer:
    """DPR's part of retroflow.training's loop: the batch plan, the contrastive (+ distillation)
    loss of one step, and the ANCE refresh hook."""

    def __init__(self, config: FinetuneConfig, model_path: Path, train: TrainingSet, partial_dir: Path, dataset=None):
        from transformers import AutoTokenizer

        self.config, self.train_set, self.dataset, self.model_path = config, train, dataset, model_path
        self.partial_dir = Path(partial_dir)
        self.checkpoint_dir = self.partial_dir / "checkpoints"
        self.acc = make_accelerator(config.train)
        seed_everything(config.train.seed)
        self.pooling, self.normalize, self.temperature = resolve_pooling(config, model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        gc = config.model.gradient_checkpointing
        query_model = load_backbone(model_path, gc)
        check_vocabulary(self.tokenizer, query_model, model_path)
        passage_model = None if config.model.shared_encoder else load_backbone(model_path, gc)
        model = BiEncoder(query_model, passage_model, self.pooling, self.normalize)
        self.plan = BatchPlan(train, config.train.batch_size, config.negatives.hard_negatives, config.train.seed, config.data.rows)
        self.steps = total_steps(config, len(self.plan))
        t = config.train
        optimizer, self.scheduler = make_optimizer(
            model, lr=t.lr, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio, total_steps=self.steps
        )
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.pools: dict[str, list[str]] = {}
        self.teacher: dict[str, dict[str, float]] | None = None
        self.ance_rounds_done = 0

    # ------------------------------------------------------------------------ inputs
    def set_pools(self, pools: dict[str, list[str]]) -> None:
        self.pools = pools

    def set_teacher(self, scores: dict[str, dict[str, float]], distill: bool = True) -> None:
        """Negatives are drawn from each query's teacher-scored candidates (minus likely false
        negatives); with `distill` the teacher's scores are also distilled."""
        self.teacher = scores if distill else None
        self.pools = teacher_pools(
            scores, self.train_set, self.config.distill.false_negative_fraction, max(1, self.config.negatives.hard_negatives)
        )

    def _tokenize(self, texts: list[str], max_length: int, prefix: str = "") -> dict[str, torch.Tensor]:
        texts = [prefix + t for t in texts] if prefix else texts
        batch = self.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.acc.device), "attention_mask": batch["attention_mask"].to(self.acc.device)}

    def _teacher_matrix(self, samples: list[Sample]) -> torch.Tensor:
        rows = []
        for s in samples:
            scores = self.teacher.get(s.qid, {})
            missing = [d for d in [s.positive, *s.negatives] if d not in scores]
            if missing:
                raise ValueError(f"teacher scores have no score for query '{s.qid}', passage '{missing[0]}'")
            rows.append([scores[d] for d in [s.positive, *s.negatives]])
        return torch.tensor(rows, dtype=torch.float32, device=self.acc.device)

    # ------------------------------------------------------------------------ one step
    def embed(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """(query embeddings (B, d), passage embeddings (B * group, d)): each sample's positive, then its negatives."""
        cfg = self.config
        queries = self._tokenize([s.query for s in samples], cfg.model.query_max_length, cfg.model.query_prefix)
        texts = [self.train_set.passages[d] for s in samples for d in [s.positive, *s.negatives]]
        passages = self._tokenize(texts, cfg.model.passage_max_length, cfg.model.passage_prefix)
        return self.model(queries, passages)

    def micro_loss(self, local: list[Sample], everyone: list[list[Sample]]) -> tuple[torch.Tensor, torch.Tensor]:
        q, p = self.embed(local)
        return self.loss_of(local, everyone, q, p)

    def loss_of(
        self, local: list[Sample], everyone: list[list[Sample]], q: torch.Tensor, p: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        group = 1 + cfg.negatives.hard_negatives
        mask = false_negative_mask(local, everyone, self.train_set, group).to(q.device) if cfg.train.mask_false_negatives else None
        loss, _, _ = contrastive_loss(q, p, group, self.temperature, mask=mask)
        distill = torch.zeros((), device=q.device)
        if self.teacher is not None:
            student = group_scores(q, p, group, self.temperature)
            teacher = self._teacher_matrix(local)
            if cfg.distill.loss == "kl":
                if cfg.distill.standardize:
                    teacher = standardized(teacher) / cfg.distill.teacher_temperature
                distill = kl_distillation_loss(student, teacher, cfg.distill.temperature)
            else:
                distill = margin_mse_loss(student, teacher)
            loss = cfg.distill.contrastive_weight * loss + cfg.distill.weight * distill
        return loss, distill.detach()

    def grad_cache_backward(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """GradCache (Gao et al., 2021): the whole batch's loss and gradient, one chunk's activations at a time.

        1. embed each chunk without a graph, keeping its RNG state (dropout is replayed in 3);
        2. loss over all embeddings (every in-batch negative), backward to the embeddings only;
        3. re-embed each chunk with a graph under the same RNG state and backpropagate the cached
           embedding gradients into the weights."""
        chunk = self.config.train.grad_cache_chunk
        pieces = [samples[i : i + chunk] for i in range(0, len(samples), chunk)]
        states, queries, passages = [], [], []
        for piece in pieces:
            states.append(rng_state())
            with torch.no_grad():
                q, p = self.embed(piece)
            queries.append(q)
            passages.append(p)
        q_all = torch.cat(queries).requires_grad_(True)
        p_all = torch.cat(passages).requires_grad_(True)
        loss, distill = self.loss_of(samples, [samples], q_all, p_all)
        loss.backward()
        group = 1 + self.config.negatives.hard_negatives
        start = 0
        for i, (piece, state) in enumerate(zip(pieces, states)):
            set_rng_state(state)
            sync = self.acc.no_sync(self.model) if i < len(pieces) - 1 else nullcontext()
            with sync:
                q, p = self.embed(piece)
                end = start + len(piece)
                surrogate = (q * q_all.grad[start:end]).sum() + (p * p_all.grad[start * group : end * group]).sum()
                self.acc.backward(surrogate)
            start = end
        return loss.detach(), distill

    def batches(self, start: int):
        """Each step's global batch, drawn lazily: after an ANCE refresh, from the new pools."""
        return (self.plan.global_batch(step, self.pools) for step in range(start, self.steps))

    def train_step(self, step: int, samples: list[Sample]) -> dict[str, float]:
        rank, world = rank_and_world()
        if self.config.train.grad_cache_chunk:
            if world > 1:
                raise ValueError("train.grad_cache_chunk runs in one process; with several, raise batch_size per process instead")
            loss, distill = self.grad_cache_backward(samples)
            return self.finish_step(torch.stack([loss.float(), distill.float()]))
        accum = self.config.train.grad_accum_steps
        chunks = micro_batches(samples, rank, world, accum)
        totals = torch.zeros(2, device=self.acc.device)
        for i, everyone in enumerate(chunks):
            sync = self.acc.no_sync(self.model) if i < accum - 1 else nullcontext()
            with sync:
                loss, distill = self.micro_loss(everyone[rank], everyone)
                self.acc.backward(loss / accum)
            totals += torch.stack([loss.detach().float(), distill.float()]) / accum
        return self.finish_step(totals)

    def finish_step(self, totals: torch.Tensor) -> dict[str, float]:
        apply_gradients(self.acc, self.model, self.optimizer, self.scheduler, self.config.train.max_grad_norm)
        loss, distill = (float(x) for x in mean_over_processes(self.acc, totals))
        return {"loss": loss, "distill_loss": distill}

    # ------------------------------------------------------------------------ ANCE
    @property
    def prefixes(self) -> tuple[str, str]:
        return self.config.model.query_prefix, self.config.model.passage_prefix

    def unwrapped(self) -> BiEncoder:
        return self.acc.unwrap_model(self.model)

    def ance_refresh(self, round_index: int) -> dict[str, list[str]]:
        """Re-encode the corpus with the current weights and re-mine dense negatives (cached per round)."""
        ance_dir = self.partial_dir / "ance"
        negatives_path = ance_dir / f"negatives-round-{round_index}.jsonl"
        if self.acc.is_main_process and not negatives_path.is_file():
            if self.dataset is None:
                raise ValueError("ANCE refresh needs a BEIR dataset (a corpus to re-encode)")
            model_dir = ance_dir / f"round-{round_index}-model"
            self.save_passage_encoder(model_dir)
            cfg = self.config
            mine_cfg = NegativesConfig(
                split=cfg.data.split,
                method="dense",
                rank_start=cfg.ance.rank_start,
                rank_end=cfg.ance.rank_end,
                max_negatives=cfg.ance.max_negatives,
                min_grade=cfg.data.min_grade,
                index=cfg.ance.index,
                encoder={
                    "batch_size": cfg.ance.encode_batch_size,
                    "show_progress": False,
                    "device": str(self.acc.device),
                    "query_max_length": cfg.model.query_max_length,
                },
            )
            started = time.perf_counter()
            was_training = self.model.training
            mined = mine_negatives(mine_cfg, self.dataset, model_dir, query_ids=[ex.qid for ex in self.train_set.examples])
            self.model.train(was_training)
            mined.provenance["ance_round"] = round_index
            write_negatives(negatives_path, mined)
            shutil.rmtree(model_dir, ignore_errors=True)
            log.info("ANCE round %d: re-mined negatives in %.1fs", round_index, time.perf_counter() - started)
        self.acc.wait_for_everyone()
        return read_negatives(negatives_path).negatives

    def save_passage_encoder(self, dest: Path) -> None:
        model = self.unwrapped()
        m = self.config.model
        save_encoder(
            model.passage_model,
            self.tokenizer,
            dest,
            self.pooling,
            self.normalize,
            m.serve_max_length or m.passage_max_length,
            self.prefixes,
        )

    # ------------------------------------------------------------------------ loop
    def train(self, resume: bool = True, stop_after: int | None = None) -> TrainerState:
        t = self.config.train
        settings = LoopSettings(
            label="finetune",
            max_steps=self.steps,
            checkpoint_dir=self.checkpoint_dir,
            save_every=t.save_every,
            keep_checkpoints=t.keep_checkpoints,
            log_every=t.log_every,
            config=run_identity(self.config.canonical(), dataset=self.dataset, init=self.model_path),
        )
        loop = TrainingLoop(self.acc, self.model, self.optimizer, self.scheduler, settings)
        ance = AnceRefresh(self, refresh_steps(self.config, self.steps))
        return loop.run(self, resume=resume, stop_after=stop_after, hooks=[ance])

    def save(self, out_dir: Path) -> list[str]:
        if not self.acc.is_main_process:
            return []
        model, m = self.unwrapped(), self.config.model
        serve = m.serve_max_length or m.passage_max_length
        if model.shared:
            save_encoder(model.query_model, self.tokenizer, out_dir / "model", self.pooling, self.normalize, serve, self.prefixes)
            return ["model"]
        save_encoder(
            model.query_model,
            self.tokenizer,
            out_dir / "query_model",
            self.pooling,
            self.normalize,
            max(m.query_max_length, serve),
            self.prefixes,
        )
        save_encoder(model.passage_model, self.tokenizer, out_dir / "passage_model", self.pooling, self.normalize, serve, self.prefixes)
        return ["query_model", "passage_model"]


# ---------------------------------------------------------------------------------------- stage


def initial_pools(
    config: FinetuneConfig, dataset, train: TrainingSet, partial_dir: Path, negatives_file: Path | None, model_path: Path | None = None
):
    """Hard-negative pools per query (+ provenance): from the file, or mined as `negatives.mine`
    says into partial_dir (dense mining with `model_path`, where training starts)."""
    if config.negatives.hard_negatives == 0:
        return {}, None
    if negatives_file is None:
        if dataset is None:
            return {}, {"method": "given by the training data"}
        negatives_file = Path(partial_dir) / "negatives.jsonl"
        if not negatives_file.is_file():
            mine_cfg = config.negatives.mine.model_copy(update={"split": config.data.split})
            mined = mine_negatives(mine_cfg, dataset, model_path, query_ids=[ex.qid for ex in train.examples])
            write_negatives(negatives_file, mined)
    mined = read_negatives(negatives_file)
    fingerprint = mined.provenance.get("dataset_fingerprint")
    if dataset is not None and fingerprint and fingerprint != dataset.fingerprint:
        raise ValueError(f"{negatives_file} was mined on dataset {fingerprint[:12]}, not on {dataset.name} ({dataset.fingerprint[:12]})")
    pools = {qid: [d for d in docs if d not in train.positives_of(qid)] for qid, docs in mined.negatives.items()}
    return pools, mined.provenance


def write_training_card(model_dir: Path, config: FinetuneConfig, name: str, base: str, metrics: dict) -> None:
    """The saved model's README.md: base model (`base`), data (`name`), this stage's config and training figures."""
    from retroflow.model_card import CARD_TRAINING_KEYS, card_from_model_dir, write_model_card

    card = card_from_model_dir(
        model_dir,
        name=f"{Path(base).name} fine-tuned on {name}",
        base_model=base,
        datasets=[name],
        configs={"finetune": config.canonical()},
        training={k: metrics[k] for k in CARD_TRAINING_KEYS if metrics.get(k) is not None},
    )
    write_model_card(model_dir, card)


def check_teacher_dataset(path: Path, provenance: dict[str, Any], dataset) -> None:
    fingerprint = provenance.get("dataset_fingerprint")
    if dataset is not None and fingerprint and fingerprint != dataset.fingerprint:
        raise ValueError(
            f"{path}: these teacher scores were made on dataset {provenance.get('dataset')} "
            f"({fingerprint[:12]}), not on {dataset.name} ({dataset.fingerprint[:12]})"
        )


def read_teacher(path: Path, dataset) -> TeacherScores:
    """The teacher's scores file, refused when its scores were made on another dataset."""
    teacher = read_teacher_scores(path)
    check_teacher_dataset(path, teacher.provenance, dataset)
    return teacher


def distillation_verdict(
    config: FinetuneConfig,
    dataset,
    train: TrainingSet,
    trainer: FinetuneTrainer,
    teacher: TeacherScores,
    teacher_file: Path,
    start_gate: dict[str, Any] | None,
) -> dict[str, Any]:
    """{'distilled', 'reason', 'student_dev_ndcg@10'}: the distillation gate's decision, logged."""
    student_dev = None
    if config.distill.gate:
        # the pretrain gate already scored the chosen start on the teacher's dev pool: the same figure
        student_dev = chosen_start_dev_score(start_gate)
        if student_dev is None:
            student_dev = student_dev_check(
                config, dataset, train, trainer.model_path, trainer.pooling, trainer.normalize, teacher.dev_pool, teacher_file
            )
        distil, reason = distillation_gate(teacher.dev_check, student_dev)
    else:
        distil, reason = True, "distillation gate off (distill.gate: false)"
    (log.info if distil else log.warning)("distillation gate: %s", reason)
    return {"distilled": distil, "reason": reason, "student_dev_ndcg@10": student_dev}


def _finetune(
    config: FinetuneConfig,
    dataset,
    model_path: Path,
    out_dir: Path,
    partial_dir: Path,
    *,
    negatives_file: Path | None,
    teacher_scores_file: Path | None,
    init_path: Path | None,
    labels: Mapping[Path, str],
    resume: bool,
    stop_after: int | None,
    training_set: TrainingSet | None,
) -> dict:
    """Fine-tune `model_path` into `out_dir/model`; see the module docstring for files and resumption.

    With `init_path` (the model `model_path` was pretrained from) the pretrain gate may start
    from `init_path` instead (`pretrain_gate`). `labels` name the start models in the model card."""
    out_dir, partial_dir = Path(out_dir), Path(partial_dir)
    check_replaceable_model_dir(out_dir / "model")  # before training, not after it
    model_path = resolve_model_path(model_path)
    if (config.distill.loss == "none") != (teacher_scores_file is None):
        raise ValueError("distill.loss and teacher_scores_file go together: set both (distillation) or neither")
    train = training_queries(config.data.selection(), dataset, training_set)
    teacher = read_teacher(teacher_scores_file, dataset) if teacher_scores_file is not None else None
    provenance, gate, start_gate = None, None, None
    if init_path is not None and config.pretrain_gate.enabled and dataset is not None:
        teacher_pool = teacher.dev_pool if teacher is not None else None
        if teacher_pool:
            check_pool_is_held_out(teacher_pool, train, teacher_scores_file)
        model_path, start_gate = pretrain_gate(config, dataset, train, model_path, resolve_model_path(init_path), teacher_pool)
    changed_pooling = pooling_change(config, model_path)
    trainer = FinetuneTrainer(config, model_path, train, partial_dir, dataset)
    if teacher is not None:
        provenance = teacher.provenance
        gate = distillation_verdict(config, dataset, train, trainer, teacher, teacher_scores_file, start_gate)
        trainer.set_teacher(teacher.scores, distill=gate["distilled"])
    else:
        pools, provenance = initial_pools(config, dataset, train, partial_dir, negatives_file, model_path)
        trainer.set_pools(pools)
    log.info(
        "fine-tuning %s on %d queries for %d steps (pooling=%s normalize=%s temperature=%s)",
        model_path,
        len(train),
        trainer.steps,
        trainer.pooling,
        trainer.normalize,
        trainer.temperature,
    )
    state = trainer.train(resume=resume, stop_after=stop_after)
    distilled = trainer.teacher is not None
    metrics = {
        "final_loss": state.final_loss(),
        "steps": state.global_step,
        "total_steps": trainer.steps,
        "loss_history": state.history("loss"),
        "distill_loss_history": state.history("distill_loss") if distilled else [],
        "seconds": round(state.seconds, 2),
        "steps_per_s": state.steps_per_s if state.seconds > 0 else None,
        "resumed_from": state.resumed_from,
        "ance_rounds_done": trainer.ance_rounds_done,
        "num_train_queries": len(train),
        "pooling": trainer.pooling,
        "normalize": trainer.normalize,
        "temperature": trainer.temperature,
        "processes": trainer.acc.num_processes,
        "negatives_provenance": provenance,
        "distill": config.distill.loss if trainer.teacher is not None else "none",
        "distill_gate": gate,
        "pretrain_gate": start_gate,
        "pooling_change": changed_pooling,
        "num_train_rows": len(trainer.plan),
        "init": str(model_path),
    }
    if stop_after is not None and state.global_step < trainer.steps:
        metrics["stopped_early"] = True
        return metrics
    trainer.acc.wait_for_everyone()
    if trainer.acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics["outputs"] = trainer.save(out_dir)
        name = getattr(dataset, "name", None) or train.source
        for output in metrics["outputs"]:
            write_training_card(out_dir / output, config, name, labels.get(model_path, str(model_path)), metrics)
        atomic_write_text(
            out_dir / "loss_history.json", json.dumps({"loss": metrics["loss_history"], "distill": metrics["distill_loss_history"]})
        )
    trainer.acc.wait_for_everyone()
    return metrics


def run(
    config: FinetuneConfig,
    inputs: Mapping[str, Input],
    out_dir: Path,
    partial_dir: Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    training_set: TrainingSet | None = None,
) -> dict:
    """The `finetune` stage: fine-tune the `model` input on `data`'s training qrels into
    `out_dir/model` (see the module docstring for the files) and return metrics.

    Inputs: `data`, `model` (where training starts), optional `negatives` (a negatives file or
    artifact), `teacher` (its scores: distillation, with `distill.loss`) and `init` (the model
    `model` was pretrained from: the pretrain gate's rival). Checkpoints go to
    `partial_dir/checkpoints` and are resumed from (`resume`); `stop_after` ends the loop after
    that step without saving the model (how tests stand in for a kill). `training_set` (a
    `retrieval.training.training_data.TrainingSet` of MS MARCO or NQ data) replaces `data`'s
    qrels; without a `data` input there is no corpus, so no mining and no ANCE refresh."""
    from retrieval.training.negatives import NEGATIVES_FILE
    from retroflow.data import open_dataset
    from retroflow.inputs import model_dir

    if "model" not in inputs:
        raise ValueError("finetune: the `model` input (where training starts: --model ALIAS|DIR) is missing")
    if "data" not in inputs and training_set is None:
        raise ValueError("finetune: the `data` input (--dataset NAME|DIR) is missing")
    dataset = open_dataset(inputs["data"]) if "data" in inputs else None
    return _finetune(
        config,
        dataset,
        model_dir(inputs["model"]),
        out_dir,
        partial_dir,
        negatives_file=inputs["negatives"].file(NEGATIVES_FILE) if "negatives" in inputs else None,
        teacher_scores_file=inputs["teacher"].file(SCORES_FILE) if "teacher" in inputs else None,
        init_path=model_dir(inputs["init"]) if "init" in inputs else None,
        labels={model_dir(inputs[name]): model_folder_label(inputs[name]) for name in ("init", "model") if name in inputs},
        resume=resume,
        stop_after=stop_after,
        training_set=training_set,
    )
