"""Pretraining text -> tokenised chunks of at most max_seq_length (special tokens included).

Sources: BEIR corpora (corpus.jsonl or its directory; title + text), plain text (one document
per non-empty line), jsonl (`title`/`text` fields) and parquet (`title`/`text` columns, e.g.
the flow's prepared corpus). Tokenisation is cached on disk with `datasets`, keyed by the
text content, the tokenizer's vocabulary and the chunking settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets

from retroflow.artifacts import cache_root
from retroflow.hashing import sha256_text
from retroflow.publish import publishing

log = logging.getLogger("retroflow.retromae")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _join(title: str | None, text: str | None) -> str:
    return " ".join(part.strip() for part in (title, text) if part and part.strip())


def iter_documents(path: Path) -> Iterator[str]:
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"pretraining data not found: {path}")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    yield _join(row.get("title"), row.get("text") or row.get("contents"))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        titles = table.column("title").to_pylist() if "title" in table.column_names else [None] * table.num_rows
        for title, text in zip(titles, table.column("text").to_pylist()):
            yield _join(title, text)
    elif suffix in (".txt", ".text", ""):
        with open(path, encoding="utf-8") as handle:
            yield from (line.strip() for line in handle if line.strip())
    else:
        raise ValueError(f"{path}: unsupported pretraining file type {suffix!r} (use .txt, .jsonl or .parquet)")


def read_texts(sources: Iterable[Path], max_docs: int | None = None) -> list[str]:
    texts: list[str] = []
    for source in sources:
        for doc in iter_documents(source):
            if doc:
                texts.append(doc)
                if max_docs is not None and len(texts) >= max_docs:
                    return texts
    if not texts:
        raise ValueError("no pretraining text found: set data.beir_corpus or data.files")
    return texts


def train_wordpiece(texts: list[str], vocab_size: int, lowercase: bool = True):
    """A BERT WordPiece tokenizer trained on `texts` with `tokenizers` (from-scratch pretraining)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer  # the tokenizers-backed class in transformers 5

    trainer = BertWordPieceTokenizer(lowercase=lowercase)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS)
    tokenizer = BertTokenizer(vocab=canonical_vocab(trainer.get_vocab()), do_lower_case=lowercase)
    log.info("trained a WordPiece tokenizer on %d documents: %d tokens", len(texts), len(tokenizer))
    return tokenizer


def canonical_vocab(vocab: dict[str, int]) -> dict[str, int]:
    """The same tokens with ids in a fixed order: special tokens first, then sorted.

    `tokenizers` learns the same token set on every run but numbers its alphabet in hash-map
    order, so the ids (and every weight a from-scratch run trains) changed from run to run under
    one artifact key. WordPiece matches by string, so renumbering changes no tokenisation.
    """
    rest = sorted(token for token in vocab if token not in SPECIAL_TOKENS)
    return {token: i for i, token in enumerate([t for t in SPECIAL_TOKENS if t in vocab] + rest)}


def chunk(ids: list[int], size: int, min_tokens: int) -> list[list[int]]:
    """Consecutive pieces of `size`; a short tail is dropped unless it is the whole document."""
    pieces = [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]
    if len(pieces) > 1 and len(pieces[-1]) < min_tokens:
        pieces.pop()
    return [p for p in pieces if p]


def _tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return sha256_text(json.dumps([type(tokenizer).__name__, vocab]))[:16]


def texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def token_cache_dir() -> Path:
    return cache_root() / "pretrain-tokens"


def tokenize_corpus(
    texts: list[str],
    tokenizer,
    max_seq_length: int,
    min_chunk_tokens: int = 8,
    cache_dir: Path | None = None,
    cache_key: object = None,
) -> datasets.Dataset:
    """Dataset with one `input_ids` row (no special tokens) per chunk of max_seq_length - 2 tokens."""
    body = max_seq_length - 2  # room for [CLS] and [SEP]
    key = sha256_text(
        json.dumps([cache_key or texts_digest(texts), _tokenizer_digest(tokenizer), max_seq_length, min_chunk_tokens], default=str)
    )[:20]
    target = Path(cache_dir or token_cache_dir()) / key
    if (target / "dataset_info.json").is_file():
        log.info("tokenised corpus from cache %s", target)
        return datasets.load_from_disk(str(target))

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return {"input_ids": [piece for doc in ids for piece in chunk(doc, body, min_chunk_tokens)]}

    raw = datasets.Dataset.from_dict({"text": texts})
    # new_fingerprint: our own cache key, so `datasets` does not hash (and print) the closure
    chunks = raw.map(
        encode, batched=True, batch_size=512, remove_columns=["text"], desc="tokenising", load_from_cache_file=False, new_fingerprint=key
    )
    with publishing(target) as staging:  # another process may cache it first: theirs is kept
        chunks.save_to_disk(str(staging))
    log.info("tokenised %d documents into %d chunks (cached at %s)", len(texts), len(chunks), target)
    return datasets.load_from_disk(str(target))


def load_pretraining_chunks(sources: list[Path], tokenizer, data_cfg, texts: list[str] | None = None) -> datasets.Dataset:
    texts = texts if texts is not None else read_texts(sources, data_cfg.max_docs)
    cache_key = texts_digest(texts)  # content, not file names: edits invalidate, renames do not
    cache_dir = Path(data_cfg.cache_dir) if data_cfg.cache_dir else None
    return tokenize_corpus(texts, tokenizer, data_cfg.max_seq_length, data_cfg.min_chunk_tokens, cache_dir, cache_key)
