#!/usr/bin/env bash
# Set up, start a local cluster (scheduler + 2 node agents), show it, and stop it.
# Pass --keep to leave the cluster running in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export SWARMX_SCHEDULER=${SWARMX_SCHEDULER:-tcp://127.0.0.1:7700}
state=$(mktemp -d)
swarmx up --nodes 2 --listen "$SWARMX_SCHEDULER" --state-dir "$state" &
up=$!
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 1 150); do
  if swarmx nodes --json 2>/dev/null | python3 -c \
      'import json,sys; n=json.load(sys.stdin)["nodes"]; sys.exit(not (len(n) == 2 and all(x["telemetry"] for x in n)))'
  then break; fi
  kill -0 $up 2>/dev/null || { echo "error: swarmx up exited early" >&2; exit 1; }
  sleep 0.2
done
swarmx nodes
if [ "${1:-}" = "--keep" ]; then wait $up; fi
