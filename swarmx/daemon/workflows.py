"""The scheduler's workflow service: submissions, dispatch of calls to replicas, results, cancel,
recovery after a restart, and the trace of every finished call.

Decisions are delegated to pure code: the workflow engine (what to run next) and the router (where
to run it). This class keeps the books (replicas, outstanding calls, the SQLite journal) and turns
engine instructions into messages to node agents.
"""

from __future__ import annotations

import collections
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from swarmx.clock import Clock
from swarmx.cluster import NodeTable
from swarmx.models.dist import LatencyDist
from swarmx.models.online import OnlineLearner
from swarmx.models.query import Query
from swarmx.protocol import (
    CancelCalls,
    Dispatch,
    Hello,
    Message,
    Result,
    StepView,
    Submit,
    Telemetry,
    WorkflowView,
)
from swarmx.sched.router import ReplicaView, Router
from swarmx.schema import encode
from swarmx.store import Store, WorkflowRow
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord
from swarmx.workflow.engine import (
    CallDone,
    CallSpec,
    Finished,
    Instruction,
    RunCall,
    WorkflowRun,
    replay,
)
from swarmx.workflow.engine import CancelCalls as EngineCancel
from swarmx.workflow.spec import WorkflowError, WorkflowSpec, parse_workflow

log = logging.getLogger(__name__)

TOOL_MODEL = "tool"

Send = Callable[[str, Message], Awaitable[bool]]
"""Send a message to a node by name; False if it could not leave."""


@dataclass
class _Replica:
    node: str
    info_model: str
    view: ReplicaView


@dataclass
class _Inflight:
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


class WorkflowService:
    def __init__(
        self,
        store: Store,
        router: Router,
        nodes: NodeTable,
        clock: Clock,
        send: Send,
        *,
        learner: OnlineLearner | None = None,
    ) -> None:
        self.store = store
        self.router = router
        self.nodes = nodes
        self.clock = clock
        self._send = send
        self.replicas: dict[str, _Replica] = {}
        self.runs: dict[str, WorkflowRun] = {}
        self._inflight: dict[str, _Inflight] = {}
        self._ready_ts: dict[str, float] = {}
        self._turns: collections.Counter[str] = collections.Counter()
        self.pending: collections.deque[CallSpec] = collections.deque()
        """Calls with no live replica for their model yet; retried as replicas come and go."""
        self.late_results = 0
        self.learner = learner
        self._last_prompt: dict[str, str] = {}
        self._bytes_per_token: dict[str, float] = {}
        """Per model, prompt bytes per token as its server counts them: estimates tokens at
        dispatch on the same scale the traces record after the call."""

    # --- cluster membership -----------------------------------------------------------------

    def on_hello(self, hello: Hello) -> None:
        """A node (re)registered: its replica list replaces what we knew of it."""
        for rid in [r for r, rep in self.replicas.items() if rep.node == hello.node]:
            if rid not in {i.replica for i in hello.replicas}:
                del self.replicas[rid]
        for info in hello.replicas:
            outstanding = sum(1 for f in self._inflight.values() if f.replica == info.replica)
            self.replicas[info.replica] = _Replica(
                hello.node,
                info.model,
                ReplicaView(
                    info.replica,
                    hello.node,
                    info.model,
                    info.backend,
                    info.device,
                    info.concurrency,
                    outstanding,
                ),
            )

    async def on_node_down(self, node: str) -> None:
        """Calls on a lost node are re-run elsewhere; this does not use up a step's retries."""
        lost = [f for f in self._inflight.values() if f.node == node]
        for f in lost:
            log.warning("call %s lost with node %s; re-running it", f.call.call_id, node)
            await self._done(
                f.call.call_id,
                CallDone(f.call.call_id, False, "", f"node {node} down", f.replica, infra=True),
                None,
            )

    def served_models(self) -> set[str]:
        return {r.info_model for r in self.replicas.values()}

    # --- client requests --------------------------------------------------------------------

    async def submit(self, msg: Submit) -> str:
        """Validate, journal, start; raises WorkflowError (one line, naming the place)."""
        spec = parse_workflow(msg.text, msg.source, msg.overrides)
        served = self.served_models()
        for step in spec.steps:
            model = TOOL_MODEL if step.kind == "tool" else step.model
            if model not in served:
                if step.kind == "tool":
                    raise WorkflowError(
                        f"{spec.source}:{step.line}: steps (id '{step.id}'): "
                        "no node in the cluster runs tools"
                    )
                known = ", ".join(sorted(served - {TOOL_MODEL})) or "none"
                raise WorkflowError(
                    f"{spec.source}:{step.line}: steps (id '{step.id}').model: "
                    f"unknown model {step.model!r} (served: {known})"
                )
        wf_id = f"wf-{secrets.token_hex(4)}"
        self.store.add_workflow(
            WorkflowRow(
                wf_id,
                spec.name,
                spec.source,
                msg.text,
                msg.overrides,
                spec.slo_s,
                "running",
                "",
                self.clock.time(),
                None,
            )
        )
        log.info("workflow %s (%s) submitted: %d steps", wf_id, spec.name, len(spec.steps))
        run = WorkflowRun(wf_id, spec)
        self.runs[wf_id] = run
        await self._execute(run, run.start())
        return wf_id

    async def cancel(self, wf_id: str) -> bool:
        run = self.runs.get(wf_id)
        if run is None:
            return False
        await self._execute(run, run.cancel())
        return True

    async def recover(self) -> int:
        """Resume every workflow the journal says was running when the scheduler stopped."""
        rows = self.store.workflows(state="running", limit=1_000_000)
        for row in rows:
            try:
                spec = parse_workflow(row.spec_text, row.source, row.overrides)
            except WorkflowError as exc:  # the format changed under it: fail it, visibly
                self.store.finish_workflow(
                    row.id, "failed", f"cannot resume: {exc}", self.clock.time()
                )
                continue
            run = replay(row.id, spec, self.store.outcomes(row.id))
            self.runs[row.id] = run
            now = self.clock.time()
            for call in run.outstanding():
                self._ready_ts[call.call_id] = now
                self.pending.append(call)
            log.info("workflow %s resumed: %d calls to re-run", row.id, len(run.outstanding()))
        return len(rows)

    # --- results ----------------------------------------------------------------------------

    async def on_result(self, node: str, result: Result) -> None:
        f = self._inflight.get(result.call_id)
        if f is None:
            self.late_results += 1  # cancelled, re-run after a node loss, or a duplicate
            return
        done = CallDone(result.call_id, result.ok, result.output, result.error, result.replica)
        await self._done(result.call_id, done, result)

    async def _done(self, call_id: str, done: CallDone, result: Result | None) -> None:
        f = self._inflight.pop(call_id)
        rep = self.replicas.get(f.replica)
        if rep is not None:
            rep.view = replace(rep.view, outstanding=max(0, rep.view.outstanding - 1))
        record = None if result is None else self._trace(f, result)
        self.store.call_done(done, result, None if record is None else encode(record))
        if record is not None:
            self._learn(record)
        run = self.runs.get(f.call.workflow_id)
        if run is not None:
            await self._execute(run, run.on_done(done))

    def _trace(self, f: _Inflight, r: Result) -> TraceRecord:
        c = f.call
        run = self.runs.get(c.workflow_id)
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
            workflow_name=run.spec.name if run else "",
            slo_s=run.spec.slo_s if run else None,
            input_kinds=f.input_kinds,
            prefix_share=f.prefix_share,
            pred=f.pred.as_dict() if f.pred else None,
            predictor=f.predictor,
        )

    def _learn(self, rec: TraceRecord) -> None:
        if rec.ok and rec.prompt_tokens > 0 and rec.kind != "tool":
            ratio = max(1, len(rec.prompt.encode())) / rec.prompt_tokens
            old = self._bytes_per_token.get(rec.model)
            self._bytes_per_token[rec.model] = ratio if old is None else 0.9 * old + 0.1 * ratio
        if self.learner is not None:
            self.learner.observe(rec)

    def _estimate_tokens(self, call: CallSpec) -> int:
        if call.kind == "tool":
            return 0
        size = len(call.prompt.encode())
        return max(1, round(size / self._bytes_per_token.get(call.model, 4.0)))

    def _workflow_name(self, call: CallSpec) -> str:
        run = self.runs.get(call.workflow_id)
        return run.spec.name if run else ""

    def _input_kinds(self, call: CallSpec) -> list[str]:
        """What the call's input carries besides its own text: outputs of tools, of models."""
        run = self.runs.get(call.workflow_id)
        kinds = {"image"} if call.kind == "model" else set()
        if run is not None:
            for dep in call.deps:
                kinds.add(_OUTPUT_KIND[run.spec.step(dep).kind])
        return sorted(kinds)

    # --- executing engine instructions ------------------------------------------------------

    async def _execute(self, run: WorkflowRun, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, RunCall):
                self._ready_ts[ins.call.call_id] = self.clock.time()
                await self._dispatch(ins.call)
            elif isinstance(ins, EngineCancel):
                await self._cancel_calls(ins.call_ids)
            elif isinstance(ins, Finished):
                self._finished(run, ins)

    def _finished(self, run: WorkflowRun, fin: Finished) -> None:
        self.store.finish_workflow(run.id, fin.state, fin.reason, self.clock.time())
        self.runs.pop(run.id, None)
        self._turns.pop(run.id, None)
        self._last_prompt.pop(run.id, None)
        if self.learner is not None:
            self.learner.sessions.forget(run.id)
        self.pending = collections.deque(c for c in self.pending if c.workflow_id != run.id)
        log.info("workflow %s %s%s", run.id, fin.state, f": {fin.reason}" if fin.reason else "")

    def _candidates(self, call: CallSpec) -> list[ReplicaView]:
        model = TOOL_MODEL if call.kind == "tool" else call.model
        return [
            r.view
            for r in self.replicas.values()
            if r.info_model == model and r.node in self.nodes and self.nodes.state(r.node) == "live"
        ]

    async def _dispatch(self, call: CallSpec) -> None:
        candidates = self._candidates(call)
        if not candidates:
            self.pending.append(call)
            return
        view = self.router.choose(call, candidates)
        rep = self.replicas[view.replica]
        device = self._device(rep)
        runtime = RuntimeAtDispatch(
            min(view.outstanding, view.concurrency), max(0, view.outstanding - view.concurrency)
        )
        turn = self._turns[call.workflow_id]
        kinds = self._input_kinds(call)
        share = _prefix_share(call.prompt, self._last_prompt.get(call.workflow_id, ""))
        self._last_prompt[call.workflow_id] = call.prompt
        pred, version = None, ""
        if self.learner is not None:
            query = Query(
                call.model,
                call.kind,
                call.prompt,
                self._estimate_tokens(call),
                call.max_tokens,
                self._workflow_name(call),
                turn,
                kinds,
                share,
                device.gpu,
                device.gpu_util,
                device.gpu_mem_frac,
                device.cpu_util,
                runtime.inflight,
                runtime.queue_depth,
                self.learner.sessions.context(call.workflow_id),
            )
            (pred,) = self.learner.forecast([query])
            version = self.learner.live.version
        f = _Inflight(
            call,
            rep.node,
            view.replica,
            self._ready_ts.pop(call.call_id, self.clock.time()),
            self.clock.time(),
            device,
            runtime,
            turn,
            kinds,
            share,
            pred,
            version,
        )
        self._turns[call.workflow_id] += 1
        self._inflight[call.call_id] = f
        rep.view = replace(rep.view, outstanding=rep.view.outstanding + 1)
        self.store.call_dispatched(call, rep.node, view.replica, f.dispatched_ts)
        msg = Dispatch(
            call.call_id,
            call.workflow_id,
            call.step_id,
            view.replica,
            call.kind,
            call.model,
            call.prompt,
            call.max_tokens,
            call.inputs,
            call.command,
            call.timeout_s,
        )
        if not await self._send(rep.node, msg):
            await self._done(
                call.call_id,
                CallDone(
                    call.call_id,
                    False,
                    "",
                    f"node {rep.node} unreachable",
                    view.replica,
                    infra=True,
                ),
                None,
            )

    async def retry_pending(self) -> None:
        waiting, self.pending = self.pending, collections.deque()
        for call in waiting:
            if call.workflow_id in self.runs:
                await self._dispatch(call)

    async def _cancel_calls(self, call_ids: list[str]) -> None:
        by_node: dict[str, list[str]] = collections.defaultdict(list)
        for call_id in call_ids:
            f = self._inflight.pop(call_id, None)
            if f is None:
                continue
            by_node[f.node].append(call_id)
            rep = self.replicas.get(f.replica)
            if rep is not None:
                rep.view = replace(rep.view, outstanding=max(0, rep.view.outstanding - 1))
        self.store.calls_cancelled(call_ids)
        for node, ids in by_node.items():
            await self._send(node, CancelCalls(ids))

    def _device(self, rep: _Replica) -> DeviceAtDispatch:
        tel: Telemetry | None = self.nodes.telemetry(rep.node)
        cpu = tel.host.cpu_percent / 100 if tel else 0.0
        device = rep.view.device
        if device.startswith("emulated:"):
            return DeviceAtDispatch(device.split(":", 1)[1], 0.0, 0.0, cpu)
        if device.startswith("cuda") and tel and tel.gpus:
            index = int(device.split(":")[1]) if ":" in device else 0
            gpu = next((g for g in tel.gpus if g.index == index), None)
            if gpu is not None:
                mem = (gpu.mem_used_bytes or 0) / gpu.mem_total_bytes if gpu.mem_total_bytes else 0
                return DeviceAtDispatch(gpu.name, (gpu.util_percent or 0) / 100, mem, cpu)
        return DeviceAtDispatch("cpu", 0.0, 0.0, cpu)

    # --- views ------------------------------------------------------------------------------

    def view(self, wf_id: str, detailed: bool) -> WorkflowView | None:
        row = self.store.workflow(wf_id)
        if row is None:
            return None
        run = self.runs.get(wf_id)
        spec = run.spec if run else _parse_quietly(row)
        calls = self.store.calls(wf_id)
        latest: dict[tuple[str, int | None], StepView] = {}
        for c in calls:
            label = c.step_id if c.idx is None else f"{c.step_id}[{c.idx}]"
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
            done = replay(wf_id, spec, self.store.outcomes(wf_id))
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

    def recent(self, limit: int) -> list[WorkflowView]:
        views = (self.view(r.id, detailed=False) for r in self.store.workflows(limit=limit))
        return [v for v in views if v is not None]


_OUTPUT_KIND = {"tool": "tool_result", "model": "model_output", "llm": "llm_output"}


def _prefix_share(prompt: str, previous: str) -> float:
    """Share of ``prompt`` that repeats the start of the session's previous prompt."""
    if not prompt or not previous:
        return 0.0
    n = next(
        (i for i, (a, b) in enumerate(zip(prompt, previous, strict=False)) if a != b),
        min(len(prompt), len(previous)),
    )
    return n / len(prompt)


def _order(item: tuple[tuple[str, int | None], StepView]) -> tuple[str, int]:
    (step, idx), _ = item
    return step, -1 if idx is None else idx


def _parse_quietly(row: WorkflowRow) -> WorkflowSpec | None:
    try:
        return parse_workflow(row.spec_text, row.source, row.overrides)
    except WorkflowError:
        return None
