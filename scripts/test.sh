#!/usr/bin/env bash
# Set up, lint, type-check and run every test (unit and real-process integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The test extra, with a real third-party OpenAI-compatible engine for the openai backend's tests
# (llama-cpp-python compiles once, ~5 min; pip caches the wheel).
bash scripts/setup-test.sh
# `swarmx top` is tested in a real terminal: tmux. Installed where we may; else said loudly.
if ! command -v tmux >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq tmux >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq tmux; }) >/dev/null 2>&1 || true
  fi
  command -v tmux >/dev/null 2>&1 ||
    echo "WARNING: tmux is not installed: the test of the live view (swarmx top) will be SKIPPED" >&2
fi
.venv/bin/ruff check swarmx tests bench
.venv/bin/ruff format --check swarmx tests bench
.venv/bin/mypy
# what type checkers see on the oldest Python SwarmX supports (the tomli branch, for one)
.venv/bin/mypy --python-version 3.10
.venv/bin/pytest "$@"
