"""What a predictor may know about a call before it runs, and how it is read off traces.

Pure Python, shared by offline training (from trace files) and the live scheduler (at dispatch),
so both build exactly the same inputs. A call sees only the calls of its own session that had
finished when it arrived: nothing from the future leaks into a forecast.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from swarmx.traces import TraceRecord


@dataclass(frozen=True)
class SessionContext:
    """The agent session so far, as of the call's arrival."""

    prior_calls: int = 0
    last_output_tokens: int | None = None
    last_latency_s: float | None = None
    mean_log_latency: float | None = None
    mean_output_tokens: float | None = None


@dataclass(frozen=True)
class Query:
    model: str
    kind: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    workflow_name: str = ""
    turn: int = 0
    input_kinds: list[str] = field(default_factory=list)
    prefix_share: float = 0.0
    gpu: str = "cpu"
    gpu_util: float = 0.0
    gpu_mem_frac: float = 0.0
    cpu_util: float = 0.0
    inflight: int = 0
    queue_depth: int = 0
    session: SessionContext = field(default_factory=SessionContext)
    cached_tokens: int = 0
    """Prompt tokens the placement's prefix cache holds (the engine's count in a trace, else
    the scheduler's estimate): a placement feature, as they cut the prefill there."""


Candidate = tuple[str, float, float, float, int, int]
"""A placement to score a call on: (gpu, gpu_util, gpu_mem_frac, cpu_util, inflight,
queue_depth), the device and runtime fields of a `Query`."""


def place_of(q: Query) -> Candidate:
    return (q.gpu, q.gpu_util, q.gpu_mem_frac, q.cpu_util, q.inflight, q.queue_depth)


def place(q: Query, c: Candidate, cached_tokens: int = 0) -> Query:
    """The query as it would be on placement ``c``, holding ``cached_tokens`` of its prompt."""
    return dataclasses.replace(
        q,
        gpu=c[0],
        gpu_util=c[1],
        gpu_mem_frac=c[2],
        cpu_util=c[3],
        inflight=c[4],
        queue_depth=c[5],
        cached_tokens=cached_tokens,
    )


def query_from_record(rec: TraceRecord, ctx: SessionContext) -> Query:
    return Query(
        model=rec.model,
        kind=rec.kind,
        prompt=rec.prompt,
        prompt_tokens=rec.prompt_tokens,
        max_tokens=rec.max_tokens,
        workflow_name=rec.workflow_name,
        turn=rec.turn,
        input_kinds=list(rec.input_kinds),
        prefix_share=rec.prefix_share or 0.0,
        gpu=rec.device.gpu,
        gpu_util=rec.device.gpu_util,
        gpu_mem_frac=rec.device.gpu_mem_frac,
        cpu_util=rec.device.cpu_util,
        inflight=rec.runtime.inflight,
        queue_depth=rec.runtime.queue_depth,
        session=ctx,
        cached_tokens=_cached(rec),
    )


def _cached(rec: TraceRecord) -> int:
    """What the engine served from its cache; where it did not say, what the index expected."""
    if rec.cached_tokens is not None:
        return rec.cached_tokens
    return rec.cached_tokens_est or 0


class SessionTracker:
    """Running per-session summaries; `observe` each finished call, `context` at arrival."""

    def __init__(self) -> None:
        self._n: dict[str, int] = defaultdict(int)
        self._last: dict[str, tuple[int, float]] = {}
        self._sum_log: dict[str, float] = defaultdict(float)
        self._sum_out: dict[str, float] = defaultdict(float)

    def observe(self, session: str, output_tokens: int, latency_s: float) -> None:
        self._n[session] += 1
        self._last[session] = (output_tokens, latency_s)
        self._sum_log[session] += math.log(max(latency_s, 1e-6))
        self._sum_out[session] += output_tokens

    def context(self, session: str) -> SessionContext:
        n = self._n.get(session, 0)
        if n == 0:
            return SessionContext()
        out, lat = self._last[session]
        return SessionContext(n, out, lat, self._sum_log[session] / n, self._sum_out[session] / n)

    def forget(self, session: str) -> None:
        for table in (self._n, self._last, self._sum_log, self._sum_out):
            table.pop(session, None)


def session_contexts(records: Sequence[TraceRecord]) -> list[SessionContext]:
    """Each record's context from the records of its session that finished before it arrived
    (finish = ts + queue_s + latency_s); returned in the order of ``records``."""
    events: list[tuple[float, int, int]] = []  # (time, 0 = finish / 1 = arrival, index)
    for i, r in enumerate(records):
        events.append((r.ts, 1, i))
        events.append((r.ts + r.queue_s + r.latency_s, 0, i))
    events.sort()
    tracker = SessionTracker()
    out: list[SessionContext | None] = [None] * len(records)
    for _, what, i in events:
        r = records[i]
        if what == 1:
            out[i] = tracker.context(r.session_id)
        elif r.ok:
            tracker.observe(r.session_id, r.output_tokens, r.latency_s)
    return [c if c is not None else SessionContext() for c in out]


def queries(records: Sequence[TraceRecord]) -> list[Query]:
    return [
        query_from_record(r, c) for r, c in zip(records, session_contexts(records), strict=True)
    ]
