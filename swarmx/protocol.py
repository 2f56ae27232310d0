"""Wire messages between node agents, the scheduler and clients.

Every frame is one msgpack map, the *envelope*::

    {"v": PROTOCOL_VERSION, "type": "telemetry", "sender": "node-1", "seq": 42, "ts": 1.7e9,
     "body": {...}}

Bodies are frozen msgspec Structs registered by their ``TYPE``. Decoding is msgspec's compiled,
validating codec: it checks the size limit, the version, the type and every field, including the
ranges below (intervals > 0, counts, list and string lengths bounded, no NaN or infinity where a
peer sends a number), and raises `ProtocolError` (with a short ``reason`` that daemons count)
instead of letting bad input reach a handler. Units live in field names.

Only the messages a daemon accepts from a peer carry ranges; the replies the scheduler sends its
clients (views of its own state) are checked for type only.

Over 600 lines, on purpose: the whole wire contract, every message with its ranges, is read in
one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 4 * 1024 * 1024
"""Default decode limit; a dispatch carrying a long prompt still fits comfortably."""


M = TypeVar("M", bound=msgspec.Struct)
_field = msgspec.field


class ProtocolError(ValueError):
    """A frame that cannot be accepted; ``reason`` is a counter label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# --- value ranges of what peers send ------------------------------------------------------------

NodeName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
"""The names `[node] name` accepts: they become log fields and metric labels."""
Name = Annotated[str, Meta(max_length=256)]
"""Ids, model and replica names, labels."""
Note = Annotated[str, Meta(max_length=16_384)]
"""Error messages, reasons, details."""
Count = Annotated[int, Meta(ge=0, le=1 << 40)]
Size = Annotated[int, Meta(ge=0, le=1 << 62)]
"""Bytes."""
Seq = Annotated[int, Meta(ge=-1, le=1 << 62)]
"""A frame number (-1: a frame that could not be read)."""
Seconds = Annotated[float, Meta(ge=0, le=1e9)]
"""A duration (finite, not negative)."""
Interval = Annotated[float, Meta(gt=0, le=86_400)]
"""A period a peer promises (heartbeats): zero would divide the node sweep by zero."""
Timestamp = Annotated[float, Meta(ge=0, le=1e11)]
Number = Annotated[float, Meta(ge=-1e15, le=1e15)]
"""A finite reading (percentages, loads, rates, temperatures)."""
Fraction = Annotated[float, Meta(ge=0, le=1)]
Replicas = Annotated[int, Meta(ge=0, le=4096)]
"""Replicas of one model on one node."""
Slots = Annotated[int, Meta(ge=0, le=1 << 20)]

MAX_GPUS = 256
MAX_REPLICAS = 4096
MAX_CORES = 16_384
MAX_LIST = 1 << 20
"""Call ids, latencies, inputs, command arguments: far above any real frame's."""
MAX_REMOVED = 1 << 16
"""Evicted prefix blocks one telemetry frame reports (`swarmx.backends.kvevents.MAX_REMOVED`)."""
BlockId = Annotated[int, Meta(ge=0, lt=1 << 53)]
"""A prefix block's id (`swarmx.sched.prefix.HASH_BITS`)."""
MAX_RUNNING = 65_536
"""Calls one node reports running at once."""


# --- registration and telemetry ---------------------------------------------------------------


class GpuInfo(msgspec.Struct, frozen=True):
    index: Count
    name: Name
    uuid: Name
    mem_total_bytes: Size


def replica_name(node: str, model: str, index: int) -> str:
    """``node/model#index``: the scheduler accepts only replicas named after their node."""
    return f"{node}/{model}#{index}"


def replica_index(replica: str) -> int:
    """``node/model#3`` -> 3; -1 for a name without one."""
    tail = replica.rpartition("#")[2]
    return int(tail) if tail.isdigit() else -1


MAX_WARMUPS = 32
"""Start-up times a node reports per pool."""


class ReplicaInfo(msgspec.Struct, frozen=True):
    """A model server instance a node serves, ready for calls."""

    replica: Name
    model: Name
    backend: Name
    device: Name
    concurrency: Slots
    draining: bool = False
    """Being stopped by a scale-down: it finishes the calls it has and takes no new ones."""


class ReplicaPool(msgspec.Struct, frozen=True):
    """A model a node can scale: one per model and backend in its ``[[node.replicas]]``, whose
    first entry is the template of the replicas it starts."""

    model: Name
    backend: Name
    device: Name
    concurrency: Slots
    declared: Replicas
    """Replicas the node's config declares (``count``): what it starts with."""
    max_count: Replicas
    """Most replicas of it this node will run."""
    target: Replicas
    """Replicas running (not draining) or starting now: the node's latest scale target."""
    startup_delay_s: Seconds = 0.0
    """The configured start-up time: the prior for the lead time until starts are measured."""
    warmup_s: Annotated[list[Seconds], Meta(max_length=MAX_WARMUPS)] = msgspec.field(
        default_factory=list
    )
    """Measured times from launch to ready of this node's recent starts of this pool, oldest
    first (at most `MAX_WARMUPS`): the lead time a scale-up takes here."""
    restarts: Count = 0
    """Launched engines of this pool that failed (exited, or stopped answering their health
    path) and were started again, since the agent started."""


class Hello(msgspec.Struct, frozen=True):
    """Registration: who the node is and what it has. Sent until acknowledged."""

    TYPE: ClassVar[str] = "hello"
    node: NodeName
    host: Name
    pid: Count
    version: Name
    cpu_cores_logical: Annotated[int, Meta(ge=0, le=MAX_CORES)]
    cpu_cores_physical: Annotated[int, Meta(ge=0, le=MAX_CORES)] | None
    mem_total_bytes: Size
    gpus: Annotated[list[GpuInfo], Meta(max_length=MAX_GPUS)]
    replicas: Annotated[list[ReplicaInfo], Meta(max_length=MAX_REPLICAS)]
    heartbeat_interval_s: Interval
    telemetry_interval_s: Interval
    started_ts: Timestamp
    labels: Annotated[dict[Name, Name], Meta(max_length=256)] = _field(default_factory=dict)
    pools: Annotated[list[ReplicaPool], Meta(max_length=MAX_REPLICAS)] = msgspec.field(
        default_factory=list
    )
    """What the node can scale. A node sends ``hello`` again whenever its replica list changes
    (a replica started by a scale command is ready, a drained one has stopped)."""
    running: Annotated[dict[Name, Name], Meta(max_length=MAX_RUNNING)] = _field(
        default_factory=dict
    )
    """As in `Heartbeat`: what a restarted scheduler adopts instead of running it again."""


class HostSample(msgspec.Struct, frozen=True):
    cpu_percent: Number
    cpu_percent_per_core: Annotated[list[Number], Meta(max_length=MAX_CORES)]
    load_1m: Number
    load_5m: Number
    load_15m: Number
    mem_total_bytes: Size
    mem_used_bytes: Size
    mem_available_bytes: Size
    swap_total_bytes: Size
    swap_used_bytes: Size
    disk_read_bytes_per_s: Number
    disk_write_bytes_per_s: Number
    net_recv_bytes_per_s: Number
    net_sent_bytes_per_s: Number


class GpuProcess(msgspec.Struct, frozen=True):
    pid: Count
    name: Name
    mem_used_bytes: Size | None


class GpuSample(msgspec.Struct, frozen=True):
    """One GPU's state; a field NVML cannot report on this device is None, not an error."""

    index: Count
    name: Name
    uuid: Name
    util_percent: Number | None
    mem_util_percent: Number | None
    mem_used_bytes: Size | None
    mem_total_bytes: Size | None
    power_w: Number | None
    power_limit_w: Number | None
    temperature_c: Number | None
    sm_clock_mhz: Count | None
    processes: Annotated[list[GpuProcess], Meta(max_length=4096)] = msgspec.field(
        default_factory=list
    )


class ReplicaRuntime(msgspec.Struct, frozen=True):
    """What the scheduler needs to know about a replica's load between its own dispatches."""

    replica: Name
    model: Name
    queued: Count
    inflight: Count
    completed: Count
    failed: Count
    recent_latencies_s: Annotated[list[Seconds], Meta(max_length=MAX_LIST)] = msgspec.field(
        default_factory=list
    )
    engine_queued: Count | None = None
    """The model server's own queue (e.g. vLLM's waiting requests), where it reports one."""
    engine_running: Count | None = None
    kv_cache_usage: Fraction | None = None
    """Fraction of the server's KV cache in use (0..1), where it reports it."""
    cache_removed: Annotated[list[BlockId], Meta(max_length=MAX_REMOVED)] = _field(
        default_factory=list
    )
    """Prefix blocks (`swarmx.sched.prefix` ids) the engine evicted since the last telemetry,
    where it says (`swarmx.backends.base.CacheReport`)."""
    cache_resets: Count = 0
    """Whole-cache clears the engine reported since its backend started."""
    cache_capacity_tokens: Count | None = None
    """Tokens the engine's prefix cache holds at most, where it says."""
    cache_events_refused: Count = 0
    """The engine's KV-event frames and events the node could not read, since the start."""


class Telemetry(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "telemetry"
    host: HostSample
    gpus: Annotated[list[GpuSample], Meta(max_length=MAX_GPUS)]
    replicas: Annotated[list[ReplicaRuntime], Meta(max_length=MAX_REPLICAS)]
    collect_s: Seconds
    """Wall time the agent spent collecting this sample (its own overhead, visible centrally)."""


class Heartbeat(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "heartbeat"
    uptime_s: Seconds
    unsent_frames: Count = 0
    """Frames the agent could not send (scheduler unreachable) since it started."""
    running: Annotated[dict[Name, Name], Meta(max_length=MAX_RUNNING)] = _field(
        default_factory=dict
    )
    """The calls the node is running (call id -> replica): the scheduler adopts them after a
    restart and cancels those it has given to another node since (fencing)."""
    telemetry: Telemetry | None = None
    """The node's sample, carried when it reports at the heartbeat's interval: one frame in and
    one out per node per second instead of two in (at 1,000 nodes, a tenth of the scheduler's
    time went on the second frame)."""


class Goodbye(msgspec.Struct, frozen=True):
    """Node -> scheduler: the node is leaving (SIGTERM). The first, with ``final`` false, stops
    new calls at once; the last hands back the calls it did not finish in its drain time, to be
    re-run elsewhere right away instead of after a heartbeat timeout."""

    TYPE: ClassVar[str] = "goodbye"
    final: bool = False
    handed_back: Annotated[list[Name], Meta(max_length=MAX_RUNNING)] = _field(default_factory=list)


# --- work -------------------------------------------------------------------------------------


class Dispatch(msgspec.Struct, frozen=True):
    """Scheduler -> node: run one call on one replica."""

    TYPE: ClassVar[str] = "dispatch"
    call_id: Name
    workflow_id: Name
    step_id: Name
    replica: Name
    kind: Literal["llm", "model", "tool"]
    model: Name
    prompt: str = ""
    max_tokens: Count = 0
    inputs: Annotated[dict[Name, str], Meta(max_length=MAX_LIST)] = msgspec.field(
        default_factory=dict
    )
    command: Annotated[list[str], Meta(max_length=MAX_LIST)] = _field(default_factory=list)
    timeout_s: Seconds | None = None
    api: Literal["", "chat", "completions"] = ""
    """A gateway call: the OpenAI endpoint it came to. The node streams `Chunk` frames for it."""
    body: str = ""
    """A gateway call: the client's request (a JSON object, without model and stream)."""


class Result(msgspec.Struct, frozen=True):
    """Node -> scheduler: how a dispatched call ended, with its timings."""

    TYPE: ClassVar[str] = "result"
    call_id: Name
    replica: Name
    ok: bool
    output: str
    error: str
    queue_s: Seconds
    latency_s: Seconds
    ttft_s: Seconds | None
    prompt_tokens: Count
    output_tokens: Count
    cached_tokens: Count | None = None
    """Prompt tokens the engine served from its prefix cache; None where it does not say."""
    infra: bool = False
    """It failed because its replica failed (the engine died or hung), not because of the call:
    the scheduler runs it elsewhere without using up the step's retries."""
    stop_reason: Annotated[str, Meta(max_length=64)] = ""
    """Why the output ended, in the engine's words (``stop``, ``length``, ``tool_calls``)."""
    output_kinds: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=8)] = _field(
        default_factory=list
    )
    """What the output carried: ``text``, ``tool_use``."""


class Chunk(msgspec.Struct, frozen=True):
    """Node -> scheduler -> gateway: output of a streamed gateway call so far, in order: each item
    is one OpenAI streaming chunk's JSON (the ``data`` of one server-sent event)."""

    TYPE: ClassVar[str] = "chunk"
    call_id: Name
    data: Annotated[list[str], Meta(max_length=MAX_LIST)]


class CancelCalls(msgspec.Struct, frozen=True):
    """Scheduler -> node: stop these calls (queued or running); no results are expected."""

    TYPE: ClassVar[str] = "cancel_calls"
    call_ids: Annotated[list[Name], Meta(max_length=MAX_LIST)]


class ScaleCommand(msgspec.Struct, frozen=True):
    """Scheduler -> node: run ``target_replicas`` replicas of ``model`` on this node (running
    or starting, draining ones not counted). Acknowledged (or refused with an `Error`) at once;
    the node announces the replicas it starts and stops with a new `Hello` when they are ready
    or gone."""

    TYPE: ClassVar[str] = "scale"
    model: Name
    backend: Name
    target_replicas: Replicas
    reason: Note = ""
    remove: Annotated[list[Name], Meta(max_length=MAX_REPLICAS)] = msgspec.field(
        default_factory=list
    )
    """For a scale-down: the replicas to stop (the scheduler no longer routes to them); each
    finishes its calls before it closes. Replicas still starting are cancelled first."""


class Ack(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "ack"
    ref_seq: Seq
    detail: Note = ""


class Error(msgspec.Struct, frozen=True):
    """A refusal of the frame numbered ``ref_seq`` (-1 when it could not be read)."""

    TYPE: ClassVar[str] = "error"
    ref_seq: Seq
    code: Name
    message: Note


# --- the gateway ------------------------------------------------------------------------------


class GatewayCall(msgspec.Struct, frozen=True):
    """Gateway -> scheduler: route and run one OpenAI request. The scheduler answers with
    `Chunk` frames as the engine streams, then one `CallEnded`."""

    TYPE: ClassVar[str] = "gateway_call"
    call_id: Name
    """Chosen by the gateway, unique among its calls."""
    session: Name
    """The agent session (``X-SwarmX-Session``, else the request's ``user``); "" for none."""
    client: Name
    """The API key's client name ("" without keys): quotas and ownership."""
    model: Name
    api: Literal["chat", "completions"]
    body: str
    prompt: str
    """The request flattened to text: what the predictor and the traces see."""
    max_tokens: Count = 0
    input_kinds: Annotated[list[Name], Meta(max_length=16)] = _field(default_factory=list)
    slo_s: Annotated[float, Meta(gt=0, le=1e7)] | None = None
    """``X-SwarmX-SLO-S``: seconds for the whole session (from its first call)."""
    priority: Annotated[int, Meta(ge=-1000, le=1000)] = 0
    timeout_s: Annotated[float, Meta(gt=0, le=86_400)] | None = None


class CallEnded(msgspec.Struct, frozen=True):
    """Scheduler -> gateway: a gateway call is over (after its last `Chunk`)."""

    TYPE: ClassVar[str] = "call_ended"
    call_id: Name
    ok: bool
    status: Annotated[int, Meta(ge=100, le=599)] = 200
    """The HTTP status that fits the ending (200, 429, 503, 504, 502...)."""
    error: Note = ""
    prompt_tokens: Count = 0
    output_tokens: Count = 0
    replica: Name = ""
    retry_after_s: Seconds | None = None


class AbortCall(msgspec.Struct, frozen=True):
    """Gateway -> scheduler: the client went away; stop the call, queued or running."""

    TYPE: ClassVar[str] = "abort_call"
    call_id: Name


# --- client requests --------------------------------------------------------------------------


class Submit(msgspec.Struct, frozen=True):
    """Client -> scheduler: a workflow file's text; the scheduler parses and validates it again."""

    TYPE: ClassVar[str] = "submit"
    source: Annotated[str, Meta(max_length=4096)]
    text: str
    overrides: Annotated[dict[Name, str], Meta(max_length=4096)] = msgspec.field(
        default_factory=dict
    )
    idempotency_key: Name = ""
    """Chosen by the client once per submission and sent again with each retry: the scheduler
    answers a key it has seen (from this client) with the workflow it made, not a second one."""


class Submitted(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "submitted"
    workflow_id: str
    existing: bool = False
    """The idempotency key was seen before: this is the workflow made then."""


class QueryWorkflows(msgspec.Struct, frozen=True):
    """One workflow in detail (with outputs), or the most recent ``limit`` without them."""

    TYPE: ClassVar[str] = "query_workflows"
    workflow_id: Name = ""
    limit: Annotated[int, Meta(ge=0, le=1000)] = 50


class CancelWorkflow(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "cancel_workflow"
    workflow_id: Name


class StepView(msgspec.Struct, frozen=True):
    """One execution of a step: ``id`` is the step id, with ``[i]`` for a fan-out instance."""

    id: str
    step: str
    index: int | None
    state: str
    attempt: int
    node: str
    replica: str
    queue_s: float | None
    latency_s: float | None
    ttft_s: float | None
    output_tokens: int | None
    error: str = ""
    output: str = ""
    pred: dict[str, float] | None = None
    """The predicted service-time quantiles of the call on its replica (``{"0.9": s}``)."""
    pred_completion: dict[str, float] | None = None
    """The router's predicted completion time (queue wait + service) at dispatch, if it made
    one."""


class WorkflowView(msgspec.Struct, frozen=True):
    id: str
    name: str
    state: str
    reason: str
    submitted_ts: float
    finished_ts: float | None
    latency_s: float | None
    slo_s: float | None
    steps: list[StepView]
    outputs: dict[str, str] = _field(default_factory=dict)
    """Outputs of the final steps (detailed queries only)."""


class WorkflowsReply(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "workflows"
    workflows: list[WorkflowView]


class ExportTraces(msgspec.Struct, frozen=True):
    """Page through the trace store: rows with id > ``after_id``, at most ``limit``."""

    TYPE: ClassVar[str] = "export_traces"
    after_id: Count = 0
    limit: Annotated[int, Meta(ge=0, le=5000)] = 1000


class TracesReply(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "traces"
    rows: list[str]
    """One JSON object per finished call, in the trace format (docs/traces.md)."""
    last_id: int


class QueryPredictor(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "query_predictor"


class InstallPredictor(msgspec.Struct, frozen=True):
    """Make a model file (from `swarmx predictor train`) the live predictor; the path is read by
    the scheduler, on its host."""

    TYPE: ClassVar[str] = "install_predictor"
    path: Annotated[str, Meta(max_length=4096)]


class PredictorStatus(msgspec.Struct, frozen=True):
    """The scheduler's live latency predictor and how well it has done lately."""

    TYPE: ClassVar[str] = "predictor_status"
    version: str
    kind: str
    """``trained`` or ``fallback`` (per-model running quantiles before any model is trained)."""
    levels: list[float]
    calls_seen: int
    buffer_calls: int
    recent_coverage: dict[str, float]
    recent_pinball_s: dict[str, float]
    online_shift: dict[str, float]
    """The conformal correction (log space, per level) applied on top of the model."""
    training: bool
    swaps: int
    refused_swaps: int
    last_trained_ts: float | None
    last_error: str | None = None
    """Why the last training round failed (its trainer process crashed or raised), if it did."""


# --- client queries ---------------------------------------------------------------------------


class QueryNodes(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "query_nodes"


class NodeView(msgspec.Struct, frozen=True):
    name: str
    state: Literal["live", "stale", "down"]
    last_seen_ts: float
    last_seen_age_s: float
    registered_ts: float
    frames: int
    hello: Hello
    telemetry: Telemetry | None


class SchedulerInfo(msgspec.Struct, frozen=True):
    endpoint: str
    version: str
    uptime_s: float
    bad_frames: dict[str, int]
    auth_refused: dict[str, int] = _field(default_factory=dict)
    """Handshakes and frames refused by the security checks, by reason (docs/security.md)."""
    handler_errors: int = 0
    """Frames whose handler failed (answered ``internal``; the daemon went on)."""
    results_dropped: dict[str, int] = _field(default_factory=dict)
    """Results not applied, by reason: ``late`` (the call was re-run, cancelled or had its
    result already) and ``fenced`` (from a node the call no longer belongs to)."""
    fenced_calls: int = 0
    """Calls a node reported running that the scheduler had given to another node since
    (cancelled there)."""
    overloaded: int = 0
    """Submissions refused because the scheduler held its most queued workflows or calls."""
    loop_gap_max_s: float = 0.0
    """The longest stall of the scheduler's event loop over the last 10 s."""
    gateway_calls: int = 0
    """Gateway calls queued or running."""
    gateway_sessions: int = 0
    """Gateway sessions open (``X-SwarmX-Session``)."""
    gateway_refused: dict[str, int] = _field(default_factory=dict)
    """Gateway calls answered with an error before running, by reason: ``model`` (not
    served), ``quota`` (the client's most), ``overloaded`` (the queue's most)."""


class NodesReply(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "nodes"
    scheduler: SchedulerInfo
    nodes: list[NodeView]


# --- swarmx top -------------------------------------------------------------------------------


class QueryTop(msgspec.Struct, frozen=True):
    """Client -> scheduler: everything `swarmx top` shows, in one round trip."""

    TYPE: ClassVar[str] = "query_top"
    workflows: Annotated[int, Meta(ge=0, le=10_000)] = 50
    """At most this many workflows: the running ones first, then the most recently finished."""
    decisions: Annotated[int, Meta(ge=0, le=10_000)] = 50
    """The most recent route and scale decisions."""


ReplicaState = Literal["serving", "draining", "unroutable"]


class ReplicaStats(msgspec.Struct, frozen=True):
    """One replica as the scheduler sees it: what it booked there, what the node reports, and
    the recent calls' service times next to what was forecast for them."""

    replica: str
    node: str
    model: str
    device: str
    concurrency: int
    state: ReplicaState
    """``unroutable``: its node is stale or down."""
    outstanding: int
    """Calls the scheduler has sent there and not seen finish."""
    queued: int | None
    """Waiting for a slot on the node, from the node's latest telemetry (None before any)."""
    inflight: int | None
    completed: int | None
    failed: int | None
    calls: int
    """Recent finished calls the figures below are over."""
    actual_s: dict[str, float]
    """Quantiles of those calls' service times, by level (``{"0.95": s}``)."""
    pred_s: dict[str, float]
    """Mean of those calls' forecast quantiles, by level."""
    covered: dict[str, float]
    """Share of those calls that finished within their forecast quantile, by level."""
    prefix_hit: float | None = None
    """Of the recent calls' prompt tokens, the share the engine served from its prefix cache,
    over the calls whose engine said (None if none did)."""
    prefix_hit_est: float | None = None
    """The same share as the scheduler's prefix index expected at dispatch (None if no recent
    call had prefix blocks)."""


class ModelStats(msgspec.Struct, frozen=True):
    model: str
    replicas: int
    """Replicas taking calls (serving, on live nodes)."""
    queued: int
    """Calls waiting at the scheduler for a replica of this model."""
    calls: int
    actual_s: dict[str, float]
    pred_s: dict[str, float]
    covered: dict[str, float]
    warmup_p90_s: float | None = None
    """The p90 of the start-ups the live nodes measured for this model (their pools'
    ``warmup_s``, pooled): the lead time the scaler plans on. None before 3 were measured (it
    plans on the configured ``startup_delay_s`` then)."""
    engine_restarts: int = 0
    """Launched engines of this model the live nodes restarted after a failure (their pools'
    ``restarts``, added up)."""


class WorkflowBrief(msgspec.Struct, frozen=True):
    id: str
    name: str
    state: str
    submitted_ts: float
    age_s: float
    """Time since submission (running), or the end-to-end latency (finished)."""
    slo_s: float | None
    slack_s: float | None
    """Running workflows with an SLO: the time to spare if the predicted remaining critical
    path started now (negative: predicted late)."""
    steps_done: int | None
    steps_total: int | None
    """Progress of running workflows (None for finished ones)."""
    calls_running: int = 0


class WorkflowSummary(msgspec.Struct, frozen=True):
    running: int
    finished: int
    """Workflows finished since the scheduler started."""
    window_s: float
    window_finished: int
    """Finished (succeeded or failed) in the last ``window_s``."""
    window_slo_total: int
    """Of those, the ones with an SLO."""
    window_slo_met: int
    """...that succeeded within it."""
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    """Of the workflows that succeeded in the window."""


class DecisionView(msgspec.Struct, frozen=True):
    """A routing or scaling decision, with the forecast it was made on."""

    ts: float
    kind: Literal["route", "scale"]
    model: str
    target: str
    """route: the replica chosen; scale: ``before -> after`` replicas."""
    detail: str
    """route: the call; scale: the reason."""
    pred_s: dict[str, float] | None = None
    """route: the call's service forecast there; scale: the model's typical service forecast."""
    completion_s: dict[str, float] | None = None
    """route: the router's predicted completion (wait + service), where it made one."""


class TopReply(msgspec.Struct, frozen=True):
    TYPE: ClassVar[str] = "top"
    ts: float
    """The scheduler's clock when the snapshot was taken (ages are relative to it)."""
    scheduler: SchedulerInfo
    router: str
    scaler: str
    nodes: list[NodeView]
    models: list[ModelStats]
    replicas: list[ReplicaStats]
    workflows: list[WorkflowBrief]
    summary: WorkflowSummary
    predictor: PredictorStatus
    decisions: list[DecisionView]
    """Newest first."""


Message = (
    Hello
    | Telemetry
    | Heartbeat
    | Goodbye
    | Dispatch
    | Result
    | Chunk
    | CancelCalls
    | ScaleCommand
    | Ack
    | Error
    | Submit
    | Submitted
    | QueryWorkflows
    | CancelWorkflow
    | WorkflowsReply
    | ExportTraces
    | TracesReply
    | QueryPredictor
    | InstallPredictor
    | PredictorStatus
    | QueryNodes
    | NodesReply
    | QueryTop
    | TopReply
    | GatewayCall
    | CallEnded
    | AbortCall
)

MESSAGE_TYPES: dict[str, type[Message]] = {cls.TYPE: cls for cls in get_args(Message)}
"""Wire ``type`` -> body struct, for every member of `Message`: a new message is added there
once."""


@dataclass(frozen=True)
class Envelope:
    sender: str
    seq: int
    ts: float
    body: Message
    v: int = PROTOCOL_VERSION

    @property
    def type(self) -> str:
        return self.body.TYPE


class _Head(msgspec.Struct):
    """The envelope around the body, which stays raw until its type is known."""

    v: Any = None
    type: str = ""
    sender: Name = ""
    seq: Seq = 0
    ts: Timestamp = 0.0
    body: msgspec.Raw = msgspec.Raw(b"")


class _Out(msgspec.Struct):
    v: int
    type: str
    sender: str
    seq: int
    ts: float
    body: Any


_ENCODER = msgspec.msgpack.Encoder()
_HEAD = msgspec.msgpack.Decoder(_Head)
_BODIES = {name: msgspec.msgpack.Decoder(cls) for name, cls in MESSAGE_TYPES.items()}
_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
"""The first byte of a msgpack map (fixmap, map16, map32)."""
_AT = re.compile(r"(.*) - at `\$(.*)`", re.S)
_MISSING = re.compile(r"Object missing required field `(.*)`")


def from_builtins(cls: type[M], data: object) -> M:
    """A message built from plain data (a dict the daemon made), checked like a frame."""
    return msgspec.convert(data, cls)


def encode_frame(sender: str, seq: int, ts: float, body: Message) -> bytes:
    return _ENCODER.encode(_Out(PROTOCOL_VERSION, body.TYPE, sender, seq, ts, body))


def decode_frame(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Parse and validate one frame; every failure, whatever the bytes, is a `ProtocolError`."""
    if len(data) > max_bytes:
        raise ProtocolError("oversized", f"frame of {len(data)} bytes exceeds {max_bytes}")
    if not data or data[0] not in _MAP_MARKERS:
        raise ProtocolError("garbage", "not a msgpack frame (the envelope must be a map)")
    try:
        head = _HEAD.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError("schema", _where(exc, "envelope")) from None
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError("garbage", f"not a msgpack frame ({type(exc).__name__})") from None
    if head.v != PROTOCOL_VERSION:
        raise ProtocolError(
            "version", f"protocol version {head.v!r:.40}, this build speaks {PROTOCOL_VERSION}"
        )
    decoder = _BODIES.get(head.type)
    if decoder is None:
        raise ProtocolError("unknown_type", f"unknown message type {head.type!r:.60}")
    try:
        body: Message = decoder.decode(head.body)
    except msgspec.ValidationError as exc:
        raise ProtocolError("schema", f"{head.type}: {_where(exc, 'body')}") from None
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError("garbage", f"{head.type}: bad body ({type(exc).__name__})") from None
    return Envelope(sender=head.sender, seq=head.seq, ts=head.ts, body=body)


def _where(exc: msgspec.ValidationError, root: str) -> str:
    """msgspec's ``Expected `int` - at `$.gpus[0].index``` as ``body.gpus[0].index: expected
    `int```: the place first, like every other error SwarmX prints."""
    text = str(exc)
    match = _AT.fullmatch(text)
    message, path = match.groups() if match is not None else (text, "")
    missing = _MISSING.fullmatch(message)
    if missing is not None:
        return f"{root}{path}.{missing.group(1)}: missing"
    return f"{root}{path}: {message[:1].lower()}{message[1:300]}"
