"""ReplicaSet: per-replica admission queues, timings, cancellation and failure isolation."""

import asyncio
import time

import psutil
import pytest

from swarmx.backends.base import BackendMetrics, CallOutcome, CallRequest
from swarmx.clock import RealClock
from swarmx.config import NodeConfig, ReplicaConfig
from swarmx.daemon import replicas as replicas_mod
from swarmx.daemon.replicas import ReplicaSet
from swarmx.protocol import Dispatch, ReplicaInfo, Result

LM0, LM1, TOOL = "node/lm#0", "node/lm#1", "node/tool"
SLOW_S = 0.2


def node_config(tool_slots: int = 1, count: int = 2) -> NodeConfig:
    lm = ReplicaConfig(model="lm", backend="emulated", gpu="H100", concurrency=1, count=count)
    return NodeConfig(name="node", replicas=[lm], tool_slots=tool_slots, gpus="off")


def llm(call_id: str, replica: str = LM0, prompt: str = "hello", max_tokens: int = 4) -> Dispatch:
    return Dispatch(call_id, "wf", "step", replica, "llm", "lm", prompt, max_tokens)


class Slow:
    """A backend whose calls take SLOW_S of real time."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.closed = False

    async def start(self) -> None:
        return None

    async def run(self, request: CallRequest) -> CallOutcome:
        self.started.append(request.call_id)
        await asyncio.sleep(SLOW_S)
        return CallOutcome(True, f"done {request.call_id}", output_tokens=2)

    def metrics(self) -> BackendMetrics:
        return BackendMetrics()

    async def close(self) -> None:
        self.closed = True


class Flaky(Slow):
    """Raises on calls whose id starts with ``boom``."""

    async def run(self, request: CallRequest) -> CallOutcome:
        if request.call_id.startswith("boom"):
            raise RuntimeError("backend exploded")
        return CallOutcome(True, "fine", output_tokens=1)


class Node:
    """A started ReplicaSet plus the results its reply callback received."""

    def __init__(self, rs: ReplicaSet) -> None:
        self.rs = rs
        self.results: dict[str, Result] = {}

    async def reply(self, result: Result) -> None:
        assert result.call_id not in self.results, "one result per call"
        self.results[result.call_id] = result

    def submit(self, d: Dispatch) -> None:
        self.rs.submit(d, self.reply)

    def runtime(self, replica: str):
        [rt] = [r for r in self.rs.runtime() if r.replica == replica]
        return rt

    async def until(self, predicate, within_s: float = 5.0) -> None:
        deadline = time.monotonic() + within_s
        while not predicate():
            assert time.monotonic() < deadline, "condition never held"
            await asyncio.sleep(0.005)


def serve(test, cfg: NodeConfig | None = None):
    """Run ``await test(node)`` on a started ReplicaSet, closing it afterwards."""

    async def main():
        rs = ReplicaSet(cfg or node_config(), RealClock())
        await rs.start()
        try:
            return await test(Node(rs))
        finally:
            await rs.close()

    return asyncio.run(main())


def test_infos_list_every_replica_and_the_tool_slots():
    async def test(node):
        return node.rs.infos()

    assert serve(test) == [
        ReplicaInfo(LM0, "lm", "emulated", "emulated:H100", 1),
        ReplicaInfo(LM1, "lm", "emulated", "emulated:H100", 1),
        ReplicaInfo(TOOL, "tool", "tool", "cpu", 1),
    ]


def test_no_tool_slots_means_no_tool_replica():
    async def test(node):
        return [i.replica for i in node.rs.infos()]

    assert serve(test, node_config(tool_slots=0, count=1)) == [LM0]


def test_tool_slots_default_to_one_per_core():
    async def test(node):
        return {i.replica: i.concurrency for i in node.rs.infos()}

    assert serve(test, node_config(tool_slots=-1, count=1))[TOOL] == (psutil.cpu_count() or 1)


def test_nothing_is_listed_before_start():
    rs = ReplicaSet(node_config(), RealClock())
    assert rs.infos() == []
    assert rs.runtime() == []


def test_a_replica_that_fails_to_start_is_left_out(monkeypatch):
    real = replicas_mod.make_backend
    calls = []

    def make(cfg, clock):
        calls.append(cfg.model)
        if len(calls) == 1:
            raise RuntimeError("no GPU today")
        return real(cfg, clock)

    monkeypatch.setattr(replicas_mod, "make_backend", make)

    async def test(node):
        return [i.replica for i in node.rs.infos()]

    listed = serve(test)
    assert len(listed) == 2
    assert TOOL in listed
    assert len(calls) == 2


def test_a_dispatch_runs_on_the_emulated_replica():
    async def test(node):
        node.submit(llm("c1", LM1))
        await node.until(lambda: "c1" in node.results)
        return node.results["c1"], node.runtime(LM1)

    result, rt = serve(test)
    assert result.ok, result.error
    assert result.replica == LM1
    assert 0 <= result.queue_s < 0.05
    assert result.latency_s > 0.005  # at least one emulated H100 step
    assert result.ttft_s is not None
    assert 0 < result.ttft_s <= result.latency_s
    assert 1 <= result.output_tokens <= 4
    assert result.prompt_tokens >= 1
    assert (rt.queued, rt.inflight, rt.completed, rt.failed) == (0, 0, 1, 0)
    assert rt.recent_latencies_s == [result.latency_s]
    assert (rt.engine_queued, rt.engine_running) == (0, 0)


def test_a_tool_dispatch_runs_a_subprocess():
    async def test(node):
        node.submit(Dispatch("t1", "wf", "step", TOOL, "tool", "tool", command=["echo", "hi"]))
        await node.until(lambda: "t1" in node.results)
        return node.results["t1"]

    result = serve(test)
    assert result.ok, result.error
    assert result.output == "hi\n"
    assert result.replica == TOOL


def test_second_call_queues_behind_the_first_and_runtime_tracks_it():
    async def test(node):
        slow = Slow()
        node.rs.replicas[LM0].backend = slow
        node.submit(llm("first"))
        node.submit(llm("second"))
        await node.until(lambda: slow.started == ["first"])
        await asyncio.sleep(0.02)
        waiting = node.runtime(LM0)
        other = node.runtime(LM1)
        await node.until(lambda: "second" in node.results)
        return node.results, waiting, other, node.runtime(LM0), slow

    results, waiting, other, after, slow = serve(test)
    first, second = results["first"], results["second"]
    assert (waiting.queued, waiting.inflight, waiting.completed) == (1, 1, 0)
    assert (other.queued, other.inflight) == (0, 0)  # the other replica is independent
    assert slow.started == ["first", "second"]
    assert first.ok
    assert second.ok
    assert first.output == "done first"
    assert first.queue_s < 0.05
    assert SLOW_S * 0.9 <= first.latency_s < SLOW_S + 0.15
    assert SLOW_S * 0.9 <= second.latency_s < SLOW_S + 0.15
    assert second.queue_s == pytest.approx(first.latency_s, abs=0.05)
    assert (after.queued, after.inflight, after.completed, after.failed) == (0, 0, 2, 0)
    assert after.recent_latencies_s == [first.latency_s, second.latency_s]


def test_cancelling_a_queued_call_frees_it_without_a_result():
    async def test(node):
        slow = Slow()
        node.rs.replicas[LM0].backend = slow
        node.submit(llm("first"))
        node.submit(llm("second"))
        node.submit(llm("third"))
        await node.until(lambda: node.runtime(LM0).queued == 2)
        assert node.rs.cancel(["second", "no-such-call"]) == 1
        await node.until(lambda: node.runtime(LM0).queued == 1)
        mid = node.runtime(LM0)
        await node.until(lambda: "third" in node.results)
        await asyncio.sleep(0.02)
        return node.results, mid, node.runtime(LM0), slow

    results, mid, after, slow = serve(test)
    assert (mid.queued, mid.inflight) == (1, 1)
    assert set(results) == {"first", "third"}
    assert slow.started == ["first", "third"]
    # "third" waited for "first" only
    assert results["third"].queue_s < results["first"].latency_s + 0.1
    assert (after.queued, after.inflight, after.completed, after.failed) == (0, 0, 2, 0)


def test_cancelling_a_running_call_frees_its_slot_without_a_result():
    async def test(node):
        slow = Slow()
        node.rs.replicas[LM0].backend = slow
        node.submit(llm("first"))
        node.submit(llm("second"))
        await node.until(lambda: slow.started == ["first"])
        t0 = time.monotonic()
        assert node.rs.cancel(["first"]) == 1
        await node.until(lambda: "second" in node.results)
        return node.results, time.monotonic() - t0, node.runtime(LM0)

    results, took, after = serve(test)
    assert set(results) == {"second"}
    assert took < 2 * SLOW_S  # "second" did not wait for "first" to finish
    assert (after.queued, after.inflight, after.completed, after.failed) == (0, 0, 1, 0)


def test_dispatch_to_an_unknown_replica_fails():
    async def test(node):
        node.submit(llm("lost", "node/ghost#0"))
        await node.until(lambda: "lost" in node.results)
        return node.results["lost"]

    result = serve(test)
    assert not result.ok
    assert result.replica == "node/ghost#0"
    assert "no replica 'node/ghost#0'" in result.error
    assert (result.queue_s, result.latency_s) == (0.0, 0.0)


def test_a_raising_backend_fails_the_call_and_the_node_keeps_serving(caplog):
    async def test(node):
        node.rs.replicas[LM0].backend = Flaky()
        node.submit(llm("boom1"))
        await node.until(lambda: "boom1" in node.results)
        node.submit(llm("after"))
        node.submit(llm("elsewhere", LM1))
        await node.until(lambda: {"after", "elsewhere"} <= set(node.results))
        return node.results, node.runtime(LM0)

    results, rt = serve(test)
    assert not results["boom1"].ok
    assert results["boom1"].error == "RuntimeError: backend exploded"
    assert results["after"].ok
    assert results["after"].output == "fine"
    assert results["elsewhere"].ok
    assert (rt.queued, rt.inflight, rt.completed, rt.failed) == (0, 0, 1, 1)
    assert "backend exploded" in caplog.text


def test_close_cancels_calls_and_closes_backends():
    async def test(node):
        slow = Slow()
        node.rs.replicas[LM0].backend = slow
        node.submit(llm("first"))
        node.submit(llm("second"))
        await node.until(lambda: slow.started == ["first"])
        await node.rs.close()
        return node.results, slow, node.runtime(LM0)

    results, slow, rt = serve(test)
    assert results == {}
    assert slow.closed
    assert (rt.queued, rt.inflight, rt.completed) == (0, 0, 0)
