"""Record real traces from the example workflows on a local cluster (`swarmx up`, embedded torch
models), with varied prompts and load, for training and judging the latency predictors.

Each workflow gets inputs drawn from word lists (terse vs. verbose wording, short vs. long tasks),
and up to ``--concurrency`` workflows run at once so calls meet different queue depths.

``--mix shifted`` records a different workload for the distribution-shift test: new word lists
(other subjects and answer styles, a pasted background paragraph), and the example workflows
rewritten so that every LLM step calls a new model, ``--new-model`` (a torch LM with other random
weights, ``--new-seed``: seed 4 rarely emits end-of-sequence, so it writes until its limit), with
``max_tokens`` times ``--max-tokens-scale``. Vision and tool steps are unchanged.

    .venv/bin/python bench/gen_example_traces.py --workflows 400
    .venv/bin/python bench/gen_example_traces.py --mix shifted --workflows 400 --seed 2 \
        --drop-forecasts --out bench/data/shifted_traces.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
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


# The shifted mix's wording: other subjects, answer styles and questions, and a background
# paragraph of 1-4 of these sentences pasted before the task.
NEW_STYLES = [
    "as a formal design memo",
    "as a tutorial for new engineers, with worked examples",
    "as a table of trade-offs followed by a recommendation",
    "in the voice of a code reviewer, line by line",
    "as an FAQ",
    "as a postmortem: timeline, root cause, follow-ups",
]
NEW_SUBJECTS = [
    "a distributed lock service",
    "a columnar storage engine",
    "a GPU memory allocator",
    "a vector similarity index",
    "a streaming join operator",
    "a gossip membership protocol",
    "a copy-on-write B+ tree",
    "a multi-tenant admission controller",
    "an incremental build system",
    "a lock-free ring buffer",
]
NEW_QUESTIONS = [
    "how do vector indexes trade recall for speed",
    "why does paged attention reduce memory waste",
    "what breaks when clocks drift in a distributed log",
    "how should a serving stack shed load under overload",
    "when is tensor parallelism worth its communication",
    "what makes retries amplify an outage",
]
BACKGROUND = [
    "Our team runs this in production across three regions.",
    "The previous design was rewritten twice after incidents.",
    "Latency budgets are tight: p99 must stay under fifty milliseconds.",
    "Readers include new hires with no background in systems.",
    "The code base is mostly Rust with some Python tooling.",
    "Assume commodity hardware and unreliable networks.",
]


def inputs_for(example: str, rng: random.Random, shifted: bool = False) -> list[str]:
    styles, subjects = (NEW_STYLES, NEW_SUBJECTS) if shifted else (STYLES, SUBJECTS)
    style, subject = rng.choice(styles), rng.choice(subjects)
    context = " ".join(rng.sample(BACKGROUND, rng.randint(1, 4))) + " " if shifted else ""
    if example == "codegen":
        task = f"{context}{subject}, explained {style}" + " and tested" * rng.randint(0, 3)
        return ["--set", f"task={task}", "--set", f"parts={rng.randint(2, 5)}"]
    if example == "research":
        question = rng.choice(NEW_QUESTIONS if shifted else QUESTIONS)
        return ["--set", f"question={context}{question}? Answer {style}."]
    return [
        "--set",
        f"question={context}What does the page say about {subject}? Answer {style}.",
        "--set",
        f"page_px={rng.choice([128, 256, 384, 512, 768])}",
    ]


def shifted_workflow(text: str, model: str, scale: int) -> str:
    """An example workflow's TOML with its LLM steps on ``model`` and ``max_tokens`` scaled."""
    text = text.replace('model = "tiny-lm"', f'model = "{model}"')
    return re.sub(
        r"^max_tokens = (\d+)", lambda m: f"max_tokens = {int(m[1]) * scale}", text, flags=re.M
    )


def node_config(model: str, seed: int) -> str:
    """A config whose nodes serve ``model`` (a torch LM seeded ``seed``) and the vision model."""
    return (
        f'[[node.replicas]]\nmodel = "{model}"\nbackend = "torch"\nconcurrency = 4\n'
        f'arch = "lm"\nseed = {seed}\n\n'
        '[[node.replicas]]\nmodel = "tiny-vision"\nbackend = "torch"\nconcurrency = 2\n'
        'arch = "vision"\n'
    )


def drop_forecasts(path: Path) -> None:
    """Rewrite a trace file without the ``pred`` and ``predictor`` fields: the forecasts of the
    learner the recording cluster trained as it went, of no use for training or judging others."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for rec in lines:
        rec.pop("pred", None)
        rec.pop("predictor", None)
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflows", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "data" / "example_traces.jsonl")
    ap.add_argument("--mix", choices=["base", "shifted"], default="base")
    ap.add_argument("--new-model", default="tiny-lm-v2", help="shifted mix: the LLM steps' model")
    ap.add_argument("--new-seed", type=int, default=4, help="shifted mix: its weights' seed")
    ap.add_argument("--max-tokens-scale", type=int, default=4, help="shifted mix: x max_tokens")
    ap.add_argument(
        "--drop-forecasts",
        action="store_true",
        help="leave out the recording cluster's own forecasts (pred, predictor): a smaller file",
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    shifted = args.mix == "shifted"
    base = [sys.executable, "-m", "swarmx"]
    with tempfile.TemporaryDirectory() as tmp:
        names = ("codegen", "research", "multimodal")
        flows = {ex: ROOT / "examples" / f"{ex}.toml" for ex in names}
        config: list[str] = []
        if shifted:
            for ex, path in flows.items():
                flows[ex] = Path(tmp) / f"{ex}.toml"
                flows[ex].write_text(
                    shifted_workflow(path.read_text(), args.new_model, args.max_tokens_scale)
                )
            (Path(tmp) / "swarmx.toml").write_text(node_config(args.new_model, args.new_seed))
            config = ["--config", str(Path(tmp) / "swarmx.toml")]
        state = Path(tmp) / "state"
        up = subprocess.Popen(
            [
                *base,
                "up",
                "--nodes",
                "2",
                "--listen",
                "tcp://127.0.0.1:0",
                "--state-dir",
                str(state),
                *config,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            while not (info := read_state_file(state)):
                time.sleep(0.1)
            endpoint = info["endpoint"]
            time.sleep(8)  # models load
            jobs = []
            for _ in range(args.workflows):
                example = rng.choice(["codegen", "research", "multimodal"])
                jobs.append(
                    [
                        *base,
                        "submit",
                        str(flows[example]),
                        "--wait",
                        "--json",
                        "--scheduler",
                        endpoint,
                        *inputs_for(example, rng, shifted),
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
            if args.drop_forecasts:
                drop_forecasts(args.out)
            ok = sum(s == "succeeded" for s in states)
            print(f"{ok}/{len(states)} workflows succeeded in {took:.0f}s; traces in {args.out}")
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=30)


if __name__ == "__main__":
    main()
