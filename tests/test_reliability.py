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

    from retrieval.teacher import _rng_state, _set_rng_state, save_checkpoint

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
