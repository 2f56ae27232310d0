"""NodeAgent: a replica the node drains is closed only once the scheduler has heard of it."""

import asyncio
import contextlib
import types
from concurrent.futures import ThreadPoolExecutor

from swarmx.clock import RealClock
from swarmx.config import NodeConfig, ReplicaConfig
from swarmx.daemon.node import NodeAgent
from swarmx.protocol import (
    Ack,
    Dispatch,
    Envelope,
    Heartbeat,
    Hello,
    Message,
    Result,
    ScaleCommand,
    Telemetry,
)

LM0, LM1 = "node/lm#0", "node/lm#1"


class Channel:
    """Records what the agent sends, numbered as a real channel numbers it."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.sent: list[tuple[int, Message]] = []
        self.drop_hellos = 0
        """The next this many hellos are not sent (no peer, queue full)."""
        self.stats = types.SimpleNamespace(unsent=0, dropped={})

    async def send(self, body: Message) -> int | None:
        self.last_seq += 1
        if isinstance(body, Hello) and self.drop_hellos > 0:
            self.drop_hellos -= 1
            return None
        self.sent.append((self.last_seq, body))
        return self.last_seq

    def hellos(self) -> list[tuple[int, list[tuple[str, bool]]]]:
        return [
            (seq, [(i.replica, i.draining) for i in b.replicas])
            for seq, b in self.sent
            if isinstance(b, Hello)
        ]

    def results(self) -> list[Result]:
        return [b for _, b in self.sent if isinstance(b, Result)]


def envelope(body: Message, seq: int = 1) -> Envelope:
    return Envelope("scheduler", seq, 0.0, body)


async def until(predicate, within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run_agent(test, telemetry_interval_s: float = 1.0):
    """A registered agent serving two idle emulated replicas of `lm`, on a recording channel."""

    async def main():
        lm = ReplicaConfig(
            model="lm", backend="emulated", gpu="H100", concurrency=1, count=2, max_count=2
        )
        cfg = NodeConfig(
            name="node",
            replicas=[lm],
            tool_slots=0,
            gpus="off",
            heartbeat_interval_s=0.05,
            telemetry_interval_s=telemetry_interval_s,
        )
        agent = NodeAgent(cfg, RealClock())
        await agent.replicas.start()
        channel = Channel()
        agent._channel = channel  # type: ignore[assignment]
        agent._hello_base = agent._hello()
        agent.registered = True
        try:
            return await test(agent, channel)
        finally:
            await agent.replicas.close()

    return asyncio.run(main())


def test_a_replica_the_node_picks_to_drain_serves_calls_routed_before_the_scheduler_knew():
    """The scheduler asked for one replica fewer without naming one (it meant to cancel one still
    starting, which the node had just made ready): the node drains idle #1 and says so in a hello,
    but calls the scheduler routed to #1 before reading that hello are on their way; #1 runs them
    and closes only after the scheduler has acknowledged the hello."""

    async def test(agent, channel):
        await agent._on_scale(envelope(ScaleCommand("lm", "emulated", 1, "down", [])))
        [(announced, replicas)] = channel.hellos()
        await asyncio.sleep(0.1)
        still_open = [(i.replica, i.draining) for i in agent.replicas.infos()]
        await agent._on_dispatch(envelope(Dispatch("c1", "wf", "s", LM1, "llm", "lm", "hi", 4)))
        await until(channel.results)
        await agent._on_ack(envelope(Ack(announced - 1)))  # an older frame's ack changes nothing
        await asyncio.sleep(0.1)
        unacked = [i.replica for i in agent.replicas.infos()]
        await agent._on_ack(envelope(Ack(announced, "registered")))
        await until(lambda: len(channel.hellos()) == 2)
        return replicas, still_open, channel.results(), unacked, channel.hellos()[-1][1]

    replicas, still_open, results, unacked, last = run_agent(test)
    assert replicas == [(LM0, False), (LM1, True)]  # the scheduler is told at once
    assert still_open == [(LM0, False), (LM1, True)]  # idle, but not acknowledged yet
    assert [(r.call_id, r.replica, r.ok, r.error) for r in results] == [("c1", LM1, True, "")]
    assert unacked == [LM0, LM1]
    assert last == [(LM0, False)]  # then it closed, and says so


def test_a_drain_the_scheduler_acknowledged_closes_the_idle_replica_at_once():
    async def test(agent, channel):
        await agent._on_scale(envelope(ScaleCommand("lm", "emulated", 1, "down", [LM1])))
        [(announced, _)] = channel.hellos()
        await agent._on_ack(envelope(Ack(announced, "registered")))
        await until(lambda: len(channel.hellos()) == 2)
        return channel.hellos()[-1][1], channel.results()

    last, results = run_agent(test)
    assert last == [(LM0, False)]
    assert results == []


def beats_sent(telemetry_interval_s: float) -> list[Heartbeat]:
    async def test(agent, channel):
        beats = asyncio.create_task(agent._heartbeats(channel, ThreadPoolExecutor(1)))
        try:
            await until(lambda: sum(isinstance(b, Heartbeat) for _, b in channel.sent) >= 2)
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        return [b for _, b in channel.sent if isinstance(b, Heartbeat | Telemetry)]

    return run_agent(test, telemetry_interval_s)


def test_heartbeats_carry_the_telemetry_when_both_share_an_interval():
    sent = beats_sent(telemetry_interval_s=0.05)
    assert all(isinstance(b, Heartbeat) for b in sent)
    assert all(b.telemetry is not None for b in sent)
    runtime = sent[-1].telemetry.replicas
    assert sorted(r.replica for r in runtime) == [LM0, LM1]


def test_heartbeats_are_bare_when_telemetry_has_its_own_interval():
    assert all(b.telemetry is None for b in beats_sent(telemetry_interval_s=1.0))


def test_a_drain_whose_hello_was_not_sent_sends_it_again_with_the_heartbeats():
    async def test(agent, channel):
        channel.drop_hellos = 1
        await agent._on_scale(envelope(ScaleCommand("lm", "emulated", 1, "down", [LM1])))
        assert channel.hellos() == []
        beats = asyncio.create_task(agent._heartbeats(channel, ThreadPoolExecutor(1)))
        try:
            await until(channel.hellos)
            [(resent, replicas)] = channel.hellos()
            await agent._on_ack(envelope(Ack(resent, "registered")))
            await until(lambda: [i.replica for i in agent.replicas.infos()] == [LM0])
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        return replicas

    assert run_agent(test) == [(LM0, False), (LM1, True)]
