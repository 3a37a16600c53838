"""RetroMAE model: a HF masked-LM encoder plus a one-layer decoder that shares its embeddings and MLM head.

Cost notes (why the code looks the way it does):
* The vocabulary projection (hidden x 30k) costs about as much as a whole 6-layer 384-wide
  encoder, so the MLM head is applied only to the rows that carry a label (gathered first):
  the encoder's masked tokens, basic decoding's masked tokens, enhanced decoding's sentence
  tokens (all of them are targets there, so that projection is inherent to the method).
* Enhanced decoding's query rows never attend to each other, so only rows that carry a target
  are decoded at all: padding, [CLS]/[SEP] and, with `decoder_target_fraction` < 1, the rows
  the collator left without a target cost nothing.
* `ce_chunk_size` bounds the memory of that projection: rows go through head + cross-entropy
  a chunk at a time and each chunk is recomputed in backward, so only one chunk's logits
  (rows x vocab, fp32) are ever alive. Same loss and gradients, one extra head forward.
* Losses are returned as sums divided by a caller-given normaliser, so the trainer can divide
  by the *global* number of targets of the optimizer step: gradient accumulation and DDP
  then give the same update as one big batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, PreTrainedModel
from transformers.activations import ACT2FN

from retroflow.models import resolve_model_path, write_sentence_transformer_files
from retroflow.publish import publishing
from retromae.collator import IGNORE

log = logging.getLogger("retroflow.retromae")

ENCODER_DIR = "encoder"
DECODER_DIR = "decoder"
DECODER_WEIGHTS = "decoder.safetensors"
DECODER_CONFIG = "retromae.json"

PRESETS = {  # from-scratch architectures (BERT layout)
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=256),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}


class DecoderLayer(nn.Module):
    """One post-LayerNorm transformer layer (BERT's layout) whose queries and keys/values may differ.

    Enhanced decoding needs queries from the query stream H1 and keys/values from the content
    stream H2; HF's BertLayer only does self-attention, hence this small layer.
    """

    def __init__(self, config) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(hidden, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attn_dropout = config.attention_probs_dropout_prob
        self._init(config.initializer_range)

    def _init(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """query: (B, Lq, H); context: (B, Lk, H); visible: bool, broadcastable to (B, Lq, Lk)."""
        attended = F.scaled_dot_product_attention(
            self._heads(self.query(query)),
            self._heads(self.key(context)),
            self._heads(self.value(context)),
            attn_mask=visible.unsqueeze(1),
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(query.shape)
        x = self.attn_norm(query + self.dropout(self.attn_out(attended)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))


@dataclass
class RetroMAEOutput:
    loss: torch.Tensor
    encoder_loss: torch.Tensor
    decoder_loss: torch.Tensor | None
    sentence_embedding: torch.Tensor


def mlm_head_of(mlm: PreTrainedModel) -> nn.Module:
    """The module mapping hidden states to vocabulary logits (BERT: `cls`, RoBERTa-style: `lm_head`)."""
    for name in ("cls", "lm_head"):
        head = getattr(mlm, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(mlm).__name__}: no MLM head found (expected a `cls` or `lm_head` module)")


def normalised(total: torch.Tensor, count: int, normaliser: float | torch.Tensor | None) -> torch.Tensor:
    denom = count if normaliser is None else normaliser
    return total / max(float(denom), 1.0)


def _head_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_head_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """sum CE(head(hidden), targets) a chunk of rows at a time, each chunk recomputed in backward.

    Without the recomputation autograd would keep every chunk's logits for backward and the
    peak would be that of the unchunked loss.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(_head_ce_sum, head, hidden[rows], targets[rows], use_reentrant=False)
    return total


def target_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, K) of each row's targets in order, K = most targets in any row, and their labels.

    Rows with fewer targets are padded with non-target positions, whose gathered label is IGNORE.
    """
    is_target = labels != IGNORE
    k = max(int(is_target.sum(1).max()), 1)  # >= 1: an empty query stream is not worth a special case
    rows = torch.argsort((~is_target).to(torch.uint8), dim=1, stable=True)[:, :k]
    return rows, labels.gather(1, rows)


class RetroMAEModel(nn.Module):
    """Encoder (any HF masked LM, BERT family tested) + RetroMAE decoder.

    objective="mlm" is the ablation baseline: the same encoder and encoder loss, no decoder.
    """

    def __init__(
        self,
        mlm: PreTrainedModel,
        objective: str = "retromae",
        decoding: str = "enhanced",
        decoder_layers: int = 1,
        ce_chunk_size: int | None = None,
        bottleneck: str = "cls",
        normalize: bool = False,
    ):
        super().__init__()
        if objective not in ("retromae", "mlm") or decoding not in ("enhanced", "basic"):
            raise ValueError(f"unknown objective/decoding {objective!r}/{decoding!r}")
        if bottleneck not in ("cls", "mean"):
            raise ValueError(f"unknown bottleneck {bottleneck!r} (cls or mean)")
        self.mlm = mlm
        self.bottleneck = bottleneck  # the sentence embedding the decoder reads, and the pooling saved with the encoder
        self.normalize = normalize  # only declared in the saved files: the decoder reads the raw vector
        self.objective = objective
        self.decoding = decoding
        self.ce_chunk_size = ce_chunk_size  # None: one vocabulary projection over all target rows
        layers = decoder_layers if objective == "retromae" else 0
        self.decoder = nn.ModuleList(DecoderLayer(mlm.config) for _ in range(layers))

    # shared pieces -----------------------------------------------------------------------
    @property
    def encoder(self) -> PreTrainedModel:
        return self.mlm.base_model

    @property
    def embeddings(self) -> nn.Module:
        return self.encoder.embeddings

    @property
    def head(self) -> nn.Module:
        return mlm_head_of(self.mlm)

    # forward -----------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_labels: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_normaliser: float | torch.Tensor | None = None,
        decoder_normaliser: float | torch.Tensor | None = None,
    ) -> RetroMAEOutput:
        hidden = self.encode(input_ids, attention_mask)
        sentence = self.sentence_embedding(hidden, attention_mask)
        encoder_loss = self.masked_lm_loss(hidden, labels, encoder_normaliser)
        decoder_loss = None
        if self.objective == "retromae":
            rows = None
            if self.decoding == "enhanced":
                rows, decoder_labels = target_rows(decoder_labels)
            decoded = self.decode(sentence, decoder_input_ids, attention_mask, decoder_attention_mask, rows)
            decoder_loss = self.masked_lm_loss(decoded, decoder_labels, decoder_normaliser)
        loss = encoder_loss if decoder_loss is None else encoder_loss + decoder_loss
        return RetroMAEOutput(loss, encoder_loss, decoder_loss, sentence)

    def sentence_embedding(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The bottleneck: [CLS], or the mean over real tokens (the vector a mean-pooling model serves)."""
        if self.bottleneck == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def masked_lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, normaliser=None) -> torch.Tensor:
        """Cross-entropy over labelled positions only: gather first, then the vocabulary projection."""
        selected = labels != IGNORE
        rows, targets = hidden[selected], labels[selected]
        if self.ce_chunk_size is not None and rows.size(0) > self.ce_chunk_size:
            total = chunked_head_ce_sum(self.head, rows, targets, self.ce_chunk_size)
        else:
            total = _head_ce_sum(self.head, rows, targets)
        return normalised(total, targets.numel(), normaliser)

    def decode(
        self,
        sentence: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder hidden states (B, L, H); position 0 of the content stream is the sentence embedding.

        Enhanced decoding with `rows` (B, K) positions: only those query rows, (B, K, H).
        """
        tokens = self.embeddings(input_ids=decoder_input_ids)
        content = torch.cat([sentence.unsqueeze(1), tokens[:, 1:]], dim=1)
        if self.decoding == "basic":
            visible = attention_mask.bool()[:, None, :]  # ordinary self-attention over real tokens
            for layer in self.decoder:
                content = layer(content, content, visible)
            return content
        if decoder_attention_mask is None:
            raise ValueError("enhanced decoding needs decoder_attention_mask from the collator")
        # query stream H1: sentence embedding + position p_i; it never carries token x_i itself
        positions = self.embeddings.position_ids[:, : decoder_input_ids.size(1)]
        visible = decoder_attention_mask
        if rows is not None:  # query rows are independent of each other: decode only these
            positions = positions[0][rows]
            visible = visible.gather(1, rows.unsqueeze(-1).expand(-1, -1, visible.size(-1)))
        query = sentence.unsqueeze(1) + self.embeddings.position_embeddings(positions)
        # stacked layers refine the query stream and keep attending to the fixed content
        # stream, so no layer can leak x_i into row i
        for layer in self.decoder:
            query = layer(query, content, visible)
        return query

    # persistence -------------------------------------------------------------------------
    def save(self, out_dir: Path, tokenizer=None) -> None:
        """out_dir/encoder: HF encoder (+ tokenizer); out_dir/decoder: decoder layers + MLM head.

        Both are written whole under staging names and only then renamed over a previous save
        (`pretrain --resume` into the same DIR), so a kill or a full disk while writing leaves the
        previous encoder and decoder as they were, not a mix of old and new files (only a kill
        between the two renames at the very end could pair a new decoder with the old encoder).
        """
        out_dir = Path(out_dir)
        # Nested: neither directory is replaced until both are complete (decoder renamed first).
        with publishing(out_dir / ENCODER_DIR, replace=True) as encoder_dir, publishing(out_dir / DECODER_DIR, replace=True) as decoder_dir:
            self.encoder.save_pretrained(encoder_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(encoder_dir)
            declare_pooling(encoder_dir, self.mlm.config, self.bottleneck, self.normalize)
            save_file(self.decoder_state(), str(decoder_dir / DECODER_WEIGHTS))
            meta = {
                "objective": self.objective,
                "decoding": self.decoding,
                "decoder_layers": len(self.decoder),
                "bottleneck": self.bottleneck,
                "mlm_class": type(self.mlm).__name__,
            }
            (decoder_dir / DECODER_CONFIG).write_text(json.dumps(meta, indent=2))

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """Decoder layers and the MLM head, minus the output matrix (it *is* the word embeddings)."""
        state = {f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}
        tied = self.mlm.get_output_embeddings().weight
        for key, value in self.head.state_dict().items():
            if value.data_ptr() != tied.data_ptr():
                state[f"head.{key}"] = value
        return {k: v.detach().clone().contiguous().cpu() for k, v in state.items()}

    def load_decoder_state(self, state: dict[str, torch.Tensor]) -> None:
        decoder = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
        head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
        if self.decoder and decoder:
            self.decoder.load_state_dict(decoder)
        missing, unexpected = self.head.load_state_dict(head, strict=False)
        tied = self.mlm.get_output_embeddings().weight
        names = dict(self.head.named_parameters())
        really_missing = [k for k in missing if k in names and names[k] is not tied]
        if really_missing or unexpected:
            raise ValueError(f"MLM head state mismatch: missing {really_missing}, unexpected {unexpected}")


def declare_pooling(encoder_dir: Path, config, pooling: str = "cls", normalize: bool = False) -> None:
    """sentence-transformers files declaring the pooling pretraining trained (the bottleneck), so
    `retroflow evaluate`, fine-tuning and SentenceTransformer(encoder_dir) use that vector."""
    max_len = min(512, getattr(config, "max_position_embeddings", 512))
    write_sentence_transformer_files(encoder_dir, pooling=pooling, normalize=normalize, max_seq_length=max_len, dim=config.hidden_size)


# --------------------------------------------------------------------------- construction


def resolve_checkpoint(name_or_path: str) -> Path:
    """Alias or path -> local directory (a `retroflow pretrain` output, or anything `resolve_model_path` knows)."""
    local = Path(name_or_path).expanduser()
    if (local / ENCODER_DIR / "config.json").is_file():  # a previous `retroflow pretrain` output
        return local
    return Path(resolve_model_path(name_or_path))


def _dropout_overrides(dropout: float | None) -> dict:
    return {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}


def load_pretrained_mlm(path: Path, dropout: float | None = None) -> PreTrainedModel:
    """AutoModelForMaskedLM from a checkpoint; a missing MLM head is initialised and tied, and logged."""
    mlm, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, **_dropout_overrides(dropout))
    missing = sorted(info.get("missing_keys", []))
    if missing:
        tied = mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
        log.warning(
            "checkpoint %s has no MLM head (%d missing tensors, e.g. %s): initialised it fresh "
            "(transform random, bias zero), output matrix %s to the word embeddings",
            path,
            len(missing),
            missing[0],
            "tied" if tied else "NOT tied",
        )
    return mlm


def scratch_mlm(preset: str, vocab_size: int, pad_token_id: int, max_length: int, dropout: float | None) -> PreTrainedModel:
    config = BertConfig(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        max_position_embeddings=max(512, max_length),
        tie_word_embeddings=True,
        **PRESETS[preset],
        **_dropout_overrides(dropout),
    )
    return BertForMaskedLM(config)


def load_retromae(
    path: Path,
    objective: str,
    decoding: str,
    decoder_layers: int,
    dropout: float | None = None,
    ce_chunk_size: int | None = None,
    bottleneck: str = "cls",
    normalize: bool = False,
) -> RetroMAEModel:
    """A previous pretrain output (encoder/ + decoder/) or any HF checkpoint directory."""
    path = Path(path)
    encoder_dir = path / ENCODER_DIR if (path / ENCODER_DIR).is_dir() else path
    model = RetroMAEModel(
        load_pretrained_mlm(encoder_dir, dropout), objective, decoding, decoder_layers, ce_chunk_size, bottleneck, normalize
    )
    weights = path / DECODER_DIR / DECODER_WEIGHTS
    if weights.is_file():
        state = load_file(str(weights))
        if not model.decoder:
            state = {k: v for k, v in state.items() if k.startswith("head.")}
        saved_layers = len({k.split(".")[1] for k in state if k.startswith("decoder.")})
        if saved_layers and saved_layers != len(model.decoder):
            log.warning("saved decoder has %d layers, config asks %d: decoder re-initialised", saved_layers, len(model.decoder))
            state = {k: v for k, v in state.items() if k.startswith("head.")}
        model.load_decoder_state(state)
        log.info("continued from %s: encoder, MLM head%s restored", path, " and decoder" if saved_layers else "")
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: RetroMAEModel) -> str:
    enc = count_parameters(model.encoder)
    dec = count_parameters(model.decoder)
    decoder = f"decoder {len(model.decoder)} layer(s) {dec / 1e6:.2f}M"
    return f"encoder {enc / 1e6:.1f}M params, {decoder}, objective={model.objective}/{model.decoding}"


__all__ = [
    "DecoderLayer",
    "RetroMAEModel",
    "RetroMAEOutput",
    "PRESETS",
    "load_retromae",
    "scratch_mlm",
    "resolve_checkpoint",
    "describe",
]
