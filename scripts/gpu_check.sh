#!/usr/bin/env bash
# GPU check (< 8 min on one GPU): paper-config pretraining steps, a DPR step, encoding throughput,
# faiss-gpu vs CPU. Prints one JSON line; on a machine without CUDA every part is skipped (exit 0).
# Options are scripts/gpu_check.py's: --steps N, --cpu-smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" scripts/gpu_check.py "$@"
