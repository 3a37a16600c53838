"""MS MARCO passage ranking and TREC Deep Learning: file readers and evaluation conventions.

Readers (each validates its input; errors name the file, line and field):

- `read_collection(path) -> pa.Table` (`_id`, `title`, `text`) for `collection.tsv` (pid<TAB>passage)
- `read_queries(path) -> dict[qid, text]` for `queries.<split>.tsv` (qid<TAB>query)
- `read_qrels(path) -> {qid: {pid: grade}}` for `qrels.<split>.tsv` / TREC DL `2019qrels-pass.txt`
  (`qid iter pid grade`, tab- or space-separated)
- `read_top1000(path) -> Top1000` for `top1000.<split>` (qid, pid, query, passage)
- `iter_triples(path)` for `triples.train.small.tsv` (query, positive, negative texts) or
  `qidpidtriples.*.tsv` (qid, pid+, pid-)
- `read_run(path) -> Run` for a run file in MS MARCO (`qid pid rank`) or TREC
  (`qid Q0 pid rank score tag`) format

`load_msmarco(source) -> BeirDataset`: a directory of official MS MARCO TSV files is
converted once into BEIR layout (cached under `$RETROFLOW_CACHE/msmarco/`) and loaded with
`retroflow.data.beir.load_dataset`, so it gets the same validation, fingerprint and Parquet
cache as any BEIR dataset; a BEIR-format directory (e.g. `trec-dl-2019-subset5k`) is
loaded as is.

Conventions (see docs/evaluation.md): MRR@10 is the reciprocal rank of the first relevant
passage within the top 10, averaged over every judged query (a query the run misses scores
0), as the official `msmarco_eval.py` does. On graded qrels (TREC DL, grades 0-3) binary
metrics (MRR, Recall, MAP) count only grade >= 2 as relevant, while nDCG uses the grades
as gains.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from retroflow.artifacts import cache_root
from retroflow.data.beir import BeirDataset, DatasetError, checked_grade, load_dataset, open_text_lines
from retroflow.hashing import stat_signature
from retroflow.publish import publishing, remove_if_empty

log = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

MSMARCO_METRICS = ("mrr@10", "recall@50", "recall@1000", "ndcg@10")
# TREC DL: "grade 1 (related) is not relevant" for binary measures (trec_eval -l 2).
TREC_DL_RELEVANCE_LEVEL = 2

# TREC DL's official file names -> split names (everything else is `<kind>.<split>.tsv`).
TREC_DL_QUERY_FILES = {"msmarco-test2019-queries": "dl19", "msmarco-test2020-queries": "dl20"}
TREC_DL_QRELS_FILES = {"2019qrels-pass": "dl19", "2020qrels-pass": "dl20"}


# ---------------------------------------------------------------------------------------
# Low-level TSV reading: a fast Arrow path, and a line-by-line path that finds the bad line
# ---------------------------------------------------------------------------------------


def split_fields(path: Path, number: int, line: str, names: tuple[str, ...]) -> list[str]:
    parts = line.split("\t")
    if len(parts) != len(names):
        raise DatasetError(f"{path}, line {number}: expected {len(names)} tab-separated fields ({', '.join(names)}), got {len(parts)}")
    return parts


def read_tsv_table(path: Path, names: tuple[str, ...]) -> pa.Table:
    """All-string Arrow table of a header-less TSV with no quoting (MS MARCO's files)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=list(names)),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False, double_quote=False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Arrow's message has no line number: re-read line by line to name the bad line.
        lines = 0
        for number, line in open_text_lines(path):
            split_fields(path, number, line, names)
            lines += 1
        if lines == 0:  # Arrow refuses an empty file outright
            return pa.table({n: pa.array([], pa.string()) for n in names})
        raise


def first_duplicate(path: Path, ids: list[str], kind: str) -> None:
    """Raise naming the line of the first repeated id (ids are in file order, blank lines aside)."""
    seen: dict[str, int] = {}
    for (number, _), value in zip(open_text_lines(path), ids):
        if value in seen:
            raise DatasetError(f"{path}, line {number}: duplicate {kind} id '{value}' (first seen at line {seen[value]})")
        seen[value] = number


def read_collection(path: str | Path) -> pa.Table:
    """`collection.tsv` (pid<TAB>passage) -> Arrow table `_id`, `title` (empty), `text`."""
    path = Path(path)
    table = read_tsv_table(path, ("_id", "text"))
    ids = table.column("_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        first_duplicate(path, ids.to_pylist(), "passage")
    if table.num_rows == 0:
        raise DatasetError(f"{path}: the collection is empty")
    title = pa.array([""] * table.num_rows, pa.string())
    return pa.table({"_id": ids, "title": title, "text": table.column("text")})


def read_queries(path: str | Path) -> dict[str, str]:
    """`queries.<split>.tsv` (qid<TAB>query) -> {qid: text}."""
    path = Path(path)
    queries: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in open_text_lines(path):
        qid, text = split_fields(path, number, line, ("qid", "query"))
        if qid in queries:
            raise DatasetError(f"{path}, line {number}: duplicate query id '{qid}' (first seen at line {lines[qid]})")
        queries[qid], lines[qid] = text, number
    return queries


def read_qrels(path: str | Path, check=None) -> Qrels:
    """MS MARCO / TREC qrels (`qid iter pid grade`, tabs or spaces; `qid pid grade` also accepted).

    `check(line number, qid, pid)` may raise for a row (unknown ids, named in this file and line)."""
    path = Path(path)
    qrels: Qrels = {}
    for number, line in open_text_lines(path):
        parts = line.split()
        if number == 1 and parts and parts[0] in ("query-id", "qid"):
            continue  # a header line
        if len(parts) == 4:
            qid, _, pid, grade = parts
        elif len(parts) == 3:
            qid, pid, grade = parts
        else:
            raise DatasetError(f"{path}, line {number}: expected 'qid iteration pid grade', got {len(parts)} fields")
        try:
            value = int(grade)
        except ValueError:
            raise DatasetError(f"{path}, line {number}: field 'grade' is not an integer: {grade!r}") from None
        value = checked_grade(value, path, f"line {number}")
        if check is not None:
            check(number, qid, pid)
        judged = qrels.setdefault(qid, {})
        if judged.get(pid, value) != value:
            raise DatasetError(f"{path}, line {number}: query '{qid}', passage '{pid}' graded {value} here and {judged[pid]} earlier")
        judged[pid] = value
    return qrels


@dataclass
class Top1000:
    """A re-ranking candidate file: candidate pids per query (file order) and the texts it carries."""

    candidates: dict[str, list[str]]
    queries: dict[str, str]
    passages: dict[str, str]


def read_top1000(path: str | Path) -> Top1000:
    """`top1000.<split>` (qid, pid, query, passage per line) -> candidates + texts."""
    path = Path(path)
    table = read_tsv_table(path, ("qid", "pid", "query", "passage"))
    candidates: dict[str, list[str]] = {}
    queries: dict[str, str] = {}
    passages: dict[str, str] = {}
    for qid, pid, query, passage in zip(*(table.column(n).to_pylist() for n in ("qid", "pid", "query", "passage"))):
        candidates.setdefault(qid, []).append(pid)
        queries.setdefault(qid, query)
        passages.setdefault(pid, passage)
    return Top1000(candidates, queries, passages)


def iter_triples(path: str | Path) -> Iterator[tuple[str, str, str]]:
    """Training triples, streamed: (query, positive, negative), texts or ids as the file holds."""
    path = Path(path)
    for number, line in open_text_lines(path):
        query, positive, negative = split_fields(path, number, line, ("query", "positive", "negative"))
        yield query, positive, negative


def read_run(path: str | Path) -> Run:
    """A ranking file -> {qid: {pid: score}}.

    MS MARCO format (`qid<TAB>pid<TAB>rank`) has no scores: rank r becomes score -r, so the
    ranking is kept exactly. TREC format (`qid Q0 pid rank score tag`) keeps its scores.
    """
    path = Path(path)
    run: Run = {}
    for number, line in open_text_lines(path):
        parts = line.split()
        if len(parts) not in (3, 6):
            raise DatasetError(f"{path}, line {number}: expected 'qid pid rank' or 'qid Q0 pid rank score tag', got {len(parts)} fields")
        try:
            if len(parts) == 3:
                qid, pid, score = parts[0], parts[1], -float(int(parts[2]))
            else:
                qid, pid, score = parts[0], parts[2], float(parts[4])
        except ValueError:
            raise DatasetError(f"{path}, line {number}: rank/score is not a number: {line!r}") from None
        hits = run.setdefault(qid, {})
        if pid in hits:
            raise DatasetError(f"{path}, line {number}: passage '{pid}' appears twice for query '{qid}'")
        hits[pid] = score
    return run


# ---------------------------------------------------------------------------------------
# Evaluation conventions
# ---------------------------------------------------------------------------------------


def is_graded(qrels: Mapping[str, Mapping[str, int]]) -> bool:
    return any(grade > 1 for docs in qrels.values() for grade in docs.values())


def binary_relevance_level(
    qrels: Mapping[str, Mapping[str, int]], binary_level: int = 1, graded_level: int = TREC_DL_RELEVANCE_LEVEL
) -> int:
    """Lowest grade that binary metrics count: `graded_level` on graded (TREC DL) qrels, else `binary_level`."""
    return graded_level if is_graded(qrels) else binary_level


# ---------------------------------------------------------------------------------------
# Directory of official files -> BEIR layout -> BeirDataset
# ---------------------------------------------------------------------------------------


@dataclass
class MsMarcoFiles:
    collection: Path
    queries: dict[str, Path]  # split -> file
    qrels: dict[str, Path]


def strip_suffixes(name: str) -> str:
    return re.sub(r"(\.tsv|\.txt)?(\.gz)?$", "", name)


def find_msmarco_files(root: Path) -> MsMarcoFiles:
    """Locate `collection.tsv`, `queries.<split>.tsv`, `qrels.<split>.tsv` (+ TREC DL names) in `root`."""
    collection = next((p for p in (root / "collection.tsv", root / "collection.tsv.gz") if p.is_file()), None)
    if collection is None:
        raise DatasetError(f"{root}: no collection.tsv (MS MARCO layout) or corpus.jsonl (BEIR layout)")
    queries: dict[str, Path] = {}
    qrels: dict[str, Path] = {}
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        stem = strip_suffixes(path.name)
        if stem.startswith("queries."):
            queries[stem[len("queries.") :]] = path
        elif stem.startswith("qrels."):
            qrels[stem[len("qrels.") :]] = path
        elif stem in TREC_DL_QUERY_FILES:
            queries[TREC_DL_QUERY_FILES[stem]] = path
        elif stem in TREC_DL_QRELS_FILES:
            qrels[TREC_DL_QRELS_FILES[stem]] = path
    if not qrels:
        raise DatasetError(f"{root}: no qrels.<split>.tsv files; evaluation needs judgments")
    for split, path in qrels.items():
        if split not in queries:
            raise DatasetError(f"{path}: no matching queries file (expected queries.{split}.tsv in {root})")
    return MsMarcoFiles(collection, queries, qrels)


def merged_queries(files: MsMarcoFiles) -> dict[str, str]:
    """All splits' queries in one table (BEIR keeps one queries file); a qid must mean one text."""
    merged: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for split in sorted(files.queries):
        path = files.queries[split]
        for qid, text in read_queries(path).items():
            if qid in merged and merged[qid] != text:
                raise DatasetError(f"{path}: query id '{qid}' has a different text in {origin[qid]}")
            merged.setdefault(qid, text)
            origin.setdefault(qid, path)
    return merged


def files_signature(files: MsMarcoFiles) -> str:
    paths = [files.collection, *files.queries.values(), *files.qrels.values()]
    return stat_signature(paths)


def write_beir_layout(files: MsMarcoFiles, dest: Path) -> None:
    """Write corpus.jsonl, queries.jsonl, qrels/<split>.tsv into `dest` (a fresh directory)."""
    (dest / "qrels").mkdir(parents=True)
    corpus = read_collection(files.collection)
    corpus.to_pandas().to_json(dest / "corpus.jsonl", orient="records", lines=True, force_ascii=False)
    queries = merged_queries(files)
    with open(dest / "queries.jsonl", "w", encoding="utf-8") as out:
        for qid, text in queries.items():
            out.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    doc_ids = set(corpus.column("_id").to_pylist())

    # Checked here, against the user's files, so that errors name their file and line rather than
    # the converted copy in the cache (which the BEIR loader would otherwise report).
    def known(path: Path):
        def check(number: int, qid: str, pid: str) -> None:
            if qid not in queries:
                raise DatasetError(
                    f"{path}, line {number}: query id '{qid}' is not in the queries files "
                    f"({', '.join(sorted(p.name for p in files.queries.values()))})"
                )
            if pid not in doc_ids:
                raise DatasetError(f"{path}, line {number}: passage id '{pid}' is not in {files.collection}")

        return check

    for split, path in files.qrels.items():
        judged = read_qrels(path, check=known(path))
        if not judged:
            raise DatasetError(f"{path}: no judgments (the qrels file is empty); split '{split}' cannot be evaluated")
        with open(dest / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as out:
            out.write("query-id\tcorpus-id\tscore\n")
            for qid, docs in judged.items():
                for pid, grade in docs.items():
                    out.write(f"{qid}\t{pid}\t{grade}\n")


def convert_to_beir(root: Path, cache: Path) -> Path:
    """Convert the official files once; the BEIR directory keeps the source directory's name."""
    files = find_msmarco_files(root)
    target = cache / "msmarco" / files_signature(files) / root.resolve().name
    if (target.parent / ".complete").is_file():
        return target
    try:
        with publishing(target, replace=True) as staging:
            write_beir_layout(files, staging)
    except BaseException:
        remove_if_empty(target.parent)  # a failed conversion leaves no empty cache folder
        raise
    (target.parent / ".complete").write_text(str(root.resolve()))
    return target


def is_beir_layout(root: Path) -> bool:
    return any((root / name).exists() for name in ("corpus.jsonl", "corpus.jsonl.gz", "corpus"))


def load_msmarco(source: str | Path, cache_dir: str | Path | None = None) -> BeirDataset:
    """MS MARCO official-file directory, BEIR-format directory, or any `load_dataset` source."""
    path = Path(source).expanduser()
    if path.is_dir() and not is_beir_layout(path) and any(path.glob("collection.tsv*")):
        cache = Path(cache_dir) if cache_dir else cache_root()
        return load_dataset(convert_to_beir(path, cache), cache_dir=cache)
    return load_dataset(source, cache_dir=cache_dir)
