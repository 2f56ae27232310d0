"""What the scheduler has seen lately, for `swarmx top` and the Prometheus metrics.

The workflow service and the scaling loop tell the `Observer` of every route, finished call,
finished workflow and scale decision (cheap appends and counter increments on the event loop). It
keeps the recent calls of each replica and model (service time next to the forecast made at
dispatch), the workflows finished within the last five minutes and a bounded decision log, and
builds the one snapshot (`TopReply`) that `swarmx top` asks for and the metrics read.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

from swarmx.clock import Clock
from swarmx.cluster import NodeTable
from swarmx.daemon.scaling import Decision
from swarmx.daemon.workflows import WorkflowService
from swarmx.metrics import SchedulerMetrics
from swarmx.models.online import OnlineLearner
from swarmx.protocol import (
    DecisionView,
    ModelStats,
    PredictorStatus,
    QueryTop,
    ReplicaState,
    ReplicaStats,
    SchedulerInfo,
    TopReply,
    WorkflowBrief,
    WorkflowSummary,
    from_builtins,
)
from swarmx.sched.dispatch import TOOL_POOL, Assign, pool_of
from swarmx.sched.scaler import lead_time_s
from swarmx.stats import quantile
from swarmx.traces import TraceRecord
from swarmx.workflow.engine import WorkflowRun

WINDOW_S = 300.0
"""SLO attainment and workflow latency quantiles are over workflows finished this recently."""
RECENT_CALLS = 200
"""Finished calls kept per replica and per model for actual-versus-forecast figures."""
DECISIONS = 500
"""Route and scale decisions kept for the log."""
MAX_LISTED = 1000
"""Most workflows or decisions one snapshot carries, whatever a client asks."""
REPLICAS_PER_STEP = 100
"""A snapshot yields the event loop after this many replicas (over 1,000 replicas, built in one
go it held the loop 100 ms at every scrape)."""


_Figures = tuple[dict[str, float], dict[str, float], dict[str, float]]


@dataclass
class Recent:
    """The last finished calls of one replica or model: service time and forecast."""

    calls: collections.deque[tuple[float, dict[str, float] | None]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_CALLS)
    )
    _figures: tuple[tuple[str, ...], _Figures] | None = None
    """The last `figures` and their levels, until a call is added."""

    def add(self, latency_s: float, pred: dict[str, float] | None) -> None:
        self.calls.append((latency_s, pred))
        self._figures = None

    def figures(self, levels: Sequence[str]) -> _Figures:
        """(actual quantiles, mean forecast quantiles, share within forecast), by level; a
        forecast figure only for levels some call was forecast at. Kept until the next call
        comes: every snapshot asks for every replica's, and most have had no call since."""
        key = tuple(levels)
        if self._figures is None or self._figures[0] != key:
            self._figures = (key, self._work_out(key))
        return self._figures[1]

    def _work_out(self, levels: Sequence[str]) -> _Figures:
        ordered = sorted(latency for latency, _ in self.calls)
        actual = {p: quantile(ordered, float(p)) for p in levels} if ordered else {}
        pred: dict[str, float] = {}
        covered: dict[str, float] = {}
        for p in levels:
            pairs = [(lat, f[p]) for lat, f in self.calls if f is not None and p in f]
            if pairs:
                pred[p] = sum(q for _, q in pairs) / len(pairs)
                covered[p] = sum(lat <= q for lat, q in pairs) / len(pairs)
        return actual, pred, covered


@dataclass
class PrefixHits:
    """The last finished calls of one replica: prompt tokens, those the engine served from its
    prefix cache (None where it did not say) and those the prefix index expected."""

    calls: collections.deque[tuple[int, int | None, int | None]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_CALLS)
    )

    def add(self, rec: TraceRecord) -> None:
        if rec.kind != "tool" and rec.prompt_tokens > 0:
            self.calls.append((rec.prompt_tokens, rec.cached_tokens, rec.cached_tokens_est))

    def rates(self) -> tuple[float | None, float | None]:
        """(reported share, expected share) of the prompt tokens, each over the calls that have
        the figure."""
        return self._rate(1), self._rate(2)

    def _rate(self, k: int) -> float | None:
        pairs = [(c[0], c[k]) for c in self.calls if c[k] is not None]
        prompt = sum(p for p, _ in pairs)
        return min(1.0, sum(h or 0 for _, h in pairs) / prompt) if prompt else None


@dataclass(frozen=True)
class _Finished:
    mono: float
    state: str
    latency_s: float
    slo_s: float | None


class Observer:
    """Hooks itself into the workflow service (``service.observer``) on construction; the
    scheduler tells it of scale decisions."""

    def __init__(
        self,
        service: WorkflowService,
        nodes: NodeTable,
        learner: OnlineLearner,
        clock: Clock,
        metrics: SchedulerMetrics,
        *,
        router: str,
        scaler: str,
        window_s: float = WINDOW_S,
    ) -> None:
        self.service = service
        self.nodes = nodes
        self.learner = learner
        self.clock = clock
        self.metrics = metrics
        self.router = router
        self.scaler = scaler
        self.window_s = window_s
        self.levels = [f"{p:g}" for p in learner.levels]
        self.replicas: dict[str, Recent] = {}
        self.hits: dict[str, PrefixHits] = {}
        self.models: dict[str, Recent] = {}
        self.decisions: collections.deque[DecisionView] = collections.deque(maxlen=DECISIONS)
        self.finished = 0
        self._window: collections.deque[_Finished] = collections.deque()
        service.observer = self

    # --- events -----------------------------------------------------------------------------

    def routed(self, a: Assign, now_s: float) -> None:
        call, view = a.ticket.call, a.replica
        model = pool_of(call)
        self.decisions.append(
            DecisionView(
                now_s,
                "route",
                model,
                view.replica,
                call.call_id,
                a.service.as_dict() if a.service is not None else None,
                a.completion.as_dict() if a.completion is not None else None,
            )
        )
        self.metrics.routes.labels(model, view.node, self.router).inc()

    def call_done(self, rec: TraceRecord) -> None:
        model = TOOL_POOL if rec.kind == "tool" else rec.model
        self.metrics.calls.labels(model, "ok" if rec.ok else "error").inc()
        if not rec.ok:
            return
        self.metrics.call_latency.labels(model).observe(rec.latency_s)
        self.metrics.call_queue.labels(model).observe(rec.queue_s)
        if rec.cached_tokens is not None and rec.kind != "tool":
            self.metrics.prompt_tokens.labels(model).inc(rec.prompt_tokens)
            self.metrics.cached_tokens.labels(model).inc(min(rec.cached_tokens, rec.prompt_tokens))
        self.hits.setdefault(rec.replica, PrefixHits()).add(rec)
        self.replicas.setdefault(rec.replica, Recent()).add(rec.latency_s, rec.pred)
        self.models.setdefault(model, Recent()).add(rec.latency_s, rec.pred)

    def workflow_finished(self, state: str, latency_s: float, slo_s: float | None) -> None:
        self.finished += 1
        self.metrics.workflows.labels(state).inc()
        if state == "cancelled":  # the user's doing: neither a latency nor an SLO outcome
            return
        if state == "succeeded":
            self.metrics.workflow_latency.observe(latency_s)
        if slo_s is not None:
            met = state == "succeeded" and latency_s <= slo_s
            self.metrics.slo.labels("met" if met else "missed").inc()
        self._window.append(_Finished(self.clock.monotonic(), state, latency_s, slo_s))

    def scaled(self, d: Decision) -> None:
        self.decisions.append(
            DecisionView(d.ts, "scale", d.model, f"{d.before} -> {d.target}", d.reason, d.service)
        )
        self.metrics.scales.labels(d.model, "up" if d.target > d.before else "down").inc()

    # --- the snapshot -----------------------------------------------------------------------

    def summary(self) -> WorkflowSummary:
        now = self.clock.monotonic()
        while self._window and now - self._window[0].mono > self.window_s:
            self._window.popleft()
        recent = list(self._window)
        with_slo = [f for f in recent if f.slo_s is not None]
        met = [f for f in with_slo if f.state == "succeeded" and f.latency_s <= (f.slo_s or 0)]
        ok = sorted(f.latency_s for f in recent if f.state == "succeeded")
        return WorkflowSummary(
            running=len(self.service.runs),
            finished=self.finished,
            window_s=self.window_s,
            window_finished=len(recent),
            window_slo_total=len(with_slo),
            window_slo_met=len(met),
            latency_p50_s=quantile(ok, 0.5) if ok else None,
            latency_p95_s=quantile(ok, 0.95) if ok else None,
            latency_p99_s=quantile(ok, 0.99) if ok else None,
        )

    async def snapshot(self, info: SchedulerInfo, query: QueryTop | None = None) -> TopReply:
        """Everything `swarmx top` shows, as of now (give or take the frames handled while it
        yields the loop between replicas)."""
        q = query or QueryTop()
        replicas = await self._replica_stats()
        self._forget({r.replica for r in replicas})
        now_mono, now = self.clock.monotonic(), self.clock.time()
        return TopReply(
            ts=now,
            scheduler=info,
            router=self.router,
            scaler=self.scaler,
            nodes=self.nodes.views(now_mono),
            models=self._model_stats(replicas),
            replicas=replicas,
            workflows=self._workflows(min(max(q.workflows, 0), MAX_LISTED), now),
            summary=self.summary(),
            predictor=from_builtins(PredictorStatus, self.learner.status()),
            decisions=list(reversed(self.decisions))[: min(max(q.decisions, 0), MAX_LISTED)],
        )

    async def _replica_stats(self) -> list[ReplicaStats]:
        out: list[ReplicaStats] = []
        views = sorted(self.service.dispatcher.views(), key=lambda v: v.replica)
        for k, v in enumerate(views):
            if k and not k % REPLICAS_PER_STEP:
                await asyncio.sleep(0)
            tel = self.nodes.telemetry(v.node)
            rt = next((r for r in tel.replicas if r.replica == v.replica), None) if tel else None
            recent = self.replicas.get(v.replica, Recent())
            actual, pred, covered = recent.figures(self.levels)
            hit, hit_est = self.hits.get(v.replica, PrefixHits()).rates()
            state: ReplicaState = (
                "draining"
                if v.replica in self.service.draining
                else "serving"
                if v.node in self.nodes and self.nodes.state(v.node) == "live"
                else "unroutable"
            )
            out.append(
                ReplicaStats(
                    replica=v.replica,
                    node=v.node,
                    model=v.model,
                    device=v.device,
                    concurrency=v.concurrency,
                    state=state,
                    outstanding=v.outstanding,
                    queued=rt.queued if rt else None,
                    inflight=rt.inflight if rt else None,
                    completed=rt.completed if rt else None,
                    failed=rt.failed if rt else None,
                    calls=len(recent.calls),
                    actual_s=actual,
                    pred_s=pred,
                    covered=covered,
                    prefix_hit=hit,
                    prefix_hit_est=hit_est,
                )
            )
        return out

    def _model_stats(self, replicas: list[ReplicaStats]) -> list[ModelStats]:
        """Per model served, queued for or scalable (a pool scaled to zero is shown too)."""
        dispatcher = self.service.dispatcher
        warmups, restarts = self._pools()
        names = {r.model for r in replicas} | set(dispatcher.queued_models()) | set(warmups)
        out = []
        for model in sorted(names):
            recent = self.models.get(model, Recent())
            actual, pred, covered = recent.figures(self.levels)
            out.append(
                ModelStats(
                    model=model,
                    replicas=sum(r.model == model and r.state == "serving" for r in replicas),
                    queued=dispatcher.queued(model),
                    calls=len(recent.calls),
                    actual_s=actual,
                    pred_s=pred,
                    covered=covered,
                    warmup_p90_s=lead_time_s(warmups.get(model, []), 0.0),
                    engine_restarts=restarts.get(model, 0),
                )
            )
        return out

    def _pools(self) -> tuple[dict[str, list[float]], dict[str, int]]:
        """Per model the live nodes can scale, the start-ups they measured (pooled as the
        scaler pools them: `ScaleController`) and the engines they restarted."""
        warmups: dict[str, list[float]] = {}
        restarts: dict[str, int] = {}
        for node, pools in self.service.pools.items():
            if node not in self.nodes or self.nodes.state(node) != "live":
                continue
            for pool in pools:
                if pool.model != TOOL_POOL:
                    warmups.setdefault(pool.model, []).extend(pool.warmup_s)
                    restarts[pool.model] = restarts.get(pool.model, 0) + pool.restarts
        return warmups, restarts

    def _forget(self, replicas: set[str]) -> None:
        """Drop the recent calls of replicas that are gone (scaled down, node lost)."""
        for name in [r for r in self.replicas if r not in replicas]:
            del self.replicas[name]
        for name in [r for r in self.hits if r not in replicas]:
            del self.hits[name]

    def _workflows(self, limit: int, now: float) -> list[WorkflowBrief]:
        running = self.service.running()[:limit]
        out = [self._running(run, submitted, now) for run, submitted in running]
        out += self._sessions(limit - len(out), now)
        if len(out) < limit:
            for row in self.service.store.workflows(limit=limit):
                if row.state == "running" or len(out) >= limit:
                    continue
                latency = (row.finished_ts or now) - row.submitted_ts
                out.append(
                    WorkflowBrief(
                        row.id,
                        row.name,
                        row.state,
                        row.submitted_ts,
                        latency,
                        row.slo_s,
                        None,
                        None,
                        None,
                    )
                )
        return out

    def _sessions(self, limit: int, now: float) -> list[WorkflowBrief]:
        """Open gateway sessions, oldest first, as running workflows of no fixed length: their
        calls done so far, those running, and their slack to the session's deadline."""
        sessions = sorted(self.service.sessions.items(), key=lambda item: item[1].started_ts)
        return [
            WorkflowBrief(
                ses_id,
                ses.key or ses.program,
                "running",
                ses.started_ts,
                now - ses.started_ts,
                ses.slo_s,
                None if ses.deadline_ts is None else ses.deadline_ts - now,
                ses.calls_done,
                None,
                ses.calls_open,
            )
            for ses_id, ses in sessions[: max(limit, 0)]
        ]

    def _running(self, run: WorkflowRun, submitted: float, now: float) -> WorkflowBrief:
        steps = run.spec.steps
        slack = None
        if run.spec.slo_s is not None:
            paths = self.service.outlook.critical_paths(run)
            slack = submitted + run.spec.slo_s - now - max(paths.values(), default=0.0)
        return WorkflowBrief(
            run.id,
            run.spec.name,
            run.state,
            submitted,
            now - submitted,
            run.spec.slo_s,
            slack,
            sum(run.step_state(s.id) == "succeeded" for s in steps),
            len(steps),
            len(run.outstanding()),
        )
