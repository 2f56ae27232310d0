"""The trace format: one JSON object per finished call, the input of the predictors and the
simulator. Field names are a contract (docs/traces.md); add fields, never rename them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceAtDispatch:
    gpu: str
    """GPU model name (``H100``...), ``cpu`` for CPU replicas."""
    gpu_util: float
    """0..1, of the replica's GPU; 0 on CPU."""
    gpu_mem_frac: float
    cpu_util: float
    """0..1, the node's CPU use."""


@dataclass(frozen=True)
class RuntimeAtDispatch:
    inflight: int
    """Calls running on the replica when this one was dispatched."""
    queue_depth: int
    """Calls waiting for a slot on the replica when this one was dispatched."""


@dataclass(frozen=True)
class TraceRecord:
    ts: float
    """Arrival: when the call became ready to run (its dependencies done), Unix seconds."""
    workflow: str
    step: str
    deps: list[str]
    kind: str
    model: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    latency_s: float
    """Service time on the replica."""
    queue_s: float
    """Arrival to service start: waiting at the scheduler plus in the replica's queue."""
    ttft_s: float | None
    node: str
    replica: str
    device: DeviceAtDispatch
    runtime: RuntimeAtDispatch
    ok: bool = True
    error: str = ""
    call_id: str = ""
    index: int | None = None
    """Fan-out instance of the step, if any."""
    attempt: int = 1
    turn: int = 0
    """How many calls of the same workflow (the agent session) were dispatched before this one."""
    workflow_name: str = ""
    slo_s: float | None = None
