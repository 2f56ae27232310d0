"""Workflows as `swarmx status` and `swarmx top` show them: built from the journal, with each
step's latest attempt and the forecasts made for it."""

from __future__ import annotations

import collections
from collections.abc import Mapping

from swarmx.protocol import StepView, WorkflowView
from swarmx.store import Store, WorkflowRow
from swarmx.workflow.engine import WorkflowRun, replay
from swarmx.workflow.spec import WorkflowError, WorkflowLimits, WorkflowSpec, parse_workflow

FINISHED_SPECS = 512
MAX_REMEMBERED_PREDS = 20_000
"""Calls whose forecasts the step views show (older ones: see the traces)."""

Preds = tuple[dict[str, float] | None, dict[str, float] | None]
"""A call's forecasts as shown: (service, completion) quantiles, where made."""


class WorkflowViews:
    def __init__(self, store: Store, runs: Mapping[str, WorkflowRun], limits: WorkflowLimits):
        self._store = store
        self._runs = runs
        self._limits = limits
        self._preds: collections.OrderedDict[str, Preds] = collections.OrderedDict()
        """Recent calls' forecasts for the step views; bounded."""
        self._finished_specs: collections.OrderedDict[str, WorkflowSpec | None] = (
            collections.OrderedDict()
        )
        """Specs of finished workflows their views were built from, the most recent
        `FINISHED_SPECS`."""

    def remember(self, call_id: str, preds: Preds) -> None:
        self._preds[call_id] = preds
        while len(self._preds) > MAX_REMEMBERED_PREDS:
            self._preds.popitem(last=False)

    def view(self, wf_id: str, detailed: bool) -> WorkflowView | None:
        row = self._store.workflow(wf_id)
        if row is None:
            return None
        run = self._runs.get(wf_id)
        spec = run.spec if run else self._parse_quietly(row)
        calls = self._store.calls(wf_id)
        latest: dict[tuple[str, int | None], StepView] = {}
        for c in calls:
            label = c.step_id if c.idx is None else f"{c.step_id}[{c.idx}]"
            pred, completion = self._preds.get(c.call_id, (None, None))
            latest[(c.step_id, c.idx)] = StepView(
                label,
                c.step_id,
                c.idx,
                c.state,
                c.attempt,
                c.node,
                c.replica,
                c.queue_s,
                c.latency_s,
                c.ttft_s,
                c.output_tokens,
                c.error,
                c.output if detailed else "",
                pred,
                completion,
            )
        steps: list[StepView] = []
        for step in spec.steps if spec else []:
            mine = [v for (s, _), v in sorted(latest.items(), key=_order) if s == step.id]
            if not mine:
                state = "waiting" if row.state == "running" else "skipped"
                mine = [StepView(step.id, step.id, None, state, 0, "", "", None, None, None, None)]
            steps.extend(mine)
        outputs: dict[str, str] = {}
        if detailed and row.state == "succeeded" and spec is not None:
            done = replay(wf_id, spec, self._store.outcomes(wf_id), self._limits)
            outputs = done.final_outputs()
        latency = row.finished_ts - row.submitted_ts if row.finished_ts else None
        return WorkflowView(
            row.id,
            row.name,
            row.state,
            row.reason,
            row.submitted_ts,
            row.finished_ts,
            latency,
            row.slo_s,
            steps,
            outputs,
        )

    def recent(self, limit: int, client: str | None = None) -> list[WorkflowView]:
        """The most recent ``limit`` workflows, of one ``client`` if given."""
        rows = self._store.workflows(client=client, limit=limit)
        views = (self.view(r.id, detailed=False) for r in rows)
        return [v for v in views if v is not None]

    def _parse_quietly(self, row: WorkflowRow) -> WorkflowSpec | None:
        """A finished workflow's spec for its view, parsed once: views are asked for often
        (`swarmx status`, `top`) and a 1 MiB file takes a while, on the event loop."""
        if row.id in self._finished_specs:
            self._finished_specs.move_to_end(row.id)
            return self._finished_specs[row.id]
        try:
            spec = parse_workflow(row.spec_text, row.source, row.overrides, self._limits)
        except WorkflowError:
            spec = None
        self._finished_specs[row.id] = spec
        if len(self._finished_specs) > FINISHED_SPECS:
            self._finished_specs.popitem(last=False)
        return spec


def _order(item: tuple[tuple[str, int | None], StepView]) -> tuple[str, int]:
    (step, idx), _ = item
    return step, -1 if idx is None else idx
