"""The discrete-event simulation: workflows arrive, the real workflow engine releases their
calls, the real dispatcher queues and routes them with the real routers and forecasters, the real
scalers resize the pools, and emulated servers (`swarmx.sim.servers`) take the simulated time.

Nothing here decides anything: every decision is made by the same objects the scheduler daemon
runs. The simulated clock is the event heap's time.

Workflows arrive at their arrival times, or, for session replays (``SimConfig.sessions``), a fixed
number run at once and the next starts when one ends.
"""

from __future__ import annotations

import dataclasses
import gc
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from swarmx.backends.emulated import GPUS, ModelProfile, prefill_s, vision_s
from swarmx.models.dist import LatencyDist
from swarmx.models.query import SessionTracker
from swarmx.sched.dispatch import TOOL_POOL, Assign, Dispatcher, QueueOrder, Ticket
from swarmx.sched.outlook import Outlook
from swarmx.sched.prefix import BLOCK_TOKENS, block_hashes
from swarmx.sched.router import ReplicaView, Router
from swarmx.sched.scaler import PoolState, Scaler
from swarmx.sim.forecast import Replica, SimForecaster
from swarmx.sim.servers import Finished as Served
from swarmx.sim.servers import LlmServer, SharedServer
from swarmx.sim.simworkflow import BlockChains, CallTruth, SimWorkflow
from swarmx.stats import quantile
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord
from swarmx.workflow.engine import (
    CallDone,
    CallSpec,
    Finished,
    Instruction,
    RunCall,
    StopCalls,
    WorkflowRun,
)
from swarmx.workflow.spec import StepSpec

MIXED = ("H100", "A100", "L40S")
_ONE_SECOND = LatencyDist((0.5, 0.9), (1.0, 1.0))


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 8
    """GPU replicas at the start, split across the workload's models by demand."""
    max_replicas: int | None = None
    """Upper bound on GPU replicas in all when a scaler runs (default: 4x ``replicas``)."""
    gpu: str = "A100"
    """A GPU type of `swarmx.backends.emulated.GPUS`, or ``mixed`` (equal parts of each)."""
    llm_slots: int = 32
    """Sequences an LLM replica batches at once (its ``concurrency``)."""
    vision_slots: int = 4
    tool_hosts: int | None = None
    """CPU hosts for tool steps (default: one per 8 GPU replicas of the budget, ``max_replicas``
    where given, at least 1: scalers size GPU pools only, so the CPU hosts are there for the
    largest pool a scaler may build, and tools never decide a scaler comparison)."""
    tool_cores: int = 16
    tool_slots: int | None = None
    """Tool runs a host takes at once (default: twice its cores; more wait in the queue)."""
    startup_s: float = 60.0
    """A new replica serves this long after the scaler asked for it (weights load, warm-up)."""
    scale_interval_s: float = 10.0
    slo_s: float | None = None
    """For workflows without an SLO of their own."""
    replica_queue: int = 0
    seed: int = 0
    kv_cache_tokens: int | None = None
    """KV-cache tokens of an LLM replica, its prefix cache's room (default: what its GPU's
    memory holds, `swarmx.backends.emulated.kv_capacity_tokens`)."""
    sessions: int | None = None
    """Run this many workflows at once, the next starting as one ends (a closed loop over
    recorded sessions), instead of at their arrival times."""
    kv_events: bool = False
    """LLM replicas tell the dispatcher's prefix index what their caches evict, as vLLM and
    SGLang do with KV events (`Dispatcher.engine_cache`); without, the index knows only what
    was routed (approximate)."""


@dataclass
class _Call:
    call: CallSpec
    truth: CallTruth
    ready_s: float
    wf: _Flow
    start_s: float = 0.0
    replica: str = ""
    placed: ReplicaView | None = None
    """The replica as the router saw it when it chose it (its load before this call)."""
    pred: LatencyDist | None = None
    ttft_s: float | None = None
    """From reaching its replica to the end of its prefill (LLM calls)."""
    floor: tuple[float, float] | None = None
    """LLM calls: (TTFT, latency) no router could beat (`Simulation._floor`)."""


@dataclass
class _Flow:
    sw: SimWorkflow
    run: WorkflowRun
    deadline_s: float | None
    start_s: float


@dataclass
class SimResult:
    calls: int
    workflows: int
    workflow_latency_s: list[float]
    finish_s: list[float]
    """When each workflow ended, in the order they ended."""
    call_latency_s: list[float]
    met_slo: int
    with_slo: int
    failed: int
    duration_s: float
    replica_seconds: float
    scale_events: int
    peak_replicas: int
    by_class: dict[str, list[float]]
    ttft_s: list[float] = field(default_factory=list)
    """Per LLM call, from its release to the end of its prefill (queueing included)."""
    prompt_tokens: int = 0
    """Prompt tokens of the LLM calls the replicas took."""
    cached_tokens: int = 0
    """Of those, the tokens their prefix caches served."""
    ttft_floor_s: list[float] = field(default_factory=list)
    call_latency_floor_s: list[float] = field(default_factory=list)
    """Per LLM call, aligned with ``ttft_s``: the least TTFT and latency any routing could give
    it (`Simulation._floor`)."""


class Simulation:
    def __init__(
        self,
        cfg: SimConfig,
        workflows: Sequence[SimWorkflow],
        *,
        router: Router,
        order: QueueOrder,
        scaler: Scaler,
        predictor: str = "oracle",
        record: Callable[[TraceRecord], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.workflows = sorted(workflows, key=lambda w: w.arrival_s)
        self.scaler = scaler
        self.record = record
        self.outlook = Outlook(self._step_service)
        self.now = 0.0
        self.replicas: dict[str, Replica] = {}
        self.sessions = SessionTracker()
        self.forecaster = SimForecaster(predictor, self.replicas, self, self.sessions, cfg.seed)
        self.forecaster.wants_load_only = router.forecast == "load_only"
        self._plain = (
            router.forecast == "none" and order == "fifo" and scaler.name == "none" and not record
        )
        """Nothing reads a forecast or a deadline: no forecasting router, slack queue, scaler
        or recorded trace. The decisions are the same without them, so none are made (the
        live scheduler still forecasts every call, to show predicted next to actual)."""
        self.dispatcher = Dispatcher(
            router,
            order,
            None if self._plain else self.forecaster,
            replica_queue=cfg.replica_queue,
        )
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self._version: dict[str, int] = {}
        self._calls: dict[str, _Call] = {}
        self._flows: dict[str, _Flow] = {}
        self._names = itertools.count()
        self._gpu_cycle = itertools.cycle(MIXED if cfg.gpu == "mixed" else (cfg.gpu,))
        self._last_scale_s = 0.0
        self._starting: dict[str, int] = {}
        self._budget: dict[str, float] = {}
        self._chains = BlockChains()
        self._seen_blocks: set[int] = set()
        """Every prefix block a call has sent so far (`_floor`)."""
        self._next: deque[tuple[str, SimWorkflow]] = deque()
        """Session replays: the workflows waiting for one running to end."""
        self.models = sorted({s.model for w in workflows for s in w.spec.steps if s.kind != "tool"})
        self._kind = {
            s.model: ("vision" if s.kind == "model" else "llm")
            for w in workflows[:1000]
            for s in w.spec.steps
            if s.kind != "tool"
        }
        self.result = SimResult(0, 0, [], [], [], 0, 0, 0, 0.0, 0.0, 0, 0, {})

    # --- the world the forecasters may ask about (CallInfo) --------------------------------

    def truth(self, call: CallSpec) -> CallTruth:
        return self._calls[call.call_id].truth

    def workflow_name(self, call: CallSpec) -> str:
        return self._calls[call.call_id].wf.sw.name

    # --- cluster ----------------------------------------------------------------------------

    def _split(self, total: int) -> dict[str, int]:
        need = demand_s(self.workflows[:2000], self.cfg.llm_slots)
        total_s = sum(need.values()) or 1.0
        shares = {m: need.get(m, 0.0) / total_s for m in self.models}
        counts = {m: max(1, math.floor(total * shares[m])) for m in self.models}
        while sum(counts.values()) < total:
            m = max(self.models, key=lambda m: total * shares[m] - counts[m])
            counts[m] += 1
        return counts

    def _new_replica(self, model: str, ready_s: float) -> Replica:
        gpu = next(self._gpu_cycle)
        profile = GPUS[gpu]
        name = f"{gpu.lower()}-{next(self._names)}/{model}"
        kind = self._kind.get(model, "llm")
        server: LlmServer | SharedServer
        if kind == "llm":
            server = LlmServer(
                profile, ModelProfile(), self.cfg.llm_slots, self.cfg.kv_cache_tokens
            )
            slots = self.cfg.llm_slots
        else:
            server, slots = SharedServer(1.0), self.cfg.vision_slots
        rep = Replica(name, model, gpu, profile, kind, server, slots, self.now, ready_s)
        self.replicas[name] = rep
        return rep

    def _announce(self, rep: Replica) -> None:
        s = rep.server
        view = ReplicaView(
            rep.name,
            rep.name.split("/")[0],
            rep.model,
            "emulated",
            f"emulated:{rep.gpu}",
            rep.slots,
            0,
            gpu=rep.gpu,
            kv_cache_tokens=s.cache.capacity_tokens if isinstance(s, LlmServer) else 0,
            prefill_tokens_per_s=1 / prefill_s(s.gpu, s.model, 1)
            if isinstance(s, LlmServer)
            else 0,
        )
        if self.cfg.kv_events and isinstance(s, LlmServer):
            name, dispatcher = rep.name, self.dispatcher
            s.cache.index.on_evict = lambda gone: dispatcher.engine_cache(name, gone, 0, None)
        self._assign_all(self.dispatcher.add_replica(view, self.now))

    def _build(self) -> None:
        for model, n in self._split(self.cfg.replicas).items():
            for _ in range(n):
                self._announce(self._new_replica(model, 0.0))
        hosts = self.cfg.tool_hosts or max(1, (self.cfg.max_replicas or self.cfg.replicas) // 8)
        for i in range(hosts):
            rep = Replica(
                f"cpu-{i}/tool",
                TOOL_POOL,
                "cpu",
                None,
                "tool",
                SharedServer(self.cfg.tool_cores),
                self.cfg.tool_slots or self.cfg.tool_cores * 2,
                0.0,
                0.0,
            )
            self.replicas[rep.name] = rep
            self._announce(rep)
        self.result.peak_replicas = len(self._gpu_replicas())

    # --- events -----------------------------------------------------------------------------

    _ARRIVE, _RELEASE, _WAKE, _READY, _SCALE = range(5)

    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def run(self) -> SimResult:
        """Run to the last event. What exists before the run (the workflows, a predictor's torch
        modules) is frozen out of the garbage collector meanwhile: none of it becomes garbage,
        and rescanning it at every full collection cost the run about 5%. The run's own objects
        die young by reference count (messages, views, events), so the youngest generation is
        collected a hundred times less often than by default: about 2% more."""
        thresholds = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(100 * thresholds[0], *thresholds[1:])
        try:
            return self._run()
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()

    def _run(self) -> SimResult:
        self._build()
        flows = [(f"wf{i}", w) for i, w in enumerate(self.workflows)]
        sessions = self.cfg.sessions
        if sessions is not None:
            self._next.extend(flows[sessions:])
            for flow in flows[:sessions]:
                self._push(0.0, self._ARRIVE, flow)
        else:
            for flow in flows:
                self._push(flow[1].arrival_s, self._ARRIVE, flow)
        if self.scaler.name != "none":
            self._push(self.cfg.scale_interval_s, self._SCALE, None)
        first = self.workflows[0].arrival_s if self.workflows and sessions is None else 0.0
        self._to_arrive = len(self.workflows)
        while self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            self.now = t
            if kind == self._WAKE:
                name, version = payload
                if self._version.get(name) == version:
                    self._wake(self.replicas[name])
            elif kind == self._ARRIVE:
                self._arrive(*payload)
            elif kind == self._RELEASE:
                self._submit(payload)
            elif kind == self._READY:
                self._ready(payload)
            elif kind == self._SCALE and (self._flows or self._to_arrive):
                self._scale()
                self._push(t + self.cfg.scale_interval_s, self._SCALE, None)
        end = self.now
        for rep in self.replicas.values():
            if rep.kind != "tool":
                self.result.replica_seconds += (rep.retired_s or end) - rep.created_s
            if isinstance(rep.server, LlmServer):
                self.result.prompt_tokens += rep.server.cache.prompt_tokens
                self.result.cached_tokens += rep.server.cache.cached_tokens
        self.result.duration_s = end - first
        self.result.workflows = len(self.workflows)
        return self.result

    def _arrive(self, wf_id: str, sw: SimWorkflow) -> None:
        self._to_arrive -= 1
        slo = sw.spec.slo_s if sw.spec.slo_s is not None else self.cfg.slo_s
        flow = _Flow(sw, WorkflowRun(wf_id, sw.spec), self.now + slo if slo else None, self.now)
        self._flows[wf_id] = flow
        self._execute(flow, flow.run.start())

    def _execute(self, flow: _Flow, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, RunCall):
                call = ins.call
                truth = flow.sw.truth[(call.step_id, call.index)]
                c = _Call(call, truth, self.now, flow)
                self._calls[call.call_id] = c
                release = flow.start_s + flow.sw.release_s.get(call.step_id, 0.0)
                think_s = flow.sw.think_s.get(call.step_id)
                if think_s:
                    release = max(release, self.now + think_s)
                if release > self.now:
                    c.ready_s = release
                    self._push(release, self._RELEASE, c)
                else:
                    self._submit(c)
            elif isinstance(ins, StopCalls):
                self._assign_all(self.dispatcher.cancel(ins.call_ids, self.now))
            elif isinstance(ins, Finished):
                self._finish(flow, ins)

    def _submit(self, c: _Call) -> None:
        flow = c.wf
        if c.call.kind == "llm":
            c.call = self._with_blocks(c.call, c.truth)
            c.floor = self._floor(c.call, c.truth)
        if self._plain:
            ticket = Ticket(c.call, self.now)
        else:
            ticket = self.outlook.ticket(flow.run, c.call, flow.start_s, self.now, self.cfg.slo_s)
        self._assign_all(self.dispatcher.submit(ticket, self.now))

    def _with_blocks(self, call: CallSpec, truth: CallTruth) -> CallSpec:
        """The call with its prompt's prefix blocks, which routers and replicas' caches read:
        made up for a replayed agent (only now, from its previous call's), as recorded, or
        hashed from the prompt text."""
        if truth.agent_blocks is not None:
            blocks = self._chains.blocks(call.workflow_id, truth.agent_blocks)
            per = truth.block_tokens
        elif truth.prefix_blocks:
            blocks, per = list(truth.prefix_blocks), truth.block_tokens
        else:
            blocks, per = block_hashes(call.prompt), BLOCK_TOKENS
        if not blocks:
            return call
        return dataclasses.replace(call, prefix_blocks=blocks, block_tokens=per)

    def _floor(self, call: CallSpec, truth: CallTruth) -> tuple[float, float] | None:
        """A call's TTFT and latency alone on the fastest replica of its model, its cache
        holding every block any earlier call sent, as many as its KV memory takes: a bound
        below what any router can give it (a batch only slows a call, a queue only delays it, a
        real cache holds no more, and none holds more than its memory: a prompt longer than
        that is prefilled in part whatever the router does). Their quantiles bound the routers'
        from below, so a target under them is out of any router's reach."""
        blocks, per = call.prefix_blocks, call.block_tokens
        seen = self._seen_blocks
        held = next((k for k, b in enumerate(blocks) if b not in seen), len(blocks))
        seen.update(blocks)
        servers = {
            (rep.gpu, rep.server.cache.capacity_tokens): rep.server
            for rep in self.replicas.values()
            if rep.model == call.model and isinstance(rep.server, LlmServer)
        }
        if not servers:
            return None
        prompt, output = truth.prompt_tokens, truth.output_tokens

        def cached(s: LlmServer) -> int:
            room = s.cache.capacity_tokens // per * per if per > 0 else 0
            return max(0, min(held * per, prompt - 1, room))

        return (
            min(prefill_s(s.gpu, s.model, prompt - cached(s)) for s in servers.values()),
            min(s.solo_s(prompt, output, 0, 0.0, cached(s)) for s in servers.values()),
        )

    def _step_service(self, run: WorkflowRun, step: StepSpec) -> LatencyDist:
        """A typical call of the step: the recent forecasts for its pool (none yet: 1 s)."""
        pool = TOOL_POOL if step.kind == "tool" else step.model
        return self.dispatcher.typical_service(pool) or _ONE_SECOND

    def _assign_all(self, assigns: list[Assign]) -> None:
        for a in assigns:
            c = self._calls[a.ticket.call.call_id]
            rep = self.replicas[a.replica.replica]
            c.start_s, c.replica = self.now, rep.name
            c.placed = a.replica
            c.pred = a.service
            s = rep.server
            if isinstance(s, LlmServer):
                call, truth = c.call, c.truth
                s.admit(
                    call.call_id,
                    truth.prompt_tokens,
                    truth.output_tokens,
                    self.now,
                    blocks=call.prefix_blocks,
                    block_tokens=call.block_tokens,
                )
            elif rep.kind == "vision":
                assert rep.profile is not None
                px = int(c.call.inputs.get("image_px", "224"))
                s.admit(
                    c.call.call_id,
                    vision_s(rep.profile, px, int(c.call.inputs.get("steps", "1"))),
                    self.now,
                )
            else:
                s.admit(c.call.call_id, c.truth.work_s, self.now)
            self._reschedule(rep)

    def _reschedule(self, rep: Replica) -> None:
        version = self._version.get(rep.name, 0) + 1
        self._version[rep.name] = version
        t = rep.server.next_event_s()
        if t < math.inf:
            self._push(max(t, self.now), self._WAKE, (rep.name, version))

    def _wake(self, rep: Replica) -> None:
        for f in rep.server.advance(self.now):
            self._done(f)
        self._reschedule(rep)
        if rep.draining and rep.server.outstanding == 0 and rep.retired_s is None:
            rep.retired_s = self.now
            self.dispatcher.remove_replica(rep.name)

    def _done(self, served: Served) -> None:
        call_id = served.call_id
        c = self._calls.pop(call_id)
        r = self.result
        r.calls += 1
        r.call_latency_s.append(self.now - c.ready_s)
        if served.ttft_s is not None:
            c.ttft_s = served.ttft_s
            r.ttft_s.append(c.start_s - c.ready_s + served.ttft_s)
            if c.floor is not None:
                r.ttft_floor_s.append(c.floor[0])
                r.call_latency_floor_s.append(c.floor[1])
        service = self.now - c.start_s
        if c.call.kind == "llm":  # the pace the replica decodes at, measured as live
            self.dispatcher.observe_decode(c.replica, c.truth.output_tokens, service, c.ttft_s)
        self.forecaster.observe(c.call, lambda: self._trace(c, service), service)
        if self.record is not None:
            self.record(self._trace(c, service))
        self.sessions.observe(
            c.call.workflow_id, c.truth.output_tokens, service, end_ts=self.now, model=c.call.model
        )
        self._assign_all(self.dispatcher.finished(call_id, self.now))
        self._execute(
            c.wf, c.wf.run.on_done(CallDone(call_id, True, c.truth.output, "", c.replica))
        )

    def _trace(self, c: _Call, service_s: float) -> TraceRecord:
        rep, call, v = self.replicas[c.replica], c.call, c.placed
        assert v is not None
        runtime = RuntimeAtDispatch(
            min(v.outstanding, v.concurrency), max(0, v.outstanding - v.concurrency)
        )
        return TraceRecord(
            ts=c.ready_s,
            workflow=call.workflow_id,
            step=call.step_id,
            deps=call.deps,
            kind=call.kind,
            model=call.model,
            prompt=call.prompt,
            prompt_tokens=c.truth.prompt_tokens,
            max_tokens=call.max_tokens,
            output_tokens=c.truth.output_tokens if call.kind == "llm" else 0,
            latency_s=service_s,
            queue_s=c.start_s - c.ready_s,
            ttft_s=c.ttft_s,
            node=c.replica.split("/")[0],
            replica=c.replica,
            device=DeviceAtDispatch(
                rep.gpu, min(1.0, runtime.inflight / max(1, rep.slots)), 0.0, 0.0
            ),
            runtime=runtime,
            call_id=call.call_id,
            index=call.index,
            workflow_name=c.wf.sw.name,
            slo_s=c.wf.sw.spec.slo_s,
            pred=None if c.pred is None else c.pred.as_dict(),
            predictor=self.forecaster.spec,
        )

    def _finish(self, flow: _Flow, fin: Finished) -> None:
        del self._flows[flow.run.id]
        self._chains.forget(flow.run.id)
        if self._next:
            self._push(self.now, self._ARRIVE, self._next.popleft())
        r = self.result
        latency = self.now - flow.start_s
        if fin.state != "succeeded":
            r.failed += 1
        r.workflow_latency_s.append(latency)
        r.finish_s.append(self.now)
        r.by_class.setdefault(flow.sw.name, []).append(latency)
        if flow.deadline_s is not None:
            r.with_slo += 1
            r.met_slo += fin.state == "succeeded" and self.now <= flow.deadline_s

    # --- scaling ----------------------------------------------------------------------------

    def _gpu_replicas(self) -> list[Replica]:
        return [
            r
            for r in self.replicas.values()
            if r.kind != "tool" and r.retired_s is None and not r.draining
        ]

    def _ready(self, name: str) -> None:
        rep = self.replicas[name]
        self._starting[rep.model] -= 1
        if not rep.draining:
            self._announce(rep)

    def _scale(self) -> None:
        interval = self.now - self._last_scale_s
        self._last_scale_s = self.now
        live = self._gpu_replicas()
        cap = self.cfg.max_replicas or 4 * self.cfg.replicas
        pools = []
        for model in self.models:
            mine = [r for r in live if r.model == model]
            ready = [r for r in mine if r.ready_s <= self.now]
            pools.append(
                PoolState(
                    model=model,
                    ready=len(ready),
                    starting=len(mine) - len(ready),
                    concurrency=mine[0].slots if mine else self.cfg.llm_slots,
                    busy=sum(r.server.outstanding for r in ready),
                    waiting=self.dispatcher.queued(model),
                    arrivals=self.dispatcher.take_arrivals(model),
                    interval_s=interval,
                    service=self.dispatcher.typical_service(model),
                    service_by_load=self.dispatcher.service_by_load(model),
                    budget_s=self.dispatcher.budget_s(model),
                    risk=self.dispatcher.take_risk(model),
                    expected_calls=self.outlook.expected_calls(
                        (f.run for f in self._flows.values()), model
                    ),
                    min_replicas=1,
                    max_replicas=cap,
                )
            )
        targets = self.scaler.decide(self.now, pools)
        for model, target in targets.items():
            mine = [r for r in self._gpu_replicas() if r.model == model]
            total = len(self._gpu_replicas())
            while len(mine) < target and total < cap:
                rep = self._new_replica(model, self.now + self.cfg.startup_s)
                self._starting[model] = self._starting.get(model, 0) + 1
                self._push(rep.ready_s, self._READY, rep.name)
                mine.append(rep)
                total += 1
                self.result.scale_events += 1
            while len(mine) > max(1, target):
                victim = min(mine, key=lambda r: (r.ready_s <= self.now, r.server.outstanding))
                mine.remove(victim)
                self._retire(victim)
                self.result.scale_events += 1
        self.result.peak_replicas = max(self.result.peak_replicas, len(self._gpu_replicas()))

    def _retire(self, rep: Replica) -> None:
        rep.draining = True
        if rep.ready_s > self.now:  # never came up: cancel its start
            rep.retired_s = self.now
            return
        self._assign_all(self.dispatcher.set_live(rep.name, False, self.now))
        if rep.server.outstanding == 0:
            rep.retired_s = self.now
            self.dispatcher.remove_replica(rep.name)


def demand_s(workflows: Sequence[SimWorkflow], llm_slots: int) -> dict[str, float]:
    """GPU-seconds the workflows need per model on an A100, LLM calls batched at half the
    replica's slots: the yardstick for splitting replicas and for stating a load."""
    a100, lm = GPUS["A100"], ModelProfile()
    half = max(1, llm_slots // 2)
    probe = LlmServer(a100, lm, half)
    need: dict[str, float] = {}
    for w in workflows:
        for (step_id, _), t in w.truth.items():
            step = w.spec.step(step_id)
            if step.kind == "llm":
                step_s = probe.step_s(half, half * (t.prompt_tokens + t.output_tokens / 2))
                cost = prefill_s(a100, lm, t.prompt_tokens) + t.output_tokens * step_s / half
            elif step.kind == "model":
                px = int(step.inputs.get("image_px", "224"))
                cost = vision_s(a100, px, int(step.inputs.get("steps", "1")))
            else:
                continue
            need[step.model] = need.get(step.model, 0.0) + cost
    return need


def offered_load(workflows: Sequence[SimWorkflow], replicas: int, llm_slots: int) -> float:
    """Demand over capacity: GPU-seconds needed per second of arrivals, over the replicas."""
    if len(workflows) < 2 or replicas <= 0:
        return 0.0
    span = workflows[-1].arrival_s - workflows[0].arrival_s
    return sum(demand_s(workflows, llm_slots).values()) / max(span, 1e-9) / replicas


def summary(result: SimResult) -> dict[str, Any]:
    def pct(xs: list[float]) -> dict[str, float]:
        if not xs:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0}
        s = sorted(xs)
        return {
            "p50": quantile(s, 0.5),
            "p95": quantile(s, 0.95),
            "p99": quantile(s, 0.99),
            "mean": sum(s) / len(s),
        }

    met = result.met_slo
    return {
        "calls": result.calls,
        "workflows": result.workflows,
        "sessions_completed": len(result.workflow_latency_s),
        "workflow_latency_s": pct(result.workflow_latency_s),
        "call_latency_s": pct(result.call_latency_s),
        "ttft_s": pct(result.ttft_s),
        "ttft_floor_s": pct(result.ttft_floor_s),
        "call_latency_floor_s": pct(result.call_latency_floor_s),
        "prefix_hit_rate": (
            result.cached_tokens / result.prompt_tokens if result.prompt_tokens else None
        ),
        "slo_attainment": met / result.with_slo if result.with_slo else None,
        "goodput_wps": met / result.duration_s if result.duration_s > 0 else 0.0,
        "replica_seconds": result.replica_seconds,
        "failed": result.failed,
        "duration_s": result.duration_s,
        "scale_events": result.scale_events,
        "peak_replicas": result.peak_replicas,
    }
