"""The trace format: one JSON object per finished call, the input of the predictors and the
simulator. Field names are a contract (docs/traces.md); add fields, never rename them."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmx.backends.base import CallKind
from swarmx.frozen import frozen
from swarmx.schema import SchemaError, decode, encode


class TraceError(ValueError):
    """A trace file that cannot be read; one line naming the file and line."""


@dataclass(frozen=True)
class DeviceAtDispatch:
    gpu: str
    """GPU model name (``H100``...), ``cpu`` for CPU replicas."""
    gpu_util: float
    """0..1, of the replica's GPU; 0 on CPU."""
    gpu_mem_frac: float
    cpu_util: float
    """0..1, the node's CPU use."""


@frozen
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
    kind: CallKind
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
    session: str = ""
    """The agent session the call belongs to; empty means the workflow is the session."""
    input_kinds: list[str] = field(default_factory=list)
    """What the input carries besides text: ``tool_result``, ``image``, ``model_output``..."""
    prefix_share: float | None = None
    """Share of the prompt that repeats the session's previous call (0..1), where known."""
    prefix_blocks: list[int] = field(default_factory=list)
    """Chained hashes of the prompt's whole blocks of ``block_tokens`` tokens
    (`swarmx.sched.prefix`): two calls share their first k blocks exactly when their first k
    ids are equal. Empty where unknown (tool calls, traces without them)."""
    block_tokens: int = 0
    """Tokens per block of ``prefix_blocks``: for SwarmX's own (256 bytes of the prompt's UTF-8)
    the model's tokens in 256 bytes as its server's counts have shown so far (64 at the start,
    256 for the byte-level torch LM), 512 for Mooncake's ``hash_ids``."""
    cached_tokens: int | None = None
    """Prompt tokens the engine served from its prefix cache instead of prefilling them, as it
    reported; None where it does not say."""
    cached_tokens_est: int | None = None
    """Prompt tokens the scheduler's prefix index expected the chosen replica to hold at
    dispatch (what routing saw); None where the call had no prefix blocks."""
    pred: dict[str, float] | None = None
    """The live predictor's quantiles for this call at dispatch (``{"0.9": s}``), if any."""
    predictor: str = ""
    """Version of the predictor that made ``pred``."""
    pred_completion: dict[str, float] | None = None
    """The router's predicted completion time at dispatch (``{"0.95": s}``): waiting for a slot
    on the chosen replica plus service, to compare with ``queue_s + latency_s``; None when the
    router made no forecast."""
    budget_s: float | None = None
    """Seconds from ``ts`` by which the call had to finish to keep its workflow within its SLO
    (the predicted remaining critical path subtracted), as the scheduler saw it at arrival."""
    stop_reason: str = ""
    """Why the output ended, as the engine said (OpenAI's ``stop``, ``length``, ``tool_calls``;
    Anthropic's ``end_turn``, ``max_tokens``, ``tool_use``); empty where unknown."""
    output_kinds: list[str] = field(default_factory=list)
    """What the output carried: ``text``, ``tool_use``; empty where unknown."""

    @property
    def session_id(self) -> str:
        return self.session or self.workflow


def read_traces(paths: Sequence[str | Path]) -> list[TraceRecord]:
    """Records from JSONL files; a bad line is an error naming file, line and field."""
    return [rec for path in paths for _, _, rec in read_records(path)]


def read_records(
    path: str | Path, defaults: Mapping[str, Any] | None = None
) -> Iterator[tuple[int, dict[str, Any], TraceRecord]]:
    """(line number, JSON object, record) for each record of one trace file. ``defaults`` fills
    the fields a line leaves out: the simulator replays hand-written partial traces, and its
    extra fields (``inputs``) are in the object."""
    for lineno, obj in json_lines(path):
        try:
            rec = _record({**defaults, **obj} if defaults else obj)
        except ValueError as exc:
            raise TraceError(f"{path}:{lineno}: {exc}") from None
        yield lineno, obj, rec


_COUNTS = (
    "prompt_tokens",
    "max_tokens",
    "output_tokens",
    "index",
    "attempt",
    "turn",
    "block_tokens",
    "cached_tokens",
    "cached_tokens_est",
)


def _record(obj: Mapping[str, Any]) -> TraceRecord:
    """The one check of a trace line: every field typed as documented (unknown ones ignored, so
    newer writers may add fields), numbers finite, ids non-empty, counts >= 0, ``slo_s`` > 0."""
    bad = _non_finite(obj, "")
    if bad is not None:
        raise SchemaError(bad[0], f"expected a finite number, got {bad[1]}")
    rec = decode(TraceRecord, obj, strict=False)
    for name in ("workflow", "step"):
        if not getattr(rec, name):
            raise SchemaError(name, "must not be empty")
    for name in _COUNTS:
        value = getattr(rec, name)
        if value is not None and value < 0:
            raise SchemaError(name, f"must be >= 0, got {value}")
    if rec.slo_s is not None and rec.slo_s <= 0:
        raise SchemaError("slo_s", f"must be > 0, got {rec.slo_s}")
    if rec.prefix_blocks and rec.block_tokens < 1:
        raise SchemaError("block_tokens", "must be >= 1 when prefix_blocks are given")
    return rec


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """(where, value) of the first NaN or infinity in a JSON value: Python's json reads
    ``NaN``, ``Infinity`` and ``1e999`` without complaint."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, Mapping):
        items: Iterable[tuple[str, Any]] = (
            (f"{path}.{k}" if path else str(k), v) for k, v in value.items()
        )
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for where, v in items:
        found = _non_finite(v, where)
        if found is not None:
            return found
    return None


def trace_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a trace file, line ends kept (for csv) and a UTF-8 byte-order mark
    skipped; a line that is not UTF-8 is an error naming it (decoded line by line, as a text
    file's chunks would name the wrong line)."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise TraceError(f"{path}:{lineno}: not UTF-8 text") from None
                yield lineno, line
    except OSError as exc:
        raise TraceError(f"{path}: cannot read trace: {exc.strerror or exc}") from None


def json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSONL file, blank lines skipped; a line that is not a JSON
    object is an error naming it."""
    for lineno, line in trace_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise TraceError(f"{path}:{lineno}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def write_traces(path: str | Path, records: Iterable[TraceRecord]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(encode(rec)) + "\n")
            n += 1
    return n


def split_keys(keys: Sequence[str], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (rest, held) with ``frac`` of the distinct keys, chosen by ``seed``, held out
    whole (at least one key on each side when there are two or more); input order kept."""
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must be in [0, 1], got {frac}")
    groups = sorted(set(keys))
    random.Random(seed).shuffle(groups)
    n_held = round(frac * len(groups))
    if 0 < frac < 1 and len(groups) >= 2:
        n_held = min(max(n_held, 1), len(groups) - 1)
    held = set(groups[:n_held])
    rest_idx = [i for i, k in enumerate(keys) if k not in held]
    held_idx = [i for i, k in enumerate(keys) if k in held]
    return rest_idx, held_idx
