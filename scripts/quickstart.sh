#!/usr/bin/env bash
# The embedded default, as one command: install, start a local Prefect server (SQLite,
# 127.0.0.1, analytics off), register the deployments, start a worker, run
# `pretrain-to-beir/quickstart`, wait, print the metric table and the UI address.
#   bash scripts/quickstart.sh          # run (DEPLOYMENT=tiny for the seconds-scale smoke run)
#   bash scripts/quickstart.sh stop     # stop the server and worker it started
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export RETROFLOW_ROOT="$ROOT"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
PORT="${PREFECT_PORT:-4200}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_API_HOST=127.0.0.1
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED=false DO_NOT_TRACK=1
export PREFECT_UI_URL="http://127.0.0.1:$PORT"
export RETROFLOW_STORE="${RETROFLOW_STORE:-$ROOT/artifacts}"
export RETROFLOW_REGISTRY="${RETROFLOW_REGISTRY:-$ROOT/runs/registry.parquet}"
DEPLOYMENT="${DEPLOYMENT:-quickstart}"
PIDS="$PREFECT_HOME/pids"
mkdir -p "$PREFECT_HOME"

stop() {
  if [ -f "$PIDS" ]; then
    # each was started with setsid: its process group holds the flow runs it spawned, so stop the group;
    # a Prefect worker may linger after SIGTERM (graceful shutdown), so SIGKILL what is left after 10 s
    pids=$(cat "$PIDS")
    for pid in $pids; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 20); do
      alive=""
      for pid in $pids; do kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ] && alive=1; done
      [ -z "$alive" ] && break
      sleep 0.5
    done
    for pid in $pids; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    rm -f "$PIDS" "$PREFECT_HOME/worker.pid"
    echo "quickstart: stopped the Prefect server and worker"
  else
    echo "quickstart: nothing to stop"
  fi
}
if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

bash scripts/setup.sh
. .venv/bin/activate
if [ -z "${RETROFLOW_DATA_DIR:-}" ]; then
  echo "quickstart: RETROFLOW_DATA_DIR is not set: datasets will be downloaded from BEIR's public URLs." >&2
  echo "            Offline? Run: RETROFLOW_DATA_DIR=/path/to/beir/datasets make quickstart" >&2
fi

healthy() { python - "$PREFECT_API_URL" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)
except Exception:
    sys.exit(1)
PY
}
if ! healthy; then
  echo "quickstart: starting the Prefect server on 127.0.0.1:$PORT (log: $PREFECT_HOME/server.log)"
  setsid nohup prefect server start --host 127.0.0.1 --port "$PORT" > "$PREFECT_HOME/server.log" 2>&1 &
  echo $! >> "$PIDS"
  for _ in $(seq 1 120); do healthy && break; sleep 1; done
  healthy || { echo "quickstart: the server did not come up, see $PREFECT_HOME/server.log" >&2; exit 1; }
fi
for pool in local gpu; do
  prefect work-pool inspect "$pool" > /dev/null 2>&1 || prefect work-pool create "$pool" --type process > /dev/null
done
prefect --no-prompt deploy --all > "$PREFECT_HOME/deploy.log" 2>&1 || { cat "$PREFECT_HOME/deploy.log"; exit 1; }
# only a worker this script started (recorded in worker.pid) counts: one found by name may serve another server
own_worker_alive() { [ -f "$PREFECT_HOME/worker.pid" ] && kill -0 "$(cat "$PREFECT_HOME/worker.pid")" 2>/dev/null; }
if ! own_worker_alive; then
  setsid nohup prefect worker start --pool local --limit 1 > "$PREFECT_HOME/worker.log" 2>&1 &
  echo $! >> "$PIDS"
  echo $! > "$PREFECT_HOME/worker.pid"
fi
echo "quickstart: running pretrain-to-beir/$DEPLOYMENT (worker log: $PREFECT_HOME/worker.log)"
prefect deployment run "pretrain-to-beir/$DEPLOYMENT" --watch --watch-interval 2 > "$PREFECT_HOME/run.log" 2>&1 || {
  tail -40 "$PREFECT_HOME/worker.log"; echo "quickstart: the flow run failed (see above and the UI: $PREFECT_UI_URL)" >&2; exit 1; }
retroflow report "$DEPLOYMENT"
echo
echo "Prefect UI: $PREFECT_UI_URL  (artifacts: metrics-$DEPLOYMENT, report-$DEPLOYMENT)"
echo "Stop the server and worker with: make stop"
