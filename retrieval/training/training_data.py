"""Training data: (query, positive passages[, given negatives]) from BEIR, MS MARCO and NQ (DPR
JSON), the choice of training queries, and the order they are trained in.

Every loader returns a `TrainingSet`: the examples plus a passage table (doc id -> text), so
the trainer, the negative miner and the teacher all address passages by id. Sources:

- BEIR: `qrels/<split>.tsv` + `queries.jsonl` + `corpus.jsonl` through `retroflow.data.beir.BeirDataset`;
  passages are `title + " " + text`, exactly as the encoder sees them at evaluation time.
- MS MARCO: `qrels.train.tsv` (TREC or BEIR layout) with `queries.train.tsv` and
  `collection.tsv`; or `triples.train.small.tsv` (query, positive text, negative text), whose
  passages get content-derived ids (`t<sha1>`), so the same text always has the same id.
- NQ in DPR's JSON: a list of {question, positive_ctxs, negative_ctxs, hard_negative_ctxs},
  each ctx {title, text, passage_id?}; `hard_negative_ctxs` become the example's given negatives.

A query without any positive is an error naming the file and query (or dropped with
`on_missing_positive="skip"`), because a contrastive example without a positive is meaningless.

`training_queries` selects a split's training queries (`QuerySelection`: the dev hold-out,
`max_queries`) for the teacher and fine-tuning alike; `BatchPlan` turns them into the global
batch of each step (`Sample`s), a pure function of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from retroflow.data.splits import dev_split

log = logging.getLogger(__name__)

MissingPositive = Literal["error", "skip"]


class TrainingDataError(ValueError):
    """Bad fine-tuning input; the message names the file and the query or line."""


@dataclass(frozen=True)
class TrainingExample:
    qid: str
    query: str
    positives: tuple[str, ...]  # doc ids, best first
    negatives: tuple[str, ...] = ()  # negatives given by the source (DPR hard_negative_ctxs, triples)


@dataclass
class TrainingSet:
    examples: list[TrainingExample]
    passages: dict[str, str]  # doc id -> text the encoder sees
    judged: dict[str, set[str]] = field(default_factory=dict)  # qid -> every judged-positive doc id
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def by_qid(self) -> dict[str, TrainingExample]:
        return {ex.qid: ex for ex in self.examples}

    def subset(self, qids: Iterable[str]) -> TrainingSet:
        keep = set(qids)
        return TrainingSet([ex for ex in self.examples if ex.qid in keep], self.passages, self.judged, self.source)

    def positives_of(self, qid: str) -> set[str]:
        return self.judged.get(qid, set())


def _no_positive(where: str, qid: str, policy: MissingPositive) -> None:
    message = f"{where}: query '{qid}' has no positive passage (no judgment with grade >= the minimum)"
    if policy == "error":
        raise TrainingDataError(message + "; fix the qrels or pass on_missing_positive='skip'")
    log.warning("%s (skipped)", message)


# ---------------------------------------------------------------------------------------- BEIR


def beir_training_set(
    dataset,
    split: str = "train",
    min_grade: int = 1,
    on_missing_positive: MissingPositive = "error",
    query_ids: Iterable[str] | None = None,
) -> TrainingSet:
    """Examples from a `BeirDataset` split; positives are documents graded >= `min_grade`."""
    qrels = dataset.split_qrels(split)
    queries = dataset.split_queries(split)
    wanted = set(query_ids) if query_ids is not None else None
    passages = dict(zip(dataset.doc_ids(), dataset.doc_texts()))
    where = f"{dataset.path}/qrels ({dataset.name}, split '{split}')"
    examples, judged = [], {}
    for qid in sorted(qrels):
        if wanted is not None and qid not in wanted:
            continue
        grades = qrels[qid]
        positives = sorted((d for d, g in grades.items() if g >= min_grade), key=lambda d: (-grades[d], d))
        if not positives:
            _no_positive(where, qid, on_missing_positive)
            continue
        if qid not in queries:
            raise TrainingDataError(f"{where}: query '{qid}' is judged but missing from the queries file")
        examples.append(TrainingExample(qid, queries[qid], tuple(positives)))
        judged[qid] = {d for d, g in grades.items() if g >= 1}
    if not examples:
        raise TrainingDataError(f"{where}: no training examples")
    return TrainingSet(examples, passages, judged, source=f"beir:{dataset.name}:{split}")


def judged_positives(dataset, min_grade: int = 1) -> dict[str, set[str]]:
    """qid -> documents judged relevant in *any* split (so a negative is never a known positive)."""
    out: dict[str, set[str]] = {}
    for split in dataset.splits:
        for qid, grades in dataset.split_qrels(split).items():
            out.setdefault(qid, set()).update(d for d, g in grades.items() if g >= min_grade)
    return out


# ---------------------------------------------------------------------------------------- MS MARCO


def _read_tsv(path: Path, columns: int) -> Iterable[tuple[int, list[str]]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < columns:
                raise TrainingDataError(f"{path}, line {number}: expected {columns} tab-separated fields, got {len(parts)}")
            yield number, parts


def msmarco_qrels_training_set(
    qrels_file: Path, queries_file: Path, collection_file: Path, on_missing_positive: MissingPositive = "error"
) -> TrainingSet:
    """MS MARCO passage training data: qrels (`qid 0 pid 1` or `qid pid grade`) + queries.tsv + collection.tsv."""
    qrels: dict[str, dict[str, int]] = {}
    for number, parts in _read_tsv(Path(qrels_file), 3):
        if number == 1 and parts[0] == "query-id":
            continue
        qid, pid, grade = (parts[0], parts[2], parts[3]) if len(parts) >= 4 else parts[:3]
        try:
            qrels.setdefault(qid, {})[pid] = int(grade)
        except ValueError:
            raise TrainingDataError(f"{qrels_file}, line {number}: grade {grade!r} is not an integer") from None
    queries = {p[0]: p[1] for _, p in _read_tsv(Path(queries_file), 2)}
    needed = {pid for grades in qrels.values() for pid in grades}
    passages = {p[0]: p[1] for _, p in _read_tsv(Path(collection_file), 2) if p[0] in needed}
    examples, judged = [], {}
    for qid in sorted(qrels):
        positives = sorted(d for d, g in qrels[qid].items() if g >= 1)
        if not positives:
            _no_positive(str(qrels_file), qid, on_missing_positive)
            continue
        if qid not in queries:
            raise TrainingDataError(f"{qrels_file}: query '{qid}' is not in {queries_file}")
        missing = [d for d in positives if d not in passages]
        if missing:
            raise TrainingDataError(f"{qrels_file}: passage '{missing[0]}' of query '{qid}' is not in {collection_file}")
        examples.append(TrainingExample(qid, queries[qid], tuple(positives)))
        judged[qid] = set(positives)
    return TrainingSet(examples, passages, judged, source=f"msmarco-qrels:{qrels_file}")


def text_id(text: str) -> str:
    return "t" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def msmarco_triples_training_set(triples_file: Path, max_lines: int | None = None) -> TrainingSet:
    """`query \\t positive \\t negative` text triples; one example per distinct query, negatives merged."""
    positives: dict[str, list[str]] = {}
    negatives: dict[str, list[str]] = {}
    passages: dict[str, str] = {}
    for number, parts in _read_tsv(Path(triples_file), 3):
        if max_lines is not None and number > max_lines:
            break
        query, pos, neg = parts[0], parts[1], parts[2]
        if not pos.strip():
            raise TrainingDataError(f"{triples_file}, line {number}: empty positive passage")
        pos_id, neg_id = text_id(pos), text_id(neg)
        passages[pos_id], passages[neg_id] = pos, neg
        if pos_id not in positives.setdefault(query, []):
            positives[query].append(pos_id)
        if neg_id not in negatives.setdefault(query, []):
            negatives[query].append(neg_id)
    examples, judged = [], {}
    for query in positives:
        qid = text_id(query)
        negs = tuple(d for d in negatives[query] if d not in positives[query])
        examples.append(TrainingExample(qid, query, tuple(positives[query]), negs))
        judged[qid] = set(positives[query])
    return TrainingSet(examples, passages, judged, source=f"msmarco-triples:{triples_file}")


# ---------------------------------------------------------------------------------------- NQ (DPR JSON)


def _ctx_id(ctx: Mapping, where: str) -> str:
    if not isinstance(ctx, Mapping) or not isinstance(ctx.get("text"), str):
        raise TrainingDataError(f"{where}: each ctx must be an object with a string 'text'")
    for key in ("passage_id", "psg_id", "id"):
        if ctx.get(key) not in (None, ""):
            return str(ctx[key])
    return text_id((ctx.get("title") or "") + "\n" + ctx["text"])


def _ctx_text(ctx: Mapping) -> str:
    return ((ctx.get("title") or "") + " " + ctx["text"]).strip()


def dpr_json_training_set(path: Path, on_missing_positive: MissingPositive = "error") -> TrainingSet:
    """DPR's NQ training JSON (a list of questions with positive/negative/hard-negative ctxs)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TrainingDataError(f"{path}: malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(records, list):
        raise TrainingDataError(f"{path}: expected a JSON list of questions, got {type(records).__name__}")
    examples, passages, judged = [], {}, {}
    for number, record in enumerate(records):
        where = f"{path}, record {number}"
        if not isinstance(record, Mapping) or not isinstance(record.get("question"), str):
            raise TrainingDataError(f"{where}: missing string field 'question'")
        qid = str(record.get("id", record.get("qid", number)))
        ids = {}
        for key in ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs"):
            ctxs = record.get(key) or []
            if not isinstance(ctxs, list):
                raise TrainingDataError(f"{where}: field '{key}' must be a list")
            ids[key] = [_ctx_id(c, f"{where}, {key}") for c in ctxs]
            passages.update((i, _ctx_text(c)) for i, c in zip(ids[key], ctxs))
        if not ids["positive_ctxs"]:
            _no_positive(where, qid, on_missing_positive)
            continue
        positives = tuple(dict.fromkeys(ids["positive_ctxs"]))
        hard = tuple(d for d in dict.fromkeys(ids["hard_negative_ctxs"]) if d not in positives)
        examples.append(TrainingExample(qid, record["question"], positives, hard))
        judged[qid] = set(positives)
    return TrainingSet(examples, passages, judged, source=f"dpr-json:{path}")


# ---------------------------------------------------------------------------------------- query selection


@dataclass(frozen=True)
class QuerySelection:
    """Which judged queries of a split are trained on. The teacher and fine-tuning must select
    alike (the same dev hold-out), so that the dev queries stay unseen by both."""

    split: str = "train"
    min_grade: int = 1
    dev_fraction: float = 0.0
    dev_seed: int = 0
    max_queries: int | None = None


def training_queries(selection: QuerySelection, dataset, training_set: TrainingSet | None = None) -> TrainingSet:
    """The training examples: the split's judged queries (or `training_set`'s) minus the dev hold-out (and max_queries)."""
    train = training_set or beir_training_set(dataset, selection.split, selection.min_grade)
    keep, _ = dev_split([ex.qid for ex in train.examples], selection.dev_fraction, selection.dev_seed)
    if selection.max_queries:
        keep = keep[: selection.max_queries]
    return train.subset(keep)


# ---------------------------------------------------------------------------------------- batches


@dataclass
class Sample:
    qid: str
    query: str
    positive: str
    negatives: list[str]


class BatchPlan:
    """Global batch of step s: a pure function of (seed, step, negatives pool).

    Step s takes slots s*B..(s+1)*B-1 of per-epoch permutations of the rows; the positive and
    the hard negatives of a slot are drawn from an RNG seeded with (seed, slot). A resumed run
    therefore replays exactly the batches the killed run would have seen, and every process can
    compute the doc ids of the whole global batch without communication."""

    def __init__(self, train: TrainingSet, batch_size: int, hard_negatives: int, seed: int, rows: str = "per_query"):
        self.train, self.batch_size, self.n, self.seed = train, batch_size, hard_negatives, seed
        self.examples = train.examples
        self.all_doc_ids = sorted(train.passages)
        # a row = (example index, its positive or None = a random one each time it comes round)
        if rows == "per_positive":
            self.rows = [(i, p) for i, ex in enumerate(self.examples) for p in ex.positives]
        else:
            self.rows = [(i, None) for i in range(len(self.examples))]
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return self._perms[epoch]

    def sample(self, slot: int, pools: dict[str, list[str]]) -> Sample:
        count = len(self.rows)
        index, positive = self.rows[int(self.permutation(slot // count)[slot % count])]
        example = self.examples[index]
        rng = np.random.default_rng([self.seed, 1, slot])
        if positive is None:
            positive = example.positives[int(rng.integers(len(example.positives)))]
        pool = pools.get(example.qid) or list(example.negatives)
        if self.n == 0:
            chosen: list[str] = []
        elif len(pool) >= self.n:
            chosen = [pool[i] for i in rng.choice(len(pool), self.n, replace=False)]
        elif pool:
            chosen = [pool[i] for i in rng.choice(len(pool), self.n, replace=True)]
        else:  # no mined negative for this query: random passages that are not its positives
            banned = self.train.positives_of(example.qid) | set(example.positives)
            chosen = []
            while len(chosen) < self.n:
                doc = self.all_doc_ids[int(rng.integers(len(self.all_doc_ids)))]
                if doc not in banned:
                    chosen.append(doc)
        return Sample(example.qid, example.query, positive, chosen)

    def global_batch(self, step: int, pools: dict[str, list[str]]) -> list[Sample]:
        return [self.sample(slot, pools) for slot in range(step * self.batch_size, (step + 1) * self.batch_size)]
