"""A lean forward pass for BERT encoders (MiniLM, RetroMAE, DPR) used by `Encoder`, in fp32 or bf16.

Why: on CPU, transformers' BertModel spends a good share of its time outside the matrix
multiplies (mask building, output bookkeeping, three separate Q/K/V projections). This forward
runs the same arithmetic with one fused QKV projection per layer, PyTorch's
`scaled_dot_product_attention`, and no mask at all when a batch has no padding. In fp32 it agrees
with `BertModel` to ~1e-6, so it is the default wherever `supports()` says yes; anything else falls
back to the Hugging Face forward.

In bf16 (a CPU with native bf16) the matrices are cast once per `from_model()` instead of on every
call as autocast does, and the residual stream stays in bf16 between layers; embeddings and every
layer norm compute in fp32 (PyTorch's mixed-type layer norm), as under autocast. Vectors stay
within rounding of fp32 (bench/precision.py measures how close and how much faster).

Weights are read from the live model at `FusedBert.from_model()` time (the encoder calls it
once per `encode()`), so an encoder whose model is being fine-tuned never uses stale weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def supports(model: torch.nn.Module) -> bool:
    """True for a plain BERT encoder (absolute positions, GELU, not a decoder) with the usual module names."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "bert":
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    if getattr(config, "hidden_act", None) != "gelu" or getattr(config, "is_decoder", False):
        return False
    return hasattr(model, "embeddings") and hasattr(model, "encoder") and hasattr(model.encoder, "layer")


@dataclass(frozen=True)
class _Layer:
    """One layer's weights; projection matrices stored as (in, out) for `addmm`."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    attn_out_weight: torch.Tensor
    attn_out_bias: torch.Tensor
    attn_norm: tuple[torch.Tensor, torch.Tensor]
    ffn_in_weight: torch.Tensor
    ffn_in_bias: torch.Tensor
    ffn_out_weight: torch.Tensor
    ffn_out_bias: torch.Tensor
    ffn_norm: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class FusedBert:
    """Weights of one BertModel arranged for `forward`; build with `FusedBert.from_model(model)`."""

    word: torch.Tensor
    position: torch.Tensor
    token_type0: torch.Tensor
    embed_norm: tuple[torch.Tensor, torch.Tensor]
    layers: tuple[_Layer, ...]
    num_heads: int
    eps: float
    dtype: torch.dtype = torch.float32  # of the projections, the attention and the residual stream
    # Scratch matrices reused by every layer and batch of one encode() call: fresh multi-MB
    # tensors on CPU cost page faults and zeroing each time, which showed up in profiles.
    _scratch: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> FusedBert:
        """`dtype` float32 or bfloat16: what the projections compute in (layer norms stay fp32)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the fused forward computes in float32 or bfloat16, not {dtype}")

        def projection(weight: torch.Tensor) -> torch.Tensor:
            # (in, out) for addmm; contiguous in bf16 so the cast copy is laid out once, here
            return weight.t() if dtype == torch.float32 else weight.t().to(dtype).contiguous()

        emb = model.embeddings
        layers = []
        for layer in model.encoder.layer:
            attn = layer.attention.self
            layers.append(
                _Layer(
                    qkv_weight=projection(torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])),
                    qkv_bias=torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]).to(dtype),
                    attn_out_weight=projection(layer.attention.output.dense.weight),
                    attn_out_bias=layer.attention.output.dense.bias.to(dtype),
                    attn_norm=(layer.attention.output.LayerNorm.weight, layer.attention.output.LayerNorm.bias),
                    ffn_in_weight=projection(layer.intermediate.dense.weight),
                    ffn_in_bias=layer.intermediate.dense.bias.to(dtype),
                    ffn_out_weight=projection(layer.output.dense.weight),
                    ffn_out_bias=layer.output.dense.bias.to(dtype),
                    ffn_norm=(layer.output.LayerNorm.weight, layer.output.LayerNorm.bias),
                )
            )
        return cls(
            word=emb.word_embeddings.weight,
            position=emb.position_embeddings.weight,
            token_type0=emb.token_type_embeddings.weight[0],  # BERT's default: every token is segment A
            embed_norm=(emb.LayerNorm.weight, emb.LayerNorm.bias),
            layers=tuple(layers),
            num_heads=int(model.config.num_attention_heads),
            eps=float(model.config.layer_norm_eps),
            dtype=dtype,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, length) ids and 0/1 mask -> last hidden state (batch, length, dim) in `dtype`; padded rows are junk."""
        batch, length = input_ids.shape
        dim, tokens = self.word.shape[1], input_ids.numel()
        heads, head_dim = self.num_heads, self.word.shape[1] // self.num_heads
        x = F.embedding(input_ids, self.word) + self.position[:length] + self.token_type0
        x = F.layer_norm(x, (dim,), *self.embed_norm, self.eps).view(tokens, dim).to(self.dtype)
        keep = self._attention_keep(attention_mask)
        for layer in self.layers:
            qkv = torch.addmm(layer.qkv_bias, x, layer.qkv_weight, out=self._buffer("qkv", tokens, 3 * dim, x))
            q, k, v = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(tokens, dim)
            out = torch.addmm(layer.attn_out_bias, context, layer.attn_out_weight, out=self._buffer("out", tokens, dim, x))
            x = F.layer_norm(out.add_(x), (dim,), *layer.attn_norm, self.eps)
            hidden = torch.addmm(layer.ffn_in_bias, x, layer.ffn_in_weight, out=self._buffer("ffn", tokens, layer.ffn_in_bias.numel(), x))
            hidden = torch.ops.aten.gelu_(hidden)  # exact (erf) GELU, as BERT's "gelu"
            out = torch.addmm(layer.ffn_out_bias, hidden, layer.ffn_out_weight, out=self._buffer("out", tokens, dim, x))
            x = F.layer_norm(out.add_(x), (dim,), *layer.ffn_norm, self.eps)
        return x.view(batch, length, dim)

    def _buffer(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """A (rows, cols) view of a scratch tensor that only grows; contents are garbage."""
        buffer = self._scratch.get(name)
        if buffer is None or buffer.numel() < rows * cols or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._scratch[name] = torch.empty(rows * cols, dtype=like.dtype, device=like.device)
        return buffer[: rows * cols].view(rows, cols)

    __call__ = forward

    @staticmethod
    def _attention_keep(attention_mask: torch.Tensor) -> torch.Tensor | None:
        # Length-sorted batches are often all full length: no mask lets SDPA take its fastest kernel.
        if bool(attention_mask.all()):
            return None
        return attention_mask[:, None, None, :].bool()  # boolean: works under fp32, bf16 and fp16 alike
