"""The Prefect UI shows a run's metric table (runs only where headless Chromium is installed).

Starts a real local Prefect server on a free port (SQLite in a temp PREFECT_HOME), publishes a
metrics table artifact the way the flow does, and checks it in the rendered page. The
screenshot is kept under the pytest temp directory (path printed) as a test artifact.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from ui_check import check_page, find_chromium, latest_artifact_url  # noqa: E402

pytestmark = [pytest.mark.chromium, pytest.mark.skipif(find_chromium() is None, reason="headless Chromium not installed")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def prefect_server(tmp_path: Path):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(api + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("local Prefect server did not start in 180 s")
        yield f"http://127.0.0.1:{port}", env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_metric_table_artifact_is_shown_in_the_ui(prefect_server, tmp_path):
    """The table a flow run publishes is rendered on its artifact page: header and values."""
    ui, env = prefect_server
    publish = (
        "from prefect import flow\n"
        "from prefect.artifacts import create_table_artifact\n"
        "from eval.report import metric_rows\n"
        "@flow(name='uitest')\n"
        "def publish():\n"
        "    rows = metric_rows({'scifact': {'model': 'finetune/abc', 'num_queries': 300, 'ndcg@10': 0.6612, 'recall@100': 0.93}},"
        " {'scifact': {'ndcg@10': 0.6400}}, references={'scifact': {'init': {'model': 'minilm', 'num_queries': 300, 'ndcg@10': 0.6451,"
        " 'recall@100': 0.925}, 'bm25': {'model': 'bm25', 'num_queries': 300, 'ndcg@10': 0.6762, 'recall@100': 0.91}}})\n"
        "    create_table_artifact(key='metrics-uitest', table=rows, description='pretrain-to-beir/uitest: metrics per dataset')\n"
        "publish()\n"
    )
    subprocess.run(
        [sys.executable, "-c", publish],
        env={**env, "PREFECT_API_URL": ui + "/api"},
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    screenshot = tmp_path / "ui-metrics.png"
    expected = ["metrics-uitest", "metrics per dataset", "ndcg@10", "0.6612", "0.6451", "0.6762", "ndcg@10 Δ init", "0.0161", "bm25"]
    missing = check_page(latest_artifact_url(ui, "metrics-uitest"), expected, screenshot)
    print(f"screenshot: {screenshot}")
    assert not missing, f"not shown in the UI: {missing}"
    assert screenshot.stat().st_size > 10_000
