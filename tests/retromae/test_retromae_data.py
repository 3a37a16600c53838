"""Config validation and pretraining-text loading (txt / jsonl / parquet / BEIR), chunking, caching."""

import json

import pandas as pd
import pytest
from transformers import BertTokenizer

from retroflow.config import ConfigError, load_config
from retromae.config import PretrainConfig
from retromae.data import chunk, read_texts, tokenize_corpus

CONFIGS = ["tiny", "minilm-scifact", "bert-base-paper"]


@pytest.mark.parametrize("name", CONFIGS)
def test_presets_load(name):
    cfg = load_config(PretrainConfig, f"configs/pretrain/{name}.yaml")
    assert cfg.objective == "retromae" and cfg.decoding == "enhanced" and cfg.decoder_layers == 1
    assert (cfg.encoder_mask_ratio, cfg.decoder_mask_ratio) == (0.3, 0.5)


def test_paper_settings_preset():
    cfg = load_config(PretrainConfig, "configs/pretrain/bert-base-paper.yaml")
    assert cfg.train.lr == 1e-4 and cfg.data.max_seq_length == 512 and cfg.model.preset == "base"


@pytest.mark.parametrize(
    "override",
    ["encoder_mask_ratio=0", "decoder_mask_ratio=1.2", "objective=clm", "train.grad_accum_steps=3", "nonsense=1", "decoder_layers=0"],
)
def test_impossible_values_are_rejected(override):
    with pytest.raises(ConfigError):
        load_config(PretrainConfig, "configs/pretrain/tiny.yaml", [override])


@pytest.mark.parametrize("override", ["ce_chunk_size=0", "decoder_target_fraction=0", "decoder_target_fraction=1.5"])
def test_impossible_cost_options_are_rejected(override):
    with pytest.raises(ConfigError):
        load_config(PretrainConfig, "configs/pretrain/tiny.yaml", [override])


@pytest.mark.parametrize("override", ["decoding=basic", "objective=mlm"])
def test_target_subsampling_needs_enhanced_decoding(override):
    with pytest.raises(ConfigError, match="decoder_target_fraction"):
        load_config(PretrainConfig, "configs/pretrain/tiny.yaml", [override, "decoder_target_fraction=0.5"])


def test_cost_options_leave_default_keys_alone():
    """At their defaults the cost options are not in the canonical form: configs keep their cache keys."""
    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml")
    assert (cfg.ce_chunk_size, cfg.decoder_target_fraction) == (None, 1.0)
    assert not {"ce_chunk_size", "decoder_target_fraction"} & set(cfg.canonical())
    tuned = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["ce_chunk_size=4096", "decoder_target_fraction=0.25"])
    assert tuned.canonical()["ce_chunk_size"] == 4096 and tuned.fingerprint() != cfg.fingerprint()
    assert PretrainConfig.model_validate(tuned.canonical()) == tuned


def test_unusual_ratios_warn_but_load():
    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["decoder_mask_ratio=0.9", "encoder_mask_ratio=0.5"])
    assert len(cfg.warn_outside_paper()) == 2


def test_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"_id": "1", "title": "T", "text": "body"}) + "\n")
    pd.DataFrame({"_id": ["x"], "title": [""], "text": ["parquet body"]}).to_parquet(tmp_path / "c.parquet")
    texts = read_texts([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"])
    assert texts == ["first doc", "second doc", "T body", "parquet body"]
    assert read_texts([tmp_path / "a.txt"], max_docs=1) == ["first doc"]


def test_chunking_and_cache(tmp_path):
    assert chunk(list(range(10)), 4, 3) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # tail of 2 < 3 dropped
    assert chunk([1, 2], 4, 3) == [[1, 2]]  # a short document is kept whole
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"])}
    tok = BertTokenizer(vocab=vocab)
    texts = ["a b c " * 10, "c b"]
    ds = tokenize_corpus(texts, tok, max_seq_length=10, min_chunk_tokens=2, cache_dir=tmp_path)
    assert all(len(r) <= 8 for r in ds["input_ids"]) and sum(map(len, ds["input_ids"])) == 32
    again = tokenize_corpus(texts, tok, max_seq_length=10, min_chunk_tokens=2, cache_dir=tmp_path)
    assert again["input_ids"] == ds["input_ids"] and len(list(tmp_path.iterdir())) == 1
    other = tokenize_corpus(["b b"], tok, max_seq_length=10, min_chunk_tokens=2, cache_dir=tmp_path)
    assert other["input_ids"] == [[6, 6]] and len(list(tmp_path.iterdir())) == 2


TRAIN_TOKENIZER = """
import hashlib, json, sys
from retromae.data import read_texts, train_wordpiece
texts = read_texts([sys.argv[1]], max_docs=400)
vocab = train_wordpiece(texts, 600).get_vocab()
print(hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest())
"""


def test_a_from_scratch_tokenizer_is_the_same_in_every_process(scifact_dir):
    """`tokenizers` numbers its alphabet in per-process hash order; one artifact key must still mean one vocabulary."""
    import subprocess
    import sys

    def vocab_digest() -> str:
        done = subprocess.run(
            [sys.executable, "-c", TRAIN_TOKENIZER, str(scifact_dir / "corpus.jsonl")], capture_output=True, text=True, check=True
        )
        return done.stdout.strip().splitlines()[-1]

    assert vocab_digest() == vocab_digest()
