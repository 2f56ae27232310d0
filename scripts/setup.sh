#!/usr/bin/env bash
# Create .venv and install SwarmX with its dev tools. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: SwarmX needs Python >= 3.10 (set PYTHON=/path/to/python3.x)" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch: a CPU build first when none is installed, so pip does not pull a multi-GB CUDA build;
# a torch the user already has (CUDA or not) is kept.
if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
