"""ReplicaSet: per-replica admission queues, timings, cancellation and failure isolation.

Time is the set's injected clock: a `SteppedClock` that moves only when a test advances it (slow
calls and start-up delays wait for the test, however slow the machine), or a `ManualClock` under
the emulated backend, whose steps then take no wall time. The timings asserted are therefore
exact, and waits for a state poll with a generous deadline instead of sleeping.
"""

import asyncio
import time

import msgspec
import psutil
import pytest

from swarmx.backends.base import BackendMetrics, CallOutcome, CallRequest
from swarmx.clock import ManualClock, SteppedClock
from swarmx.config import NodeConfig, ReplicaConfig
from swarmx.daemon import replicas as replicas_mod
from swarmx.daemon.replicas import ReplicaSet
from swarmx.protocol import Dispatch, ReplicaInfo, Result

LM0, LM1, TOOL = "node/lm#0", "node/lm#1", "node/tool"
SLOW_S = 0.2
WITHIN_S = 10.0
"""How long a wait polls before it fails: far beyond what any state change here takes."""


def node_config(tool_slots: int = 1, count: int = 2) -> NodeConfig:
    lm = ReplicaConfig(model="lm", backend="emulated", gpu="H100", concurrency=1, count=count)
    return NodeConfig(
        name="node", replicas=[lm], tool_slots=tool_slots, gpus="off", tool_commands=["echo"]
    )


def llm(call_id: str, replica: str = LM0, prompt: str = "hello", max_tokens: int = 4) -> Dispatch:
    return Dispatch(call_id, "wf", "step", replica, "llm", "lm", prompt, max_tokens)


class Slow:
    """A backend whose calls each take SLOW_S on the set's `SteppedClock`: one runs until the
    test advances the clock past its end, so the test decides when it finishes."""

    def __init__(self, clock: SteppedClock) -> None:
        self.clock = clock
        self.started: list[str] = []
        self.closed = False

    async def start(self) -> None:
        return None

    async def run(self, request: CallRequest) -> CallOutcome:
        self.started.append(request.call_id)  # and the sleep begins in the same step
        await self.clock.sleep(SLOW_S)
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

    def __init__(self, rs: ReplicaSet, clock) -> None:
        self.rs = rs
        self.clock = clock
        self.results: dict[str, Result] = {}

    async def reply(self, result: Result) -> None:
        assert result.call_id not in self.results, "one result per call"
        self.results[result.call_id] = result

    def submit(self, d: Dispatch) -> None:
        self.rs.submit(d, self.reply)

    def runtime(self, replica: str):
        [rt] = [r for r in self.rs.runtime() if r.replica == replica]
        return rt

    def slow(self, replica: str) -> Slow:
        """Put a `Slow` backend behind ``replica``."""
        slow = Slow(self.clock)
        self.rs.replicas[replica].backend = slow
        return slow

    async def until(self, predicate, within_s: float = WITHIN_S, jump: bool = False) -> None:
        """Poll until ``predicate()`` holds; fail after ``within_s`` of wall time. ``jump``: let
        virtual time run meanwhile (end each sleep on the `SteppedClock` as it comes)."""
        deadline = time.monotonic() + within_s
        while not predicate():
            assert time.monotonic() < deadline, "condition never held"
            if jump:
                self.clock.wake_next()
            await asyncio.sleep(0.005)

    async def settle(self) -> None:
        """Let every task that can run do so until it waits again (some loop iterations, not
        wall time): what a buggy set would do next has happened by the time this returns."""
        for _ in range(20):
            await asyncio.sleep(0)


def serve(test, cfg: NodeConfig | None = None, clock=None):
    """Run ``await test(node)`` on a started ReplicaSet, closing it afterwards; ``clock``: a
    `SteppedClock` unless given."""

    async def main():
        rs = ReplicaSet(cfg or node_config(), node_clock)
        await rs.start()
        try:
            return await test(Node(rs, node_clock))
        finally:
            await rs.close()

    node_clock = clock if clock is not None else SteppedClock()
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
    rs = ReplicaSet(node_config(), SteppedClock())
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

    result, rt = serve(test, clock=ManualClock())  # the emulated steps take no wall time
    assert result.ok, result.error
    assert result.replica == LM1
    assert result.queue_s == 0.0  # a free slot: no time passes before the call starts
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
        slow = node.slow(LM0)
        node.submit(llm("first"))
        node.submit(llm("second"))
        await node.until(lambda: slow.started == ["first"] and node.runtime(LM0).queued == 1)
        waiting = node.runtime(LM0)  # "first" cannot end before the clock moves
        other = node.runtime(LM1)
        node.clock.advance(SLOW_S)  # "first" ends; "second" gets the slot
        await node.until(lambda: slow.started == ["first", "second"])
        node.clock.advance(SLOW_S)
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
    assert first.queue_s == 0.0
    assert first.latency_s == pytest.approx(SLOW_S)
    assert second.latency_s == pytest.approx(SLOW_S)
    assert second.queue_s == pytest.approx(first.latency_s)  # it waited exactly for "first"
    assert (after.queued, after.inflight, after.completed, after.failed) == (0, 0, 2, 0)
    assert after.recent_latencies_s == [first.latency_s, second.latency_s]


def test_cancelling_a_queued_call_frees_it_without_a_result():
    async def test(node):
        slow = node.slow(LM0)
        node.submit(llm("first"))
        node.submit(llm("second"))
        node.submit(llm("third"))
        await node.until(lambda: node.runtime(LM0).queued == 2)
        assert node.rs.cancel(["second", "no-such-call"]) == 1
        await node.until(lambda: node.runtime(LM0).queued == 1)
        mid = node.runtime(LM0)
        node.clock.advance(SLOW_S)  # "first" ends
        await node.until(lambda: slow.started == ["first", "third"])
        node.clock.advance(SLOW_S)
        await node.until(lambda: not node.rs.running())  # every call ended: no result to come
        return node.results, mid, node.runtime(LM0), slow

    results, mid, after, slow = serve(test)
    assert (mid.queued, mid.inflight) == (1, 1)
    assert set(results) == {"first", "third"}
    assert slow.started == ["first", "third"]
    # "third" waited for "first" only
    assert results["third"].queue_s == pytest.approx(results["first"].latency_s)
    assert (after.queued, after.inflight, after.completed, after.failed) == (0, 0, 2, 0)


def test_cancelling_a_running_call_frees_its_slot_without_a_result():
    async def test(node):
        slow = node.slow(LM0)
        node.submit(llm("first"))
        node.submit(llm("second"))
        await node.until(lambda: slow.started == ["first"])
        assert node.rs.cancel(["first"]) == 1
        # the clock has not moved, so "first" never reached its end: "second" starts anyway
        await node.until(lambda: slow.started == ["first", "second"])
        node.clock.advance(SLOW_S)
        await node.until(lambda: "second" in node.results)
        return node.results, node.runtime(LM0)

    results, after = serve(test)
    assert set(results) == {"second"}
    assert results["second"].queue_s == 0.0  # "second" did not wait for "first" to finish
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
        node.rs.replicas[LM0].backend = Flaky(node.clock)
        node.submit(llm("boom1"))
        await node.until(lambda: "boom1" in node.results)
        node.submit(llm("after"))
        node.submit(llm("elsewhere", LM1))
        await node.until(lambda: {"after", "elsewhere"} <= set(node.results))
        return node.results, node.runtime(LM0)

    results, rt = serve(test, clock=ManualClock())
    assert not results["boom1"].ok
    assert results["boom1"].error == "RuntimeError: backend exploded"
    assert results["after"].ok
    assert results["after"].output == "fine"
    assert results["elsewhere"].ok
    assert (rt.queued, rt.inflight, rt.completed, rt.failed) == (0, 0, 1, 1)
    assert "backend exploded" in caplog.text


def test_close_cancels_calls_and_closes_backends():
    async def test(node):
        slow = node.slow(LM0)
        node.submit(llm("first"))
        node.submit(llm("second"))
        await node.until(lambda: slow.started == ["first"])
        await node.rs.close()
        return node.results, slow, node.runtime(LM0)

    results, slow, rt = serve(test)
    assert results == {}
    assert slow.closed
    assert (rt.queued, rt.inflight, rt.completed) == (0, 0, 0)


# --- scaling ------------------------------------------------------------------------------------


def scalable_config(count: int = 1, max_count: int | None = 3, delay_s: float = 0.0) -> NodeConfig:
    lm = ReplicaConfig(
        model="lm",
        backend="emulated",
        gpu="H100",
        concurrency=1,
        count=count,
        max_count=max_count,
        startup_delay_s=delay_s,
    )
    return NodeConfig(name="node", replicas=[lm], tool_slots=0, gpus="off")


def serve_scaling(test, cfg: NodeConfig, confirm_drain=None):
    """Like `serve` (on a `SteppedClock`), counting the replica-list changes the set announces."""

    async def main():
        changes = []

        async def changed():
            changes.append([(i.replica, i.draining) for i in rs.infos()])

        rs = ReplicaSet(cfg, clock, on_change=changed, confirm_drain=confirm_drain)
        await rs.start()
        try:
            return await test(Node(rs, clock), changes)
        finally:
            await rs.close()

    clock = SteppedClock()
    return asyncio.run(main())


def test_pools_describe_what_the_node_can_scale():
    async def test(node, changes):
        return node.rs.pools()

    [pool] = serve_scaling(test, scalable_config(count=2, max_count=None))
    assert (pool.model, pool.backend, pool.device, pool.concurrency) == (
        "lm",
        "emulated",
        "emulated:H100",
        1,
    )
    assert (pool.declared, pool.max_count, pool.target) == (2, 8, 2)  # max_count: 4 x count


def test_scale_up_announces_a_new_replica_only_once_it_is_ready():
    async def test(node, changes):
        detail = node.rs.scale("lm", "emulated", 3)
        starting = ([i.replica for i in node.rs.infos()], node.rs.pools()[0].target)
        await node.until(lambda: node.clock.sleepers == 2)  # both in their start-up delay
        not_yet = [i.replica for i in node.rs.infos()]
        node.clock.advance(0.3)
        await node.until(lambda: len(changes) == 2)
        node.submit(llm("c1", "node/lm#2"))
        await node.until(lambda: "c1" in node.results, jump=True)  # emulated steps: virtual
        return detail, starting, not_yet, changes, node.results["c1"], node.rs.pools()[0]

    detail, starting, not_yet, changes, result, pool = serve_scaling(
        test, scalable_config(delay_s=0.3)
    )
    assert detail == "starting node/lm#1, node/lm#2"
    assert starting == (["node/lm#0"], 3)  # counted as starting, not listed
    assert not_yet == ["node/lm#0"]  # the start-up delay holds the announcement back
    assert sorted(changes[-1]) == [("node/lm#0", False), ("node/lm#1", False), ("node/lm#2", False)]
    assert result.ok, result.error
    assert pool.target == 3


async def two_replicas_one_busy(node, busy: str) -> Slow:
    """Scale to two replicas and keep ``busy`` serving a slow call (until the clock moves)."""
    node.rs.scale("lm", "emulated", 2)
    await node.until(lambda: len(node.rs.infos()) == 2)
    slow = node.slow(busy)
    node.submit(llm("busy", busy))
    await node.until(lambda: slow.started == ["busy"])
    return slow


def test_scale_down_drains_the_named_replica_before_closing_it():
    async def test(node, changes):
        slow = await two_replicas_one_busy(node, LM1)
        changes.clear()
        detail = node.rs.scale("lm", "emulated", 1, remove=[LM1])
        during = [(i.replica, i.draining) for i in node.rs.infos()]
        target = node.rs.pools()[0].target
        node.clock.advance(SLOW_S)  # its call ends
        await node.until(lambda: changes)
        return detail, during, target, changes, node.results, slow

    detail, during, target, changes, results, slow = serve_scaling(test, scalable_config())
    assert detail == f"draining {LM1} (1 calls left)"
    assert during == [(LM0, False), (LM1, True)]  # still listed, marked, while its call runs
    assert target == 1
    assert results["busy"].ok  # the call in flight finished: nothing lost
    assert slow.closed
    assert changes == [[(LM0, False)]]  # announced once it closed


def test_scale_down_cancels_replicas_still_starting_first():
    async def test(node, changes):
        node.rs.scale("lm", "emulated", 3)
        detail = node.rs.scale("lm", "emulated", 2)
        await node.until(lambda: node.clock.sleepers == 1)  # lm#1 in its start-up delay
        node.clock.advance(0.2)
        await node.until(lambda: changes)  # lm#1 is ready
        return detail, [i.replica for i in node.rs.infos()], node.rs.pools()[0].target

    detail, listed, target = serve_scaling(test, scalable_config(delay_s=0.2))
    assert detail == "cancelled node/lm#2"
    assert listed == [LM0, LM1]
    assert target == 2


def test_scale_down_without_names_drains_the_least_busy():
    async def test(node, changes):
        await two_replicas_one_busy(node, LM0)
        detail = node.rs.scale("lm", "emulated", 1)
        await node.until(lambda: len(node.rs.infos()) == 1)
        return detail, [i.replica for i in node.rs.infos()]

    detail, listed = serve_scaling(test, scalable_config())
    assert detail == f"draining {LM1} (0 calls left)"
    assert listed == [LM0]


def test_a_drained_replica_stays_open_for_calls_until_the_drain_is_confirmed():
    """The node picked the replica itself (no names): calls the scheduler routed to it before it
    heard of the drain still arrive, and must find it open, however idle it was."""
    confirms = []

    def confirm_drain():
        confirms.append(asyncio.get_running_loop().create_future())
        return confirms[-1]

    async def test(node, changes):
        await two_replicas_one_busy(node, LM0)
        changes.clear()
        detail = node.rs.scale("lm", "emulated", 1)
        await node.settle()  # room for the drain to close the idle replica, were it to
        idle_but_unconfirmed = [(i.replica, i.draining) for i in node.rs.infos()]
        late = node.slow(LM1)
        node.submit(llm("late", LM1))  # routed before the scheduler saw the mark
        await node.until(lambda: late.started == ["late"])
        confirms[0].set_result(None)
        node.clock.advance(SLOW_S)  # "late" ends (and the busy call on LM0)
        await node.until(lambda: changes)
        return detail, idle_but_unconfirmed, node.results, late, changes

    detail, unconfirmed, results, late, changes = serve_scaling(
        test, scalable_config(), confirm_drain
    )
    assert detail == f"draining {LM1} (0 calls left)"
    assert len(confirms) == 1
    assert unconfirmed == [(LM0, False), (LM1, True)]  # idle, yet kept open
    assert results["late"].ok, results["late"].error  # not "no replica": nothing re-run
    assert late.closed
    assert changes == [[(LM0, False)]]  # closed once confirmed and its call was done


@pytest.mark.parametrize(
    ("model", "backend", "target", "code", "message"),
    [
        ("gpt", "emulated", 1, "unknown_model", "declares no emulated replicas of 'gpt'"),
        ("lm", "torch", 1, "unknown_model", "scalable here: lm (emulated)"),
        ("lm", "emulated", 4, "out_of_range", "target 4 outside 0..3 (max_count)"),
        ("lm", "emulated", -1, "out_of_range", "target -1 outside 0..3"),
    ],
)
def test_scale_commands_the_node_cannot_carry_out_are_refused(
    model, backend, target, code, message
):
    async def test(node, changes):
        with pytest.raises(replicas_mod.ScaleError) as info:
            node.rs.scale(model, backend, target)
        return info.value

    err = serve_scaling(test, scalable_config())
    assert err.code == code
    assert message in str(err)


def test_a_replica_that_fails_to_start_lowers_the_target(monkeypatch):
    real = replicas_mod.make_backend
    made = []

    def make(cfg, clock):
        made.append(cfg.model)
        if len(made) > 1:
            raise RuntimeError("out of memory")
        return real(cfg, clock)

    monkeypatch.setattr(replicas_mod, "make_backend", make)

    async def test(node, changes):
        node.rs.scale("lm", "emulated", 2)
        await node.until(lambda: changes)
        return node.rs.pools()[0].target, [i.replica for i in node.rs.infos()]

    assert serve_scaling(test, scalable_config()) == (1, [LM0])


def test_the_torch_backend_scales_too():
    lm = ReplicaConfig(model="tiny", backend="torch", concurrency=1, max_count=2)
    cfg = NodeConfig(name="node", replicas=[lm], tool_slots=0, gpus="off")

    async def test(node, changes):
        node.rs.scale("tiny", "torch", 2)
        await node.until(lambda: changes, within_s=60)
        node.submit(Dispatch("c1", "wf", "s", "node/tiny#1", "llm", "tiny", "hello", 4))
        await node.until(lambda: "c1" in node.results, within_s=60)
        node.rs.scale("tiny", "torch", 1, remove=["node/tiny#1"])
        await node.until(lambda: len(changes) == 2, within_s=60)
        return node.results["c1"], [i.replica for i in node.rs.infos()]

    result, listed = serve_scaling(test, cfg)
    assert result.ok, result.error
    assert listed == ["node/tiny#0"]


def test_a_node_knows_which_calls_it_runs_and_which_ended():
    async def test(node):
        slow = node.slow(LM0)
        node.submit(llm("c1"))
        node.submit(llm("c2"))
        await node.until(lambda: slow.started == ["c1"])
        running = node.rs.running()
        seen = node.rs.seen("c1"), node.rs.seen("nope")
        node.rs.cancel(["c2"])
        node.clock.advance(SLOW_S)
        await node.until(lambda: "c1" in node.results)
        await node.until(lambda: node.rs.seen("c2") == "ended")
        return running, seen, node.rs.seen("c1"), node.rs.seen("c2"), node.rs.running()

    running, seen, c1, c2, after = serve(test)
    assert running == {"c1": LM0, "c2": LM0}
    assert seen == ("running", None)
    assert (c1, c2) == ("ended", "ended")  # a cancelled id is not run again either
    assert after == {}


def test_a_streamed_calls_chunks_leave_at_once_until_its_first_token_then_together() -> None:
    """A role-only chunk and the first token go at once (the time to first token); later ones
    share a frame per window, and the call's end sends what is left without waiting for it."""
    role = '{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    token = '{"choices":[{"index":0,"delta":{"content": "%s"}}]}'

    async def main() -> list[list[str]]:
        frames: list[list[str]] = []

        async def send(chunk: replicas_mod.Chunk) -> bool:
            frames.append(list(chunk.data))
            return True

        stream = replicas_mod._Stream("c1", send)
        stream.put(role)
        await asyncio.sleep(0)  # the frame's task runs
        stream.put(token % "a")
        await asyncio.sleep(0)
        assert frames == [[role], [token % "a"]]
        stream.put(token % "b")
        stream.put(token % "c")
        await asyncio.sleep(0)
        assert len(frames) == 2  # waiting for the window
        await stream.drain()
        return frames

    assert asyncio.run(main())[2:] == [[token % "b", token % "c"]]


def test_a_chunk_frame_the_transport_refuses_goes_again_in_order() -> None:
    """No connection for a moment: the frame is sent again, the chunks put meanwhile with it,
    and nothing is lost or reordered."""

    async def main() -> tuple[list[list[str]], int]:
        frames: list[list[str]] = []
        refusals = [True, True]  # the first two tries fail

        async def send(chunk: replicas_mod.Chunk) -> bool:
            if refusals:
                refusals.pop()
                return False
            frames.append(list(chunk.data))
            return True

        stream = replicas_mod._Stream("c1", send)
        stream.put('{"choices":[{"delta":{"content":"a"}}]}')
        await asyncio.sleep(0)
        stream.put('{"choices":[{"delta":{"content":"b"}}]}')
        await stream.drain()
        return frames, stream.lost

    frames, lost = asyncio.run(main())
    assert [c for frame in frames for c in frame] == [
        '{"choices":[{"delta":{"content":"a"}}]}',
        '{"choices":[{"delta":{"content":"b"}}]}',
    ]
    assert lost == 0


def test_chunks_the_transport_never_takes_are_lost_and_the_call_fails():
    """A scheduler out of reach for longer than `CHUNK_GIVE_UP_S`: the stream gives up on
    those chunks and every later one (a stream with a hole is worth nothing), and the call's
    result says it failed, so the client gets an error instead of text with a hole."""
    clock = ManualClock()

    async def test(node):
        async def refuse(chunk: replicas_mod.Chunk) -> bool:
            clock.now += 1.0  # each try takes a second of the scheduler's absence
            return False

        node.rs.submit(msgspec.structs.replace(llm("c1", LM1), api="chat"), node.reply, refuse)
        await node.until(lambda: "c1" in node.results)
        return node.results["c1"]

    result = serve(test, clock=clock)
    assert not result.ok
    assert "streamed chunks could not reach the scheduler" in result.error
