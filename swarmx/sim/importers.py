"""Recorded traces replayed as simulator workloads (``swarmx sim --trace``): SwarmX trace JSONL
(read and checked by `swarmx.traces`, the one reader of that format), the Azure LLM inference
2023 CSVs and Mooncake JSONL. Documented in docs/simulator.md ("Traces")."""

from __future__ import annotations

import csv
import heapq
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from graphlib import CycleError, TopologicalSorter
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from swarmx.sim.simworkflow import LLM_MODEL, VISION_MODEL, CallTruth, SimWorkflow, Truth
from swarmx.traces import TraceError, TraceRecord, json_lines, read_records, trace_lines
from swarmx.workflow.spec import StepSpec, WorkflowSpec

TraceFormat = Literal["swarmx", "azure", "mooncake"]

AZURE_MAX_TOKENS = 2048
"""``max_tokens`` of a replayed Azure or Mooncake call (or its output, if longer): the traces
record no limit, and a constant one tells policies nothing the trace does not."""


def detect_format(path: Path) -> TraceFormat:
    """From the first non-empty line: a ``TIMESTAMP,...`` CSV header (Azure), or a JSON object
    with ``ts`` and ``workflow`` (SwarmX) or ``timestamp`` and ``input_length`` (Mooncake)."""
    for lineno, line in trace_lines(path):
        text = line.strip()
        if not text:
            continue
        if text.startswith("TIMESTAMP"):
            return "azure"
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            if "ts" in obj and "workflow" in obj:
                return "swarmx"
            if "timestamp" in obj and "input_length" in obj:
                return "mooncake"
        raise TraceError(
            f"{path}:{lineno}: unknown trace format (expected a SwarmX trace JSONL line with ts and"
            " workflow, an Azure CSV header TIMESTAMP,ContextTokens,GeneratedTokens, or a"
            " Mooncake JSONL line with timestamp and input_length)"
        )
    raise TraceError(f"{path}: empty trace file")


def load_trace(
    path: Path, *, limit: int | None = None, slo_s: float | None = None, model: str = LLM_MODEL
) -> list[SimWorkflow]:
    """Workflows replayed from a trace file, in arrival order, arrivals relative to the earliest
    record; the format is detected (`detect_format`). ``limit`` keeps the first workflows;
    ``slo_s`` applies where the trace records none; ``model`` names the model of calls that
    record none (all of Azure and Mooncake). A malformed line raises `TraceError` (a
    ValueError) naming ``file:line``."""
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fmt = detect_format(path)
    if fmt == "swarmx":
        return _load_swarmx(path, limit, slo_s, model)
    if fmt == "azure":
        return _load_azure(path, limit, slo_s, model)
    return _load_mooncake(path, limit, slo_s, model)


# --- one call per record: Azure and Mooncake ---------------------------------------------------


def _one_call(
    name: str, prompt_tokens: int, output_tokens: int, *, slo_s: float | None, model: str
) -> SimWorkflow:
    """A one-call workflow (arrival filled in by `_relative`). Its prompt is a fixed neutral
    string: these traces hold no text, and none is invented for a text-aware predictor."""
    out = max(1, output_tokens)
    step = StepSpec(
        id="call",
        kind="llm",
        after=[],
        model=model,
        prompt=f"{name} request",
        max_tokens=max(out, AZURE_MAX_TOKENS),
    )
    spec = WorkflowSpec(name=name, slo_s=slo_s, inputs={}, steps=[step], source=name)
    truth: Truth = {("call", None): CallTruth(max(1, prompt_tokens), out)}
    return SimWorkflow(0.0, spec, truth, name=name)


def _relative(rows: list[tuple[float, SimWorkflow]]) -> list[SimWorkflow]:
    if not rows:
        return []
    t0 = min(ts for ts, _ in rows)
    out = [SimWorkflow(ts - t0, wf.spec, wf.truth, wf.release_s, wf.name) for ts, wf in rows]
    out.sort(key=lambda wf: wf.arrival_s)  # stable: ties keep file order
    return out


def _azure_ts(text: str) -> float:
    """``2023-11-16 18:17:03.9799600`` (UTC, any number of fractional digits) to Unix s."""
    whole, _, frac = text.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds {frac!r}")
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def _azure_name(path: Path) -> str:
    stem = path.name.lower()
    for tag in ("conv", "code"):
        if tag in stem:
            return f"azure-{tag}"
    return "azure"


def _load_azure(
    path: Path, limit: int | None, slo_s: float | None, model: str
) -> list[SimWorkflow]:
    name = _azure_name(path)
    rows: list[tuple[float, SimWorkflow]] = []
    reader = csv.reader(line for _, line in trace_lines(path))
    header = [h.strip() for h in next(reader, [])]
    need = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    missing = [h for h in need if h not in header]
    if missing:
        raise TraceError(f"{path}:1: Azure CSV header lacks {', '.join(missing)}")
    cols = [header.index(h) for h in need]
    for row in reader:
        if limit is not None and len(rows) >= limit:
            break
        if not row or not any(c.strip() for c in row):
            continue
        try:
            if len(row) < len(header):
                raise ValueError(f"expected {len(header)} columns, got {len(row)}")
            ts = _azure_ts(row[cols[0]])
            ctx, gen = int(row[cols[1]]), int(row[cols[2]])
            if ctx < 0 or gen < 0:
                raise ValueError("token counts must be >= 0")
        except ValueError as exc:
            raise TraceError(f"{path}:{reader.line_num}: {exc}") from None
        rows.append((ts, _one_call(name, ctx, gen, slo_s=slo_s, model=model)))
    return _relative(rows)


def _count(obj: dict[str, Any], key: str) -> int:
    """A Mooncake length: a whole number >= 0 (written as an integer or not)."""
    value = obj.get(key)
    if value is None:
        raise ValueError(f"missing field {key!r}")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(f"field {key!r}: expected an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"field {key!r}: must be >= 0, got {value!r}")
    return int(value)


def _timestamp_s(obj: dict[str, Any]) -> float:
    """A Mooncake ``timestamp`` (ms) in seconds."""
    value = obj.get("timestamp")
    if value is None:
        raise ValueError("missing field 'timestamp'")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"field 'timestamp': expected a finite number, got {value!r}")
    return value / 1000.0


def _load_mooncake(
    path: Path, limit: int | None, slo_s: float | None, model: str
) -> list[SimWorkflow]:
    rows: list[tuple[float, SimWorkflow]] = []
    for lineno, obj in islice(json_lines(path), limit):
        try:
            ts = _timestamp_s(obj)
            prompt, output = _count(obj, "input_length"), _count(obj, "output_length")
        except ValueError as exc:
            raise TraceError(f"{path}:{lineno}: {exc}") from None
        rows.append((ts, _one_call("mooncake", prompt, output, slo_s=slo_s, model=model)))
    return _relative(rows)


# --- SwarmX traces: one workflow per recorded workflow -----------------------------------------

_REPLAY_DEFAULTS: dict[str, Any] = {
    "deps": [],
    "kind": "llm",
    "model": "",
    "prompt": "",
    "prompt_tokens": 0,
    "max_tokens": 0,
    "output_tokens": 1,
    "latency_s": 0.0,
    "queue_s": 0.0,
    "ttft_s": None,
    "node": "",
    "replica": "",
    "device": {"gpu": "", "gpu_util": 0.0, "gpu_mem_frac": 0.0, "cpu_util": 0.0},
    "runtime": {"inflight": 0, "queue_depth": 0},
}
"""What a replayed record may leave out (docs/simulator.md: only ``ts``, ``workflow`` and
``step`` are required): the fields the replay reads get their documented defaults, the others
placeholders it never reads."""


@dataclass(frozen=True)
class _Call:
    """One recorded call as the replay needs it: its record, where it is in the file, and the
    ``inputs`` of a ``model`` call (a field the simulator reads beyond the trace format)."""

    lineno: int
    rec: TraceRecord
    inputs: dict[str, str]


def _inputs(path: Path, lineno: int, obj: dict[str, Any]) -> dict[str, str]:
    raw = obj.get("inputs") or {}
    if not isinstance(raw, dict):
        raise TraceError(f"{path}:{lineno}: inputs: expected an object, got {raw!r}")
    return {str(k): _literal(str(v)) for k, v in raw.items()}


def _literal(text: str) -> str:
    """Text as a template that renders to itself (recorded prompts may hold braces)."""
    return text.replace("{", "{{").replace("}", "}}")


def _load_swarmx(
    path: Path, limit: int | None, slo_s: float | None, model: str
) -> list[SimWorkflow]:
    groups: dict[str, list[_Call]] = {}
    for lineno, obj, rec in read_records(path, _REPLAY_DEFAULTS):
        call = _Call(lineno, rec, _inputs(path, lineno, obj))
        groups.setdefault(rec.workflow, []).append(call)
    if not groups:
        return []
    t0 = min(c.rec.ts for calls in groups.values() for c in calls)
    built = [
        _replay(path, wf_id, calls, t0, slo_s=slo_s, model=model) for wf_id, calls in groups.items()
    ]
    built.sort(key=lambda wf: wf.arrival_s)
    return built if limit is None else built[:limit]


def _step_id(name: str, index: int | None) -> str:
    return name if index is None else f"{name}[{index}]"


def _replay(
    path: Path, wf_id: str, calls: list[_Call], t0: float, *, slo_s: float | None, model: str
) -> SimWorkflow:
    """One recorded workflow as a flat DAG: each (step, index) its own step, after every
    instance of the steps its record names in ``deps``; retries collapse into one call."""
    first_ts: dict[str, float] = {}
    chosen: dict[str, _Call] = {}
    instances: dict[str, list[str]] = {}
    for call in calls:
        rec = call.rec
        sid = _step_id(rec.step, rec.index)
        first_ts[sid] = min(rec.ts, first_ts.get(sid, rec.ts))
        best = chosen.get(sid)
        if best is None:
            instances.setdefault(rec.step, []).append(sid)
        if best is None or (rec.ok, rec.attempt) >= (best.rec.ok, best.rec.attempt):
            chosen[sid] = call
    arrival = min(first_ts.values())
    after = {
        sid: [
            d
            for name in dict.fromkeys(call.rec.deps)
            if name != call.rec.step
            for d in instances.get(name, [])
        ]
        for sid, call in chosen.items()
    }
    order = _topo(path, wf_id, after, {sid: (first_ts[sid], c.lineno) for sid, c in chosen.items()})
    steps: list[StepSpec] = []
    truth: Truth = {}
    for sid in order:
        call = chosen[sid]
        rec = call.rec
        if rec.kind == "tool":  # the trace's prompt is the command line, space-joined
            command = [_literal(a) for a in rec.prompt.split()] or [rec.step]
            steps.append(StepSpec(id=sid, kind="tool", after=after[sid], command=command))
            work_s = max(0.0, rec.latency_s)
            truth[sid, None] = CallTruth(0, max(1, rec.output_tokens), work_s=work_s)
            continue
        out = max(1, rec.output_tokens)
        steps.append(
            StepSpec(
                id=sid,
                kind=rec.kind,
                after=after[sid],
                model=rec.model or (model if rec.kind == "llm" else VISION_MODEL),
                prompt=_literal(rec.prompt),
                max_tokens=max(out, rec.max_tokens) if rec.kind == "llm" else 256,
                inputs=call.inputs if rec.kind == "model" else {},
            )
        )
        truth[sid, None] = CallTruth(rec.prompt_tokens, out)
    recs = [c.rec for c in calls]
    slo = next((r.slo_s for r in recs if r.slo_s is not None), slo_s)
    name = next((r.workflow_name for r in recs if r.workflow_name), "") or "trace"
    spec = WorkflowSpec(name=name, slo_s=slo, inputs={}, steps=steps, source=f"{path} {wf_id}")
    release = {sid: first_ts[sid] - arrival for sid in order}
    return SimWorkflow(arrival - t0, spec, truth, release, name)


def _topo(
    path: Path,
    wf_id: str,
    after: dict[str, list[str]],
    key: dict[str, tuple[float, int]],
) -> list[str]:
    """A topological order taking the free step with the smallest ``key`` (earliest recorded
    arrival, then line) first; a cycle is an error naming the line of its earliest step."""
    graph = TopologicalSorter(after)
    try:
        graph.prepare()
    except CycleError as exc:
        stuck = sorted(set(exc.args[1]), key=key.__getitem__)
        raise TraceError(
            f"{path}:{key[stuck[0]][1]}: workflow {wf_id!r}: steps depend on each other "
            f"in a cycle ({', '.join(stuck[:6])})"
        ) from None
    ready = [(key[sid], sid) for sid in graph.get_ready()]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, sid = heapq.heappop(ready)
        order.append(sid)
        graph.done(sid)
        for nxt in graph.get_ready():
            heapq.heappush(ready, (key[nxt], nxt))
    return order
