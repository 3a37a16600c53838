"""RetroMAE model structure: one shared-weight decoder layer, who sees what, save/load round trip."""

import pytest
import torch
from retromae_builders import FAKE_SPECIAL, fake_collator, random_features
from transformers import AutoModel, BertTokenizer

import retromae.model
from retromae.collator import IGNORE
from retromae.model import RetroMAEModel, load_retromae, resolve_checkpoint, scratch_mlm


def _model(seed=0, **kwargs) -> RetroMAEModel:
    torch.manual_seed(seed)
    model = RetroMAEModel(scratch_mlm("tiny", FAKE_SPECIAL.vocab_size, FAKE_SPECIAL.pad, 64, dropout=0.0), **kwargs)
    return model.eval()


def test_default_decoder_is_one_layer_sharing_embeddings_and_head():
    model = _model()
    assert len(model.decoder) == 1
    bert = model.mlm.bert
    assert model.embeddings is bert.embeddings
    assert model.head.predictions.decoder.weight is bert.embeddings.word_embeddings.weight
    own = {id(p) for p in model.decoder.parameters()}
    shared = {id(p) for p in model.mlm.parameters()}
    assert own.isdisjoint(shared)
    assert {id(p) for p in model.parameters()} == own | shared, "the decoder has no embedding/head copies"
    assert len(_model(objective="mlm").decoder) == 0
    assert len(_model(decoder_layers=2).decoder) == 2


def _decoder_grads(model, batch):
    hidden = model.encode(batch["input_ids"], batch["attention_mask"])
    decoded = model.decode(hidden[:, 0], batch["decoder_input_ids"], batch["attention_mask"], batch.get("decoder_attention_mask"))
    decoded.retain_grad()
    model.masked_lm_loss(decoded, batch["decoder_labels"]).backward()
    return decoded.grad.abs().sum(-1) > 0


def test_enhanced_decoding_every_token_is_a_target():
    batch = fake_collator()(random_features(6, seed=1))
    touched = _decoder_grads(_model(), batch)
    eligible = batch["decoder_labels"] != IGNORE
    assert torch.equal(touched, eligible)
    assert eligible.sum() == (batch["attention_mask"].sum() - 2 * 6)  # all but [CLS]/[SEP]


def test_basic_decoding_only_masked_tokens_are_targets():
    batch = fake_collator(decoding="basic")(random_features(6, seed=2))
    touched = _decoder_grads(_model(decoding="basic"), batch)
    assert torch.equal(touched, batch["decoder_input_ids"] == FAKE_SPECIAL.mask)


def test_enhanced_row_never_sees_its_own_token():
    """Changing token i in the content stream must not change decoder row i (with 2 layers too)."""
    model = _model(decoder_layers=2)
    batch = fake_collator()(random_features(1, seed=3, min_len=20, max_len=20))
    sentence = model.encode(batch["input_ids"], batch["attention_mask"])[:, 0]
    args = (batch["attention_mask"], batch["decoder_attention_mask"])
    base = model.decode(sentence, batch["decoder_input_ids"], *args)
    for i in (1, 7, 15):
        changed = batch["decoder_input_ids"].clone()
        changed[0, i] = (changed[0, i] + 1) % FAKE_SPECIAL.vocab_size
        out = model.decode(sentence, changed, *args)
        assert torch.allclose(out[0, i], base[0, i], atol=1e-6)
        visible_rows = batch["decoder_attention_mask"][0, :, i]
        assert not torch.allclose(out[0, visible_rows], base[0, visible_rows]), "visible rows should react"


def test_loss_is_sum_of_encoder_and_decoder_losses():
    batch = fake_collator()(random_features(4, seed=4))
    out = _model()(**batch)
    assert torch.allclose(out.loss, out.encoder_loss + out.decoder_loss)
    assert abs(out.encoder_loss.item() - torch.log(torch.tensor(500.0)).item()) < 1.0  # ~uniform at init


def test_save_load_round_trip(tmp_path):
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(495)])}
    tokenizer = BertTokenizer(vocab=vocab)
    model = _model()
    with torch.no_grad():  # make the head differ from a fresh init so restoring it is observable
        model.head.predictions.bias.add_(0.5)
    model.save(tmp_path, tokenizer)
    batch = fake_collator()(random_features(3, seed=5))
    expected = model.encode(batch["input_ids"], batch["attention_mask"])[:, 0]
    encoder = AutoModel.from_pretrained(tmp_path / "encoder").eval()
    got = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert resolve_checkpoint(str(tmp_path)) == tmp_path  # a pretrain output can be `model.init`
    reloaded = load_retromae(tmp_path, "retromae", "enhanced", 1, dropout=0.0).eval()
    assert torch.allclose(reloaded(**batch).loss, model(**batch).loss, atol=1e-5)
    assert reloaded.head.predictions.decoder.weight is reloaded.embeddings.word_embeddings.weight
    assert (tmp_path / "encoder" / "tokenizer_config.json").is_file()
    from retroflow.models import read_sentence_transformer_settings

    assert read_sentence_transformer_settings(tmp_path / "encoder").pooling == "cls"


@pytest.mark.parametrize("failing", ["declare_pooling", "save_file"])  # the encoder's last write; the decoder's weights
def test_a_save_failing_half_way_leaves_the_previous_save_intact(tmp_path, monkeypatch, failing):
    """`pretrain --resume` saves over DIR/encoder and DIR/decoder: a full disk mid-save used to leave
    them half old, half new."""
    _model(seed=0).save(tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(retromae.model, failing, disk_full)
    with pytest.raises(OSError, match="No space left"):
        _model(seed=1).save(tmp_path)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder", "encoder"]  # no staging left behind
    monkeypatch.undo()
    _model(seed=1).save(tmp_path)  # a save that completes replaces both
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after.keys() == before.keys() and after != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder", "encoder"]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_cross_entropy_equals_full():
    batch = fake_collator()(random_features(6, seed=6))
    loss, grads = _loss_and_grads(_model(), batch)
    chunked = _model(ce_chunk_size=7)  # 7 does not divide the row counts: a ragged last chunk
    chunk_loss, chunk_grads = _loss_and_grads(chunked, batch)
    assert torch.allclose(chunk_loss, loss, atol=1e-6)
    assert grads.keys() == chunk_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(chunk_grads[name], grad, atol=1e-6), name
    assert torch.equal(_loss_and_grads(chunked, batch)[0], chunk_loss), "not deterministic"


def test_decoding_only_target_rows_equals_decoding_all_rows():
    """Enhanced decoding decodes just the rows with a target; the loss is that of all rows decoded."""
    model = _model(decoder_layers=2)
    batch = fake_collator(decoder_target_fraction=0.3)(random_features(5, seed=7))
    hidden = model.encode(batch["input_ids"], batch["attention_mask"])
    every_row = model.decode(hidden[:, 0], batch["decoder_input_ids"], batch["attention_mask"], batch["decoder_attention_mask"])
    expected = model.masked_lm_loss(every_row, batch["decoder_labels"])
    assert torch.allclose(model(**batch).decoder_loss, expected, atol=1e-6)


def test_target_subsampling_is_deterministic_under_seed():
    feats = random_features(6, seed=8)
    losses = [_model()(**fake_collator(decoder_target_fraction=0.5, seed=s)(feats)).decoder_loss for s in (1, 1, 2)]
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
