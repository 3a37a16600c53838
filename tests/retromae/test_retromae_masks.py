"""Mask statistics of the RetroMAE collator, measured over many samples."""

import pytest
import torch
from retromae_builders import FAKE_SPECIAL, fake_collator, random_features

from retromae.collator import IGNORE, choose_whole_words

SP = FAKE_SPECIAL


def _eligible(batch):
    ids = batch["decoder_input_ids"] if "decoder_input_ids" in batch else None
    clean = torch.where(batch["labels"] != IGNORE, batch["labels"], batch["input_ids"])
    ok = (clean != SP.pad) & (clean != SP.cls) & (clean != SP.sep)
    return clean, ok, ids


@pytest.mark.parametrize("ratio", [0.15, 0.3])
def test_encoder_mask_ratio_and_80_10_10(ratio):
    batch = fake_collator(encoder_mask_ratio=ratio)(random_features(400, seed=1))
    clean, eligible, _ = _eligible(batch)
    chosen = batch["labels"] != IGNORE
    assert not (chosen & ~eligible).any(), "special tokens or padding were masked"
    assert abs(chosen.sum() / eligible.sum() - ratio) < 0.02
    inp = batch["input_ids"][chosen]
    as_mask = (inp == SP.mask).float().mean()
    unchanged = (inp == clean[chosen]).float().mean()
    swapped = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02 and abs(swapped - 0.1) < 0.02
    assert torch.equal(batch["input_ids"][~chosen], clean[~chosen]), "unmasked tokens must stay intact"


def _candidates(valid: torch.Tensor) -> torch.Tensor:
    """Positions a decoder row may hide: real rows, real columns j not in {0, i}."""
    cand = valid[:, :, None] & valid[:, None, :]
    cand[:, :, 0] = False
    return cand & ~torch.eye(valid.size(1), dtype=torch.bool)


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_enhanced_attention_mask(ratio):
    batch = fake_collator(decoder_mask_ratio=ratio)(random_features(150, seed=2))
    visible = batch["decoder_attention_mask"]
    valid = batch["attention_mask"].bool()
    _, eligible, dec_ids = _eligible(batch)
    assert visible[:, :, 0].all(), "every row must see the sentence embedding at position 0"
    diag = torch.diagonal(visible, dim1=1, dim2=2)[:, 1:]
    assert not diag.any(), "a row attends to its own token"
    assert not (visible[:, :, 1:] & ~valid[:, None, 1:]).any(), "padding is visible"
    # each candidate is hidden with probability `ratio` (Bernoulli, not an exact count per row):
    # over ~150k candidates the pooled share has a standard deviation of ~0.0013, so 0.01 is > 7 sigma
    cand = _candidates(valid)
    hidden = cand & ~visible
    assert abs(hidden.sum() / cand.sum() - ratio) < 0.01
    # rows really are sampled independently: two rows of one sentence differ
    assert (visible[:, 1, 2:] != visible[:, 2, 2:]).any()
    # content stream is the clean sentence and every sentence token is a decoder target
    assert torch.equal(dec_ids, torch.where(valid, dec_ids, SP.pad))
    assert ((batch["decoder_labels"] != IGNORE) == eligible).all()
    assert torch.equal(batch["decoder_labels"][eligible], dec_ids[eligible])


def test_enhanced_mask_rows_are_binomial():
    """Per decoder row the hidden count is Binomial(n, ratio): its mean and spread match."""
    ratio = 0.5
    batch = fake_collator(decoder_mask_ratio=ratio)(random_features(200, seed=6, min_len=40, max_len=40))
    cand = _candidates(batch["attention_mask"].bool())
    real_rows = cand.any(-1)
    n = cand.sum(-1)[real_rows].double()
    share = (cand & ~batch["decoder_attention_mask"]).sum(-1)[real_rows] / n
    expected_sd = (ratio * (1 - ratio) / n.mean()).sqrt()  # ~0.08 for the 40 candidates of a row
    assert abs(share.mean() - ratio) < 0.01
    assert abs(share.std() / expected_sd - 1) < 0.1


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_decoder_target_fraction_subsamples_targets(fraction):
    feats = random_features(300, seed=7)
    full = fake_collator()(feats)
    sub = fake_collator(decoder_target_fraction=fraction)(feats)
    every, kept = full["decoder_labels"] != IGNORE, sub["decoder_labels"] != IGNORE
    assert not (kept & ~every).any() and torch.equal(sub["decoder_labels"][kept], full["decoder_labels"][kept])
    # Bernoulli(fraction) per sentence token: ~10k tokens, sd ~0.005, tolerance 0.02
    assert abs(kept.sum() / every.sum() - fraction) < 0.02
    # drawn after every other random number of the sample: the rest of the batch is unchanged
    for key in ("input_ids", "labels", "decoder_input_ids", "decoder_attention_mask"):
        assert torch.equal(full[key], sub[key])
    # a sample's targets depend on (seed, sample key) only, like its masks
    part = fake_collator(decoder_target_fraction=fraction)(feats[10:12])
    n = part["input_ids"].size(1)
    assert torch.equal(sub["decoder_labels"][10:12, :n], part["decoder_labels"])
    other = fake_collator(decoder_target_fraction=fraction, seed=5)(feats)
    assert not torch.equal(sub["decoder_labels"], other["decoder_labels"])


def test_basic_decoding_targets_only_masked_tokens():
    batch = fake_collator(decoding="basic", decoder_mask_ratio=0.5)(random_features(300, seed=3))
    _, eligible, dec_ids = _eligible(batch)
    targets = batch["decoder_labels"] != IGNORE
    assert "decoder_attention_mask" not in batch
    assert torch.equal(targets, dec_ids == SP.mask), "targets must be exactly the [MASK]ed positions"
    assert abs(targets.sum() / eligible.sum() - 0.5) < 0.02
    # encoder and decoder masks are drawn independently
    enc = batch["labels"] != IGNORE
    assert abs((enc & targets).sum() / eligible.sum() - 0.3 * 0.5) < 0.02


def test_mlm_objective_has_no_decoder_inputs():
    batch = fake_collator(objective="mlm")(random_features(8))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_masks_depend_on_the_sample_not_the_batch():
    """Same mask key => same masks, whatever the batch padding or neighbours (DDP/resume rely on it)."""
    feats = random_features(12, seed=4)
    collator = fake_collator()
    full = collator(feats)
    part = collator(feats[5:7])
    n = part["input_ids"].size(1)
    for key in ("input_ids", "labels", "decoder_labels"):
        assert torch.equal(full[key][5:7, :n], part[key])
    assert torch.equal(full["decoder_attention_mask"][5:7, :n, :n], part["decoder_attention_mask"])
    other_seed = fake_collator(seed=99)(feats)
    assert not torch.equal(full["labels"], other_seed["labels"])


def test_whole_word_masking_keeps_words_together():
    g = torch.Generator().manual_seed(5)
    batch, length = 200, 40
    eligible = torch.ones(batch, length, dtype=torch.bool)
    eligible[:, 0] = eligible[:, -1] = False
    continuation = (torch.rand(batch, length, generator=g) < 0.4) & eligible
    chosen = choose_whole_words(eligible, continuation, 0.3, torch.rand(batch, length, generator=g), torch.rand(batch, generator=g))
    starts = eligible & ~continuation
    word = torch.cumsum(starts.long(), 1)
    for b in range(batch):
        for w in word[b][eligible[b]].unique():
            members = chosen[b][(word[b] == w) & eligible[b]]
            assert members.all() or not members.any(), "a word was partly masked"
    assert abs(chosen.sum() / eligible.sum() - 0.3) < 0.03
