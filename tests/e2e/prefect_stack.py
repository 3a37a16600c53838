"""A real local Prefect stack for end-to-end tests: `prefect server start` (SQLite or any
database URL), deployments from the project's prefect.yaml, a process worker, and a client.

Everything runs in subprocesses on 127.0.0.1 with a throw-away PREFECT_HOME, started in their own
process groups so that a test can stop the flow-run processes a worker spawned along with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"({path} not written)"


class PrefectStack:
    """`prefect server start` on a free loopback port, plus workers; `stop()` ends every process group."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, database_url: str | None = None) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            **(env or {}),
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            # the UI is not under test here; building its static files costs seconds per start
            "PREFECT_UI_ENABLED": "false",
            # poll and schedule every second or two, not every 10-60 s: the tests wait on both
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
            # the worker's flow-run processes import this checkout, not whatever the venv was installed from
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "RETROFLOW_ROOT": str(REPO),
            "OMP_NUM_THREADS": "1",
        }
        # a database URL from the developer's shell must not turn the SQLite case into another database
        for name in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
            self.env.pop(name, None)
        if database_url:
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url  # the name docker/compose.yaml uses
        self.processes: list[subprocess.Popen] = []

    def spawn(self, log_name: str, *args: str) -> subprocess.Popen:
        with open(self.home / log_name, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", *args],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(proc)
        return proc

    def start(self, timeout: float = 120) -> PrefectStack:
        server = self.spawn("server.log", "server", "start", "--host", "127.0.0.1", "--port", str(self.port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the Prefect server exited ({server.returncode}):\n{tail(self.home / 'server.log')}")
            try:
                urllib.request.urlopen(self.api + "/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the Prefect server did not answer in {timeout:.0f} s:\n{tail(self.home / 'server.log')}")

    def cli(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "prefect", *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout

    def deploy(self, *names: str, pool: str = "local") -> None:
        """Register deployments of prefect.yaml by name, as scripts/quickstart.sh does for all of them."""
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.workers.process import ProcessWorker

        # what `prefect work-pool create POOL --type process` sends, without another CLI start-up
        template = ProcessWorker.get_default_base_job_template()
        self.call(lambda client: client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template)))
        self.cli("--no-prompt", "deploy", *[arg for name in names for arg in ("--name", name)])

    def start_worker(self, pool: str = "local", limit: int = 1) -> subprocess.Popen:
        return self.spawn(f"worker-{pool}.log", "worker", "start", "--pool", pool, "--limit", str(limit))

    def stop(self) -> None:
        # the server and workers first get SIGTERM (a worker cancels its runs); what is left after 15 s is killed
        for proc in reversed(self.processes):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    # ---- the API, through a client bound to this server (not to the test process's settings) ----

    def call(self, fn) -> Any:
        """Run `await fn(client)` with a client of this server."""
        from prefect.client.orchestration import PrefectClient

        async def go():
            async with PrefectClient(api=self.api) as client:
                return await fn(client)

        return asyncio.run(go())

    def run_deployment(self, name: str, parameters: dict[str, Any] | None = None):
        async def create(client):
            deployment = await client.read_deployment_by_name(name)
            return await client.create_flow_run_from_deployment(deployment.id, parameters=parameters or {})

        return self.call(create).id

    def wait_for(self, flow_run_ids: list, timeout: float) -> dict:
        """{flow run id: its final state}, failing with the worker's log if any is not final in time."""

        async def read(client):
            return {run_id: (await client.read_flow_run(run_id)).state for run_id in flow_run_ids}

        deadline = time.monotonic() + timeout
        while True:
            states = self.call(read)
            if all(state is not None and state.type.value in FINAL for state in states.values()):
                return states
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted(self.home.glob("worker-*.log")))
                raise AssertionError(
                    f"flow runs not finished in {timeout:.0f} s: { {str(k): v and v.name for k, v in states.items()} }\n{logs}"
                )
            time.sleep(1)

    def task_runs(self, flow_run_id, expect: set[str], timeout: float = 60) -> dict[str, list]:
        """{step: its task runs} of one flow run, once every expected step has a final state. The
        server records task runs from events, so they can lag behind the flow run's own state."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async def read(client):
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

        deadline = time.monotonic() + timeout
        while True:
            runs = self.call(read)
            steps: dict[str, list] = {}
            for run in runs:
                steps.setdefault(run.name.rsplit("-", 1)[0], []).append(run)
            settled = all(run.state is not None and run.state.type.value in FINAL for run in runs)
            if (expect <= set(steps) and settled) or time.monotonic() > deadline:
                return steps
            time.sleep(0.5)
