"""Deadlines and slack the workflow service gives each call, fan-out estimates, and what it tells
the scaler (budgets, expected calls), with a fake cluster and a hand-driven clock."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from swarmx.clock import ManualClock
from swarmx.cluster import NodeTable
from swarmx.daemon import views as views_module
from swarmx.daemon import workflows as service_module
from swarmx.daemon.limits import Deadlines, QuotaExceeded
from swarmx.daemon.workflows import CALL_GRACE_S, WorkflowService
from swarmx.protocol import CancelCalls, Dispatch, Hello, ReplicaInfo, Result, Submit
from swarmx.sched.router import LeastOutstanding
from swarmx.store import Store
from swarmx.workflow.spec import DEFAULT_LIMITS, WorkflowLimits
from tests.unit.workflow.test_engine import MERGE

CHAIN = """
name = "chain"
slo_s = 60

[[steps]]
id = "a"
kind = "llm"
after = []
model = "lm"
prompt = "first"

[[steps]]
id = "b"
kind = "llm"
after = ["a"]
model = "lm"
prompt = "second {steps.a.output}"

[[steps]]
id = "c"
kind = "llm"
after = ["b"]
model = "lm"
prompt = "third {steps.b.output}"
"""

FAN = """
name = "fan"
slo_s = 30

[[steps]]
id = "plan"
kind = "llm"
after = []
model = "lm"
prompt = "list things"

[[steps]]
id = "each"
kind = "llm"
after = ["plan"]
model = "lm"
prompt = "about {item}"
fan_out = { from = "plan", max = 5 }
"""


class Cluster:
    def __init__(self, tmp_path, limits: WorkflowLimits = DEFAULT_LIMITS) -> None:
        self.clock = ManualClock(100.0)
        self.sent: list[Dispatch] = []
        self.cancelled: list[str] = []
        self.nodes = NodeTable(3, 10)
        self.service = WorkflowService(
            Store(tmp_path / "swarmx.db"),
            LeastOutstanding(),
            self.nodes,
            self.clock,
            self.send,
            order="slack",
            limits=limits,
        )
        self.tickets = []
        submit = self.service.dispatcher.submit

        def spy(ticket, now):
            self.tickets.append(ticket)
            return submit(ticket, now)

        self.service.dispatcher.submit = spy

    async def send(self, node, body) -> bool:
        if isinstance(body, Dispatch):
            self.sent.append(body)
        if isinstance(body, CancelCalls):
            self.cancelled.extend(body.call_ids)
        return True

    async def start(self) -> None:
        infos = [ReplicaInfo("n/lm#0", "lm", "emulated", "emulated:H100", 8)]
        hello = Hello("n", "h", 1, "0", 2, 1, 1 << 30, [], infos, 1.0, 1.0, 0.0)
        self.nodes.register(hello, b"n", self.clock.monotonic(), self.clock.time())
        await self.service.on_hello(hello)

    async def submit(self, text: str, client: str = "") -> str:
        wf_id, _ = await self.service.submit(Submit("wf.toml", textwrap.dedent(text)), client)
        return wf_id

    async def finish(self, call_id: str, output: str = "ok", latency_s: float = 1.0) -> None:
        result = Result(call_id, "n/lm#0", True, output, "", 0.0, latency_s, None, 3, 3)
        await self.service.on_result("n", result)


def test_each_call_gets_the_workflow_deadline_less_the_rest_of_its_critical_path(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        for step, s in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
            c.service.steps.step_s[("chain", step)] = s  # observed service times (median)
        submitted = c.clock.time()
        await c.submit(CHAIN)
        c.clock.now += 4  # "a" took 4 s: the workflow is 3 s behind its plan
        await c.finish(c.sent[0].call_id)
        return submitted, c.tickets

    submitted, tickets = asyncio.run(main())
    a, b = tickets
    end = submitted + 60
    assert a.deadline_s == pytest.approx(end - 5)  # b (2 s) and c (3 s) must fit after a
    assert a.slack_s == pytest.approx(end - submitted - 6)
    assert b.deadline_s == pytest.approx(end - 3)
    assert b.slack_s == pytest.approx(end - (submitted + 4) - 5)


def test_workflows_without_an_slo_get_no_deadline(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        await c.submit(CHAIN.replace("slo_s = 60\n", ""))
        return c.tickets

    [t] = asyncio.run(main())
    assert (t.deadline_s, t.slack_s) == (None, None)


def test_dynamic_fan_outs_are_estimated_from_their_max_then_their_history(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        wf = await c.submit(FAN)
        run = c.service.runs[wf]
        step = run.spec.step("each")
        first = (c.service.outlook.fan_estimate(run, step), c.service.expected_calls("lm"))
        await c.finish(c.sent[0].call_id, "x\ny")
        known = c.service.outlook.fan_estimate(run, step)
        wf2 = await c.submit(FAN)
        run2 = c.service.runs[wf2]
        return first, known, c.service.outlook.fan_estimate(run2, run2.spec.step("each"))

    (unexpanded, expected), known, learned = asyncio.run(main())
    assert unexpanded == 5  # nothing known yet: the cap
    assert expected == 5  # what the scaler is told is coming
    assert known == 2
    assert learned == 2  # the step's past expansions


def test_the_budget_is_the_tightest_deadline_of_the_models_calls(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        c.service.steps.step_s[("chain", "b")] = 10.0
        await c.submit(CHAIN)
        return c.service.budget("lm"), c.service.budget("other")

    budget, none = asyncio.run(main())
    assert budget == pytest.approx(60 - 10)
    assert none is None


TOOL = """
name = "tool"
[[steps]]
id = "t"
kind = "llm"
model = "lm"
prompt = "go"
retries = 1
"""


def test_a_call_with_no_result_by_its_deadline_is_cancelled_and_rerun_then_failed(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        wf = await c.submit(TOOL)
        limit_s = 900 + CALL_GRACE_S  # an llm call without timeout_s
        c.clock.now += limit_s - 1
        await c.service.check_deadlines()
        before = (len(c.sent), list(c.cancelled))
        for _ in range(7):  # 1 attempt, 5 re-runs as lost calls, 1 retry
            c.clock.now += limit_s
            await c.service.check_deadlines()
        return before, c.sent, c.cancelled, c.service.store.workflow(wf)

    before, sent, cancelled, row = asyncio.run(main())
    assert before == (1, [])  # not due yet
    assert cancelled == [d.call_id for d in sent]  # each cancelled on the node, then re-run
    assert [d.call_id.rsplit(":", 1)[1] for d in sent] == [str(i) for i in range(1, 8)]
    assert (row.state, row.reason) == (
        "failed",
        "step t failed after 2 attempts: no result within 960 s",
    )


def test_a_workflow_past_its_hard_deadline_fails_and_its_calls_are_cancelled(tmp_path):
    async def main():
        c = Cluster(tmp_path, WorkflowLimits(workflow_timeout_s=3600))
        await c.start()
        wf = await c.submit(CHAIN)
        for step_s in (960, 960, 960, 719):  # the call is re-run as lost; 3,599 s pass
            c.clock.now += step_s
            await c.service.check_deadlines()
        still = c.service.store.workflow(wf).state
        c.clock.now += 1
        await c.service.check_deadlines()
        return still, c.sent, c.cancelled, c.service.store.workflow(wf), c.service.runs

    still, sent, cancelled, row, runs = asyncio.run(main())
    assert still == "running"
    assert (row.state, row.reason) == ("failed", "not finished within 3600 s (workflow_timeout_s)")
    assert cancelled == [d.call_id for d in sent]  # three that timed out, then the last one
    assert len(sent) == 4
    assert runs == {}


def test_deadlines_of_finished_calls_and_workflows_are_dropped(tmp_path):
    async def main():
        c = Cluster(tmp_path, WorkflowLimits(workflow_timeout_s=60))
        await c.start()
        wf = await c.submit(TOOL)
        await c.finish(c.sent[0].call_id)
        c.clock.now += 10_000
        await c.service.check_deadlines()
        return c.cancelled, c.service.store.workflow(wf)

    cancelled, row = asyncio.run(main())
    assert cancelled == []
    assert (row.state, row.reason) == ("succeeded", "")


def test_a_merge_too_large_for_one_dispatch_fails_the_workflow(tmp_path):
    async def main():
        c = Cluster(tmp_path, WorkflowLimits(max_prompt_bytes=8 << 20))
        await c.start()
        wf = await c.submit(MERGE)
        for d in list(c.sent):
            await c.finish(d.call_id, "x" * (1 << 20))
        return len(c.sent), c.service.store.workflow(wf), c.service.runs

    sent, row, runs = asyncio.run(main())
    assert sent == 6  # nothing oversized went out
    assert (row.state, row.reason) == (
        "failed",
        "step merge: inputs of 6.0 MiB exceed the 4 MiB frame limit (max_frame_bytes)",
    )
    assert runs == {}


def test_each_client_may_hold_only_so_many_unfinished_workflows(tmp_path):
    async def main():
        c = Cluster(tmp_path, WorkflowLimits(max_queued_workflows_per_client=2))
        await c.start()
        a1 = await c.submit(TOOL, "alice")
        await c.submit(TOOL, "alice")
        with pytest.raises(QuotaExceeded) as refused:
            await c.submit(TOOL, "alice")
        bob = await c.submit(TOOL, "bob")  # others are not held up
        await c.service.cancel(a1)
        again = await c.submit(TOOL, "alice")  # room again once one finished
        owners = [c.service.client_of(w) for w in (a1, bob, again)]
        return str(refused.value), owners, c.service.client_of("wf-none")

    refused, owners, unknown = asyncio.run(main())
    assert refused == (
        "client 'alice' already has 2 unfinished workflows, the most allowed"
        " (max_queued_workflows_per_client = 2); wait for some to finish or cancel them"
    )
    assert owners == ["alice", "bob", "alice"]
    assert unknown is None


def test_the_quota_counts_workflows_resumed_after_a_restart(tmp_path):
    async def main():
        limits = WorkflowLimits(max_queued_workflows_per_client=1)
        c = Cluster(tmp_path, limits)
        await c.start()
        await c.submit(TOOL, "alice")
        c.service.store.close()
        again = Cluster(tmp_path, limits)
        await again.start()
        assert await again.service.recover() == 1
        with pytest.raises(QuotaExceeded):
            await again.submit(TOOL, "alice")

    asyncio.run(main())


def test_the_deadline_heap_stays_small_and_pops_in_order():
    d = Deadlines()
    for i in range(10_000):
        d.add(f"c{i}", float(i))
        if i >= 3:
            d.drop(f"c{i - 3}")  # calls finish: their entries go stale
    assert len(d._heap) <= 2 * 3 + 64 + 1
    d.add("c9999", 5.0)  # moved earlier
    assert d.due(9_998.0) == ["c9999", "c9997", "c9998"]
    assert d.due(1e9) == []


def test_views_of_a_finished_workflow_parse_it_once(tmp_path, monkeypatch):
    """`status` and `top` ask for views often; a finished workflow's file (up to 1 MiB) is
    parsed on the event loop once, not per request."""
    parses = []
    real = service_module.parse_workflow
    for module in (service_module, views_module):
        monkeypatch.setattr(
            module, "parse_workflow", lambda *a, **k: parses.append(1) or real(*a, **k)
        )

    async def main():
        c = Cluster(tmp_path)
        await c.start()
        wf = await c.submit(CHAIN)
        for _ in range(3):
            await c.finish(c.sent[-1].call_id)
        before = len(parses)
        views = [c.service.views.view(wf, detailed=True) for _ in range(20)]
        views += c.service.views.recent(10)
        return before, views

    before, views = asyncio.run(main())
    assert len(parses) == before + 1
    assert {v.state for v in views} == {"succeeded"}
    assert [s.id for s in views[0].steps] == ["a", "b", "c"]


def test_a_result_sent_twice_counts_once(tmp_path):
    """A node re-sends a result the scheduler has not acknowledged; the copy changes nothing."""

    async def main():
        c = Cluster(tmp_path)
        await c.start()
        wf = await c.submit(CHAIN)
        first = c.sent[-1].call_id
        await c.finish(first, "one")
        await c.finish(first, "two")  # the duplicate
        assert c.service.dispatched_to(first) is None
        for _ in range(2):
            await c.finish(c.sent[-1].call_id)
        return c, wf

    c, wf = asyncio.run(main())
    assert c.service.faults.results_dropped["late"] == 1
    assert [d.step_id for d in c.sent] == ["a", "b", "c"]
    assert c.service.store.workflow(wf).state == "succeeded"
    assert c.sent[1].prompt == "second one"
