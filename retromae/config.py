"""`PretrainConfig`: every knob of a RetroMAE pretraining run, validated at load time.

The ablation switches (`objective`, `decoding`, `decoder_layers`, `encoder_mask_ratio`,
`decoder_mask_ratio`) sit at the top level so a YAML file reads like the paper's table, next
to the decoder-head cost options (`ce_chunk_size`, `decoder_target_fraction`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retroflow.config import StageConfig

log = logging.getLogger("retroflow.retromae")

# Cost options added after configs were first keyed: left out of the canonical form while at
# their defaults, so every existing config keeps the fingerprint it had.
COST_OPTION_DEFAULTS: dict[str, Any] = {"ce_chunk_size": None, "decoder_target_fraction": 1.0}

# The paper's recommended ranges; values outside them are allowed (ablations) but warned about.
PAPER_ENCODER_RANGE = (0.15, 0.30)
PAPER_DECODER_RANGE = (0.50, 0.70)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelSection(_Section):
    """Where the encoder comes from.

    `init` set: continue pretraining that checkpoint (an alias such as `minilm`, a local HF
    directory, or a previous pretrain output directory, whose decoder is then reused).
    `init` null: train from scratch with the `preset` architecture and either an existing
    `tokenizer` or a WordPiece tokenizer trained on the corpus.
    """

    init: str | None = "minilm"
    preset: Literal["tiny", "small", "base"] = "small"
    tokenizer: str | None = None
    vocab_size: int = Field(30522, ge=128, description="size of a WordPiece vocab trained from scratch")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="override hidden/attention dropout")


class DataSection(_Section):
    """Pretraining text: a BEIR corpus.jsonl and/or plain text / jsonl / parquet files."""

    beir_corpus: str | None = None
    files: list[str] = Field(default_factory=list)
    max_seq_length: int = Field(128, ge=8, le=8192)
    max_docs: int | None = Field(None, ge=1, description="use only the first N documents")
    min_chunk_tokens: int = Field(8, ge=1, description="drop trailing chunks shorter than this")
    heldout_fraction: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="chunks kept out of training; their reconstruction "
        "loss (fixed masks, no dropout) is logged every train.eval_every steps",
    )
    heldout_max_chunks: int = Field(256, ge=1, description="at most this many held-out chunks (the check's cost)")
    cache_dir: str | None = Field(None, description="tokenised dataset cache (default ~/.cache/retroflow)")


class TrainSection(_Section):
    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_the_default_steps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("epochs") is not None and "max_steps" not in data:
            return {**data, "max_steps": None}  # so the canonical form round-trips
        return data

    seed: int = 42
    max_steps: int | None = Field(1000, ge=1, description="optimizer steps (or give train.epochs instead)")
    epochs: float | None = Field(None, gt=0, description="passes over the training chunks; sets the steps from the corpus size")
    batch_size: int = Field(32, ge=1, description="global batch per optimizer step (all processes, all micro-batches)")
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    head_lr: float | None = Field(None, gt=0, description="learning rate of what the init lacks (MLM head transform, decoder); None = lr")
    head_warmup_steps: int = Field(
        0,
        ge=0,
        description="first steps train only the MLM head and decoder (encoder frozen): "
        "a random head must not drive the encoder's gradients",
    )
    eval_every: int | None = Field(None, ge=1, description="held-out loss every N steps (and at the end); None = log_every x 10")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    save_every: int = Field(500, ge=1, description="checkpoint every N optimizer steps")
    log_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class PretrainConfig(StageConfig):
    objective: Literal["retromae", "mlm"] = "retromae"
    decoding: Literal["enhanced", "basic"] = "enhanced"
    decoder_layers: int = Field(1, ge=1)
    bottleneck: Literal["cls", "mean", "init"] = Field(
        "cls",
        description="the sentence embedding the decoder reads: [CLS] (the paper), the mean of the encoder's states, "
        "or init = the init model's own sentence-transformers pooling (continued pretraining of a sentence encoder "
        "then trains the vector it serves; a deviation from the paper)",
    )
    encoder_mask_ratio: float = Field(0.3, gt=0, lt=1)
    decoder_mask_ratio: float = Field(0.5, gt=0, lt=1)
    whole_word_mask: bool = False
    ce_chunk_size: int | None = Field(
        None,
        ge=1,
        description="vocabulary projection + cross-entropy over chunks of this many rows, "
        "recomputed in backward: same loss and gradients, peak memory of one chunk's logits",
    )
    decoder_target_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="enhanced decoding: each sentence token is a decoder target with "
        "this probability (query rows never see each other, so it is the same objective with fewer rows)",
    )
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.model.init is None and self.model.preset is None:
            raise ValueError("set model.init (a checkpoint) or model.preset (from scratch)")
        per_step = self.train.grad_accum_steps
        if self.train.batch_size % per_step:
            raise ValueError(f"train.batch_size={self.train.batch_size} is not divisible by train.grad_accum_steps={per_step}")
        t = self.train
        if t.epochs is not None and t.max_steps is not None:
            raise ValueError("train.epochs and train.max_steps: set one (epochs sets the steps from the corpus size)")
        if t.max_steps is None and t.epochs is None:
            raise ValueError("train.max_steps or train.epochs must be set")
        if t.epochs is None and t.head_warmup_steps >= t.max_steps:
            raise ValueError(
                f"train.head_warmup_steps ({t.head_warmup_steps}) must be shorter than the run (train.max_steps {t.max_steps})"
            )
        if self.bottleneck == "init" and self.model.init is None:
            raise ValueError("bottleneck: init needs model.init (a sentence-transformers model whose pooling the decoder reads)")
        if self.decoder_target_fraction < 1 and (self.objective, self.decoding) != ("retromae", "enhanced"):
            raise ValueError("decoder_target_fraction < 1 needs objective=retromae with decoding=enhanced")
        return self

    def canonical(self) -> dict[str, Any]:
        data = super().canonical()
        for name, default in COST_OPTION_DEFAULTS.items():
            if data.get(name) == default:
                del data[name]
        return data

    def steps_for(self, chunks: int) -> int:
        """Optimizer steps of the run over `chunks` training chunks (train.epochs, else train.max_steps)."""
        t = self.train
        if t.epochs is None:
            return int(t.max_steps)
        steps = max(1, math.ceil(t.epochs * chunks / t.batch_size))
        if t.head_warmup_steps >= steps:
            raise ValueError(
                f"train.head_warmup_steps ({t.head_warmup_steps}) must be shorter than the run "
                f"({steps} steps: train.epochs {t.epochs} over {chunks} chunks)"
            )
        return steps

    def warn_outside_paper(self) -> list[str]:
        """Warnings for legal but unusual settings (called once at the start of a run)."""
        notes = []
        lo, hi = PAPER_ENCODER_RANGE
        if not lo <= self.encoder_mask_ratio <= hi:
            notes.append(f"encoder_mask_ratio={self.encoder_mask_ratio} is outside the paper's {lo}-{hi}")
        lo, hi = PAPER_DECODER_RANGE
        if self.objective == "retromae" and not lo <= self.decoder_mask_ratio <= hi:
            notes.append(f"decoder_mask_ratio={self.decoder_mask_ratio} is outside the paper's {lo}-{hi}")
        for note in notes:
            log.warning("%s", note)
        return notes

    def data_sources(self) -> list[Path]:
        sources = [Path(p) for p in self.data.files]
        if self.data.beir_corpus:
            sources.insert(0, Path(self.data.beir_corpus))
        return sources
