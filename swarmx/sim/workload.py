"""What the simulator runs: workflows with their arrival times, and the truth about each call
(how many tokens it really outputs, how long a tool really takes), which policies never see."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmx.workflow.spec import WorkflowSpec


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


@dataclass(frozen=True)
class SimWorkflow:
    arrival_s: float
    spec: WorkflowSpec
    truth: dict[tuple[str, int | None], CallTruth]
    """Per (step id, fan-out index): the truth of that call (retries reuse it)."""
    release_s: dict[str, float] = field(default_factory=dict)
    """Per step id, the earliest start as an offset from ``arrival_s`` (trace replay: a call
    does not start before it was recorded to arrive, nor before its dependencies finish)."""
    name: str = ""
    """Workload class (``codegen``, ``azure-conv``, ...) for per-class results."""
