"""Text -> vectors with any Hugging Face encoder.

Pooling comes from the model's sentence-transformers config when it has one (mean for
MiniLM), else [CLS] (the RetroMAE / DPR convention); either can be overridden. Texts are
tokenised once, sorted by token length and cut into batches under a token budget, so
padding is minimal and short texts go through in large batches.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retroflow.config import StageConfig
from retroflow.devices import autocast, pick_device, pick_dtype
from retrieval.models import read_sentence_transformer_settings, resolve_model_path

log = logging.getLogger(__name__)

Pooling = Literal["auto", "cls", "mean", "max"]


class EncoderSettings(StageConfig):
    """How texts become vectors; part of every stage config that encodes."""

    pooling: Pooling = "auto"
    normalize: bool | None = None  # None = as the model's sentence-transformers config says
    query_max_length: int | None = None  # None = the model's max_seq_length (or 512)
    passage_max_length: int | None = None
    batch_size: int = 64  # most texts per batch
    max_tokens_per_batch: int = 16384  # padded tokens per batch
    device: str = "auto"
    precision: str = "auto"  # auto = bf16/fp16 on GPU, fp32 on CPU
    query_prefix: str = ""
    passage_prefix: str = ""
    show_progress: bool = True


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    raise ValueError(f"unknown pooling '{mode}' (use cls, mean or max)")


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Index batches over texts sorted by length (longest first), each under both limits."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(batch_size, max_tokens // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


class Encoder:
    """A query/passage encoder: `encode_queries(texts)` and `encode_passages(texts)` -> float32 arrays."""

    def __init__(self, model_name_or_path: str | Path, settings: EncoderSettings | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.settings = settings or EncoderSettings()
        self.model_path = resolve_model_path(model_name_or_path)
        self.name = str(model_name_or_path)
        st = read_sentence_transformer_settings(self.model_path)
        self.pooling = self.settings.pooling if self.settings.pooling != "auto" else (st.pooling or "cls")
        self.normalize = self.settings.normalize if self.settings.normalize is not None else st.normalize
        self.device = pick_device(self.settings.device)
        self.dtype = pick_dtype(self.device, self.settings.precision)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModel.from_pretrained(self.model_path).to(self.device).eval()
        model_max = st.max_seq_length or min(getattr(self.model.config, "max_position_embeddings", 512), 512)
        self.query_max_length = self.settings.query_max_length or model_max
        self.passage_max_length = self.settings.passage_max_length or model_max
        self.last_docs_per_s: float | None = None
        log.info(
            "encoder %s: pooling=%s normalize=%s max_len q/p=%d/%d device=%s dtype=%s",
            self.name, self.pooling, self.normalize, self.query_max_length, self.passage_max_length,
            self.device, str(self.dtype).replace("torch.", ""),
        )  # fmt: skip

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, self.query_max_length, self.settings.query_prefix, desc="queries")

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, self.passage_max_length, self.settings.passage_prefix, desc="passages")

    def tokenize(self, texts: Sequence[str], max_length: int, prefix: str = "") -> list[list[int]]:
        if prefix:
            texts = [prefix + t for t in texts]
        return self.tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]

    def encode(self, texts: Sequence[str], max_length: int, prefix: str = "", desc: str = "encode") -> np.ndarray:
        started = time.perf_counter()
        ids = self.tokenize(texts, max_length, prefix)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        batches = length_sorted_batches([len(x) for x in ids], self.settings.batch_size, self.settings.max_tokens_per_batch)
        progress = tqdm(total=len(ids), desc=desc, unit="doc", disable=not self.settings.show_progress, leave=False)
        with torch.inference_mode():
            for batch in batches:
                out[batch] = self._encode_batch([ids[i] for i in batch])
                progress.update(len(batch))
        progress.close()
        elapsed = time.perf_counter() - started
        self.last_docs_per_s = len(ids) / elapsed if elapsed > 0 else None
        return out

    def _encode_batch(self, ids: list[list[int]]) -> np.ndarray:
        padded = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.device)
        attention_mask = padded["attention_mask"].to(self.device)
        with autocast(self.device, self.dtype):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vectors = pool(hidden.float(), attention_mask, self.pooling)
        if self.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors.cpu().numpy()


def iter_chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
