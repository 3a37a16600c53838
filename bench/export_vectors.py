"""Real MiniLM vectors for bench/index.py, encoded once and cached by content.

    python bench/export_vectors.py [--data DIR] [--cache DIR] [--model minilm]   # prints the directories as JSON

What it writes (each an embeddings directory readable by `retrieval.serving.encode.open_embeddings`):

- `sentences`: SciFact and TREC-DL passages split into sentences, plus SciFact titles,
  deduplicated (~62k vectors). The speed / recall@10 half of the index benchmark: the shared
  corpora hold only ~10k passages, far from index-benchmark scale, and sentences of the same
  text are real model outputs with the same distribution quirks PQ/IVF must cope with.
- `scifact-docs`: the normal passage-level SciFact encoding (5,183 docs, what `retroflow
  encode` writes), for nDCG@10 through each index.
- `queries-<dataset>-<split>`: query vectors, ids = query ids (SciFact train/test, TREC-DL test).

Corpora go through the encode stage, `retrieval.serving.encode.run` (resumable 10k-row shards, so a
killed first run keeps its finished shards), queries through `Encoder.encode_queries`. Everything lives
under `$RETROFLOW_CACHE/bench-index/` (outside the repository) in directories named after a
hash of the model, the encoder settings that change vectors, and the text, so a re-run finds
its vectors and any change of text or model encodes afresh. (The sentence corpus itself is
normalised into the dataset cache, `$RETROFLOW_CACHE/beir/`, like any dataset the stage reads.)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.serving.encode import META_FILE, EncodeConfig, compatibility_key, write_embeddings  # noqa: E402
from retrieval.serving.encode import run as encode  # noqa: E402
from retrieval.serving.encoder import Encoder, EncoderSettings  # noqa: E402
from retroflow.artifacts import cache_root  # noqa: E402
from retroflow.data import dataset_input  # noqa: E402
from retroflow.data.beir import BeirDataset, load_dataset, write_normalised  # noqa: E402
from retroflow.hashing import hash_json  # noqa: E402
from retroflow.inputs import model_input  # noqa: E402

SCIFACT, TREC = "scifact", "trec-dl-2019-subset5k"
# A sentence ends at . ! or ? followed by whitespace and something that can start a sentence;
# abbreviations ("e.g. the") stay inside because the next word is lower case.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
MIN_WORDS = 4  # shorter fragments ("Results.", "(ii) 2.") are headings or split artefacts, not sentences


def default_data_dir() -> Path:
    import os

    return Path(os.environ.get("RETROFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if len(s.split()) >= MIN_WORDS]


def sentence_texts(datasets: list[BeirDataset]) -> tuple[list[str], list[str]]:
    """(ids, texts): every distinct sentence and title, first occurrence kept, in corpus order."""
    seen: dict[str, str] = {}
    for dataset in datasets:
        doc_ids = dataset.doc_ids()
        titles = dataset.corpus.column("title").to_pylist()
        bodies = dataset.corpus.column("text").to_pylist()
        for doc_id, title, body in zip(doc_ids, titles, bodies):
            pieces = ([title.strip()] if len(title.split()) >= MIN_WORDS else []) + split_sentences(body)
            for n, piece in enumerate(pieces):
                seen.setdefault(piece, f"{dataset.name}:{doc_id}:{n}")
    return list(seen.values()), list(seen)


def in_memory_dataset(name: str, ids: list[str], texts: list[str]) -> BeirDataset:
    """A corpus-only dataset, normalised into the dataset cache (by content) like any other, so the
    sentences go through the same encode stage as any corpus."""
    corpus = pa.table({"_id": ids, "title": [""] * len(ids), "text": texts})
    queries = pa.table({"_id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    no_qrels = pa.table({column: pa.array([], pa.string()) for column in ("split", "query-id", "corpus-id")}).append_column(
        "score", pa.array([], pa.int32())
    )
    cache = cache_root()
    return write_normalised(cache, name, corpus, queries, no_qrels, cache / "beir" / "index" / f"bench-{name}.json", Path(name))


def encode_config() -> EncodeConfig:
    # batch size is runtime-only (not part of the cache key): larger batches of short sentences are cheaper per vector
    return EncodeConfig(shard_size=10_000, encoder=EncoderSettings(batch_size=128))


def corpus_key(dataset: BeirDataset, model: str) -> str:
    return compatibility_key(encode_config(), model_input(model), dataset)


def cached_corpus(dataset: BeirDataset, model: str, cache: Path, label: str) -> Path:
    """Encode `dataset`'s corpus into `cache/<label>-<key>` unless it is already there."""
    out = cache / f"{label}-{corpus_key(dataset, model)}"
    if not (out / META_FILE).is_file():
        partial = out.with_name(out.name + ".partial")
        encode(encode_config(), {"data": dataset_input(dataset), "model": model_input(model)}, out, partial)
        shutil.rmtree(partial, ignore_errors=True)
    return out


def cached_queries(dataset: BeirDataset, split: str, encoder: Encoder | None, model: str, cache: Path) -> tuple[Path, Encoder | None]:
    """Query vectors of one split in `cache/queries-<dataset>-<split>-<key>`; the encoder is loaded only when needed."""
    key = hash_json({"corpus_key": corpus_key(dataset, model), "split": split})[:16]
    out = cache / f"queries-{dataset.name}-{split}-{key}"
    if not (out / META_FILE).is_file():
        encoder = encoder or Encoder(model, EncoderSettings(show_progress=False))
        queries = dataset.split_queries(split)
        write_embeddings(out, encoder.encode_queries(list(queries.values())), list(queries), model=model, dataset=dataset.name, split=split)
    return out, encoder


def build_all(data_dir: Path, cache: Path, model: str = "minilm") -> dict[str, Path]:
    """Every vector set the index benchmark uses (see the module docstring), encoding only what is missing."""
    cache.mkdir(parents=True, exist_ok=True)
    scifact, trec = load_dataset(data_dir / SCIFACT), load_dataset(data_dir / TREC)
    paths = {"sentences": cached_corpus(in_memory_dataset("sentences", *sentence_texts([scifact, trec])), model, cache, "sentences")}
    paths["scifact-docs"] = cached_corpus(scifact, model, cache, "scifact-docs")
    encoder = None
    for dataset, split in ((scifact, "train"), (scifact, "test"), (trec, "test")):
        paths[f"queries-{dataset.name}-{split}"], encoder = cached_queries(dataset, split, encoder, model, cache)
    return paths


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="folder holding scifact/ and trec-dl-2019-subset5k/")
    parser.add_argument("--cache", type=Path, default=cache_root() / "bench-index")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = leave the other cores to other jobs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = build_all(args.data, args.cache, args.model)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
