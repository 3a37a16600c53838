"""The property the pipeline exists for: fine-tuning makes the model better on queries it never saw.

A small seeded DPR run of all-MiniLM-L6-v2 on a SciFact slice must beat the untouched model on
the slice's held-out test queries. It fails when a change makes training stop helping (a
broken label, loss sign, negative sampler or learning-rate schedule), not only when it crashes.
The full-size figures are in bench/finetune_scifact.py.
"""

from __future__ import annotations

import pytest
import torch

from eval.datasets import load_dataset
from eval.evaluate import EvaluateConfig, evaluate
from retrieval.finetune import FinetuneConfig, run_finetune

ENCODER = {"show_progress": False, "passage_max_length": 128, "query_max_length": 48}


@pytest.fixture(scope="module")
def scifact_slice(scifact_dir, tmp_path_factory):
    from conftest import write_beir_subset

    # 60 held-out test queries, 200 training queries, 400 distractors
    return write_beir_subset(scifact_dir, tmp_path_factory.mktemp("scifact-slice"), 60, 200, 400, seed=1)


def test_finetuning_beats_the_untouched_model_on_held_out_queries(scifact_slice, tmp_path):
    torch.set_num_threads(2)
    dataset = load_dataset(str(scifact_slice))
    config = FinetuneConfig(
        init="minilm",
        model={"query_max_length": 48, "passage_max_length": 128},
        data={"rows": "per_positive"},
        negatives={"hard_negatives": 1, "mine": {"method": "bm25", "rank_start": 0, "rank_end": 10}},
        train={"seed": 3, "max_steps": 10, "batch_size": 8, "lr": 5e-5, "warmup_ratio": 0.1, "save_every": 100},
    )
    metrics = run_finetune(config, dataset, "minilm", tmp_path / "out", tmp_path / "partial")
    assert metrics["steps"] == 10
    untouched = evaluate(EvaluateConfig(model="minilm", dataset=str(scifact_slice), encoder=ENCODER), dataset=dataset)
    tuned = evaluate(EvaluateConfig(model=str(tmp_path / "out" / "model"), dataset=str(scifact_slice), encoder=ENCODER), dataset=dataset)
    assert untouched["num_queries"] == tuned["num_queries"] == 60
    assert tuned["ndcg@10"] > untouched["ndcg@10"] + 0.005, (tuned["ndcg@10"], untouched["ndcg@10"])
