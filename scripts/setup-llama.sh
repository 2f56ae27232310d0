#!/usr/bin/env bash
# Install the llama extra into .venv: llama-cpp-python's OpenAI-compatible server (the engine the
# quickstart's llama path launches) and gguf (which writes its tiny model). Safe to run again: it
# does nothing once they import. llama-cpp-python compiles llama.cpp from source: a few minutes
# on 2 cores, CPU only; pip caches the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

if .venv/bin/python -c 'import llama_cpp, gguf' >/dev/null 2>&1; then
  exit 0
fi
# Portable (no -march=native, so the wheel pip caches runs on other CPUs) and only the library:
# no multimodal (llava/mtmd), tests, examples, tools or curl.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[llama]'
