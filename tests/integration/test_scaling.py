"""Scaling end to end: a real scheduler with a short scaling interval and a real node serving an
emulated model; a burst of workflows makes the pool grow, idleness shrinks it again, and every
workflow succeeds (a drained replica finishes its calls before it closes). A scale-down that
drains a replica while a call runs on it lets the call finish there, once."""

from __future__ import annotations

import datetime
import json
import time

import pytest

from swarmx.backends.emulated import GPUS, ModelProfile, decode_step_s, drawn_output_tokens
from swarmx.protocol import (
    NodesReply,
    QueryNodes,
    QueryWorkflows,
    WorkflowsReply,
)
from tests.integration.conftest import ask, states, wait_for
from tests.integration.conftest import submit_text as submit

pytestmark = pytest.mark.integration


def config(
    scaler: str,
    *,
    gpu: str = "H100",
    concurrency: int = 1,
    max_count: int = 4,
    interval_s: float = 1.0,
    extra: str = "",
) -> str:
    """One node `alpha` serving one scalable emulated pool of `lm` (one replica declared)."""
    return f"""
[node]
heartbeat_interval_s = 0.2
telemetry_interval_s = 0.2
gpus = "off"
tool_slots = 0

[[node.replicas]]
model = "lm"
backend = "emulated"
gpu = "{gpu}"
concurrency = {concurrency}
count = 1
max_count = {max_count}
startup_delay_s = 0.3

[router]
policy = "tail"
queue = "slack"

[client]
timeout_s = 5.0

[scaler]
interval_s = {interval_s}
{scaler}
{extra}"""


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


def replicas(endpoint):
    """Node alpha's replicas as its latest hello lists them: (replica, draining), or None."""
    reply = ask(endpoint, QueryNodes())
    assert isinstance(reply, NodesReply)
    node = next((n for n in reply.nodes if n.name == "alpha"), None)
    if node is None:
        return None
    return [(r.replica, r.draining) for r in node.hello.replicas]


def start_alpha(procs, text):
    """A scheduler and node alpha under config ``text``, once alpha serves its one replica."""
    procs.config.write_text(text)
    _, endpoint = procs.scheduler()
    procs.node(endpoint, "alpha")
    wait_for(lambda: replicas(endpoint) == [("alpha/lm#0", False)], what="the node")
    return endpoint


def exported_traces(procs, endpoint):
    trace_file = procs.tmp / "traces.jsonl"
    procs.cli("traces", "export", "--out", str(trace_file), "--scheduler", endpoint)
    return [json.loads(line) for line in trace_file.read_text().splitlines()]


@pytest.mark.parametrize(
    "scaler",
    [
        'policy = "threshold"\noptions = { down_window_s = 3.0 }',
        'policy = "tail"\noptions = { hysteresis_s = 3.0 }',
    ],
    ids=["threshold", "tail"],
)
def test_a_burst_scales_the_pool_up_and_idleness_scales_it_down(procs, scaler):
    endpoint = start_alpha(procs, config(scaler))
    pool = procs.nodes(endpoint)["alpha"]["hello"]["pools"]
    assert [(p["model"], p["declared"], p["max_count"], p["target"]) for p in pool] == [
        ("lm", 1, 4, 1)
    ]

    t0 = time.monotonic()
    ids = [submit(endpoint, f"burst-{i}.toml", WORKFLOW) for i in range(WORKFLOWS)]

    most = wait_for(
        lambda: (n := len(replicas(endpoint) or [])) > 1 and n,
        timeout_s=20,
        what="a scale-up",
    )
    scaled_up_s = time.monotonic() - t0

    def all_done():
        s = states(endpoint, ids)
        if any(v == "running" for v in s.values()):
            nonlocal most
            most = max(most, len(replicas(endpoint) or []))
            return None
        return s

    done = wait_for(all_done, timeout_s=40, what="every workflow to finish")
    assert done == dict.fromkeys(ids, "succeeded")
    assert most >= 2

    wait_for(
        lambda: replicas(endpoint) is not None and len(replicas(endpoint)) == 1,
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
    rows = exported_traces(procs, endpoint)
    assert len(rows) == WORKFLOWS * 3
    assert all(r["ok"] for r in rows)
    assert all(r["pred"] and r["pred_completion"] for r in rows)
    assert all(0 < r["budget_s"] <= 60 for r in rows)
    assert len({r["replica"] for r in rows}) >= 2
    view = json.loads(procs.cli("status", ids[0], "--json", "--scheduler", endpoint).stdout)
    assert all(s["pred"] and s["pred_completion"] for s in view["steps"])
    print(f"scaled up after {scaled_up_s:.1f}s to {most} replicas")


# Four independent calls a workflow: one long, three short. Each prompt draws an output at least
# as long as its max_tokens (lengths are seeded by the prompt), so every call runs exactly
# max_tokens decode steps: on an L40S about 25 ms each, whatever else shares the batch.
LONG = ("Draft part 7 of the report", 400)
SHORT = [(f"Draft part {k} of the report", 160) for k in (34, 36, 46)]
DRAIN_STEPS = {"long": LONG, **{f"short{i}": s for i, s in enumerate(SHORT)}}
DRAIN_WORKFLOW = 'name = "drain"\nslo_s = 60\n' + "".join(
    f'\n[[steps]]\nid = "{step}"\nkind = "llm"\nmodel = "lm"\nprompt = "{prompt}"\n'
    f"max_tokens = {tokens}\n"
    for step, (prompt, tokens) in DRAIN_STEPS.items()
)


def log_lines(procs, name):
    """A daemon's JSON log lines as (Unix time, message)."""
    out = []
    for line in procs.log(name).splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            ts = datetime.datetime.fromisoformat(rec["ts"].replace("Z", "+00:00"))
            out.append((ts.timestamp(), rec["msg"]))
    return out


def test_a_scale_down_drains_a_replica_with_calls_running_and_loses_none(procs):
    """Replica #0 (4 slots) takes workflow A's four calls; their load makes the threshold scaler
    start #1, which takes workflow B's four (#0 has no room left). Once the short calls are done,
    one long call on each replica is 2 calls in 8 slots: the scaler shrinks the pool to 1 and,
    every replica being equally busy, drains the newest, #1, while B's long call runs on it. That
    call must finish there, once, before #1 stops; nothing may be re-run."""
    for prompt, tokens in DRAIN_STEPS.values():  # the scenario's timing rests on this
        assert drawn_output_tokens(prompt, tokens) == tokens, prompt
    step_s = decode_step_s(GPUS["L40S"], ModelProfile(), [100] * 4)
    long_s = LONG[1] * step_s
    assert 8 < long_s < 12 and 3 < SHORT[0][1] * step_s < 5

    endpoint = start_alpha(
        procs,
        config(
            'policy = "threshold"\noptions = { down_window_s = 1.0 }',
            gpu="L40S",
            concurrency=4,
            max_count=2,
            interval_s=0.5,
            extra='\n[log]\nformat = "json"\n',
        ),
    )
    t0 = time.monotonic()
    first = submit(endpoint, "drain-a.toml", DRAIN_WORKFLOW)
    two = [("alpha/lm#0", False), ("alpha/lm#1", False)]
    wait_for(lambda: replicas(endpoint) == two, timeout_s=10, what="a scale-up to 2 replicas")
    second = submit(endpoint, "drain-b.toml", DRAIN_WORKFLOW)
    ids = [first, second]

    def drained_with_its_call():
        if ("alpha/lm#1", True) not in (replicas(endpoint) or []):
            return None
        reply = ask(endpoint, QueryWorkflows(second, 0))
        assert isinstance(reply, WorkflowsReply)
        return {s.step: (s.state, s.replica) for s in reply.workflows[0].steps}

    steps = wait_for(drained_with_its_call, timeout_s=20, what="replica #1 draining")
    drain_seen_s = time.monotonic() - t0
    assert steps["long"] == ("running", "alpha/lm#1"), steps  # in flight on the drained replica

    wait_for(
        lambda: replicas(endpoint) == [("alpha/lm#0", False)],
        timeout_s=20,
        what="replica #1 to finish its call and stop",
    )
    gone_s = time.monotonic() - t0
    done = wait_for(
        lambda: (s := states(endpoint, ids)) and "running" not in s.values() and s,
        timeout_s=20,
        what="both workflows to finish",
    )
    assert done == dict.fromkeys(ids, "succeeded")

    # the scaler's decisions, as `swarmx top --json` shows them: up to 2, then down to 1
    top = json.loads(procs.cli("top", "--json", "--scheduler", endpoint).stdout)
    scales = sorted((d["ts"], d["target"]) for d in top["decisions"] if d["kind"] == "scale")
    assert [t for _, t in scales] == ["1 -> 2", "2 -> 1"], scales
    decided_ts = scales[1][0]

    # every call ran exactly once, A's on #0 and B's on #1, and all succeeded
    rows = exported_traces(procs, endpoint)
    assert sorted((r["workflow"], r["step"]) for r in rows) == sorted(
        (wf, step) for wf in ids for step in DRAIN_STEPS
    )
    assert all(r["ok"] and r["attempt"] == 1 for r in rows), rows
    assert {r["replica"] for r in rows if r["workflow"] == first} == {"alpha/lm#0"}, rows
    assert {r["replica"] for r in rows if r["workflow"] == second} == {"alpha/lm#1"}, rows
    for wf in ids:
        view = json.loads(procs.cli("status", wf, "--json", "--scheduler", endpoint).stdout)
        assert sorted((s["step"], s["attempt"], s["state"]) for s in view["steps"]) == [
            (step, 1, "succeeded") for step in sorted(DRAIN_STEPS)
        ]

    # the drained replica's long call started before the decision and finished well after it
    (kept,) = [r for r in rows if r["replica"] == "alpha/lm#1" and r["step"] == "long"]
    started = kept["ts"] + kept["queue_s"]
    finished = started + kept["latency_s"]
    assert started < decided_ts < finished - 1.0, (started, decided_ts, finished)
    assert kept["output_tokens"] == LONG[1]

    # the scheduler drained #1 by name and re-ran nothing; the node waited for the call
    sched = [m for _, m in log_lines(procs, "scheduler")]
    assert any(m.startswith("scale lm: 2 -> 1") and "draining alpha/lm#1" in m for m in sched)
    assert not [m for m in sched if "re-running" in m or "lost with" in m]
    node = log_lines(procs, "alpha")
    assert any(m == "replica alpha/lm#1 draining: 1 calls to finish" for _, m in node)
    (stopped_ts,) = [ts for ts, m in node if m == "replica alpha/lm#1 stopped"]
    assert stopped_ts >= finished - 0.05, (stopped_ts, finished)

    # the pool really shrank: the node's own word
    (pool,) = procs.nodes(endpoint)["alpha"]["hello"]["pools"]
    assert (pool["target"], pool["max_count"]) == (1, 2)
    print(
        f"drain seen after {drain_seen_s:.1f}s, the drained call finished"
        f" {finished - decided_ts:.1f}s after the decision, #1 gone after {gone_s:.1f}s"
    )
