"""What a predictor may know about a call before it runs, and how it is read off traces.

Pure Python, shared by offline training (from trace files) and the live scheduler (at dispatch),
so both build exactly the same inputs. A call sees only the calls of its own session that had
finished when it arrived: nothing from the future leaks into a forecast.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from swarmx.traces import TraceRecord

RECENT_S = 60.0
"""How far back the serving side's recent state looks (`SessionContext.recent_calls`)."""
RECENT_CALLS = 4096
"""Calls of one model it keeps at most, however many end in that minute."""
_STOPS = {
    "tool_use": "tool",
    "tool_calls": "tool",
    "function_call": "tool",
    "max_tokens": "length",
    "length": "length",
    "end_turn": "end",
    "stop": "end",
    "stop_sequence": "end",
}


def stop_class(reason: str, output_kinds: Sequence[str] = ()) -> str:
    """A stop reason as the predictor reads it, whatever the API's words: ``tool`` (it asked for
    a tool), ``length`` (cut at its limit), ``end`` (it finished), or "" (unknown)."""
    known = _STOPS.get(reason.lower(), "")
    return known or ("tool" if "tool_use" in output_kinds else "")


@dataclass(frozen=True)
class SessionContext:
    """The agent session so far, and the serving side's last minute, as of the call's arrival:
    only calls that had ended by then."""

    prior_calls: int = 0
    last_output_tokens: int | None = None
    last_latency_s: float | None = None
    mean_log_latency: float | None = None
    mean_output_tokens: float | None = None
    last_stop: str = ""
    """The previous call's `stop_class`."""
    tool_loop: int = 0
    """Calls in a row, ending with the previous, that stopped to ask for a tool: how deep the
    agent is in its tool loop."""
    since_last_s: float | None = None
    """From the previous call's end to this one's arrival (the tool's run, the agent's
    thinking, a sub-agent's work)."""
    recent_calls: int = 0
    """Calls of this model, from any session, that ended in the `RECENT_S` before arrival."""
    recent_log_latency: float | None = None
    """Their mean log latency: how the serving side is doing right now."""
    recent_log_pace: float | None = None
    """Their mean log seconds per output token."""


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
    """Running per-session summaries, and each model's calls of the last `RECENT_S`; `observe`
    each finished call (in the order they end), `context` at arrival."""

    def __init__(self) -> None:
        self._n: dict[str, int] = defaultdict(int)
        self._last: dict[str, tuple[int, float]] = {}
        self._sum_log: dict[str, float] = defaultdict(float)
        self._sum_out: dict[str, float] = defaultdict(float)
        self._stop: dict[str, str] = {}
        self._loop: dict[str, int] = {}
        self._end: dict[str, float] = {}
        self._recent: dict[str, deque[tuple[float, float, float]]] = {}
        """model -> (end, log latency, log pace) of its recent calls, oldest first."""
        self._recent_sums: dict[str, list[float]] = {}

    def observe(
        self,
        session: str,
        output_tokens: int,
        latency_s: float,
        *,
        stop: str = "",
        end_ts: float | None = None,
        model: str = "",
    ) -> None:
        """A call of ``session`` ended (at ``end_ts``, on ``model``), with this `stop_class`."""
        self._n[session] += 1
        self._last[session] = (output_tokens, latency_s)
        log_latency = math.log(max(latency_s, 1e-6))
        self._sum_log[session] += log_latency
        self._sum_out[session] += output_tokens
        self._stop[session] = stop
        self._loop[session] = self._loop.get(session, 0) + 1 if stop == "tool" else 0
        if end_ts is None:
            return
        self._end[session] = end_ts
        if model:
            recent = self._recent.get(model)
            if recent is None:
                recent = self._recent[model] = deque()
                self._recent_sums[model] = [0.0, 0.0]
            pace = log_latency - math.log1p(max(output_tokens, 0))
            sums = self._recent_sums[model]
            if len(recent) >= RECENT_CALLS:
                _, old_log, old_pace = recent.popleft()
                sums[0] -= old_log
                sums[1] -= old_pace
            recent.append((end_ts, log_latency, pace))
            sums[0] += log_latency
            sums[1] += pace

    def observe_record(self, rec: TraceRecord) -> None:
        self.observe(
            rec.session_id,
            rec.output_tokens,
            rec.latency_s,
            stop=stop_class(rec.stop_reason, rec.output_kinds),
            end_ts=rec.ts + rec.queue_s + rec.latency_s,
            model=rec.model,
        )

    def context(self, session: str, model: str, now_ts: float | None) -> SessionContext:
        """What a call of ``session`` on ``model`` arriving at ``now_ts`` may know (no time:
        nothing of pauses or of the last minute)."""
        recent: tuple[int, float | None, float | None] = (0, None, None)
        if model and now_ts is not None and model in self._recent:
            calls, sums = self._recent[model], self._recent_sums[model]
            while calls and calls[0][0] < now_ts - RECENT_S:
                _, old_log, old_pace = calls.popleft()
                sums[0] -= old_log
                sums[1] -= old_pace
            if calls:
                recent = (len(calls), sums[0] / len(calls), sums[1] / len(calls))
        n = self._n.get(session, 0)
        if n == 0:
            return SessionContext(
                recent_calls=recent[0], recent_log_latency=recent[1], recent_log_pace=recent[2]
            )
        out, lat = self._last[session]
        end = self._end.get(session)
        return SessionContext(
            n,
            out,
            lat,
            self._sum_log[session] / n,
            self._sum_out[session] / n,
            self._stop.get(session, ""),
            self._loop.get(session, 0),
            None if end is None or now_ts is None else max(0.0, now_ts - end),
            *recent,
        )

    def forget(self, session: str) -> None:
        for table in (
            self._n,
            self._last,
            self._sum_log,
            self._sum_out,
            self._stop,
            self._loop,
            self._end,
        ):
            table.pop(session, None)


def session_contexts(records: Sequence[TraceRecord]) -> list[SessionContext]:
    """Each record's context from the records of its session, and of its model, that finished
    before it arrived (finish = ts + queue_s + latency_s); returned in the order of
    ``records``."""
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
            out[i] = tracker.context(r.session_id, r.model, r.ts)
        elif r.ok:
            tracker.observe_record(r)
    return [c if c is not None else SessionContext() for c in out]


def queries(records: Sequence[TraceRecord]) -> list[Query]:
    return [
        query_from_record(r, c) for r, c in zip(records, session_contexts(records), strict=True)
    ]
