"""What the scheduler knows of a call: the predictor's query before it is placed, the facts at
its dispatch, and its trace record once it ends (`docs/traces.md`). It keeps the little session
state those need per running workflow (its turn, its previous prompt) and per model (prompt
bytes per token as the model's server counts them)."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass

from swarmx.clock import Clock
from swarmx.models.dist import LatencyDist
from swarmx.models.online import OnlineLearner
from swarmx.models.query import Query, SessionContext
from swarmx.protocol import Result
from swarmx.sched.prefix import BLOCK_BYTES
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord
from swarmx.workflow.engine import CallSpec, WorkflowRun

_OUTPUT_KIND = {"tool": "tool_result", "model": "model_output", "llm": "llm_output"}


@dataclass
class SessionInfo:
    """A gateway session (`swarmx.daemon.gatewaycalls`), as features and traces see it: to them
    it is a workflow whose calls arrive one at a time."""

    key: str
    """The session's name in traces and the learner: ``X-SwarmX-Session``, after the API key's
    client (``alice/agent-7``) when the gateway has keys; "" for a call of no session."""
    program: str
    """What traces record as ``workflow_name``: the agent's name, or ``gateway``."""
    slo_s: float | None = None
    started_ts: float = 0.0
    """Its first call's arrival (wall clock): `swarmx top` lists open sessions with workflows."""
    deadline_ts: float | None = None
    calls_done: int = 0
    calls_open: int = 0


@dataclass
class Inflight:
    """A dispatched call, with what was known when it left: its trace is built from this."""

    call: CallSpec
    node: str
    replica: str
    ready_ts: float
    dispatched_ts: float
    device: DeviceAtDispatch
    runtime: RuntimeAtDispatch
    turn: int
    input_kinds: list[str]
    prefix_share: float
    pred: LatencyDist | None
    predictor: str
    completion: LatencyDist | None = None
    """The router's predicted completion time (wait + service), where it made one."""
    budget_s: float | None = None
    """Deadline of the call minus its arrival, for calls of workflows with an SLO."""
    cached_est: int | None = None
    """Prompt tokens the prefix index expected the replica to hold (`Assign.cached_tokens`)."""


class CallFeatures:
    def __init__(
        self,
        runs: Mapping[str, WorkflowRun],
        learner: OnlineLearner | None,
        sessions: Mapping[str, SessionInfo],
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._runs = runs
        self._sessions = sessions
        self._learner = learner
        self._turns: collections.Counter[str] = collections.Counter()
        """Per running workflow, the calls it has dispatched so far."""
        self._last_prompt: dict[str, str] = {}
        self._bytes_per_token: dict[str, float] = {}
        """Per model, prompt bytes per token as its server counts them: estimates tokens at
        dispatch on the same scale the traces record after the call."""

    def query(self, call: CallSpec) -> Query:
        """What the predictor knows of the call before placing it (the replica's device and load
        are filled in per candidate)."""
        return Query(
            call.model,
            call.kind,
            call.prompt,
            self._estimate_tokens(call),
            call.max_tokens,
            self._program(call.workflow_id)[0],
            self._turns[call.workflow_id],
            self.input_kinds(call),
            _prefix_share(call.prompt, self._last_prompt.get(call.workflow_id, "")),
            session=self._learner.sessions.context(
                self._session_id(call.workflow_id), call.model, self._clock.time()
            )
            if self._learner is not None
            else SessionContext(),
        )

    def turn(self, workflow_id: str) -> int:
        return self._turns[workflow_id]

    def dispatched(self, call: CallSpec) -> tuple[int, list[str], float]:
        """The call leaves now: its turn, input kinds and prefix share (then the session moves
        on: the next call's turn and previous prompt)."""
        wf = call.workflow_id
        turn, kinds = self._turns[wf], self.input_kinds(call)
        share = _prefix_share(call.prompt, self._last_prompt.get(wf, ""))
        self._last_prompt[wf] = call.prompt
        self._turns[wf] += 1
        return turn, kinds, share

    def input_kinds(self, call: CallSpec) -> list[str]:
        """What the call's input carries besides its own text: outputs of tools, of models."""
        run = self._runs.get(call.workflow_id)
        kinds = {"image"} if call.kind == "model" else set()
        kinds.update(call.input_kinds)
        if run is not None:
            for dep in call.deps:
                kinds.add(_OUTPUT_KIND[run.spec.step(dep).kind])
        return sorted(kinds)

    def trace(self, f: Inflight, r: Result) -> TraceRecord:
        c = f.call
        name, slo_s = self._program(c.workflow_id)
        ses = self._sessions.get(c.workflow_id)
        return TraceRecord(
            ts=f.ready_ts,
            workflow=c.workflow_id,
            step=c.step_id,
            deps=c.deps,
            kind=c.kind,
            model=c.model,
            prompt=c.prompt if c.kind != "tool" else " ".join(c.command),
            prompt_tokens=r.prompt_tokens,
            max_tokens=c.max_tokens,
            output_tokens=r.output_tokens,
            latency_s=r.latency_s,
            queue_s=(f.dispatched_ts - f.ready_ts) + r.queue_s,
            ttft_s=r.ttft_s,
            node=f.node,
            replica=f.replica,
            device=f.device,
            runtime=f.runtime,
            ok=r.ok,
            error=r.error,
            call_id=c.call_id,
            index=c.index,
            attempt=c.attempt,
            turn=f.turn,
            workflow_name=name,
            slo_s=slo_s,
            session=ses.key if ses is not None else "",
            input_kinds=f.input_kinds,
            prefix_share=f.prefix_share,
            prefix_blocks=c.prefix_blocks,
            block_tokens=c.block_tokens,
            cached_tokens=r.cached_tokens,
            cached_tokens_est=f.cached_est,
            pred=f.pred.as_dict() if f.pred else None,
            predictor=f.predictor,
            pred_completion=f.completion.as_dict() if f.completion else None,
            budget_s=f.budget_s,
            stop_reason=r.stop_reason,
            output_kinds=list(r.output_kinds),
        )

    def observe(self, rec: TraceRecord) -> None:
        """A call ended: the model's bytes per token, and the online learner's lesson."""
        if rec.ok and rec.prompt_tokens > 0 and rec.kind != "tool":
            ratio = max(1, len(rec.prompt.encode())) / rec.prompt_tokens
            old = self._bytes_per_token.get(rec.model)
            self._bytes_per_token[rec.model] = ratio if old is None else 0.9 * old + 0.1 * ratio
        if self._learner is not None:
            self._learner.observe(rec)

    def forget(self, workflow_id: str) -> None:
        """A workflow finished: its session is over."""
        self._turns.pop(workflow_id, None)
        self._last_prompt.pop(workflow_id, None)
        if self._learner is not None:
            self._learner.sessions.forget(self._session_id(workflow_id))

    def tokens_per_block(self, model: str) -> int:
        """Tokens in one prefix block (`BLOCK_BYTES` of prompt) on ``model``'s own scale, from the
        bytes per token its server reported (4 until it has): cached-token estimates then read
        in the same tokens as the engine's counts (the torch LM's tokens are bytes)."""
        return max(1, round(BLOCK_BYTES / self._bytes_per_token.get(model, 4.0)))

    def _estimate_tokens(self, call: CallSpec) -> int:
        if call.kind == "tool":
            return 0
        size = len(call.prompt.encode())
        return max(1, round(size / self._bytes_per_token.get(call.model, 4.0)))

    def _program(self, workflow_id: str) -> tuple[str, float | None]:
        """The name and SLO of a call's workflow, or of its gateway session."""
        run = self._runs.get(workflow_id)
        if run is not None:
            return run.spec.name, run.spec.slo_s
        ses = self._sessions.get(workflow_id)
        return (ses.program, ses.slo_s) if ses is not None else ("", None)

    def _session_id(self, workflow_id: str) -> str:
        """The learner's session key: the trace's `TraceRecord.session_id`."""
        ses = self._sessions.get(workflow_id)
        return ses.key if ses is not None and ses.key else workflow_id


def _prefix_share(prompt: str, previous: str) -> float:
    """Share of ``prompt`` that repeats the start of the session's previous prompt."""
    if not prompt or not previous:
        return 0.0
    n = next(
        (i for i, (a, b) in enumerate(zip(prompt, previous, strict=False)) if a != b),
        min(len(prompt), len(previous)),
    )
    return n / len(prompt)
