#!/usr/bin/env bash
# Set up (if needed), lint and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RETROFLOW_SHARED_DATA=${RETROFLOW_SHARED_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/ruff check --quiet .  # pyflakes, pycodestyle, import order, pyupgrade (pyproject.toml)
.venv/bin/ruff format --check --quiet .  # the one layout
exec .venv/bin/python -m pytest "$@"
