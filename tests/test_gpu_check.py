"""scripts/gpu_check.sh on a machine without CUDA: it runs, skips every GPU part with its reason, exits 0."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = {"pretrain", "dpr_step", "encode", "faiss"}


def test_gpu_check_skips_cleanly_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides a GPU where there is one: the CPU path is tested
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, "one JSON line on stdout"
    report = json.loads(lines[0])
    assert report["cuda"] is False and set(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "skipped", name
        assert "CUDA is not available" in part["reason"], name
    assert report["parts"]["pretrain"]["batch"] == [32, 512], "the paper's per-GPU micro-batch (256 over 8 GPUs)"
