"""Scaling end to end: a real scheduler with a short scaling interval and a real node serving an
emulated model; a burst of workflows makes the pool grow, idleness shrinks it again, and every
workflow succeeds (a drained replica finishes its calls before it closes)."""

from __future__ import annotations

import json
import time

import pytest

from swarmx.clock import RealClock
from swarmx.protocol import QueryWorkflows, Submit, Submitted, WorkflowsReply
from swarmx.transport import request
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration

CONFIG = """
[node]
heartbeat_interval_s = 0.2
telemetry_interval_s = 0.2
gpus = "off"
tool_slots = 0

[[node.replicas]]
model = "lm"
backend = "emulated"
gpu = "H100"
concurrency = 1
count = 1
max_count = 4
startup_delay_s = 0.3

[router]
policy = "tail"
queue = "slack"

[client]
timeout_s = 5.0

[scaler]
interval_s = 1.0
"""

WORKFLOW = """
name = "burst"
slo_s = 60

[[steps]]
id = "write"
kind = "llm"
after = []
model = "lm"
prompt = "Write paragraph {index} about replica pools"
max_tokens = 200
fan_out = 3
"""

WORKFLOWS = 8


def ask(endpoint, body):
    return request(endpoint, body, "test", RealClock(), 5.0).body


def replicas(procs, endpoint):
    node = procs.nodes(endpoint).get("alpha")
    if node is None:
        return None
    return [(r["replica"], r["draining"]) for r in node["hello"]["replicas"]]


@pytest.mark.parametrize(
    "scaler",
    [
        'policy = "threshold"\noptions = { down_window_s = 3.0 }',
        'policy = "tail"\noptions = { hysteresis_s = 3.0 }',
    ],
    ids=["threshold", "tail"],
)
def test_a_burst_scales_the_pool_up_and_idleness_scales_it_down(procs, scaler):
    procs.config.write_text(CONFIG + scaler + "\n")
    _, endpoint = procs.scheduler()
    procs.node(endpoint, "alpha")
    wait_for(lambda: replicas(procs, endpoint) == [("alpha/lm#0", False)], what="the node")
    pool = procs.nodes(endpoint)["alpha"]["hello"]["pools"]
    assert [(p["model"], p["declared"], p["max_count"], p["target"]) for p in pool] == [
        ("lm", 1, 4, 1)
    ]

    t0 = time.monotonic()
    ids = []
    for i in range(WORKFLOWS):
        reply = ask(endpoint, Submit(f"burst-{i}.toml", WORKFLOW))
        assert isinstance(reply, Submitted), reply
        ids.append(reply.workflow_id)

    most = wait_for(
        lambda: (n := len(replicas(procs, endpoint) or [])) > 1 and n,
        timeout_s=20,
        what="a scale-up",
    )
    scaled_up_s = time.monotonic() - t0

    def states():
        reply = ask(endpoint, QueryWorkflows("", 50))
        assert isinstance(reply, WorkflowsReply)
        return {v.id: v.state for v in reply.workflows if v.id in ids}

    def all_done():
        s = states()
        if any(v == "running" for v in s.values()):
            nonlocal most
            most = max(most, len(replicas(procs, endpoint) or []))
            return None
        return s

    done = wait_for(all_done, timeout_s=40, what="every workflow to finish")
    assert done == dict.fromkeys(ids, "succeeded")
    assert most >= 2

    wait_for(
        lambda: replicas(procs, endpoint) is not None and len(replicas(procs, endpoint)) == 1,
        timeout_s=30,
        what="a scale-down to the declared replica",
    )
    log = procs.log("scheduler")
    assert "scale lm: 1 -> " in log
    assert "draining" in log
    node_log = procs.log("alpha")
    assert "ready (emulated" in node_log
    assert "stopped" in node_log

    # predicted vs actual: every model call carries the router's completion forecast
    trace_file = procs.tmp / "traces.jsonl"
    procs.cli("traces", "export", "--out", str(trace_file), "--scheduler", endpoint)
    rows = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert len(rows) == WORKFLOWS * 3
    assert all(r["ok"] for r in rows)
    assert all(r["pred"] and r["pred_completion"] for r in rows)
    assert all(0 < r["budget_s"] <= 60 for r in rows)
    assert len({r["replica"] for r in rows}) >= 2
    view = json.loads(procs.cli("status", ids[0], "--json", "--scheduler", endpoint).stdout)
    assert all(s["pred"] and s["pred_completion"] for s in view["steps"])
    print(f"scaled up after {scaled_up_s:.1f}s to {most} replicas")
