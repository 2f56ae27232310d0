"""Importers of public traces into `TraceRecord`s, so predictors train and are evaluated on real
agent traffic, not only on what our own cluster recorded; and a leak-free train/test split."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceError, TraceRecord, split_keys

log = logging.getLogger(__name__)

CLAUDE_CODE_COLUMNS = (
    "trace_id",
    "agent_id",
    "subagent_type",
    "agent_start_s",
    "req_idx",
    "t_s",
    "model",
    "in_tokens",
    "out_tokens",
    "api_time_s",
    "ttft_s",
    "input_types",
    "stop",
    "output_types",
    "n_blocks",
    "prefix_blocks_shared_prev",
)
"""The columns of the kv-cache-tester ``requests.csv`` this importer reads (it has more)."""

TRACE_EPOCH_S = 1e6
"""Trace ``i`` starts at ``i * TRACE_EPOCH_S``: the traces' clocks all start at 0, and spreading
them apart keeps sessions from overlapping in time (none lasts anywhere near 11 days)."""

_API_DEVICE = DeviceAtDispatch(gpu="api", gpu_util=0.0, gpu_mem_frac=0.0, cpu_util=0.0)
_NO_RUNTIME = RuntimeAtDispatch(inflight=0, queue_depth=0)


def import_claude_code(path: Path) -> list[TraceRecord]:
    """Records from the claude-code ``requests.csv`` (docs in /work/shared/data/README.md), in
    file order. ``latency_s`` is ``api_time_s`` (hosted-API server time). Rows with no positive
    ``api_time_s`` or with unparsable numbers are skipped and their count logged.

    Step ids are ``{agent_id}/req{req_idx}`` so that they are unique within the trace (the
    workflow): parent and sub-agents each count their requests from 0. A call depends on the
    previous *imported* call of its agent, so that every dependency names a record."""
    out: list[TraceRecord] = []
    trace_index: dict[str, int] = {}
    last_step: dict[str, str] = {}  # session -> step of its previous imported record
    skipped = 0
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CLAUDE_CODE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: not a claude-code requests.csv, missing {missing}")
        for row in reader:
            try:
                rec = _claude_code_record(row, trace_index, last_step)
            except ValueError:
                rec = None
            if rec is None:
                skipped += 1
                continue
            last_step[rec.session] = rec.step
            out.append(rec)
    if skipped:
        log.warning("%s: skipped %d rows without a usable api_time_s", path, skipped)
    return out


def _claude_code_record(
    row: dict[str, str], trace_index: dict[str, int], last_step: dict[str, str]
) -> TraceRecord | None:
    latency = float(row["api_time_s"])
    if not latency > 0:  # also rejects NaN
        return None
    trace, agent, req = row["trace_id"], row["agent_id"], int(row["req_idx"])
    ts = float(row["agent_start_s"]) + float(row["t_s"])
    prompt_tokens, output_tokens = int(row["in_tokens"]), int(row["out_tokens"])
    ttft = float(row["ttft_s"]) if row["ttft_s"] else 0.0
    n_blocks, shared = int(row["n_blocks"]), int(row["prefix_blocks_shared_prev"])
    session = f"{trace}/{agent}"
    index = trace_index.setdefault(trace, len(trace_index))
    prev = last_step.get(session)
    return TraceRecord(
        ts=index * TRACE_EPOCH_S + ts,
        workflow=trace,
        step=f"{agent}/req{req}",
        deps=[prev] if prev is not None else [],
        kind="llm",
        model=row["model"],
        prompt="",
        prompt_tokens=prompt_tokens,
        max_tokens=0,
        output_tokens=output_tokens,
        latency_s=latency,
        queue_s=0.0,
        ttft_s=ttft if ttft > 0 else None,
        node="api",
        replica=f"api/{row['model']}",
        device=_API_DEVICE,
        runtime=_NO_RUNTIME,
        turn=req,
        workflow_name=row["subagent_type"] or "parent",
        session=session,
        input_kinds=[k for k in row["input_types"].split("|") if k],
        prefix_share=shared / n_blocks if n_blocks > 0 else None,
        stop_reason=row["stop"],
        output_kinds=[k for k in row["output_types"].split("|") if k],
    )


def split_by_session(
    records: Sequence[TraceRecord],
    test_frac: float,
    seed: int,
    key: Callable[[TraceRecord], str] = lambda r: r.workflow,
) -> tuple[list[TraceRecord], list[TraceRecord]]:
    """(train, test): whole groups of records (by ``key``) go to one side, ``test_frac`` of the
    groups to test, chosen by ``seed`` (at least one on each side when there are two or more);
    each side keeps the input order.

    The default groups by workflow, not by `TraceRecord.session_id`: a trace's sub-agents share
    its context (the task, files read, the parent's prompt), so splitting them apart would let
    the test side's sessions leak into training."""
    rest, held = split_keys([key(r) for r in records], test_frac, seed)
    return [records[i] for i in rest], [records[i] for i in held]
