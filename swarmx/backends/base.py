"""The interface every backend implements, and the request/outcome types it speaks.

The node agent owns queueing and timing: it admits at most ``concurrency`` calls into a backend at
once, measures ``queue_s`` (waiting for a slot) and ``latency_s`` (inside ``run``), and turns the
outcome into a wire `Result`. A backend only executes calls; continuous-batching backends batch
the calls that are inside ``run`` at the same time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

CallKind = Literal["llm", "model", "tool"]
Api = Literal["chat", "completions"]
"""The OpenAI endpoint a gateway call came in on: its streamed chunks take that endpoint's shape."""


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
    api: Api = "chat"
    """Which OpenAI endpoint the call is: ``/chat/completions`` or ``/completions``."""
    body: str = ""
    """A gateway call's request as a JSON object text, validated, without ``model``, ``stream``
    and ``stream_options`` (the backend sets those). Empty for workflow calls, which send
    ``prompt``. Only the OpenAI backend reads it; embedded models always read ``prompt`` (the
    gateway flattens chat messages into it)."""
    stream: Callable[[str], None] | None = None
    """When set, called on the event loop's thread, in order, with the JSON text of each OpenAI
    streaming chunk as it is produced (one SSE event's data, never ``[DONE]``): a
    ``chat.completion.chunk`` (``choices[0].delta``) or a ``text_completion`` (``choices[0].text``)
    as ``api`` says. The last chunk with a choice carries ``finish_reason``; after it comes one
    usage chunk with ``"choices": []`` and ``usage``. ``run`` still returns the whole outcome.
    It must not raise: it runs inside the backend's engine, which serves other calls too."""


@dataclass(frozen=True)
class CallOutcome:
    ok: bool
    output: str
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    """Seconds from the start of ``run`` to the first output token (None if not a token stream)."""
    cached_tokens: int | None = None
    """Prompt tokens whose KV came from the backend's prefix cache instead of being prefilled;
    None where the backend does not say (an OpenAI-compatible server that reports no
    ``usage.prompt_tokens_details.cached_tokens``)."""
    infra: bool = False
    """Failed because the backend failed (its engine died), not because of the call: it may
    run elsewhere without using up the step's retries."""
    stop_reason: str = ""
    """Why the output ended, in the engine's words (``stop``, ``length``, ``tool_calls``);
    "" where unknown. The next call of the session is forecast knowing it."""
    output_kinds: list[str] = field(default_factory=list)
    """What the output carried: ``text``, ``tool_use``."""


@dataclass(frozen=True)
class BackendMetrics:
    """What a backend knows about its own load beyond the node's counters (e.g. scraped from a
    vLLM/SGLang /metrics endpoint); None where unknown."""

    queued: int | None = None
    running: int | None = None
    kv_cache_usage: float | None = None
    prefix_cache_blocks: int | None = None
    """Prompt blocks (`swarmx.sched.prefix` hashes) the backend's prefix cache holds now."""
    prefix_cache_capacity: int | None = None
    """Blocks its prefix cache may hold at most (0: it has none): how far prefix routing to this
    replica can pay off."""


@dataclass
class CacheReport:
    """What a replica's engine said of its prefix cache since the last report, in SwarmX's block
    ids (`swarmx.sched.prefix`): the scheduler's prefix index, which otherwise only guesses from
    the calls it routed, drops what the engine evicted."""

    removed: list[int]
    """Block ids it no longer holds."""
    resets: int
    """Whole-cache clears since the backend started: the index starts over when this changes."""
    capacity_tokens: int | None
    """Tokens its cache holds at most, where known."""
    refused: int = 0
    """The engine's event frames, and events in them, that could not be read, since the start."""


@runtime_checkable
class ReportsCache(Protocol):
    """A backend whose engine says what its prefix cache drops (the embedded torch LM, whose
    cache is keyed by SwarmX's ids; an OpenAI-compatible engine that publishes KV events)."""

    def cache_report(self) -> CacheReport | None:
        """Since the last call; None while it has nothing to say. Cheap, non-blocking."""


class Backend(Protocol):
    async def start(self) -> None:
        """Load weights / check the server; blocking work goes to a thread, not the event loop."""

    async def run(self, request: CallRequest) -> CallOutcome:
        """Execute one call and return its whole outcome, streaming its chunks to
        ``request.stream`` on the way when that is set. Cancelling the awaiting task must abort
        the call and free its slot (once ``run`` has raised CancelledError, no more chunks come)."""

    def metrics(self) -> BackendMetrics:
        """Cheap, non-blocking: called once per telemetry interval."""

    async def close(self) -> None:
        """Release threads, processes and connections; idempotent."""
