"""bf16 on a CPU that computes it natively: the vectors stay those of fp32 (to rounding), a run is
still reproducible within its precision, and the precision is part of what an artifact is."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.serving.encoder import Encoder, EncoderSettings
from retroflow.devices import cpu_has_native_bf16

pytestmark = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16 / AMX)")


def test_bf16_minilm_vectors_are_fp32_vectors_to_rounding(scifact_small):
    from retroflow.data.beir import load_dataset

    texts = load_dataset(scifact_small).doc_texts()[:48]
    fp32 = Encoder("minilm", EncoderSettings(precision="fp32", show_progress=False)).encode_passages(texts)
    bf16_encoder = Encoder("minilm", EncoderSettings(precision="bf16", show_progress=False))
    bf16 = bf16_encoder.encode_passages(texts)
    assert bf16_encoder.backend == "fused" and str(bf16_encoder.dtype) == "torch.bfloat16"
    cosine = np.sum(fp32 * bf16, axis=1)  # both L2-normalised (MiniLM's Normalize module)
    assert cosine.min() > 0.999 and not np.array_equal(fp32, bf16)  # bf16 really ran, and stayed close


@pytest.mark.parametrize("model", ["minilm", "tiny"])
def test_the_fused_bf16_forward_gives_transformers_bf16_vectors_to_rounding(model, tiny_bert, scifact_small):
    """The fused forward in bf16 (weights cast once, bf16 residual stream) against transformers'
    forward under autocast: the same model, the same texts, padded and unpadded batches."""
    from retroflow.data.beir import load_dataset

    texts = load_dataset(scifact_small).doc_texts()[:40] + ["x", "What causes cancer?"]
    path = "minilm" if model == "minilm" else tiny_bert
    fused = Encoder(path, EncoderSettings(precision="bf16", pooling="mean", show_progress=False))
    hf = Encoder(path, EncoderSettings(precision="bf16", pooling="mean", backend="hf", show_progress=False))
    fp32 = Encoder(path, EncoderSettings(precision="fp32", pooling="mean", show_progress=False))
    assert (fused.backend, hf.backend) == ("fused", "hf")
    a, b, exact = (e.encode_passages(texts) for e in (fused, hf, fp32))

    def cosine(x, y):
        return np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))

    assert cosine(a, b).min() > 0.999
    # no further from fp32 than autocast's own rounding, give or take
    assert (1 - cosine(a, exact)).max() < 3 * (1 - cosine(b, exact)).max() + 1e-5


def test_bf16_encoding_is_reproducible_and_a_resumed_encode_equals_an_uninterrupted_one(scifact_small, tiny_bert, tmp_path, monkeypatch):
    from retrieval.serving.encode import EncodeConfig, open_embeddings
    from retrieval.serving.encode import run as encode
    from retroflow.data import dataset_input
    from retroflow.inputs import model_input

    inputs = {"data": dataset_input(scifact_small), "model": model_input(tiny_bert)}
    config = EncodeConfig(shard_size=64, encoder={"show_progress": False, "precision": "bf16"})
    encode(config, inputs, tmp_path / "whole", tmp_path / "whole-partial")
    real, calls = Encoder.encode_passages, {"n": 0}

    def dies_on_second_shard(self, texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, texts)

    monkeypatch.setattr(Encoder, "encode_passages", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        encode(config, inputs, tmp_path / "killed", tmp_path / "killed-partial")
    monkeypatch.setattr(Encoder, "encode_passages", real)
    assert encode(config, inputs, tmp_path / "killed", tmp_path / "killed-partial")["shards_skipped"] == 1
    assert np.array_equal(open_embeddings(tmp_path / "whole").vectors(), open_embeddings(tmp_path / "killed").vectors())


def test_bf16_pretraining_resumes_bit_identically(tiny_bert, scifact_small, tmp_path):
    import torch
    from safetensors.torch import load_file

    from retromae.config import PretrainConfig
    from retromae.pretrain import run as pretrain

    config = PretrainConfig.model_validate(
        {
            "model": {"init": str(tiny_bert)},
            "data": {"beir_corpus": str(scifact_small / "corpus.jsonl"), "max_docs": 60, "max_seq_length": 32},
            "train": {"max_steps": 4, "batch_size": 4, "save_every": 2, "log_every": 1, "precision": "bf16"},
        }
    )
    whole = pretrain(config, {}, tmp_path / "whole", tmp_path / "whole-partial")
    pretrain(config, {}, tmp_path / "killed", tmp_path / "killed-partial", stop_after=2)  # as a kill after step 2's checkpoint
    resumed = pretrain(config, {}, tmp_path / "killed", tmp_path / "killed-partial")
    assert resumed["resumed_from"] == 2 and resumed["loss_history"] == whole["loss_history"]
    a = load_file(tmp_path / "whole" / "encoder" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "encoder" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
