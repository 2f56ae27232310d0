"""Gateway calls inside the scheduler: refusals, sessions, deadlines, relayed chunks, aborts and
how each call ends, on the real workflow service and dispatcher (`Cluster`: one node, one
replica of ``lm``) with a hand-driven clock; what the scheduler answers each gateway is recorded.
The real-process version is tests/integration/test_gateway.py."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from swarmx.daemon.features import SessionInfo
from swarmx.daemon.gatewaycalls import MAX_ATTEMPTS, RETRY_AFTER_S, ForeignChunk, GatewayCalls
from swarmx.daemon.limits import Capacity
from swarmx.daemon.workflows import CALL_GRACE_S, WorkflowService
from swarmx.models.online import OnlineLearner
from swarmx.models.query import SessionContext
from swarmx.protocol import (
    AbortCall,
    CallEnded,
    Chunk,
    GatewayCall,
    Hello,
    Message,
    ReplicaInfo,
    ReplicaPool,
    Result,
)
from swarmx.sched.dispatch import Assign, Ticket
from swarmx.sched.router import LeastOutstanding
from tests.unit.daemon.test_deadlines import Cluster

T = TypeVar("T")
GW = b"gw-1"
"""The connection id of the gateway most tests speak for."""


def run(main: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(main)


def call(call_id: str = "1", **fields: Any) -> GatewayCall:
    """A chat call for ``lm`` as a gateway sends it; ``fields`` override the defaults."""
    base: dict[str, Any] = {
        "call_id": call_id,
        "session": "",
        "client": "",
        "model": "lm",
        "api": "chat",
        "body": '{"messages": [{"role": "user", "content": "hi"}]}',
        "prompt": "user: hi",
    }
    return GatewayCall(**(base | fields))


class Gateways(Cluster):
    """`Cluster` with the scheduler's gateway calls on it, and the frames it sent back."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        super().__init__(tmp_path)
        self.replies: list[tuple[bytes, Message]] = []
        self.calls = GatewayCalls(self.service, self.reply, self.clock, **options)

    async def reply(self, peer: bytes, msg: Message) -> bool:
        self.replies.append((peer, msg))
        return True

    async def send_call(self, msg: GatewayCall, peer: bytes = GW) -> None:
        await self.calls.on_call(peer, msg)

    def park(self) -> None:
        """Calls for ``lm`` wait in the queue: its replica takes none, and the node says it can
        start more (so they are not refused as having no replica)."""
        pool = ReplicaPool("lm", "emulated", "emulated:H100", 8, 1, max_count=4, target=1)
        self.service.pools.announce("n", [pool])
        self.service.dispatcher.set_live("n/lm#0", False, self.clock.time())

    def ended(self) -> list[CallEnded]:
        return [m for _, m in self.replies if isinstance(m, CallEnded)]

    def ours(self, n: int = -1) -> str:
        """Our id of the ``n``-th call queued (the gateway's id is the gateway's)."""
        ticket: Ticket = self.tickets[n]
        return ticket.call.call_id


# --- refusals ---------------------------------------------------------------------------------


def test_a_model_whose_replicas_take_no_calls_is_answered_503_at_once(tmp_path: Path) -> None:
    """Its node is stale and no node can start one: queueing would only end at the timeout."""

    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.service.on_node_state("n", "stale")
        await g.send_call(call("7"))
        await g.service.on_node_state("n", "live")
        await g.send_call(call("8"))
        return g

    g = run(main())
    [ended] = g.ended()
    assert (ended.call_id, ended.status, ended.retry_after_s) == ("7", 503, RETRY_AFTER_S)
    assert "no replica of 'lm'" in ended.error
    assert g.calls.refused == {"no_replica": 1}
    assert [t.call.call_id for t in g.tickets] == [g.ours()]  # call 8 queued as usual


def test_a_call_for_a_model_no_one_serves_is_answered_404_naming_the_served_ones(
    tmp_path: Path,
) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("7", model="gpt-9", session="s"))
        return g

    g = run(main())
    [(peer, ended)] = g.replies
    assert peer == GW and isinstance(ended, CallEnded)
    assert (ended.call_id, ended.ok, ended.status) == ("7", False, 404)
    assert "'gpt-9'" in ended.error and "served: lm" in ended.error
    assert ended.retry_after_s is None
    assert g.calls.refused == {"model": 1}
    assert g.tickets == [] and g.calls.sessions == 0 and g.service.sessions == {}


def test_the_tool_runners_pool_is_not_a_model_a_gateway_call_can_name(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        infos = [
            ReplicaInfo("n/lm#0", "lm", "emulated", "emulated:H100", 8),
            ReplicaInfo("n/tool", "tool", "tool", "cpu", 4),
        ]
        hello = Hello("n", "h", 1, "0", 2, 1, 1 << 30, [], infos, 1.0, 1.0, 0.0)
        g.nodes.register(hello, b"n", g.clock.monotonic(), g.clock.time())
        await g.service.on_hello(hello)
        await g.send_call(call("1", model="tool"))
        await g.send_call(call("2", model="gpt-9"))
        return g

    g = run(main())
    assert g.sent == []
    assert [e.status for e in g.ended()] == [404, 404]
    assert "served: lm)" in g.ended()[1].error


def test_a_client_over_its_quota_gets_429_until_one_of_its_calls_ends(tmp_path: Path) -> None:
    async def main() -> tuple[Gateways, list[int]]:
        g = Gateways(tmp_path, max_calls_per_client=2)
        await g.start()
        await g.send_call(call("1", client="alice"))
        await g.send_call(call("2", client="alice"))
        await g.send_call(call("3", client="alice"))  # one too many
        await g.send_call(call("4", client="bob"))  # another client's quota
        await g.send_call(call("5"))  # anonymous callers share one
        ended_before = len(g.ended())
        await g.finish(g.sent[0].call_id)
        await g.send_call(call("6", client="alice"))
        return g, [len(g.sent), ended_before]

    g, (dispatched, ended_before) = run(main())
    assert ended_before == 1
    refused = g.ended()[0]
    assert (refused.call_id, refused.ok, refused.status) == ("3", False, 429)
    assert refused.retry_after_s == RETRY_AFTER_S
    assert "'alice'" in refused.error and "2 calls" in refused.error
    assert g.calls.refused == {"quota": 1}
    assert dispatched == 5  # 1, 2, 4, 5 and, once 1 ended, 6
    assert [e.status for e in g.ended()] == [429, 200]


def test_a_full_scheduler_answers_429_overloaded(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        g.service.capacity = Capacity(max_queued_calls=1)
        await g.start()
        for i in range(8):  # the replica's 8 slots
            await g.send_call(call(str(i)))
        await g.send_call(call("queued"))
        await g.send_call(call("refused"))
        return g

    g = run(main())
    assert len(g.sent) == 8 and g.service.dispatcher.queued() == 1
    [ended] = g.ended()
    assert (ended.call_id, ended.status, ended.retry_after_s) == ("refused", 429, RETRY_AFTER_S)
    assert "the scheduler is full" in ended.error
    assert g.calls.refused == {"overloaded": 1}
    assert g.service.faults.overloaded == 1
    assert g.calls.in_flight == 9


# --- calls, sessions and their deadlines ------------------------------------------------------


def test_a_call_is_queued_as_a_turn_of_its_session_with_the_request_for_the_engine(
    tmp_path: Path,
) -> None:
    body = '{"prompt": "def f():", "temperature": 0}'

    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        msg = call(
            "9",
            session="agent-1",
            client="alice",
            api="completions",
            body=body,
            prompt="def f():",
            max_tokens=16,
            input_kinds=["tool_result"],
            timeout_s=30.0,
        )
        await g.send_call(msg)
        return g

    g = run(main())
    [ticket] = g.tickets
    c = ticket.call
    sid = c.workflow_id
    assert sid.startswith("ses-") and c.call_id == f"{sid}:turn-1" and c.step_id == "turn-1"
    assert (c.kind, c.model, c.prompt, c.max_tokens, c.timeout_s) == (
        "llm",
        "lm",
        "def f():",
        16,
        30.0,
    )
    assert (c.api, c.body, c.input_kinds) == ("completions", body, ["tool_result"])
    assert ticket.arrived_s == g.clock.time()
    assert (ticket.deadline_s, ticket.slack_s) == (None, None)
    # the client's name goes first, so two clients' "agent-1" are two histories
    now = g.clock.time()
    assert g.service.sessions == {
        sid: SessionInfo("alice/agent-1", "gateway", None, now, None, calls_done=0, calls_open=1)
    }
    [dispatch] = g.sent
    assert (dispatch.call_id, dispatch.api, dispatch.body) == (c.call_id, "completions", body)
    assert g.replies == [] and g.calls.in_flight == 1 and g.calls.sessions == 1


def test_calls_of_one_session_share_its_id_and_count_turns_per_client(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1", session="s", client="alice"))
        await g.finish(g.sent[-1].call_id)
        await g.send_call(call("2", session="s", client="alice"))
        await g.send_call(call("3", session="s", client="bob"))  # bob's own "s"
        await g.send_call(call("4", session="s", client="alice"))  # while 2 still runs
        return g

    g = run(main())
    ids = [(t.call.workflow_id, t.call.step_id) for t in g.tickets]
    alice, bob = ids[0][0], ids[2][0]
    assert ids == [(alice, "turn-1"), (alice, "turn-2"), (bob, "turn-1"), (alice, "turn-3")]
    assert alice != bob
    assert g.calls.sessions == 2
    assert (g.service.sessions[alice].key, g.service.sessions[bob].key) == ("alice/s", "bob/s")


def test_a_call_of_no_session_is_a_session_of_one_call_forgotten_when_it_ends(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[Gateways, bool]:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1"))
        await g.send_call(call("2"))
        open_ = {t.call.workflow_id for t in g.tickets} <= set(g.service.sessions)
        await g.finish(g.ours(0))
        return g, open_

    g, open_ = run(main())
    first, second = (t.call.workflow_id for t in g.tickets)
    assert open_ and first != second and first.startswith("call-")
    assert [t.call.step_id for t in g.tickets] == ["turn-1", "turn-1"]
    assert first not in g.service.sessions and second in g.service.sessions
    assert g.service.features.turn(first) == 0  # its features are gone too
    assert g.calls.sessions == 0  # sessions of one call are not kept for later calls
    [ended] = g.ended()
    assert (ended.call_id, ended.ok, ended.status) == ("1", True, 200)
    assert (ended.prompt_tokens, ended.output_tokens, ended.replica) == (3, 3, "n/lm#0")


def test_the_slo_of_a_sessions_first_call_is_its_deadline_and_priority_takes_slack(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[Gateways, float]:
        g = Gateways(tmp_path)
        await g.start()
        start = g.clock.time()
        await g.send_call(call("1", session="s", slo_s=30.0))
        g.clock.now += 5
        await g.send_call(call("2", session="s"))
        await g.send_call(call("3", session="s", slo_s=60.0, priority=7))  # the first one holds
        await g.send_call(call("4", slo_s=30.0, priority=-3))  # no session: its own deadline
        return g, start

    g, start = run(main())
    first, second, third, alone = g.tickets
    assert first.deadline_s == second.deadline_s == third.deadline_s == start + 30
    assert first.slack_s == pytest.approx(30)
    assert second.slack_s == pytest.approx(25)  # 5 s later
    assert third.slack_s == pytest.approx(25 - 7)  # and 7 s less for its priority
    assert alone.deadline_s == start + 5 + 30 and alone.slack_s == pytest.approx(33)
    assert g.service.sessions[first.call.workflow_id].slo_s == 30.0


def test_a_session_given_an_slo_after_its_first_call_counts_it_from_its_first_call(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[Gateways, float]:
        g = Gateways(tmp_path)
        await g.start()
        start = g.clock.time()
        await g.send_call(call("1", session="s", priority=9))  # no deadline: priority unused
        g.clock.now += 5
        await g.send_call(call("2", session="s", slo_s=30.0))
        return g, start

    g, start = run(main())
    first, second = g.tickets
    assert (first.deadline_s, first.slack_s) == (None, None)
    assert second.deadline_s == start + 30 and second.slack_s == pytest.approx(25)
    assert g.service.sessions[second.call.workflow_id].slo_s == 30.0


def test_a_call_the_gateway_sends_again_is_not_run_twice(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1", session="s"))
        await g.send_call(call("1", session="s"))  # resent
        await g.send_call(call("1", session="s"), peer=b"gw-2")  # another gateway's call 1
        return g

    g = run(main())
    assert len(g.tickets) == 2 and g.calls.in_flight == 2
    assert [t.call.step_id for t in g.tickets] == ["turn-1", "turn-2"]
    assert g.replies == []


# --- output, aborts, endings ------------------------------------------------------------------


def test_chunks_go_to_the_gateway_that_waits_under_its_own_call_id(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1"))
        await g.send_call(call("1"), peer=b"gw-2")
        await g.calls.on_chunk("n", Chunk(g.ours(1), ["b1"]))
        await g.calls.on_chunk("n", Chunk(g.ours(0), ["a1", "a2"]))
        await g.calls.on_chunk("n", Chunk("call-gone:turn-1", ["x"]))  # ended: dropped
        return g

    g = run(main())
    assert g.replies == [(b"gw-2", Chunk("1", ["b1"])), (GW, Chunk("1", ["a1", "a2"]))]
    assert g.calls.relayed_chunks == 3


def test_a_chunk_from_a_node_the_call_was_not_sent_to_is_refused(tmp_path: Path) -> None:
    async def main() -> tuple[Gateways, list[str]]:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1"))
        errors = []
        with pytest.raises(ForeignChunk) as exc:
            await g.calls.on_chunk("m", Chunk(g.ours(), ["stolen"]))
        errors.append(str(exc.value))
        g.park()
        await g.send_call(call("2"))  # queued: sent nowhere yet
        with pytest.raises(ForeignChunk):
            await g.calls.on_chunk("n", Chunk(g.ours(), ["early"]))
        return g, errors

    g, [error] = run(main())
    assert error == f"call {g.ours(0)} was not sent to node m"
    assert g.replies == [] and g.calls.relayed_chunks == 0


def test_an_aborted_call_is_cancelled_and_its_late_output_goes_nowhere(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1", client="alice"))
        ours = g.ours()
        await g.calls.on_abort(GW, AbortCall("1"))
        await g.calls.on_abort(GW, AbortCall("1"))  # again: nothing left to stop
        await g.calls.on_abort(GW, AbortCall("unknown"))
        await g.calls.on_chunk("n", Chunk(ours, ["late"]))
        await g.finish(ours)
        return g

    g = run(main())
    ours = g.tickets[0].call.call_id
    assert g.cancelled == [ours]
    assert g.service.dispatched_to(ours) is None
    view = g.service.dispatcher.view("n/lm#0")
    assert view is not None and view.outstanding == 0
    assert g.service.faults.results_dropped["late"] == 1
    assert g.replies == [] and g.calls.in_flight == 0 and g.calls.relayed_chunks == 0
    assert g.service.sessions == {}


def test_an_aborted_call_still_queued_leaves_the_queue(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        g.park()
        await g.send_call(call("1"))
        await g.calls.on_abort(GW, AbortCall("1"))
        g.service.dispatcher.set_live("n/lm#0", True, g.clock.time())
        return g

    g = run(main())
    assert g.service.dispatcher.queued() == 0 and g.sent == [] and g.cancelled == []
    assert g.replies == [] and g.calls.in_flight == 0


def test_an_aborted_queued_call_leaves_nothing_behind_in_the_service(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        g.park()
        await g.send_call(call("1"))
        await g.calls.on_abort(GW, AbortCall("1"))
        return g

    g = run(main())
    assert g.ours() not in g.service._ready_ts


def test_an_engine_failure_ends_the_call_with_502_and_its_message(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1"))
        failed = Result(g.ours(), "n/lm#0", False, "", "CUDA out of memory", 0.0, 1.0, None, 5, 0)
        await g.service.on_result("n", failed)
        return g

    g = run(main())
    [ended] = g.ended()
    assert (ended.call_id, ended.ok, ended.status, ended.error) == (
        "1",
        False,
        502,
        "CUDA out of memory",
    )
    assert (ended.prompt_tokens, ended.output_tokens, ended.replica) == (5, 0, "n/lm#0")
    assert len(g.sent) == 1  # not re-run: its client is told


async def second_node(g: Gateways) -> None:
    """Node ``m`` with replica ``m/lm#0`` beside ``n``."""
    infos = [ReplicaInfo("m/lm#0", "lm", "emulated", "emulated:H100", 8)]
    hello = Hello("m", "h2", 2, "0", 2, 1, 1 << 30, [], infos, 1.0, 1.0, 0.0)
    g.nodes.register(hello, b"m", g.clock.monotonic(), g.clock.time())
    await g.service.on_hello(hello)


def test_a_call_lost_before_any_output_runs_again_elsewhere_unseen(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1", session="s"))
        await second_node(g)
        first = g.sent[-1]
        await g.service.on_node_state(first.replica.partition("/")[0], "down")
        await g.service.on_node_down(first.replica.partition("/")[0])
        again = g.sent[-1]
        await g.calls.on_chunk(again.replica.partition("/")[0], Chunk(again.call_id, ["x"]))
        await g.service.on_result(
            again.replica.partition("/")[0],
            Result(again.call_id, again.replica, True, "x", "", 0.0, 1.0, None, 3, 1),
        )
        return g

    g = run(main())
    first, again = g.sent
    assert first.replica != again.replica  # it avoids the replica it was lost on
    assert again.call_id == f"{first.call_id}:2"  # a new attempt under a new id
    assert [m for _, m in g.replies] == [
        Chunk("1", ["x"]),
        CallEnded("1", True, 200, "", 3, 1, again.replica),
    ]
    assert g.calls.retried == 1 and g.calls.in_flight == 0


def test_a_call_lost_after_its_output_began_ends_with_503(tmp_path: Path) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1", session="s"))
        await g.calls.on_chunk("n", Chunk(g.ours(), ["half an answer"]))
        await g.service.on_node_down("n")
        return g

    g = run(main())
    [ended] = g.ended()
    assert (ended.call_id, ended.ok, ended.status) == ("1", False, 503)
    assert ended.error == "node n down" and ended.prompt_tokens == 0
    assert len(g.sent) == 1 and g.calls.in_flight == 0 and g.calls.retried == 0


def test_a_call_lost_again_and_again_ends_with_503_after_its_last_attempt(
    tmp_path: Path,
) -> None:
    async def main() -> Gateways:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1"))
        for _ in range(MAX_ATTEMPTS):
            await g.service.on_node_down("n")  # the node comes back each time, and dies again
        return g

    g = run(main())
    [ended] = g.ended()
    assert (ended.status, ended.error) == (503, "node n down")
    assert len(g.sent) == MAX_ATTEMPTS and g.calls.retried == MAX_ATTEMPTS - 1


def test_a_call_with_no_result_by_its_hard_deadline_ends_with_504(tmp_path: Path) -> None:
    async def main() -> tuple[Gateways, int]:
        g = Gateways(tmp_path)
        await g.start()
        await g.send_call(call("1", timeout_s=10.0))
        g.clock.now += 10 + CALL_GRACE_S - 1
        await g.service.check_deadlines()
        early = len(g.replies)
        g.clock.now += 2
        await g.service.check_deadlines()
        return g, early

    g, early = run(main())
    assert early == 0
    [ended] = g.ended()
    assert (ended.call_id, ended.ok, ended.status) == ("1", False, 504)
    assert ended.error == f"no result within {10 + CALL_GRACE_S:g} s"
    assert g.cancelled == [g.ours()]  # its node is told to stop


# --- idle sessions ----------------------------------------------------------------------------


def test_a_session_ends_after_idle_s_without_a_call_never_while_one_is_open(tmp_path: Path) -> None:
    async def main() -> tuple[Gateways, list[int], str]:
        g = Gateways(tmp_path, idle_s=60.0)
        await g.start()
        await g.send_call(call("1", session="done"))
        await g.send_call(call("2", session="busy"))
        done_id = g.ours(0)
        g.clock.now += 30
        await g.finish(done_id)  # "done" is idle from now on
        expired = [g.calls.expire()]
        g.clock.now += 60
        expired.append(g.calls.expire())  # exactly idle_s: not yet
        g.clock.now += 1
        expired.append(g.calls.expire())
        g.clock.now += 600
        expired.append(g.calls.expire())  # "busy" idles long, but its call is open
        await g.send_call(call("3", session="done"))  # a new session of the same name
        return g, expired, g.tickets[0].call.workflow_id

    g, expired, old = run(main())
    assert expired == [0, 0, 1, 0]
    busy, new = g.tickets[1].call.workflow_id, g.tickets[2].call.workflow_id
    assert old not in g.service.sessions and g.service.features.turn(old) == 0
    assert busy in g.service.sessions
    assert new != old and g.tickets[2].call.step_id == "turn-1"
    assert g.calls.sessions == 2


# --- the predictor's session history ----------------------------------------------------------


class Learning(Gateways):
    """`Gateways` on a service with an online learner, whose session history is under test
    (`Cluster`'s service has none: it is replaced, on the same journal, with the same spy)."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        super().__init__(tmp_path, **options)
        self.learner = OnlineLearner(tmp_path)
        self.service = WorkflowService(
            self.service.store,
            LeastOutstanding(),
            self.nodes,
            self.clock,
            self.send,
            learner=self.learner,
        )
        submit = self.service.dispatcher.submit

        def spy(ticket: Ticket, now: float) -> list[Assign]:
            self.tickets.append(ticket)
            return submit(ticket, now)

        self.service.dispatcher.submit = spy  # type: ignore[method-assign,assignment]
        self.calls = GatewayCalls(self.service, self.reply, self.clock, **options)

    def history(self, n: int = -1) -> SessionContext:
        """The session so far, as the predictor sees it for the ``n``-th call queued."""
        return self.service.features.query(self.tickets[n].call).session


def test_a_sessions_history_is_its_own_calls(tmp_path: Path) -> None:
    async def main() -> list[SessionContext]:
        g = Learning(tmp_path)
        await g.start()
        await g.send_call(call("1", session="s"))
        seen = [g.history()]
        await g.finish(g.ours(), latency_s=2.0)
        await g.send_call(call("2", session="s"))
        seen.append(g.history())
        return seen

    first, second = run(main())
    assert first == SessionContext()
    assert second.prior_calls == 1 and second.last_latency_s == 2.0


def own(ctx: SessionContext) -> SessionContext:
    """The session's own history, without the serving side's last minute (any session's)."""
    return dataclasses.replace(ctx, recent_calls=0, recent_log_latency=None, recent_log_pace=None)


def test_an_expired_sessions_history_is_forgotten(tmp_path: Path) -> None:
    async def main() -> tuple[Learning, int, SessionContext]:
        g = Learning(tmp_path, idle_s=60.0)
        await g.start()
        await g.send_call(call("1", session="s"))
        await g.finish(g.ours())
        g.clock.now += 61
        expired = g.calls.expire()
        await g.send_call(call("2", session="s"))  # a new run of the agent, under the same name
        return g, expired, g.history()

    g, expired, fresh = run(main())
    assert expired == 1
    assert own(fresh) == SessionContext()
    assert g.learner.sessions.context("s", "", None) == SessionContext()


def test_two_clients_sessions_of_one_name_have_separate_histories(tmp_path: Path) -> None:
    async def main() -> SessionContext:
        g = Learning(tmp_path)
        await g.start()
        await g.send_call(call("1", session="s", client="alice"))
        await g.finish(g.ours())
        await g.send_call(call("2", session="s", client="bob"))
        return g.history()

    assert own(run(main())) == SessionContext()
