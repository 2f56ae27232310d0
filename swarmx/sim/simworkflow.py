"""What the simulator runs: workflows with their arrival times, and the truth about each call
(how many tokens it really outputs, how long a tool really takes), which policies never see;
the prompt blocks a replayed agent's calls share (`AgentBlocks`, `BlockChains`); and the
measures of a workload that generators and traces share (`critical_path_s`, `describe`)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from swarmx.backends.emulated import GPUS, ModelProfile, decode_step_s, prefill_s, vision_s
from swarmx.stats import quantile
from swarmx.workflow.spec import StepSpec, WorkflowSpec

LLM_MODEL = "llama-3-8b"
"""The emulated 8B profile (`swarmx.backends.emulated`): every generated LLM call, and replayed
calls that record no model."""
VISION_MODEL = "vit-l"
"""The emulated vision model (``vision_s``): OCR passes and diffusion-like renders."""


@dataclass(frozen=True)
class AgentBlocks:
    """The prompt blocks of a replayed agent's call, made up when it is submitted: a trace that
    records only how many leading blocks each call shares with its agent's previous one. Its
    ``total`` blocks are the previous call's first ``shared``, then fresh ones."""

    agent: str
    """Unique within its workflow."""
    total: int
    shared: int


@dataclass(frozen=True)
class CallTruth:
    """What only the world knows about one call instance, before it runs."""

    prompt_tokens: int
    """Visible to policies (known before the call runs)."""
    output_tokens: int = 1
    """llm: tokens the call really generates (hidden from policies)."""
    work_s: float = 0.0
    """tool: CPU seconds the run takes alone on a core (hidden)."""
    output: str = ""
    """Text the workflow engine sees as the step's output; a dynamic fan-out's source step lists
    one item per line here, which is how the agent's call structure depends on the prompt."""
    prefix_blocks: tuple[int, ...] = ()
    """The prompt's prefix-cache block ids where the workload records them (Mooncake's hash ids,
    a trace's ``prefix_blocks``): visible to policies, as the prompt is. Otherwise the
    simulator hashes the prompt text (`swarmx.sched.prefix.block_hashes`)."""
    block_tokens: int = 0
    """Tokens per block of ``prefix_blocks`` or ``agent_blocks``."""
    agent_blocks: AgentBlocks | None = None
    """Blocks made up at submission instead (`BlockChains`)."""


Truth = dict[tuple[str, int | None], CallTruth]
"""A workflow's calls by (step id, fan-out index)."""


@dataclass(frozen=True)
class SimWorkflow:
    arrival_s: float
    spec: WorkflowSpec
    truth: Truth
    """Per (step id, fan-out index): the truth of that call (retries reuse it)."""
    release_s: dict[str, float] = field(default_factory=dict)
    """Per step id, the earliest start as an offset from ``arrival_s`` (trace replay: a call
    does not start before it was recorded to arrive, nor before its dependencies finish)."""
    name: str = ""
    """Workload class (``codegen``, ``azure-conv``, ...) for per-class results."""
    think_s: dict[str, float] = field(default_factory=dict)
    """Per step id, how long after its dependencies finish the call is released (a replayed
    agent's think and tool time between its calls)."""


class BlockChains:
    """Makes up the blocks of `AgentBlocks` calls as they are submitted, from their agent's
    previous call's: only each running agent's last list is held (a long session's calls
    carry over a thousand blocks each). Fresh ids are unique across agents and workflows."""

    def __init__(self) -> None:
        self._last: dict[str, dict[str, list[int]]] = {}
        """workflow id -> agent -> the blocks of its last call."""
        self._fresh = itertools.count()

    def blocks(self, workflow_id: str, made: AgentBlocks) -> list[int]:
        agents = self._last.setdefault(workflow_id, {})
        prev = agents.get(made.agent, [])
        shared = min(made.shared, made.total, len(prev))
        out = prev[:shared]
        out.extend(itertools.islice(self._fresh, made.total - shared))
        agents[made.agent] = out
        return out

    def forget(self, workflow_id: str) -> None:
        """The workflow ended: its agents' blocks are no longer needed."""
        self._last.pop(workflow_id, None)


# --- unloaded critical path -------------------------------------------------------------------


def call_s(step: StepSpec, truth: CallTruth, gpu: str = "A100") -> float:
    """Service time of one call alone on an idle replica of the emulated model (tools: on an
    idle core): prefill, then one decode step per output token at the growing context."""
    if step.kind == "tool":
        return truth.work_s
    profile = GPUS[gpu]
    if step.kind == "model":
        return vision_s(
            profile, int(step.inputs.get("image_px", "224")), int(step.inputs.get("steps", "1"))
        )
    model = ModelProfile()
    out = max(1, truth.output_tokens)
    # a lone sequence is bandwidth-bound, so a step's time is linear in its context: the mean
    # step is the step at the mean context
    mean_ctx = truth.prompt_tokens + (out - 1) / 2
    return prefill_s(profile, model, truth.prompt_tokens) + out * decode_step_s(
        profile, model, [round(mean_ctx)]
    )


def critical_path_s(wf: SimWorkflow, gpu: str = "A100") -> float:
    """The workflow's makespan with every call alone on its own idle replica: the least it
    can take on any cluster of that GPU (release and think times of replayed traces included)."""
    finish: dict[str, float] = {}
    by_step: dict[str, list[CallTruth]] = {}
    for (step_id, _), t in wf.truth.items():
        by_step.setdefault(step_id, []).append(t)
    for step in wf.spec.steps:  # topological order
        ready = max((finish[d] for d in step.after), default=0.0) + wf.think_s.get(step.id, 0.0)
        start = max(wf.release_s.get(step.id, 0.0), ready)
        truths = by_step.get(step.id, [])
        finish[step.id] = start + max((call_s(step, t, gpu) for t in truths), default=0.0)
    return max(finish.values(), default=0.0)


# --- summary ----------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {
        "p50": quantile(s, 0.5),
        "p90": quantile(s, 0.9),
        "p99": quantile(s, 0.99),
        "max": s[-1],
        "mean": sum(s) / len(s),
    }


def describe(workflows: Sequence[SimWorkflow]) -> dict[str, Any]:
    """A small JSON-able summary: counts by class, kind and model, fan-out, token and tool-time
    percentiles (``p50``, ``p90``, ``p99``, ``max``, ``mean``), arrival span and rate."""
    kinds: Counter[str] = Counter()
    models: Counter[str] = Counter()
    classes: Counter[str] = Counter()
    prompt: list[float] = []
    output: list[float] = []
    work: list[float] = []
    fanned: list[int] = []
    for wf in workflows:
        classes[wf.name or wf.spec.name] += 1
        steps = {s.id: s for s in wf.spec.steps}
        per_step: Counter[str] = Counter()
        for (sid, _), t in wf.truth.items():
            step = steps[sid]
            per_step[sid] += 1
            kinds[step.kind] += 1
            models[step.model or "(tool)"] += 1
            if step.kind == "llm":
                prompt.append(t.prompt_tokens)
                output.append(t.output_tokens)
            elif step.kind == "tool":
                work.append(t.work_s)
        fanned.extend(per_step[s.id] for s in wf.spec.steps if s.fan_out is not None)
    arrivals = [wf.arrival_s for wf in workflows]
    span = max(arrivals) - min(arrivals) if arrivals else 0.0
    calls = sum(kinds.values())
    return {
        "workflows": len(workflows),
        "classes": dict(sorted(classes.items())),
        "calls": calls,
        "calls_per_workflow": calls / len(workflows) if workflows else 0.0,
        "calls_by_kind": dict(sorted(kinds.items())),
        "calls_by_model": dict(sorted(models.items())),
        "mean_fan_out": sum(fanned) / len(fanned) if fanned else None,
        "arrival_span_s": span,
        "rate_per_s": (len(arrivals) - 1) / span if span > 0 else None,
        "prompt_tokens": _percentiles(prompt),
        "output_tokens": _percentiles(output),
        "tool_work_s": _percentiles(work),
    }
