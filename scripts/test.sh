#!/usr/bin/env bash
# Set up, lint, type-check and run every test (unit and real-process integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A real third-party OpenAI-compatible engine for the openai backend's tests (compiles once, ~5 min).
bash scripts/setup-llama.sh
.venv/bin/ruff check swarmx tests bench
.venv/bin/ruff format --check swarmx tests bench
.venv/bin/mypy
.venv/bin/pytest "$@"
