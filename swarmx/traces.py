"""The trace format: one JSON object per finished call, the input of the predictors and the
simulator. Field names are a contract (docs/traces.md); add fields, never rename them."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from swarmx.frozen import frozen
from swarmx.schema import SchemaError, decode, encode


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
    session: str = ""
    """The agent session the call belongs to; empty means the workflow is the session."""
    input_kinds: list[str] = field(default_factory=list)
    """What the input carries besides text: ``tool_result``, ``image``, ``model_output``..."""
    prefix_share: float | None = None
    """Share of the prompt that repeats the session's previous call (0..1), where known."""
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

    @property
    def session_id(self) -> str:
        return self.session or self.workflow


def read_traces(paths: Sequence[str | Path]) -> list[TraceRecord]:
    """Records from JSONL files; a bad line is an error naming file and line."""
    out: list[TraceRecord] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(decode(TraceRecord, json.loads(line), strict=False))
                except (ValueError, SchemaError) as exc:
                    raise TraceError(f"{path}:{lineno}: {exc}") from None
    return out


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


class TraceError(ValueError):
    """A trace file that cannot be read; one line naming the file and line."""
