"""Workload generators and trace readers for the simulator: every call the real workflow engine
issues has a truth, wording shifts what the truth is, arrivals come at the asked rate."""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest

from swarmx.sim.workload import CallTruth, SimWorkflow
from swarmx.sim.workloads import (
    AZURE_MAX_TOKENS,
    CLASSES,
    KINDS,
    LLM_MODEL,
    SLO_S,
    VISION_MODEL,
    arrival_times,
    critical_path_s,
    describe,
    detect_format,
    generate,
    load_trace,
)
from swarmx.workflow.engine import CallDone, CallSpec, Finished, RunCall, WorkflowRun
from swarmx.workflow.spec import WorkflowSpec, parse_workflow

DATA = Path("/work/shared/data")
AZURE_CONV = DATA / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = DATA / "azure-llm-2023" / "AzureLLMInferenceTrace_code.csv"
MOONCAKE = DATA / "mooncake" / "conversation_trace.jsonl"

Driven = list[tuple[SimWorkflow, list[tuple[CallSpec, CallTruth]]]]
"""Workflows with the calls the engine issued for them and their truths."""


def drive(wf: SimWorkflow, wf_id: str = "wf-1") -> list[tuple[CallSpec, CallTruth]]:
    """Run the workflow through the real engine, answering each call with its truth's output;
    every issued call must have a truth, and every truth must be issued."""
    run = WorkflowRun(wf_id, wf.spec)
    pending = list(run.start())
    calls: list[tuple[CallSpec, CallTruth]] = []
    finished: Finished | None = None
    while pending:
        ins = pending.pop(0)
        if isinstance(ins, RunCall):
            key = (ins.call.step_id, ins.call.index)
            assert key in wf.truth, f"{wf.spec.source}: no truth for {key}"
            truth = wf.truth[key]
            calls.append((ins.call, truth))
            pending.extend(run.on_done(CallDone(ins.call.call_id, ok=True, output=truth.output)))
        elif isinstance(ins, Finished):
            finished = ins
    assert finished is not None
    assert finished.state == "succeeded", finished.reason
    issued = [(c.step_id, c.index) for c, _ in calls]
    assert len(issued) == len(set(issued))
    assert set(issued) == set(wf.truth)
    return calls


def _toml(spec: WorkflowSpec) -> str:
    """A generated spec written as a workflow file (JSON strings are TOML basic strings)."""
    out = [f"name = {json.dumps(spec.name)}"]
    if spec.slo_s is not None:
        out.append(f"slo_s = {spec.slo_s}")
    out.append("[inputs]")
    out.extend(f"{k} = {json.dumps(v)}" for k, v in spec.inputs.items())
    for s in spec.steps:
        out += ["[[steps]]", f"id = {json.dumps(s.id)}", f'kind = "{s.kind}"']
        out.append(f"after = {json.dumps(s.after)}")
        if s.kind != "tool":
            out += [f"model = {json.dumps(s.model)}", f"prompt = {json.dumps(s.prompt)}"]
        if s.kind == "llm":
            out.append(f"max_tokens = {s.max_tokens}")
        if s.kind == "model":
            pairs = ", ".join(f"{k} = {json.dumps(v)}" for k, v in s.inputs.items())
            out.append(f"inputs = {{ {pairs} }}")
        if s.kind == "tool":
            out.append(f"command = {json.dumps(s.command)}")
        if s.retries:
            out.append(f"retries = {s.retries}")
        if s.fan_out is not None and s.fan_out.source is None:
            out.append(f"fan_out = {s.fan_out.count}")
        elif s.fan_out is not None:
            f = s.fan_out
            out.append(f'fan_out = {{ from = "{f.source}", split = "{f.split}", max = {f.max} }}')
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def mixed() -> list[SimWorkflow]:
    return generate("mixed", workflows=900, rate_per_s=2.0, seed=7)


@pytest.fixture(scope="module")
def driven(mixed: list[SimWorkflow]) -> Driven:
    return [(wf, drive(wf, f"wf-{i}")) for i, wf in enumerate(mixed)]


# --- generators -------------------------------------------------------------------------------


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="codegen, research, multimodal, mixed"):
        generate("chat", workflows=1, rate_per_s=1.0, seed=0)
    with pytest.raises(ValueError, match="rate_per_s"):
        generate("codegen", workflows=1, rate_per_s=0.0, seed=0)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_by_seed(kind: str) -> None:
    a = generate(kind, workflows=40, rate_per_s=1.0, seed=3)
    assert a == generate(kind, workflows=40, rate_per_s=1.0, seed=3)
    assert a != generate(kind, workflows=40, rate_per_s=1.0, seed=4)
    assert generate(kind, workflows=0, rate_per_s=1.0, seed=3) == []


@pytest.mark.parametrize("kind", CLASSES)
def test_every_issued_call_has_a_truth(kind: str) -> None:
    for i, wf in enumerate(generate(kind, workflows=150, rate_per_s=1.0, seed=11)):
        assert wf.name == wf.spec.name == kind
        assert wf.spec.slo_s == SLO_S[kind]
        for call, truth in drive(wf, f"wf-{i}"):
            assert "{" not in call.prompt and "}" not in call.prompt
            assert truth.prompt_tokens >= 0
            if call.kind == "llm":
                assert call.model == LLM_MODEL
                assert 1 <= truth.output_tokens <= call.max_tokens
                assert truth.prompt_tokens >= 1
            elif call.kind == "model":
                assert call.model == VISION_MODEL
                assert int(call.inputs["image_px"]) > 0
                assert int(call.inputs["steps"]) >= 1
            else:
                assert call.command
                assert truth.work_s > 0


def test_generated_specs_are_valid_workflow_files(mixed: list[SimWorkflow]) -> None:
    """Everything the file parser checks (ids, kinds, templates naming ancestors only, fan-out
    sources) holds for the dataclasses built directly."""
    for wf in mixed[:60]:
        parsed = parse_workflow(_toml(wf.spec), wf.spec.source)
        assert [dataclasses.replace(s, line=0) for s in parsed.steps] == wf.spec.steps
        assert parsed.inputs == wf.spec.inputs


def _outputs_with(driven_calls: Driven, words: str) -> list[int]:
    return [
        t.output_tokens
        for _, calls in driven_calls
        for c, t in calls
        if c.kind == "llm" and words in c.prompt
    ]


def test_wording_shifts_output_length(driven: Driven) -> None:
    brief = _outputs_with(driven, "briefly")
    detailed = _outputs_with(driven, "detailed report")
    assert len(brief) > 50
    assert len(detailed) > 50
    assert statistics.mean(brief) * 3 < statistics.mean(detailed)
    one = _outputs_with(driven, "in one sentence")
    exhaustive = _outputs_with(driven, "exhaustive")
    assert statistics.mean(one) * 5 < statistics.mean(exhaustive)


def test_wording_is_the_signal_not_the_token_counts(driven: Driven) -> None:
    """Within a step, max_tokens is the same whatever the wording, so only the text tells
    a brief report from a detailed one."""
    by_step: dict[str, set[int]] = {}
    for wf, calls in driven:
        for c, _ in calls:
            if c.kind == "llm":
                by_step.setdefault(f"{wf.name}.{c.step_id}", set()).add(c.max_tokens)
    assert all(len(v) == 1 for v in by_step.values()), by_step
    reports = [
        (c.prompt, t)
        for wf, calls in driven
        if wf.name == "research"
        for c, t in calls
        if c.step_id == "report"
    ]
    brief = [t.output_tokens for p, t in reports if p.startswith("Answer briefly.")]
    detailed = [t.output_tokens for p, t in reports if p.startswith("Write a detailed report")]
    assert statistics.median(brief) * 4 < statistics.median(detailed)


def test_fan_out_size_depends_on_wording(driven: Driven) -> None:
    reads: dict[str, list[int]] = {"few": [], "several": [], "thorough": []}
    parts: dict[str, list[int]] = {"small": [], "large": []}
    for wf, calls in driven:
        plan = (
            next(c.prompt for c, _ in calls if c.step_id == "plan")
            if wf.name != "multimodal"
            else ""
        )
        counts = Counter(c.step_id for c, _ in calls)
        if wf.name == "research":
            assert counts["read"] == counts["search"]
            for key, words in (("few", "a few"), ("several", "several"), ("thorough", "thorough")):
                if words in plan:
                    reads[key].append(counts["read"])
        if wf.name == "codegen":
            if "small fix" in plan:
                parts["small"].append(counts["code"])
            if "large refactor" in plan:
                parts["large"].append(counts["code"])
    assert reads["few"]
    assert reads["thorough"]
    assert set(reads["few"]) <= {2, 3}
    assert set(reads["several"]) <= {4, 5, 6}
    assert set(reads["thorough"]) <= set(range(12, 17))
    assert set(parts["small"]) <= {1, 2}
    assert min(parts["large"]) >= 6


def test_fixed_fan_outs(driven: Driven) -> None:
    for wf, calls in driven:
        counts = Counter(c.step_id for c, _ in calls)
        if wf.name == "codegen":
            test = wf.spec.step("test")
            assert test.fan_out is not None
            assert test.fan_out.count == counts["test"]
            assert counts["test"] in (2, 4, 8)
        if wf.name == "multimodal":
            ocr = wf.spec.step("ocr")
            assert ocr.fan_out is not None
            assert ocr.fan_out.count == counts["ocr"] == counts["extract"]


def test_mixed_is_equal_thirds_interleaved(mixed: list[SimWorkflow]) -> None:
    assert Counter(wf.name for wf in mixed) == {c: 300 for c in CLASSES}
    first = Counter(wf.name for wf in mixed[:90])
    assert all(first[c] > 15 for c in CLASSES)
    arrivals = [wf.arrival_s for wf in mixed]
    assert arrivals == sorted(arrivals)


def test_arrival_rate_and_bursts() -> None:
    times = arrival_times(100_000, 5.0, random.Random(1))
    assert (len(times) - 1) / (times[-1] - times[0]) == pytest.approx(5.0, rel=0.03)
    # bursty: counts per 2 s window (10 mean gaps) vary far more than Poisson's (variance = mean)
    per: Counter[int] = Counter(int(t // 2.0) for t in times)
    counts = [per.get(i, 0) for i in range(int(times[-1] // 2.0))]
    assert statistics.pvariance(counts) / statistics.mean(counts) > 2.5
    wfs = generate("research", workflows=3000, rate_per_s=4.0, seed=2)
    span = wfs[-1].arrival_s - wfs[0].arrival_s
    assert (len(wfs) - 1) / span == pytest.approx(4.0, rel=0.1)


def test_slo_defaults_are_a_few_critical_paths() -> None:
    for cls in CLASSES:
        paths = [critical_path_s(wf) for wf in generate(cls, workflows=400, rate_per_s=1, seed=5)]
        ratio = SLO_S[cls] / statistics.median(paths)
        assert 3.0 <= ratio <= 5.0, (cls, ratio)
    wfs = generate("mixed", workflows=6, rate_per_s=1.0, seed=1, slo_s=12.5)
    assert {wf.spec.slo_s for wf in wfs} == {12.5}


def test_describe(mixed: list[SimWorkflow]) -> None:
    d = describe(mixed)
    assert d["workflows"] == 900
    assert d["classes"] == {c: 300 for c in CLASSES}
    assert d["calls"] == sum(len(wf.truth) for wf in mixed)
    assert set(d["calls_by_kind"]) == {"llm", "model", "tool"}
    assert d["calls_by_model"][LLM_MODEL] == d["calls_by_kind"]["llm"]
    assert d["mean_fan_out"] > 2
    assert d["prompt_tokens"]["p50"] <= d["prompt_tokens"]["p99"] <= d["prompt_tokens"]["max"]
    json.dumps(d)
    assert describe([])["workflows"] == 0


# --- traces -----------------------------------------------------------------------------------


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
    with pytest.raises(ValueError, match=r"cycle\.jsonl:1: workflow 'w'.*cycle"):
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
        CallTruth(6758, 500),
        CallTruth(99, 7),
        CallTruth(10, 1),
    ]
    assert {wf.spec.steps[0].model for wf in wfs} == {"other-lm"}
    assert {wf.spec.slo_s for wf in wfs} == {None}
    assert {wf.name for wf in wfs} == {"mooncake"}


A_LINE = '{"ts": 1, "workflow": "w", "step": "a"}\n\n'
CSV_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,1,2\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", A_LINE + '{"ts": 1,\n', "not JSON"),
        (
            "bad2.jsonl",
            A_LINE + '{"ts": "x", "workflow": "w", "step": "b"}\n',
            "'ts'",
        ),
        (
            "bad3.jsonl",
            A_LINE + '{"ts": 2, "workflow": "w", "step": "b", "kind": "gpu"}\n',
            "'kind'",
        ),
        (
            "bad4.jsonl",
            '{"timestamp": 0, "input_length": 1, "output_length": 1}\n\n'
            '{"timestamp": 5, "input_length": 1}\n',
            "output_length",
        ),
        (
            "bad.csv",
            CSV_HEAD + "2023-11-16 18:15:47.1,abc,2\n",
            "abc",
        ),
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
