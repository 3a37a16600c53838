"""DPR fine-tuning on a small real SciFact subset with a tiny encoder: loss, resume, saved model, ANCE, teacher, distillation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.training import finetune, negatives, teacher
from retrieval.training.finetune import FinetuneConfig
from retrieval.training.negatives import NegativesConfig, read_negatives
from retrieval.training.teacher import TeacherConfig
from retrieval.training.teacher_scores import read_teacher_scores
from retrieval.training.training_data import judged_positives
from retroflow.config import ConfigError, load_config
from retroflow.data import dataset_input
from retroflow.data.beir import load_dataset
from retroflow.inputs import inputs_of, model_input, path_input

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/finetune/tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_encoder(scifact_small: Path, tmp_path_factory) -> Path:
    """Random 2-layer x 64 BertModel with a deterministic WordPiece vocab of the subset (dropout on)."""
    from conftest import deterministic_wordpiece_vocab
    from transformers import BertConfig, BertModel, BertTokenizer

    texts = [json.loads(line)["text"] for line in (scifact_small / "corpus.jsonl").read_text().splitlines()]
    tokenizer = BertTokenizer(vocab=deterministic_wordpiece_vocab(texts, 2000), do_lower_case=True)
    dest = tmp_path_factory.mktemp("tiny-encoder")
    tokenizer.save_pretrained(dest)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    BertModel(config).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def dataset(scifact_small: Path):
    return load_dataset(scifact_small)


def tiny_config(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, TINY, list(overrides))


def stage_inputs(dataset, model: Path | None = None, *, init: Path | None = None, **files: Path) -> dict:
    """A stage's inputs: the loaded dataset as `data`, a model directory as `model` (or `init`),
    loose files (`negatives=`, `teacher=`) as those inputs."""
    return inputs_of(
        data=dataset_input(dataset),
        model=model_input(model) if model is not None else None,
        init=model_input(init) if init is not None else None,
        **{name: path_input(path) for name, path in files.items()},
    )


def mine_bm25(dataset, out: Path) -> Path:
    """BM25 negatives of ranks 0-30 into `out`; returns the file."""
    negatives.run(NegativesConfig(rank_start=0, rank_end=30), stage_inputs(dataset), out, out / "partial")
    return out / "negatives.jsonl"


@pytest.fixture(scope="module")
def tiny_run(dataset, tiny_encoder: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny-run")
    metrics = finetune.run(tiny_config(), stage_inputs(dataset, tiny_encoder), out / "out", out / "partial")
    return out, metrics


def test_loss_falls_on_tiny_config(tiny_run) -> None:
    _, metrics = tiny_run
    losses = metrics["loss_history"]
    assert metrics["steps"] == len(losses) == 24
    # 8 queries x (1 positive + 1 hard negative) = 16 candidates: chance level is ln 16
    assert np.mean(losses[:4]) == pytest.approx(np.log(16), abs=0.4)
    assert np.mean(losses[-6:]) < np.mean(losses[:4]) - 0.5
    assert metrics["negatives_provenance"]["method"] == "bm25"


def test_resume_equals_uninterrupted(tiny_run, dataset, tiny_encoder: Path, tmp_path: Path) -> None:
    full_dir, full = tiny_run
    killed = finetune.run(tiny_config(), stage_inputs(dataset, tiny_encoder), tmp_path / "out", tmp_path / "partial", stop_after=16)
    assert killed.get("stopped_early") and not (tmp_path / "out" / "model").exists()
    resumed = finetune.run(tiny_config(), stage_inputs(dataset, tiny_encoder), tmp_path / "out", tmp_path / "partial")
    assert resumed["resumed_from"] == 16
    assert resumed["loss_history"] == full["loss_history"]
    from safetensors.torch import load_file

    a = load_file(full_dir / "out" / "model" / "model.safetensors")
    b = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_model_loads_with_sentence_transformers_and_matches_encoder(tiny_run, dataset, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from eval import evaluate
    from retrieval.serving.encoder import Encoder, EncoderSettings

    model_dir = tiny_run[0] / "out" / "model"
    assert (model_dir / "modules.json").is_file() and (model_dir / "1_Pooling" / "config.json").is_file()
    assert json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    texts = dataset.doc_texts()[:12] + ["a short query about cells"]
    ours = Encoder(model_dir, EncoderSettings(show_progress=False, precision="fp32")).encode_passages(texts)
    theirs = SentenceTransformer(str(model_dir), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # normalize: true, as trained
    config = evaluate.EvaluateConfig(metrics=["ndcg@10"], encoder={"precision": "fp32"})
    result = evaluate.run(config, stage_inputs(dataset, model_dir), tmp_path / "eval", tmp_path / "eval-partial")
    # the reference: sentence-transformers' vectors, exact search, pytrec_eval, self-hits dropped as BEIR does
    from retrieval.serving.search import drop_self_hits, exact_search, to_run
    from retroflow.metrics import evaluate_run

    qrels = dataset.split_qrels("test")
    text = dict(zip(dataset.queries.column("_id").to_pylist(), dataset.queries.column("text").to_pylist()))
    qids = sorted(qrels)
    model = SentenceTransformer(str(model_dir), device="cpu")
    scores, found = exact_search(model.encode(dataset.doc_texts()), model.encode([text[q] for q in qids]), 1000)
    expected = evaluate_run(qrels, drop_self_hits(to_run(qids, dataset.doc_ids(), scores, found)), ["ndcg@10"])[0]["ndcg@10"]
    assert result["ndcg@10"] == pytest.approx(expected, abs=2e-3) and result["pooling"] == "mean"


def test_dense_mining_with_a_model_excludes_positives(dataset, tiny_encoder: Path, tmp_path: Path) -> None:
    config = NegativesConfig(method="dense", rank_start=2, rank_end=40, encoder={"pooling": "mean", "show_progress": False})
    negatives.run(config, stage_inputs(dataset, tiny_encoder), tmp_path, tmp_path / "partial")
    mined = read_negatives(tmp_path / "negatives.jsonl")
    judged = judged_positives(dataset)
    assert mined.provenance["model"] == str(tiny_encoder) and mined.provenance["index"]["kind"] == "faiss-flat"
    assert all(not set(docs) & judged[q] and len(docs) >= 30 for q, docs in mined.negatives.items())


def test_ance_refresh_remines_with_the_current_checkpoint(dataset, tiny_encoder: Path, tmp_path: Path) -> None:
    config = tiny_config("train.max_steps=6", "train.save_every=100", "ance.rounds=1", "ance.rank_start=1", "ance.rank_end=30")
    metrics = finetune.run(config, stage_inputs(dataset, tiny_encoder), tmp_path / "out", tmp_path / "partial")
    assert metrics["ance_rounds_done"] == 1 and metrics["steps"] == 6
    refreshed = read_negatives(tmp_path / "partial" / "ance" / "negatives-round-1.jsonl")
    assert refreshed.provenance["method"] == "dense" and refreshed.provenance["ance_round"] == 1
    judged = judged_positives(dataset)
    assert all(not set(docs) & judged[q] for q, docs in refreshed.negatives.items())
    bm25 = read_negatives(tmp_path / "partial" / "negatives.jsonl")
    assert any(refreshed.negatives[q] != bm25.negatives[q] for q in refreshed.negatives)


def test_separate_query_and_passage_encoders(dataset, tiny_encoder: Path, tmp_path: Path) -> None:
    config = tiny_config("train.max_steps=2", "model.shared_encoder=false", "data.max_queries=16", "model.serve_max_length=96")
    metrics = finetune.run(config, stage_inputs(dataset, tiny_encoder), tmp_path / "out", tmp_path / "partial")
    assert metrics["outputs"] == ["query_model", "passage_model"]
    saved = json.loads((tmp_path / "out" / "passage_model" / "sentence_bert_config.json").read_text())
    assert saved["max_seq_length"] == 96 and (tmp_path / "out" / "query_model" / "modules.json").is_file()
    from safetensors.torch import load_file

    q = load_file(tmp_path / "out" / "query_model" / "model.safetensors")
    p = load_file(tmp_path / "out" / "passage_model" / "model.safetensors")
    assert any(not torch.equal(q[k], p[k]) for k in q)  # the towers were trained apart


def test_teacher_scores_then_kl_distillation(dataset, tiny_encoder: Path, tmp_path: Path) -> None:
    mined = mine_bm25(dataset, tmp_path / "neg")
    teacher_cfg = load_config(TeacherConfig, REPO / "configs/teacher/tiny.yaml")
    metrics = teacher.run(teacher_cfg, stage_inputs(dataset, init=tiny_encoder, negatives=mined), tmp_path / "teacher", tmp_path / "tp")
    assert metrics["steps"] == 12 and all(np.isfinite(metrics["loss_history"]))
    scored = read_teacher_scores(tmp_path / "teacher" / "teacher_scores.jsonl")
    provenance, scores = scored.provenance, scored.scores
    assert provenance["negatives"]["method"] == "bm25" and len(scores) == 32
    train_qrels = dataset.split_qrels("train")
    for qid, docs in scores.items():
        positives = {d for d, g in train_qrels[qid].items() if g >= 1}
        assert positives <= set(docs) and len(set(docs) - positives) == 4
    assert (tmp_path / "teacher" / "teacher" / "config.json").is_file()

    distill = tiny_config("train.max_steps=6", "data.max_queries=32", "distill.loss=kl", "distill.temperature=2.0")
    with_teacher = stage_inputs(dataset, tiny_encoder, teacher=tmp_path / "teacher")  # the teacher's output folder: its scores file
    out = finetune.run(distill, with_teacher, tmp_path / "student", tmp_path / "sp")
    assert out["steps"] == 6 and all(v > 0 for v in out["distill_loss_history"])
    with pytest.raises(ValueError, match="go together"):
        finetune.run(distill, stage_inputs(dataset, tiny_encoder), tmp_path / "x", tmp_path / "xp")


def test_teacher_dev_check_reranks_the_held_out_queries_only(dataset, tiny_encoder: Path, tmp_path: Path) -> None:
    """With a dev hold-out the teacher reports BM25's and its own nDCG@10 on exactly those queries."""
    from retrieval.serving.bm25 import BM25Retriever
    from retrieval.serving.search import drop_self_hits
    from retroflow.data.splits import dev_split
    from retroflow.metrics import evaluate_run

    mined = mine_bm25(dataset, tmp_path / "neg")
    cfg = load_config(TeacherConfig, REPO / "configs/teacher/tiny.yaml", ["max_steps=2", "dev_fraction=0.25", "dev_check_depth=10"])
    metrics = teacher.run(cfg, stage_inputs(dataset, init=tiny_encoder, negatives=mined), tmp_path / "t", tmp_path / "tp")

    train = dataset.split_qrels("train")
    _, dev = dev_split(list(train), 0.25, 0)
    scores = read_teacher_scores(tmp_path / "t" / "teacher_scores.jsonl").scores
    assert metrics["dev_queries"] == len(dev) > 0 and not set(dev) & set(scores)  # dev never trained on
    text = dict(zip(dataset.queries.column("_id").to_pylist(), dataset.queries.column("text").to_pylist()))
    bm25 = drop_self_hits(BM25Retriever(dataset.doc_ids(), dataset.doc_texts()).search({q: text[q] for q in dev}, 10))
    expected = evaluate_run({q: train[q] for q in dev}, bm25, ["ndcg@10"])[0]["ndcg@10"]
    assert metrics["dev_bm25_ndcg@10"] == pytest.approx(expected, abs=1e-4)
    # reranking only permutes BM25's top 10: the teacher's figure lies between the worst and the best order of that pool
    best, worst = rerank_bounds({q: train[q] for q in dev}, bm25)
    assert worst < best and worst - 1e-6 <= metrics["dev_teacher_ndcg@10"] <= best + 1e-6


def rerank_bounds(qrels: dict, run: dict) -> tuple[float, float]:
    """Mean nDCG@10 of the best and the worst reordering of each query's candidates."""
    from retroflow.metrics import evaluate_run

    def reorder(reverse: bool) -> dict:
        return {
            q: {d: float(len(docs) - rank) for rank, d in enumerate(sorted(docs, key=lambda d: qrels[q].get(d, 0), reverse=not reverse))}
            for q, docs in run.items()
        }

    return (evaluate_run(qrels, reorder(False), ["ndcg@10"])[0]["ndcg@10"], evaluate_run(qrels, reorder(True), ["ndcg@10"])[0]["ndcg@10"])


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: 10\n  grad_accum_steps: 3\n")
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        load_config(FinetuneConfig, bad)
    bad.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(FinetuneConfig, bad)
    for name in ("tiny", "minilm-scifact", "minilm-scifact-distill", "msmarco-paper"):
        load_config(FinetuneConfig, REPO / f"configs/finetune/{name}.yaml")
    for name in ("tiny", "minilm-scifact", "minilm-scifact-3ep", "fusion-scifact"):
        load_config(TeacherConfig, REPO / f"configs/teacher/{name}.yaml")
    bad.write_text("dataset: scifact\ninit: minilm\n")  # written before they became the stage's inputs
    with pytest.raises(ConfigError, match="field 'dataset' is an input now: pass --dataset.*field 'init' is an input now: pass --model"):
        load_config(FinetuneConfig, bad)
    with pytest.raises(ConfigError, match="field 'init' is an input now: pass --model"):
        load_config(TeacherConfig, bad)


def test_cli_finetune_prints_json_last(scifact_small: Path, tiny_encoder: Path, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    code = main(
        [
            "finetune",
            "--config",
            str(TINY),
            "--dataset",
            str(scifact_small),
            "--model",
            str(tiny_encoder),
            "--output",
            str(tmp_path / "run"),
            "--max-steps",
            "3",
            "--set",
            "data.max_queries=16",
        ]
    )
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["steps"] == 3 and last["output_dir"] == str(tmp_path / "run")
    assert (tmp_path / "run" / "model" / "config.json").is_file() and not (tmp_path / "run" / "partial").exists()
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert f"base_model: {tiny_encoder}" in card and scifact_small.name in card


@pytest.mark.parametrize("command", ["finetune", "teacher"])
def test_cli_without_model_names_the_flag(command: str, scifact_small: Path, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    config = TINY if command == "finetune" else REPO / "configs/teacher/fusion-scifact.yaml"
    code = main([command, "--config", str(config), "--dataset", str(scifact_small), "--output", str(tmp_path / "run")])
    assert code == 2 and f"retroflow {command}: pass --model" in capsys.readouterr().err
    assert not (tmp_path / "run" / "partial").exists()  # refused before anything was written


@pytest.mark.slow
def test_two_process_ddp_run_equals_one_process_run(dataset, scifact_small: Path, tiny_encoder: Path, tmp_path: Path) -> None:
    """torchrun x2 (gloo, CPU): gathered negatives + exact gradients reproduce the single-process run."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    model_dir = tmp_path / "no-dropout"  # dropout draws differ per rank; switch it off to compare exactly
    config = AutoConfig.from_pretrained(tiny_encoder)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    AutoModel.from_pretrained(tiny_encoder, config=config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as each rank: identical float reduction order
    try:
        single = finetune.run(tiny_config("train.max_steps=4"), stage_inputs(dataset, model_dir), tmp_path / "one", tmp_path / "one-p")
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "flows.cli",
        "finetune",
        "--config",
        str(TINY),
        "--dataset",
        str(scifact_small),
        "--model",
        str(model_dir),
        "--output",
        str(tmp_path / "two"),
        "--max-steps",
        "4",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["processes"] == 2
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    np.testing.assert_allclose(two["loss_history"], single["loss_history"], rtol=1e-4)
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    # Adam divides by sqrt(v), so float reduction-order differences between one big batch and two
    # gathered halves grow to 1.0-1.5e-5 after 4 steps (measured); a real mismatch (misaligned
    # negatives, a wrong gradient scale) moves weights by about the learning rate (5e-4 here).
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"largest weight difference {worst:.2e}"


def test_teacher_resume_equals_uninterrupted(dataset, tiny_encoder: Path, tmp_path: Path) -> None:
    inputs = stage_inputs(dataset, init=tiny_encoder, negatives=mine_bm25(dataset, tmp_path / "neg"))
    cfg = load_config(TeacherConfig, REPO / "configs/teacher/tiny.yaml", ["max_steps=8", "max_queries=16", "candidates_per_query=2"])
    full = teacher.run(cfg, inputs, tmp_path / "a", tmp_path / "ap")
    stopped = teacher.run(cfg, inputs, tmp_path / "b", tmp_path / "bp", stop_after=4)
    assert stopped["stopped_early"]
    resumed = teacher.run(cfg, inputs, tmp_path / "b", tmp_path / "bp")
    assert resumed["resumed_from"] == 4 and resumed["loss_history"] == full["loss_history"]
    assert (tmp_path / "a" / "teacher_scores.jsonl").read_text().splitlines()[1:] == (
        tmp_path / "b" / "teacher_scores.jsonl"
    ).read_text().splitlines()[1:]
    # the trained cross-encoder explains itself and loads as one
    from sentence_transformers import CrossEncoder

    card = (tmp_path / "a" / "teacher" / "README.md").read_text()
    assert "pipeline_tag: text-ranking" in card and f"`{tiny_encoder}`" in card and "CrossEncoder(" in card
    assert "- **steps:** 8" in card
    scores = CrossEncoder(str(tmp_path / "a" / "teacher"), device="cpu").predict([("a query", "a passage"), ("a query", "other text")])
    assert len(scores) == 2


def test_fine_tuning_loads_an_encoder_without_a_pooler_quietly(tiny_bert, capfd, caplog):
    """A RetroMAE or MLM checkpoint has no pooler: fine-tuning it prints no transformers load report."""
    import logging

    from retrieval.training.finetune import load_backbone

    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        model = load_backbone(tiny_bert, gradient_checkpointing=False)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not model.pooler.dense.weight.requires_grad  # unused by cls/mean pooling: frozen for DDP
