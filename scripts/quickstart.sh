#!/usr/bin/env bash
# Set up, start a local cluster (scheduler + 2 node agents serving the embedded torch models),
# run an example agentic workflow on it, show the result and the cluster, and stop it.
# Usage: scripts/quickstart.sh [codegen|research|multimodal] [--keep]
# --keep leaves the cluster running in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
example=codegen keep=""
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    codegen|research|multimodal) example=$arg ;;
    *) echo "error: unknown argument '$arg' (expected codegen, research, multimodal or --keep)" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export SWARMX_SCHEDULER=${SWARMX_SCHEDULER:-tcp://127.0.0.1:7700}
state=$(mktemp -d)
export SWARMX_STATE_DIR=$state  # the CLI finds the cluster's keys there
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
echo "+ swarmx submit examples/$example.toml --wait"
swarmx submit "examples/$example.toml" --wait
id=$(swarmx status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["workflows"][0]["id"])')
echo "+ swarmx result $id"
swarmx result "$id"
if [ -n "$keep" ]; then wait $up; fi
