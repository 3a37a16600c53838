"""Text -> vectors with any Hugging Face encoder.

Pooling comes from the model's sentence-transformers config when it has one (mean for
MiniLM), else [CLS] (the RetroMAE / DPR convention); either can be overridden. Texts are
tokenised once, sorted by token length and cut into batches under a token budget, so
padding is minimal and short texts go through in large batches.

BERT-family models run through `retrieval.serving.encoder_fused` (the same arithmetic with less
overhead, in fp32 and in CPU bf16: see bench/README.md `## encode`); `EncoderSettings(backend="hf")`
forces transformers' forward.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.serving import encoder_fused
from retroflow.config import StageConfig
from retroflow.devices import autocast, pick_device, pick_dtype
from retroflow.models import ModelFormatError, load_dense_weights, read_sentence_transformer_settings, resolve_model_path
from retroflow.progress import progress_bar

log = logging.getLogger(__name__)

Pooling = Literal["auto", "cls", "mean", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean"]
Backend = Literal["auto", "fused", "hf"]


# MiniLM, 192 SciFact passages at 256 tokens, bf16 autocast on 2 AVX-512-BF16 cores: 33.7 / 39.4 /
# 35.4 / 34.3 docs/s at batch 8 / 16 / 32 / 64 (oneDNN's bf16 kernels favour small batches here)
CPU_BF16_BATCH = 16


class ModelLoadError(ValueError):
    """A model directory that exists but cannot be loaded (bad config.json, damaged weights, mismatched tokenizer)."""


class EncoderSettings(StageConfig):
    """How texts become vectors; part of every stage config that encodes."""

    pooling: Pooling = "auto"
    normalize: bool | None = None  # None = as the model's sentence-transformers config says
    query_max_length: int | None = None  # None = the model's max_seq_length (or 512)
    passage_max_length: int | None = None
    batch_size: int = 64  # most texts per batch
    max_tokens_per_batch: int = 16384  # padded tokens per batch
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on GPU, bf16 on a CPU with native bf16, else fp32
    query_prefix: str | None = None  # None = the model's saved "query" prompt (config_sentence_transformers.json), else none
    passage_prefix: str | None = None  # None = its "document" prompt
    show_progress: bool = True
    backend: Backend = "auto"  # auto = fused BERT forward when the model is a plain BERT, else hf


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' Pooling on right-padded batches (so the first token is [CLS] and the
    last real token sits at length - 1)."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode in ("mean", "mean_sqrt_len_tokens"):
        count = mask.sum(1).clamp(min=1e-9)
        return (hidden * mask).sum(1) / (count if mode == "mean" else count.sqrt())
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    if mode == "lasttoken":
        last = (attention_mask.sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "weightedmean":
        weights = mask * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling '{mode}' (use cls, mean, max, lasttoken, mean_sqrt_len_tokens or weightedmean)")


_ACTIVATIONS = {"identity": lambda x: x, "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu}


class DenseHead:
    """The sentence-transformers Dense modules of a model, applied to pooled vectors in order."""

    def __init__(self, model_path: Path, layers, device: torch.device):
        self.layers = []
        previous = None
        for layer in layers:
            if previous is not None and layer.in_features != previous:
                raise ModelFormatError(f"{layer.path}: Dense expects {layer.in_features} inputs but the module before it gives {previous}")
            weights = {key: value.to(device) for key, value in load_dense_weights(layer).items()}
            self.layers.append((layer, weights))
            previous = layer.out_features

    @property
    def out_features(self) -> int | None:
        return self.layers[-1][0].out_features if self.layers else None

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        for layer, weights in self.layers:
            out = _ACTIVATIONS[layer.activation](F.linear(vectors, weights["linear.weight"], weights.get("linear.bias")))
            if layer.residual:
                out = out + (vectors if "residual.weight" not in weights else F.linear(vectors, weights["residual.weight"]))
            vectors = out
        return vectors


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
        self.settings = settings or EncoderSettings()
        self.model_path = resolve_model_path(model_name_or_path)
        self.name = str(model_name_or_path)
        st = read_sentence_transformer_settings(self.model_path)
        if st.prompt_problem and (self.settings.query_prefix is None or self.settings.passage_prefix is None):
            raise ModelFormatError(st.prompt_problem)
        self.pooling = self.settings.pooling if self.settings.pooling != "auto" else (st.pooling or "cls")
        self.normalize = self.settings.normalize if self.settings.normalize is not None else st.normalize
        # train and serve agree: a fine-tuned model's prefixes travel in its directory
        self.query_prefix = self.settings.query_prefix if self.settings.query_prefix is not None else st.query_prefix
        self.passage_prefix = self.settings.passage_prefix if self.settings.passage_prefix is not None else st.passage_prefix
        self.device = pick_device(self.settings.device)
        self.dtype = pick_dtype(self.device, self.settings.precision)
        if not st.include_prompt and (self.query_prefix or self.passage_prefix):
            raise ModelFormatError(
                f"{self.model_path}: its Pooling excludes prompt tokens (include_prompt false), which retroflow "
                "does not reproduce; encode without prefixes or pool with the prompt included"
            )
        self.tokenizer = load_tokenizer(self.model_path)
        if st.do_lower_case and self.tokenizer("A")["input_ids"] != self.tokenizer("a")["input_ids"]:
            raise ModelFormatError(
                f"{self.model_path}: sentence_bert_config.json sets do_lower_case but the tokenizer is cased; "
                "retroflow would not lower-case as sentence-transformers does"
            )
        self.model = load_encoder_model(self.model_path).to(self.device).eval()
        check_vocabulary(self.tokenizer, self.model, self.model_path)
        self.head = DenseHead(self.model_path, st.dense, self.device)
        if st.dense and st.dense[0].in_features != self.model.config.hidden_size:
            raise ModelFormatError(
                f"{st.dense[0].path}: Dense expects {st.dense[0].in_features} inputs but the model's vectors "
                f"have {self.model.config.hidden_size}"
            )
        self.backend = choose_backend(self.model, self.settings.backend, self.dtype, self.device)
        max_positions = getattr(self.model.config, "max_position_embeddings", 512)
        # sentence-transformers >= 5 keeps max_seq_length as the tokenizer's model_max_length
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None) if st.is_sentence_transformer else None
        if not isinstance(tokenizer_max, int) or tokenizer_max > max_positions:
            tokenizer_max = None
        model_max = st.max_seq_length or tokenizer_max or min(max_positions, 512)
        self.query_max_length = self.settings.query_max_length or model_max
        self.passage_max_length = self.settings.passage_max_length or model_max
        self.last_docs_per_s: float | None = None
        log.info(
            "encoder %s: pooling=%s normalize=%s max_len q/p=%d/%d device=%s dtype=%s backend=%s",
            self.name,
            self.pooling,
            self.normalize,
            self.query_max_length,
            self.passage_max_length,
            self.device,
            str(self.dtype).replace("torch.", ""),
            self.backend,
        )

    @property
    def batch_size(self) -> int:
        """Texts per batch: bf16 on a CPU runs fastest in small batches (measured: bench/precision.py)."""
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            return min(self.settings.batch_size, CPU_BF16_BATCH)
        return self.settings.batch_size

    @property
    def dim(self) -> int:
        return int(self.head.out_features or self.model.config.hidden_size)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, self.query_max_length, self.query_prefix, desc="queries")

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, self.passage_max_length, self.passage_prefix, desc="passages")

    def tokenize(self, texts: Sequence[str], max_length: int, prefix: str = "") -> list[list[int]]:
        if prefix:
            texts = [prefix + t for t in texts]
        return self.tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]

    def encode(self, texts: Sequence[str], max_length: int, prefix: str = "", desc: str = "encode") -> np.ndarray:
        started = time.perf_counter()
        ids = self.tokenize(texts, max_length, prefix)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        batches = length_sorted_batches([len(x) for x in ids], self.batch_size, self.settings.max_tokens_per_batch)
        progress = progress_bar(total=len(ids), desc=desc, unit="doc", disable=not self.settings.show_progress, leave=False)
        with torch.inference_mode():
            # Re-read the weights on every call: the model may have been trained since the last one.
            forward = encoder_fused.FusedBert.from_model(self.model, self.dtype) if self.backend == "fused" else self._hf_forward
            for batch in batches:
                out[batch] = self._encode_batch([ids[i] for i in batch], forward)
                progress.update(len(batch))
        progress.close()
        elapsed = time.perf_counter() - started
        self.last_docs_per_s = len(ids) / elapsed if elapsed > 0 else None
        return out

    def _hf_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _encode_batch(self, ids: list[list[int]], forward=None) -> np.ndarray:
        input_ids, attention_mask = pad_batch(ids, self.tokenizer.pad_token_id or 0)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        forward = forward or self._hf_forward
        # the fused forward handles its own precision (and writes into buffers, which autocast refuses)
        with nullcontext() if isinstance(forward, encoder_fused.FusedBert) else autocast(self.device, self.dtype):
            hidden = forward(input_ids, attention_mask)
        vectors = self.head(pool(hidden.float(), attention_mask, self.pooling))
        if self.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors.cpu().numpy()


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask) int64 tensors."""
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def choose_backend(model: torch.nn.Module, requested: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> str:
    """'fused' for plain BERT encoders in fp32 anywhere and in bf16 on a CPU (where it was measured
    faster and within rounding of transformers' forward), else 'hf'.

    Half precision on a GPU stays on transformers' forward under autocast (the fused bf16 path
    was measured on CPU only; fp16 needs autocast's fp32 softmax and layer norms).
    """
    if requested == "hf":
        return "hf"
    on_cpu = device is None or torch.device(device).type == "cpu"
    problem = None
    if not encoder_fused.supports(model):
        problem = f"supports plain BERT encoders only, not {type(model).__name__}"
    elif dtype != torch.float32 and not (dtype == torch.bfloat16 and on_cpu):
        problem = f"runs in fp32, or bf16 on a CPU, not {str(dtype).replace('torch.', '')} on {torch.device(device or 'cpu').type}"
    if problem is None:
        return "fused"
    if requested == "fused":
        raise ValueError(f"backend 'fused' {problem}; use backend 'auto' or 'hf'")
    return "hf"


_LOAD_LOCK = threading.Lock()


@contextmanager
def _quiet_transformers():
    """Silence transformers' progress bar and load report (we report what matters ourselves)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(model_path: Path):
    with _LOAD_LOCK:  # see load_encoder_model
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError, KeyError) as err:  # e.g. a config.json that is not JSON
            raise ModelLoadError(
                f"{model_path}: the model could not be loaded: its tokenizer failed "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})"
            ) from None


def load_encoder_model(model_path: Path) -> torch.nn.Module:
    """The bare encoder of a checkpoint (MLM / pretraining heads dropped without a noisy report).

    Heads in the checkpoint (e.g. `cls.predictions.*` of a RetroMAE or BERT MLM checkpoint) are
    expected to be unused; weights the encoder needs but the checkpoint lacks are not, so those
    are still logged as a warning: they mean a randomly initialised encoder.
    """
    # transformers' lazy imports and its loading flip process-wide switches (weight init off, log
    # verbosity) and restore them on exit; two threads loading at once (mapped encoding tasks)
    # can fail the import or leave the switches flipped for good, so that later models are built
    # untied and uninitialised. One load at a time.
    with _LOAD_LOCK, _quiet_transformers():
        from transformers import AutoModel

        try:
            model, info = AutoModel.from_pretrained(model_path, output_loading_info=True)
        except Exception as err:  # bad config.json (JSONDecodeError), truncated weights (SafetensorError), ...
            raise ModelLoadError(
                f"{model_path}: the model could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})"
            ) from None
    # The pooler (a dense layer over [CLS] for next-sentence prediction) is never used for
    # encoding, and MLM checkpoints don't have one: its absence is no news.
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith("pooler."))
    if missing:
        log.warning(
            "%s: %d encoder weights missing from the checkpoint (randomly initialised): %s",
            model_path,
            len(missing),
            ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
        )
    return model


def check_vocabulary(tokenizer, model: torch.nn.Module, model_path: Path) -> None:
    """A tokenizer with more ids than the embedding matrix would fail deep inside a forward pass."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"{model_path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding matrix only {rows} "
            "rows; the tokenizer and the weights do not belong together"
        )


def iter_chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
