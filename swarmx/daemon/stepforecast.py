"""The predicted service time of a workflow's steps, for its slack and deadlines
(`swarmx.sched.outlook`): the live predictor asked about the step, else what the step's and its
model's calls took."""

from __future__ import annotations

import dataclasses
import logging
from typing import TypeVar

from swarmx.clock import Clock
from swarmx.models.dist import LatencyDist
from swarmx.sched.dispatch import TOOL_POOL, Dispatcher
from swarmx.traces import TraceRecord
from swarmx.workflow.engine import CallSpec, WorkflowRun
from swarmx.workflow.spec import StepSpec

log = logging.getLogger(__name__)
K = TypeVar("K")

STEP_FORECAST_TTL_S = 5.0
_NOTHING = LatencyDist((0.5,), (0.0,))


class StepForecasts:
    def __init__(self, dispatcher: Dispatcher, clock: Clock) -> None:
        self._dispatcher = dispatcher
        self._clock = clock
        self.step_s: dict[tuple[str, str], float] = {}
        """EWMA of the service time of each (workflow name, step), from finished calls."""
        self._model_s: dict[str, float] = {}
        """EWMA of the service time of each pool's calls."""
        self._cached: dict[tuple[str, str], tuple[float, LatencyDist]] = {}
        """(workflow name, step) -> (when, the step's service forecast)."""

    def service(self, run: WorkflowRun, step: StepSpec) -> LatencyDist:
        """The predicted service time of a typical call of a step: the live predictor asked
        about the step (its prompt template as the prompt) on an idle replica of its model,
        cached for a few seconds; else the recent forecasts of its model's calls; else what its
        calls took; else nothing (0 s)."""
        key = (run.spec.name, step.id)
        now = self._clock.monotonic()
        hit = self._cached.get(key)
        if hit is not None and now - hit[0] < STEP_FORECAST_TTL_S:
            return hit[1]
        pool = TOOL_POOL if step.kind == "tool" else step.model
        dist = self._forecast(run, step, pool) or self._dispatcher.typical_service(pool)
        if dist is None:
            seen = self.step_s.get(key, self._model_s.get(pool))
            dist = _NOTHING if seen is None else LatencyDist.lognormal(seen, 0.5, (0.5, 0.9, 0.99))
        self._cached[key] = (now, dist)
        return dist

    def observe(self, rec: TraceRecord) -> None:
        """A call ended: what its step and its model's calls take."""
        if rec.ok:
            _ewma(self.step_s, (rec.workflow_name, rec.step), rec.latency_s)
            _ewma(self._model_s, TOOL_POOL if rec.kind == "tool" else rec.model, rec.latency_s)

    def _forecast(self, run: WorkflowRun, step: StepSpec, pool: str) -> LatencyDist | None:
        forecaster = self._dispatcher.forecaster
        views = self._dispatcher.views(pool)
        if forecaster is None or not views:
            return None
        idle = dataclasses.replace(min(views, key=lambda v: v.outstanding), outstanding=0, work=())
        call = CallSpec(  # the step as a call of this workflow, its prompt still a template
            f"{run.id}:{step.id}:~",
            run.id,
            step.id,
            None,
            1,
            step.kind,
            step.model,
            step.prompt if step.kind != "tool" else " ".join(step.command),
            step.max_tokens if step.kind == "llm" else 0,
            dict(step.inputs),
            list(step.command),
            step.timeout_s,
            list(step.after),
        )
        try:
            return forecaster.service(call, [idle])[0]
        except Exception:  # a forecast is an estimate: never let it stop a submission
            log.exception("forecast of step %s failed", step.id)
            return None


def _ewma(table: dict[K, float], key: K, value: float, alpha: float = 0.1) -> None:
    old = table.get(key)
    table[key] = value if old is None else (1 - alpha) * old + alpha * value
