"""Natural Questions (and the other DPR open-domain QA sets): DPR's retriever evaluation.

A question counts as answered at k when one of its top-k passages contains one of its
answer strings. "Contains" follows DPR's `has_answer` (string mode):

1. both texts are Unicode-normalised to NFD (so a precomposed "é" equals "e" + U+0301),
2. split into tokens: runs of letters/digits/combining marks, and every other single
   non-space, non-control character (so punctuation becomes its own token),
3. tokens are lower-cased,
4. the answer's token sequence must occur contiguously in the passage's token sequence.

Consequences worth knowing (all DPR's): "Beyonce" does not match "Beyoncé" (the accent is
a token character), "U.S." does not match "US", the article in "the Beatles" must be there
too, and "art" does not match inside "party" (token-level, not substring). The passage
title is not searched, as in DPR. `match="regex"` treats each answer as a regular
expression over the NFD text (DPR's mode for CuratedTREC).

`normalize_answer` is DPR's reader-side normalisation (lower-case, drop punctuation and
the articles a/an/the, collapse spaces), for exact-match scoring of extracted answers.

Readers: `read_qa_file` for `nq-<split>.qa.csv` (question<TAB>python list of answers),
DPR's `nq-<split>.json` (list of records with `question` and `answers`) and `.jsonl`
(one record per line, `answers` or `answer`); `read_passages` for `psgs_w100.tsv`
(`id<TAB>text<TAB>title` with a header row and CSV quoting).
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import logging
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import regex

from retroflow.artifacts import cache_root
from retroflow.data.beir import BeirDataset, DatasetError, iter_jsonl_records
from retroflow.hashing import files_digest, sha256_text, stat_signature
from retroflow.publish import publishing

log = logging.getLogger(__name__)

NQ_METRICS = ("accuracy@1", "accuracy@5", "accuracy@20", "accuracy@100")
_ACCURACY = re.compile(r"^accuracy@(\d+)$")

# Letters, digits and combining marks form words; any other visible character is a token of its own.
_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=regex.UNICODE | regex.MULTILINE)


def parse_accuracy_metric(name: str) -> int:
    match = _ACCURACY.match(name.lower())
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"unknown NQ metric '{name}' (use accuracy@k, e.g. accuracy@20)")
    return int(match.group(1))


# ---------------------------------------------------------------------------------------
# DPR's answer matching
# ---------------------------------------------------------------------------------------


def dpr_tokens(text: str) -> list[str]:
    """NFD-normalised, lower-cased tokens as DPR's SimpleTokenizer yields them."""
    return [token.lower() for token in _TOKEN.findall(unicodedata.normalize("NFD", text))]


def contains_sequence(tokens: Sequence[str], needle: Sequence[str]) -> bool:
    width = len(needle)
    first = needle[0]
    return any(tokens[i] == first and list(tokens[i : i + width]) == list(needle) for i in range(len(tokens) - width + 1))


def regex_matches(text: str, pattern: str) -> bool:
    try:
        compiled = regex.compile(pattern, flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)
    except regex.error:
        return False  # DPR treats an answer that is not a valid pattern as "no match"
    return compiled.search(text) is not None


def has_answer(answers: Iterable[str], text: str, match: Literal["string", "regex"] = "string") -> bool:
    """Does `text` contain one of `answers` (DPR's retriever criterion)? Empty answers never match."""
    if match == "regex":
        text = unicodedata.normalize("NFD", text)
        return any(answer and regex_matches(text, unicodedata.normalize("NFD", answer)) for answer in answers)
    if match != "string":
        raise ValueError(f"unknown match mode '{match}' (use string or regex)")
    tokens = dpr_tokens(text)
    for answer in answers:
        needle = dpr_tokens(answer)
        if needle and contains_sequence(tokens, needle):
            return True
    return False


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Reader-side normalisation (exact match): lower-case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    return any(normalize_answer(prediction) == normalize_answer(answer) for answer in answers)


# ---------------------------------------------------------------------------------------
# Scoring a retrieval run
# ---------------------------------------------------------------------------------------


def ranked_ids(hits: Mapping[str, float]) -> list[str]:
    """Best first; ties to the larger id, the same rule as the IR metrics (trec_eval's)."""
    return [doc for doc, _ in sorted(hits.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def first_answer_rank(
    answers: Sequence[str], ranking: Sequence[str], passage_text: Mapping[str, str], depth: int, match: str
) -> int | None:
    """1-based rank of the first passage (within `depth`) that contains an answer, or None."""
    for rank, pid in enumerate(ranking[:depth], start=1):
        if has_answer(answers, passage_text[pid], match):
            return rank
    return None


def score_answers(
    run: Mapping[str, Mapping[str, float]],
    answers: Mapping[str, Sequence[str]],
    passage_text: Mapping[str, str],
    metrics: Sequence[str] = NQ_METRICS,
    match: Literal["string", "regex"] = "string",
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Top-k retrieval accuracy: (means, per_query) in the `retroflow.metrics.evaluate_run` shape.

    Every question in `answers` counts; one missing from the run scores 0.
    """
    ks = {name: parse_accuracy_metric(name) for name in metrics}
    depth = max(ks.values())
    first_rank = {
        qid: first_answer_rank(list(answer_list), ranked_ids(run.get(qid, {})), passage_text, depth, match)
        for qid, answer_list in answers.items()
    }
    per_query = {name: {qid: float(rank is not None and rank <= k) for qid, rank in first_rank.items()} for name, k in ks.items()}
    means = {name: (sum(values.values()) / len(values) if values else 0.0) for name, values in per_query.items()}
    return means, per_query


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.suffix == ".gz" else open(path, encoding="utf-8", newline="")


def check_answers(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DatasetError(f"{where}: field 'answers' must be a list of strings, got {value!r}")
    if not value:
        raise DatasetError(f"{where}: field 'answers' is empty")
    return value


def read_qa_csv(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """DPR's `*.qa.csv`: question<TAB>answers as a Python list literal; no header, no ids."""
    questions: dict[str, str] = {}
    answers: dict[str, list[str]] = {}
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise DatasetError(f"{where}: expected 2 tab-separated fields (question, answers), got {len(row)}")
            try:
                parsed = ast.literal_eval(row[1])
            except (ValueError, SyntaxError):
                raise DatasetError(f"{where}: field 'answers' is not a Python list literal: {row[1][:80]!r}") from None
            qid = str(len(questions))
            questions[qid] = row[0]
            answers[qid] = check_answers(parsed, where)
    return questions, answers


def qa_record(record: object, where: str) -> tuple[str | None, str, list[str]]:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("question"), str):
        raise DatasetError(f"{where}: missing field 'question'")
    key = "answers" if "answers" in record else "answer"
    if key not in record:
        raise DatasetError(f"{where}: missing field 'answers'")
    explicit_id = next((record[k] for k in ("id", "qid", "_id") if k in record), None)
    return (None if explicit_id is None else str(explicit_id)), record["question"], check_answers(record[key], where)


def read_qa_json(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """DPR's `nq-<split>.json` (one JSON list) or `.jsonl` (a record per line)."""
    records: list[tuple[str, object]] = []
    if ".jsonl" in path.name:
        records = [(f"{path}, line {number}", record) for number, record in iter_jsonl_records(path)]
    else:
        with open_text(path) as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}, line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of question records, got {type(data).__name__}")
        records = [(f"{path}, record {i}", r) for i, r in enumerate(data)]
    questions: dict[str, str] = {}
    answers: dict[str, list[str]] = {}
    for index, (where, record) in enumerate(records):
        explicit_id, question, answer_list = qa_record(record, where)
        qid = explicit_id if explicit_id is not None else str(index)
        if qid in questions:
            raise DatasetError(f"{where}: duplicate question id '{qid}'")
        questions[qid], answers[qid] = question, answer_list
    return questions, answers


def read_qa_file(path: str | Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Questions and answers, keyed by id (the record's `id`, else its 0-based position)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: question file not found")
    if ".json" in path.name:
        questions, answers = read_qa_json(path)
    else:
        questions, answers = read_qa_csv(path)
    if not questions:
        raise DatasetError(f"{path}: no questions")
    return questions, answers


PASSAGE_COLUMNS = ("id", "text", "title")


def read_passages(path: str | Path) -> pa.Table:
    """`psgs_w100.tsv` (header `id text title`, CSV-quoted) -> Arrow table `_id`, `title`, `text`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: passages file not found")
    if path.stat().st_size == 0:  # Arrow would say only "Empty CSV file"
        raise DatasetError(f"{path}: the passages file is empty (expected a header 'id text title' and one passage a line)")
    try:
        # One line is one passage: quoting is off while splitting, so a stray `"` can never swallow
        # the lines after it (CSV quoting would silently merge them); quotes are undone per field below.
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in PASSAGE_COLUMNS}),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        locate_passage_error(path)
        raise
    missing = [c for c in PASSAGE_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(f"{path}, line 1: header must name the columns id, text, title; missing {', '.join(missing)}")
    table = pa.table({"_id": table.column("id"), "title": unquote(table.column("title")), "text": unquote(table.column("text"))})
    for name in ("_id", "text"):
        nulls = table.column(name).null_count
        if nulls:
            row = pc.index(pc.is_null(table.column(name)), True).as_py()
            raise DatasetError(f"{path}, data row {row + 1}: field '{'id' if name == '_id' else name}' is missing")
    if pc.count_distinct(table.column("_id")).as_py() != table.num_rows:
        seen: dict[str, int] = {}
        for row, pid in enumerate(table.column("_id").to_pylist(), start=1):
            if pid in seen:
                raise DatasetError(f"{path}, data row {row}: duplicate passage id '{pid}' (first at data row {seen[pid]})")
            seen[pid] = row
    if table.num_rows == 0:
        raise DatasetError(f"{path}: no passages")
    return table.combine_chunks()


def unquote(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """CSV-style quoted fields (a field in double quotes, inner quotes doubled) -> their text; other fields unchanged."""
    quoted = pc.and_(pc.and_(pc.starts_with(column, '"'), pc.ends_with(column, '"')), pc.greater_equal(pc.utf8_length(column), 2))
    inner = pc.replace_substring(pc.utf8_slice_codeunits(column, 1, -1), '""', '"')
    return pc.if_else(quoted, inner, column)


def locate_passage_error(path: Path) -> None:
    """Arrow's CSV errors have no line number: re-read line by line to name the line."""
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if line.strip() and len(fields) != 3:
                raise DatasetError(f"{path}, line {number}: expected 3 tab-separated fields (id, text, title), got {len(fields)}")


# ---------------------------------------------------------------------------------------
# A dataset: passages + one split's questions
# ---------------------------------------------------------------------------------------


@dataclass
class NQDataset:
    """Passages (as a BeirDataset, so the retrievers can use it) and one split's questions + answers."""

    name: str
    fingerprint: str
    split: str
    corpus: BeirDataset
    questions: dict[str, str]
    answers: dict[str, list[str]]
    _passage_text: dict[str, str] | None = field(default=None, repr=False)

    @property
    def num_docs(self) -> int:
        return self.corpus.num_docs

    def passage_text(self, include_title: bool = False) -> dict[str, str]:
        """What the answer is searched in: the passage text (DPR), optionally the title too."""
        if include_title:
            return dict(zip(self.corpus.doc_ids(), self.corpus.doc_texts()))
        if self._passage_text is None:
            self._passage_text = dict(zip(self.corpus.doc_ids(), self.corpus.corpus.column("text").to_pylist()))
        return self._passage_text


QA_PATTERNS = (
    "*{split}.qa.csv",
    "*{split}.qa.tsv",
    "*-{split}.csv",
    "*-{split}.tsv",
    "*-{split}.json",
    "*-{split}.jsonl",
    "*-{split}.json.gz",
    "*-{split}.jsonl.gz",
)


def find_unique(root: Path, patterns: Sequence[str], what: str, hint: str) -> Path:
    found = sorted({p for pattern in patterns for p in root.rglob(pattern) if p.is_file() and "psgs" not in p.name})
    if not found:
        raise DatasetError(f"{root}: no {what} found (looked for {', '.join(patterns)}); {hint}")
    if len(found) > 1:
        raise DatasetError(f"{root}: several {what} files ({', '.join(str(p) for p in found)}); {hint}")
    return found[0]


def locate_nq_files(source: str | Path | None, split: str, passages: str | None, questions: str | None) -> tuple[Path, Path]:
    """(passages file, questions file): explicit paths win, else found under `source`."""
    root = Path(source).expanduser() if source else None
    if passages is None or questions is None:
        if root is None or not root.is_dir():
            raise DatasetError(f"NQ dataset directory '{source}' not found (or set nq.passages and nq.questions)")
    passage_path = Path(passages) if passages else None
    if passage_path is None:
        candidates = sorted(p for pattern in ("psgs*.tsv", "psgs*.tsv.gz") for p in root.rglob(pattern))
        if len(candidates) != 1:
            what = "no" if not candidates else "several"
            raise DatasetError(f"{root}: {what} passage files (psgs*.tsv) found; set nq.passages=PATH")
        passage_path = candidates[0]
    question_path = (
        Path(questions)
        if questions
        else find_unique(root, [p.format(split=split) for p in QA_PATTERNS], f"question files for split '{split}'", "set nq.questions=PATH")
    )
    return passage_path, question_path


PARSER_VERSION = "2"  # bump when parsing changes what a file yields: cached parses are then redone


def file_signature(paths: Sequence[Path]) -> str:
    return stat_signature(paths, f"parser {PARSER_VERSION}")


def cached_passages(passage_path: Path, cache: Path) -> BeirDataset:
    """Parse the passages once into `<cache>/nq/<signature>/corpus.parquet` and wrap them."""
    folder = cache / "nq" / file_signature([passage_path])
    meta_file = folder / "passages.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        corpus = pq.read_table(folder / "corpus.parquet")
    else:
        corpus = read_passages(passage_path)
        meta = {"source": str(passage_path.resolve()), "fingerprint": files_digest([passage_path])[:24], "num_docs": corpus.num_rows}
        with publishing(folder) as staging:  # another process may publish first: theirs is kept
            pq.write_table(corpus, staging / "corpus.parquet")
            (staging / "passages.json").write_text(json.dumps(meta, indent=2))
    empty_queries = pa.table({"_id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    return BeirDataset(name=passage_path.name, fingerprint=meta["fingerprint"], path=folder, corpus=corpus, queries=empty_queries, qrels={})


def load_nq(
    source: str | Path | None,
    split: str = "test",
    passages: str | None = None,
    questions: str | None = None,
    cache_dir: str | Path | None = None,
) -> NQDataset:
    """Passages + one split's questions/answers from a DPR-layout directory or explicit files."""
    passage_path, question_path = locate_nq_files(source, split, passages, questions)
    cache = Path(cache_dir) if cache_dir else cache_root()
    corpus = cached_passages(passage_path, cache)
    question_text, answers = read_qa_file(question_path)
    fingerprint = sha256_text(f"{corpus.fingerprint}|{files_digest([question_path])[:24]}")[:24]
    name = Path(source).expanduser().resolve().name if source and Path(source).expanduser().is_dir() else question_path.name.split("-")[0]
    log.info("NQ-style dataset %s/%s: %d questions over %d passages", name, split, len(question_text), corpus.num_docs)
    return NQDataset(name=name, fingerprint=fingerprint, split=split, corpus=corpus, questions=question_text, answers=answers)
