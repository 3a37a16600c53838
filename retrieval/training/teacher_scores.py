"""The teacher-scores file: what a distillation teacher hands to fine-tuning, and its only owner.

The `teacher` stage writes `teacher_scores.jsonl` into its output; fine-tuning reads nothing
else of the teacher, so the teacher never has to score again. The file is JSON lines:

    {"format": "retroflow-teacher-scores/1", "provenance": {...}}       line 1
    {"qid": ..., "doc_ids": [...], "scores": [...]}                      one line per training query

A query's candidates are its judged positives followed by the teacher's best-ranked other
documents. The provenance says which teacher and data made the scores; fine-tuning reads three
parts of it: `dataset_fingerprint` (scores of another dataset are refused), `dev_check` (the
teacher's figures on the dev hold-out, under the `DEV_*` names below: the distillation gate)
and `dev_pool` (each dev query's top documents as the teacher ranks them: where the gate scores
the student).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.training.negatives import read_headed_jsonl
from retroflow.publish import atomic_write_text

SCORES_FILE = "teacher_scores.jsonl"
FORMAT = "retroflow-teacher-scores/1"

# the dev check's figures (nDCG@10 on the held-out dev queries)
DEV_TEACHER = "dev_teacher_ndcg@10"
DEV_BM25 = "dev_bm25_ndcg@10"
DEV_DENSE = "dev_dense_ndcg@10"  # the fusion teacher's dense side
# the cross-encoder's name for DEV_TEACHER in files written before the two kinds shared one
LEGACY_DEV_TEACHER = "dev_teacher_rerank_ndcg@10"


@dataclass
class TeacherScores:
    """A teacher-scores file in memory."""

    provenance: dict[str, Any]
    scores: dict[str, dict[str, float]]  # training qid -> {candidate doc id: score}, positives first

    @property
    def dev_check(self) -> dict[str, Any]:
        return self.provenance.get("dev_check") or {}

    @property
    def dev_pool(self) -> dict[str, list[str]]:
        return self.provenance.get("dev_pool") or {}


def write_teacher_scores(path: Path, teacher: TeacherScores) -> None:
    """Write the file whole (atomically); scores are rounded to 5 decimals."""
    lines = [json.dumps({"format": FORMAT, "provenance": teacher.provenance})]
    for qid, docs in teacher.scores.items():
        lines.append(json.dumps({"qid": qid, "doc_ids": list(docs), "scores": [round(v, 5) for v in docs.values()]}))
    atomic_write_text(Path(path), "\n".join(lines) + "\n")


def read_teacher_scores(path: Path) -> TeacherScores:
    """The file at `path`; errors name the file and line."""
    provenance, records = read_headed_jsonl(path, FORMAT, "teacher scores")
    scores: dict[str, dict[str, float]] = {}
    for number, record in records:
        if "qid" not in record:
            raise ValueError(f"{path}, line {number}: no 'qid'")
        if len(record.get("doc_ids", [])) != len(record.get("scores", [None])):
            raise ValueError(f"{path}, line {number}: 'doc_ids' and 'scores' differ in length")
        scores[str(record["qid"])] = {str(d): float(s) for d, s in zip(record["doc_ids"], record["scores"])}
    return TeacherScores(with_current_names(provenance), scores)


def with_current_names(provenance: dict[str, Any]) -> dict[str, Any]:
    """`provenance` with an older file's dev-check name renamed, so readers know one name."""
    check = provenance.get("dev_check")
    if not isinstance(check, dict) or LEGACY_DEV_TEACHER not in check or DEV_TEACHER in check:
        return provenance
    return {**provenance, "dev_check": {(DEV_TEACHER if k == LEGACY_DEV_TEACHER else k): v for k, v in check.items()}}
