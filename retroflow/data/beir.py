"""BEIR-format datasets: resolve a source, validate it, normalise it once to Parquet.

A source is one of
- a local directory in BEIR layout (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`),
- a local directory in the Hugging Face `BeIR/<name>` layout (`corpus/`, `queries/` with
  parquet or json(l)(.gz) files, qrels in `qrels/` or a sibling `<name>-qrels/` directory),
- `hf:BeIR/<name>` (downloaded with `datasets`; fails fast with a clear error offline),
- a zip URL with a checksum (downloaded once into the cache and unpacked safely),
- a bare name (`scifact`): looked up under `$RETROFLOW_DATA_DIR/<name>`, else in the
  table of BEIR's public zips.

Every load validates the files (errors name the file, line and field) and writes
`corpus.parquet`, `queries.parquet`, `qrels.parquet` and `dataset.json` into
`<cache>/beir/<fingerprint>/`. The fingerprint is the sha256 of the normalised content,
so the same data reached by two routes shares one cache entry. Later loads of the same
unchanged files skip parsing (looked up by path, size and mtime).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import algorithms_available
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from retroflow.artifacts import cache_root
from retroflow.hashing import file_digest, sha256_bytes, sha256_file, sha256_text, stat_signature
from retroflow.publish import atomic_write_text, publishing, publishing_content, publishing_file, remove_if_empty

log = logging.getLogger(__name__)

# Public BEIR zips (https://github.com/beir-cellar/beir, "Available datasets"). BEIR publishes
# md5 sums, so those are what we verify against.
BEIR_BASE_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
BEIR_MD5 = {
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "quora": "18fb154900ba42a600f84b839c173167",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "msmarco": "444067daf65d982533ea17ebd59501e4",
}

DATA_DIR_ENV = "RETROFLOW_DATA_DIR"


class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the file, line and field."""


@dataclass
class BeirDataset:
    """A normalised BEIR dataset. `corpus` and `queries` are Arrow tables; qrels per split."""

    name: str
    fingerprint: str
    path: Path  # the normalised cache directory
    corpus: pa.Table  # _id, title, text
    queries: pa.Table  # _id, text
    qrels: dict[str, dict[str, dict[str, int]]]  # split -> qid -> docid -> grade
    _query_text: dict[str, str] | None = field(default=None, repr=False)

    @property
    def splits(self) -> list[str]:
        return sorted(self.qrels)

    @property
    def num_docs(self) -> int:
        return self.corpus.num_rows

    def split_qrels(self, split: str) -> dict[str, dict[str, int]]:
        if split not in self.qrels:
            raise DatasetError(f"dataset '{self.name}' has no split '{split}'; available splits: {', '.join(self.splits) or 'none'}")
        return self.qrels[split]

    def split_queries(self, split: str) -> dict[str, str]:
        """Queries that have judgments in `split` (BEIR keeps all splits in one queries file)."""
        if self._query_text is None:
            self._query_text = dict(zip(self.queries.column("_id").to_pylist(), self.queries.column("text").to_pylist()))
        return {qid: self._query_text[qid] for qid in self.split_qrels(split) if qid in self._query_text}

    def doc_ids(self) -> list[str]:
        return self.corpus.column("_id").to_pylist()

    def doc_texts(self, sep: str = " ") -> list[str]:
        """Title and text joined as BEIR's dense retrievers do (`(title + sep + text).strip()`)."""
        titles = self.corpus.column("title").to_pylist()
        texts = self.corpus.column("text").to_pylist()
        return [(t + sep + x).strip() for t, x in zip(titles, texts)]

    def corpus_file(self) -> Path:
        return self.path / "corpus.parquet"


# ---------------------------------------------------------------------------------------
# Source resolution
# ---------------------------------------------------------------------------------------


def load_dataset(
    source: str | Path,
    cache_dir: str | Path | None = None,
    checksum: str | None = None,
    on_unknown_ids: str = "error",
) -> BeirDataset:
    """Resolve `source`, validate and normalise it (once), and return the dataset.

    `on_unknown_ids`: "error" (default) or "drop" qrels rows whose query or doc is unknown.
    """
    cache = Path(cache_dir) if cache_dir else cache_root()
    if is_normalised_dir(Path(source)):  # a pipeline `data` artifact or a cache entry
        return read_normalised(Path(source))
    local = resolve_local_source(str(source), cache, checksum)
    return normalise(local, cache, name=dataset_name(str(source)), on_unknown_ids=on_unknown_ids)


def content_fingerprint(source: str | Path, cache_dir: str | Path | None = None) -> str:
    """The content fingerprint `load_dataset(source)` would give, without reading its tables when
    the source files are unchanged since they were normalised (the index records their stat
    signature): what a cached re-run needs to know, cheap even for MS MARCO's corpus. Anything
    else (new or edited files, a first download) normalises as `load_dataset` does."""
    cache = Path(cache_dir) if cache_dir else cache_root()
    if is_normalised_dir(Path(source)):
        return json.loads((Path(source) / "dataset.json").read_text())["fingerprint"]
    local = resolve_local_source(str(source), cache)
    known = indexed_fingerprint(index_file_of(local, cache)[0], cache)
    return known or normalise(local, cache, name=dataset_name(str(source))).fingerprint


def is_normalised_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in ("dataset.json", "corpus.parquet", "queries.parquet", "qrels.parquet"))


def dataset_name(source: str) -> str:
    text = source.rstrip("/").split("/")[-1]
    return text[:-4] if text.endswith(".zip") else text


def resolve_local_source(source: str, cache: Path, checksum: str | None = None) -> Path:
    if source.startswith(("http://", "https://", "file://")):
        return single_top_folder(download_and_unzip(source, cache, checksum))
    if source.startswith("hf:"):
        return materialise_hf_dataset(source[3:], cache)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DatasetError(f"dataset source {path} is a file; expected a directory in BEIR layout")
        return path
    if "/" not in source and "\\" not in source:
        data_dir = os.environ.get(DATA_DIR_ENV)
        if data_dir and (Path(data_dir) / source).is_dir():
            return Path(data_dir) / source
        if source in BEIR_MD5:
            url = BEIR_BASE_URL.format(name=source)
            return download_and_unzip(url, cache, checksum or f"md5:{BEIR_MD5[source]}") / source
    hint = f" (set {DATA_DIR_ENV} to a directory that holds it, e.g. ../shared/data)" if "/" not in source else ""
    raise DatasetError(f"dataset source '{source}' not found{hint}")


# ---------------------------------------------------------------------------------------
# Download + safe unzip
# ---------------------------------------------------------------------------------------


def single_top_folder(unzipped: Path) -> Path:
    """BEIR's own zips hold one folder (`scifact/corpus.jsonl`): use it when the top level has no data."""
    entries = [p for p in unzipped.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir() and not any(unzipped.glob("corpus.*")):
        return entries[0]
    return unzipped


def parse_checksum(checksum: str) -> tuple[str, str]:
    """'sha256:<hex>' / 'md5:<hex>' / a bare sha256 hex -> (algorithm, hex); an unknown algorithm is an error."""
    algo, _, expected = checksum.partition(":")
    if not expected:
        algo, expected = "sha256", checksum
    if algo.lower() not in algorithms_available:
        raise DatasetError(f"checksum {checksum!r}: unknown algorithm {algo!r} (use sha256:<hex> or md5:<hex>)")
    return algo.lower(), expected


def verify_checksum(path: Path, checksum: str, shown: Path | None = None) -> None:
    """`shown`: the name the error gives (the archive, not its staging copy)."""
    algo, expected = parse_checksum(checksum)
    found = file_digest(path, algo)
    if found != expected.lower():
        raise DatasetError(f"{shown or path}: {algo} is {found}, expected {expected}")


def download_and_unzip(url: str, cache: Path, checksum: str | None, timeout: float = 30.0) -> Path:
    """Download `url` into the cache once per (URL, checksum), verified, and unpack it safely."""
    if not checksum:
        raise DatasetError(f"refusing to download {url} without a checksum (pass sha256:<hex> or md5:<hex>: --checksum or `checksum:`)")
    algo, expected = parse_checksum(checksum)  # an unknown algorithm fails before anything is downloaded
    # Keyed by the checksum too: the file at a URL can change, and an entry verified against one
    # checksum says nothing about another (a wrong one must fail, a new one must download).
    target = cache / "downloads" / sha256_text(f"{url}\n{algo}:{expected.lower()}")[:16]
    done = target / ".complete"
    if done.is_file():
        return target / "unzipped"
    target.mkdir(parents=True, exist_ok=True)
    try:
        return fetch_and_unzip(url, target, checksum, timeout)
    except BaseException:
        # nothing refused or half-unpacked stays: the archive goes with the failed attempt
        for leftover in (target / Path(url).name, target / "unzipped"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        remove_if_empty(target)  # a failed download leaves no empty cache folder
        raise


def fetch_and_unzip(url: str, target: Path, checksum: str, timeout: float) -> Path:
    archive = target / Path(url).name
    if archive.is_file():  # an earlier run stopped before unpacking: reuse the archive only if it checks out
        try:
            verify_checksum(archive, checksum)
        except DatasetError as err:
            log.warning("cached download not used (downloading again): %s", err)
            archive.unlink()
    if not archive.is_file():
        with publishing_file(archive) as staging:  # a checksum failure publishes nothing
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(staging, "wb") as out:
                    shutil.copyfileobj(response, out)
            except OSError as err:
                raise DatasetError(
                    f"could not download {url}: {err}. Offline? Point the config at a local copy or set {DATA_DIR_ENV}."
                ) from None
            verify_checksum(staging, checksum, shown=archive)
    safe_unzip(archive, target / "unzipped")
    (target / ".complete").write_text(url)
    return target / "unzipped"


def safe_unzip(archive: Path, dest: Path) -> None:
    """Unpack `archive` into `dest`, refusing members that would land outside it."""
    with zipfile.ZipFile(archive) as zf, publishing(dest, replace=True) as staging:
        root = staging.resolve()
        for member in zf.infolist():
            name = member.filename
            resolved = (root / name).resolve()
            is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
            if os.path.isabs(name) or not resolved.is_relative_to(root) or is_link:
                raise DatasetError(f"{archive}: member '{name}' would escape the target directory; refusing to unzip")
        zf.extractall(staging)


# ---------------------------------------------------------------------------------------
# Hugging Face `BeIR/<name>` layout
# ---------------------------------------------------------------------------------------


def materialise_hf_dataset(repo: str, cache: Path) -> Path:
    """Fetch `BeIR/<name>` + `BeIR/<name>-qrels` with `datasets` into a BEIR-layout directory."""
    import datasets

    target = cache / "hf" / repo.replace("/", "__")
    if (target / ".complete").is_file():
        return target
    try:
        corpus = datasets.load_dataset(repo, "corpus", split="corpus")
        queries = datasets.load_dataset(repo, "queries", split="queries")
        qrels = datasets.load_dataset(f"{repo}-qrels")
    except Exception as err:  # hub errors come in many types; all mean "cannot fetch"
        raise DatasetError(
            f"could not load '{repo}' from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Offline? Download it elsewhere and point at the local directory."
        ) from None
    with publishing(target, replace=True) as tmp:
        corpus.to_json(tmp / "corpus.jsonl")
        queries.to_json(tmp / "queries.jsonl")
        (tmp / "qrels").mkdir()
        for split, table in qrels.items():
            table.to_pandas().to_csv(tmp / "qrels" / f"{split}.tsv", sep="\t", index=False)
    (target / ".complete").write_text(repo)
    return target


def hf_layout_files(root: Path, part: str) -> list[Path]:
    folder = root / part
    if not folder.is_dir():
        return []
    patterns = ("*.parquet", "*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz")
    return sorted(p for pattern in patterns for p in folder.rglob(pattern))


def qrels_dir_for(root: Path) -> Path:
    sibling = root.with_name(root.name + "-qrels")
    if not (root / "qrels").is_dir() and sibling.is_dir():
        return sibling
    return root / "qrels"


# ---------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------


def open_text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without newline) for a UTF-8 (optionally .gz) file; blank lines skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig on the first line: a byte-order mark (Windows editors) is not part of the first field
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DatasetError(
                    f"{path}, line {number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from None
            if line.strip():
                yield number, line


def iter_jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in open_text_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}, line {number}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def iter_parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    table = pq.read_table(path)
    yield from enumerate(table.to_pylist(), start=1)


def iter_records(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".parquet":
        return iter_parquet_records(path)
    return iter_jsonl_records(path)


def read_id_text_records(paths: list[Path], kind: str, with_title: bool) -> dict[str, list[str]]:
    """Validated columns `_id`, `text` (and `title`); duplicate ids are an error."""
    ids: list[str] = []
    texts: list[str] = []
    titles: list[str] = []
    first_seen: dict[str, str] = {}
    for path in paths:
        for number, record in iter_records(path):
            where = f"{path}, line {number}"
            for required in ("_id", "text"):
                if record.get(required) is None:
                    raise DatasetError(f"{where}: missing field '{required}' in {kind} record")
            if not isinstance(record["_id"], (str, int)) or isinstance(record["_id"], bool):
                raise DatasetError(f"{where}: field '_id' must be a string (or an integer), got {type(record['_id']).__name__}")
            doc_id = str(record["_id"])
            if not doc_id.strip():
                raise DatasetError(f"{where}: field '_id' is empty")
            if not isinstance(record["text"], str):
                raise DatasetError(f"{where}: field 'text' must be a string, got {type(record['text']).__name__}")
            if doc_id in first_seen:
                raise DatasetError(f"{where}: duplicate _id '{doc_id}' (first seen at {first_seen[doc_id]})")
            first_seen[doc_id] = f"line {number}" if len(paths) == 1 else f"{path.name} line {number}"
            ids.append(doc_id)
            texts.append(record["text"])
            if with_title:
                title = record.get("title") or ""
                if not isinstance(title, str):
                    raise DatasetError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
                titles.append(title)
    columns = {"_id": ids}
    if with_title:
        columns["title"] = titles
    columns["text"] = texts
    return columns


QRELS_COLUMNS = ("query-id", "corpus-id", "score")


def read_qrels_tsv(path: Path) -> list[tuple[int, str, str, int]]:
    rows = []
    for number, line in open_text_lines(path):
        parts = line.split("\t")
        if number == 1 and parts[0] == "query-id":
            continue
        if len(parts) == 4:  # TREC qrels: qid 0 docid grade
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise DatasetError(f"{path}, line {number}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}")
        qid, docid, score = parts
        try:
            grade = int(float(score)) if float(score).is_integer() else None
        except ValueError:
            grade = None
        if grade is None:
            raise DatasetError(f"{path}, line {number}: field 'score' is not an integer: {score!r}")
        rows.append((number, qid, docid, checked_grade(grade, path, f"line {number}")))
    return rows


MAX_GRADE = 2**31 - 1  # grades are stored as int32 (Parquet, pytrec_eval's C ints)


def checked_grade(grade: int, path: Path, where: str) -> int:
    """A relevance grade that fits the int32 every consumer stores it in, or an error naming its place."""
    if not -MAX_GRADE <= grade <= MAX_GRADE:
        raise DatasetError(f"{path}, {where}: field 'score' {grade} is out of range (|score| <= {MAX_GRADE})")
    return grade


def read_qrels_parquet(paths: list[Path]) -> list[tuple[int, str, str, int]]:
    rows = []
    for path in paths:
        for number, record in iter_parquet_records(path):
            try:
                rows.append(
                    (number, str(record["query-id"]), str(record["corpus-id"]), checked_grade(int(record["score"]), path, f"row {number}"))
                )
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"{path}, row {number}: bad qrels record ({err})") from None
    return rows


def find_qrels_files(qrels_dir: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if not qrels_dir.is_dir():
        return found
    for tsv in sorted(qrels_dir.glob("*.tsv")):
        found[tsv.stem] = [tsv]
    for split_dir in sorted(p for p in qrels_dir.iterdir() if p.is_dir()):
        files = sorted(split_dir.rglob("*.parquet"))
        if files:
            found.setdefault(split_dir.name, files)
    for pq_file in sorted(qrels_dir.glob("*.parquet")):
        found.setdefault(pq_file.stem.split("-")[0], [pq_file])
    return found


def check_qrels_ids(
    rows: list[tuple[int, str, str, int]], path: Path, query_ids: set[str], doc_ids: set[str], on_unknown: str
) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    dropped = 0
    for number, qid, docid, grade in rows:
        if (qid, docid) in first_line and qrels.get(qid, {}).get(docid, grade) != grade:
            raise DatasetError(
                f"{path}, line {number}: query-id '{qid}', corpus-id '{docid}' is graded {grade} here but "
                f"{qrels[qid][docid]} at line {first_line[(qid, docid)]}; conflicting judgments"
            )
        first_line.setdefault((qid, docid), number)
        problem = None
        if qid not in query_ids:
            problem = f"query-id '{qid}' is not in the queries file"
        elif docid not in doc_ids:
            problem = f"corpus-id '{docid}' is not in the corpus"
        if problem:
            if on_unknown == "drop":
                dropped += 1
                continue
            raise DatasetError(f"{path}, line {number}: {problem}")
        qrels.setdefault(qid, {})[docid] = grade
    if dropped:
        log.warning("%s: dropped %d qrels rows pointing to unknown queries or documents", path, dropped)
    return qrels


def locate_files(root: Path) -> tuple[list[Path], list[Path], Path]:
    corpus = [p for p in (root / "corpus.jsonl", root / "corpus.jsonl.gz") if p.is_file()]
    queries = [p for p in (root / "queries.jsonl", root / "queries.jsonl.gz") if p.is_file()]
    corpus = corpus or hf_layout_files(root, "corpus")
    queries = queries or hf_layout_files(root, "queries")
    if not corpus:
        raise DatasetError(f"{root}: no corpus.jsonl (BEIR layout) or corpus/ folder (Hugging Face layout)")
    if not queries:
        raise DatasetError(f"{root}: no queries.jsonl (BEIR layout) or queries/ folder (Hugging Face layout)")
    return corpus, queries, qrels_dir_for(root)


VALIDATION_VERSION = "2"  # bump when validation or parsing changes: cached normalisations are then redone


def source_signature(files: list[Path]) -> str:
    return stat_signature(files, f"validation {VALIDATION_VERSION}")


def index_file_of(root: Path, cache: Path, on_unknown_ids: str = "error") -> tuple[Path, list[Path], list[Path], Path, dict]:
    """Where the normalisation index records `root`'s files as they are now (their stat
    signature), and the files themselves."""
    corpus_files, query_files, qrels_dir = locate_files(root)
    qrels_files = find_qrels_files(qrels_dir)
    all_files = corpus_files + query_files + [p for files in qrels_files.values() for p in files]
    signature = source_signature(all_files) + f"-{on_unknown_ids}"
    return cache / "beir" / "index" / f"{signature}.json", corpus_files, query_files, qrels_dir, qrels_files


def indexed_fingerprint(index_file: Path, cache: Path) -> str | None:
    """The fingerprint `index_file` (from `index_file_of`) holds, if the normalised copy is still
    in the cache."""
    if not index_file.is_file():
        return None
    fingerprint = json.loads(index_file.read_text())["fingerprint"]
    return fingerprint if (cache / "beir" / fingerprint / "dataset.json").is_file() else None


def normalise(root: Path, cache: Path, name: str, on_unknown_ids: str = "error") -> BeirDataset:
    index_file, corpus_files, query_files, qrels_dir, qrels_files = index_file_of(root, cache, on_unknown_ids)
    fingerprint = indexed_fingerprint(index_file, cache)
    if fingerprint is not None:
        return read_normalised(cache / "beir" / fingerprint, name)

    corpus_cols = read_id_text_records(corpus_files, "corpus", with_title=True)
    if not corpus_cols["_id"]:
        raise DatasetError(f"{corpus_files[0]}: the corpus is empty")
    query_cols = read_id_text_records(query_files, "queries", with_title=False)
    if not qrels_files:
        raise DatasetError(f"{qrels_dir}: no qrels files (<split>.tsv); a BEIR dataset needs at least one split")
    doc_ids, query_ids = set(corpus_cols["_id"]), set(query_cols["_id"])
    qrels = {}
    for split, files in qrels_files.items():
        rows = read_qrels_parquet(files) if files[0].suffix == ".parquet" else read_qrels_tsv(files[0])
        qrels[split] = check_qrels_ids(rows, files[0], query_ids, doc_ids, on_unknown_ids)
        if not rows:  # otherwise the split would vanish and be reported as "no split"
            raise DatasetError(
                f"{files[0]}: no judgments (the qrels file is empty or only a header); "
                f"split '{split}' cannot be evaluated: remove the file or fill it"
            )

    corpus = pa.table(corpus_cols)
    queries = pa.table(query_cols)
    qrels_table = pa.table(
        {
            "split": [s for s, q in qrels.items() for qid, docs in q.items() for _ in docs],
            "query-id": [qid for q in qrels.values() for qid, docs in q.items() for _ in docs],
            "corpus-id": [d for q in qrels.values() for docs in q.values() for d in docs],
            "score": pa.array([g for q in qrels.values() for docs in q.values() for g in docs.values()], pa.int32()),
        }
    )
    return write_normalised(cache, name, corpus, queries, qrels_table, index_file, root)


def write_normalised(
    cache: Path, name: str, corpus: pa.Table, queries: pa.Table, qrels: pa.Table, index_file: Path, source: Path
) -> BeirDataset:
    with publishing_content(cache / "beir") as (tmp, publish):
        fingerprint = write_normalised_files(tmp, name, corpus, queries, qrels, source)
        final = publish(fingerprint)  # same content already normalised (maybe by another route): kept
    atomic_write_text(index_file, json.dumps({"fingerprint": fingerprint, "source": str(source)}))
    return read_normalised(final, name)


def write_normalised_files(tmp: Path, name: str, corpus: pa.Table, queries: pa.Table, qrels: pa.Table, source: Path) -> str:
    for filename, table in (("corpus.parquet", corpus), ("queries.parquet", queries), ("qrels.parquet", qrels)):
        pq.write_table(table, tmp / filename)
    tables = ("corpus.parquet", "queries.parquet", "qrels.parquet")
    fingerprint = sha256_text("".join(table_digest(pq.read_table(tmp / filename)) for filename in tables))[:24]
    meta = {
        "name": name,
        "fingerprint": fingerprint,
        "source": str(source),
        "num_docs": corpus.num_rows,
        "num_queries": queries.num_rows,
        "splits": split_query_counts(qrels),
        "files": {f: sha256_file(tmp / f) for f in ("corpus.parquet", "queries.parquet", "qrels.parquet")},
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return fingerprint


def split_query_counts(qrels: pa.Table) -> dict[str, int]:
    pairs = set(zip(qrels.column("split").to_pylist(), qrels.column("query-id").to_pylist()))
    counts: dict[str, int] = {}
    for split, _ in pairs:
        counts[split] = counts.get(split, 0) + 1
    return dict(sorted(counts.items()))


def table_digest(table: pa.Table) -> str:
    """Hash of a table's content, independent of Parquet encoding details."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return sha256_bytes(sink.getvalue())


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_normalised(path: Path, name: str | None = None) -> BeirDataset:
    """The dataset in a normalised cache directory; `name` is the one it was loaded as now (the cache
    is shared by content, so its dataset.json keeps the name of whichever copy came first)."""
    meta = json.loads((path / "dataset.json").read_text())
    qrels_table = pq.read_table(path / "qrels.parquet").to_pydict()
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    for split, qid, docid, grade in zip(qrels_table["split"], qrels_table["query-id"], qrels_table["corpus-id"], qrels_table["score"]):
        qrels.setdefault(split, {}).setdefault(qid, {})[docid] = grade
    return BeirDataset(
        name=name or meta["name"],
        fingerprint=meta["fingerprint"],
        path=path,
        corpus=pq.read_table(path / "corpus.parquet"),
        queries=pq.read_table(path / "queries.parquet"),
        qrels=qrels,
    )
