"""Slack: the predicted remaining critical path of a workflow DAG."""

import pytest

from swarmx.models.dist import LatencyDist
from swarmx.sched.slack import critical_paths, finish_by_s, slack_s, step_duration_s
from swarmx.workflow.spec import StepSpec, parse_workflow

LEVELS = (0.5, 0.9, 0.95, 0.99)

DAG = parse_workflow(
    """
name = "report"

[[steps]]
id = "plan"
kind = "llm"
model = "lm"
prompt = "plan"

[[steps]]
id = "draft"
kind = "llm"
model = "lm"
after = ["plan"]
prompt = "{item}"
fan_out = { from = "plan" }

[[steps]]
id = "cover"
kind = "llm"
model = "lm"
after = ["plan"]
prompt = "cover"

[[steps]]
id = "merge"
kind = "llm"
model = "lm"
after = ["draft", "cover"]
prompt = "merge"
"""
)
"""plan -> (draft x N, cover) -> merge."""

SERVICE = {
    "plan": LatencyDist.lognormal(2.0, 0.5, LEVELS),
    "draft": LatencyDist.lognormal(4.0, 0.5, LEVELS),
    "cover": LatencyDist.lognormal(5.0, 0.1, LEVELS),
    "merge": LatencyDist.lognormal(1.0, 0.5, LEVELS),
}


def paths(finished=(), drafts=9, level=0.5):
    def fan_out(step: StepSpec) -> int:
        return drafts if step.id == "draft" else 1

    return critical_paths(DAG, set(finished), lambda s: SERVICE[s.id], fan_out, level)


def test_fan_out_counts_the_expected_slowest_instance():
    draft9 = SERVICE["draft"].quantile(0.9)  # 9 instances: level 9/10
    assert step_duration_s(SERVICE["draft"], 9) == pytest.approx(draft9)
    assert step_duration_s(SERVICE["draft"], 1) == pytest.approx(4.0)  # the median
    assert step_duration_s(SERVICE["draft"], 0) == 0.0  # fan-out over nothing
    assert step_duration_s(SERVICE["draft"], 19) > draft9  # more instances, later straggler
    assert step_duration_s(SERVICE["draft"], 3, level=0.9) == pytest.approx(draft9)


def test_critical_path_on_a_dag_with_a_fan_out():
    got = paths(drafts=9)
    draft9 = SERVICE["draft"].quantile(0.9)  # ~7.6 s: longer than cover's 5 s
    assert got["merge"] == pytest.approx(1.0)
    assert got["cover"] == pytest.approx(5.0 + 1.0)
    assert got["draft"] == pytest.approx(draft9 + 1.0)
    assert got["plan"] == pytest.approx(2.0 + draft9 + 1.0)  # through the fan-out


def test_a_small_fan_out_leaves_the_other_branch_critical():
    got = paths(drafts=1)  # one draft: 4 s median, cover's 5 s is now the longer branch
    assert got["plan"] == pytest.approx(2.0 + 5.0 + 1.0)


def test_finished_steps_are_left_out():
    got = paths(finished={"plan", "draft"})
    assert set(got) == {"cover", "merge"}
    assert got["cover"] == pytest.approx(6.0)
    assert paths(finished={"plan", "draft", "cover", "merge"}) == {}


def test_level_makes_the_estimate_more_cautious():
    cautious = paths(level=0.9)
    assert cautious["merge"] == pytest.approx(SERVICE["merge"].quantile(0.9))
    assert cautious["plan"] > paths()["plan"]


def test_finish_by_and_slack():
    got = paths(drafts=9)
    draft9 = SERVICE["draft"].quantile(0.9)
    assert finish_by_s(DAG, got, "plan", 100.0) == pytest.approx(100.0 - draft9 - 1.0)
    assert finish_by_s(DAG, got, "cover", 100.0) == pytest.approx(99.0)
    assert finish_by_s(DAG, got, "merge", 100.0) == 100.0  # nothing after it
    assert slack_s(deadline_s=100.0, now_s=80.0, critical_path_s=15.0) == 5.0
    assert slack_s(deadline_s=100.0, now_s=95.0, critical_path_s=15.0) == -10.0  # late
