"""A GPU the predictor never trained on (issue 23): the latency head's guess against the service
time composed from the output-length head and the replica's measured speeds.

A predictor is trained on simulated traffic on A100s only (the mixed workload, its traces from
`swarmx sim --traces-out`), then drives `swarmx sim` on pools of L40Ss (slower), H100s (faster)
and all three mixed. In each run the scheduler's dispatcher measures every replica's prefill
speed and decode pace from its own calls, as live, and a replica whose GPU the model does not
know gets its forecast composed from them (`swarmx.models.compose`); `MODEL:nocompose` keeps the
latency head's forecast there (its unknown-GPU guess). Reference: a model trained on that GPU's
own traffic too (A100 and the GPU's traces), whose latency head knows it. Scored on every LLM
call of the run: the forecast recorded for the replica it ran on against the service time it
took (pinball averaged over 0.5/0.9/0.95/0.99, seconds; coverage at each level). On the mixed
pool the routing outcome too (`tail`, FIFO, 16 replicas, no scaler), beside the oracle's and a
constant forecast's.

    .venv/bin/python bench/new_gpu.py            # ~25 min on 2 cores; writes RESULTS.md
    .venv/bin/python bench/new_gpu.py --print    # print the section instead
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results import RESULTS, write_section

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- new_gpu.py: begin -->", "<!-- new_gpu.py: end -->"
LEVELS = (0.5, 0.9, 0.95, 0.99)
WORKFLOWS = "800"
TRAIN_SEED, TEST_SEED = "1", "2"


def _swarmx(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "swarmx", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"swarmx {' '.join(args)}: {done.stderr.strip()[-500:]}")
    return done.stdout


def _sim(gpu: str, seed: str, predictor: str, router: str, out: Path | None) -> dict[str, Any]:
    args = ["sim", "--workload", "mixed", "--workflows", WORKFLOWS, "--gpu", gpu, "--seed", seed]
    args += ["--scaler", "none", "--queue", "fifo", "--router", router, "--predictor", predictor]
    if out is not None:
        args += ["--traces-out", str(out)]
    data: dict[str, Any] = json.loads(_swarmx(*args, "--json"))
    return data


def _train(traces: list[Path], out: Path) -> None:
    given = [arg for path in traces for arg in ("--traces", str(path))]
    _swarmx("predictor", "train", *given, "--out", str(out))


def _score(path: Path) -> tuple[float, list[float], int]:
    """(mean pinball over the levels, coverage per level, calls) of the recorded forecasts."""
    pins, cov = [], [0] * len(LEVELS)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["kind"] != "llm" or not r["ok"] or not r["pred"]:
            continue
        y = r["latency_s"]
        vals = [r["pred"][str(q)] for q in LEVELS]
        pins.append(
            sum(max(q * (y - v), (q - 1) * (y - v)) for q, v in zip(LEVELS, vals, strict=True))
        )
        for k, v in enumerate(vals):
            cov[k] += y <= v
    n = len(pins)
    return statistics.mean(pins) / len(LEVELS), [c / n for c in cov], n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--print", action="store_true", help="print the section, do not write it")
    ap.add_argument("--jobs", type=int, default=2, help="simulations at once")
    args = ap.parse_args()
    t0 = time.monotonic()
    with (
        tempfile.TemporaryDirectory() as tmp,
        concurrent.futures.ThreadPoolExecutor(args.jobs) as pool,
    ):
        d = Path(tmp)
        gpus = ("L40S", "H100")
        train_traces = {
            g: d / f"train-{g}.jsonl" for g in ("A100", *gpus)
        }  # least_outstanding: forecasts play no part in the traffic trained on
        list(
            pool.map(
                lambda g: _sim(g, TRAIN_SEED, "oracle", "least_outstanding", train_traces[g]),
                train_traces,
            )
        )
        base = d / "a100.pt"
        knows = {g: d / f"a100-{g}.pt" for g in gpus}
        jobs = [(base, [train_traces["A100"]])]
        jobs += [(knows[g], [train_traces["A100"], train_traces[g]]) for g in gpus]
        list(pool.map(lambda j: _train(j[1], j[0]), jobs))
        runs: list[tuple[str, str, str]] = []  # (pool, arm, predictor)
        for g in gpus:
            runs += [
                (g, "latency head (GPU unknown)", f"{base}:nocompose"),
                (g, "composed", str(base)),
                (g, "latency head, trained on it", str(knows[g])),
            ]
        runs += [
            ("mixed", "latency head (GPU unknown)", f"{base}:nocompose"),
            ("mixed", "composed", str(base)),
            ("mixed", "oracle", "oracle"),
            ("mixed", "constant", "constant"),
        ]

        def run(item: tuple[int, tuple[str, str, str]]) -> dict[str, Any]:
            k, (gpu, _, predictor) = item
            out = d / f"run-{k}.jsonl"
            data = _sim(gpu, TEST_SEED, predictor, "tail", out)
            data["score"] = _score(out)
            return data

        results = list(pool.map(run, enumerate(runs)))
    lines = [
        BEGIN,
        "### A GPU the predictor never trained on: the service time composed from its speeds",
        "",
        f"Regenerated by `.venv/bin/python bench/new_gpu.py` ({time.monotonic() - t0:.0f} s). "
        f"A predictor trained on the mixed workload's calls on A100s only ({WORKFLOWS} "
        f"workflows, seed {TRAIN_SEED}, routed by `least_outstanding`) forecasts every call of "
        f"`swarmx sim --workload mixed --workflows {WORKFLOWS} --seed {TEST_SEED} --router tail "
        "--queue fifo --scaler none` on L40Ss, H100s and the three mixed (16 replicas). "
        "*latency head (GPU unknown)*: `MODEL:nocompose`, the head's guess for a GPU it never "
        "saw; *composed*: the live path, where such a replica's forecast is its prompt's "
        "prefill at its measured prefill speed plus the output-length head's tokens at its "
        "measured decode pace (both measured by the dispatcher from the replica's own calls); "
        "*trained on it*: a model trained on A100 and that GPU's traffic, whose head knows it. "
        "Scored on every LLM call: the forecast recorded for the replica it ran on against its "
        "service time; pinball averaged over the four levels.",
        "",
        "| pool | forecast | pinball (s) | coverage 0.5 / 0.9 / 0.95 / 0.99 "
        "| workflow p50 / p99 (s) | call p99 (s) | LLM calls |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for (gpu, arm, _), data in zip(runs, results, strict=True):
        pin, cov, n = data["score"]
        wf = data["workflow_latency_s"]
        cov_s = " / ".join(f"{c:.3f}" for c in cov) if n else "-"
        lines.append(
            f"| {gpu} | {arm} | {pin:.3f} | {cov_s} | {wf['p50']:.1f} / {wf['p99']:.1f} | "
            f"{data['call_latency_s']['p99']:.1f} | {n} |"
        )
    by = {(g, a): d_ for (g, a, _), d_ in zip(runs, results, strict=True)}
    lines += ["", "Composed against the unknown-GPU guess, pinball:"]
    for g in (*gpus, "mixed"):
        head, comp = by[(g, "latency head (GPU unknown)")], by[(g, "composed")]
        cut = 1 - comp["score"][0] / head["score"][0]
        lines.append(f"- {g}: {cut * 100:.0f}% lower")
    lines += ["", END]
    section = "\n".join(lines) + "\n"
    if args.print:
        print(section)
        return
    write_section(section, BEGIN, END, before="<!-- sched_bench.py: begin -->")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
