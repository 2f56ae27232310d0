"""Recorded traces replayed as simulator workloads (``swarmx sim --trace``): SwarmX trace JSONL
(read and checked by `swarmx.traces`, the one reader of that format), the Azure LLM inference
2023 CSVs, Mooncake JSONL, and claude-code ``requests.csv`` sessions (each agent a closed loop).
Documented in docs/simulator.md ("Traces")."""

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

from swarmx.sched.prefix import BLOCK_TOKENS
from swarmx.sim.simworkflow import (
    LLM_MODEL,
    VISION_MODEL,
    AgentBlocks,
    CallTruth,
    SimWorkflow,
    Truth,
)
from swarmx.tracefmt import CLAUDE_CODE_COLUMNS
from swarmx.traces import TraceError, TraceRecord, json_lines, read_records, trace_lines
from swarmx.workflow.spec import StepSpec, WorkflowSpec

TraceFormat = Literal["swarmx", "azure", "mooncake", "claude-code"]

AZURE_MAX_TOKENS = 2048
"""``max_tokens`` of a replayed Azure or Mooncake call (or its output, if longer): the traces
record no limit, and a constant one tells policies nothing the trace does not."""
MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per block of Mooncake's ``hash_ids``."""
CLAUDE_CODE_BLOCK_TOKENS = BLOCK_TOKENS
"""Tokens per block of the claude-code traces' ``n_blocks`` (64, as SwarmX's own)."""


def detect_format(path: Path) -> TraceFormat:
    """From the first non-empty line: a ``TIMESTAMP,...`` CSV header (Azure), a
    ``trace_id,agent_id,...`` one (claude-code), or a JSON object with ``ts`` and ``workflow``
    (SwarmX) or ``timestamp`` and ``input_length`` (Mooncake)."""
    for lineno, line in trace_lines(path):
        text = line.strip()
        if not text:
            continue
        if text.startswith("TIMESTAMP"):
            return "azure"
        if text.startswith("trace_id,"):
            return "claude-code"
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
            " workflow, an Azure CSV header TIMESTAMP,ContextTokens,GeneratedTokens, a"
            " claude-code CSV header trace_id,agent_id,..., or a Mooncake JSONL line with"
            " timestamp and input_length)"
        )
    raise TraceError(f"{path}: empty trace file")


def load_trace(
    path: Path, *, limit: int | None = None, slo_s: float | None = None, model: str = LLM_MODEL
) -> list[SimWorkflow]:
    """Workflows replayed from a trace file, in arrival order, arrivals relative to the earliest
    record; the format is detected (`detect_format`). ``limit`` keeps the first workflows (a
    claude-code trace's sessions); ``slo_s`` applies where the trace records none; ``model``
    names the model of calls that record none (all of Azure, Mooncake and claude-code, whose
    hosted models are not emulated). A malformed line raises `TraceError` (a ValueError) naming
    ``file:line``."""
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fmt = detect_format(path)
    if fmt == "swarmx":
        return _load_swarmx(path, limit, slo_s, model)
    if fmt == "azure":
        return _load_azure(path, limit, slo_s, model)
    if fmt == "claude-code":
        return _load_claude_code(path, limit, slo_s, model)
    return _load_mooncake(path, limit, slo_s, model)


# --- one call per record: Azure and Mooncake ---------------------------------------------------


def _llm_step(step_id: str, after: list[str], prompt: str, model: str, output: int) -> StepSpec:
    """A replayed call with no recorded text: its prompt is a fixed neutral string (nothing is
    invented for a text-aware predictor) and its ``max_tokens`` `AZURE_MAX_TOKENS`."""
    return StepSpec(
        id=step_id,
        kind="llm",
        after=after,
        model=model,
        prompt=prompt,
        max_tokens=max(output, AZURE_MAX_TOKENS),
    )


def _one_call(
    name: str,
    prompt_tokens: int,
    output_tokens: int,
    *,
    slo_s: float | None,
    model: str,
    blocks: tuple[int, ...] = (),
    block_tokens: int = 0,
) -> SimWorkflow:
    """A one-call workflow (arrival filled in by `_relative`)."""
    out = max(1, output_tokens)
    step = _llm_step("call", [], f"{name} request", model, out)
    spec = WorkflowSpec(name=name, slo_s=slo_s, inputs={}, steps=[step], source=name)
    truth: Truth = {
        ("call", None): CallTruth(
            max(1, prompt_tokens), out, prefix_blocks=blocks, block_tokens=block_tokens
        )
    }
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


def _hash_ids(obj: dict[str, Any]) -> tuple[int, ...]:
    """Mooncake's ``hash_ids`` (optional): integers."""
    value = obj.get("hash_ids", [])
    if not isinstance(value, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in value
    ):
        raise ValueError(f"field 'hash_ids': expected a list of integers, got {value!r}")
    return tuple(value)


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
            blocks = _hash_ids(obj)
        except ValueError as exc:
            raise TraceError(f"{path}:{lineno}: {exc}") from None
        wf = _one_call(
            "mooncake",
            prompt,
            output,
            slo_s=slo_s,
            model=model,
            blocks=blocks,
            block_tokens=MOONCAKE_BLOCK_TOKENS if blocks else 0,
        )
        rows.append((ts, wf))
    return _relative(rows)


# --- claude-code sessions: each agent a closed loop --------------------------------------------

_CLAUDE_CODE_REPLAY = (*CLAUDE_CODE_COLUMNS, "think_time_s")
"""The columns of ``requests.csv`` the replay needs: what `swarmx.tracefmt` reads, and the
think time."""


@dataclass(frozen=True)
class _AgentCall:
    """One row of a claude-code ``requests.csv`` as the replay needs it."""

    lineno: int
    agent: str
    req: int
    agent_start_s: float
    think_s: float
    prompt_tokens: int
    output_tokens: int
    blocks: int
    shared: int


def _agent_call(lineno: int, row: dict[str, str]) -> _AgentCall:
    def number(key: str, empty: float | None = None) -> float:
        text = row[key].strip()
        if not text and empty is not None:
            return empty
        value = float(text)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key}: expected a finite number >= 0, got {text!r}")
        return value

    def count(key: str) -> int:
        value = number(key)
        if value != int(value):
            raise ValueError(f"{key}: expected an integer, got {row[key]!r}")
        return int(value)

    if not row["agent_id"]:
        raise ValueError("agent_id: must not be empty")
    return _AgentCall(
        lineno=lineno,
        agent=row["agent_id"],
        req=count("req_idx"),
        agent_start_s=number("agent_start_s"),
        think_s=number("think_time_s", empty=0.0),
        prompt_tokens=count("in_tokens"),
        output_tokens=count("out_tokens"),
        blocks=count("n_blocks"),
        shared=count("prefix_blocks_shared_prev"),
    )


def _load_claude_code(
    path: Path, limit: int | None, slo_s: float | None, model: str
) -> list[SimWorkflow]:
    """One workflow per ``trace_id`` (a session), all arriving at 0 (each trace's clock starts
    there). Each agent's calls form a chain: a call is released its recorded ``think_time_s``
    after the agent's previous call ends, a sub-agent's first call at its ``agent_start_s``
    after the session starts. Prompt blocks are made up at submission (`AgentBlocks`)."""
    reader = csv.DictReader(line for _, line in trace_lines(path))
    missing = [c for c in _CLAUDE_CODE_REPLAY if c not in (reader.fieldnames or [])]
    if missing:
        raise TraceError(f"{path}:1: claude-code CSV header lacks {', '.join(missing)}")
    sessions: dict[str, dict[str, list[_AgentCall]]] = {}
    for row in reader:
        trace = row["trace_id"]
        if trace not in sessions and limit is not None and len(sessions) >= limit:
            break
        if None in row or None in row.values() or not trace:
            raise TraceError(
                f"{path}:{reader.line_num}: expected {len(reader.fieldnames or [])}"
                " columns and a trace_id"
            )
        try:
            call = _agent_call(reader.line_num, row)
        except ValueError as exc:
            raise TraceError(f"{path}:{reader.line_num}: {exc}") from None
        sessions.setdefault(trace, {}).setdefault(call.agent, []).append(call)
    return [_session(path, trace, agents, slo_s, model) for trace, agents in sessions.items()]


def _session(
    path: Path,
    trace: str,
    agents: dict[str, list[_AgentCall]],
    slo_s: float | None,
    model: str,
) -> SimWorkflow:
    steps: list[StepSpec] = []
    truth: Truth = {}
    release: dict[str, float] = {}
    think: dict[str, float] = {}
    for agent, calls in agents.items():
        prev: str | None = None
        for call in sorted(calls, key=lambda c: c.req):
            sid = f"{agent}/req{call.req}"
            if (sid, None) in truth:
                raise TraceError(f"{path}:{call.lineno}: {trace} has {sid} twice")
            out = max(1, call.output_tokens)
            steps.append(_llm_step(sid, [prev] if prev else [], "claude-code request", model, out))
            if prev is None:
                release[sid] = call.agent_start_s
            else:
                think[sid] = call.think_s
            made = AgentBlocks(agent, call.blocks, call.shared)
            truth[sid, None] = CallTruth(
                max(1, call.prompt_tokens),
                out,
                block_tokens=CLAUDE_CODE_BLOCK_TOKENS,
                agent_blocks=made,
            )
            prev = sid
    spec = WorkflowSpec(
        name="claude-code", slo_s=slo_s, inputs={}, steps=steps, source=f"{path} {trace}"
    )
    return SimWorkflow(0.0, spec, truth, release, "claude-code", think)


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
        truth[sid, None] = CallTruth(
            rec.prompt_tokens,
            out,
            prefix_blocks=tuple(rec.prefix_blocks),
            block_tokens=rec.block_tokens if rec.prefix_blocks else 0,
        )
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
