#!/usr/bin/env bash
# Install the test extra into .venv (pytest, hypothesis, the official openai client, and the llama
# extra: llama-cpp-python's OpenAI-compatible server with gguf, for the real-engine tests). Safe
# to run again: it does nothing once they import.
set -euo pipefail
cd "$(dirname "$0")/.."

if .venv/bin/python -c 'import llama_cpp, gguf, openai, pytest, pytest_timeout, hypothesis' >/dev/null 2>&1; then
  exit 0
fi
bash scripts/setup-llama.sh  # the slow part, with its build flags
.venv/bin/pip install --disable-pip-version-check -e '.[test]'
