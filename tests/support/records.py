"""A trace record with every field a test does not care about filled in."""

from typing import Any

from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord

_DEFAULTS: dict[str, Any] = {
    "ts": 0.0,
    "workflow": "wf",
    "step": "s",
    "deps": [],
    "kind": "llm",
    "model": "m",
    "prompt": "",
    "prompt_tokens": 1,
    "max_tokens": 0,
    "output_tokens": 1,
    "latency_s": 1.0,
    "queue_s": 0.0,
    "ttft_s": None,
    "node": "n",
    "replica": "n/m",
}


def trace_record(**fields: Any) -> TraceRecord:
    """``TraceRecord`` with ``fields`` and defaults for the rest (a CPU replica, no load)."""
    fields.setdefault("device", DeviceAtDispatch("cpu", 0.0, 0.0, 0.0))
    fields.setdefault("runtime", RuntimeAtDispatch(0, 0))
    return TraceRecord(**{**_DEFAULTS, **fields})
