"""The scheduler's workflow service: submissions, dispatch of calls to replicas, results, cancel,
and recovery after a restart, all through the journal.

Decisions are delegated to pure code shared with the simulator: the workflow engine (what is
ready) and the dispatcher (which ready call goes next, and where, through the router). This class
keeps the journal and the table of calls in flight, and turns instructions into messages to
nodes. It also bounds what any one workflow or client can hold: every call and every workflow has
a hard deadline (`check_deadlines`), and each client a quota of unfinished workflows
(`swarmx.daemon.limits`). What it knows of each call for forecasts and traces is in
`swarmx.daemon.features`, step forecasts in `swarmx.daemon.stepforecast`, the views `swarmx
status` shows in `swarmx.daemon.views`; whoever watches it implements `ServiceHooks`.

About 750 lines, on purpose: membership, recovery, dispatch and results all read and write the
in-flight table and the journal in one order on one event loop; split further, each part would
reach into the others' state.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec

from swarmx.clock import Clock
from swarmx.cluster import NodeTable
from swarmx.daemon.features import CallFeatures, Inflight, SessionInfo
from swarmx.daemon.forecast import LiveForecaster, runtime_of
from swarmx.daemon.limits import (
    DEFAULT_CAPACITY,
    Capacity,
    Deadlines,
    Faults,
    Overloaded,
    QuotaExceeded,
)
from swarmx.daemon.stepforecast import StepForecasts
from swarmx.daemon.views import WorkflowViews
from swarmx.models.online import OnlineLearner
from swarmx.protocol import (
    CancelCalls,
    Dispatch,
    Hello,
    Message,
    ReplicaPool,
    Result,
    Submit,
    Telemetry,
)
from swarmx.sched.dispatch import TOOL_POOL, Assign, Dispatcher, QueueOrder, Ticket
from swarmx.sched.outlook import Outlook
from swarmx.sched.prefix import block_hashes
from swarmx.sched.router import ReplicaView, Router
from swarmx.store import Store, WorkflowRow
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord
from swarmx.workflow.engine import (
    CallDone,
    CallSpec,
    Finished,
    Instruction,
    RunCall,
    StopCalls,
    WorkflowRun,
    replay,
)
from swarmx.workflow.spec import (
    DEFAULT_LIMITS,
    WorkflowError,
    WorkflowLimits,
    parse_workflow,
)

log = logging.getLogger(__name__)

Send = Callable[[str, Message], Awaitable[bool]]
"""Send a message to a node by name; False if it could not leave."""

CALL_TIMEOUT_S: dict[str, float] = {"llm": 900.0, "model": 900.0, "tool": 60.0}
"""How long a call of each kind may take when its step sets no ``timeout_s`` (a tool's is the
runner's default)."""
INLINE_PARSE_BYTES = 16_384
"""Workflow files up to this size are parsed on the event loop (~0.2 ms for a few steps):
handing them to a thread would cost more than the parse, and holds up the receive loop."""
CALL_GRACE_S = 60.0
"""Added to a call's timeout before the scheduler gives up on its result: time to queue on the
node and for the result to come back."""


RECENT_ENDED = 16_384
"""Calls whose result came in (or that were cancelled) remembered with their node, so a node
that still lists one as running, its result just sent, is not taken for a stale one."""


class _Pools(dict[str, list[ReplicaPool]]):
    """Per node, the models it can scale (from its latest hello), with the set of models any
    node can start cached: a submit asks for it, a hello changes it."""

    def __init__(self) -> None:
        super().__init__()
        self._scalable: set[str] | None = None

    def announce(self, node: str, pools: list[ReplicaPool] | None) -> None:
        if pools is None:
            self.pop(node, None)
        else:
            self[node] = pools
        self._scalable = None

    def scalable(self) -> set[str]:
        if self._scalable is None:
            self._scalable = {p.model for pools in self.values() for p in pools if p.max_count}
        return self._scalable


@dataclass(frozen=True)
class _Adoptee:
    """A call left unfinished by the scheduler's last run, waiting for a node to say it runs it
    (`WorkflowService.recover`). ``node`` is where the journal says it went, if anywhere."""

    call: CallSpec
    node: str
    replica: str
    dispatched_ts: float | None


@dataclass
class _Recovery:
    """The calls a restarted scheduler found unfinished, waiting for their nodes until
    ``until`` (monotonic)."""

    adopting: dict[str, _Adoptee] = dataclasses.field(default_factory=dict)
    until: float = 0.0
    lenient_until: float = 0.0
    """After a restart (the journal had workflows), submits naming models no node has announced
    yet are accepted until then: the nodes may still be re-registering."""


class ServiceHooks(Protocol):
    """What the workflow service tells whoever watches it (the `Observer`: `swarmx top` and
    the metrics). The watcher depends on the service, never the other way round."""

    def routed(self, a: Assign, now_s: float) -> None: ...

    def call_done(self, rec: TraceRecord) -> None: ...

    def workflow_finished(self, state: str, latency_s: float, slo_s: float | None) -> None: ...


class ExternalCalls(Protocol):
    """Whoever submitted calls that belong to no workflow (the gateway's): told how each ended."""

    async def ended(self, call_id: str, done: CallDone, result: Result | None) -> None: ...


class WorkflowService:
    def __init__(
        self,
        store: Store,
        router: Router,
        nodes: NodeTable,
        clock: Clock,
        send: Send,
        *,
        learner: OnlineLearner | None = None,
        order: QueueOrder = "fifo",
        replica_queue: int = 0,
        max_candidates: int = 64,
        limits: WorkflowLimits = DEFAULT_LIMITS,
        capacity: Capacity = DEFAULT_CAPACITY,
    ) -> None:
        self.store = store
        self.limits = limits
        self.capacity = capacity
        self.nodes = nodes
        self.clock = clock
        self._send = send
        self.learner = learner
        self.runs: dict[str, WorkflowRun] = {}
        self.sessions: dict[str, SessionInfo] = {}
        """Gateway sessions by id: workflows to the features and traces, with no spec."""
        self.features = CallFeatures(self.runs, learner, self.sessions, clock)
        """The predictor's queries and the traces, with the session state they need."""
        self.dispatcher = Dispatcher(
            router,
            order,
            LiveForecaster(learner, self.features.query, self._device)
            if learner is not None
            else None,
            replica_queue=replica_queue,
            max_candidates=max_candidates,
        )
        """Queued calls, replicas and what is outstanding on each (calls with no live replica
        for their model wait there until one comes)."""
        self.steps = StepForecasts(self.dispatcher, clock)
        self.views = WorkflowViews(store, self.runs, limits)
        """What `swarmx status` and `top` show of workflows."""
        self._inflight: dict[str, Inflight] = {}
        self._ready_ts: dict[str, float] = {}
        self.faults = Faults()
        self.leaving: set[str] = set()
        """Nodes that said goodbye: they finish what they have and get nothing new."""
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        """The last `RECENT_ENDED` calls whose result came or that were cancelled -> node."""
        self._recovery = _Recovery()
        self._draining: dict[str, str] = {}
        """Replicas being stopped by a scale-down (-> their node): they finish the calls they
        have and get no new ones."""
        self.pools = _Pools()
        """Per node, the models it can scale (from its latest hello)."""
        self._submitted: dict[str, float] = {}
        """Submission time of each running workflow (its SLO counts from there)."""
        self.outlook = Outlook(self.steps.service)
        """Deadlines, slack and fan-out estimates of the running workflows."""
        self.external: ExternalCalls | None = None
        """Told how each gateway call (`CallSpec.api`) ended; they have no workflow."""
        self.observer: ServiceHooks | None = None
        """Told of every route, finished call and finished workflow (`swarmx top`, metrics)."""
        self._call_deadlines = Deadlines()
        """Dispatched calls by when their result must have come (monotonic clock)."""
        self._workflow_deadlines = Deadlines()
        """Running workflows by when they must have finished (wall clock: it survives a
        restart, as submission times do)."""
        self._clients: dict[str, str] = {}
        """The client of each running workflow."""
        self._unfinished: collections.Counter[str] = collections.Counter()
        """Per client, its running workflows (the quota)."""

    # --- cluster membership -----------------------------------------------------------------

    @property
    def draining(self) -> Mapping[str, str]:
        """Replicas a scale-down is stopping (-> their node): no new calls go there."""
        return self._draining

    def drain(self, replica: str, node: str) -> None:
        """Stop routing to ``replica`` (the scaler's scale-down); `refresh_live` applies it."""
        self._draining[replica] = node

    def undrain(self, replica: str) -> None:
        """``replica`` takes calls again (a scale-down called off); `refresh_live` applies it."""
        self._draining.pop(replica, None)

    async def on_hello(self, hello: Hello) -> None:
        """A node (re)registered, or its replicas changed: its replica list replaces what we knew
        of it. Calls booked to a replica it no longer serves are re-run elsewhere; replicas that
        are draining (`draining`) stay booked but get nothing new."""
        now = self.clock.time()
        self.pools.announce(hello.node, list(hello.pools))
        served = {i.replica for i in hello.replicas}
        for view in self.dispatcher.node_views(hello.node):
            if view.replica not in served:
                self._draining.pop(view.replica, None)
                await self._lost(self.dispatcher.remove_replica(view.replica), view.replica)
        for info in hello.replicas:
            if info.replica in self._draining:
                if info.replica in self.dispatcher.replicas:
                    self.dispatcher.set_live(info.replica, False, now)
                continue  # a draining replica we never routed to: nothing will go there
            view = ReplicaView(
                info.replica,
                hello.node,
                info.model,
                info.backend,
                info.device,
                info.concurrency,
                0,
                gpu=_gpu_type(info.device),
            )
            await self.send_all(self.dispatcher.add_replica(view, now))

    def refresh_live(self, replica: str) -> list[Assign]:
        """Route new calls to a replica or not, as its node's state and `draining` say; returns
        the assignments that allows (carry them out with `send_all`)."""
        view = self.dispatcher.view(replica)
        if view is None:
            return []
        live = replica not in self._draining and self.nodes.state(view.node) == "live"
        return self.dispatcher.set_live(replica, live, self.clock.time())

    async def on_node_state(self, node: str, state: str) -> None:
        """Only replicas on live nodes that are not leaving get new calls."""
        now = self.clock.time()
        live_node = state == "live" and node not in self.leaving
        for view in self.dispatcher.node_views(node):
            live = live_node and view.replica not in self._draining
            await self.send_all(self.dispatcher.set_live(view.replica, live, now))

    async def on_goodbye(self, node: str, final: bool, handed_back: list[str]) -> int:
        """A node is leaving: nothing new goes to it; on its final goodbye, every call still
        booked to it (those it handed back, and any sent after it stopped taking calls) runs
        elsewhere now, and its replicas are forgotten. Returns the calls re-run."""
        self.leaving.add(node)
        await self.on_node_state(node, "live")
        if not final:
            return 0
        self.leaving.discard(node)
        self.pools.announce(node, None)
        for view in self.dispatcher.node_views(node):
            self._draining.pop(view.replica, None)
            self.dispatcher.remove_replica(view.replica)
        rerun = [f.call.call_id for f in self._inflight.values() if f.node == node]
        given = set(handed_back)
        for call_id in rerun:
            why = "handed back" if call_id in given else "not started"
            await self._give_up(call_id, f"node {node} left ({why})")
        return len(rerun)

    async def reconcile(self, node: str, running: dict[str, str]) -> None:
        """What a node says it runs (call id -> replica), against what it should run: a call
        left from before a restart is adopted; one given to another node since, re-run after
        this node was lost, or cancelled, is cancelled there (fencing)."""
        stray: list[str] = []
        for call_id, replica in running.items():
            f = self._inflight.get(call_id)
            if f is not None:
                if f.node != node:
                    stray.append(call_id)
                continue
            adoptee = self._adoptable(call_id, node)
            if adoptee is not None:
                self._adopt(adoptee, node, replica)
            elif self._ended.get(call_id) != node:
                stray.append(call_id)
        if stray:
            self.faults.fenced_calls += len(stray)
            log.warning(
                "node %s runs %d calls that are no longer its own (re-run elsewhere or "
                "cancelled); cancelling them: %s",
                node,
                len(stray),
                ", ".join(stray[:5]) + (" ..." if len(stray) > 5 else ""),
            )
            for call_id in stray:
                self._ended[call_id] = node
            self._trim_ended()
            await self._send(node, CancelCalls(stray))

    def _adoptable(self, call_id: str, node: str) -> _Adoptee | None:
        """The call left from before a restart that ``node`` may take over (taken out of the
        waiting ones): only the node the journal says it went to, or any node where the journal
        never saw it dispatched. Another node's claim is refused, so no node key can take a
        call (and its result) from the node running it."""
        adoptee = self._recovery.adopting.get(call_id)
        if adoptee is None or adoptee.node not in ("", node):
            return None
        return self._recovery.adopting.pop(call_id)

    def _adopt(self, a: _Adoptee, node: str, replica: str) -> None:
        """Book a call a node runs (or ran) as in flight there, as if just dispatched."""
        call, now = a.call, self.clock.time()
        view = self.dispatcher.view(replica)
        f = Inflight(
            call,
            node,
            replica,
            a.dispatched_ts or now,
            a.dispatched_ts or now,
            self._device(view) if view is not None else DeviceAtDispatch("", 0.0, 0.0, 0.0),
            runtime_of(view) if view is not None else RuntimeAtDispatch(0, 0),
            self.features.turn(call.workflow_id),
            self.features.input_kinds(call),
            0.0,
            None,
            "",
        )
        self._inflight[call.call_id] = f
        self._call_deadlines.add(call.call_id, self.clock.monotonic() + _call_limit_s(call))
        if (a.node, a.replica) != (node, replica):
            self.store.call_dispatched(call, node, replica, now)
        self.faults.adopted += 1
        log.info("call %s adopted: node %s still runs it", call.call_id, node)

    async def _end_recovery(self) -> None:
        """The grace after a restart is over: calls no node reported run again, as lost calls
        (a new attempt) where the journal says they had been dispatched."""
        pending, self._recovery.adopting = self._recovery.adopting, {}
        for a in pending.values():
            run = self.runs.get(a.call.workflow_id)
            if run is None:
                continue
            if not a.node:  # never dispatched (or its dispatch never reached the journal)
                await self._submit_call(a.call)
                continue
            done = CallDone(
                a.call.call_id,
                False,
                "",
                f"node {a.node} did not report it after the scheduler restarted",
                a.replica,
                infra=True,
            )
            log.warning("call %s: %s; re-running it", a.call.call_id, done.error)
            self.store.call_done(done, None, None)
            await self._execute(run, run.on_done(done))

    def on_telemetry(self, node: str, telemetry: Telemetry) -> None:
        """Calls the node's engines run for others (their own running and waiting requests,
        less the node's calls in them), for the routers to weigh (`ReplicaView.external`);
        what the engines evicted from their prefix caches, for the index."""
        mine = {v.replica for v in self.dispatcher.node_views(node)}
        for r in telemetry.replicas:
            if r.replica not in mine:
                continue
            if r.engine_running is not None or r.engine_queued is not None:
                theirs = (r.engine_running or 0) + (r.engine_queued or 0) - r.inflight
                self.dispatcher.set_external(r.replica, max(0, theirs))
            self.dispatcher.engine_cache(
                r.replica, r.cache_removed, r.cache_resets, r.cache_capacity_tokens
            )

    async def on_node_down(self, node: str) -> None:
        """Calls on a lost node are re-run elsewhere; this does not use up a step's retries."""
        lost = [f.call.call_id for f in self._inflight.values() if f.node == node]
        for call_id in lost:
            await self._give_up(call_id, f"node {node} down")

    def served_models(self) -> set[str]:
        """Models some replica serves, or some node can start replicas of."""
        return self.dispatcher.models() | self.pools.scalable()

    async def _lost(self, call_ids: list[str], replica: str) -> None:
        for call_id in call_ids:
            await self._give_up(call_id, f"{replica} gone")

    async def _give_up(self, call_id: str, error: str) -> None:
        """A dispatched call whose result will not come (its node or replica gone, the node
        unreachable, its deadline passed): the engine re-runs it as a lost call, which does not
        use up the step's retries, and fails it once those re-runs are spent too."""
        f = self._inflight.get(call_id)
        if f is None:
            return
        log.warning("call %s: %s; re-running it", call_id, error)
        await self._done(call_id, CallDone(call_id, False, "", error, f.replica, infra=True), None)

    async def check_deadlines(self) -> None:
        """Give up on calls and workflows past their hard deadlines (call this every few
        seconds): a call with no result by its timeout plus grace is cancelled on its node and
        re-run like a lost one; a workflow running longer than ``workflow_timeout_s`` fails and
        its calls are cancelled. Also ends the grace after a restart (`recover`). Costs a heap
        peek when nothing is due."""
        if self._recovery.adopting and self.clock.monotonic() >= self._recovery.until:
            await self._end_recovery()
        for call_id in self._call_deadlines.due(self.clock.monotonic()):
            f = self._inflight.get(call_id)
            if f is not None:
                await self._send(f.node, CancelCalls([call_id]))
                limit_s = _call_limit_s(f.call)
                await self._give_up(call_id, f"no result within {limit_s:g} s")
        for wf_id in self._workflow_deadlines.due(self.clock.time()):
            run = self.runs.get(wf_id)
            if run is not None:
                log.warning("workflow %s ran past its deadline; failing it", wf_id)
                await self._execute(run, run.time_out(self.limits.workflow_timeout_s))

    # --- client requests --------------------------------------------------------------------

    async def submit(self, msg: Submit, client: str = "") -> tuple[str, bool]:
        """Validate, journal, start; returns the workflow id and whether it existed already
        (its idempotency key was seen). Raises WorkflowError (one line, naming the place),
        `QuotaExceeded` when ``client`` (its key name) has too many unfinished workflows, or
        `Overloaded` when the scheduler holds too many in all.

        Parsing runs on a worker thread (it is linear, yet a 1 MiB file still takes a while),
        except for small files (`INLINE_PARSE_BYTES`, a fraction of a millisecond);
        the key, quota and capacity are checked again after it, with no await between those
        checks and the journal. The caller commits the journal before returning the id."""
        existing = self._by_key(client, msg.idempotency_key)
        if existing is not None:
            return existing, True
        self._check_quota(client)
        if len(msg.text) <= INLINE_PARSE_BYTES:  # cheaper than the hop to a thread and back
            spec = parse_workflow(msg.text, msg.source, msg.overrides, self.limits)
        else:
            spec = await asyncio.to_thread(
                parse_workflow, msg.text, msg.source, msg.overrides, self.limits
            )
        served = self.served_models()
        for step in spec.steps if self.clock.monotonic() >= self._recovery.lenient_until else ():
            model = TOOL_POOL if step.kind == "tool" else step.model
            if model not in served:
                if step.kind == "tool":
                    raise WorkflowError(
                        f"{spec.source}:{step.line}: steps (id '{step.id}'): "
                        "no node in the cluster runs tools"
                    )
                known = ", ".join(sorted(served - {TOOL_POOL})) or "none"
                raise WorkflowError(
                    f"{spec.source}:{step.line}: steps (id '{step.id}').model: "
                    f"unknown model {step.model!r} (served: {known})"
                )
        existing = self._by_key(client, msg.idempotency_key)
        if existing is not None:
            return existing, True
        self._check_quota(client)
        wf_id = f"wf-{secrets.token_hex(4)}"
        now = self.clock.time()
        self.store.add_workflow(
            WorkflowRow(
                wf_id,
                spec.name,
                spec.source,
                msg.text,
                msg.overrides,
                spec.slo_s,
                "running",
                "",
                now,
                None,
                client,
                msg.idempotency_key,
            )
        )
        log.info("workflow %s (%s) submitted: %d steps", wf_id, spec.name, len(spec.steps))
        run = self._track(WorkflowRun(wf_id, spec, self.limits), now, client)
        await self._execute(run, run.start())
        return wf_id, False

    def _by_key(self, client: str, key: str) -> str | None:
        if not key:
            return None
        row = self.store.workflow_by_key(client, key)
        return None if row is None else row.id

    def client_of(self, wf_id: str) -> str | None:
        """The key name of the client that submitted a workflow; None if there is none."""
        row = self.store.workflow(wf_id)
        return None if row is None else row.client

    def dispatched_to(self, call_id: str) -> str | None:
        """The node a call in flight was sent to (only it may report the result)."""
        f = self._inflight.get(call_id)
        return None if f is None else f.node

    def _check_quota(self, client: str) -> None:
        if len(self.runs) >= self.capacity.max_workflows:
            self.faults.overloaded += 1
            raise Overloaded(
                f"the scheduler is full: {len(self.runs)} unfinished workflows (most"
                f" {self.capacity.max_workflows}); nothing was accepted, submit again later"
            )
        self.check_capacity()
        limit = self.limits.max_queued_workflows_per_client
        if self._unfinished[client] >= limit:
            who = f"client {client!r} already has" if client else "anonymous clients already have"
            raise QuotaExceeded(
                f"{who} {self._unfinished[client]} unfinished workflows, the most"
                f" allowed (max_queued_workflows_per_client = {limit}); wait for some to finish"
                " or cancel them"
            )

    def _track(self, run: WorkflowRun, submitted_ts: float, client: str) -> WorkflowRun:
        """Hold a running workflow: its submission time, deadline and client."""
        self.runs[run.id] = run
        self._submitted[run.id] = submitted_ts
        self._workflow_deadlines.add(run.id, submitted_ts + self.limits.workflow_timeout_s)
        self._clients[run.id] = client
        self._unfinished[client] += 1
        return run

    async def cancel(self, wf_id: str) -> bool:
        run = self.runs.get(wf_id)
        if run is None:
            return False
        await self._execute(run, run.cancel())
        return True

    async def recover(self) -> int:
        """Resume every workflow the journal says was running when the scheduler stopped. Its
        unfinished calls are not sent again at once: for ``recovery_grace_s`` they wait for
        the nodes, re-registering, to report the calls they still run or have results for
        (`reconcile`, `on_result`), which are adopted; the rest then run (`_end_recovery`).
        Meanwhile, if this is a restart, a submit naming a model no node has announced yet is
        accepted: its nodes may be re-registering."""
        rows = self.store.workflows(state="running", limit=1_000_000)
        self._recovery.until = self.clock.monotonic() + self.capacity.recovery_grace_s
        if self.store.workflows(limit=1):
            self._recovery.lenient_until = self._recovery.until
        for row in rows:
            try:
                spec = parse_workflow(row.spec_text, row.source, row.overrides, self.limits)
            except WorkflowError as exc:  # the format changed under it: fail it, visibly
                self.store.finish_workflow(
                    row.id, "failed", f"cannot resume: {exc}", self.clock.time()
                )
                continue
            run = replay(row.id, spec, self.store.outcomes(row.id), self.limits)
            self._track(run, row.submitted_ts, row.client)
            sent = {c.call_id: c for c in self.store.calls(row.id) if c.state == "running"}
            for call in run.outstanding():
                c = sent.get(call.call_id)
                self._recovery.adopting[call.call_id] = (
                    _Adoptee(call, c.node, c.replica, c.dispatched_ts)
                    if c is not None
                    else _Adoptee(call, "", "", None)
                )
            log.info("workflow %s resumed: %d calls unfinished", row.id, len(run.outstanding()))
        return len(rows)

    # --- results ----------------------------------------------------------------------------

    async def on_result(self, node: str, result: Result) -> None:
        adoptee = self._adoptable(result.call_id, node)
        if adoptee is not None:  # finished while the scheduler was down
            self._adopt(adoptee, node, result.replica)
        f = self._inflight.get(result.call_id)
        if f is None:
            self.faults.results_dropped["late"] += 1  # cancelled, re-run elsewhere, or a duplicate
            return
        done = CallDone(
            result.call_id,
            result.ok,
            result.output,
            result.error,
            result.replica,
            infra=result.infra and not result.ok,
        )
        await self._done(result.call_id, done, result)

    async def _done(self, call_id: str, done: CallDone, result: Result | None) -> None:
        f = self._inflight.pop(call_id)
        self._call_deadlines.drop(call_id)
        if result is not None:
            self._ended[call_id] = f.node
            self._trim_ended()
            if result.ok:
                uncached = result.prompt_tokens - (result.cached_tokens or 0)
                self.dispatcher.observe_prefill(result.replica, uncached, result.ttft_s)
                self.dispatcher.observe_decode(
                    result.replica, result.output_tokens, result.latency_s, result.ttft_s
                )
        await self.send_all(self.dispatcher.finished(call_id, self.clock.time()))
        # a lost attempt (its node gone, no result in time) is traced too, failed, with the
        # time it was out: the trace shows every attempt
        lost = Result(call_id, f.replica, False, "", done.error, 0.0, self._out_s(f), None, 0, 0)
        record = self.features.trace(f, result or lost)
        self.store.call_done(done, result, msgspec.json.encode(record).decode())
        self.steps.observe(record)
        self.features.observe(record)
        if self.observer is not None:
            self.observer.call_done(record)
        if f.call.api:
            if self.external is not None:
                await self.external.ended(call_id, done, result)
            return
        run = self.runs.get(f.call.workflow_id)
        if run is not None:
            await self._execute(run, run.on_done(done))

    def _out_s(self, f: Inflight) -> float:
        return max(0.0, self.clock.time() - f.dispatched_ts)

    def _trim_ended(self) -> None:
        while len(self._ended) > RECENT_ENDED:
            self._ended.popitem(last=False)

    # --- executing engine instructions ------------------------------------------------------

    async def _execute(self, run: WorkflowRun, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, RunCall):
                await self._submit_call(ins.call)
            elif isinstance(ins, StopCalls):
                await self.cancel_calls(ins.call_ids)
            elif isinstance(ins, Finished):
                await self._finished(run, ins)

    async def _finished(self, run: WorkflowRun, fin: Finished) -> None:
        now = self.clock.time()
        self.store.finish_workflow(run.id, fin.state, fin.reason, now)
        if self.observer is not None:
            latency = now - self._submitted.get(run.id, now)
            self.observer.workflow_finished(fin.state, latency, run.spec.slo_s)
        self.runs.pop(run.id, None)
        self._submitted.pop(run.id, None)
        self._workflow_deadlines.drop(run.id)
        client = self._clients.pop(run.id, None)
        if client is not None:
            self._unfinished[client] -= 1
        self.features.forget(run.id)
        for call_id in [c for c in self._recovery.adopting if c.startswith(f"{run.id}:")]:
            del self._recovery.adopting[call_id]
        await self.send_all(self.dispatcher.cancel_workflow(run.id, self.clock.time()))
        log.info("workflow %s %s%s", run.id, fin.state, f": {fin.reason}" if fin.reason else "")

    async def _submit_call(self, call: CallSpec) -> None:
        await self.submit_ticket(self._ticket(call, self.clock.time()))

    async def submit_ticket(self, ticket: Ticket) -> None:
        """Queue a call ready now (a workflow's, or a gateway call with its own deadline), its
        prompt's prefix blocks hashed for the prefix index and the trace."""
        now = self.clock.time()
        call = ticket.call
        if call.kind == "llm" and call.prompt and not call.prefix_blocks:
            blocks = block_hashes(call.prompt)
            if blocks:
                per = self.features.tokens_per_block(call.model)
                call = dataclasses.replace(call, prefix_blocks=blocks, block_tokens=per)
                ticket = dataclasses.replace(ticket, call=call)
        self._ready_ts[call.call_id] = now
        await self.send_all(self.dispatcher.submit(ticket, now))

    def check_capacity(self) -> None:
        """Raise `Overloaded` when as many calls wait for a replica as the scheduler may hold."""
        queued = self.dispatcher.queued() + len(self._recovery.adopting)
        if queued >= self.capacity.max_queued_calls:
            self.faults.overloaded += 1
            raise Overloaded(
                f"the scheduler is full: {queued} calls waiting for a replica (most"
                f" {self.capacity.max_queued_calls}); retry later"
            )

    # --- deadlines, slack and demand --------------------------------------------------------

    def _ticket(self, call: CallSpec, now: float) -> Ticket:
        """The call with its deadline and its workflow's slack (`swarmx.sched.outlook`)."""
        run = self.runs.get(call.workflow_id)
        submitted = self._submitted.get(call.workflow_id)
        if run is None or submitted is None:
            return Ticket(call, now)
        return self.outlook.ticket(run, call, submitted, now)

    def running(self) -> list[tuple[WorkflowRun, float]]:
        """Each running workflow with its submission time, oldest first."""
        return sorted(
            ((run, self._submitted.get(wf_id, 0.0)) for wf_id, run in self.runs.items()),
            key=lambda item: item[1],
        )

    def budget(self, model: str) -> float | None:
        return self.dispatcher.budget_s(model)

    def expected_calls(self, model: str) -> int:
        return self.outlook.expected_calls(self.runs.values(), model)

    async def send_all(self, assigns: list[Assign]) -> None:
        """Carry out the dispatcher's assignments: journal each call and send it to its node."""
        for a in assigns:
            await self._send_assign(a)

    async def _send_assign(self, a: Assign) -> None:
        call, view = a.ticket.call, a.replica
        device = self._device(view)
        turn, kinds, share = self.features.dispatched(call)
        now = self.clock.time()
        f = Inflight(
            call,
            view.node,
            view.replica,
            self._ready_ts.pop(call.call_id, a.ticket.arrived_s),
            now,
            device,
            runtime_of(view),
            turn,
            kinds,
            share,
            a.service,
            self.learner.live.version if self.learner is not None and a.service else "",
            a.completion,
            None if a.ticket.deadline_s is None else a.ticket.deadline_s - a.ticket.arrived_s,
            a.cached_tokens,
        )
        self.views.remember(
            call.call_id,
            (
                f.pred.as_dict() if f.pred else None,
                f.completion.as_dict() if f.completion else None,
            ),
        )
        if self.observer is not None:
            self.observer.routed(a, now)
        self._inflight[call.call_id] = f
        self._call_deadlines.add(call.call_id, self.clock.monotonic() + _call_limit_s(call))
        if not call.api:  # a gateway call is not journaled: its client waits on a connection
            self.store.call_dispatched(call, view.node, view.replica, now)
        msg = Dispatch(
            call.call_id,
            call.workflow_id,
            call.step_id,
            view.replica,
            call.kind,
            call.model,
            call.prompt,
            call.max_tokens,
            call.inputs,
            call.command,
            call.timeout_s,
            call.api,
            call.body,
        )
        if not await self._send(view.node, msg):
            await self._give_up(call.call_id, f"node {view.node} unreachable")

    async def cancel_calls(self, call_ids: list[str]) -> None:
        """Stop calls, queued or running: their nodes are told; no result is waited for."""
        by_node: dict[str, list[str]] = collections.defaultdict(list)
        for call_id in call_ids:
            f = self._inflight.pop(call_id, None)
            self._ready_ts.pop(call_id, None)  # cancelled before it was sent
            self._call_deadlines.drop(call_id)
            self._recovery.adopting.pop(call_id, None)
            if f is not None:
                by_node[f.node].append(call_id)
                self._ended[call_id] = f.node
        self._trim_ended()
        self.store.calls_cancelled(call_ids)
        for node, ids in by_node.items():
            await self._send(node, CancelCalls(ids))
        await self.send_all(self.dispatcher.cancel(call_ids, self.clock.time()))

    def _device(self, view: ReplicaView) -> DeviceAtDispatch:
        return self.nodes.device_at(view.node, view.device, view.replica)


def _call_limit_s(call: CallSpec) -> float:
    """How long after its dispatch a call's result may come before it counts as lost."""
    return (call.timeout_s or CALL_TIMEOUT_S[call.kind]) + CALL_GRACE_S


def _pool(call: CallSpec) -> str:
    return TOOL_POOL if call.kind == "tool" else call.model


def _gpu_type(device: str) -> str:
    """``emulated:H100`` -> ``H100``; real devices are named from telemetry at dispatch."""
    return device.split(":", 1)[1] if device.startswith("emulated:") else device
