"""Measure what a node agent costs its host: CPU (% of one core) and resident memory.

Starts a real scheduler and one real node agent (default 1 s telemetry and heartbeat intervals),
lets the agent warm up, then reads the agent process's CPU time (user + system, from /proc through
psutil) over a measurement window. The scheduler's own cost is reported too.

    .venv/bin/python bench/agent_overhead.py --seconds 60
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from swarmx.clock import RealClock
from swarmx.daemon.scheduler import read_state_file
from swarmx.protocol import NodesReply, QueryNodes
from swarmx.transport import request


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=1.0, help="telemetry/heartbeat interval")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "swarmx.toml"
        cfg.write_text(
            f"[node]\ntelemetry_interval_s = {args.interval}\n"
            f'heartbeat_interval_s = {args.interval}\n[log]\nlevel = "warning"\n'
        )
        base = [sys.executable, "-m", "swarmx"]
        sched = subprocess.Popen(
            [
                *base,
                "scheduler",
                "start",
                "--config",
                str(cfg),
                "--listen",
                "tcp://127.0.0.1:0",
                "--state-dir",
                tmp,
            ]
        )
        procs = [sched]
        try:
            while not (state := read_state_file(tmp)):
                time.sleep(0.05)
            endpoint = state["endpoint"]
            node = subprocess.Popen(
                [
                    *base,
                    "node",
                    "start",
                    "--config",
                    str(cfg),
                    "--scheduler",
                    endpoint,
                    "--name",
                    "bench",
                ]
            )
            procs.append(node)
            time.sleep(args.warmup)
            pn, ps = psutil.Process(node.pid), psutil.Process(sched.pid)
            n0, s0, t0 = cpu_s(pn), cpu_s(ps), time.monotonic()
            time.sleep(args.seconds)
            n1, s1, t1 = cpu_s(pn), cpu_s(ps), time.monotonic()
            reply = request(endpoint, QueryNodes(), "bench", RealClock(), 5.0).body
            assert isinstance(reply, NodesReply)
            assert reply.nodes[0].telemetry is not None
            result = {
                "window_s": round(t1 - t0, 1),
                "interval_s": args.interval,
                "agent_cpu_percent_of_one_core": round(100 * (n1 - n0) / (t1 - t0), 3),
                "agent_rss_mib": round(pn.memory_info().rss / 2**20, 1),
                "agent_uss_mib": round(pn.memory_full_info().uss / 2**20, 1),
                "agent_last_collect_ms": round(reply.nodes[0].telemetry.collect_s * 1e3, 3),
                "agent_loaded_torch": any("libtorch" in m.path for m in pn.memory_maps()),
                "scheduler_cpu_percent_of_one_core": round(100 * (s1 - s0) / (t1 - t0), 3),
                "scheduler_rss_mib": round(ps.memory_info().rss / 2**20, 1),
                "frames_from_agent": reply.nodes[0].frames,
            }
            print(json.dumps(result, indent=2))
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)


if __name__ == "__main__":
    main()
