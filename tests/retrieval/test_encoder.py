"""Encoder behaviour: pooling choice, normalisation, query/passage lengths, batching order, ST parity."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.serving.encoder import Encoder, EncoderSettings, choose_backend, length_sorted_batches, pool

QUIET = dict(show_progress=False, precision="fp32")  # exact agreement (ST, hand-computed pooling) is an fp32 property; bf16: test_bf16.py


def corpus_texts(scifact_small: Path, n: int) -> list[str]:
    lines = (scifact_small / "corpus.jsonl").read_text().splitlines()[:n]
    return [(d["title"] + " " + d["text"]).strip() for d in map(json.loads, lines)]


def hf_hidden(encoder: Encoder, text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own forward on one text, no padding: the ground truth for pooling checks."""
    batch = encoder.tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden[0], batch["input_ids"][0]


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    return Encoder("minilm", EncoderSettings(**QUIET))


@pytest.fixture(scope="module")
def texts(scifact_small: Path) -> list[str]:
    # Varied lengths: some real passages, a short query-like text, a very long one that must be truncated.
    real = corpus_texts(scifact_small, 10)
    return real + ["What causes cancer?", "x", " ".join(real[:3])]


def test_pooling_from_sentence_transformers_config_is_mean_with_l2_norm(minilm, texts):
    assert (minilm.pooling, minilm.normalize, minilm.passage_max_length) == ("mean", True, 256)
    hidden, _ = hf_hidden(minilm, texts[0], 256)
    expected = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
    np.testing.assert_allclose(minilm.encode_passages(texts[:1])[0], expected, atol=1e-5)


def test_pooling_defaults_to_cls_without_sentence_transformers_config(tiny_bert, texts):
    encoder = Encoder(tiny_bert, EncoderSettings(**QUIET))
    assert (encoder.pooling, encoder.normalize) == ("cls", False)
    hidden, _ = hf_hidden(encoder, texts[1], encoder.passage_max_length)
    np.testing.assert_allclose(encoder.encode_passages([texts[1]])[0], hidden[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
def test_explicit_pooling_overrides_the_model_default(tiny_bert, texts, mode):
    encoder = Encoder(tiny_bert, EncoderSettings(pooling=mode, **QUIET))
    assert encoder.pooling == mode
    hidden, _ = hf_hidden(encoder, texts[2], encoder.passage_max_length)
    expected = {"mean": hidden.mean(0), "max": hidden.max(0).values, "cls": hidden[0]}[mode]
    np.testing.assert_allclose(encoder.encode_passages([texts[2]])[0], expected.numpy(), atol=1e-5)


def test_explicit_cls_override_on_a_mean_pooled_model(texts):
    encoder = Encoder("minilm", EncoderSettings(pooling="cls", normalize=False, **QUIET))
    hidden, _ = hf_hidden(encoder, texts[0], 256)
    np.testing.assert_allclose(encoder.encode_passages(texts[:1])[0], hidden[0].numpy(), atol=1e-5)


def test_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 5.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "sum")


@pytest.mark.parametrize("normalize", [False, True])
def test_l2_normalisation_option(tiny_bert, texts, normalize):
    encoder = Encoder(tiny_bert, EncoderSettings(normalize=normalize, pooling="mean", **QUIET))
    norms = np.linalg.norm(encoder.encode_passages(texts), axis=1)
    if normalize:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
        assert np.abs(norms - 1.0).max() > 0.1


def test_query_and_passage_max_lengths_are_separate(tiny_bert, texts):
    encoder = Encoder(tiny_bert, EncoderSettings(query_max_length=8, passage_max_length=32, pooling="mean", **QUIET))
    long_text = texts[-1]
    assert [len(x) for x in encoder.tokenize([long_text], 8)] == [8]
    as_query = encoder.encode_queries([long_text])[0]
    as_passage = encoder.encode_passages([long_text])[0]
    np.testing.assert_allclose(as_query, hf_hidden(encoder, long_text, 8)[0].mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(as_passage, hf_hidden(encoder, long_text, 32)[0].mean(0).numpy(), atol=1e-5)
    assert np.abs(as_query - as_passage).max() > 1e-3


def test_prefixes_are_applied_per_side(tiny_bert):
    plain = Encoder(tiny_bert, EncoderSettings(pooling="mean", **QUIET))
    prefixed = Encoder(tiny_bert, EncoderSettings(pooling="mean", query_prefix="query: ", **QUIET))
    np.testing.assert_allclose(prefixed.encode_queries(["cells"]), plain.encode_queries(["query: cells"]), atol=1e-6)
    np.testing.assert_allclose(prefixed.encode_passages(["cells"]), plain.encode_passages(["cells"]), atol=1e-6)


def test_length_sorted_batches_cover_every_text_once_under_both_limits():
    lengths = [5, 300, 17, 17, 64, 1, 128, 9, 256, 33]
    batches = length_sorted_batches(lengths, batch_size=3, max_tokens=300)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 300


def test_sorted_batches_return_vectors_in_input_order(tiny_bert, texts):
    # Tiny batches force many length-sorted batches; each text must come back at its own row.
    encoder = Encoder(tiny_bert, EncoderSettings(batch_size=2, max_tokens_per_batch=64, pooling="mean", **QUIET))
    together = encoder.encode_passages(texts)
    one_by_one = np.stack([encoder.encode_passages([t])[0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert encoder.last_docs_per_s and encoder.last_docs_per_s > 0


@pytest.mark.slow  # loads sentence-transformers and MiniLM a second time: ~25 s on loaded 2 cores
def test_matches_sentence_transformers_within_1e4(minilm, texts):
    from sentence_transformers import SentenceTransformer

    from retroflow.models import resolve_model_path

    reference = SentenceTransformer(str(resolve_model_path("minilm")), device="cpu")
    expected = reference.encode(texts, batch_size=4, convert_to_numpy=True)
    ours = minilm.encode_passages(texts)
    cosine = (ours * expected).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(expected, axis=1))
    assert (1 - cosine).max() <= 1e-4
    np.testing.assert_allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("model", ["minilm", "tiny"])
def test_fused_backend_equals_transformers_forward(model, tiny_bert, texts):
    path = "minilm" if model == "minilm" else tiny_bert
    fused = Encoder(path, EncoderSettings(pooling="mean", **QUIET))
    hf = Encoder(path, EncoderSettings(pooling="mean", backend="hf", **QUIET))
    assert (fused.backend, hf.backend) == ("fused", "hf")
    np.testing.assert_allclose(fused.encode_passages(texts), hf.encode_passages(texts), atol=1e-5)


def test_fused_backend_sees_weights_changed_after_loading(tiny_bert, texts):
    # A trainer may update encoder.model in place between encodes: no stale copy may be used.
    encoder = Encoder(tiny_bert, EncoderSettings(pooling="mean", **QUIET))
    before = encoder.encode_passages(texts[:3])
    with torch.no_grad():
        encoder.model.encoder.layer[0].attention.self.value.weight.mul_(-2.0)
    after = encoder.encode_passages(texts[:3])
    assert np.abs(after - before).max() > 1e-4
    encoder.backend = "hf"
    np.testing.assert_allclose(after, encoder.encode_passages(texts[:3]), atol=1e-5)


def test_fused_backend_takes_fp32_and_cpu_bf16_and_refuses_the_rest(tiny_bert):
    assert choose_backend(torch.nn.Linear(2, 2), "auto") == "hf"
    with pytest.raises(ValueError, match="plain BERT"):
        choose_backend(torch.nn.Linear(2, 2), "fused")
    bert = Encoder(tiny_bert, EncoderSettings(**QUIET)).model
    assert choose_backend(bert, "auto", torch.bfloat16, torch.device("cpu")) == "fused"
    assert choose_backend(bert, "auto", torch.bfloat16, torch.device("cuda")) == "hf"  # GPU half precision: autocast
    with pytest.raises(ValueError, match="fp32, or bf16 on a CPU, not float16"):
        choose_backend(bert, "fused", torch.float16)


def test_loading_a_checkpoint_with_mlm_head_is_quiet(tiny_bert, capfd, caplog):
    with caplog.at_level(logging.WARNING):
        Encoder(tiny_bert, EncoderSettings(**QUIET))
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "UNEXPECTED" not in out + err
    assert "Loading weights" not in out + err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
