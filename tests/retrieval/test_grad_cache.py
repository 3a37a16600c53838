"""GradCache: chunked embedding + cached gradients give the gradient of one big batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retrieval.training.finetune import FinetuneConfig, FinetuneTrainer
from retrieval.training.training_data import training_queries
from retroflow.config import ConfigError, load_config
from retroflow.data.beir import load_dataset

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def no_dropout_encoder(scifact_small: Path, tmp_path_factory) -> Path:
    from conftest import build_tiny_bert

    texts = [json.loads(line)["text"] for line in (scifact_small / "corpus.jsonl").read_text().splitlines()]
    return build_tiny_bert(tmp_path_factory.mktemp("no-dropout-encoder"), texts, hidden=32, dropout=0.0)


def gradients(trainer: FinetuneTrainer, use_cache: bool) -> dict[str, torch.Tensor]:
    samples = trainer.plan.global_batch(0, trainer.pools)
    trainer.optimizer.zero_grad(set_to_none=True)
    if use_cache:
        trainer.grad_cache_backward(samples)
    else:
        loss, _ = trainer.micro_loss(samples, [samples])
        trainer.acc.backward(loss)
    return {n: p.grad.clone() for n, p in trainer.unwrapped().named_parameters() if p.grad is not None}


def test_grad_cache_gradient_equals_the_full_batch_gradient(scifact_small, no_dropout_encoder, tmp_path):
    dataset = load_dataset(scifact_small)
    overrides = ["train.batch_size=8", "negatives.hard_negatives=1", "train.max_steps=1"]
    plain_cfg = load_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml", overrides)
    cached_cfg = load_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml", [*overrides, "train.grad_cache_chunk=3"])
    train = training_queries(plain_cfg.data.selection(), dataset)
    pools = {ex.qid: [d for d in dataset.doc_ids()[:20] if d not in train.positives_of(ex.qid)] for ex in train.examples}
    grads = []
    for cfg in (plain_cfg, cached_cfg):
        trainer = FinetuneTrainer(cfg, no_dropout_encoder, train, tmp_path / "partial", dataset)
        trainer.set_pools(pools)
        grads.append(gradients(trainer, use_cache=cfg.train.grad_cache_chunk is not None))
    plain, cached = grads
    assert plain.keys() == cached.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_grad_cache_and_gradient_accumulation_are_exclusive():
    with pytest.raises(ConfigError, match="grad_cache_chunk replaces train.grad_accum_steps"):
        load_config(FinetuneConfig, None, ["train.grad_cache_chunk=4", "train.grad_accum_steps=2", "train.batch_size=8"])


def test_a_grad_cache_run_trains_and_saves(scifact_small, no_dropout_encoder, tmp_path):
    from retrieval.training.finetune import run
    from retroflow.data import dataset_input
    from retroflow.inputs import inputs_of, model_input

    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml", ["train.max_steps=3", "train.grad_cache_chunk=4"])
    inputs = inputs_of(data=dataset_input(scifact_small), model=model_input(no_dropout_encoder))
    metrics = run(cfg, inputs, tmp_path / "out", tmp_path / "partial")
    assert metrics["steps"] == 3 and len(metrics["loss_history"]) == 3
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
