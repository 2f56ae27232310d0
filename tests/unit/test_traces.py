"""The one reader of the trace format: records round-trip, and a bad line is one error naming
file, line and field (NaN and infinities included, which Python's json reads silently)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmx.schema import encode
from swarmx.traces import TraceError, json_lines, read_records, read_traces, write_traces
from tests.support.records import trace_record


def _line(**fields: object) -> str:
    return json.dumps({**encode(trace_record()), **fields})


def test_records_round_trip(tmp_path: Path) -> None:
    recs = [trace_record(ts=float(i), step=f"s{i}", pred={"0.9": 1.5}) for i in range(3)]
    path = tmp_path / "t.jsonl"
    assert write_traces(path, recs) == 3
    assert read_traces([path]) == recs


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (_line(ts=float("nan")), "ts: expected a finite number, got nan"),
        (_line(latency_s=float("inf")), "latency_s: expected a finite number, got inf"),
        ('{"ts": 1e999}', "ts: expected a finite number, got inf"),
        (_line(device={"gpu": "cpu", "gpu_util": float("-inf")}), "device.gpu_util: expected a"),
        (_line(pred={"0.9": float("nan")}), "pred.0.9: expected a finite number"),
        (_line(ts="soon"), "ts: expected a number, got str 'soon'"),
        (_line(kind="gpu"), "kind: must be one of 'llm', 'model', 'tool', got 'gpu'"),
        (_line(step=""), "step: must not be empty"),
        (_line(output_tokens=-1), "output_tokens: must be >= 0, got -1"),
        (_line(slo_s=0), "slo_s: must be > 0, got 0.0"),
        (_line(prefix_blocks=[1, 2]), "block_tokens: must be >= 1 when prefix_blocks"),
        (_line(prefix_blocks=[1, "x"], block_tokens=64), "prefix_blocks"),
        (_line(cached_tokens=-5), "cached_tokens: must be >= 0, got -5"),
        (_line(cached_tokens_est=-1), "cached_tokens_est: must be >= 0, got -1"),
        (json.dumps({"ts": 1.0}), "workflow: missing"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"ts": ', "not JSON"),
    ],
)
def test_a_bad_line_names_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_line() + "\n\n" + line + "\n")
    with pytest.raises(TraceError) as info:
        read_traces([path])
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"missing\.jsonl: cannot read trace"):
        read_traces([tmp_path / "missing.jsonl"])
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_line().encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(TraceError, match=r"latin1\.jsonl:2: not UTF-8 text"):
        read_traces([path])


def test_byte_order_mark_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_text("\ufeff" + _line() + "\n  \n" + _line(step="t") + "\n", encoding="utf-8")
    assert [lineno for lineno, _ in json_lines(path)] == [1, 3]
    assert [r.step for r in read_traces([path])] == ["s", "t"]


def test_defaults_fill_what_a_line_leaves_out(tmp_path: Path) -> None:
    path = tmp_path / "partial.jsonl"
    path.write_text('{"ts": 1, "workflow": "w", "step": "a", "extra": 7}\n')
    with pytest.raises(TraceError, match="deps: missing"):
        read_traces([path])
    defaults = {k: v for k, v in encode(trace_record()).items() if k not in ("ts", "step")}
    ((lineno, obj, rec),) = read_records(path, defaults)
    assert (lineno, obj["extra"], rec.workflow, rec.step, rec.ts) == (1, 7, "w", "a", 1.0)
