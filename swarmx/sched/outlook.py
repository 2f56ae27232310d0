"""What the scheduler expects of the running workflows: each ready call's deadline and slack, how
wide fan-outs will be, and how many calls are about to arrive. Pure code, shared by the daemon
and the simulator, so the slack queue and the tail scaler see the same predictions in both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from swarmx.models.dist import LatencyDist
from swarmx.sched.dispatch import TOOL_POOL, Ticket
from swarmx.sched.slack import critical_paths, finish_by_s, slack_s
from swarmx.workflow.engine import CallSpec, WorkflowRun
from swarmx.workflow.spec import StepSpec, split_items

StepService = Callable[[WorkflowRun, StepSpec], LatencyDist]
"""The predicted service time of one typical call of a step."""


class Outlook:
    def __init__(self, step_service: StepService, fan_alpha: float = 0.2) -> None:
        self.step_service = step_service
        self.fan_alpha = fan_alpha
        self._fan: dict[tuple[str, str], float] = {}
        """(workflow name, step id) -> running average of a dynamic fan-out's width."""
        self._last: tuple[tuple[str, float, int, int], dict[str, float]] | None = None
        """The last critical paths worked out: the calls of a fan-out arrive together."""

    def ticket(
        self,
        run: WorkflowRun,
        call: CallSpec,
        submitted_s: float,
        now_s: float,
        default_slo_s: float | None = None,
    ) -> Ticket:
        """The call with its deadline and its workflow's slack, for workflows with an SLO.

        The workflow must end by submission + ``slo_s``. What is predicted to run after this
        call's step (the longest chain of unfinished steps waiting for it) must fit after the
        call, so the call's deadline is the workflow's less that chain; the slack is the time to
        spare if the remaining critical path, this step included, started now."""
        self._note_fan_out(run, call)
        slo = run.spec.slo_s if run.spec.slo_s is not None else default_slo_s
        if slo is None:
            return Ticket(call, now_s)
        end = submitted_s + slo
        key = (run.id, now_s, len(run.outputs), len(run.instances))
        if self._last is None or self._last[0] != key:
            self._last = (key, self.critical_paths(run))
        paths = self._last[1]
        deadline = finish_by_s(run.spec, paths, call.step_id, end)
        return Ticket(call, now_s, deadline, slack_s(end, now_s, paths.get(call.step_id, 0.0)))

    def critical_paths(self, run: WorkflowRun) -> dict[str, float]:
        """Per unfinished step, the predicted time from its start to the end of the workflow."""
        return critical_paths(
            run.spec,
            run.outputs.keys(),
            lambda step: self.step_service(run, step),
            lambda step: math.ceil(self.fan_estimate(run, step)),
        )

    def fan_estimate(self, run: WorkflowRun, step: StepSpec) -> float:
        """Calls a step makes: 1, its fixed fan-out, the expansion once known; for a dynamic
        fan-out not expanded yet, the average of its past expansions, else its ``max``."""
        fan = step.fan_out
        if fan is None:
            return 1.0
        if step.id in run.instances:
            return float(len(run.instances[step.id]))
        if fan.source is None:
            return float(fan.count or 1)
        if fan.source in run.outputs:
            return float(len(split_items(run.outputs[fan.source], fan)))
        return self._fan.get((run.spec.name, step.id), float(fan.max))

    def _note_fan_out(self, run: WorkflowRun, call: CallSpec) -> None:
        fan = run.spec.step(call.step_id).fan_out
        if fan is not None and fan.source is not None and call.index == 0 and call.attempt == 1:
            n = float(len(run.instances.get(call.step_id, ())))
            key = (run.spec.name, call.step_id)
            old = self._fan.get(key)
            self._fan[key] = n if old is None else (1 - self.fan_alpha) * old + self.fan_alpha * n

    def expected_calls(self, runs: Iterable[WorkflowRun], pool: str) -> int:
        """Calls for this pool the running workflows will release next: steps not started whose
        dependencies have started, at their fan-out estimate (the scaler scales ahead of them)."""
        total = 0.0
        for run in runs:
            for step in run.spec.steps:
                if step.id in run.instances:
                    continue
                if (TOOL_POOL if step.kind == "tool" else step.model) != pool:
                    continue
                if all(d in run.instances for d in step.after):
                    total += self.fan_estimate(run, step)
        return round(total)
