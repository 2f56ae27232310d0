"""The scheduler's scaling loop: every ``[scaler] interval_s`` it describes each model's pool to
the scaler (pure code shared with the simulator, `swarmx.sched.scaler`) and carries out the
targets it returns with `ScaleCommand`s to node agents. A model's lead time (how long a replica
asked for takes to serve: `PoolState.lead_s`) is the p90 of the start-ups its nodes measured
(their pools' ``warmup_s``, pooled), else the largest configured ``startup_delay_s``.

Placement: a node can scale a model it declares in its ``[[node.replicas]]`` (its hello's
``pools``), up to that entry's ``max_count``. A scale-up goes to the node with the fewest replicas
of the model (then the lowest CPU use); a scale-down first cancels replicas still starting, then
drains replicas from the node with the most idle ones, the least busy first. A draining replica
gets no new calls from the moment the decision is made; the node closes it once the calls it has
are done (and the scheduler has acknowledged the hello marking it draining, in case the node picked
it itself), then announces its new replica list (a new hello), and only then does the replica
leave the dispatcher, so no call is lost.

The node is the truth about its replicas: each hello carries its targets and which replicas are
draining. A command the node has not applied yet (its hello still shows the old target) keeps its
effect for `COMMAND_TIMEOUT_S`, after which the scheduler believes the node again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from swarmx.clock import Clock
from swarmx.config import ScalerConfig
from swarmx.daemon.workflows import WorkflowService
from swarmx.models.dist import LatencyDist
from swarmx.protocol import Hello, Message, ReplicaPool, ScaleCommand, replica_index
from swarmx.sched.dispatch import TOOL_POOL
from swarmx.sched.router import ReplicaView
from swarmx.sched.scaler import PoolState, Scaler, lead_time_s

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 30.0
"""How long a scale command the node has not confirmed (in a hello) is taken as under way."""

Send = Callable[[str, Message], Awaitable[bool]]


@dataclass
class _Command:
    target: int
    remove: list[str]
    sent_mono: float


@dataclass
class _Slot:
    """One (node, backend) that can host replicas of a model, during one decision."""

    node: str
    pool: ReplicaPool
    target: int
    ready: list[ReplicaView]
    remove: list[str] = field(default_factory=list)

    @property
    def starting(self) -> int:
        return max(0, self.target - (len(self.ready) - len(self.remove)))


@dataclass(frozen=True)
class Decision:
    """One model's scaling decision, as logged (kept for `swarmx` status and tests)."""

    ts: float
    model: str
    before: int
    target: int
    reason: str
    commands: dict[str, int]
    """Node -> its new target for the model."""
    service: dict[str, float] | None = None
    """The model's typical service-time forecast the decision was made on (``{"0.5": s}``)."""


class ScaleController:
    def __init__(
        self,
        cfg: ScalerConfig,
        scaler: Scaler,
        service: WorkflowService,
        clock: Clock,
        send: Send,
    ) -> None:
        self.cfg = cfg
        self.scaler = scaler
        self.service = service
        self.nodes = service.nodes
        self.clock = clock
        self._send = send
        self._pending: dict[tuple[str, str, str], _Command] = {}
        """(node, model, backend) -> the last command the node has not confirmed yet."""
        self._incarnation: dict[str, tuple[int, float]] = {}
        """Per node, the (pid, start time) of its agent: a new one forgets old commands."""
        self._flagged: dict[str, set[str]] = {}
        """Per node, the replicas its latest hello says are draining."""
        self._last_mono: float | None = None
        self.decisions: list[Decision] = []
        """The most recent decisions that changed a target (bounded)."""

    # --- the node's word --------------------------------------------------------------------

    def on_hello(self, hello: Hello) -> None:
        """Reconcile with a node's hello, before the workflow service applies it: the draining
        replicas are those it says are draining, plus those of commands it has not applied."""
        now = self.clock.monotonic()
        node = hello.node
        announced = {(p.model, p.backend): p.target for p in hello.pools}
        restarted = self._incarnation.get(node, (hello.pid, hello.started_ts)) != (
            hello.pid,
            hello.started_ts,
        )
        self._incarnation[node] = (hello.pid, hello.started_ts)
        for key in [k for k in self._pending if k[0] == node]:
            cmd = self._pending[key]
            applied = announced.get(key[1:]) == cmd.target
            if restarted or applied or now - cmd.sent_mono > COMMAND_TIMEOUT_S:
                del self._pending[key]
        self._flagged[node] = {i.replica for i in hello.replicas if i.draining}
        self._set_draining(node, listed={i.replica for i in hello.replicas})

    async def on_refused(self, node: str) -> None:
        """The node refused a scale command (its declared pools changed under us): forget what
        was asked of it and route to every replica it has not itself marked draining."""
        for key in [k for k in self._pending if k[0] == node]:
            del self._pending[key]
        self._set_draining(node)
        await self._undrain_freed(node)

    def _set_draining(self, node: str, listed: set[str] | None = None) -> None:
        want = set(self._flagged.get(node, ()))
        for key, cmd in self._pending.items():
            if key[0] == node:
                want |= set(cmd.remove)
        if listed is not None:
            want &= listed
        service = self.service
        for replica in [r for r, n in service.draining.items() if n == node and r not in want]:
            service.undrain(replica)
        for replica in want:
            service.drain(replica, node)

    # --- the loop ---------------------------------------------------------------------------

    async def tick(self) -> list[Decision]:
        """One scaling decision for every model some live node can scale."""
        now_mono = self.clock.monotonic()
        interval = self.cfg.interval_s if self._last_mono is None else now_mono - self._last_mono
        self._last_mono = now_mono
        await self._expire(now_mono)
        slots = self._slots()
        states = {m: self._state(m, s, interval) for m, s in slots.items()}
        targets = self.scaler.decide(now_mono, list(states.values()))
        out: list[Decision] = []
        for model, state in sorted(states.items()):
            current = state.ready + state.starting
            target = targets.get(model, current)
            target = min(max(target, state.min_replicas), state.max_replicas)
            if target == current:
                continue
            reason = _reason(self.scaler.name, state, current, target, model not in targets)
            decision = await self._apply(
                model, slots[model], current, target, reason, service=state.service
            )
            if decision is not None:
                out.append(decision)
        return out

    async def _expire(self, now_mono: float) -> None:
        late = [k for k, c in self._pending.items() if now_mono - c.sent_mono > COMMAND_TIMEOUT_S]
        for key in late:
            node, model, _ = key
            log.warning("node %s never confirmed its scale command for %s", node, model)
            del self._pending[key]
            self._set_draining(node)
            await self._undrain_freed(node)

    async def _undrain_freed(self, node: str) -> None:
        """Replicas of ``node`` that are no longer draining take calls again."""
        for view in self.service.dispatcher.views():
            if view.node == node:
                await self.service.send_all(self.service.refresh_live(view.replica))

    def _slots(self) -> dict[str, list[_Slot]]:
        """Per scalable model, every (live node, backend) that can host it."""
        dispatcher = self.service.dispatcher
        out: dict[str, list[_Slot]] = {}
        for node, pools in sorted(self.service.pools.items()):
            if node not in self.nodes or self.nodes.state(node) != "live":
                continue
            for pool in pools:
                if pool.model == TOOL_POOL:
                    continue
                ready = [
                    v
                    for v in dispatcher.views(pool.model)
                    if v.node == node
                    and v.backend == pool.backend
                    and v.replica not in self.service.draining
                ]
                cmd = self._pending.get((node, pool.model, pool.backend))
                target = cmd.target if cmd is not None else pool.target
                out.setdefault(pool.model, []).append(_Slot(node, pool, target, ready))
        return out

    def _state(self, model: str, slots: list[_Slot], interval_s: float) -> PoolState:
        dispatcher = self.service.dispatcher
        ready = sum(len(s.ready) for s in slots)
        declared = sum(s.pool.declared for s in slots)
        capacity = sum(s.pool.max_count for s in slots)
        hi = min(self.cfg.max_replicas.get(model, capacity), capacity)
        lo = min(self.cfg.min_replicas.get(model, declared), hi)
        concurrency = max(
            [v.concurrency for s in slots for v in s.ready] or [slots[0].pool.concurrency]
        )
        # the nodes start the same servers: their start-ups are pooled, and the slowest
        # configured one is the prior until enough are measured
        lead_s = lead_time_s(
            [w for s in slots for w in s.pool.warmup_s],
            max(s.pool.startup_delay_s for s in slots),
        )
        return PoolState(
            model=model,
            ready=ready,
            starting=sum(s.starting for s in slots),
            concurrency=concurrency,
            busy=sum(v.outstanding for v in dispatcher.views(model)),
            waiting=dispatcher.queued(model),
            arrivals=dispatcher.take_arrivals(model),
            interval_s=interval_s,
            service=dispatcher.typical_service(model),
            service_by_load=dispatcher.service_by_load(model),
            budget_s=self.service.budget(model),
            risk=dispatcher.take_risk(model),
            expected_calls=self.service.expected_calls(model),
            min_replicas=lo,
            max_replicas=hi,
            lead_s=lead_s,
        )

    # --- carrying out -----------------------------------------------------------------------

    async def _apply(
        self,
        model: str,
        slots: list[_Slot],
        current: int,
        target: int,
        reason: str,
        *,
        service: LatencyDist | None,
    ) -> Decision | None:
        before = {id(s): s.target for s in slots}
        if target > current:
            self._plan_up(slots, target - current)
        else:
            self._plan_down(slots, current - target)
        changed = [s for s in slots if s.target != before[id(s)] or s.remove]
        if not changed:
            return None
        log.info(
            "scale %s: %d -> %d (%s): %s",
            model,
            current,
            target,
            reason,
            ", ".join(
                f"{s.node} {before[id(s)]} -> {s.target}"
                + (f" draining {', '.join(s.remove)}" if s.remove else "")
                for s in changed
            ),
        )
        mono = self.clock.monotonic()
        for s in changed:
            key = (s.node, model, s.pool.backend)
            for replica in s.remove:
                self.service.drain(replica, s.node)
                await self.service.send_all(self.service.refresh_live(replica))
            self._pending[key] = _Command(s.target, list(s.remove), mono)
            cmd = ScaleCommand(model, s.pool.backend, s.target, reason, list(s.remove))
            if not await self._send(s.node, cmd):
                log.warning("scale command for %s could not reach node %s", model, s.node)
                del self._pending[key]
                self._set_draining(s.node)
                await self._undrain_freed(s.node)
        commands = {s.node: s.target for s in changed}
        decision = Decision(
            self.clock.time(),
            model,
            current,
            target,
            reason,
            commands,
            service.as_dict() if service is not None else None,
        )
        self.decisions = [*self.decisions[-99:], decision]
        return decision

    def _plan_up(self, slots: list[_Slot], n: int) -> None:
        for _ in range(n):
            room = [s for s in slots if s.target < s.pool.max_count]
            if not room:
                return
            best = min(room, key=lambda s: (self._replicas_on(s.node, slots), self._cpu(s.node)))
            best.target += 1

    def _plan_down(self, slots: list[_Slot], n: int) -> None:
        for s in sorted(slots, key=lambda s: -s.starting):  # cancel starts first
            cut = min(s.starting, n)
            s.target -= cut
            n -= cut
        for _ in range(n):

            def idle(s: _Slot) -> tuple[int, int]:
                left = [v for v in s.ready if v.replica not in s.remove]
                return sum(v.outstanding == 0 for v in left), len(left)

            cands = [s for s in slots if idle(s)[1] > 0 and s.target > 0]
            if not cands:
                return
            s = max(cands, key=idle)
            left = [v for v in s.ready if v.replica not in s.remove]
            victim = min(left, key=lambda v: (v.outstanding, -replica_index(v.replica)))
            s.remove.append(victim.replica)
            s.target -= 1

    @staticmethod
    def _replicas_on(node: str, slots: list[_Slot]) -> int:
        return sum(s.target for s in slots if s.node == node)

    def _cpu(self, node: str) -> float:
        tel = self.nodes.telemetry(node)
        return tel.host.cpu_percent if tel is not None else 0.0


def _reason(policy: str, s: PoolState, current: int, target: int, bound: bool) -> str:
    why = "outside min/max" if bound else policy
    service = f", p50 service {s.service.quantile(0.5):.2f}s" if s.service is not None else ""
    budget = f", budget {s.budget_s:.2f}s" if s.budget_s is not None else ""
    lead = f", lead {s.lead_s:.1f}s" if s.lead_s is not None else ""
    return (
        f"{why}: {s.ready} ready + {s.starting} starting, {s.busy} busy, {s.waiting} waiting, "
        f"{s.arrivals} arrived in {s.interval_s:.1f}s, {s.expected_calls} expected"
        f"{service}{budget}{lead}"
    )
