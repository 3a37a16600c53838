"""Batches for RetroMAE: one sentence, masked twice, plus the enhanced-decoding attention mask.

All mask logic is vectorised tensor work. The only per-row Python is drawing the row's random
numbers from a generator seeded by (run seed, sample key): a sample's masks then depend on
the sample alone, not on which process, micro-batch or padded length it landed in. That is
what makes a 2-process DDP run match a 1-process run on the same global batch, and a resumed
run match an uninterrupted one, without saving any collator state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE = -100
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads nearby keys over the seed space


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    mask: int
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialIds:
        return cls(
            cls=tokenizer.cls_token_id,
            sep=tokenizer.sep_token_id,
            pad=tokenizer.pad_token_id,
            mask=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
        )


def continuation_table(tokenizer) -> torch.Tensor:
    """Bool per vocab id: True for WordPiece continuation pieces (`##x`), used by whole-word masking."""
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token, idx in tokenizer.get_vocab().items():
        if token.startswith("##") and idx < len(table):
            table[idx] = True
    return table


# --------------------------------------------------------------------------- mask primitives


def stochastic_count(n: torch.Tensor, ratio: float, u: torch.Tensor) -> torch.Tensor:
    """floor(n*ratio + u) with u ~ U[0,1): an integer count whose expectation is exactly n*ratio.

    Plain rounding would bias short rows (e.g. 0.3 of 5 tokens is always 2 = 0.4).
    """
    return torch.floor(n.to(torch.float64) * ratio + u.to(torch.float64)).long()


def ranks_of(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim (0 = smallest score), one argsort + scatter."""
    order = scores.argsort(dim=-1, stable=True)
    positions = torch.arange(scores.size(-1), device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def choose_tokens(eligible: torch.Tensor, ratio: float, scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pick about `ratio` of the eligible positions of each row (exact count per row, random choice).

    eligible/scores: (..., L); u: (...). Ineligible positions get score 2 so they sort last.
    """
    scores = scores.masked_fill(~eligible, 2.0)
    k = stochastic_count(eligible.sum(-1), ratio, u)
    return (ranks_of(scores) < k.unsqueeze(-1)) & eligible


def choose_whole_words(
    eligible: torch.Tensor, continuation: torch.Tensor, ratio: float, scores: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Whole-word masking: words are picked in random order until about `ratio` of the tokens.

    A word is taken when its midpoint falls before the token budget k, so the expected masked
    count stays close to ratio*n instead of always overshooting by the last word.
    """
    batch, length = eligible.shape
    prev_eligible = torch.nn.functional.pad(eligible[:, :-1], (1, 0), value=False)
    starts = eligible & (~continuation | ~prev_eligible)
    word_id = torch.cumsum(starts.long(), dim=1) * eligible  # 0 = not a word token
    word_score = torch.full((batch, length + 1), 2.0, dtype=scores.dtype)
    word_score.scatter_(1, word_id * starts, torch.where(starts, scores, torch.full_like(scores, 2.0)))
    word_score[:, 0] = 2.0
    token_rank = ranks_of(word_score.gather(1, word_id))  # stable: a word's pieces stay contiguous
    word_start_rank = torch.zeros(batch, length + 1, dtype=torch.long).scatter_(1, word_id * starts, token_rank * starts)
    word_len = torch.zeros(batch, length + 1, dtype=torch.long).scatter_add_(1, word_id, eligible.long())
    k = stochastic_count(eligible.sum(-1), ratio, u).unsqueeze(-1).to(torch.float64)
    midpoint = word_start_rank.gather(1, word_id) + word_len.gather(1, word_id).to(torch.float64) / 2
    return eligible & (midpoint < k)


def bert_corrupt(
    input_ids: torch.Tensor, chosen: torch.Tensor, special: SpecialIds, u: torch.Tensor, random_ids: torch.Tensor
) -> torch.Tensor:
    """BERT's 80/10/10: chosen tokens become [MASK] (80%), a random token (10%) or stay (10%)."""
    out = input_ids.clone()
    out[chosen & (u < 0.8)] = special.mask
    swap = chosen & (u >= 0.8) & (u < 0.9)
    out[swap] = random_ids[swap]
    return out


def enhanced_attention_mask(valid: torch.Tensor, ratio: float, scores: torch.Tensor) -> torch.Tensor:
    """Position-specific mask for enhanced decoding; True = query row i may attend to key j.

    valid: (B, L) real tokens; scores: (B, L, L) uniforms. Row i always sees position 0 (the
    sentence embedding), never sees itself, and hides each other real position with
    probability `ratio`, independently per row. Thresholding the uniforms instead of ranking
    them (exact count per row) gives the same expected ratio without a (B, L, L) sort, which
    took most of the collation time at 512 tokens.
    """
    length = valid.size(1)
    visible = valid.unsqueeze(1) & (scores >= ratio)
    visible &= ~torch.eye(length, dtype=torch.bool)
    visible[:, :, 0] = True
    return visible


def subsample_targets(labels: torch.Tensor, fraction: float, u: torch.Tensor) -> torch.Tensor:
    """Keep each target with probability `fraction` (u: uniforms shaped like labels); the rest -> IGNORE."""
    if fraction >= 1.0:
        return labels
    return labels.masked_fill(u >= fraction, IGNORE)


# --------------------------------------------------------------------------- the collator


@dataclass
class RetroMAECollator:
    """Turns tokenised chunks (`input_ids` without special tokens) into a training batch.

    Keys: input_ids/attention_mask/labels for the encoder; for objective=retromae also
    decoder_input_ids, decoder_labels and (enhanced) decoder_attention_mask (B, L, L) or
    (basic) none, the decoder then reuses attention_mask.
    """

    special: SpecialIds
    max_length: int
    encoder_mask_ratio: float = 0.3
    decoder_mask_ratio: float = 0.5
    objective: str = "retromae"
    decoding: str = "enhanced"
    continuation: torch.Tensor | None = None  # set => whole-word masking
    seed: int = 0
    decoder_target_fraction: float = 1.0  # enhanced decoding: share of sentence tokens that are targets
    _fallback: torch.Generator = field(default_factory=torch.Generator, repr=False)

    def __post_init__(self) -> None:
        self._fallback.manual_seed(self.seed)

    def _generator(self, key: Any) -> torch.Generator:
        if key is None:  # ad-hoc use: one sequential stream, still reproducible from `seed`
            return self._fallback
        mixed = (int(self.seed) * _SEED_MIX + int(key) * 0x2545F4914F6CDD1D + 1) % (2**63 - 1)
        return torch.Generator().manual_seed(mixed)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [self._with_specials(f["input_ids"]) for f in features]
        batch, length = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((batch, length), self.special.pad, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.as_tensor(row)
        valid = input_ids != self.special.pad
        eligible = valid & (input_ids != self.special.cls) & (input_ids != self.special.sep)
        draws = self._draw(features, [len(r) for r in rows], length)

        if self.continuation is not None:
            enc_chosen = choose_whole_words(
                eligible, self.continuation[input_ids], self.encoder_mask_ratio, draws["enc_scores"], draws["enc_u"]
            )
        else:
            enc_chosen = choose_tokens(eligible, self.encoder_mask_ratio, draws["enc_scores"], draws["enc_u"])
        out = {
            "input_ids": bert_corrupt(input_ids, enc_chosen, self.special, draws["replace_u"], draws["random_ids"]),
            "attention_mask": valid.long(),
            "labels": torch.where(enc_chosen, input_ids, IGNORE),
        }
        if self.objective == "retromae":
            out.update(self._decoder_side(input_ids, valid, eligible, draws))
        return out

    def _with_specials(self, ids: Sequence[int]) -> list[int]:
        body = list(ids)[: self.max_length - 2]
        return [self.special.cls, *body, self.special.sep]

    def _decoder_side(self, input_ids, valid, eligible, draws) -> dict[str, torch.Tensor]:
        if self.decoding == "enhanced":
            # content stream sees the clean sentence; the mask lives in the attention pattern,
            # and every sentence token is a target
            labels = torch.where(eligible, input_ids, IGNORE)
            return {
                "decoder_input_ids": input_ids,
                "decoder_labels": subsample_targets(labels, self.decoder_target_fraction, draws["target_u"]),
                "decoder_attention_mask": enhanced_attention_mask(valid, self.decoder_mask_ratio, draws["dec_scores"]),
            }
        chosen = choose_tokens(eligible, self.decoder_mask_ratio, draws["dec_scores"], draws["dec_u"])
        return {
            "decoder_input_ids": input_ids.masked_fill(chosen, self.special.mask),
            "decoder_labels": torch.where(chosen, input_ids, IGNORE),
        }

    def _draw(self, features, lengths: list[int], length: int) -> dict[str, torch.Tensor]:
        """Every random number of the batch, drawn per row over the row's own length only."""
        batch = len(features)
        enhanced = self.objective == "retromae" and self.decoding == "enhanced"
        draws = {
            "enc_scores": torch.ones(batch, length),
            "enc_u": torch.zeros(batch),
            "replace_u": torch.ones(batch, length),
            "random_ids": torch.zeros(batch, length, dtype=torch.long),
            "dec_scores": torch.ones(batch, length, length) if enhanced else torch.ones(batch, length),
            "dec_u": torch.zeros(batch),
            "target_u": torch.zeros(batch, length),
        }
        for i, (feature, n) in enumerate(zip(features, lengths)):
            g = self._generator(feature.get("mask_key"))
            draws["enc_scores"][i, :n] = torch.rand(n, generator=g)
            draws["enc_u"][i] = torch.rand(1, generator=g)
            draws["replace_u"][i, :n] = torch.rand(n, generator=g)
            draws["random_ids"][i, :n] = torch.randint(self.special.vocab_size, (n,), generator=g)
            if enhanced:
                draws["dec_scores"][i, :n, :n] = torch.rand(n, n, generator=g)
                if self.decoder_target_fraction < 1.0:  # drawn last: the default stream stays as it was
                    draws["target_u"][i, :n] = torch.rand(n, generator=g)
            elif self.objective == "retromae":
                draws["dec_scores"][i, :n] = torch.rand(n, generator=g)
                draws["dec_u"][i] = torch.rand(1, generator=g)
        return draws
