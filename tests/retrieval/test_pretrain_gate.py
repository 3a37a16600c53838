"""What pretraining hands to fine-tuning: the pooling it trained is kept (or changed knowingly), and
the pretrain gate starts from the init when pretraining made the start worse on dev."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from retrieval.training.finetune import FinetuneConfig, paired_bootstrap_interval, run
from retroflow.config import load_config
from retroflow.data import dataset_input
from retroflow.data.beir import load_dataset
from retroflow.inputs import inputs_of, model_input
from retroflow.models import read_sentence_transformer_settings, resolve_model_path, write_sentence_transformer_files

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/finetune/tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, TINY, ["train.max_steps=1", "train.precision=fp32", *overrides])


def finetune(config: FinetuneConfig, dataset, model: Path, out: Path, init: Path | None = None) -> dict:
    """The finetune stage from `model` (the pretrain gate's rival: `init`) into `out`, checkpoints beside it."""
    inputs = inputs_of(data=dataset_input(dataset), model=model_input(model), init=model_input(init) if init else None)
    return run(config, inputs, out, out.with_name(out.name + "-partial"))


@pytest.fixture(scope="module")
def dataset(scifact_small: Path):
    return load_dataset(scifact_small)


@pytest.fixture(scope="module")
def cls_declared(tiny_bert, tmp_path_factory) -> Path:
    """A model whose sentence-transformers files say it was trained with [CLS] pooling (a RetroMAE encoder)."""
    dest = tmp_path_factory.mktemp("cls") / "model"
    shutil.copytree(tiny_bert, dest)
    write_sentence_transformer_files(dest, pooling="cls", normalize=False, max_seq_length=64, dim=64)
    return dest


def test_a_mean_bottleneck_pretraining_saves_mean_pooling(tiny_bert, scifact_small, tmp_path):
    from retromae.config import PretrainConfig
    from retromae.pretrain import run as pretrain

    init = tmp_path / "init"
    shutil.copytree(tiny_bert, init)
    write_sentence_transformer_files(init, pooling="mean", normalize=True, max_seq_length=64, dim=64)
    config = PretrainConfig.model_validate(
        {
            "bottleneck": "init",
            "model": {"init": str(init)},
            "data": {"beir_corpus": str(scifact_small / "corpus.jsonl"), "max_docs": 40, "max_seq_length": 32},
            "train": {"max_steps": 3, "batch_size": 4, "head_warmup_steps": 1, "save_every": 10, "log_every": 1, "precision": "fp32"},
        }
    )
    metrics = pretrain(config, {}, tmp_path / "out", tmp_path / "partial")  # no `data` input: the text is data.beir_corpus
    saved = read_sentence_transformer_settings(tmp_path / "out" / "encoder")
    assert metrics["bottleneck"] == "mean" and (saved.pooling, saved.normalize) == ("mean", True)
    cls = pretrain(config.with_overrides(bottleneck="cls"), {}, tmp_path / "cls", tmp_path / "cls-partial")
    assert cls["bottleneck"] == "cls" and read_sentence_transformer_settings(tmp_path / "cls" / "encoder").pooling == "cls"


def test_bottleneck_init_needs_an_init_that_declares_its_pooling(tiny_bert, scifact_small, tmp_path):
    from retromae.config import PretrainConfig
    from retromae.pretrain import resolve_bottleneck

    config = PretrainConfig.model_validate({"bottleneck": "init", "model": {"init": str(tiny_bert)}})
    with pytest.raises(
        ValueError, match="bottleneck: init needs an init model that declares cls or mean pooling.*no sentence-transformers pooling"
    ):
        resolve_bottleneck(config)


def test_fine_tuning_with_another_pooling_than_the_model_declares_is_refused_or_reported(dataset, cls_declared, tmp_path):
    with pytest.raises(ValueError, match=r"finetune.model.pooling: .* declares cls pooling .* asks mean"):
        finetune(tiny_config("model.pooling=mean"), dataset, cls_declared, tmp_path / "a")
    metrics = finetune(tiny_config("model.pooling=mean", "model.allow_pooling_change=true"), dataset, cls_declared, tmp_path / "b")
    assert metrics["pooling_change"] == {"declared": "cls", "used": "mean"} and metrics["pooling"] == "mean"
    assert "pooling_change" in (tmp_path / "b" / "model" / "README.md").read_text()
    assert finetune(tiny_config("model.pooling=auto"), dataset, cls_declared, tmp_path / "c")["pooling"] == "cls"


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(resolve_model_path("minilm"))


@pytest.mark.slow
def test_the_gate_rejects_a_pretrained_encoder_made_worse_and_starts_from_the_init(dataset, minilm, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(minilm, damaged)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(damaged / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    weights = {
        k: v + 0.5 * v.std() * torch.randn(v.shape, generator=generator) if v.is_floating_point() and v.ndim == 2 else v
        for k, v in weights.items()
    }
    save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    config = tiny_config(
        "model.pooling=mean",
        "model.normalize=true",
        "model.query_max_length=32",
        "model.passage_max_length=64",
        "data.dev_fraction=0.3",
        "pretrain_gate.pool_depth=10",
    )
    metrics = finetune(config, dataset, damaged, tmp_path / "out", init=minilm)
    gate = metrics["pretrain_gate"]
    assert gate["start"] == "init" and gate["delta"] < 0 and gate["init_dev_ndcg@10"] > gate["pretrained_dev_ndcg@10"]
    assert gate["dev_queries"] > 0 and gate["pool"] == "BM25's top 10" and gate["delta_ci95"][0] <= gate["delta"] <= gate["delta_ci95"][1]
    assert metrics["init"] == str(minilm) and "starts from the init" in gate["reason"]  # fine-tuning started from the init
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "pretrain_gate" in card and f"base_model: {minilm}" in card  # the card names the start the gate chose
    # the untouched model itself passes (a tie is not worse)
    same = finetune(config, dataset, minilm, tmp_path / "same", init=minilm)
    assert same["pretrain_gate"]["start"] == "pretrained" and same["pretrain_gate"]["delta"] == 0


def test_the_gate_says_so_when_there_is_no_dev_hold_out(dataset, tiny_bert, tmp_path):
    metrics = finetune(tiny_config("data.dev_fraction=0"), dataset, tiny_bert, tmp_path / "o", init=tiny_bert)
    assert metrics["pretrain_gate"]["start"] == "pretrained" and "unchecked" in metrics["pretrain_gate"]["reason"]


def test_the_bootstrap_interval_brackets_the_mean_and_needs_two_queries():
    deltas = [0.1, -0.05, 0.2, 0.0, 0.05]
    low, high = paired_bootstrap_interval(deltas, 2000)
    assert low < sum(deltas) / len(deltas) < high
    assert paired_bootstrap_interval([0.3], 100) is None and paired_bootstrap_interval(deltas, 0) is None
    assert json.dumps(paired_bootstrap_interval(deltas, 100))  # plain floats (manifest-ready)
