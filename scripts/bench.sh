#!/usr/bin/env bash
# Run every benchmark (each compares with its reference tool in the same run) -> bench/results/*.json.
# Takes tens of minutes on 2 CPU cores; the fine-tuning experiment alone takes hours (run it on its own).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RETROFLOW_SHARED_DATA=${RETROFLOW_SHARED_DATA:-$(cd .. && pwd)/shared/data}
python bench/encode.py --docs 200 --trials 3
python bench/pretrain_step.py --threads 1
python bench/index.py
echo "fine-tuning experiment (hours on CPU): python bench/finetune_scifact.py"
