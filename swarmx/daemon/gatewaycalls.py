"""Calls from `swarmx gateway` (OpenAI requests), routed and run like workflow calls.

An agent decides its next call at run time, so it has no workflow file. To the scheduler its
session (``X-SwarmX-Session``) is a workflow whose calls arrive one at a time: one id for the
dispatcher, the predictor's session features (turn, prefix share, the session's history), the
traces, and one deadline (``X-SwarmX-SLO-S`` from its first call). A call of no session is a
session of one call. Sessions end after ``idle_s`` without a call.

Unlike a workflow, a gateway call is not journaled: its client waits on a connection to the
gateway, and a scheduler restart ends that wait (the gateway answers 503). Its output streams
back as `Chunk` frames relayed from the node to the gateway as they come, then one `CallEnded`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from swarmx.clock import Clock
from swarmx.daemon.features import SessionInfo
from swarmx.daemon.limits import Overloaded
from swarmx.daemon.workflows import WorkflowService
from swarmx.protocol import AbortCall, CallEnded, Chunk, GatewayCall, Message, Result
from swarmx.sched.dispatch import TOOL_POOL, Ticket
from swarmx.workflow.engine import CallDone, CallSpec

log = logging.getLogger(__name__)

Reply = Callable[[bytes, Message], Awaitable[bool]]
"""Send a message to a peer (a gateway) by its connection id."""

SESSION_IDLE_S = 600.0
"""A session with no call for this long is over: its features and deadline are forgotten."""
MAX_ATTEMPTS = 3
"""Runs of one gateway call lost with its node or replica before any output reached its client:
an infrastructure loss the client need not see."""
RETRY_AFTER_S = 1.0
"""What a 429 tells the client to wait."""
PROGRAM = "gateway"
"""``workflow_name`` of gateway calls in traces."""


class ForeignChunk(Exception):
    """Output for a call that was not sent to the node that streamed it."""


@dataclass
class _Session:
    id: str
    client: str
    key: str
    info: SessionInfo
    """Its start, deadline and counts, as features, traces and `swarmx top` read them."""
    last_active_s: float
    """Monotonic time of its latest call's start or end."""
    turns: int = 0
    open_calls: set[str] = field(default_factory=set)


@dataclass
class _Call:
    peer: bytes
    gateway_id: str
    """The call id the gateway gave it (ours is the session's)."""
    session: _Session
    client: str
    spec: CallSpec
    priority: int = 0
    streamed: bool = False
    """Output went to the client: from then on the call cannot start again elsewhere."""


class GatewayCalls:
    def __init__(
        self,
        service: WorkflowService,
        reply: Reply,
        clock: Clock,
        *,
        idle_s: float = SESSION_IDLE_S,
        max_calls_per_client: int = 1000,
    ) -> None:
        self.service = service
        self._reply = reply
        self.clock = clock
        self.idle_s = idle_s
        self.max_calls_per_client = max_calls_per_client
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._calls: dict[str, _Call] = {}
        """Our call id -> its gateway and session."""
        self._ours: dict[tuple[bytes, str], str] = {}
        """(gateway connection, its call id) -> our call id."""
        self._per_client: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        """Calls answered with an error before running, by reason (metrics)."""
        self.relayed_chunks = 0
        self.retried = 0
        """Calls run again after their node or replica was lost before any output."""
        service.external = self

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def on_call(self, peer: bytes, msg: GatewayCall) -> None:
        """Queue a gateway call, or answer at once why not (429, 404)."""
        if (peer, msg.call_id) in self._ours:
            return  # the gateway sent it again: it is under way
        refusal = self._refusal(msg)
        if refusal is not None:
            reason, status, error = refusal
            self.refused[reason] += 1
            retry = RETRY_AFTER_S if status in (429, 503) else None
            await self._reply(
                peer, CallEnded(msg.call_id, False, status, error, retry_after_s=retry)
            )
            return
        now = self.clock.time()
        ses = self._session(msg, now)
        ses.turns += 1
        ses.last_active_s = self.clock.monotonic()
        call = CallSpec(
            call_id=f"{ses.id}:turn-{ses.turns}",
            workflow_id=ses.id,
            step_id=f"turn-{ses.turns}",
            index=None,
            attempt=1,
            kind="llm",
            model=msg.model,
            prompt=msg.prompt,
            max_tokens=msg.max_tokens,
            inputs={},
            command=[],
            timeout_s=msg.timeout_s,
            deps=[],
            api=msg.api,
            body=msg.body,
            input_kinds=list(msg.input_kinds),
        )
        ses.open_calls.add(call.call_id)
        ses.info.calls_open = len(ses.open_calls)
        self._calls[call.call_id] = _Call(peer, msg.call_id, ses, msg.client, call, msg.priority)
        self._ours[(peer, msg.call_id)] = call.call_id
        self._per_client[msg.client] += 1
        deadline = ses.info.deadline_ts
        slack = None if deadline is None else deadline - now - msg.priority
        await self.service.submit_ticket(Ticket(call, now, deadline, slack))

    def _refusal(self, msg: GatewayCall) -> tuple[str, int, str] | None:
        try:
            self.service.check_capacity()
        except Overloaded as exc:
            return "overloaded", 429, str(exc)
        if self._per_client[msg.client] >= self.max_calls_per_client:
            who = f"client {msg.client!r}" if msg.client else "anonymous clients"
            n = self._per_client[msg.client]
            return "quota", 429, f"{who}: {n} calls running at once, the most allowed"
        models = self.service.served_models() - {TOOL_POOL}
        if msg.model not in models:
            served = ", ".join(sorted(models)) or "none"
            return "model", 404, f"the model {msg.model!r} is not served here (served: {served})"
        if (
            self.service.dispatcher.live_replicas(msg.model) == 0
            and msg.model not in self.service.pools.scalable()
        ):
            # its nodes are stale or down, or its replicas draining, and none can be started:
            # waiting in the queue would only reach the timeout
            return "no_replica", 503, f"no replica of {msg.model!r} can take calls now"
        return None

    def _session(self, msg: GatewayCall, now: float) -> _Session:
        key = (msg.client, msg.session)
        ses = self._sessions.get(key) if msg.session else None
        if ses is None:
            sid = f"{'ses' if msg.session else 'call'}-{secrets.token_hex(6)}"
            deadline = None if msg.slo_s is None else now + msg.slo_s
            # the learner keeps a session's history by this name: two clients' "s" are two
            named = f"{msg.client}/{msg.session}" if msg.client and msg.session else msg.session
            info = SessionInfo(named, PROGRAM, msg.slo_s, now, deadline)
            ses = _Session(sid, msg.client, msg.session, info, 0.0)
            self.service.sessions[sid] = info
            if msg.session:
                self._sessions[key] = ses
        elif ses.info.deadline_ts is None and msg.slo_s is not None:
            ses.info.deadline_ts, ses.info.slo_s = ses.info.started_ts + msg.slo_s, msg.slo_s
        return ses

    async def on_chunk(self, node: str, msg: Chunk) -> None:
        """Relay a node's output to the gateway that waits for it."""
        c = self._calls.get(msg.call_id)
        if c is None:
            return  # ended or aborted meanwhile: the node stops on its cancel
        if self.service.dispatched_to(msg.call_id) != node:
            raise ForeignChunk(f"call {msg.call_id} was not sent to node {node}")
        self.relayed_chunks += len(msg.data)
        c.streamed = True
        await self._reply(c.peer, Chunk(c.gateway_id, msg.data))

    async def on_abort(self, peer: bytes, msg: AbortCall) -> None:
        """The client went away: stop its call wherever it is."""
        ours = self._ours.get((peer, msg.call_id))
        if ours is None:
            return
        self._end(ours)
        await self.service.cancel_calls([ours])

    async def ended(self, call_id: str, done: CallDone, result: Result | None) -> None:
        c = self._calls.get(call_id)
        if c is None:
            return
        late = done.error.startswith("no result within")  # its hard deadline passed
        if done.infra and not late and not c.streamed and c.spec.attempt < MAX_ATTEMPTS:
            await self._again(call_id, c, done)  # lost before its client saw a byte
            return
        self._end(call_id)
        if done.ok:
            status = 200
        elif result is None:  # lost with its node or replica, or past its hard deadline
            status = 504 if late else 503
        else:
            status = 502  # the engine failed it
        await self._reply(
            c.peer,
            CallEnded(
                c.gateway_id,
                done.ok,
                status,
                done.error,
                result.prompt_tokens if result is not None else 0,
                result.output_tokens if result is not None else 0,
                done.replica,
            ),
        )

    async def _again(self, call_id: str, c: _Call, done: CallDone) -> None:
        """Run a call lost with its node or replica again elsewhere, as a new attempt under a
        new id (the lost one's late output is dropped), avoiding the replica it was lost on."""
        spec = c.spec
        attempt = spec.attempt + 1
        again = dataclasses.replace(
            spec,
            call_id=f"{spec.workflow_id}:{spec.step_id}:{attempt}",
            attempt=attempt,
            avoid=[*spec.avoid, done.replica] if done.replica else spec.avoid,
        )
        log.warning("gateway call %s: %s; running it again", call_id, done.error)
        del self._calls[call_id]
        c.session.open_calls.discard(call_id)
        c.session.open_calls.add(again.call_id)
        c.spec = again
        self._calls[again.call_id] = c
        self._ours[(c.peer, c.gateway_id)] = again.call_id
        self.retried += 1
        now = self.clock.time()
        deadline = c.session.info.deadline_ts
        slack = None if deadline is None else deadline - now - c.priority
        await self.service.submit_ticket(Ticket(again, now, deadline, slack))

    def _end(self, call_id: str) -> _Call | None:
        c = self._calls.pop(call_id, None)
        if c is None:
            return None
        self._ours.pop((c.peer, c.gateway_id), None)
        self._per_client[c.client] -= 1
        if self._per_client[c.client] <= 0:
            del self._per_client[c.client]
        ses = c.session
        ses.open_calls.discard(call_id)
        ses.info.calls_open = len(ses.open_calls)
        ses.info.calls_done += 1
        ses.last_active_s = self.clock.monotonic()
        if not ses.key:
            self._forget(ses)
        return c

    def expire(self) -> int:
        """End sessions idle for ``idle_s`` (call every few seconds); returns how many."""
        cutoff = self.clock.monotonic() - self.idle_s
        idle = [s for s in self._sessions.values() if not s.open_calls and s.last_active_s < cutoff]
        for ses in idle:
            del self._sessions[(ses.client, ses.key)]
            self._forget(ses)
        return len(idle)

    def _forget(self, ses: _Session) -> None:
        self.service.features.forget(ses.id)  # first: it finds the session's name there
        self.service.sessions.pop(ses.id, None)
