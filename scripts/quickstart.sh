#!/usr/bin/env bash
# Set up, start a local cluster (scheduler + 2 node agents serving the embedded torch models),
# run an example agentic workflow on it, show the result and the cluster, and stop it.
# Usage: scripts/quickstart.sh [codegen|research|multimodal] [--engine llama] [--keep]
# --engine llama: one node agent that launches llama.cpp servers (a tiny random-weight model)
#   itself from a `launch` template and lets the tail scaler start more; the codegen example
#   runs on them, and no engine process is left when the script ends.
# --keep leaves the cluster running in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
example=codegen keep="" engine=torch
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1 ;;
    --engine)
      [ $# -ge 2 ] || { echo "error: --engine needs a value (torch or llama)" >&2; exit 2; }
      engine=$2; shift ;;
    --engine=*) engine=${1#--engine=} ;;
    codegen|research|multimodal) example=$1 ;;
    *) echo "error: unknown argument '$1' (expected codegen, research, multimodal, --engine or --keep)" >&2; exit 2 ;;
  esac
  shift
done
case "$engine" in
  torch) nodes=2 ;;
  llama)
    nodes=1
    [ "$example" = codegen ] || { echo "error: --engine llama runs the codegen example (a language model only)" >&2; exit 2; } ;;
  *) echo "error: --engine: unknown engine '$engine' (expected torch or llama)" >&2; exit 2 ;;
esac
bash scripts/setup.sh
if [ "$engine" = llama ]; then bash scripts/setup-llama.sh; fi
export PATH="$PWD/.venv/bin:$PATH"
export SWARMX_SCHEDULER=${SWARMX_SCHEDULER:-tcp://127.0.0.1:7700}
state=$(mktemp -d)
export SWARMX_STATE_DIR=$state  # the CLI finds the cluster's keys there
config=()
if [ "$engine" = llama ]; then
  # the model the engines serve, written here (no download), and the node's launch template
  python -m swarmx.backends.tiny_gguf "$state/tiny.gguf"
  cat > "$state/llama.toml" <<TOML
[node]
state_dir = "$state"

[[node.replicas]]
model = "tiny-lm"
backend = "openai"
launch = ["$PWD/.venv/bin/python", "-m", "llama_cpp.server", "--model", "$state/tiny.gguf",
          "--model_alias", "{served_model}", "--host", "{host}", "--port", "{port}",
          "--n_ctx", "2048", "--interrupt_requests", "False"]
concurrency = 1
count = 1
max_count = 3
ready_timeout_s = 120
TOML
  config=(--config "$state/llama.toml")
fi
swarmx up --nodes "$nodes" --listen "$SWARMX_SCHEDULER" --state-dir "$state" "${config[@]}" &
up=$!
engines_left() { pgrep -f "llama_cpp.server --model $state/" || true; }
finish() {
  kill -TERM $up 2>/dev/null; wait $up 2>/dev/null
  if [ "$engine" = llama ] && [ -n "$(engines_left)" ]; then
    echo "error: engine processes left behind: $(engines_left | tr '\n' ' ')" >&2
    rm -rf "$state"
    exit 1
  fi
  rm -rf "$state"
}
trap finish EXIT
for _ in $(seq 1 600); do
  if swarmx nodes --json 2>/dev/null | python3 -c \
      'import json,sys; n=json.load(sys.stdin)["nodes"]; sys.exit(not (len(n) == int(sys.argv[1]) and all(x["telemetry"] and x["hello"]["replicas"] for x in n)))' "$nodes" 2>/dev/null
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
if [ "$engine" = llama ]; then
  echo "+ the pool of launched engines (start-ups measured, restarts):"
  swarmx nodes --json | python3 -c 'import json, sys
for n in json.load(sys.stdin)["nodes"]:
    for p in n["hello"]["pools"]:
        print(f"  {n['"'"'name'"'"']} {p['"'"'model'"'"']}: {p['"'"'target'"'"']} engines, warm-ups {[round(w, 1) for w in p['"'"'warmup_s'"'"']]} s, {p['"'"'restarts'"'"']} restarts")'
fi
