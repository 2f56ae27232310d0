"""How much time a workflow has to spare: the predicted remaining critical path of its DAG,
for the dispatcher's least-slack queue order and for deadline-aware routing.

A step's path is its own predicted duration plus the longest path among the steps that wait for
it. A plain step counts its median (or the quantile at ``level``). A step fanned out into N
parallel instances finishes with the slowest of them; with F the service distribution, F(max of
N draws) is Beta(N, 1) distributed with mean N/(N+1), so the quantile at N/(N+1) is the classic
estimate of the expected maximum. It grows with N as a straggler does (N=1 gives the median,
N=9 the p90, N=19 the p95), and costs one quantile, not a simulation. This assumes the instances
run at once (enough replicas); the scaler's job is to make that true.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from swarmx.models.dist import LatencyDist
from swarmx.workflow.spec import StepSpec, WorkflowSpec


def step_duration_s(service: LatencyDist, instances: int, level: float = 0.5) -> float:
    """Predicted duration of a step run as ``instances`` parallel calls: the quantile at
    ``level``, or at N/(N+1) for N instances where that is higher (a fan-out never counts less
    than one instance)."""
    if instances <= 0:  # a dynamic fan-out over nothing finishes at once
        return 0.0
    return service.quantile(max(level, instances / (instances + 1)))


def critical_paths(
    spec: WorkflowSpec,
    finished: Collection[str],
    service: Callable[[StepSpec], LatencyDist],
    fan_out: Callable[[StepSpec], int],
    level: float = 0.5,
) -> dict[str, float]:
    """For each unfinished step, the predicted time from its start to the end of the workflow,
    the step included.

    ``service``: the predicted service time of one instance of a step; ``fan_out``: its number
    of instances (1 for a plain step, the count for a fixed fan-out, a prediction for a dynamic
    one not expanded yet).
    """
    dependents = spec.dependents
    paths: dict[str, float] = {}
    for step in reversed(spec.steps):  # a topological order: dependents come first
        if step.id in finished:
            continue
        after_s = max((paths[d] for d in dependents[step.id] if d in paths), default=0.0)
        paths[step.id] = step_duration_s(service(step), fan_out(step), level) + after_s
    return paths


def finish_by_s(
    spec: WorkflowSpec, paths: dict[str, float], step_id: str, deadline_s: float
) -> float:
    """When ``step_id`` must finish for the rest of the workflow to make ``deadline_s``: the
    deadline less the longest predicted path among the unfinished steps that wait for it."""
    after_s = max((paths[d] for d in spec.dependents[step_id] if d in paths), default=0.0)
    return deadline_s - after_s


def slack_s(deadline_s: float, now_s: float, critical_path_s: float) -> float:
    """Time to spare if the remaining critical path started now (negative: predicted late)."""
    return deadline_s - now_s - critical_path_s
