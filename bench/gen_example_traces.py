"""Record real traces from the example workflows on a local cluster (`swarmx up`, embedded torch
models), with varied prompts and load, for training and judging the latency predictors.

Each workflow gets inputs drawn from word lists (terse vs. verbose wording, short vs. long tasks),
and up to ``--concurrency`` workflows run at once so calls meet different queue depths.

    .venv/bin/python bench/gen_example_traces.py --workflows 400
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from swarmx.daemon.scheduler import read_state_file

ROOT = Path(__file__).resolve().parents[1]
STYLES = [
    "in one sentence",
    "briefly",
    "as a short list",
    "in a detailed report with examples",
    "exhaustively, covering every edge case",
    "step by step with full explanations",
]
SUBJECTS = [
    "a bounded FIFO queue",
    "an LRU cache",
    "a rate limiter",
    "a JSON parser",
    "a priority scheduler",
    "a trie for prefix search",
    "a consistent hash ring",
    "a write-ahead log",
    "a token bucket",
    "a B-tree index",
]
QUESTIONS = [
    "why do tail latencies grow with utilisation",
    "how does continuous batching work",
    "what limits decode throughput on GPUs",
    "when does speculative decoding help",
    "how should agents share a KV cache",
    "what makes a scheduler fair",
]


def inputs_for(example: str, rng: random.Random) -> list[str]:
    style, subject = rng.choice(STYLES), rng.choice(SUBJECTS)
    if example == "codegen":
        task = f"{subject}, explained {style}" + " and tested" * rng.randint(0, 3)
        return ["--set", f"task={task}", "--set", f"parts={rng.randint(2, 5)}"]
    if example == "research":
        return ["--set", f"question={rng.choice(QUESTIONS)}? Answer {style}."]
    return [
        "--set",
        f"question=What does the page say about {subject}? Answer {style}.",
        "--set",
        f"page_px={rng.choice([128, 256, 384, 512, 768])}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflows", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "data" / "example_traces.jsonl")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = [sys.executable, "-m", "swarmx"]
    with tempfile.TemporaryDirectory() as tmp:
        up = subprocess.Popen(
            [*base, "up", "--nodes", "2", "--listen", "tcp://127.0.0.1:0", "--state-dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            while not (state := read_state_file(tmp)):
                time.sleep(0.1)
            endpoint = state["endpoint"]
            time.sleep(8)  # models load
            jobs = []
            for _ in range(args.workflows):
                example = rng.choice(["codegen", "research", "multimodal"])
                jobs.append(
                    [
                        *base,
                        "submit",
                        str(ROOT / "examples" / f"{example}.toml"),
                        "--wait",
                        "--json",
                        "--scheduler",
                        endpoint,
                        *inputs_for(example, rng),
                    ]
                )

            def run(cmd: list[str]) -> str:
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                return json.loads(out.stdout)["state"] if out.stdout else out.stderr.strip()

            started = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                states = list(pool.map(run, jobs))
            took = time.monotonic() - started
            subprocess.run(
                [*base, "traces", "export", "--out", str(args.out), "--scheduler", endpoint],
                check=True,
            )
            ok = sum(s == "succeeded" for s in states)
            print(f"{ok}/{len(states)} workflows succeeded in {took:.0f}s; traces in {args.out}")
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=30)


if __name__ == "__main__":
    main()
