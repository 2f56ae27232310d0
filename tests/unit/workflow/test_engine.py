"""The workflow engine as a pure state machine: outcomes in, instructions out."""

from swarmx.workflow.engine import (
    CallDone,
    Finished,
    RunCall,
    StopCalls,
    WorkflowRun,
    replay,
)
from swarmx.workflow.spec import WorkflowLimits, parse_workflow

CODEGEN = """
name = "codegen"
slo_s = 60
[inputs]
task = "a queue"

[[steps]]
id = "plan"
kind = "llm"
after = []
model = "lm"
prompt = "Plan {inputs.task}"
max_tokens = 32

[[steps]]
id = "code"
kind = "llm"
after = ["plan"]
model = "lm"
prompt = "Part {index}: {steps.plan.output}"
fan_out = 3
retries = 1

[[steps]]
id = "test"
kind = "tool"
after = ["code"]
command = ["check", "{steps.code.output}"]

[[steps]]
id = "review"
kind = "llm"
after = ["code", "test"]
model = "lm"
prompt = "Review {steps.test.output}"
"""

RESEARCH = """
name = "research"
[[steps]]
id = "plan"
kind = "llm"
after = []
model = "lm"
prompt = "queries"

[[steps]]
id = "search"
kind = "llm"
after = ["plan"]
model = "lm"
prompt = "search {item} ({index})"
fan_out = { from = "plan", split = "lines", max = 2 }

[[steps]]
id = "report"
kind = "llm"
after = ["search"]
model = "lm"
prompt = "report: {steps.search.output}"
"""


def calls(instructions):
    return [i.call for i in instructions if isinstance(i, RunCall)]


def ok(call, output="out", replica="r1"):
    return CallDone(call.call_id, True, output, replica=replica)


def test_codegen_runs_in_dependency_order_with_fan_out():
    run = WorkflowRun("wf-1", parse_workflow(CODEGEN))
    (plan,) = calls(run.start())
    assert (plan.call_id, plan.prompt, plan.max_tokens) == ("wf-1:plan:0:1", "Plan a queue", 32)
    coders = calls(run.on_done(ok(plan, "the plan")))
    assert [c.prompt for c in coders] == [f"Part {i}: the plan" for i in range(3)]
    assert [c.index for c in coders] == [0, 1, 2]
    assert calls(run.on_done(ok(coders[2], "c2"))) == []
    assert calls(run.on_done(ok(coders[0], "c0"))) == []
    (test,) = calls(run.on_done(ok(coders[1], "c1")))
    assert test.command == ["check", "c0\nc1\nc2"]  # fan-out outputs joined in index order
    assert test.kind == "tool"
    assert test.max_tokens == 0
    (review,) = calls(run.on_done(ok(test, "passed")))
    assert review.deps == ["code", "test"]
    assert run.on_done(ok(review, "lgtm")) == [Finished("succeeded", "")]
    assert run.state == "succeeded"
    assert run.final_outputs() == {"review": "lgtm"}


def test_retry_goes_elsewhere_then_failure_cancels_the_rest():
    run = WorkflowRun("wf-2", parse_workflow(CODEGEN))
    (plan,) = calls(run.start())
    coders = calls(run.on_done(ok(plan)))
    (retry,) = calls(run.on_done(CallDone(coders[0].call_id, False, "", "oom", replica="r1")))
    assert (retry.call_id, retry.attempt, retry.avoid) == ("wf-2:code:0:2", 2, ["r1"])
    out = run.on_done(CallDone(retry.call_id, False, "", "oom again", replica="r2"))
    assert out == [
        StopCalls([coders[1].call_id, coders[2].call_id]),
        Finished("failed", "step code[0] failed after 2 attempts: oom again"),
    ]
    assert run.step_state("code") == "failed"
    assert run.on_done(ok(coders[1])) == []  # a late result after the end changes nothing


def test_lost_node_reruns_without_using_up_retries():
    run = WorkflowRun("wf-3", parse_workflow(RESEARCH))  # retries = 0
    (plan,) = calls(run.start())
    (again,) = calls(run.on_done(CallDone(plan.call_id, False, "", "node down", "r1", infra=True)))
    assert again.attempt == 2
    assert again.avoid == ["r1"]
    out = run.on_done(CallDone(again.call_id, False, "", "bad prompt", "r2"))
    assert out[-1] == Finished("failed", "step plan failed after 1 attempt: bad prompt")


def test_dynamic_fan_out_is_capped_and_may_be_empty():
    run = WorkflowRun("wf-4", parse_workflow(RESEARCH))
    (plan,) = calls(run.start())
    searches = calls(run.on_done(ok(plan, "q1\n\n  q2 \nq3\n")))
    assert [c.prompt for c in searches] == ["search q1 (0)", "search q2 (1)"]  # max = 2

    empty = WorkflowRun("wf-5", parse_workflow(RESEARCH))
    (plan,) = calls(empty.start())
    (report,) = calls(empty.on_done(ok(plan, "   \n")))
    assert report.prompt == "report: "
    assert empty.step_state("search") == "succeeded"


def test_cancel_stops_outstanding_calls_once():
    run = WorkflowRun("wf-6", parse_workflow(CODEGEN))
    (plan,) = calls(run.start())
    coders = calls(run.on_done(ok(plan)))
    out = run.cancel()
    assert out == [
        StopCalls([c.call_id for c in coders]),
        Finished("cancelled", "cancelled by user"),
    ]
    assert run.cancel() == []
    assert run.outstanding() == []


def test_replay_rebuilds_state_and_reissues_what_was_in_flight():
    spec = parse_workflow(CODEGEN)
    run = WorkflowRun("wf-7", spec)
    (plan,) = calls(run.start())
    coders = calls(run.on_done(ok(plan, "p")))
    run.on_done(ok(coders[1], "c1"))
    history = [ok(plan, "p"), ok(coders[1], "c1")]
    again = replay("wf-7", spec, history)
    assert [c.call_id for c in again.outstanding()] == [coders[0].call_id, coders[2].call_id]
    assert again.outstanding() == run.outstanding()
    again.on_done(ok(coders[0], "c0"))
    (test,) = calls(again.on_done(ok(coders[2], "c2")))
    assert test.command == ["check", "c0\nc1\nc2"]


MERGE = """
name = "merge"
[[steps]]
id = "gen"
kind = "llm"
model = "lm"
prompt = "write"
fan_out = 6

[[steps]]
id = "merge"
kind = "llm"
model = "lm"
after = ["gen"]
prompt = "merge: {steps.gen.output}"
"""


def test_inputs_too_large_to_send_fail_the_workflow_with_the_reason():
    run = WorkflowRun("wf-8", parse_workflow(MERGE), WorkflowLimits(max_prompt_bytes=8 << 20))
    gens = calls(run.start())
    for g in gens[:-1]:
        assert run.on_done(ok(g, "x" * (1 << 20))) == []
    out = run.on_done(ok(gens[-1], "x" * (1 << 20)))
    assert out == [
        Finished(
            "failed",
            "step merge: inputs of 6.0 MiB exceed the 4 MiB frame limit (max_frame_bytes)",
        )
    ]
    assert (run.state, run.step_state("merge"), run.outstanding()) == ("failed", "failed", [])


def test_a_prompt_over_the_prompt_limit_fails_the_workflow():
    run = WorkflowRun("wf-9", parse_workflow(MERGE), WorkflowLimits(max_prompt_bytes=100))
    gens = calls(run.start())
    for g in gens:
        out = run.on_done(ok(g, "y" * 20))
    assert out[-1] == Finished(
        "failed", "step merge: inputs of 137 bytes exceed the 100 bytes limit (max_prompt_bytes)"
    )


def test_an_output_that_would_be_a_tool_option_fails_the_workflow_and_cancels_the_rest():
    spec = parse_workflow(
        """
name = "opt"
[[steps]]
id = "name"
kind = "llm"
model = "lm"
prompt = "a file name"

[[steps]]
id = "slow"
kind = "llm"
model = "lm"
prompt = "something slow"

[[steps]]
id = "sort"
kind = "tool"
after = ["name"]
command = ["sort", "-n", "{steps.name.output}"]
"""
    )
    run = WorkflowRun("wf-10", spec)
    name, slow = calls(run.start())
    out = run.on_done(ok(name, "-o/etc/passwd"))
    assert out == [
        StopCalls([slow.call_id]),
        Finished(
            "failed",
            "step sort: command[2]: {steps.name.output} is '-o/etc/passwd', which the program"
            " would read as an option (a substituted argument may not start with '-'; put a"
            " '--' argument before it if the program takes operands after '--')",
        ),
    ]
    assert run.step_state("sort") == "failed"


def test_time_out_fails_the_workflow_and_cancels_its_calls():
    run = WorkflowRun("wf-11", parse_workflow(CODEGEN))
    (plan,) = calls(run.start())
    assert run.time_out(3600) == [
        StopCalls([plan.call_id]),
        Finished("failed", "not finished within 3600 s (workflow_timeout_s)"),
    ]
    assert run.time_out(3600) == []
