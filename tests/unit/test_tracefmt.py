"""Importing the public claude-code trace into TraceRecords, and the leak-free train/test split."""

import logging
from pathlib import Path

import pytest

from swarmx.tracefmt import TRACE_EPOCH_S, import_claude_code, split_by_session
from swarmx.traces import (
    TraceError,
    TraceRecord,
    read_traces,
    write_traces,
)
from tests.support.records import trace_record

REAL = Path("/work/shared/data/claude-code/requests.csv")
HEADER = (
    "trace_id,agent_id,subagent_type,agent_start_s,req_idx,t_s,model,stream,in_tokens,out_tokens,"
    "api_time_s,ttft_s,think_time_s,stop,input_types,output_types,n_blocks,"
    "prefix_blocks_shared_prev,tool_tokens,system_tokens"
)
ROWS = [
    "t1,parent,,0.0,0,0.0,opus,n,1000,50,2.5,,0.0,tool_use,text,tool_use,16,0,10,5",
    "t1,agent_001,Explore,10.0,0,0.0,haiku,s,900,30,1.5,0.4,0.0,tool_use,text,text,14,0,10,5",
    "t1,agent_001,Explore,10.0,1,3.0,haiku,s,1200,40,,,1.0,,tool_result,,0,0,10,5",  # no time
    "t1,agent_001,Explore,10.0,2,6.0,haiku,s,1300,20,1.0,,1.0,end_turn,tool_result|text,text,"
    "20,15,10,5",
    "t1,parent,,0.0,1,30.0,opus,n,1100,60,0.0,,5.0,end_turn,tool_result,text,17,16,10,5",  # 0 s
    "t2,parent,,0.0,0,1.0,opus,n,abc,10,3.0,,0.0,end_turn,text,text,1,0,0,0",  # bad number
    "t2,parent,,0.0,1,5.0,opus,n,500,10,3.0,,0.0,end_turn,text,text,8,8,0,0",
]


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    path = tmp_path / "requests.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")
    return path


def test_import_maps_columns(small_csv: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        recs = import_claude_code(small_csv)
    assert "skipped 3 rows" in caplog.text
    assert [(r.workflow, r.step) for r in recs] == [
        ("t1", "parent/req0"),
        ("t1", "agent_001/req0"),
        ("t1", "agent_001/req2"),
        ("t2", "parent/req1"),
    ]
    parent, sub0, sub2, t2 = recs
    assert parent.session == "t1/parent" and parent.workflow_name == "parent"
    assert (parent.ts, parent.latency_s, parent.ttft_s, parent.deps) == (0.0, 2.5, None, [])
    assert (parent.prompt_tokens, parent.output_tokens, parent.max_tokens) == (1000, 50, 0)
    assert (parent.kind, parent.model, parent.prompt, parent.turn) == ("llm", "opus", "", 0)
    assert (parent.node, parent.replica, parent.device.gpu) == ("api", "api/opus", "api")
    assert (parent.queue_s, parent.runtime.inflight, parent.runtime.queue_depth) == (0.0, 0, 0)
    assert parent.prefix_share == 0.0
    assert sub0.session == "t1/agent_001" and sub0.workflow_name == "Explore"
    assert (sub0.ts, sub0.ttft_s) == (10.0, 0.4)
    # req1 was skipped: req2 depends on the previous call that was imported.
    assert sub2.deps == ["agent_001/req0"] and sub2.turn == 2 and sub2.ts == 16.0
    assert sub2.input_kinds == ["tool_result", "text"]
    assert sub2.prefix_share == pytest.approx(15 / 20)
    assert t2.ts == TRACE_EPOCH_S + 5.0 and t2.deps == []
    assert t2.prefix_share == 1.0


def test_zero_blocks_has_no_prefix_share(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(f"{HEADER}\nt1,parent,,0,0,0,m,n,5,5,1.0,,0,,text,text,0,0,0,0\n")
    (rec,) = import_claude_code(path)
    assert rec.prefix_share is None


def test_imported_records_round_trip_as_jsonl(small_csv: Path, tmp_path: Path) -> None:
    recs = import_claude_code(small_csv)
    out = tmp_path / "t.jsonl"
    assert write_traces(out, recs) == len(recs)
    assert read_traces([out]) == recs


def test_wrong_columns_is_a_trace_error(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n")
    with pytest.raises(TraceError, match="missing"):
        import_claude_code(path)


def _rec(workflow: str, session: str, i: int) -> TraceRecord:
    return trace_record(ts=float(i), workflow=workflow, step=f"s{i}", session=session)


def test_split_keeps_workflows_whole_and_is_deterministic() -> None:
    recs = [_rec(f"w{i % 50}", f"w{i % 50}/a{i % 3}", i) for i in range(1000)]
    train, test = split_by_session(recs, 0.2, seed=0)
    assert len(train) + len(test) == len(recs)
    assert {r.workflow for r in train}.isdisjoint({r.workflow for r in test})
    assert len({r.workflow for r in test}) == 10
    assert [r.ts for r in test] == sorted(r.ts for r in test)  # input order kept
    assert split_by_session(recs, 0.2, seed=0) == (train, test)
    assert split_by_session(recs, 0.2, seed=1) != (train, test)
    by_session = split_by_session(recs, 0.2, seed=0, key=lambda r: r.session_id)
    assert len({r.session_id for r in by_session[1]}) == 30
    two = [_rec("a", "", 0), _rec("b", "", 1)]
    assert [len(side) for side in split_by_session(two, 0.01, seed=0)] == [1, 1]
    with pytest.raises(ValueError, match="frac must be in"):
        split_by_session(recs, 1.5, seed=0)


@pytest.mark.skipif(not REAL.exists(), reason="the public claude-code trace is not present")
def test_real_claude_code_trace() -> None:
    recs = import_claude_code(REAL)
    with REAL.open() as f:
        rows = sum(1 for _ in f) - 1
    assert rows == 33445
    assert 30000 <= len(recs) <= rows  # rows without an api_time_s are dropped
    assert len({r.workflow for r in recs}) > 400
    assert len({r.session_id for r in recs}) > len({r.workflow for r in recs})
    assert all(r.latency_s > 0 and 0 <= (r.prefix_share or 0) <= 1 for r in recs)
    steps = {(r.workflow, r.step) for r in recs}
    assert len(steps) == len(recs)
    assert all((r.workflow, d) in steps for r in recs for d in r.deps)
    train, test = split_by_session(recs, 0.2, seed=0)
    assert {r.workflow for r in train}.isdisjoint({r.workflow for r in test})
    assert {r.session_id for r in train}.isdisjoint({r.session_id for r in test})
    assert 0.1 < len(test) / len(recs) < 0.3
