"""Open the local Prefect UI in headless Chromium and check that an artifact is shown.

    python scripts/ui_check.py --key metrics-quickstart --expect ndcg@10 --screenshot ui.png

Exits 0 when every `--expect` text is in the rendered page, 1 otherwise (the missing texts
are printed); the screenshot is kept either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def run_chromium(binary: str, url: str, extra: list[str], wait_ms: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="retroflow-chromium-") as profile:
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}", *extra, url]
        return subprocess.run(command, capture_output=True, text=True, timeout=180)


def check_page(url: str, expect: list[str], screenshot: Path | None, wait_ms: int = 20000) -> list[str]:
    """Texts of `expect` missing from the rendered page (empty = all shown)."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
    dom = run_chromium(binary, url, ["--dump-dom"], wait_ms).stdout
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        run_chromium(binary, url, [f"--screenshot={screenshot.resolve()}", "--window-size=1400,1000"], wait_ms)
    return [text for text in expect if text not in dom]


def latest_artifact_url(ui: str, key: str) -> str:
    """The page of the newest artifact with this key (the key page shows only a timeline)."""
    with urllib.request.urlopen(f"{ui.rstrip('/')}/api/artifacts/{key}/latest", timeout=10) as response:
        artifact_id = json.loads(response.read())["id"]
    return f"{ui.rstrip('/')}/artifacts/artifact/{artifact_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ui", default="http://127.0.0.1:4200", help="Prefect UI address")
    parser.add_argument("--key", default="metrics-quickstart", help="artifact key to open")
    parser.add_argument("--expect", action="append", default=[], help="text that must be shown (repeatable; default: the key)")
    parser.add_argument("--screenshot", type=Path, default=Path("runs/ui-artifact.png"))
    args = parser.parse_args(argv)
    # The artifact's own page (latest_artifact_url) renders blank in headless Chromium with
    # Prefect 3.8.8's UI; the key page lists the artifact with its description and run.
    url = f"{args.ui.rstrip('/')}/artifacts/key/{args.key}"
    expect = args.expect or [args.key]
    missing = check_page(url, expect, args.screenshot)
    print(f"{url}: screenshot {args.screenshot}")
    if missing:
        print(f"not shown: {', '.join(missing)}")
        return 1
    print("artifact shown with: " + ", ".join(expect))
    return 0


if __name__ == "__main__":
    sys.exit(main())
