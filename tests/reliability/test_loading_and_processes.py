"""Reliability properties a user relies on without noticing: nothing listens beyond the loopback
interface, resumable state loads without unpickling, `make stop` stops what the quickstart started."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_local_dask_cluster_binds_scheduler_and_dashboard_to_loopback(monkeypatch):
    pytest.importorskip("prefect_dask")
    from flows.runners import task_runner_from_env

    monkeypatch.setenv("RETROFLOW_TASK_RUNNER", "dask")
    runner = task_runner_from_env()
    assert runner.cluster_kwargs["host"] == "127.0.0.1"
    assert runner.cluster_kwargs["dashboard_address"].startswith("127.0.0.1:")


def test_rng_state_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np

    from retroflow.checkpoints import rng_state, set_rng_state

    np.random.seed(7)
    random.seed(7)
    torch.save(rng_state(), tmp_path / "rng-0.pt")
    expected = (np.random.rand(), random.random())
    set_rng_state(torch.load(tmp_path / "rng-0.pt", weights_only=True))  # raises on any pickled object
    assert (np.random.rand(), random.random()) == expected
    assert isinstance(rng_state()["numpy"][1], torch.Tensor)


def test_teacher_checkpoints_are_the_shared_pickle_free_format(scifact_small, tiny_bert, tmp_path):
    """The teacher trains on retroflow.training's loop, so it writes and reads the checkpoints every stage does."""
    from retrieval.training import negatives as negatives_stage
    from retrieval.training import teacher
    from retroflow.checkpoints import UnsafeCheckpointError, list_checkpoints
    from retroflow.config import load_config
    from retroflow.data import dataset_input
    from retroflow.inputs import inputs_of, model_input, path_input

    data = dataset_input(scifact_small)
    mining = negatives_stage.NegativesConfig(rank_start=0, rank_end=30)
    negatives_stage.run(mining, inputs_of(data=data), tmp_path / "neg", tmp_path / "neg-p")
    negatives, partial = tmp_path / "neg" / "negatives.jsonl", tmp_path / "partial"
    config = load_config(teacher.TeacherConfig, REPO / "configs/teacher/tiny.yaml", ["max_steps=4", "save_every=2", "max_queries=8"])
    inputs = inputs_of(data=data, init=model_input(tiny_bert), negatives=path_input(negatives))
    stopped = teacher.run(config, inputs, tmp_path / "out", partial, stop_after=2)
    assert stopped["stopped_early"]
    checkpoint = list_checkpoints(partial / "checkpoints")[-1]
    assert checkpoint.name == "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
        "rng-0.pt",
        "scheduler.json",
        "trainer_state.json",
    ]

    marker = tmp_path / "pwned"
    torch.save({"state": _Planted(str(marker))}, checkpoint / "optimizer.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer\.pt: not a plain-tensor checkpoint file"):
        teacher.run(config, inputs, tmp_path / "out", partial)
    assert not marker.exists()


def alive(pid: int) -> bool:
    """Running, not a zombie (a sandbox's init may never reap killed orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_make_stop_stops_the_whole_process_group_it_started(tmp_path):
    """`quickstart.sh stop` kills each recorded process group: children of the worker (flow runs) go too."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    # the leader ignores SIGTERM, as a Prefect worker in graceful shutdown may: stop must still end it
    script = 'setsid bash -c \'trap "" TERM; sleep 300 & sleep 300\' & echo $! > "$1/pids"; echo $! > "$1/worker.pid"'
    subprocess.run(["bash", "-c", script, "_", str(home)], check=True)
    leader = int((home / "pids").read_text())
    time.sleep(0.3)
    group = subprocess.run(["pgrep", "-g", str(leader)], capture_output=True, text=True).stdout.split()
    assert len(group) >= 2, group  # the leader and its child
    env = {**os.environ, "PREFECT_HOME": str(home)}
    out = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh"), "stop"], env=env, capture_output=True, text=True, check=True)
    assert "stopped" in out.stdout
    time.sleep(0.3)
    assert not [pid for pid in group if alive(int(pid))], group  # nobody left in the group
    assert not (home / "pids").exists() and not (home / "worker.pid").exists()


class _Planted:
    """Unpickling this creates a file: the attack a writable checkpoint directory allows."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_resume_never_unpickles_a_planted_file(scifact_small, tmp_path):
    import pickle

    from retrieval.training.finetune import FinetuneConfig, run
    from retroflow.checkpoints import UnsafeCheckpointError, list_checkpoints
    from retroflow.config import load_config
    from retroflow.data import dataset_input
    from retroflow.data.beir import load_dataset
    from retroflow.inputs import inputs_of, model_input

    dataset = load_dataset(scifact_small)
    config = load_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml", ["train.max_steps=4", "train.save_every=2"])
    out, partial = tmp_path / "out", tmp_path / "partial"
    from conftest import build_tiny_bert

    model = build_tiny_bert(tmp_path / "bert", [t for t in dataset.doc_texts()[:50]], vocab_size=500, hidden=32)
    inputs = inputs_of(data=dataset_input(dataset), model=model_input(model))
    run(config, inputs, out, partial, stop_after=2)
    checkpoint = list_checkpoints(partial / "checkpoints")[-1]
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
        "rng-0.pt",
        "scheduler.json",
        "trainer_state.json",
    ]

    # a pickle where accelerate used to keep its state is simply not read: the resume works
    marker = tmp_path / "pwned"
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    resumed = run(config, inputs, tmp_path / "out2", partial, stop_after=3)
    assert resumed["resumed_from"] == 2 and not marker.exists()

    # a planted pickle in a file that is read is refused, naming it, and runs nothing
    checkpoint = list_checkpoints(partial / "checkpoints")[-1]
    torch.save({"state": _Planted(str(marker))}, checkpoint / "optimizer.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer\.pt: not a plain-tensor checkpoint file"):
        run(config, inputs, tmp_path / "out3", partial)
    assert not marker.exists()


def test_damaged_index_and_vectors_files_are_named_errors(tmp_path):
    import faiss
    import numpy as np

    from retrieval.serving.encode import load_vectors
    from retrieval.serving.index import read_faiss_file

    index = faiss.IndexFlatIP(8)
    index.add(np.random.default_rng(0).random((50, 8), dtype=np.float32))
    faiss.write_index(index, str(tmp_path / "shard.faiss"))
    data = (tmp_path / "shard.faiss").read_bytes()
    (tmp_path / "shard.faiss").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"shard\.faiss: not a readable FAISS index"):
        read_faiss_file(tmp_path / "shard.faiss")
    np.save(tmp_path / "embeddings.npy", np.ones((100, 8), dtype=np.float32))
    data = (tmp_path / "embeddings.npy").read_bytes()
    (tmp_path / "embeddings.npy").write_bytes(data[:500])
    with pytest.raises(ValueError, match=r"embeddings\.npy: not a complete \.npy vectors file"):
        load_vectors(tmp_path / "embeddings.npy")


def test_unloadable_models_are_named_errors(tiny_bert, tmp_path):
    import shutil

    from retrieval.serving.encoder import Encoder, EncoderSettings, ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match=r"broken: the model could not be loaded"):
        Encoder(broken, EncoderSettings(show_progress=False))

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_bert, truncated)
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"truncated: the model could not be loaded"):
        Encoder(truncated, EncoderSettings(show_progress=False))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_load(tiny_bert, tmp_path):
    import shutil

    from transformers import BertConfig, BertModel

    from retrieval.serving.encoder import Encoder, EncoderSettings, ModelLoadError

    small = tmp_path / "small-vocab"
    shutil.copytree(tiny_bert, small)
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(
        small
    )
    with pytest.raises(ModelLoadError, match=r"the tokenizer has \d+ tokens but the model's embedding matrix only 100 rows"):
        Encoder(small, EncoderSettings(show_progress=False))
