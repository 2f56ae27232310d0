"""Prometheus metrics (docs/metrics.md): one registry per daemon, served by prometheus_client's
HTTP server on a background thread, so a scrape never waits on the event loop nor it on a scrape.

Two kinds of series. Events (calls, routes, scale decisions, workflows) update thread-safe
counters and histograms as they happen. State (telemetry, queues, windows, the predictor) is
read at scrape time from the latest immutable snapshot the daemon published (a `Telemetry` on a
node, a `TopReply` on the scheduler): the HTTP thread never touches the loop's mutable state.
The same conversion turns a node's telemetry into series on the node agent and, for every node,
on the scheduler, so either can be scraped for node and GPU gauges.

Names start with ``swarmx_`` and carry their unit; labels are bounded (node, model, replica, gpu,
quantile, state), never call or workflow ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from swarmx.protocol import ReplicaPool, SchedulerInfo, Telemetry, TopReply

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
WORKFLOW_BUCKETS_S = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip


class MetricsError(OSError):
    """The metrics port could not be bound; the message names the address."""


class MetricsServer:
    """prometheus_client's WSGI server on a daemon thread, with a clean stop."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str) -> None:
        try:
            self._httpd: WSGIServer
            self._httpd, self._thread = start_http_server(port, addr, registry=registry)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise MetricsError(f"cannot serve metrics on {addr}:{port}: {why}") from None
        self.port: int = self._httpd.server_port
        self.url = f"http://{addr}:{self.port}/metrics"

    def close(self) -> None:
        """Idempotent; returns once the server thread has ended."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()


def serve(registry: CollectorRegistry, port: int, addr: str) -> MetricsServer | None:
    """Serve ``registry`` on ``addr:port``, or nothing when ``port`` is 0 (metrics off)."""
    return MetricsServer(registry, port, addr) if port else None


class _Snapshot(Collector):
    """Series computed at scrape time from whatever ``families`` reads (an immutable
    snapshot), on the HTTP server's thread."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families()


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


# --- a node's telemetry: on the node agent and, for each node, on the scheduler ---------------


def node_families(samples: Iterable[tuple[str, Telemetry]]) -> list[Metric]:
    """Node, GPU and replica series of each (node name, latest telemetry)."""
    node, gpu, rep = ["node"], ["node", "gpu"], ["node", "model", "replica"]
    cpu = _gauge("swarmx_node_cpu_utilization_ratio", "CPU in use, 0..1 of all cores.", node)
    mem_used = _gauge("swarmx_node_memory_used_bytes", "Memory in use.", node)
    mem_total = _gauge("swarmx_node_memory_total_bytes", "Physical memory.", node)
    load = _gauge("swarmx_node_load1", "One-minute load average.", node)
    collect = _gauge(
        "swarmx_node_telemetry_collect_seconds", "Time the agent took to collect a sample.", node
    )
    gpu_util = _gauge("swarmx_gpu_utilization_ratio", "GPU busy time, 0..1.", gpu)
    gpu_used = _gauge("swarmx_gpu_memory_used_bytes", "GPU memory in use.", gpu)
    gpu_total = _gauge("swarmx_gpu_memory_total_bytes", "GPU memory.", gpu)
    gpu_power = _gauge("swarmx_gpu_power_watts", "GPU power draw.", gpu)
    gpu_temp = _gauge("swarmx_gpu_temperature_celsius", "GPU temperature.", gpu)
    queued = _gauge(
        "swarmx_replica_queued_calls", "Calls waiting for a slot on the replica (on its node).", rep
    )
    inflight = _gauge("swarmx_replica_inflight_calls", "Calls running on the replica.", rep)
    kv = _gauge(
        "swarmx_replica_kv_cache_usage_ratio", "KV cache in use, where the server reports it.", rep
    )
    calls = CounterMetricFamily(
        "swarmx_replica_calls",
        "Calls the replica finished since it started, by outcome (ok, error).",
        labels=[*rep, "outcome"],
    )
    refused = CounterMetricFamily(
        "swarmx_replica_kv_events_refused",
        "The engine's KV-event frames and events the node could not read.",
        labels=rep,
    )
    resets = CounterMetricFamily(
        "swarmx_replica_prefix_cache_resets",
        "Times the engine's prefix cache started over (cleared, restarted, events missed).",
        labels=rep,
    )
    for name, tel in samples:
        host = tel.host
        cpu.add_metric([name], host.cpu_percent / 100)
        mem_used.add_metric([name], host.mem_used_bytes)
        mem_total.add_metric([name], host.mem_total_bytes)
        load.add_metric([name], host.load_1m)
        collect.add_metric([name], tel.collect_s)
        for g in tel.gpus:
            where = [name, str(g.index)]
            for family, value in (
                (gpu_util, None if g.util_percent is None else g.util_percent / 100),
                (gpu_used, g.mem_used_bytes),
                (gpu_total, g.mem_total_bytes),
                (gpu_power, g.power_w),
                (gpu_temp, g.temperature_c),
            ):
                if value is not None:  # what NVML cannot report on a device is left out
                    family.add_metric(where, value)
        for r in tel.replicas:
            which = [name, r.model, r.replica]
            queued.add_metric(which, r.queued)
            inflight.add_metric(which, r.inflight)
            if r.kv_cache_usage is not None:
                kv.add_metric(which, r.kv_cache_usage)
            calls.add_metric([*which, "ok"], r.completed)
            calls.add_metric([*which, "error"], r.failed)
            refused.add_metric(which, r.cache_events_refused)
            resets.add_metric(which, r.cache_resets)
    return [
        cpu,
        mem_used,
        mem_total,
        load,
        collect,
        gpu_util,
        gpu_used,
        gpu_total,
        gpu_power,
        gpu_temp,
        queued,
        inflight,
        kv,
        calls,
        refused,
        resets,
    ]


class NodeMetrics:
    """The node agent's registry: its latest telemetry and whether it is registered."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        self._latest: tuple[Telemetry, bool, dict[str, int], Sequence[ReplicaPool]] | None = None
        self.registry.register(_Snapshot(self._families))

    def publish(
        self,
        telemetry: Telemetry,
        registered: bool,
        bad_frames: dict[str, int] | None = None,
        pools: Sequence[ReplicaPool] = (),
    ) -> None:
        """Called from the event loop; replaces the reference the HTTP thread reads."""
        self._latest = (telemetry, registered, dict(bad_frames or {}), list(pools))

    def _families(self) -> list[Metric]:
        latest = self._latest
        if latest is None:
            return []
        tel, registered, bad_frames, pools = latest
        up = _gauge(
            "swarmx_node_registered",
            "1 while the agent is registered with a scheduler that answers.",
            ["node"],
        )
        up.add_metric([self.node], float(registered))
        bad = CounterMetricFamily(
            "swarmx_node_bad_frames",
            "Frames the agent dropped as invalid, by reason; 'internal': a handler failed.",
            labels=["node", "reason"],
        )
        for reason, count in sorted(bad_frames.items()):
            bad.add_metric([self.node, reason], count)
        restarts = CounterMetricFamily(
            "swarmx_engine_restarts",
            "Launched engines that failed (exited or hung) and were started again, by model.",
            labels=["node", "model", "backend"],
        )
        warmup = _gauge(
            "swarmx_engine_warmup_seconds",
            "The latest start-up of a replica the node started, launch to ready, by model.",
            ["node", "model", "backend"],
        )
        for pool in pools:
            labels = [self.node, pool.model, pool.backend]
            restarts.add_metric(labels, pool.restarts)
            if pool.warmup_s:
                warmup.add_metric(labels, pool.warmup_s[-1])
        return [*node_families([(self.node, tel)]), up, bad, restarts, warmup]


# --- the scheduler ------------------------------------------------------------------------------


class SchedulerMetrics:
    """The scheduler's registry: event counters and histograms, and the cluster snapshot."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.call_latency = Histogram(
            "swarmx_call_latency_seconds",
            "Service time of finished calls on their replica, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.call_queue = Histogram(
            "swarmx_call_queue_seconds",
            "Time finished calls waited from ready to service start, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.calls = Counter(
            "swarmx_calls",
            "Finished calls by model and outcome (ok, error).",
            ["model", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "swarmx_prompt_tokens",
            "Prompt tokens of finished calls whose engine reports its prefix-cache hits, by model.",
            ["model"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "swarmx_cached_prompt_tokens",
            "Of those, the prompt tokens the engine served from its prefix cache, by model.",
            ["model"],
            registry=r,
        )
        self.routes = Counter(
            "swarmx_route_decisions",
            "Calls sent to a replica, by model, node and router policy.",
            ["model", "node", "policy"],
            registry=r,
        )
        self.scales = Counter(
            "swarmx_scale_decisions",
            "Scaling decisions that changed a model's replica target, by direction (up, down).",
            ["model", "direction"],
            registry=r,
        )
        self.workflows = Counter(
            "swarmx_workflows_finished",
            "Workflows finished, by state (succeeded, failed, cancelled).",
            ["state"],
            registry=r,
        )
        self.workflow_latency = Histogram(
            "swarmx_workflow_latency_seconds",
            "End-to-end latency of succeeded workflows.",
            buckets=WORKFLOW_BUCKETS_S,
            registry=r,
        )
        self.slo = Counter(
            "swarmx_workflow_slo",
            "Finished workflows with an SLO, by outcome (met: succeeded within it; missed).",
            ["outcome"],
            registry=r,
        )
        self._snapshot: TopReply | None = None
        self.refresh: Callable[[], TopReply] | None = None
        """Builds a fresh snapshot for a scrape (on the HTTP thread: it hands the work to the
        event loop and waits); the last one is served if it fails or takes too long."""
        r.register(_Snapshot(self._families))

    def publish(self, reply: TopReply) -> None:
        """Replaces the snapshot the HTTP thread reads."""
        self._snapshot = reply

    def _families(self) -> list[Metric]:
        if self.refresh is not None:
            try:
                self._snapshot = self.refresh()
            except Exception as exc:  # stalled loop, or a snapshot bug: serve the last one
                log.warning("metrics: serving the last snapshot (%s: %s)", type(exc).__name__, exc)
        return [] if self._snapshot is None else scheduler_families(self._snapshot)


def scheduler_families(reply: TopReply) -> list[Metric]:
    """The series a cluster snapshot holds."""
    nodes = _gauge("swarmx_nodes", "Nodes by state (live, stale, down).", ["state"])
    for state in ("live", "stale", "down"):
        nodes.add_metric([state], sum(n.state == state for n in reply.nodes))
    seen = _gauge(
        "swarmx_node_last_seen_age_seconds", "Time since the scheduler heard from a node.", ["node"]
    )
    for n in reply.nodes:
        seen.add_metric([n.name], n.last_seen_age_s)
    reporting = [(n.name, n.telemetry) for n in reply.nodes if n.telemetry and n.state != "down"]

    replicas = _gauge("swarmx_replicas", "Replicas taking calls, by model.", ["model"])
    waiting = _gauge(
        "swarmx_model_queued_calls", "Calls waiting at the scheduler for a replica.", ["model"]
    )
    q = ["model", "quantile"]
    actual = _gauge(
        "swarmx_call_latency_actual_seconds",
        "Quantiles of the service time of the model's recent calls.",
        q,
    )
    pred = _gauge(
        "swarmx_call_latency_predicted_seconds",
        "Mean forecast quantile of the same recent calls, made at dispatch.",
        q,
    )
    covered = _gauge(
        "swarmx_call_forecast_coverage_ratio",
        "Share of the model's recent calls that finished within their forecast quantile.",
        q,
    )
    for m in reply.models:
        replicas.add_metric([m.model], m.replicas)
        waiting.add_metric([m.model], m.queued)
        for family, values in ((actual, m.actual_s), (pred, m.pred_s), (covered, m.covered)):
            for level, value in values.items():
                family.add_metric([m.model, level], value)
    outstanding = _gauge(
        "swarmx_replica_outstanding_calls",
        "Calls the scheduler has sent to the replica and not seen finish.",
        ["node", "model", "replica"],
    )
    hit = _gauge(
        "swarmx_replica_prefix_hit_ratio",
        "Share of the replica's recent prompt tokens its engine served from its prefix cache.",
        ["node", "model", "replica"],
    )
    for r in reply.replicas:
        outstanding.add_metric([r.node, r.model, r.replica], r.outstanding)
        if r.prefix_hit is not None:
            hit.add_metric([r.node, r.model, r.replica], r.prefix_hit)

    s = reply.summary
    running = _gauge("swarmx_workflows_running", "Workflows running now.", [])
    running.add_metric([], s.running)
    attainment = _gauge(
        "swarmx_slo_attainment_ratio",
        "Share of the workflows with an SLO finished in the window that met it.",
        [],
    )
    if s.window_slo_total:
        attainment.add_metric([], s.window_slo_met / s.window_slo_total)
    window = _gauge(
        "swarmx_workflow_latency_window_seconds",
        "Quantiles of the latency of workflows that succeeded in the window.",
        ["quantile"],
    )
    for level, latency in (
        ("0.5", s.latency_p50_s),
        ("0.95", s.latency_p95_s),
        ("0.99", s.latency_p99_s),
    ):
        if latency is not None:
            window.add_metric([level], latency)
    window_s = _gauge("swarmx_workflow_window_seconds", "Length of that window.", [])
    window_s.add_metric([], s.window_s)

    p = reply.predictor
    info = _gauge(
        "swarmx_predictor_info", "The live latency predictor (value 1).", ["version", "kind"]
    )
    info.add_metric([p.version, p.kind], 1)
    coverage = _gauge(
        "swarmx_predictor_coverage_ratio",
        "Recent share of calls within the predictor's forecast quantile, by level.",
        ["quantile"],
    )
    for level, value in p.recent_coverage.items():
        coverage.add_metric([level], value)
    observed = CounterMetricFamily(
        "swarmx_predictor_observed_calls", "Finished calls the predictor learned from.", labels=[]
    )
    observed.add_metric([], p.calls_seen)
    swaps = CounterMetricFamily(
        "swarmx_predictor_swaps",
        "Retrained models, by outcome (installed, refused by the guard).",
        labels=["outcome"],
    )
    swaps.add_metric(["installed"], p.swaps)
    swaps.add_metric(["refused"], p.refused_swaps)

    info_s = reply.scheduler
    uptime = _gauge("swarmx_scheduler_uptime_seconds", "Time since the scheduler started.", [])
    uptime.add_metric([], info_s.uptime_s)
    bad = CounterMetricFamily(
        "swarmx_scheduler_bad_frames", "Frames dropped as invalid, by reason.", labels=["reason"]
    )
    for reason, count in sorted(info_s.bad_frames.items()):
        bad.add_metric([reason], count)
    refused = CounterMetricFamily(
        "swarmx_auth_refused",
        "Connections and frames refused by the security checks, by reason (docs/security.md).",
        labels=["reason"],
    )
    for reason, count in sorted(info_s.auth_refused.items()):
        refused.add_metric([reason], count)
    errors = CounterMetricFamily(
        "swarmx_scheduler_handler_errors",
        "Frames whose handler raised (answered 'internal'; the scheduler went on).",
    )
    errors.add_metric([], info_s.handler_errors)
    return [
        nodes,
        seen,
        *node_families(reporting),
        replicas,
        waiting,
        actual,
        pred,
        covered,
        outstanding,
        running,
        attainment,
        window,
        window_s,
        info,
        coverage,
        observed,
        swaps,
        uptime,
        bad,
        refused,
        errors,
        *_fault_families(info_s),
    ]


def _fault_families(info_s: SchedulerInfo) -> list[Metric]:
    """What the scheduler refused or repaired (docs/reliability.md)."""
    dropped = CounterMetricFamily(
        "swarmx_results_dropped",
        "Results not applied, by reason: late (re-run, cancelled or already in), fenced (from a "
        "node the call no longer belongs to).",
        labels=["reason"],
    )
    for reason, count in sorted(info_s.results_dropped.items()):
        dropped.add_metric([reason], count)
    fenced = CounterMetricFamily(
        "swarmx_fenced_calls",
        "Calls a node still ran after they were given to another node (cancelled there).",
    )
    fenced.add_metric([], info_s.fenced_calls)
    overloaded = CounterMetricFamily(
        "swarmx_submit_overloaded",
        "Submissions refused because the scheduler held its most queued workflows or calls.",
    )
    overloaded.add_metric([], info_s.overloaded)
    gap = _gauge(
        "swarmx_scheduler_loop_gap_max_seconds",
        "The longest stall of the scheduler's event loop over the last 10 s.",
        [],
    )
    gap.add_metric([], info_s.loop_gap_max_s)
    return [dropped, fenced, overloaded, gap, *_gateway_families(info_s)]


def _gateway_families(info_s: SchedulerInfo) -> list[Metric]:
    """The gateways' calls as the scheduler holds them (docs/gateway.md)."""
    calls = _gauge("swarmx_gateway_calls_open", "Gateway calls queued or running.", [])
    calls.add_metric([], info_s.gateway_calls)
    sessions = _gauge("swarmx_gateway_sessions_open", "Gateway sessions open.", [])
    sessions.add_metric([], info_s.gateway_sessions)
    refused = CounterMetricFamily(
        "swarmx_gateway_calls_refused",
        "Gateway calls answered with an error before running, by reason (model, quota, "
        "overloaded).",
        labels=["reason"],
    )
    for reason, count in sorted(info_s.gateway_refused.items()):
        refused.add_metric([reason], count)
    return [calls, sessions, refused]


# --- the gateway ------------------------------------------------------------------------------


class GatewayMetrics:
    """What `swarmx gateway` serves on its metrics port (docs/gateway.md)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "swarmx_gateway_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.refused = Counter(
            "swarmx_gateway_auth_refused",
            "Requests refused before any work, by reason (missing_key, unknown_key, not_loopback).",
            ["reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "swarmx_gateway_time_to_first_token_seconds",
            "Request received to first output chunk, streamed calls.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.aborted = Counter(
            "swarmx_gateway_client_aborts",
            "Calls whose client went away before the end (stopped on the engine).",
            registry=self.registry,
        )
