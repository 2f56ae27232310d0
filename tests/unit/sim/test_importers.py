"""Recorded traces replayed as simulator workloads: SwarmX traces as DAGs with release times,
Azure and Mooncake as one-call workflows, a malformed line an error naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmx.sched.prefix import shared_blocks
from swarmx.sched.router import LeastOutstanding
from swarmx.sched.scaler import NoScaler
from swarmx.sim.engine import SimConfig, Simulation
from swarmx.sim.importers import AZURE_MAX_TOKENS, detect_format, load_trace
from swarmx.sim.simworkflow import (
    LLM_MODEL,
    VISION_MODEL,
    AgentBlocks,
    BlockChains,
    CallTruth,
    critical_path_s,
    describe,
)
from swarmx.traces import TraceRecord
from tests.unit.sim.drive import drive
from tests.unit.sim.tracefiles import CLAUDE_CODE_HEADER, AgentCall, write_claude_code

DATA = Path("/work/shared/data")
AZURE_CONV = DATA / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = DATA / "azure-llm-2023" / "AzureLLMInferenceTrace_code.csv"
MOONCAKE = DATA / "mooncake" / "conversation_trace.jsonl"


def _swarmx_trace(path: Path) -> None:
    rec = {
        "ts": 1000.0,
        "workflow": "wf-a",
        "step": "plan",
        "deps": [],
        "kind": "llm",
        "model": "tiny-lm",
        "prompt": "List queries as {json} }{ please",
        "prompt_tokens": 50,
        "max_tokens": 64,
        "output_tokens": 20,
        "latency_s": 0.5,
        "queue_s": 0.0,
        "ttft_s": 0.01,
        "node": "n1",
        "replica": "n1/tiny-lm#0",
        "device": {"gpu": "cpu", "gpu_util": 0, "gpu_mem_frac": 0, "cpu_util": 0.1},
        "runtime": {"inflight": 0, "queue_depth": 0},
        "index": None,
        "workflow_name": "research",
        "slo_s": 30.0,
    }
    tool = {"kind": "tool", "model": "", "deps": ["plan"], "step": "search", "max_tokens": 0}
    read = {"step": "read", "deps": ["search"], "max_tokens": 48}
    lines = [
        rec,
        {**rec, **tool, "ts": 1000.6, "index": 0, "prompt": "web-search q0", "latency_s": 1.5},
        {
            "ts": 1001.0,
            "workflow": "wf-b",
            "step": "ocr",
            "kind": "model",
            "prompt": "page",
            "inputs": {"image_px": 1024, "steps": 2},
            "output_tokens": 16,
        },
        {**rec, **tool, "ts": 1000.7, "index": 1, "prompt": "web-search q1", "latency_s": 2.5},
        {**rec, **read, "ts": 1002.2, "index": 0, "ok": False, "output_tokens": 5},
        {**rec, **read, "ts": 1002.9, "index": 0, "attempt": 2, "output_tokens": 40},
        {**rec, **read, "ts": 1003.3, "index": 1, "output_tokens": 30, "latency_s": 9.0},
        {
            "ts": 1001.5,
            "workflow": "wf-b",
            "step": "answer",
            "deps": ["ocr", "gone"],
            "prompt_tokens": 10,
            "output_tokens": 3,
            "max_tokens": 0,
        },
        {**rec, "ts": 1004.0, "step": "report", "deps": ["read"], "output_tokens": 60},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")


def test_swarmx_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _swarmx_trace(path)
    assert detect_format(path) == "swarmx"
    a, b = load_trace(path, slo_s=9.0)
    assert (a.arrival_s, b.arrival_s) == (0.0, 1.0)
    assert a.name == "research"
    assert a.spec.slo_s == 30.0
    assert b.spec.slo_s == 9.0
    assert b.name == "trace"
    ids = [s.id for s in a.spec.steps]
    assert ids == ["plan", "search[0]", "search[1]", "read[0]", "read[1]", "report"]
    assert a.spec.step("read[1]").after == ["search[0]", "search[1]"]
    assert a.spec.step("report").after == ["read[0]", "read[1]"]
    assert a.release_s["read[0]"] == pytest.approx(2.2)  # the first attempt's arrival
    assert a.truth["read[0]", None] == CallTruth(50, 40)  # the successful attempt's truth
    assert a.truth["search[1]", None].work_s == 2.5
    assert a.truth["read[1]", None].work_s == 0.0  # latency_s of model calls is ignored
    assert a.spec.step("plan").model == "tiny-lm"
    calls = {c.step_id: c for c, _ in drive(a)}
    assert calls["plan"].prompt == "List queries as {json} }{ please"
    assert calls["search[1]"].command == ["web-search", "q1"]
    ocr, answer = b.spec.steps
    assert (ocr.kind, ocr.model, ocr.inputs) == (
        "model",
        VISION_MODEL,
        {"image_px": "1024", "steps": "2"},
    )
    assert answer.after == ["ocr"]  # a dependency absent from the trace is dropped
    assert (answer.model, answer.max_tokens) == (LLM_MODEL, 3)
    drive(b)
    assert critical_path_s(a) >= 4.0  # the report's recorded release
    assert [wf.spec.name for wf in load_trace(path, limit=1)] == ["research"]


def test_swarmx_trace_cycle(tmp_path: Path) -> None:
    path = tmp_path / "cycle.jsonl"
    lines = [
        {"ts": 1.0, "workflow": "w", "step": "a", "deps": ["b"]},
        {"ts": 2.0, "workflow": "w", "step": "b", "deps": ["a"]},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match=r"cycle\.jsonl:1: workflow 'w'.*cycle \(a, b\)$"):
        load_trace(path)


def test_azure_csv(tmp_path: Path) -> None:
    path = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,0\n"
        "2023-11-16 18:15:51,100,5000\n"
    )
    assert detect_format(path) == "azure"
    wfs = load_trace(path, slo_s=20.0)
    assert [wf.arrival_s for wf in wfs] == pytest.approx([0.0, 4.314579, 4.3194100])
    assert [wf.truth["call", None].output_tokens for wf in wfs] == [44, 1, 5000]
    assert [wf.spec.steps[0].max_tokens for wf in wfs] == [AZURE_MAX_TOKENS, AZURE_MAX_TOKENS, 5000]
    assert {wf.name for wf in wfs} == {"azure-conv"}
    assert {wf.spec.slo_s for wf in wfs} == {20.0}
    assert len({wf.spec.steps[0].prompt for wf in wfs}) == 1  # no invented wording
    assert len(load_trace(path, limit=2)) == 2
    for wf in wfs:
        drive(wf)


def test_mooncake_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1]},
        {"timestamp": 2500, "input_length": 10, "output_length": 0, "hash_ids": [0]},
        {"timestamp": 1000, "input_length": 99, "output_length": 7, "hash_ids": []},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert detect_format(path) == "mooncake"
    wfs = load_trace(path, model="other-lm")
    assert [wf.arrival_s for wf in wfs] == [0.0, 1.0, 2.5]  # sorted by arrival
    assert [wf.truth["call", None] for wf in wfs] == [
        CallTruth(6758, 500, prefix_blocks=(0, 1), block_tokens=512),
        CallTruth(99, 7),
        CallTruth(10, 1, prefix_blocks=(0,), block_tokens=512),
    ]
    assert {wf.spec.steps[0].model for wf in wfs} == {"other-lm"}
    assert {wf.spec.slo_s for wf in wfs} == {None}
    assert {wf.name for wf in wfs} == {"mooncake"}


def test_swarmx_trace_prefix_blocks(tmp_path: Path) -> None:
    """Recorded blocks are kept; a call without them is hashed from its prompt when sent."""
    path = tmp_path / "t.jsonl"
    rows = [
        {"ts": 1, "workflow": "w", "step": "a", "prefix_blocks": [5, 6], "block_tokens": 64},
        {"ts": 2, "workflow": "w", "step": "b", "prompt": "x" * 600},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (wf,) = load_trace(path)
    assert wf.truth["a", None].prefix_blocks == (5, 6)
    assert wf.truth["a", None].block_tokens == 64
    assert wf.truth["b", None].prefix_blocks == ()


# --- claude-code sessions ---------------------------------------------------------------------

SESSIONS = [
    AgentCall("t1", "parent", 0.0, 0, 0.0, n_blocks=10, shared=0),
    AgentCall("t1", "parent", 0.0, 1, 2.0, n_blocks=14, shared=10),
    AgentCall("t1", "agent_001", 5.0, 0, 0.0, n_blocks=6, shared=0),
    AgentCall("t1", "parent", 0.0, 2, 3.0, n_blocks=12, shared=9),
    AgentCall("t1", "agent_001", 5.0, 1, 1.5, n_blocks=9, shared=6),
    AgentCall("t2", "parent", 0.0, 0, 0.0, n_blocks=4, shared=0),
    AgentCall("t2", "parent", 0.0, 1, 4.0, n_blocks=8, shared=3),
]


def test_claude_code_sessions(tmp_path: Path) -> None:
    path = write_claude_code(tmp_path / "requests.csv", SESSIONS)
    assert detect_format(path) == "claude-code"
    a, b = load_trace(path, slo_s=600.0)
    assert (a.arrival_s, b.arrival_s) == (0.0, 0.0)  # every session's clock starts at 0
    assert (a.name, a.spec.slo_s, a.spec.steps[0].model) == ("claude-code", 600.0, LLM_MODEL)
    ids = [s.id for s in a.spec.steps]
    assert ids == ["parent/req0", "parent/req1", "parent/req2", "agent_001/req0", "agent_001/req1"]
    assert [s.after for s in a.spec.steps] == [
        [],
        ["parent/req0"],
        ["parent/req1"],
        [],
        ["agent_001/req0"],
    ]
    assert a.release_s == {"parent/req0": 0.0, "agent_001/req0": 5.0}
    assert a.think_s == {"parent/req1": 2.0, "parent/req2": 3.0, "agent_001/req1": 1.5}
    assert a.truth["parent/req1", None] == CallTruth(
        14 * 64 + 10, 20, block_tokens=64, agent_blocks=AgentBlocks("parent", 14, 10)
    )
    assert critical_path_s(a) > 5.0 + 1.5  # the sub-agent's start and think time
    drive(a)
    assert [wf.spec.source.split()[-1] for wf in load_trace(path, limit=1)] == ["t1"]


def test_claude_code_blocks_share_exactly_the_recorded_prefix(tmp_path: Path) -> None:
    wfs = load_trace(write_claude_code(tmp_path / "requests.csv", SESSIONS))
    chains = BlockChains()
    last: dict[tuple[str, str], list[int]] = {}
    every: list[int] = []
    for i, wf in enumerate(wfs):
        for call, truth in drive(wf, f"wf{i}"):  # each agent's calls in order
            made = truth.agent_blocks
            assert made is not None
            blocks = chains.blocks(call.workflow_id, made)
            assert len(blocks) == made.total
            prev = last.get((call.workflow_id, made.agent))
            if prev is not None:
                assert shared_blocks(prev, blocks) == made.shared
            last[call.workflow_id, made.agent] = blocks
            every.extend(blocks[made.shared :])
    assert len(every) == len(set(every))  # fresh ids are unique across agents and sessions
    chains.forget("wf0")
    assert chains.blocks("wf0", AgentBlocks("parent", 3, 3))[0] not in last["wf0", "parent"]


def replay(path: Path, sessions: int | None = None) -> dict[tuple[str, str], TraceRecord]:
    records: list[TraceRecord] = []
    Simulation(
        SimConfig(replicas=1, llm_slots=4, sessions=sessions),
        load_trace(path),
        router=LeastOutstanding(),
        order="fifo",
        scaler=NoScaler(),
        record=records.append,
    ).run()
    return {(r.workflow, r.step): r for r in records}


def _end_s(r: TraceRecord) -> float:
    return r.ts + r.queue_s + r.latency_s


def test_claude_code_agents_run_in_closed_loop(tmp_path: Path) -> None:
    path = write_claude_code(tmp_path / "requests.csv", SESSIONS)
    calls = replay(path)
    assert len(calls) == len(SESSIONS)
    for wf, row in zip(["wf0"] * 5 + ["wf1"] * 2, SESSIONS, strict=True):
        r = calls[wf, f"{row.agent}/req{row.req}"]
        assert r.prompt_tokens == row.n_blocks * 64 + 10
        if row.req == 0:  # an agent starts at its offset from its session's start
            assert r.ts == pytest.approx(row.start_s)
        else:  # and calls again its think time after its previous call ended
            prev = calls[wf, f"{row.agent}/req{row.req - 1}"]
            assert r.ts == pytest.approx(_end_s(prev) + row.think_s)
    # one session at a time: the second starts as the first ends
    calls = replay(path, sessions=1)
    first_end_s = max(_end_s(r) for (wf, _), r in calls.items() if wf == "wf0")
    assert calls["wf1", "parent/req0"].ts == pytest.approx(first_end_s)
    assert calls["wf1", "parent/req1"].ts > first_end_s + 4.0


A_LINE = '{"ts": 1, "workflow": "w", "step": "a"}\n\n'
CSV_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,1,2\n"
CC_HEAD = CLAUDE_CODE_HEADER + "\nt1,parent,,0,0,0,m,n,100,5,1,,0,x,x,x,1,0,0,0\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", A_LINE + '{"ts": 1,\n', "not JSON"),
        (
            "bad2.jsonl",
            A_LINE + '{"ts": "x", "workflow": "w", "step": "b"}\n',
            "ts: expected a number",
        ),
        (
            "bad3.jsonl",
            A_LINE + '{"ts": 2, "workflow": "w", "step": "b", "kind": "gpu"}\n',
            "kind: must be one of",
        ),
        (
            "nan.jsonl",
            A_LINE + '{"ts": NaN, "workflow": "w", "step": "b"}\n',
            "ts: expected a finite number, got nan",
        ),
        (
            "inputs.jsonl",
            A_LINE + '{"ts": 2, "workflow": "w", "step": "b", "inputs": [1]}\n',
            "inputs: expected an object",
        ),
        (
            "bad4.jsonl",
            '{"timestamp": 0, "input_length": 1, "output_length": 1}\n\n'
            '{"timestamp": 5, "input_length": 1}\n',
            "output_length",
        ),
        (
            "bad5.jsonl",
            '{"timestamp": 0, "input_length": 1, "output_length": 1}\n\n'
            '{"timestamp": 5, "input_length": 1, "output_length": 1, "hash_ids": "x"}\n',
            "hash_ids",
        ),
        (
            "bad.csv",
            CSV_HEAD + "2023-11-16 18:15:47.1,abc,2\n",
            "abc",
        ),
        ("cc.csv", CC_HEAD + "t1,parent,,0,1,0,m,n,1e400,5,1,,0,x,x,x,1,0,0,0\n", "in_tokens"),
        ("cc2.csv", CC_HEAD + "t1,parent,,0,1,0,m,n,100,5,1,,-2,x,x,x,1,0,0,0\n", "think"),
        ("cc3.csv", CC_HEAD + "t1,parent,,0,1,0,m,n,100\n", "columns"),
        ("cc4.csv", CC_HEAD + "t1,parent,,0,0,0,m,n,100,5,1,,0,x,x,x,1,0,0,0\n", "twice"),
        (
            "bad2.csv",
            CSV_HEAD + "yesterday,1,2\n",
            "yesterday",
        ),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{name}:3: .*{message}"):
        load_trace(path)


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('\n{"hello": 1}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: unknown trace format"):
        load_trace(path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_trace(tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("path", "name"),
    [(AZURE_CONV, "azure-conv"), (AZURE_CODE, "azure-code"), (MOONCAKE, "mooncake")],
)
def test_real_traces_first_rows(path: Path, name: str) -> None:
    if not path.exists():
        pytest.skip(f"{path} not present")
    wfs = load_trace(path, limit=100)
    assert len(wfs) == 100
    assert wfs[0].arrival_s == 0.0
    arrivals = [wf.arrival_s for wf in wfs]
    assert arrivals == sorted(arrivals)
    assert {wf.name for wf in wfs} == {name}
    for wf in wfs:
        truth = wf.truth["call", None]
        assert truth.prompt_tokens >= 1
        assert 1 <= truth.output_tokens <= wf.spec.steps[0].max_tokens
    d = describe(wfs)
    assert d["calls"] == 100
    assert d["mean_fan_out"] is None


def test_real_claude_code_sessions() -> None:
    path = DATA / "claude-code" / "requests.csv"
    if not path.exists():
        pytest.skip(f"{path} not present")
    wfs = load_trace(path, limit=3)
    assert len(wfs) == 3
    for wf in wfs:
        chains = BlockChains()
        for call, truth in drive(wf):
            assert truth.agent_blocks is not None
            assert len(chains.blocks(call.workflow_id, truth.agent_blocks)) * 64 <= (
                truth.prompt_tokens
            )
