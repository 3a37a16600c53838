"""Distillation teachers: a fusion of BM25 and a dense model, or a trained cross-encoder; both cache their scores.

`kind: fusion` (retrieval.serving.hybrid): BM25 fused with the dense model (min-max, dense weight chosen
on the dev hold-out); no training. Each training query's candidates are its positives plus the
fused list's top `candidates_per_query`, scored with the fused score (0..1). Its dev check
reports BM25, the dense model and the fusion on the dev queries, the fusion's figure
cross-fitted (weight chosen on one half of dev, scored on the other, both ways) so that choosing
the weight on dev does not flatter it. This is the teacher to use on CPUs: on SciFact's dev
hold-out it ranks above both of its parts, where a cross-encoder trained on 2 cores ranks below BM25.

`kind: cross_encoder` (below): trained on (query, positive, hard negatives); for users with
GPUs or real reranker checkpoints.

The stage is `run(config, inputs, out_dir, partial_dir, *, resume=True, stop_after=None)` (the
contract of `flows.stages.STAGES`). Inputs: `data`, `init` (the teacher's model: the dense side of
a fusion, the start of a cross-encoder), `negatives` (cross-encoder: what it trains on) and
`embeddings` (fusion, optional: an `encode` artifact of the init model's corpus vectors, so the
corpus is not encoded again). The cross-encoder kind writes `out_dir/teacher/` (a Hugging Face
sequence-classification model + tokenizer scoring `[CLS] query [SEP] passage [SEP]` with one
logit); both kinds write `out_dir/teacher_scores.jsonl` (`retrieval.training.teacher_scores`, the
file's format and its reader; candidates = each training query's positives + its best-ranked
`candidates_per_query` mined negatives). Distillation (the `finetune` stage's `teacher` input)
reads only that file, so the teacher never has to score again. It trains on retroflow.training's loop, like pretraining and
fine-tuning: checkpoints (model, optimizer, scheduler, RNG, loss history; retroflow.checkpoints'
format, `checkpoint-N/` directories) go to `partial_dir/checkpoints` and a re-run resumes from
the latest. Checkpoints of the teacher's earlier format (single `checkpoint-N.pt` files) are not
read: a run that finds only those starts from step 0.

The teacher is trained listwise: each query's group (its positive first, then
`negatives_per_query` hard negatives) is one softmax, cross-entropy on the positive -- the
"localised contrastive estimation" recipe for rerankers, which matches how its scores are then
used (a softmax over the same kind of candidate list).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from retrieval.serving.hybrid import FusionSettings
from retrieval.training.negatives import read_negatives
from retrieval.training.teacher_scores import DEV_BM25, DEV_DENSE, DEV_TEACHER, SCORES_FILE, TeacherScores, write_teacher_scores
from retrieval.training.training_data import BatchPlan, QuerySelection, Sample, beir_training_set, training_queries
from retroflow.config import StageConfig
from retroflow.data.splits import dev_split
from retroflow.devices import autocast, pick_dtype, seed_everything
from retroflow.inputs import Input
from retroflow.models import resolve_model_path
from retroflow.progress import progress_bar
from retroflow.publish import check_replaceable_model_dir, publishing
from retroflow.training import LoopSettings, TrainerState, TrainingLoop, apply_gradients, make_accelerator, make_optimizer, run_identity

log = logging.getLogger("retroflow.teacher")

TEACHER_DIR = "teacher"


class TeacherConfig(StageConfig):
    moved_to_inputs: ClassVar[dict[str, str]] = {
        "dataset": "pass --dataset NAME|DIR (a pipeline sets it from train_dataset)",
        "init": "pass --model ALIAS|DIR (a pipeline sets it from teacher_model, else model)",
    }

    # the `init` input: cross_encoder: any HF encoder (a fresh one-logit head is added); fusion: the dense model
    kind: Literal["fusion", "cross_encoder"] = "cross_encoder"
    fusion: FusionSettings = Field(default_factory=FusionSettings)  # kind fusion; its dev split is this config's
    split: str = "train"
    min_grade: int = Field(1, ge=1)
    dev_fraction: float = Field(0.0, ge=0, lt=1, description="must equal the fine-tuning run's, so dev stays unseen")
    dev_seed: int = 0
    max_queries: int | None = Field(None, ge=1)
    max_length: int = Field(320, ge=16, description="query + passage tokens")
    negatives_per_query: int = Field(7, ge=1)
    batch_size: int = Field(8, ge=1, description="queries per step (each brings 1 + negatives_per_query pairs)")
    epochs: float | None = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    save_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    candidates_per_query: int = Field(20, ge=1, description="mined negatives scored per query (best-ranked first)")
    dev_check_depth: int = Field(
        20,
        ge=0,
        description="rerank BM25's top N for the held-out dev queries and report the "
        "teacher's nDCG@10 beside BM25's (0 = off; needs dev_fraction > 0)",
    )
    dev_pool_depth: int = Field(
        20,
        ge=0,
        description="the teacher's top N per dev query, written to the scores file so "
        "fine-tuning can score its own student on them for the gate (0 = none)",
    )
    score_batch_size: int = Field(64, ge=1)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    query_max_length: int = Field(64, ge=4, description="fusion: the dense model's query length")
    passage_max_length: int = Field(256, ge=8, description="fusion: the dense model's passage length")

    @model_validator(mode="after")
    def _fusion_needs_dev(self) -> TeacherConfig:
        if self.kind == "fusion" and not self.dev_fraction:
            raise ValueError(
                "kind 'fusion' chooses its weight and checks itself on the dev hold-out: set dev_fraction > 0 "
                "(the fine-tuning run's, e.g. 0.1)"
            )
        return self

    def selection(self) -> QuerySelection:
        """The training queries, selected as fine-tuning selects them (its `data` section must match)."""
        return QuerySelection(self.split, self.min_grade, self.dev_fraction, self.dev_seed, self.max_queries)


def load_cross_encoder(init: str | Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(init)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    return model, tokenizer


def pair_batch(tokenizer, queries: list[str], passages: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    # truncate the passage, never the query
    enc = tokenizer(queries, passages, truncation="only_second", max_length=max_length, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def score_pairs(model, tokenizer, queries: list[str], passages: list[str], max_length: int, batch_size: int, device, dtype) -> np.ndarray:
    """One relevance logit per (query, passage) pair."""
    model.eval()
    out = np.empty(len(queries), dtype=np.float32)
    # length-sorted batches: less padding, same results
    order = np.argsort([-len(p) for p in passages], kind="stable")
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = pair_batch(tokenizer, [queries[i] for i in idx], [passages[i] for i in idx], max_length, device)
            with autocast(device, dtype):
                logits = model(**batch).logits[:, 0]
            out[idx] = logits.float().cpu().numpy()
    return out


class TeacherTrainer:
    """The cross-encoder's part of retroflow.training's loop: listwise batches and their loss.

    Each query's group (its positive first, then `negatives_per_query` hard negatives) is one
    softmax; the loss is cross-entropy on the positive."""

    LAST_CHECKPOINTS_KEPT = 1  # TeacherConfig has no keep_checkpoints; the newest is all a resume needs

    def __init__(self, config: TeacherConfig, train, pools: dict[str, list[str]], init: Path):
        self.config, self.train_set, self.pools = config, train, pools
        self.run_config = config.canonical()  # what checkpoints record; `_train_teacher` adds the dataset's and init's identity
        self.acc = make_accelerator(config)
        seed_everything(config.seed)  # the fresh classification head's initial weights
        model, self.tokenizer = load_cross_encoder(init)
        self.steps = config.max_steps or max(1, math.ceil(config.epochs * len(train) / config.batch_size))
        optimizer, self.scheduler = make_optimizer(
            model, lr=config.lr, weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio, total_steps=self.steps
        )
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.plan = BatchPlan(train, config.batch_size, config.negatives_per_query, config.seed)

    @property
    def dtype(self) -> torch.dtype:
        """The precision scoring runs at, as training did."""
        return pick_dtype(self.acc.device, self.config.precision)

    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def batches(self, start: int):
        return (self.plan.global_batch(step, self.pools) for step in range(start, self.steps))

    def train_step(self, step: int, samples: list[Sample]) -> dict[str, float]:
        group = 1 + self.config.negatives_per_query
        queries = [s.query for s in samples for _ in range(group)]
        passages = [self.train_set.passages[d] for s in samples for d in [s.positive, *s.negatives]]
        batch = pair_batch(self.tokenizer, queries, passages, self.config.max_length, self.acc.device)
        # the prepared model autocasts to the run's precision itself (and fp16 gets a grad scaler)
        logits = self.model(**batch).logits[:, 0].float().view(len(samples), group)
        loss = F.cross_entropy(logits, torch.zeros(len(samples), dtype=torch.long, device=self.acc.device))
        self.acc.backward(loss)
        apply_gradients(self.acc, self.model, self.optimizer, self.scheduler, self.config.max_grad_norm)
        return {"loss": float(loss.detach())}

    def train(self, checkpoint_dir: Path, resume: bool, stop_after: int | None) -> TrainerState:
        settings = LoopSettings(
            label="teacher",
            max_steps=self.steps,
            checkpoint_dir=checkpoint_dir,
            save_every=self.config.save_every,
            keep_checkpoints=self.LAST_CHECKPOINTS_KEPT,
            log_every=self.config.log_every,
            config=self.run_config,
        )
        loop = TrainingLoop(self.acc, self.model, self.optimizer, self.scheduler, settings)
        return loop.run(self, resume=resume, stop_after=stop_after)

    def save(self, dest: Path) -> None:
        """The trained model and its tokenizer, published whole (retroflow.publish)."""
        check_replaceable_model_dir(dest)
        with publishing(dest, replace=True) as staging:
            self.unwrapped().save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)


def write_teacher_card(
    model_dir: Path, config: TeacherConfig, dataset, init_label: str, dev_check: dict, steps: int, losses: list[float]
) -> None:
    """A model card for the trained cross-encoder: what it is, how it was trained, its dev check."""
    from retroflow.model_card import ModelCard, write_model_card

    training = {
        "steps": steps,
        "final_loss": round(float(np.mean(losses[-10:])), 4) if losses else None,
        **{k: v for k, v in dev_check.items() if k.startswith("dev_") and k != "dev_check_seconds"},
    }
    summary = (
        f"A cross-encoder reranker trained from `{init_label}` by retroflow's `teacher` stage on {dataset.name} "
        f"({config.split} queries, mined negatives). It scores (query, passage) pairs; the dev check below compares "
        "its reranking of held-out queries with BM25's."
    )
    card = ModelCard(
        name=f"retroflow teacher: cross-encoder on {dataset.name}",
        base_model=init_label,
        datasets=[dataset.name],
        max_seq_length=config.max_length,
        configs={"teacher": config.canonical()},
        training=training,
        summary=summary,
        kind="cross-encoder",
    )
    write_model_card(model_dir, card)


def _train_teacher(
    config: TeacherConfig,
    dataset,
    init: Path,
    init_label: str,
    negatives_file: Path,
    out_dir: Path,
    partial_dir: Path,
    resume: bool,
    stop_after: int | None,
) -> dict:
    """Train the cross-encoder from `init`, then score every training query's candidates into the scores file."""
    out_dir, partial_dir = Path(out_dir), Path(partial_dir)
    check_replaceable_model_dir(out_dir / TEACHER_DIR)  # before training, not after it
    train = training_queries(config.selection(), dataset)
    mined = read_negatives(negatives_file)
    pools = {qid: [d for d in docs if d not in train.positives_of(qid)] for qid, docs in mined.negatives.items()}
    trainer = TeacherTrainer(config, train, pools, init)
    trainer.run_config = run_identity(config.canonical(), dataset=dataset, init=init)
    state = trainer.train(partial_dir / "checkpoints", resume=resume, stop_after=stop_after)
    losses = state.history("loss")
    if stop_after is not None and state.global_step >= stop_after:  # stopped at the last step too: no outputs then either
        return {"steps": state.global_step, "loss_history": losses, "stopped_early": True}
    model, device, dtype = trainer.unwrapped(), trainer.acc.device, trainer.dtype
    scored = score_training_candidates(config, model, trainer.tokenizer, train, mined.negatives, device, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.save(out_dir / TEACHER_DIR)
    dev_check = (
        rerank_dev_check(config, model, trainer.tokenizer, dataset, device, dtype) if config.dev_fraction and config.dev_check_depth else {}
    )
    pool = dev_check.pop("dev_pool", {})
    provenance = {
        "kind": "cross_encoder",
        "teacher_init": init_label,
        "dev_check": {k: v for k, v in dev_check.items() if k != "dev_check_seconds"},
        "dev_pool": pool,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "split": config.split,
        "negatives": mined.provenance,
        "candidates_per_query": config.candidates_per_query,
        "max_length": config.max_length,
    }
    write_teacher_scores(out_dir / SCORES_FILE, TeacherScores(provenance, scored["scores"]))
    write_teacher_card(out_dir / TEACHER_DIR, config, dataset, init_label, dev_check, state.global_step, losses)
    return {
        **dev_check,
        "final_loss": float(np.mean(losses[-10:])) if losses else math.nan,
        "steps": trainer.steps,
        "loss_history": losses,
        "train_seconds": round(state.seconds, 2),
        "score_seconds": scored["seconds"],
        "scored_pairs": scored["pairs"],
        "train_mrr_of_positive": scored["mrr"],
        "resumed_from": state.resumed_from,
        "num_train_queries": len(train),
        "scores_file": SCORES_FILE,  # relative to the output directory (a stage writes into a temporary one)
    }


def score_training_candidates(config: TeacherConfig, model, tokenizer, train, negatives: dict[str, list[str]], device, dtype) -> dict:
    """Teacher logits for each query's positives + best-ranked mined negatives; MRR of the positives."""
    started = time.perf_counter()
    queries, passages, owners = [], [], []
    candidates: dict[str, list[str]] = {}
    for ex in train.examples:
        negs = [d for d in negatives.get(ex.qid, []) if d not in train.positives_of(ex.qid)][: config.candidates_per_query]
        docs = list(dict.fromkeys([*ex.positives, *negs]))
        candidates[ex.qid] = docs
        for doc in docs:
            queries.append(ex.query)
            passages.append(train.passages[doc])
            owners.append((ex.qid, doc))
    logits = score_pairs(model, tokenizer, queries, passages, config.max_length, config.score_batch_size, device, dtype)
    by_query: dict[str, dict[str, float]] = {}
    for (qid, doc), value in zip(owners, logits):
        by_query.setdefault(qid, {})[doc] = float(value)
    reciprocal = []
    for ex in train.examples:
        ranked = sorted(by_query[ex.qid].items(), key=lambda kv: -kv[1])
        first = next(i for i, (d, _) in enumerate(ranked) if d in set(ex.positives))
        reciprocal.append(1.0 / (first + 1))
    return {"scores": by_query, "pairs": len(owners), "mrr": float(np.mean(reciprocal)), "seconds": round(time.perf_counter() - started, 2)}


def rerank_dev_check(config: TeacherConfig, model, tokenizer, dataset, device, dtype) -> dict[str, float | int]:
    """nDCG@10 of BM25's top `dev_check_depth` for the held-out dev queries, as BM25 ranks them
    and as the teacher reranks them. A teacher below BM25 would teach the student worse
    rankings than the negatives' own source, so that case is logged as a warning."""
    from retrieval.serving.bm25 import BM25Retriever
    from retrieval.serving.search import drop_self_hits
    from retroflow.metrics import evaluate_run

    started = time.perf_counter()
    judged = beir_training_set(dataset, config.split, config.min_grade)
    _, dev = dev_split([ex.qid for ex in judged.examples], config.dev_fraction, config.dev_seed)
    query_text = {ex.qid: ex.query for ex in judged.examples}
    all_qrels = dataset.split_qrels(config.split)
    qrels = {q: all_qrels[q] for q in dev}
    first_stage = drop_self_hits(
        BM25Retriever(dataset.doc_ids(), dataset.doc_texts()).search({q: query_text[q] for q in dev}, config.dev_check_depth)
    )
    pairs = [(q, d) for q, hits in first_stage.items() for d in hits]
    logits = score_pairs(
        model,
        tokenizer,
        [query_text[q] for q, _ in pairs],
        [judged.passages[d] for _, d in pairs],
        config.max_length,
        config.score_batch_size,
        device,
        dtype,
    )
    reranked: dict[str, dict[str, float]] = {}
    for (q, d), value in zip(pairs, logits):
        reranked.setdefault(q, {})[d] = float(value)
    bm25 = evaluate_run(qrels, first_stage, ["ndcg@10"])[0]["ndcg@10"]
    teacher = evaluate_run(qrels, reranked, ["ndcg@10"])[0]["ndcg@10"]
    log.info(
        "teacher on %d dev queries: BM25 top-%d nDCG@10 %.4f, reranked by the teacher %.4f", len(dev), config.dev_check_depth, bm25, teacher
    )
    if teacher < bm25:
        log.warning(
            "the teacher reranks the dev queries worse than BM25 (nDCG@10 %.4f < %.4f): distilling from it will "
            "likely hurt; train it longer or from a stronger checkpoint",
            teacher,
            bm25,
        )
    return {
        "dev_queries": len(dev),
        DEV_BM25: round(bm25, 4),
        DEV_TEACHER: round(teacher, 4),
        "dev_check_seconds": round(time.perf_counter() - started, 2),
        "dev_pool": dev_pool(reranked, config.dev_pool_depth),
    }


def dev_pool(run: dict[str, dict[str, float]], depth: int) -> dict[str, list[str]]:
    """Each dev query's top `depth` documents as the teacher ranks them: the candidates on which
    fine-tuning scores its student before it decides to distil (`retrieval.training.finetune.distillation_gate`)."""
    from retrieval.serving.hybrid import top_hits

    return {q: [d for d, _ in top_hits(hits, depth)] for q, hits in sorted(run.items())} if depth else {}


# ---------------------------------------------------------------------------------------- fusion teacher


def fusion_searcher(config: TeacherConfig, dataset, init: Path, embeddings_dir: Path | None = None):
    from retrieval.serving.bm25 import BM25Retriever
    from retrieval.serving.encode import corpus_vectors
    from retrieval.serving.encoder import Encoder, EncoderSettings
    from retrieval.serving.hybrid import HybridSearcher, dense_side

    encoder = Encoder(
        init,
        EncoderSettings(
            query_max_length=config.query_max_length,
            passage_max_length=config.passage_max_length,
            device=config.device,
            show_progress=False,
        ),
    )
    texts = dataset.doc_texts()
    vectors = corpus_vectors(embeddings_dir, dataset.doc_ids()) if embeddings_dir else None
    dense = dense_side(encoder, dataset.doc_ids(), texts, doc_vectors=vectors)
    return HybridSearcher(dense, BM25Retriever(dataset.doc_ids(), texts), config.fusion, texts)


def cross_fitted_ndcg(dense, bm25, qrels: dict, settings: FusionSettings, seed: int) -> float:
    """nDCG@10 of the weight-choosing procedure on queries it did not choose on (2-fold)."""
    from retrieval.serving.hybrid import choose_weight, fuse_minmax
    from retroflow.metrics import evaluate_run

    qids = sorted(qrels)
    random.Random(seed).shuffle(qids)
    halves = [qids[: len(qids) // 2], qids[len(qids) // 2 :]]
    per_query = {}
    for choose_on, score_on in (halves, halves[::-1]):
        weight, _ = choose_weight(dense, bm25, {q: qrels[q] for q in choose_on}, settings)
        fused = fuse_minmax({q: dense.get(q, {}) for q in score_on}, {q: bm25.get(q, {}) for q in score_on}, weight, settings.depth)
        _, scored = evaluate_run({q: qrels[q] for q in score_on}, fused, ["ndcg@10"])
        per_query.update(scored["ndcg@10"])
    return float(np.mean(list(per_query.values())))


def _fusion_teacher(config: TeacherConfig, dataset, init: Path, init_label: str, out_dir: Path, embeddings_dir: Path | None) -> dict:
    """Score every training query's candidates with the fusion of BM25 and `init` (weight chosen on dev)."""
    from retrieval.serving.hybrid import dev_hold_out, fuse_minmax, top_hits
    from retroflow.metrics import evaluate_run

    started = time.perf_counter()
    fusion = config.fusion.model_copy(update={"dev_split": config.split, "dev_fraction": config.dev_fraction, "dev_seed": config.dev_seed})
    config = config.model_copy(update={"fusion": fusion})
    train = training_queries(config.selection(), dataset)
    searcher = fusion_searcher(config, dataset, init, embeddings_dir)
    held_out = dev_hold_out(dataset, fusion)
    if held_out is None:
        raise ValueError(f"teacher.kind fusion: dataset {dataset.name} has no split '{config.split}' to hold dev queries out of")
    dev_queries, dev_qrels = held_out
    if set(dev_queries) & {ex.qid for ex in train.examples}:
        raise ValueError("teacher: dev queries overlap the training queries (dev_fraction/dev_seed differ from the data selection)")
    dense_dev, bm25_dev = searcher.side_runs(dev_queries)
    selection = searcher.select_weight(dev_queries, dev_qrels, dev_runs=(dense_dev, bm25_dev))
    weight = selection["weight"]
    pool = dev_pool(fuse_minmax(dense_dev, bm25_dev, weight, fusion.depth), config.dev_pool_depth)
    dev_check = {
        "dev_queries": len(dev_queries),
        DEV_BM25: round(evaluate_run(dev_qrels, bm25_dev, ["ndcg@10"])[0]["ndcg@10"], 4),
        DEV_DENSE: round(evaluate_run(dev_qrels, dense_dev, ["ndcg@10"])[0]["ndcg@10"], 4),
        DEV_TEACHER: round(cross_fitted_ndcg(dense_dev, bm25_dev, dev_qrels, fusion, config.dev_seed), 4),
        "dev_teacher_ndcg@10_at_chosen_weight": selection.get("selection_ndcg@10"),
    }
    queries = {ex.qid: ex.query for ex in train.examples}
    dense_train, bm25_train = searcher.side_runs(queries)
    fused = fuse_minmax(dense_train, bm25_train, weight, fusion.depth)
    scores, reciprocal = {}, []
    bar = progress_bar(total=len(train.examples), desc="teacher", unit="query")
    for ex in train.examples:
        bar.update(1)
        hits = fused.get(ex.qid, {})
        ranked = [d for d, _ in top_hits(hits, len(hits))]
        candidates = [d for d in ranked if d not in train.positives_of(ex.qid)][: config.candidates_per_query]
        docs = list(dict.fromkeys([*ex.positives, *candidates]))
        scores[ex.qid] = {d: float(hits.get(d, 0.0)) for d in docs}
        first = next((i for i, d in enumerate(ranked) if d in set(ex.positives)), None)
        reciprocal.append(0.0 if first is None else 1.0 / (first + 1))
    bar.close()
    if dev_check[DEV_TEACHER] < max(dev_check[DEV_BM25], dev_check[DEV_DENSE]):
        log.warning("the fusion teacher ranks the dev queries below one of its parts (%s): distillation will be skipped", dev_check)
    provenance = {
        "kind": "fusion",
        "teacher_init": init_label,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "split": config.split,
        "fusion": {**selection, "depth": fusion.depth},
        "dev_check": dev_check,
        "dev_pool": pool,
        "candidates_per_query": config.candidates_per_query,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_teacher_scores(out_dir / SCORES_FILE, TeacherScores(provenance, scores))
    log.info(
        "fusion teacher: weight %.2f, dev nDCG@10 BM25 %.4f dense %.4f fusion (cross-fitted) %.4f",
        weight,
        dev_check[DEV_BM25],
        dev_check[DEV_DENSE],
        dev_check[DEV_TEACHER],
    )
    return {
        **dev_check,
        "kind": "fusion",
        "fusion_weight": weight,
        "scored_pairs": sum(len(v) for v in scores.values()),
        "train_mrr_of_positive": float(np.mean(reciprocal)),
        "num_train_queries": len(train),
        "score_seconds": round(time.perf_counter() - started, 2),
        "scores_file": SCORES_FILE,
    }


def run(
    config: TeacherConfig,
    inputs: Mapping[str, Input],
    out_dir: Path,
    partial_dir: Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
) -> dict:
    """The `teacher` stage: score every training query's candidates into `out_dir/teacher_scores.jsonl`.

    Inputs: `data`, `init` (the teacher's model) and `negatives` (cross-encoder) or `embeddings`
    (fusion: the init model's corpus vectors, optional). The cross-encoder trains first (into
    `out_dir/teacher/`), checkpointing to `partial_dir/checkpoints` and resuming from there
    (`resume`); `stop_after` ends its loop after that step without outputs (how tests stand in
    for a kill)."""
    from retrieval.training.negatives import NEGATIVES_FILE
    from retroflow.data import open_dataset
    from retroflow.inputs import model_dir, model_folder_label

    dataset = open_dataset(inputs["data"])
    init, init_label = model_dir(inputs["init"]), model_folder_label(inputs["init"])
    if config.kind == "fusion":
        embeddings = inputs.get("embeddings")
        return _fusion_teacher(config, dataset, init, init_label, out_dir, embeddings.path if embeddings else None)
    if "negatives" not in inputs:
        raise ValueError("teacher: the cross_encoder kind trains on mined negatives: the `negatives` input (--negatives FILE)")
    negatives_file = inputs["negatives"].file(NEGATIVES_FILE)
    return _train_teacher(config, dataset, init, init_label, negatives_file, out_dir, partial_dir, resume, stop_after)
