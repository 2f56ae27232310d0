"""The one TOML config file, loaded once into frozen dataclasses. Every default lives here.

Precedence, highest first: command-line flag, its ``SWARMX_*`` environment variable, the file named
by ``--config`` / ``SWARMX_CONFIG``, the defaults below. Errors name the file, line and key.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import socket
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

import tomli

from swarmx.schema import SchemaError, decode
from swarmx.tomlpos import locate
from swarmx.workflow.spec import WorkflowLimits

if TYPE_CHECKING:
    from swarmx.sched.scaler import ScalerOptions

DEFAULT_SCHEDULER = "tcp://127.0.0.1:7700"
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; ``str()`` is the one-line message shown to the user."""


def check_address(url: str, *, bind: bool = False) -> str:
    """Validate a ZeroMQ endpoint users type: ``tcp://HOST:PORT`` or ``ipc:///path``.

    Binding also accepts ``*`` or ``0.0.0.0`` as host and port 0 (pick a free port; the bound
    address is written to the state directory).
    """
    if url.startswith("ipc://"):
        if len(url) > len("ipc://"):
            return url
        raise SchemaError("", f"ipc address needs a path, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.netloc or parts.path not in ("", "/"):
        raise SchemaError("", f"expected tcp://HOST:PORT or ipc:///PATH, got {url!r}")
    host, sep, port_text = parts.netloc.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise SchemaError("", f"expected tcp://HOST:PORT, got {url!r}")
    port = int(port_text)
    if not (0 if bind else 1) <= port <= 65535:
        raise SchemaError("", f"port {port} out of range in {url!r}")
    if host == "*" and not bind:
        raise SchemaError("", f"'*' is only valid for listening, got {url!r}")
    return url.rstrip("/")


def is_loopback(url: str) -> bool:
    """Only this host can reach the address: ``ipc://``, or tcp on 127.0.0.0/8, ``localhost``
    or ``[::1]``."""
    if url.startswith("ipc://"):
        return True
    host = urlsplit(url).netloc.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise SchemaError(name, f"must be > 0, got {value}")


def _check_metrics(port: int, addr: str) -> None:
    if not 0 <= port <= 65535:
        raise SchemaError("metrics_port", f"must be 0 (off) or a port up to 65535, got {port}")
    if not addr or any(c.isspace() for c in addr):
        raise SchemaError("metrics_addr", f"must be a host name or address, got {addr!r}")


def _systemd_state_dir() -> str:
    """The first ``StateDirectory`` systemd made for the unit, if running under one."""
    return os.environ.get("STATE_DIRECTORY", "").split(":")[0]


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "swarmx")


@dataclass(frozen=True)
class SchedulerConfig:
    listen: str = DEFAULT_SCHEDULER
    state_dir: str = field(default_factory=default_state_dir)
    stale_after_missed: int = 2
    """Heartbeats a node may miss before it shows as ``stale`` (it gets no new calls)."""
    down_after_missed: int = 3
    """Heartbeats a node may miss before it is ``down``: its calls re-run elsewhere and what
    it still sends for them is refused (3 s at the default 1 s heartbeat)."""
    recovery_grace_s: float = 5.0
    """After a restart, how long unfinished calls wait for the nodes to report them running
    (adopted, not re-run) before those nobody reported run again."""
    max_queued_workflows: int = 10_000
    """Unfinished workflows the scheduler holds in all; a submit over it is refused at once."""
    max_queued_calls: int = 100_000
    """Calls waiting for a replica, in all; a submit while more wait is refused at once."""
    trace_retention_rows: int = 1_000_000
    """Trace rows kept in the journal (0: all); older ones move to ``STATE/archive/``."""
    workflow_retention_days: float = 30.0
    """Finished workflows (and their calls) kept in the journal this long (0: for ever)."""
    max_frame_bytes: int = 4 * 1024 * 1024
    metrics_port: int = 0
    """Serve Prometheus metrics over HTTP on this port; 0 means off (docs/metrics.md)."""
    metrics_addr: str = "127.0.0.1"
    """Interface the metrics server binds (``0.0.0.0`` for a Prometheus on another host)."""
    max_workflow_bytes: int = WorkflowLimits.max_workflow_bytes
    """Largest workflow file (TOML text) a submit may carry."""
    max_steps: int = WorkflowLimits.max_steps
    """Most steps one workflow file may declare."""
    max_fan_out: int = WorkflowLimits.max_fan_out
    """Most instances one fan-out step may expand to (fixed ``count`` or dynamic items)."""
    max_prompt_bytes: int = WorkflowLimits.max_prompt_bytes
    """Largest rendered prompt (or tool argument list) of one call."""
    max_queued_workflows_per_client: int = WorkflowLimits.max_queued_workflows_per_client
    """Unfinished workflows one client key (or, without keys, all clients together) may hold."""
    workflow_timeout_s: float = WorkflowLimits.workflow_timeout_s
    """Hard deadline of every workflow, SLO or not: past it, it fails and its calls are
    cancelled, so nothing stays ``running`` for ever."""
    session_idle_s: float = 600.0
    """A gateway session (``X-SwarmX-Session``) with no call for this long is over."""
    max_gateway_calls_per_client: int = 1000
    """Gateway calls one API key's client (or, without keys, all clients) may run at once."""

    def __post_init__(self) -> None:
        try:
            check_address(self.listen, bind=True)
        except SchemaError as exc:
            raise SchemaError("listen", exc.message) from None
        _check_metrics(self.metrics_port, self.metrics_addr)
        for name in (
            "max_workflow_bytes",
            "max_steps",
            "max_fan_out",
            "max_prompt_bytes",
            "max_queued_workflows_per_client",
            "workflow_timeout_s",
            "recovery_grace_s",
            "max_queued_workflows",
            "max_queued_calls",
            "session_idle_s",
            "max_gateway_calls_per_client",
        ):
            _check_positive(name, getattr(self, name))
        for name in ("trace_retention_rows", "workflow_retention_days"):
            if getattr(self, name) < 0:
                raise SchemaError(name, f"must be >= 0 (0: keep all), got {getattr(self, name)}")
        if self.stale_after_missed < 1:
            raise SchemaError("stale_after_missed", "must be >= 1")
        if self.down_after_missed <= self.stale_after_missed:
            raise SchemaError("down_after_missed", "must be greater than stale_after_missed")
        _check_positive("max_frame_bytes", self.max_frame_bytes)


PLACEHOLDERS = frozenset({"port", "gpu", "model", "served_model", "replica", "host", "kv_port"})
"""What a launch template may name: ``{port}`` (the port the node picked), ``{gpu}`` (the GPU
indices it assigned, comma-separated), ``{model}``, ``{served_model}``, ``{replica}`` (the
replica's name), ``{host}`` (the address the engine should listen on) and ``{kv_port}`` (a
second free port, for the engine's KV-event publisher)."""


def template_fields(parts: Sequence[str]) -> set[str]:
    """The placeholders a template names (``{{`` and ``}}`` are literal braces)."""
    names: set[str] = set()
    for part in parts:
        for _, name, spec, conv in string.Formatter().parse(part):
            if name is not None:
                if spec or conv or not name.isidentifier():
                    raise ValueError(f"{part!r}: write placeholders as {{name}}, got {{{name}}}")
                names.add(name)
    return names


@dataclass(frozen=True)
class ReplicaConfig:
    """One model this node serves, ``count`` times (``[[node.replicas]]``)."""

    model: str
    backend: Literal["torch", "openai", "emulated"]
    count: int = 1
    concurrency: int = 4
    """Calls admitted into the backend at once (the batch size for batching backends); more
    wait in the node's queue."""
    device: str = "cpu"
    """torch: ``cpu``, ``cuda`` or ``cuda:N``; openai: a label for traces (``gpu``)."""
    arch: Literal["lm", "vision"] = "lm"
    """torch: a causal transformer LM, or a vision model for ``model`` steps."""
    seed: int = 0
    """torch: weight initialisation seed (the embedded models are random-weight stand-ins)."""
    url: str = ""
    """openai: the server's base URL, e.g. ``http://127.0.0.1:8000/v1``."""
    served_model: str = ""
    """openai: the model name the server knows (default: ``model``)."""
    api_key_env: str = ""
    """openai: environment variable holding the API key, if the server wants one."""
    metrics_url: str = ""
    """openai: Prometheus endpoint of a vLLM/SGLang server, scraped for queue and KV-cache use."""
    gpu: str = "A100"
    """emulated: which GPU's timing profile to emulate."""
    max_count: int | None = None
    """Most replicas of this model the scaler may run on this node: ``4 * count`` by default;
    openai replicas are endpoints of servers started elsewhere, so they only vary between 0 and
    ``count``."""
    startup_delay_s: float = 0.0
    """Extra time a replica started by the scaler waits, once its backend is up, before the node
    announces it ready (emulates a model server's load time; the backend's own start-up always
    counts). For launched engines, the scaler's lead time until start-ups are measured."""
    launch: list[str] = field(default_factory=list)
    """openai: the command that starts one engine (argv, no shell), with placeholders
    ``{port}``, ``{gpu}``, ``{model}``, ``{served_model}``, ``{replica}``, ``{host}``; the node
    then starts, supervises and stops engines itself, up to ``max_count`` (docs/backends.md)."""
    env: dict[str, str] = field(default_factory=dict)
    """launch: environment variables added to the engine's (values take placeholders)."""
    health_path: str = "/v1/models"
    """launch: the path that answers 2xx once the engine serves."""
    metrics_path: str = ""
    """launch: the engine's Prometheus path (e.g. ``/metrics``), scraped for queue and KV use."""
    ready_timeout_s: float = 600.0
    """launch: how long an engine may take to answer its health path."""
    stop_timeout_s: float = 30.0
    """launch: how long an engine has after SIGTERM before SIGKILL."""
    gpus_per_replica: int = 0
    """launch: GPUs each engine gets (``{gpu}``), never shared unless ``[node]
    replicas_per_gpu`` says so."""
    drain_timeout_s: float = 300.0
    """launch: on scale-down, how long in-flight calls may take before the engine is stopped."""
    kv_events: str = ""
    """openai: the engine's KV-event publisher (vLLM's and SGLang's ``--kv-events-config``
    endpoint), e.g. ``tcp://127.0.0.1:5557``; with ``launch`` it may name ``{kv_port}``. The node
    follows what the engine evicts, so the scheduler's prefix index does (docs/backends.md)."""
    kv_events_topic: str = ""
    """kv_events: the topic the engine publishes on, as a prefix ("": every topic, which is
    vLLM's default; its example configurations name ``kv-events``)."""
    tokenize_path: str = "/tokenize"
    """kv_events: the engine's tokenizer endpoint, from its server's root (vLLM's, SGLang's):
    how the node joins a prompt's blocks to the engine's."""

    def __post_init__(self) -> None:
        self._check_launch()
        self._check_kv_events()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", self.model):
            raise SchemaError(
                "model", f"must be 1-128 of A-Z a-z 0-9 . _ : / -, got {self.model!r}"
            )
        if self.count < 1:
            raise SchemaError("count", "must be >= 1")
        if self.concurrency < 1:
            raise SchemaError("concurrency", "must be >= 1")
        if (
            self.backend == "openai"
            and not self.launch
            and not self.url.startswith(("http://", "https://"))
        ):
            raise SchemaError(
                "url", f"openai replicas need an http(s):// base URL, got {self.url!r}"
            )
        if self.backend == "torch" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise SchemaError("device", f"must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_count is not None and self.max_count < self.count:
            raise SchemaError("max_count", f"must be >= count ({self.count}), got {self.max_count}")
        if (
            self.backend == "openai"
            and not self.launch
            and self.max_count is not None
            and self.max_count > self.count
        ):
            raise SchemaError(
                "max_count",
                "openai replicas without `launch` cannot be started by the node: max_count must"
                " not exceed count",
            )
        if self.startup_delay_s < 0:
            raise SchemaError("startup_delay_s", f"must be >= 0, got {self.startup_delay_s}")

    def _check_kv_events(self) -> None:
        if not self.kv_events:
            return
        if self.backend != "openai":
            raise SchemaError("kv_events", f"only openai engines publish them, not {self.backend}")
        if not self.kv_events.startswith(("tcp://", "ipc://")):
            raise SchemaError(
                "kv_events", f"must be a tcp:// or ipc:// endpoint, got {self.kv_events!r}"
            )
        if "{kv_port}" in self.kv_events and "kv_port" not in template_fields(self.launch):
            raise SchemaError("kv_events", "names {kv_port}, which `launch` never does")
        if not self.tokenize_path.startswith("/"):
            raise SchemaError("tokenize_path", f"must start with /, got {self.tokenize_path!r}")

    def _check_launch(self) -> None:
        if not self.launch:
            for name in ("env", "metrics_path"):
                if getattr(self, name):
                    raise SchemaError(name, "takes effect only with `launch`")
            if self.gpus_per_replica:
                raise SchemaError("gpus_per_replica", "takes effect only with `launch`")
            return
        if self.backend != "openai":
            raise SchemaError("launch", f"only openai replicas launch engines, not {self.backend}")
        if not self.launch[0]:
            raise SchemaError("launch", "the command (its first word) is empty")
        where = {
            "launch": self.launch,
            "url": [self.url],
            **{f"env.{k}": [v] for k, v in self.env.items()},
        }
        used: set[str] = set()
        for name, parts in where.items():
            try:
                fields = template_fields(parts)
            except ValueError as exc:
                raise SchemaError(name, str(exc)) from None
            unknown = fields - PLACEHOLDERS
            if unknown:
                raise SchemaError(
                    name,
                    f"unknown placeholder {{{sorted(unknown)[0]}}}"
                    f" (known: {', '.join(f'{{{p}}}' for p in sorted(PLACEHOLDERS))})",
                )
            used |= fields
        if "port" not in used:
            raise SchemaError("launch", "never names {port}: the node cannot tell the engine where")
        if "gpu" in used and self.gpus_per_replica < 1:
            raise SchemaError("gpus_per_replica", "must be >= 1 where the template names {gpu}")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise SchemaError("url", f"must be an http(s):// base URL, got {self.url!r}")
        if not self.health_path.startswith("/"):
            raise SchemaError("health_path", f"must start with /, got {self.health_path!r}")
        if self.metrics_path and not self.metrics_path.startswith("/"):
            raise SchemaError("metrics_path", f"must start with /, got {self.metrics_path!r}")
        if self.gpus_per_replica < 0:
            raise SchemaError("gpus_per_replica", f"must be >= 0, got {self.gpus_per_replica}")
        for name in ("ready_timeout_s", "stop_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise SchemaError(name, f"must be > 0, got {getattr(self, name)}")

    @property
    def scale_max(self) -> int:
        """The effective ``max_count``."""
        if self.max_count is not None:
            return self.max_count
        return self.count if self.backend == "openai" and not self.launch else 4 * self.count


@dataclass(frozen=True)
class ToolLimits:
    """Resource limits of every tool process (``[node.tool_limits]``); 0 means no limit."""

    memory_bytes: int = 4 << 30
    """Address space of each process (RLIMIT_AS)."""
    cpu_time_s: int = 600
    """CPU seconds of each process (RLIMIT_CPU)."""
    file_bytes: int = 1 << 30
    """Largest file a tool may write (RLIMIT_FSIZE)."""
    open_files: int = 1024
    """Open file descriptors of each process (RLIMIT_NOFILE)."""

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "cpu_time_s", "file_bytes", "open_files"):
            if getattr(self, name) < 0:
                raise SchemaError(name, f"must be >= 0 (0: no limit), got {getattr(self, name)}")


@dataclass(frozen=True)
class NodeConfig:
    name: str = field(default_factory=socket.gethostname)
    scheduler: str = DEFAULT_SCHEDULER
    telemetry_interval_s: float = 1.0
    heartbeat_interval_s: float = 1.0
    gpus: Literal["auto", "off"] = "auto"
    """``auto`` reads GPUs through NVML when present; ``off`` never loads NVML."""
    labels: dict[str, str] = field(default_factory=dict)
    replicas: list[ReplicaConfig] = field(default_factory=list)
    tool_slots: int = -1
    """Tool runs at once on this node; -1 means one per CPU core, 0 means no tools here."""
    tool_env: list[str] = field(default_factory=lambda: ["PATH", "LANG", "LC_ALL", "TZ"])
    """Environment variables passed through to tool processes; nothing else leaks in."""
    tool_commands: list[str] = field(default_factory=list)
    """Executables this node runs for tool steps (names looked up on ``PATH``, or absolute
    paths); ``["*"]`` runs any, the default ``[]`` none (`swarmx up` uses ``["*"]``)."""
    tool_limits: ToolLimits = field(default_factory=ToolLimits)
    tool_user: str = ""
    """Run tools as this user (the agent must be root to switch); empty: the agent's own."""
    tool_lease_s: float = 2.0
    """Tools die when the agent has not renewed their lease this long (it was killed, frozen
    or stalled): shorter than the scheduler's failure detection (3 s by default), so a call
    re-run elsewhere never still runs here. 0 turns the lease off."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long running calls may take to finish before the rest are handed back
    to the scheduler to run elsewhere."""
    metrics_port: int = 0
    """Serve this agent's Prometheus metrics on this port; 0 means off (docs/metrics.md)."""
    metrics_addr: str = "127.0.0.1"
    engine_gpus: list[int] | None = None
    """GPU indices launched engines may use; default: every GPU NVML finds (none with
    ``gpus = "off"``)."""
    replicas_per_gpu: int = 1
    """Launched engines one GPU may hold at once."""
    state_dir: str = field(default_factory=lambda: _systemd_state_dir() or default_state_dir())
    """Where the agent records the engines it launched (``engines-NAME.json``), so the next
    agent stops any a killed one left behind; default: the unit's ``StateDirectory`` under
    systemd, else ``default_state_dir()``."""

    def __post_init__(self) -> None:
        _check_metrics(self.metrics_port, self.metrics_addr)
        if self.replicas_per_gpu < 1:
            raise SchemaError("replicas_per_gpu", f"must be >= 1, got {self.replicas_per_gpu}")
        for i, gpu in enumerate(self.engine_gpus or []):
            if gpu < 0:
                raise SchemaError(f"engine_gpus[{i}]", f"must be a GPU index >= 0, got {gpu}")
        if self.tool_lease_s < 0:
            raise SchemaError("tool_lease_s", f"must be >= 0 (0: off), got {self.tool_lease_s}")
        if self.drain_timeout_s < 0:
            raise SchemaError("drain_timeout_s", f"must be >= 0, got {self.drain_timeout_s}")
        if self.tool_slots < -1:
            raise SchemaError("tool_slots", "must be -1 (one per core), 0 (none) or more")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", self.name):
            raise SchemaError("name", f"must be 1-63 of A-Z a-z 0-9 . _ -, got {self.name!r}")
        try:
            check_address(self.scheduler)
        except SchemaError as exc:
            raise SchemaError("scheduler", exc.message) from None
        _check_positive("telemetry_interval_s", self.telemetry_interval_s)
        _check_positive("heartbeat_interval_s", self.heartbeat_interval_s)
        for i, command in enumerate(self.tool_commands):
            if not command or "\0" in command or (command != "*" and command.startswith("-")):
                raise SchemaError(f"tool_commands[{i}]", f"not an executable: {command!r}")


REPLICA_PRESETS: dict[str, list[ReplicaConfig]] = {
    # The embedded default of `swarmx up`: small random-weight torch models that compute for real
    # on a laptop CPU (stand-ins for real model servers; see docs/backends.md).
    "local": [
        ReplicaConfig("tiny-lm", "torch", concurrency=4, arch="lm"),
        ReplicaConfig("tiny-vision", "torch", concurrency=2, arch="vision"),
    ],
    "none": [],
}


@dataclass(frozen=True)
class ClientConfig:
    scheduler: str = DEFAULT_SCHEDULER
    timeout_s: float = 3.0

    def __post_init__(self) -> None:
        try:
            check_address(self.scheduler)
        except SchemaError as exc:
            raise SchemaError("scheduler", exc.message) from None
        _check_positive("timeout_s", self.timeout_s)


@dataclass(frozen=True)
class PredictorConfig:
    """The scheduler's online latency predictor (see swarmx/models/online.py)."""

    levels: list[float] = field(default_factory=lambda: [0.5, 0.9, 0.95, 0.99])
    buffer_calls: int = 20_000
    min_calls_to_train: int = 300
    retrain_every_calls: int = 1_000
    retrain_every_s: float = 600.0
    holdout_frac: float = 0.2
    window_calls: int = 200
    fine_tune_epochs: int = 3
    keep_versions: int = 5
    trainer_duty: float = 0.25
    """The most of the time the trainer process may run: after a round of T seconds the next
    waits at least T * (1 / trainer_duty - 1). Bounds what retraining costs the scheduler's host
    whatever asks for it; 1 lets rounds run back to back."""

    def __post_init__(self) -> None:
        if not self.levels or any(not 0 < p < 1 for p in self.levels):
            raise SchemaError("levels", f"need levels in (0, 1), got {self.levels}")
        if sorted(set(self.levels)) != list(self.levels):
            raise SchemaError("levels", "must be distinct and increasing")
        if not 0 < self.holdout_frac < 1:
            raise SchemaError("holdout_frac", "must be in (0, 1)")
        if not 0 < self.trainer_duty <= 1:
            raise SchemaError("trainer_duty", "must be in (0, 1]")
        for name in (
            "buffer_calls",
            "min_calls_to_train",
            "retrain_every_calls",
            "window_calls",
            "fine_tune_epochs",
            "keep_versions",
        ):
            if getattr(self, name) < 1:
                raise SchemaError(name, "must be >= 1")
        _check_positive("retrain_every_s", self.retrain_every_s)


RouterPolicy = Literal[
    "round_robin",
    "random",
    "least_outstanding",
    "power_of_two",
    "mean_predicted",
    "p90_load",
    "tail",
    "prefix_affinity",
    "kv_cost",
]
ScalerPolicy = Literal["none", "threshold", "tail"]


@dataclass(frozen=True)
class RouterConfig:
    """How the scheduler orders the calls waiting for a replica and picks one for each
    (docs/scheduling.md)."""

    policy: RouterPolicy = "tail"
    queue: Literal["fifo", "slack"] = "slack"
    """``slack``: the call whose workflow has the least slack to its SLO goes first (calls of
    workflows without an SLO after them, first come first served); ``fifo``: arrival order."""
    level: float = 0.95
    """The tail router's quantile."""
    replica_queue: int = 0
    """Calls sent to a replica beyond its ``concurrency`` (waiting on the node); 0 keeps every
    waiting call at the scheduler, where the queue order and the router still decide."""
    seed: int = 0
    """For the random and power_of_two routers."""
    max_candidates: int = 64
    """Replicas a forecasting router scores per call, the least loaded: each costs a forecast,
    and among many replicas the least loaded hold the choice."""
    kv_overlap_weight: float = 1.0
    """The ``kv_cost`` router's weight of a block to prefill against a block to decode
    (Dynamo's ``overlap_score_weight``)."""
    capacity_price: bool = False
    """The ``tail`` router charges each candidate the pool capacity its prefill would burn
    (docs/scheduling.md): keeps prefixes where they are cached when the pool is loaded."""
    session_value: bool = False
    """The ``tail`` router charges each candidate the prefill its call would cost the sessions
    whose cached prefixes it evicts while they are still wanted (docs/scheduling.md)."""

    def __post_init__(self) -> None:
        if self.kv_overlap_weight < 0:
            raise SchemaError("kv_overlap_weight", f"must be >= 0, got {self.kv_overlap_weight}")
        if self.max_candidates < 1:
            raise SchemaError("max_candidates", f"must be >= 1, got {self.max_candidates}")
        if not 0.5 < self.level < 1:
            raise SchemaError("level", f"must be in (0.5, 1), got {self.level}")
        if self.replica_queue < 0:
            raise SchemaError("replica_queue", f"must be >= 0, got {self.replica_queue}")


@dataclass(frozen=True)
class ScalerConfig:
    """How many replicas of each model run: the scheduler decides every ``interval_s`` and
    asks node agents to start or stop replicas (docs/scheduling.md)."""

    policy: ScalerPolicy = "tail"
    interval_s: float = 5.0
    min_replicas: dict[str, int] = field(default_factory=dict)
    """Per model; default: the replicas the live nodes declare (``count``), so the scaler never
    goes below the configured floor."""
    max_replicas: dict[str, int] = field(default_factory=dict)
    """Per model; default: the sum of the live nodes' ``max_count`` for it."""
    options: dict[str, bool | int | float | str] = field(default_factory=dict)
    """Options of the chosen policy, as written (see docs/scheduling.md); `policy_options` has
    them typed and checked."""

    def __post_init__(self) -> None:
        _check_positive("interval_s", self.interval_s)
        for name in ("min_replicas", "max_replicas"):
            for model, n in getattr(self, name).items():
                if n < 0:
                    raise SchemaError(f"{name}.{model}", f"must be >= 0, got {n}")
        for model, hi in self.max_replicas.items():
            lo = self.min_replicas.get(model, 0)
            if hi < max(lo, 1):
                raise SchemaError(
                    f"max_replicas.{model}",
                    f"must be >= 1 and >= min_replicas ({lo}), got {hi}",
                )
        if self.options:  # build them now so a bad one fails at load ({}: the defaults, all valid)
            _ = self.policy_options

    @functools.cached_property
    def policy_options(self) -> ScalerOptions:
        """``options`` typed as the policy's options class (`swarmx.sched.scaler.SCALERS`)."""
        from swarmx.sched.scaler import scaler_options  # imported on use: the CLI starts faster

        return scaler_options(self.policy, self.options, "options")


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "text"
    """``text`` for people (the default), ``json`` for log shippers: one object a line."""


@dataclass(frozen=True)
class SecurityConfig:
    """CURVE keys (docs/security.md). Empty: no encryption or authentication, which the
    scheduler accepts only on a loopback address (or with ``--insecure``)."""

    key: str = ""
    """This process's own key pair: the secret key file (``NAME.key_secret``)."""
    scheduler_key: str = ""
    """Nodes and clients: the scheduler's public key file (``scheduler.key``)."""
    authorized_keys: str = ""
    """Scheduler: a directory whose ``nodes/``, ``clients/`` and ``admins/`` hold the public
    keys (``*.key``) allowed in, each with that role; rescanned on SIGHUP and every
    ``rescan_s``."""
    rescan_s: float = 5.0

    def __post_init__(self) -> None:
        _check_positive("rescan_s", self.rescan_s)

    @property
    def enabled(self) -> bool:
        return bool(self.key)


DEFAULT_GATEWAY = "http://127.0.0.1:8000"
MAX_GATEWAY_BODY_BYTES = 3 * 1024 * 1024 // 2
"""Twice this (the body and its flattened text) fits the wire's 4 MiB frame."""


def check_http_listen(url: str) -> tuple[str, int]:
    """``http://HOST:PORT`` (or ``https://``) a gateway listens on -> (host, port); port 0
    picks a free one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise SchemaError("", f"expected http://HOST:PORT, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise SchemaError("", f"bad port in {url!r}") from None
    if port is None:
        raise SchemaError("", f"expected http://HOST:PORT (a port), got {url!r}")
    return parts.hostname, port


@dataclass(frozen=True)
class GatewayConfig:
    """`swarmx gateway`: the OpenAI-compatible endpoint (docs/gateway.md)."""

    listen: str = DEFAULT_GATEWAY
    scheduler: str = DEFAULT_SCHEDULER
    api_keys: str = ""
    """A TOML file of API keys (``[[keys]] client, sha256``) the gateway accepts as
    ``Authorization: Bearer``; reread when it changes. Empty: callers on this host only."""
    tls_cert: str = ""
    """PEM certificate (with ``tls_key``): serve HTTPS. Needed to listen off loopback."""
    tls_key: str = ""
    call_timeout_s: float = 600.0
    """A call with no end by then is stopped and answered 504."""
    max_body_bytes: int = 1024 * 1024
    """Largest request body. A call crosses the control plane as one frame carrying the body
    and its text, so at most `MAX_GATEWAY_BODY_BYTES`."""
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"

    def __post_init__(self) -> None:
        try:
            check_http_listen(self.listen)
        except SchemaError as exc:
            raise SchemaError("listen", exc.message) from None
        try:
            check_address(self.scheduler)
        except SchemaError as exc:
            raise SchemaError("scheduler", exc.message) from None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SchemaError("tls_cert", "tls_cert and tls_key go together")
        _check_positive("call_timeout_s", self.call_timeout_s)
        if not 0 < self.max_body_bytes <= MAX_GATEWAY_BODY_BYTES:
            raise SchemaError(
                "max_body_bytes", f"must be 1..{MAX_GATEWAY_BODY_BYTES}, got {self.max_body_bytes}"
            )
        _check_metrics(self.metrics_port, self.metrics_addr)


@dataclass(frozen=True)
class Config:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    scaler: ScalerConfig = field(default_factory=ScalerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate the config file; ``None`` means all defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    try:
        return decode(Config, data)
    except SchemaError as exc:
        line = locate(text, exc.path) if exc.path else None
        where = f"{p}:{line}" if line else str(p)
        raise ConfigError(f"{where}: {exc.path}: {exc.message}") from None


def override(section: T, **changes: object) -> T:
    """Apply command-line values (None = not given) to a config section, validating them; an
    error names the option as typed (``--listen``)."""
    given = {k: v for k, v in changes.items() if v is not None}
    if not given:
        return section
    try:
        return dataclasses.replace(section, **given)  # type: ignore[type-var]
    except SchemaError as exc:
        raise ConfigError(f"--{exc.path.replace('_', '-')}: {exc.message}") from None


def changed_fields(old: Any, new: Any) -> list[str]:
    """The fields of two configs of one dataclass type that differ (what a reload changes)."""
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]
