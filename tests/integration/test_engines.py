"""Engines launched and scaled by SwarmX, end to end: a real scheduler and node agent, and
llama-cpp-python's OpenAI-compatible server started by the node from a ``launch`` template
(a tiny random-weight GGUF the test writes). A burst makes the ``tail`` scaler start a second
engine, announced only once its health check passed; killing an engine mid-call re-runs the
call elsewhere and restarts the engine; idleness drains and stops the extra engine; killing the
node agent leaves no engine behind."""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import psutil
import pytest

from swarmx.backends.tiny_gguf import N_CTX, write_tiny_llama_gguf
from swarmx.protocol import (
    NodesReply,
    QueryNodes,
)
from tests.integration.conftest import ask, needs_llama, states, submit_text, wait_for

pytestmark = pytest.mark.integration

needs_llama()


def config(model_path: str, state_dir: str) -> str:
    launch = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        model_path,
        "--model_alias",
        "{served_model}",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--n_ctx",
        str(N_CTX),
        "--interrupt_requests",
        "False",
    ]
    return f"""
[node]
heartbeat_interval_s = 0.2
telemetry_interval_s = 0.2
gpus = "off"
tool_slots = 0
state_dir = {json.dumps(state_dir)}

[[node.replicas]]
model = "tiny"
backend = "openai"
launch = {json.dumps(launch)}
concurrency = 1
count = 1
max_count = 2
ready_timeout_s = 60
stop_timeout_s = 5

[router]
policy = "tail"

[client]
timeout_s = 5.0

[scaler]
policy = "tail"
interval_s = 1.0
options = {{ hysteresis_s = 3.0 }}
"""


WORKFLOW = """
name = "burst"
slo_s = 120

[[steps]]
id = "write"
kind = "llm"
model = "tiny"
prompt = "Write part {index} of a story"
max_tokens = 48
fan_out = 4
"""


def alpha(endpoint):
    reply = ask(endpoint, QueryNodes())
    assert isinstance(reply, NodesReply)
    return next((n for n in reply.nodes if n.name == "alpha"), None)


def replicas(endpoint) -> list[str]:
    node = alpha(endpoint)
    return [] if node is None else [r.replica for r in node.hello.replicas if not r.draining]


def engines(model_path: str) -> list[psutil.Process]:
    """The llama.cpp servers running this test's model."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "llama_cpp.server" in cmd and model_path in cmd:
            out.append(proc)
    return out


def busy_replica(endpoint) -> str | None:
    """A replica of alpha's with a call running, as its latest telemetry says."""
    node = alpha(endpoint)
    if node is None or node.telemetry is None:
        return None
    return next((r.replica for r in node.telemetry.replicas if r.inflight > 0), None)


def launched_pids(log: str) -> dict[str, int]:
    """Each replica's engine process, the latest launched, from the node's log."""
    return {m[0]: int(m[1]) for m in re.findall(r"engine (\S+): launched pid (\d+)", log)}


def submit(endpoint, n: int) -> list[str]:
    ids = []
    for i in range(n):
        ids.append(submit_text(endpoint, f"burst-{i}.toml", WORKFLOW))
    return ids


def test_the_node_launches_scales_restarts_and_cleans_up_llama_cpp_engines(procs):
    model = procs.tmp / "tiny.gguf"
    write_tiny_llama_gguf(model)
    procs.config.write_text(config(str(model), str(procs.tmp / "node-state")))
    _, endpoint = procs.scheduler()
    node = procs.node(endpoint, "alpha")
    wait_for(lambda: replicas(endpoint) == ["alpha/tiny#0"], timeout_s=60, what="engine #0")
    [first] = engines(str(model))
    assert first.ppid() == node.pid and os.getpgid(first.pid) == first.pid  # its own group

    # a burst: the scaler starts a second engine, listed only once it answers
    ids = submit(endpoint, 6)
    wait_for(lambda: len(replicas(endpoint)) == 2, timeout_s=60, what="a second engine")
    log = procs.log("alpha")
    assert log.index("engine alpha/tiny#1: ready in") < log.index("replica alpha/tiny#1 ready")
    pool = alpha(endpoint).hello.pools[0]
    assert len(pool.warmup_s) >= 2 and all(0 < w < 60 for w in pool.warmup_s)

    # an engine killed mid-call: its calls run again elsewhere, the engine comes back
    more = submit(endpoint, 6)
    busy = wait_for(lambda: busy_replica(endpoint), timeout_s=30, what="a call on an engine")
    killed = launched_pids(procs.log("alpha"))[busy]
    os.kill(killed, signal.SIGKILL)
    done = wait_for(
        lambda: (s := states(endpoint, ids + more)) and "running" not in s.values() and s,
        timeout_s=120,
        what="every workflow to end",
    )
    assert done == dict.fromkeys(ids + more, "succeeded")
    out = procs.tmp / "traces.jsonl"
    procs.cli("traces", "export", "--out", str(out), "--scheduler", endpoint)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    died = [r for r in rows if not r["ok"]]
    # the call running there fails at once, as the node says (the engine died) or as the
    # scheduler does when the node's new replica list comes first (the replica is gone); those
    # queued for it go with the replica
    assert died
    assert all(
        "the engine died mid-call" in r["error"] or f"{busy} gone" in r["error"] for r in died
    )
    assert all(r["replica"] == busy for r in died)
    again = {(r["workflow"], r["step"], r["index"]) for r in rows if r["ok"]}
    assert {(r["workflow"], r["step"], r["index"]) for r in died} <= again  # each ran again
    pool = alpha(endpoint).hello.pools[0]
    assert pool.restarts == 1
    assert f"replica {busy} failed: engine exited with status -9" in procs.log("alpha")
    wait_for(lambda: len(replicas(endpoint)) == 2, timeout_s=60, what="the engine back")
    assert launched_pids(procs.log("alpha"))[busy] != killed

    # idle: the pool drains back to one engine, the other process stopped
    wait_for(lambda: len(replicas(endpoint)) == 1, timeout_s=60, what="a scale-down")
    wait_for(lambda: len(engines(str(model))) == 1, timeout_s=30, what="the engine to stop")
    wait_for(lambda: "draining" in (log := procs.log("alpha")) and " stopped" in log)

    # the agent killed outright: its engine dies with it
    node.send_signal(signal.SIGKILL)
    node.wait()
    wait_for(lambda: not engines(str(model)), timeout_s=15, what="no engine left behind")
