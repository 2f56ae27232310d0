#!/usr/bin/env bash
# Install the test extra into .venv (pytest, hypothesis, and llama-cpp-python's OpenAI-compatible
# server with gguf, for the real-engine test tests/integration/test_openai_backend.py). Safe to
# run again: it does nothing once they import. llama-cpp-python compiles llama.cpp from source:
# a few minutes on 2 cores, CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."

if .venv/bin/python -c 'import llama_cpp, gguf, pytest, pytest_timeout, hypothesis' >/dev/null 2>&1; then
  exit 0
fi
# Portable (no -march=native, so the wheel pip caches runs on other CPUs) and only the library:
# no multimodal (llava/mtmd), tests, examples, tools or curl.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
.venv/bin/pip install --disable-pip-version-check -e '.[test]'
