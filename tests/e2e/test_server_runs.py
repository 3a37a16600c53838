"""Flow runs through a real Prefect server, the way the project is deployed: `prefect server
start`, prefect.yaml's deployments, a process worker running several flow runs at once.

`test_two_identical_and_one_different_flow_run_at_once` uses the quickstart's SQLite server;
`test_the_team_setup_on_postgresql` the PostgreSQL database docker/compose.yaml gives the server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefect_stack import REPO, PrefectStack  # noqa: E402

pytestmark = pytest.mark.slow

TINY = "pretrain-to-beir/tiny"
STEPS = {"data", "pretrain", "negatives", "teacher", "finetune", "evaluate"}


@pytest.fixture()
def retroflow_env(scifact_small: Path, tmp_path: Path) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "scifact").symlink_to(scifact_small)
    return {
        "RETROFLOW_STORE": str(tmp_path / "store"),
        "RETROFLOW_DATA_DIR": str(data),
        "RETROFLOW_REGISTRY": str(tmp_path / "registry.parquet"),
    }


# Both server tests are about the orchestration, not the model: two fine-tuning steps instead of
# eight (the tiny deployment's other settings as they are) keep each test near a minute.
SHORT = ["finetune.train.max_steps=2"]


def cache_keys(stack: PrefectStack, flow_run_id) -> dict[str, list[str]]:
    """{step: sorted cache keys of its task runs}. The server does not record a task run's cache
    key, but its state points at the result record, which is named by the key: `<step>-<store key>`."""
    keys: dict[str, list[str]] = {}
    for step, runs in stack.task_runs(flow_run_id, STEPS).items():
        for run in runs:
            data = run.state.data if run.state else None
            storage_key = getattr(data, "storage_key", None) or (data or {}).get("storage_key", "")
            keys.setdefault(step, []).append(Path(storage_key).name)
    return {step: sorted(found) for step, found in keys.items()}


def leftovers(store: Path) -> list[str]:
    return sorted(p.relative_to(store).as_posix() for p in store.glob("*/*") if ".tmp-" in p.name or p.name.endswith(".partial"))


def test_two_identical_and_one_different_flow_run_at_once(retroflow_env, tmp_path):
    """Two identical `pretrain-to-beir/tiny` runs and one with another fine-tuning seed, started
    together through a local server and one worker that runs three at once, on one store."""
    started = time.monotonic()
    stack = PrefectStack(tmp_path / "prefect", env=retroflow_env)
    try:
        stack.start()
        stack.deploy("tiny")
        stack.start_worker(limit=3)
        runs = [
            stack.run_deployment(TINY, {"overrides": SHORT}),
            stack.run_deployment(TINY, {"overrides": SHORT}),
            stack.run_deployment(TINY, {"overrides": [*SHORT, "finetune.train.seed=8"]}),
        ]
        states = stack.wait_for(runs, timeout=400)
        assert [states[r].type.value for r in runs] == ["COMPLETED"] * 3, {str(r): states[r].message for r in runs}
        keys = [cache_keys(stack, run) for run in runs]
    finally:
        stack.stop()
    print(f"three concurrent flow runs: {time.monotonic() - started:.1f} s")

    assert STEPS <= set(keys[0]), keys[0]
    assert keys[0] == keys[1], "the two identical runs used different artifacts"
    assert keys[2]["finetune"] != keys[0]["finetune"]
    assert {step: keys[2][step] for step in ("data", "pretrain", "negatives", "teacher")} == {
        step: keys[0][step] for step in ("data", "pretrain", "negatives", "teacher")
    }

    store = Path(retroflow_env["RETROFLOW_STORE"])
    for step in ("pretrain", "negatives", "teacher", "finetune"):
        for key in keys[0][step] + keys[2][step]:
            assert (store / step / key.removeprefix(f"{step}-") / "manifest.json").is_file(), key
    # one artifact per distinct key: the identical runs shared theirs instead of building twice
    assert len(list(store.glob("pretrain/*/manifest.json"))) == 1
    assert len(list(store.glob("finetune/*/manifest.json"))) == 2
    assert leftovers(store) == []
    check = subprocess.run(
        [sys.executable, "-m", "flows.cli", "verify", str(store)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **retroflow_env},
    )
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# The team setup: the server on PostgreSQL, as docker/compose.yaml runs it
# ---------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest Debian/Ubuntu PostgreSQL server binaries (`apt-get install postgresql`), or
    initdb on PATH (other distributions, Homebrew)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    found = [p for p in found if (p / "initdb").is_file() and (p / "pg_ctl").is_file()]
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@pytest.fixture()
def postgres():
    """A throw-away cluster on 127.0.0.1 and a free port, user and database `prefect` as in
    docker/compose.yaml (password authentication); yields its SQLAlchemy URL for Prefect."""
    import pwd
    import tempfile

    from prefect_stack import free_port

    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL is not installed (no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH): "
            "`apt-get install postgresql` to run the team-setup test"
        )
    user = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the PostgreSQL cluster as")
    # under /tmp, not pytest's tmp_path: the server's user must reach it (pytest's root is mode 0700),
    # and the socket path must stay under the 107-byte limit
    root = Path(tempfile.mkdtemp(prefix="retroflow-pg-"))
    if user:
        os.chown(root, user.pw_uid, user.pw_gid)
    port, password = free_port(), "prefect-test"
    as_server = {"user": user.pw_uid, "group": user.pw_gid} if user else {}

    def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=120, cwd=root, **kwargs)
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc

    (root / "pwfile").write_text(password + "\n")
    if user:
        os.chown(root / "pwfile", user.pw_uid, user.pw_gid)
    data = root / "data"
    run("initdb", "-D", str(data), "-U", "prefect", f"--pwfile={root / 'pwfile'}", "--auth=scram-sha-256", "-E", "UTF8", **as_server)
    # loopback only, the socket inside the cluster's folder, no fsync: nothing here must survive a crash
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    run("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "postgres.log"), "-w", "-t", "60", "start", **as_server)
    try:
        env = {**os.environ, "PGPASSWORD": password}
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect", env=env)

        def sql(query: str) -> str:
            return run("psql", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "prefect", "-Atc", query, env=env).stdout.strip()

        yield f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/prefect", sql
    finally:
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60, **as_server
        )
        shutil.rmtree(root, ignore_errors=True)


def test_the_team_setup_on_postgresql(postgres, retroflow_env, tmp_path):
    """`prefect server start` on PostgreSQL: prefect.yaml's `tiny` and `nightly` deployments; the
    scheduler turns nightly's cron into runs at 03:00 UTC, and one of them, moved to now, runs
    beside a tiny run on one worker."""
    import datetime

    from prefect.states import Scheduled

    url, sql = postgres
    started = time.monotonic()
    stack = PrefectStack(tmp_path / "prefect", env=retroflow_env, database_url=url)
    try:
        stack.start()
        stack.deploy("tiny", "nightly")

        async def nightly_runs(client):
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

            return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])))

        deadline = time.monotonic() + 60
        while not (scheduled := stack.call(nightly_runs)) and time.monotonic() < deadline:
            time.sleep(1)
        assert len(scheduled) >= 3, "the scheduler created no runs of the nightly cron schedule"
        times = sorted(run.expected_start_time.astimezone(datetime.UTC) for run in scheduled)
        assert all(run.auto_scheduled and run.state.type.value == "SCHEDULED" for run in scheduled)
        assert all((t.hour, t.minute, t.second) == (3, 0, 0) for t in times), times  # "0 3 * * *", timezone UTC
        assert all(later - earlier == datetime.timedelta(days=1) for earlier, later in zip(times, times[1:])), times
        first = min(scheduled, key=lambda run: run.expected_start_time)

        stack.start_worker(limit=2)
        tiny = stack.run_deployment(TINY, {"overrides": SHORT})
        # what the scheduler made, due now instead of at 03:00: the worker must pick it up as it will at night
        stack.call(
            lambda client: client.set_flow_run_state(first.id, Scheduled(scheduled_time=datetime.datetime.now(datetime.UTC)), force=True)
        )
        states = stack.wait_for([tiny, first.id], timeout=400)
        assert [states[tiny].type.value, states[first.id].type.value] == ["COMPLETED"] * 2, {
            name: states[run].message for name, run in (("tiny", tiny), ("nightly", first.id))
        }
        keys = cache_keys(stack, tiny)
    finally:
        stack.stop()
    print(f"PostgreSQL setup, tiny + nightly: {time.monotonic() - started:.1f} s")

    assert STEPS <= set(keys), keys
    store = Path(retroflow_env["RETROFLOW_STORE"])
    assert (store / "runs" / "tiny" / "report.md").is_file()
    assert len(list(store.glob("evaluate/*/manifest.json"))) >= 2  # the tiny run's and the nightly re-evaluation's
    # the runs are in PostgreSQL, and no SQLite database was made beside it
    assert int(sql("select count(*) from flow_run where state_type = 'COMPLETED'")) == 2
    assert not (tmp_path / "prefect" / "prefect.db").exists()
