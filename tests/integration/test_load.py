"""The scheduler load bench (bench/load.py) as a CI smoke test: short profiles on loopback, the
JSON contract and what must hold at any speed (nothing lost, nothing run twice), never a timing;
and nothing it started outlives it."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load.py"
CONTRACT = {  # the names, pinned here on purpose: not read from the bench
    "nodes",
    "calls_per_s",
    "seconds",
    "router",
    "calls",
    "lost",
    "duplicated",
    "dispatch_overhead_ms",
    "telemetry_lag_ms",
    "max_loop_gap_ms",
    "scheduler_cpu_cores",
    "scheduler_rss_mib",
}


def run_bench(tmp_path: Path, *args: str) -> dict:
    """Run the bench to its end; every process it started (watched while it ran) is gone."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        bench = subprocess.Popen(
            [sys.executable, str(BENCH), "--json", "--keep", str(tmp_path / "run"), *args],
            stdout=stdout,
            stderr=stderr,
        )
    started: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 110
    try:
        while bench.poll() is None:
            assert time.monotonic() < deadline, "the bench did not finish in time"
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(bench.pid).children(recursive=True):
                    started.setdefault(child.pid, child)
            time.sleep(0.5)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 0, err.read_text()[-3000:]
    assert started, "the bench started no processes?"
    # multiprocessing's resource tracker leaves when it sees the bench's end of its pipe, a
    # moment after the bench: every process gets a few seconds to follow, none more
    _, alive = psutil.wait_procs(list(started.values()), timeout=5)
    running = [p.pid for p in alive if _running(p)]
    assert not running, f"processes left running: {running}"
    lines = out.read_text().strip().splitlines()
    assert len(lines) == 1, lines  # exactly one JSON object
    return json.loads(lines[0])


def _running(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def check(result: dict, nodes: int, router: str) -> None:
    assert result.keys() >= CONTRACT
    assert result["nodes"] == nodes
    assert result["router"] == router
    assert result["calls"] > 0
    assert result["lost"] == 0, result
    assert result["duplicated"] == 0, result
    for key in ("dispatch_overhead_ms", "telemetry_lag_ms"):
        assert set(result[key]) == {"p50", "p99"}
        assert result[key]["p50"] is not None
    assert set(result["scheduler_rss_mib"]) == {"start", "end"}
    assert result["max_loop_gap_ms"] is None or result["max_loop_gap_ms"] >= 0
    assert result["scheduler_cpu_cores"] >= 0


def test_least_outstanding(tmp_path):
    args = ["--nodes", "100", "--rate", "50", "--seconds", "8", "--procs", "2"]
    result = run_bench(tmp_path, *args, "--router", "least_outstanding")
    check(result, 100, "least_outstanding")
    assert result["calls"] == result["submitted"] == 400


def test_tail_with_a_trained_predictor(tmp_path):
    args = ["--nodes", "50", "--rate", "30", "--seconds", "6", "--procs", "2"]
    args += ["--train-epochs", "2", "--cache-dir", str(tmp_path / "cache")]
    result = run_bench(tmp_path, *args, "--router", "tail")
    check(result, 50, "tail")
    assert result["predictor"], "a trained predictor was installed"
