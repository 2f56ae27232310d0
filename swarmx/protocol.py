"""Wire messages between node agents, the scheduler and clients.

Every frame is one msgpack map, the *envelope*::

    {"v": PROTOCOL_VERSION, "type": "telemetry", "sender": "node-1", "seq": 42, "ts": 1.7e9,
     "body": {...}}

Bodies are frozen dataclasses registered by their ``TYPE``; decoding checks the size limit, the
version, the type and every field, and raises `ProtocolError` (with a short ``reason`` that daemons
count) instead of letting bad input reach a handler. Units live in field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import msgpack

from swarmx.schema import SchemaError, decode, encode

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 4 * 1024 * 1024
"""Default decode limit; a dispatch carrying a long prompt still fits comfortably."""


class ProtocolError(ValueError):
    """A frame that cannot be accepted; ``reason`` is a counter label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# --- registration and telemetry ---------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    mem_total_bytes: int


@dataclass(frozen=True)
class ReplicaInfo:
    """A model server instance a node serves, ready for calls."""

    replica: str
    model: str
    backend: str
    device: str
    concurrency: int
    draining: bool = False
    """Being stopped by a scale-down: it finishes the calls it has and takes no new ones."""


@dataclass(frozen=True)
class ReplicaPool:
    """A model a node can scale: one per model and backend in its ``[[node.replicas]]``, whose
    first entry is the template of the replicas it starts."""

    model: str
    backend: str
    device: str
    concurrency: int
    declared: int
    """Replicas the node's config declares (``count``): what it starts with."""
    max_count: int
    """Most replicas of it this node will run."""
    target: int
    """Replicas running (not draining) or starting now: the node's latest scale target."""
    startup_delay_s: float = 0.0


@dataclass(frozen=True)
class Hello:
    """Registration: who the node is and what it has. Sent until acknowledged."""

    TYPE: ClassVar[str] = "hello"
    node: str
    host: str
    pid: int
    version: str
    cpu_cores_logical: int
    cpu_cores_physical: int | None
    mem_total_bytes: int
    gpus: list[GpuInfo]
    replicas: list[ReplicaInfo]
    heartbeat_interval_s: float
    telemetry_interval_s: float
    started_ts: float
    labels: dict[str, str] = field(default_factory=dict)
    pools: list[ReplicaPool] = field(default_factory=list)
    """What the node can scale. A node sends ``hello`` again whenever its replica list changes
    (a replica started by a scale command is ready, a drained one has stopped)."""


@dataclass(frozen=True)
class HostSample:
    cpu_percent: float
    cpu_percent_per_core: list[float]
    load_1m: float
    load_5m: float
    load_15m: float
    mem_total_bytes: int
    mem_used_bytes: int
    mem_available_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    disk_read_bytes_per_s: float
    disk_write_bytes_per_s: float
    net_recv_bytes_per_s: float
    net_sent_bytes_per_s: float


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    mem_used_bytes: int | None


@dataclass(frozen=True)
class GpuSample:
    """One GPU's state; a field NVML cannot report on this device is None, not an error."""

    index: int
    name: str
    uuid: str
    util_percent: float | None
    mem_util_percent: float | None
    mem_used_bytes: int | None
    mem_total_bytes: int | None
    power_w: float | None
    power_limit_w: float | None
    temperature_c: float | None
    sm_clock_mhz: int | None
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass(frozen=True)
class ReplicaRuntime:
    """What the scheduler needs to know about a replica's load between its own dispatches."""

    replica: str
    model: str
    queued: int
    inflight: int
    completed: int
    failed: int
    recent_latencies_s: list[float] = field(default_factory=list)
    engine_queued: int | None = None
    """The model server's own queue (e.g. vLLM's waiting requests), where it reports one."""
    engine_running: int | None = None
    kv_cache_usage: float | None = None
    """Fraction of the server's KV cache in use (0..1), where it reports it."""


@dataclass(frozen=True)
class Telemetry:
    TYPE: ClassVar[str] = "telemetry"
    host: HostSample
    gpus: list[GpuSample]
    replicas: list[ReplicaRuntime]
    collect_s: float
    """Wall time the agent spent collecting this sample (its own overhead, visible centrally)."""


@dataclass(frozen=True)
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    uptime_s: float
    unsent_frames: int = 0
    """Frames the agent could not send (scheduler unreachable) since it started."""


# --- work -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    """Scheduler -> node: run one call on one replica."""

    TYPE: ClassVar[str] = "dispatch"
    call_id: str
    workflow_id: str
    step_id: str
    replica: str
    kind: Literal["llm", "model", "tool"]
    model: str
    prompt: str = ""
    max_tokens: int = 0
    inputs: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    timeout_s: float | None = None


@dataclass(frozen=True)
class Result:
    """Node -> scheduler: how a dispatched call ended, with its timings."""

    TYPE: ClassVar[str] = "result"
    call_id: str
    replica: str
    ok: bool
    output: str
    error: str
    queue_s: float
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class CancelCalls:
    """Scheduler -> node: stop these calls (queued or running); no results are expected."""

    TYPE: ClassVar[str] = "cancel_calls"
    call_ids: list[str]


@dataclass(frozen=True)
class ScaleCommand:
    """Scheduler -> node: run ``target_replicas`` replicas of ``model`` on this node (running
    or starting, draining ones not counted). Acknowledged (or refused with an `Error`) at once;
    the node announces the replicas it starts and stops with a new `Hello` when they are ready
    or gone."""

    TYPE: ClassVar[str] = "scale"
    model: str
    backend: str
    target_replicas: int
    reason: str = ""
    remove: list[str] = field(default_factory=list)
    """For a scale-down: the replicas to stop (the scheduler no longer routes to them); each
    finishes its calls before it closes. Replicas still starting are cancelled first."""


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    ref_seq: int
    detail: str = ""


@dataclass(frozen=True)
class Error:
    """A refusal of the frame numbered ``ref_seq`` (-1 when it could not be read)."""

    TYPE: ClassVar[str] = "error"
    ref_seq: int
    code: str
    message: str


# --- client requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    """Client -> scheduler: a workflow file's text; the scheduler parses and validates it again."""

    TYPE: ClassVar[str] = "submit"
    source: str
    text: str
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Submitted:
    TYPE: ClassVar[str] = "submitted"
    workflow_id: str


@dataclass(frozen=True)
class QueryWorkflows:
    """One workflow in detail (with outputs), or the most recent ``limit`` without them."""

    TYPE: ClassVar[str] = "query_workflows"
    workflow_id: str = ""
    limit: int = 50


@dataclass(frozen=True)
class CancelWorkflow:
    TYPE: ClassVar[str] = "cancel_workflow"
    workflow_id: str


@dataclass(frozen=True)
class StepView:
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


@dataclass(frozen=True)
class WorkflowView:
    id: str
    name: str
    state: str
    reason: str
    submitted_ts: float
    finished_ts: float | None
    latency_s: float | None
    slo_s: float | None
    steps: list[StepView]
    outputs: dict[str, str] = field(default_factory=dict)
    """Outputs of the final steps (detailed queries only)."""


@dataclass(frozen=True)
class WorkflowsReply:
    TYPE: ClassVar[str] = "workflows"
    workflows: list[WorkflowView]


@dataclass(frozen=True)
class ExportTraces:
    """Page through the trace store: rows with id > ``after_id``, at most ``limit``."""

    TYPE: ClassVar[str] = "export_traces"
    after_id: int = 0
    limit: int = 1000


@dataclass(frozen=True)
class TracesReply:
    TYPE: ClassVar[str] = "traces"
    rows: list[str]
    """One JSON object per finished call, in the trace format (docs/traces.md)."""
    last_id: int


@dataclass(frozen=True)
class QueryPredictor:
    TYPE: ClassVar[str] = "query_predictor"


@dataclass(frozen=True)
class InstallPredictor:
    """Make a model file (from `swarmx predictor train`) the live predictor; the path is read by
    the scheduler, on its host."""

    TYPE: ClassVar[str] = "install_predictor"
    path: str


@dataclass(frozen=True)
class PredictorStatus:
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


# --- client queries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryNodes:
    TYPE: ClassVar[str] = "query_nodes"


@dataclass(frozen=True)
class NodeView:
    name: str
    state: Literal["live", "stale", "down"]
    last_seen_ts: float
    last_seen_age_s: float
    registered_ts: float
    frames: int
    hello: Hello
    telemetry: Telemetry | None


@dataclass(frozen=True)
class SchedulerInfo:
    endpoint: str
    version: str
    uptime_s: float
    bad_frames: dict[str, int]


@dataclass(frozen=True)
class NodesReply:
    TYPE: ClassVar[str] = "nodes"
    scheduler: SchedulerInfo
    nodes: list[NodeView]


# --- swarmx top -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryTop:
    """Client -> scheduler: everything `swarmx top` shows, in one round trip."""

    TYPE: ClassVar[str] = "query_top"
    workflows: int = 50
    """At most this many workflows: the running ones first, then the most recently finished."""
    decisions: int = 50
    """The most recent route and scale decisions."""


ReplicaState = Literal["serving", "draining", "unroutable"]


@dataclass(frozen=True)
class ReplicaStats:
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


@dataclass(frozen=True)
class ModelStats:
    model: str
    replicas: int
    """Replicas taking calls (serving, on live nodes)."""
    queued: int
    """Calls waiting at the scheduler for a replica of this model."""
    calls: int
    actual_s: dict[str, float]
    pred_s: dict[str, float]
    covered: dict[str, float]


@dataclass(frozen=True)
class WorkflowBrief:
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


@dataclass(frozen=True)
class WorkflowSummary:
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


@dataclass(frozen=True)
class DecisionView:
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


@dataclass(frozen=True)
class TopReply:
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
    | Dispatch
    | Result
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
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Telemetry,
        Heartbeat,
        Dispatch,
        Result,
        CancelCalls,
        ScaleCommand,
        Ack,
        Error,
        Submit,
        Submitted,
        QueryWorkflows,
        CancelWorkflow,
        WorkflowsReply,
        ExportTraces,
        TracesReply,
        QueryPredictor,
        InstallPredictor,
        PredictorStatus,
        QueryNodes,
        NodesReply,
        QueryTop,
        TopReply,
    )
}


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


def encode_frame(sender: str, seq: int, ts: float, body: Message) -> bytes:
    envelope = {
        "v": PROTOCOL_VERSION,
        "type": body.TYPE,
        "sender": sender,
        "seq": seq,
        "ts": ts,
        "body": encode(body),
    }
    data: bytes = msgpack.packb(envelope, use_bin_type=True)
    return data


def decode_frame(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Parse and validate one frame; every failure is a `ProtocolError`."""
    if len(data) > max_bytes:
        raise ProtocolError("oversized", f"frame of {len(data)} bytes exceeds {max_bytes}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError("garbage", f"not a msgpack frame ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise ProtocolError("garbage", f"envelope must be a map, got {type(raw).__name__}")
    version = raw.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version", f"protocol version {version!r}, this build speaks {PROTOCOL_VERSION}"
        )
    cls = MESSAGE_TYPES.get(raw.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message type {raw.get('type')!r}")
    try:
        head = decode(_Head, {k: raw.get(k) for k in ("sender", "seq", "ts")}, "envelope")
        body: Message = decode(cls, raw.get("body"), "body", strict=False)
    except SchemaError as exc:
        raise ProtocolError("schema", f"{cls.TYPE}: {exc}") from None
    return Envelope(sender=head.sender, seq=head.seq, ts=head.ts, body=body)


@dataclass(frozen=True)
class _Head:
    sender: str
    seq: int
    ts: float
