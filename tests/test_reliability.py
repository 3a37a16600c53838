"""Reliability properties a user relies on without noticing: nothing listens beyond the loopback
interface, resumable state loads without unpickling, `make stop` stops what the quickstart started."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_local_dask_cluster_binds_scheduler_and_dashboard_to_loopback(monkeypatch):
    pytest.importorskip("prefect_dask")
    from flows.runners import task_runner_from_env

    monkeypatch.setenv("RETROFLOW_TASK_RUNNER", "dask")
    runner = task_runner_from_env()
    assert runner.cluster_kwargs["host"] == "127.0.0.1"
    assert runner.cluster_kwargs["dashboard_address"].startswith("127.0.0.1:")


def test_teacher_checkpoint_loads_without_pickle(tmp_path):
    import random

    import numpy as np

    from retroflow.checkpoints import rng_state as _rng_state, set_rng_state as _set_rng_state
    from retrieval.teacher import save_checkpoint

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    np.random.seed(7)
    random.seed(7)
    save_checkpoint(tmp_path, 5, model, optimizer, scheduler, [1.0, 0.5])
    expected = (np.random.rand(), random.random())
    state = torch.load(tmp_path / "checkpoint-5.pt", weights_only=True)  # raises on any pickled object
    assert state["step"] == 5 and state["loss_history"] == [1.0, 0.5]
    _set_rng_state(state["rng"])
    assert (np.random.rand(), random.random()) == expected
    assert isinstance(_rng_state()["numpy"][1], torch.Tensor)


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
    script = "setsid bash -c 'sleep 300 & sleep 300' & echo $! > \"$1/pids\"; echo $! > \"$1/worker.pid\""
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

    from eval.datasets import load_dataset
    from retroflow.checkpoints import UnsafeCheckpointError, list_checkpoints
    from retroflow.config import load_config
    from retrieval.finetune import FinetuneConfig, run_finetune

    dataset = load_dataset(scifact_small)
    config = load_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml", ["train.max_steps=4", "train.save_every=2"])
    out, partial = tmp_path / "out", tmp_path / "partial"
    from conftest import build_tiny_bert

    model = build_tiny_bert(tmp_path / "bert", [t for t in dataset.doc_texts()[:50]], vocab_size=500, hidden=32)
    run_finetune(config, dataset, model, out, partial, stop_after=2)
    checkpoint = list_checkpoints(partial / "checkpoints")[-1]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "optimizer.pt", "rng-0.pt", "scheduler.json", "trainer_state.json"]

    # a pickle where accelerate used to keep its state is simply not read: the resume works
    marker = tmp_path / "pwned"
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    resumed = run_finetune(config, dataset, model, tmp_path / "out2", partial, stop_after=3)
    assert resumed["resumed_from"] == 2 and not marker.exists()

    # a planted pickle in a file that is read is refused, naming it, and runs nothing
    checkpoint = list_checkpoints(partial / "checkpoints")[-1]
    torch.save({"state": _Planted(str(marker))}, checkpoint / "optimizer.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer\.pt: not a plain-tensor checkpoint file"):
        run_finetune(config, dataset, model, tmp_path / "out3", partial)
    assert not marker.exists()
