"""Deadlines and slack the workflow service gives each call, fan-out estimates, and what it tells
the scaler (budgets, expected calls), with a fake cluster and a hand-driven clock."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from swarmx.clock import ManualClock
from swarmx.cluster import NodeTable
from swarmx.daemon.workflows import WorkflowService
from swarmx.protocol import Dispatch, Hello, ReplicaInfo, Result, Submit
from swarmx.sched.router import LeastOutstanding
from swarmx.store import Store

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
    def __init__(self, tmp_path) -> None:
        self.clock = ManualClock(100.0)
        self.sent: list[Dispatch] = []
        self.nodes = NodeTable(3, 10)
        self.service = WorkflowService(
            Store(tmp_path / "swarmx.db"),
            LeastOutstanding(),
            self.nodes,
            self.clock,
            self.send,
            order="slack",
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
        return True

    async def start(self) -> None:
        infos = [ReplicaInfo("n/lm#0", "lm", "emulated", "emulated:H100", 8)]
        hello = Hello("n", "h", 1, "0", 2, 1, 1 << 30, [], infos, 1.0, 1.0, 0.0)
        self.nodes.register(hello, b"n", self.clock.monotonic(), self.clock.time())
        await self.service.on_hello(hello)

    async def submit(self, text: str) -> str:
        return await self.service.submit(Submit("wf.toml", textwrap.dedent(text)))

    async def finish(self, call_id: str, output: str = "ok", latency_s: float = 1.0) -> None:
        result = Result(call_id, "n/lm#0", True, output, "", 0.0, latency_s, None, 3, 3)
        await self.service.on_result("n", result)


def test_each_call_gets_the_workflow_deadline_less_the_rest_of_its_critical_path(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        for step, s in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
            c.service._step_s[("chain", step)] = s  # observed service times (median)
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
        c.service._step_s[("chain", "b")] = 10.0
        await c.submit(CHAIN)
        return c.service.budget("lm"), c.service.budget("other")

    budget, none = asyncio.run(main())
    assert budget == pytest.approx(60 - 10)
    assert none is None
