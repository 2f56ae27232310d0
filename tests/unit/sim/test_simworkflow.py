"""The measures of a workload: its summary and the unloaded critical path."""

from __future__ import annotations

import json

import pytest

from swarmx.sim.generators import CLASSES, generate
from swarmx.sim.simworkflow import (
    LLM_MODEL,
    CallTruth,
    SimWorkflow,
    call_s,
    critical_path_s,
    describe,
)
from swarmx.workflow.spec import FanOut, StepSpec, WorkflowSpec


@pytest.fixture(scope="module")
def mixed() -> list[SimWorkflow]:
    return generate("mixed", workflows=300, rate_per_s=2.0, seed=7)


def test_describe(mixed: list[SimWorkflow]) -> None:
    d = describe(mixed)
    assert d["workflows"] == 300
    assert d["classes"] == {c: 100 for c in CLASSES}
    assert d["calls"] == sum(len(wf.truth) for wf in mixed)
    assert set(d["calls_by_kind"]) == {"llm", "model", "tool"}
    assert d["calls_by_model"][LLM_MODEL] == d["calls_by_kind"]["llm"]
    assert d["mean_fan_out"] > 2
    assert d["prompt_tokens"]["p50"] <= d["prompt_tokens"]["p99"] <= d["prompt_tokens"]["max"]
    json.dumps(d)
    assert describe([])["workflows"] == 0


def test_critical_path_waits_for_releases_and_the_slowest_instance() -> None:
    steps = [
        StepSpec(id="a", kind="tool", after=[], command=["x"], fan_out=FanOut(count=2)),
        StepSpec(id="b", kind="tool", after=["a"], command=["y"]),
        StepSpec(id="c", kind="llm", after=[], model=LLM_MODEL, prompt="p", max_tokens=50),
    ]
    truth = {
        ("a", 0): CallTruth(0, work_s=1.0),
        ("a", 1): CallTruth(0, work_s=3.0),
        ("b", None): CallTruth(0, work_s=2.0),
        ("c", None): CallTruth(100, 50),
    }
    spec = WorkflowSpec(name="t", slo_s=None, inputs={}, steps=steps, source="-")
    assert critical_path_s(SimWorkflow(0.0, spec, truth)) == 5.0
    assert critical_path_s(SimWorkflow(0.0, spec, truth, release_s={"b": 4.0})) == 6.0
    assert 0 < call_s(steps[2], truth["c", None]) < call_s(steps[2], truth["c", None], "L40S")
