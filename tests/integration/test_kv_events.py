"""The prefix index fed by the engine, end to end: a real scheduler and node agent, and an engine
the node launches (tests/support/fake_engine.py) that keeps a prefix cache as vLLM does and
publishes vLLM's KV events over ZeroMQ. A client that is not SwarmX's evicts a SwarmX call's
prefix on the engine; the scheduler's index hears of it and expects what the engine will
really serve."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from swarmx.protocol import NodesReply, QueryNodes
from tests.integration.conftest import ask, states, submit_text, wait_for

pytestmark = pytest.mark.integration

FAKE = str(Path(__file__).resolve().parents[1] / "support" / "fake_engine.py")
CACHE_BLOCKS = 400
"""The engine's cache, in blocks of 16 tokens: 6,400 tokens."""


def config(state_dir: str) -> str:
    launch = [
        *(sys.executable, FAKE, "--port", "{port}", "--model", "{served_model}"),
        *("--kv-port", "{kv_port}", "--cache-blocks", str(CACHE_BLOCKS), "--garbage"),
    ]
    return f"""
[node]
heartbeat_interval_s = 0.2
telemetry_interval_s = 0.2
gpus = "off"
tool_slots = 0
state_dir = {json.dumps(state_dir)}

[[node.replicas]]
model = "coder"
backend = "openai"
launch = {json.dumps(launch)}
kv_events = "tcp://127.0.0.1:{{kv_port}}"
concurrency = 2
count = 1
ready_timeout_s = 30
stop_timeout_s = 5
"""


WORKFLOW = """
name = "long-context"

[[steps]]
id = "ask"
kind = "llm"
model = "coder"
prompt = {prompt}
max_tokens = 4
"""


def run(endpoint: str, prompt: str, n: int) -> None:
    wf = submit_text(endpoint, f"wf-{n}.toml", WORKFLOW.format(prompt=json.dumps(prompt)))
    wait_for(lambda: states(endpoint, [wf]).get(wf) == "succeeded", what=f"workflow {n}")


def replica_runtime(endpoint: str) -> dict | None:
    reply = ask(endpoint, QueryNodes())
    assert isinstance(reply, NodesReply)
    node = next((n for n in reply.nodes if n.name == "alpha"), None)
    if node is None or node.telemetry is None or not node.telemetry.replicas:
        return None
    r = node.telemetry.replicas[0]
    return {"capacity": r.cache_capacity_tokens, "refused": r.cache_events_refused}


def traces(procs, endpoint: str) -> list[dict]:
    out = procs.cli("traces", "export", "--out", "-", "--scheduler", endpoint)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_the_index_drops_a_prefix_the_engine_evicted_for_another_client(procs):
    procs.config.write_text(config(str(procs.tmp / "node-state")))
    _, endpoint = procs.scheduler()
    procs.node(endpoint, "alpha")
    port = int(
        wait_for(
            lambda: re.search(r"listening on (\d+)", procs.log("alpha")), what="the engine"
        ).group(1)
    )
    wait_for(lambda: replica_runtime(endpoint), what="the replica's telemetry")
    mine = "Refactor the parser module and keep its tests green. " * 80  # 4,320 bytes
    run(endpoint, mine, 0)
    # the node joins the call's prompt to the engine's blocks by asking the engine to tokenize it
    wait_for(lambda: "request POST /tokenize" in procs.log("alpha"), what="the join")

    # another client of the same engine, not SwarmX's: its prompt needs the room mine holds
    theirs = {"messages": [{"role": "user", "content": "Summarise the logs. " * 180}]}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(theirs).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
    # the engine's first eviction also tells its size; both come in the same telemetry
    wait_for(
        lambda: (r := replica_runtime(endpoint)) and r["capacity"] == CACHE_BLOCKS * 16,
        what="the eviction to reach the scheduler",
    )
    run(endpoint, mine, 1)  # what the index expects now is what the engine serves
    run(endpoint, mine, 2)  # and once it holds the prefix again, the index knows that too

    rows = traces(procs, endpoint)
    first, evicted, again = rows
    assert first["cached_tokens"] == first["cached_tokens_est"] == 0
    per = again["block_tokens"]
    blocks = len(again["prefix_blocks"])
    assert blocks == len(mine.encode()) // 256
    # mine kept its head (the engine evicts least recently used, a prompt's tail first): the
    # index expects the SwarmX blocks the engine's held tokens cover, not the whole prompt
    assert 0 < evicted["cached_tokens"] < blocks * per
    assert evicted["cached_tokens_est"] < blocks * per
    assert abs(evicted["cached_tokens_est"] - evicted["cached_tokens"]) <= per
    assert again["cached_tokens_est"] == blocks * per
    assert abs(again["cached_tokens_est"] - again["cached_tokens"]) <= per
    runtime = replica_runtime(endpoint)
    assert runtime is not None and runtime["refused"] == 1  # the engine's junk frame, counted
    assert "unreadable KV-event frame" in procs.log("alpha")
