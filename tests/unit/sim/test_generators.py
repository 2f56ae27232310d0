"""The built-in workload generators: every call the real workflow engine issues has a truth,
wording shifts what the truth is, SLOs are a few critical paths."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter

import pytest

from swarmx.sim.generators import CLASSES, KINDS, SLO_S, generate
from swarmx.sim.simworkflow import LLM_MODEL, VISION_MODEL, SimWorkflow, critical_path_s
from swarmx.workflow.spec import WorkflowSpec, parse_workflow
from tests.unit.sim.drive import Driven, drive


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


def test_slo_defaults_are_a_few_critical_paths() -> None:
    for cls in CLASSES:
        paths = [critical_path_s(wf) for wf in generate(cls, workflows=400, rate_per_s=1, seed=5)]
        ratio = SLO_S[cls] / statistics.median(paths)
        assert 3.0 <= ratio <= 5.0, (cls, ratio)
    wfs = generate("mixed", workflows=6, rate_per_s=1.0, seed=1, slo_s=12.5)
    assert {wf.spec.slo_s for wf in wfs} == {12.5}
