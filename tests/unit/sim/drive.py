"""Running a simulated workflow through the real workflow engine, as the tests of generators and
trace importers do to check that the engine and the truth agree."""

from __future__ import annotations

from swarmx.sim.simworkflow import CallTruth, SimWorkflow
from swarmx.workflow.engine import CallDone, CallSpec, Finished, RunCall, WorkflowRun

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
