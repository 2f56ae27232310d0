"""The workflow engine: a pure state machine over one workflow's DAG.

It never touches sockets, the clock or the database: the scheduler feeds it call outcomes and
executes the instructions it returns (`RunCall`, `StopCalls`, `Finished`). Call ids are
deterministic (``wf:step:index:attempt``), so replaying the recorded outcomes of a workflow after a
scheduler crash rebuilds exactly the same state, and the calls still outstanding are re-run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from swarmx.frozen import frozen
from swarmx.workflow.spec import (
    DEFAULT_LIMITS,
    StepSpec,
    WorkflowError,
    WorkflowLimits,
    WorkflowSpec,
    payload_bytes,
    render,
    render_command,
    split_items,
)

WorkflowState = Literal["running", "succeeded", "failed", "cancelled"]
StepState = Literal["waiting", "running", "succeeded", "failed", "cancelled"]

MAX_INFRA_RETRIES = 5
"""Re-runs after a node was lost mid-call; they do not use up the step's own ``retries``."""


@frozen
class CallSpec:
    """One model call or tool run the engine wants executed."""

    call_id: str
    workflow_id: str
    step_id: str
    index: int | None
    attempt: int
    kind: Literal["llm", "model", "tool"]
    model: str
    prompt: str
    max_tokens: int
    inputs: dict[str, str]
    command: list[str]
    timeout_s: float | None
    deps: list[str]
    avoid: list[str] = field(default_factory=list)
    """Replicas where this instance already failed: routers pick another one when they can."""
    api: Literal["", "chat", "completions"] = ""
    """A gateway call (`swarmx.daemon.gatewaycalls`): the OpenAI endpoint it came to; "" for
    workflow calls."""
    body: str = ""
    """A gateway call: the client's request for the engine (JSON object text)."""
    input_kinds: list[str] = field(default_factory=list)
    """A gateway call: what its messages carry besides text (``tool_result``, ``image``)."""
    prefix_blocks: list[int] = field(default_factory=list)
    """Chained hashes of the prompt's whole blocks (`swarmx.sched.prefix`): what a replica's
    prefix cache may already hold of it. Empty for tool calls and where unknown."""
    block_tokens: int = 0
    """Tokens per block of ``prefix_blocks``."""


@frozen
class CallDone:
    call_id: str
    ok: bool
    output: str
    error: str = ""
    replica: str = ""
    infra: bool = False
    """The call was lost with its node (not the call's own failure)."""


@frozen
class RunCall:
    call: CallSpec


@dataclass(frozen=True)
class StopCalls:
    """Stop these calls of the workflow, queued or running (the scheduler tells their nodes with
    the wire message `swarmx.protocol.CancelCalls`)."""

    call_ids: list[str]


@frozen
class Finished:
    state: WorkflowState
    reason: str


Instruction = RunCall | StopCalls | Finished


@dataclass
class Instance:
    """One execution of a step (a fanned-out step has several)."""

    index: int | None
    item: str | None
    state: StepState = "waiting"
    attempt: int = 0
    infra_retries: int = 0
    call: CallSpec | None = None
    output: str = ""
    error: str = ""
    avoid: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "" if self.index is None else f"[{self.index}]"


class WorkflowRun:
    def __init__(
        self, workflow_id: str, spec: WorkflowSpec, limits: WorkflowLimits = DEFAULT_LIMITS
    ) -> None:
        self.id = workflow_id
        self.spec = spec
        self.limits = limits
        self.state: WorkflowState = "running"
        self.reason = ""
        self.instances: dict[str, list[Instance]] = {}
        """Per step, created when the step is released (fan-out is known only then)."""
        self.outputs: dict[str, str] = {}
        self._by_call: dict[str, tuple[str, Instance]] = {}
        self._left: dict[str, int] = {}
        """Per released step, its instances not succeeded yet."""

    # --- queries ----------------------------------------------------------------------------

    def step_state(self, step_id: str) -> StepState:
        instances = self.instances.get(step_id)
        if instances is None:
            return "cancelled" if self.state == "cancelled" else "waiting"
        states = {i.state for i in instances}
        order: tuple[StepState, ...] = ("failed", "cancelled", "running", "waiting")
        for state in order:
            if state in states:
                return state
        return "succeeded"

    def outstanding(self) -> list[CallSpec]:
        return [
            i.call
            for insts in self.instances.values()
            for i in insts
            if i.state == "running" and i.call is not None
        ]

    def final_outputs(self) -> dict[str, str]:
        """Outputs of the sink steps (no step depends on them): the workflow's result."""
        needed = {d for s in self.spec.steps for d in s.after}
        return {s.id: self.outputs.get(s.id, "") for s in self.spec.steps if s.id not in needed}

    # --- transitions ------------------------------------------------------------------------

    def start(self) -> list[Instruction]:
        return self._release(s.id for s in self.spec.steps)

    def on_done(self, done: CallDone) -> list[Instruction]:
        entry = self._by_call.pop(done.call_id, None)
        if entry is None or self.state != "running":
            return []  # a late result of a cancelled, retried or finished call
        step_id, inst = entry
        step = self.spec.step(step_id)
        if done.ok:
            inst.state, inst.output, inst.call = "succeeded", done.output, None
            return self._step_progress(step)
        if done.replica:
            inst.avoid.append(done.replica)
        if done.infra and inst.infra_retries < MAX_INFRA_RETRIES:
            inst.infra_retries += 1
            return self._issue(step, inst)
        if inst.attempt - inst.infra_retries <= step.retries:
            return self._issue(step, inst)
        inst.state, inst.error, inst.call = "failed", done.error, None
        attempts = inst.attempt - inst.infra_retries
        return self._finish(
            "failed",
            f"step {step.id}{inst.label} failed after {attempts} attempt"
            f"{'s' if attempts != 1 else ''}: {done.error}",
        )

    def cancel(self, reason: str = "cancelled by user") -> list[Instruction]:
        if self.state != "running":
            return []
        return self._finish("cancelled", reason)

    def time_out(self, limit_s: float) -> list[Instruction]:
        """The workflow ran past its hard deadline: it fails and its calls are cancelled."""
        if self.state != "running":
            return []
        return self._finish("failed", f"not finished within {limit_s:g} s (workflow_timeout_s)")

    # --- internals --------------------------------------------------------------------------

    def _finish(self, state: WorkflowState, reason: str) -> list[Instruction]:
        calls = self.outstanding()
        for _, inst in list(self._by_call.values()):
            inst.state, inst.call = "cancelled", None
        self._by_call.clear()
        self.state, self.reason = state, reason
        out: list[Instruction] = [StopCalls([c.call_id for c in calls])] if calls else []
        return [*out, Finished(state, reason)]

    def _step_progress(self, step: StepSpec) -> list[Instruction]:
        self._left[step.id] -= 1
        if self._left[step.id]:
            return []
        self.outputs[step.id] = "\n".join(i.output for i in self.instances[step.id])
        return self._release(self.spec.dependents[step.id])

    def _release(self, candidates: Iterable[str]) -> list[Instruction]:
        """Start each of ``candidates`` (the steps waiting for one that just finished; all of
        them at the start) whose dependencies have all succeeded; finish when none is left.
        A step's fan-out source is one of its ancestors, so it has finished by then too."""
        out: list[Instruction] = []
        todo = deque(candidates)
        while todo:
            step = self.spec.step(todo.popleft())
            if step.id in self.instances or not all(d in self.outputs for d in step.after):
                continue
            instances = self._expand(step)
            self.instances[step.id] = instances
            self._left[step.id] = len(instances)
            if not instances:  # a dynamic fan-out over nothing: done, with empty output
                self.outputs[step.id] = ""
                todo.extend(self.spec.dependents[step.id])
                continue
            for inst in instances:
                out.extend(self._issue(step, inst))
                if self.state != "running":  # a call that cannot be made failed the workflow
                    return out
        if len(self.outputs) == len(self.spec.steps):
            out.extend(self._finish("succeeded", ""))
        return out

    def _expand(self, step: StepSpec) -> list[Instance]:
        fan = step.fan_out
        if fan is None:
            return [Instance(None, None)]
        if fan.source is not None:
            items = split_items(self.outputs[fan.source], fan)
            return [Instance(i, item) for i, item in enumerate(items)]
        return [Instance(i, None) for i in range(fan.count or 1)]

    def _issue(self, step: StepSpec, inst: Instance) -> list[Instruction]:
        """Run the instance's next attempt; if its call cannot be made (a substituted value
        that would be an option, inputs too large to send), the workflow fails instead: that
        is no transient failure, and a retry would make the same call."""
        inst.attempt += 1
        inst.state = "running"
        try:
            call = self._call(step, inst)
        except WorkflowError as exc:
            inst.state, inst.error = "failed", str(exc)
            return self._finish("failed", f"step {step.id}{inst.label}: {exc}")
        inst.call = call
        self._by_call[call.call_id] = (step.id, inst)
        return [RunCall(call)]

    def _call(self, step: StepSpec, inst: Instance) -> CallSpec:
        def fill(template: str) -> str:
            return render(template, self.spec.inputs, self.outputs, inst.item, inst.index)

        prompt = fill(step.prompt)
        inputs = {k: fill(v) for k, v in step.inputs.items()}
        command = render_command(
            step.command, self.spec.inputs, self.outputs, inst.item, inst.index
        )
        too_big = self.limits.call_too_big(payload_bytes(prompt, inputs, command))
        if too_big:
            raise WorkflowError(too_big)
        return CallSpec(
            call_id=f"{self.id}:{step.id}:{inst.index or 0}:{inst.attempt}",
            workflow_id=self.id,
            step_id=step.id,
            index=inst.index,
            attempt=inst.attempt,
            kind=step.kind,
            model=step.model,
            prompt=prompt,
            max_tokens=step.max_tokens if step.kind == "llm" else 0,
            inputs=inputs,
            command=command,
            timeout_s=step.timeout_s,
            deps=list(step.after),
            avoid=list(inst.avoid),
        )


def replay(
    workflow_id: str,
    spec: WorkflowSpec,
    done: list[CallDone],
    limits: WorkflowLimits = DEFAULT_LIMITS,
) -> WorkflowRun:
    """Rebuild a run from its recorded outcomes (in the order they happened); what it still
    waits for is ``run.outstanding()``, to be dispatched again."""
    run = WorkflowRun(workflow_id, spec, limits)
    run.start()
    for d in done:
        run.on_done(d)
    return run
