"""The interface every backend implements, and the request/outcome types it speaks.

The node agent owns queueing and timing: it admits at most ``concurrency`` calls into a backend at
once, measures ``queue_s`` (waiting for a slot) and ``latency_s`` (inside ``run``), and turns the
outcome into a wire `Result`. A backend only executes calls; continuous-batching backends batch
the calls that are inside ``run`` at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

CallKind = Literal["llm", "model", "tool"]


@dataclass(frozen=True)
class CallRequest:
    call_id: str
    kind: CallKind
    model: str
    prompt: str = ""
    max_tokens: int = 0
    inputs: dict[str, str] = field(default_factory=dict)
    """Per-call parameters of ``model`` steps, e.g. ``image_px``, ``steps``."""
    command: list[str] = field(default_factory=list)
    timeout_s: float | None = None


@dataclass(frozen=True)
class CallOutcome:
    ok: bool
    output: str
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    """Seconds from the start of ``run`` to the first output token (None if not a token stream)."""


@dataclass(frozen=True)
class BackendMetrics:
    """What a backend knows about its own load beyond the node's counters (e.g. scraped from a
    vLLM/SGLang /metrics endpoint); None where unknown."""

    queued: int | None = None
    running: int | None = None
    kv_cache_usage: float | None = None


class Backend(Protocol):
    async def start(self) -> None:
        """Load weights / check the server; blocking work goes to a thread, not the event loop."""

    async def run(self, request: CallRequest) -> CallOutcome:
        """Execute one call. Cancelling the awaiting task must abort the call and free its slot."""

    def metrics(self) -> BackendMetrics:
        """Cheap, non-blocking: called once per telemetry interval."""

    async def close(self) -> None:
        """Release threads, processes and connections; idempotent."""
