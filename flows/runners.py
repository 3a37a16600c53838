"""Task runners: where mapped tasks (one per encoding shard) run.

`RETROFLOW_TASK_RUNNER` chooses: unset/`threads` (Prefect's thread pool, this process),
`dask` (a local Dask cluster of worker processes; `RETROFLOW_DASK_WORKERS`, default 2),
`dask://HOST:PORT` or `tcp://HOST:PORT` (an existing Dask cluster, e.g. one worker per GPU
machine), `ray` or `ray://HOST:PORT` (needs prefect-ray). Workers must see the same artifact
store path (a shared filesystem), since every shard is written there.
"""

from __future__ import annotations

import os


def task_runner_from_env():
    choice = os.environ.get("RETROFLOW_TASK_RUNNER", "threads").strip()
    if choice in ("", "threads"):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=int(os.environ.get("RETROFLOW_THREADS", "2")))
    if choice == "dask" or choice.startswith(("dask://", "tcp://")):
        from prefect_dask import DaskTaskRunner

        if choice == "dask":
            workers = int(os.environ.get("RETROFLOW_DASK_WORKERS", "2"))
            # scheduler and dashboard on the loopback interface only (a random dashboard port): nothing is exposed
            return DaskTaskRunner(
                cluster_kwargs={
                    "n_workers": workers,
                    "threads_per_worker": 1,
                    "processes": True,
                    "host": "127.0.0.1",
                    "dashboard_address": "127.0.0.1:0",
                }
            )
        return DaskTaskRunner(address=choice.replace("dask://", "tcp://"))
    if choice == "ray" or choice.startswith("ray://"):
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=None if choice == "ray" else choice)
    raise ValueError(f"RETROFLOW_TASK_RUNNER={choice!r}: use threads, dask, dask://HOST:PORT, ray or ray://HOST:PORT")
