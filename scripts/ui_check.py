"""Open the local Prefect UI in headless Chromium and check that an artifact is shown.

    python scripts/ui_check.py --key metrics-quickstart --expect ndcg@10 --screenshot ui.png

Opens the page of the newest artifact with that key, waits until every `--expect` text is in
the rendered page (or `--wait` seconds pass), keeps a screenshot either way, and exits 0 when
all were shown, 1 otherwise (the missing texts are printed).

Chromium is driven over the DevTools protocol (`websockets`, which Prefect already depends on):
a one-shot `--dump-dom` captures the page before the UI has fetched the artifact from the API.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1400,1000",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def page_target(port: int, deadline: float) -> str:
    """The DevTools websocket URL of Chromium's first page."""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as response:
                pages = [t for t in json.loads(response.read()) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("Chromium's DevTools endpoint did not come up")


async def render(ws_url: str, url: str, expect: list[str], wait_s: float, screenshot: Path | None) -> str:
    """Navigate, poll the page text until every expected text shows (or time is up), screenshot."""
    import websockets

    async with websockets.connect(ws_url, max_size=64 * 2**20) as ws:
        counter = 0

        async def call(method: str, **params):
            nonlocal counter
            counter += 1
            await ws.send(json.dumps({"id": counter, "method": method, "params": params}))
            while True:
                message = json.loads(await ws.recv())
                if message.get("id") == counter:
                    return message.get("result", {})

        await call("Page.enable")
        await call("Page.navigate", url=url)
        text, deadline = "", time.monotonic() + wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            result = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True)
            text = result.get("result", {}).get("value", "") or ""
            if all(t in text for t in expect):
                await asyncio.sleep(0.5)  # let the layout settle for the screenshot
                break
        if screenshot is not None:
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return text


def check_page(url: str, expect: list[str], screenshot: Path | None, wait_s: float = 60.0) -> list[str]:
    """Texts of `expect` missing from the rendered page (empty = all shown)."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
    port = free_port()
    # Chromium's helper processes can still write to the profile after the browser exits, so
    # the whole process group is stopped and a late write cannot fail the profile's clean-up.
    with tempfile.TemporaryDirectory(prefix="retroflow-chromium-", ignore_cleanup_errors=True) as profile:
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            ws_url = page_target(port, time.monotonic() + 60)
            text = asyncio.run(render(ws_url, url, expect, wait_s, screenshot))
        finally:
            stop_process_group(proc)
    return [t for t in expect if t not in text]


def stop_process_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def latest_artifact_url(ui: str, key: str) -> str:
    """The UI page of the newest artifact with this key."""
    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    request = urllib.request.Request(f"{ui.rstrip('/')}/api/artifacts/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        found = json.loads(response.read())
    if not found:
        raise LookupError(f"no artifact with key '{key}' at {ui}")
    return f"{ui.rstrip('/')}/artifacts/artifact/{found[0]['id']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ui", default="http://127.0.0.1:4200", help="Prefect UI address")
    parser.add_argument("--key", default="metrics-quickstart", help="artifact key to open")
    parser.add_argument("--expect", action="append", default=[], help="text that must be shown (repeatable; default: the key and ndcg@10)")
    parser.add_argument("--screenshot", type=Path, default=Path("runs/ui-artifact.png"))
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the texts")
    args = parser.parse_args(argv)
    url = latest_artifact_url(args.ui, args.key)
    expect = args.expect or [args.key, "ndcg@10"]
    missing = check_page(url, expect, args.screenshot, args.wait)
    print(f"{url}: screenshot {args.screenshot}")
    if missing:
        print(f"not shown: {', '.join(missing)}")
        return 1
    print("artifact shown with: " + ", ".join(expect))
    return 0


if __name__ == "__main__":
    sys.exit(main())
