"""What the scheduler shows `swarmx top` and the metrics: recent calls against their forecasts,
the five-minute workflow window, running workflows' slack and progress, and the decision log,
driven through the real workflow service with a fake node and a hand-driven clock."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from swarmx.clock import ManualClock
from swarmx.cluster import NodeTable
from swarmx.daemon.observe import REPLICAS_PER_STEP, Observer, PrefixHits, Recent
from swarmx.daemon.scaling import Decision
from swarmx.daemon.workflows import WorkflowService
from swarmx.metrics import SchedulerMetrics
from swarmx.models.online import OnlineLearner
from swarmx.protocol import (
    Dispatch,
    Hello,
    QueryTop,
    ReplicaInfo,
    ReplicaRuntime,
    Result,
    SchedulerInfo,
    Submit,
    Telemetry,
)
from swarmx.sched.router import LeastOutstanding
from swarmx.store import Store
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord
from tests.unit.test_protocol import HOST

FAN = """
name = "fan"
slo_s = 10

[[steps]]
id = "write"
kind = "llm"
after = []
model = "lm"
prompt = "part {index}"
fan_out = 3

[[steps]]
id = "join"
kind = "llm"
after = ["write"]
model = "lm"
prompt = "join {steps.write.output}"
"""
INFO = SchedulerInfo("tcp://127.0.0.1:7700", "0.1.0", 1.0, {})


class Cluster:
    """One node with two replicas of ``lm``, the real workflow service and an observer."""

    def __init__(self, tmp_path) -> None:
        self.clock = ManualClock(100.0)
        self.sent: list[tuple[str, Dispatch]] = []
        self.nodes = NodeTable(3, 10)
        self.learner = OnlineLearner(tmp_path)
        self.service = WorkflowService(
            Store(tmp_path / "swarmx.db"),
            LeastOutstanding(),
            self.nodes,
            self.clock,
            self.send,
            learner=self.learner,
        )
        self.metrics = SchedulerMetrics()
        self.observer = Observer(
            self.service,
            self.nodes,
            self.learner,
            self.clock,
            self.metrics,
            router="least_outstanding",
            scaler="tail",
        )

    async def send(self, node, body) -> bool:
        if isinstance(body, Dispatch):
            self.sent.append((node, body))
        return True

    async def start(self) -> None:
        infos = [ReplicaInfo(f"n/lm#{i}", "lm", "emulated", "emulated:H100", 4) for i in (0, 1)]
        hello = Hello("n", "h", 1, "0", 2, 1, 1 << 30, [], infos, 1.0, 1.0, 0.0)
        self.nodes.register(hello, b"n", self.clock.monotonic(), self.clock.time())
        runtime = [ReplicaRuntime("n/lm#0", "lm", 1, 2, 7, 1)]
        self.nodes.update_telemetry("n", Telemetry(HOST, [], runtime, 0.001))
        await self.service.on_hello(hello)

    async def submit(self, slo_s: float = 10) -> str:
        text = textwrap.dedent(FAN).replace("slo_s = 10", f"slo_s = {slo_s}")
        wf_id, _ = await self.service.submit(Submit("wf.toml", text))
        return wf_id

    async def finish_all(self, latency_s: float) -> None:
        """Every dispatched call so far ends now, taking ``latency_s``."""
        sent, self.sent = self.sent, []
        for node, d in sent:
            result = Result(d.call_id, d.replica, True, "ok", "", 0.0, latency_s, None, 3, 3)
            await self.service.on_result(node, result)

    async def top(self, **query):
        return await self.observer.snapshot(INFO, QueryTop(**query))


def test_recent_figures_are_the_calls_quantiles_and_their_forecasts():
    recent = Recent()
    for latency, pred in ((1.0, {"0.5": 2.0}), (3.0, {"0.5": 2.0}), (2.0, None)):
        recent.add(latency, pred)
    actual, mean_pred, covered = recent.figures(["0.5", "0.9"])
    assert actual == {"0.5": 2.0, "0.9": 3.0}  # the inverse empirical CDF (swarmx.stats)
    assert mean_pred == {"0.5": 2.0}  # only the calls forecast at a level count for it
    assert covered == {"0.5": 0.5}


def test_calls_routes_and_workflows_are_seen(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        fast = await c.submit()
        await c.finish_all(1.0)  # the three "write" calls
        during = await c.top()
        c.clock.now += 2
        await c.finish_all(2.0)  # "join": the workflow took 2 s of its 10
        slow = await c.submit(slo_s=1)
        c.clock.now += 5
        await c.finish_all(1.0)
        c.clock.now += 1
        await c.finish_all(1.0)  # took 6 s of its 1
        return c, fast, slow, during, await c.top()

    c, fast, slow, during, after = asyncio.run(main())
    running = during.workflows[0]
    assert (running.id, running.state, running.steps_done, running.steps_total) == (
        fast,
        "running",
        1,
        2,
    )
    assert running.calls_running == 1
    assert running.slack_s is not None and running.slack_s < 10  # "join" is still to run
    s = after.summary
    assert (s.running, s.finished, s.window_finished) == (0, 2, 2)
    assert (s.window_slo_total, s.window_slo_met) == (2, 1)
    assert s.latency_p50_s == 2.0  # of 2 s and 6 s: the inverse empirical CDF (swarmx.stats)
    assert [w.id for w in after.workflows] == [slow, fast]  # newest first
    assert [w.age_s for w in after.workflows] == [pytest.approx(6.0), pytest.approx(2.0)]

    routes = [d for d in after.decisions if d.kind == "route"]
    assert len(routes) == 8
    assert all(d.pred_s and set(d.pred_s) == {"0.5", "0.9", "0.95", "0.99"} for d in routes)
    assert routes[0].detail.startswith(f"{slow}:join:")  # newest first
    by_replica = {r.replica: r for r in after.replicas}
    assert set(by_replica) == {"n/lm#0", "n/lm#1"}
    r0 = by_replica["n/lm#0"]
    assert (r0.state, r0.queued, r0.inflight, r0.completed) == ("serving", 1, 2, 7)
    assert by_replica["n/lm#1"].queued is None  # no telemetry about it yet
    assert sum(r.calls for r in after.replicas) == 8
    [model] = after.models
    assert (model.model, model.replicas, model.queued, model.calls) == ("lm", 2, 0, 8)
    assert model.actual_s["0.5"] == 1.0
    assert set(model.pred_s) == set(model.covered) == {"0.5", "0.9", "0.95", "0.99"}
    assert after.predictor.kind == "fallback"

    value = c.metrics.registry.get_sample_value
    assert value("swarmx_calls_total", {"model": "lm", "outcome": "ok"}) == 8
    assert (
        value(
            "swarmx_route_decisions_total",
            {"model": "lm", "node": "n", "policy": "least_outstanding"},
        )
        == 8
    )
    assert value("swarmx_call_latency_seconds_count", {"model": "lm"}) == 8
    assert value("swarmx_workflows_finished_total", {"state": "succeeded"}) == 2
    assert value("swarmx_workflow_slo_total", {"outcome": "met"}) == 1
    assert value("swarmx_workflow_slo_total", {"outcome": "missed"}) == 1


def test_the_window_forgets_old_workflows_and_the_log_keeps_scaling(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        await c.submit()
        await c.finish_all(1.0)
        await c.finish_all(1.0)
        c.clock.now += 301
        c.observer.scaled(
            Decision(c.clock.time(), "lm", 2, 3, "tail: 9 waiting", {"n": 3}, {"0.5": 1.5})
        )
        return await c.top(decisions=2)

    top = asyncio.run(main())
    s = top.summary
    assert (s.finished, s.window_finished, s.window_slo_total) == (1, 0, 0)
    assert s.latency_p95_s is None
    scale, route = top.decisions
    assert (scale.kind, scale.target, scale.detail, scale.pred_s) == (
        "scale",
        "2 -> 3",
        "tail: 9 waiting",
        {"0.5": 1.5},
    )
    assert route.kind == "route"


def test_replicas_that_leave_are_shown_unroutable_then_forgotten(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        await c.submit()
        await c.finish_all(1.0)
        c.clock.now += 5
        for change in c.nodes.sweep(c.clock.monotonic()):
            await c.service.on_node_state(change.node, change.new)
        stale = await c.top()
        hello = Hello("n", "h", 1, "0", 2, 1, 1 << 30, [], [], 1.0, 1.0, 0.0)
        c.nodes.register(hello, b"n", c.clock.monotonic(), c.clock.time())
        await c.service.on_hello(hello)
        return stale, await c.top(), c.observer

    stale, gone, observer = asyncio.run(main())
    assert {r.state for r in stale.replicas} == {"unroutable"}
    assert stale.models[0].replicas == 0
    assert gone.replicas == []
    assert observer.replicas == {}


def test_a_snapshot_of_many_replicas_lets_the_loop_run_between_them(tmp_path):
    """Over 1,000 replicas one snapshot took 100 ms: it yields every `REPLICAS_PER_STEP`."""

    async def main():
        c = Cluster(tmp_path)
        infos = [
            ReplicaInfo(f"n/lm#{i}", "lm", "emulated", "emulated:H100", 4)
            for i in range(2 * REPLICAS_PER_STEP + 1)
        ]
        hello = Hello("n", "h", 1, "0", 2, 1, 1 << 30, [], infos, 1.0, 1.0, 0.0)
        c.nodes.register(hello, b"n", c.clock.monotonic(), c.clock.time())
        await c.service.on_hello(hello)
        ticks = 0

        async def count() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count())
        await asyncio.sleep(0)
        before = ticks
        top = await c.top()
        counter.cancel()
        return top, ticks - before

    top, ran = asyncio.run(main())
    assert len(top.replicas) == 2 * REPLICAS_PER_STEP + 1
    assert ran >= 2


def test_prefix_hits_are_shares_of_prompt_tokens_each_over_the_calls_that_have_the_figure():
    hits = PrefixHits()
    assert hits.rates() == (None, None)
    base = dict(ts=0.0, workflow="w", step="s", deps=[], model="lm", prompt="p", max_tokens=8)
    more = dict(output_tokens=1, latency_s=1.0, queue_s=0.0, ttft_s=None, node="n", replica="r")
    dev = dict(device=DeviceAtDispatch("cpu", 0, 0, 0), runtime=RuntimeAtDispatch(0, 0))

    def rec(prompt: int, cached: int | None, est: int | None, kind: str = "llm") -> TraceRecord:
        return TraceRecord(
            kind=kind,
            prompt_tokens=prompt,
            cached_tokens=cached,
            cached_tokens_est=est,
            **base,  # type: ignore[arg-type]
            **more,  # type: ignore[arg-type]
            **dev,  # type: ignore[arg-type]
        )

    hits.add(rec(1000, 750, 512))
    hits.add(rec(1000, None, 0))  # the engine did not say: only the estimate counts it
    hits.add(rec(500, 0, None))
    hits.add(rec(0, None, None, kind="tool"))  # tools have no prompt cache
    reported, expected = hits.rates()
    assert reported == pytest.approx(750 / 1500)
    assert expected == pytest.approx(512 / 2000)


def test_an_engine_claiming_more_cached_than_prompt_tokens_reads_as_all_cached():
    hits = PrefixHits()
    base = dict(ts=0.0, workflow="w", step="s", deps=[], model="lm", prompt="p", max_tokens=8)
    more = dict(output_tokens=1, latency_s=1.0, queue_s=0.0, ttft_s=None, node="n", replica="r")
    dev = dict(device=DeviceAtDispatch("cpu", 0, 0, 0), runtime=RuntimeAtDispatch(0, 0))
    hits.add(
        TraceRecord(
            kind="llm",
            prompt_tokens=100,
            cached_tokens=10**9,
            cached_tokens_est=None,
            **base,  # type: ignore[arg-type]
            **more,  # type: ignore[arg-type]
            **dev,  # type: ignore[arg-type]
        )
    )
    assert hits.rates() == (1.0, None)
