"""Small builders shared by the tests and the benchmark (tiny tokenizers, configs, fake batches)."""

from __future__ import annotations

from pathlib import Path

import torch

from retromae.collator import RetroMAECollator, SpecialIds

SCIFACT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scifact" / "corpus.jsonl"
FAKE_SPECIAL = SpecialIds(cls=2, sep=3, pad=0, mask=4, vocab_size=500)


def random_features(n: int, seed: int = 0, min_len: int = 8, max_len: int = 60, vocab: int = 500) -> list[dict]:
    """Token rows (no special tokens) of varied length, each with its own mask key."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    return [{"input_ids": torch.randint(5, vocab, (int(k),), generator=g).tolist(), "mask_key": i} for i, k in enumerate(lengths)]


def fake_collator(**kwargs) -> RetroMAECollator:
    kwargs.setdefault("max_length", 64)
    return RetroMAECollator(special=FAKE_SPECIAL, **kwargs)


def tiny_config_dict(tmp: Path, tokenizer: str | None = None, **train) -> dict:
    """A from-scratch config small enough for unit tests (seconds on 2 busy cores).

    Pass a saved `tokenizer` directory to compare separate runs: WordPiece training in
    `tokenizers` breaks count ties in hash order, so two trainings can differ slightly.
    """
    return {
        "model": {"init": None, "preset": "tiny", "vocab_size": 400, "dropout": 0.0, "tokenizer": tokenizer},
        "data": {"beir_corpus": str(SCIFACT), "max_docs": 60, "max_seq_length": 32, "cache_dir": str(tmp / "cache")},
        "train": {"seed": 7, "max_steps": 8, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0.0, "save_every": 4, "log_every": 4, **train},
    }


def save_tiny_tokenizer(directory: Path, docs: int = 60, vocab_size: int = 400) -> Path:
    from retromae.data import read_texts, train_wordpiece

    train_wordpiece(read_texts([SCIFACT], docs), vocab_size).save_pretrained(directory)
    return directory
