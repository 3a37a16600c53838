"""The Prefect flow as users run it: cached, restartable, with artifacts in the UI's database.

One `prefect_test_harness` (a temporary local server on SQLite) serves the whole module.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "pipeline" / "tiny.yaml")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def data_dir(scifact_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "scifact").symlink_to(scifact_small)
    return root


@pytest.fixture()
def store(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("RETROFLOW_DATA_DIR", str(data_dir))
    monkeypatch.setenv("RETROFLOW_REGISTRY", str(tmp_path / "registry.parquet"))
    return tmp_path / "store"


def task_states(flow_run_id) -> dict[str, str]:
    """{task name without the run suffix: state name} for one flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            # a task run just created may have no state recorded yet
            return {
                r.name.rsplit("-", 1)[0] + f"#{i}": r.state.name if r.state else "Pending"
                for i, r in enumerate(sorted(runs, key=lambda r: r.name))
            }

    return asyncio.run(read())


EVERY_RUN_STEPS = {"data", "pretrain", "negatives", "teacher", "finetune", "evaluate"}


def states_by_step(flow_run_id, expect: set[str] = EVERY_RUN_STEPS) -> dict[str, set[str]]:
    """Final task states per step. Prefect 3 records task runs and their states asynchronously
    (events), so a just-finished flow can still lack its last task runs or show one as Pending
    for a while: wait until every expected step is there and every state is final."""
    for _ in range(120):
        states = task_states(flow_run_id)
        present = {name.split("#")[0] for name in states}
        if expect <= present and not any(state in ("Pending", "Running", "Scheduled") for state in states.values()):
            break
        time.sleep(0.5)
    out: dict[str, set[str]] = {}
    for name, state in states.items():
        out.setdefault(name.split("#")[0], set()).add(state)
    return out


def current_api_url() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


def run_flow(*overrides: str):
    from flows.pretrain_to_beir import pretrain_to_beir

    started = time.perf_counter()
    state = pretrain_to_beir(TINY, list(overrides), return_state=True)
    return state, time.perf_counter() - started


def test_tiny_flow_runs_then_comes_back_from_cache(harness, store):
    state, _ = run_flow()
    assert state.is_completed(), state.message
    summary = state.result()
    rows = {row["system"]: row for row in summary["rows"]}
    assert list(rows) == ["model", "hybrid", "init", "hybrid(init)", "bm25"] and rows["model"]["dataset"] == "scifact"
    # Each of the three figures is rounded to 4 places on its own, so they agree to 1.5e-4 at worst.
    assert rows["model"]["ndcg@10 Δ init"] == pytest.approx(rows["model"]["ndcg@10"] - rows["init"]["ndcg@10"], abs=1.6e-4)
    assert rows["init"]["model"] == "minilm" and rows["bm25"]["queries"] == rows["model"]["queries"] == 30
    assert (store / "runs" / "tiny" / "report.md").is_file()

    again, seconds = run_flow()
    assert again.is_completed()
    steps = states_by_step(again.state_details.flow_run_id)
    assert {"pretrain", "negatives", "teacher", "finetune", "evaluate"} <= set(steps), steps
    assert all(states == {"Cached"} for states in steps.values()), steps
    assert seconds < 10, f"cached re-run took {seconds:.1f} s"


def test_stages_run_from_the_cli_are_the_artifacts_the_flow_uses(harness, store, tmp_path, capsys):
    """One key function (flows.stages.artifact_key): `retroflow pretrain` / `retroflow negatives`
    into the store, then the flow with the same sections finds those artifacts and builds neither."""
    import json

    import yaml

    from flows.cli import main

    sections = yaml.safe_load(Path(TINY).read_text())
    made = {}
    for stage, extra in (("pretrain", []), ("negatives", ["--set", "split=train"])):
        config = tmp_path / f"{stage}.yaml"
        config.write_text(yaml.safe_dump(sections[stage]))
        assert main([stage, "--config", str(config), "--dataset", "scifact", *extra]) == 0
        made[stage] = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["artifact"])
    manifests = {stage: (path / "manifest.json").read_bytes() for stage, path in made.items()}

    state, _ = run_flow()
    assert state.is_completed(), state.message
    for stage, path in made.items():
        assert [p.parent for p in (store / stage).glob("*/manifest.json")] == [path], stage  # the CLI's, and only it
        assert (path / "manifest.json").read_bytes() == manifests[stage]  # reused as it was, not rebuilt


def test_changing_only_evaluation_reruns_only_evaluation(harness, store):
    assert run_flow()[0].is_completed()
    state, _ = run_flow("evaluate.top_k=50")
    steps = states_by_step(state.state_details.flow_run_id)
    assert steps.pop("evaluate") == {"Completed"}
    assert all(states == {"Cached"} for states in steps.values()), steps


def test_deleted_artifact_is_rebuilt_not_trusted(harness, store):
    import shutil

    assert run_flow()[0].is_completed()
    pretrain_dirs = [p for p in (store / "pretrain").iterdir() if (p / "manifest.json").is_file()]
    shutil.rmtree(pretrain_dirs[0])
    state, _ = run_flow()
    assert state.is_completed(), state.message
    assert states_by_step(state.state_details.flow_run_id)["pretrain"] == {"Completed"}


def test_failed_downstream_stage_rerun_does_not_repeat_pretraining(harness, store, monkeypatch):
    import eval.evaluate

    real = eval.evaluate.run

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(eval.evaluate, "run", broken)  # the evaluate stage's `run` (flows.stages looks it up when it runs)
    failed, _ = run_flow()
    assert failed.is_failed()
    monkeypatch.setattr(eval.evaluate, "run", real)
    state, _ = run_flow()
    assert state.is_completed(), state.message
    steps = states_by_step(state.state_details.flow_run_id)
    assert steps["pretrain"] == {"Cached"} and steps["evaluate"] == {"Completed"}


def test_run_artifacts_are_published(harness, store):
    """Metrics table and report; progress artifacts of the training and encoding stages end at
    100%; the report embeds the training-loss and the autotuner's recall-vs-QPS plots."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    state, _ = run_flow()
    assert state.is_completed()

    async def read():
        async with get_client() as client:
            run_filter = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=run_filter))

    artifacts = sorted(asyncio.run(read()), key=lambda a: a.updated)
    kinds = {a.key: a.type for a in artifacts}
    assert kinds.get("metrics-tiny") == "table" and kinds.get("report-tiny") == "markdown"
    progress = {a.key: a.data for a in artifacts if a.type == "progress"}
    for key in ("progress-pretrain", "progress-teacher", "progress-finetune", "progress-encode-shard-passages"):
        assert progress.get(key) == 100.0, (key, progress)
    report = next(a.data for a in artifacts if a.key == "report-tiny")
    assert "## Training loss" in report and "## Recall vs QPS (scifact)" in report
    assert report.count("data:image/png;base64,") == 2
    assert "## Distillation gate" in report and "## Metrics" in report and "| bm25 |" in report


def test_ablation_flow_tables_every_arm_then_comes_back_from_cache(harness, store):
    """retromae-ablation on tiny settings: every arm pretrained from one tokenizer, fine-tuned and
    scored zero-shot and fine-tuned; the table has every arm; a re-run recomputes nothing."""
    from flows.retromae_ablation import retromae_ablation

    config = str(REPO / "configs" / "ablation" / "tiny.yaml")
    state = retromae_ablation(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    arms = ["none", "mlm", "retromae-basic", "retromae-enhanced"]
    for phase in ("zero-shot", "fine-tuned"):
        rows = [r for r in summary["rows"] if r["phase"] == phase]
        assert [r["arm"] for r in rows] == arms and all(r["dataset"] == "scifact" for r in rows)
        assert all("ndcg@10 Δ mlm" in r and r["ndcg@10 p"] is not None for r in rows if r["arm"] != "mlm")
    assert summary["budget"]["steps"] == 6 and summary["budget"]["vocab"] > 100
    assert (store / "ablations" / "tiny" / "report.md").read_text().count("| retromae-enhanced |") == 2
    # one tokenizer for every arm; the `none` arm is not trained, the three objectives are
    assert len(list((store / "tokenizer").glob("*/manifest.json"))) == 1
    assert len(list((store / "pretrain").glob("*/manifest.json"))) == 3 and len(list((store / "scratch").glob("*/manifest.json"))) == 1

    again = retromae_ablation(config, return_state=True)
    assert again.is_completed() and again.result()["rows"] == summary["rows"]
    expected = {"data", "corpus", "tokenizer", "scratch", "pretrain", "negatives", "finetune", "evaluate"}
    steps = states_by_step(again.state_details.flow_run_id, expect=expected)
    assert set(steps) == expected and all(states == {"Cached"} for states in steps.values()), steps


def test_a_flow_killed_during_fine_tuning_resumes_from_its_finished_tasks(harness, store, data_dir, tmp_path):
    """SIGKILL a real `pretrain-to-beir` flow process at a seeded moment while fine-tuning works;
    the next flow run takes every finished task from cache, redoes no finished artifact and completes."""
    import json
    import random
    import signal
    import subprocess
    import sys

    from conftest import kill_during

    env = {**os.environ, "PREFECT_API_URL": current_api_url(), "OMP_NUM_THREADS": "1"}
    script = f"from flows.pretrain_to_beir import pretrain_to_beir; pretrain_to_beir({TINY!r})"
    with open(tmp_path / "flow.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", script], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    kill_during(proc, store, "finetune", random.Random(21))
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "flow.log").read_text()[-3000:]
    finished = {p.parent: json.loads(p.read_text())["finished_at"] for p in store.glob("*/*/manifest.json")}
    assert any(path.parent.name == "pretrain" for path in finished) and not any(path.parent.name == "finetune" for path in finished)

    state, _ = run_flow()
    assert state.is_completed(), state.message
    assert {path: json.loads((path / "manifest.json").read_text())["finished_at"] for path in finished} == finished, (
        "a finished artifact was redone"
    )
    steps = states_by_step(state.state_details.flow_run_id)
    assert steps["pretrain"] == {"Cached"} and steps["data"] == {"Cached"} and steps["finetune"] == {"Completed"}


def test_shard_encoding_runs_on_a_two_process_dask_cluster(harness, scifact_small, tmp_path):
    """Scale-out: with RETROFLOW_TASK_RUNNER=dask the encoding shards go to 2 worker processes."""
    import json
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    (data / "scifact").symlink_to(scifact_small)
    env = {
        **os.environ,
        "RETROFLOW_TASK_RUNNER": "dask",
        "RETROFLOW_DASK_WORKERS": "2",
        "RETROFLOW_DATA_DIR": str(data),
        "RETROFLOW_STORE": str(tmp_path / "store"),
        "RETROFLOW_REGISTRY": str(tmp_path / "registry.parquet"),
        "PREFECT_API_URL": current_api_url(),  # the module's test server
        "OMP_NUM_THREADS": "1",
    }
    script = (
        "import json; from flows.pretrain_to_beir import pretrain_to_beir;"
        f"s = pretrain_to_beir({TINY!r}, ['stages.pretrain=false', 'stages.finetune=false', 'stages.negatives=false',"
        " 'model=' + __import__('sys').argv[1], 'stages.tune=false']); print(json.dumps(s['shard_workers']))"
    )
    from retroflow.models import resolve_model_path

    proc = subprocess.run(
        [sys.executable, "-c", script, str(resolve_model_path("minilm"))], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    workers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(workers) == 2 and os.getpid() not in workers, workers
