"""What the scheduler holds at most and until when, and what it refused or repaired: its
capacity and each client's quota (refusals at submit), the hard deadlines of calls and
workflows, and the fault counters the metrics show (docs/reliability.md)."""

from __future__ import annotations

import collections
import dataclasses
import heapq
from dataclasses import dataclass

from swarmx.workflow.spec import WorkflowError


class QuotaExceeded(WorkflowError):
    """The submitting client already has as many unfinished workflows as it may."""


class Overloaded(WorkflowError):
    """The scheduler holds as many unfinished workflows or queued calls as it may."""


@dataclass
class Faults:
    """What the scheduler refused or repaired, for the metrics (docs/reliability.md)."""

    results_dropped: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    """Results not applied, by reason: ``late`` (the call was re-run, cancelled or its result
    is in already), ``fenced`` (from a node the call no longer belongs to)."""
    fenced_calls: int = 0
    """Calls a node still ran after they were given to another node (cancelled there)."""
    overloaded: int = 0
    """Submissions refused at the scheduler's capacity."""
    adopted: int = 0
    """Calls a node reported running after a restart, taken over instead of re-run."""


@dataclass(frozen=True)
class Capacity:
    """What the scheduler holds at most, and how it resumes (`[scheduler]` in the config)."""

    max_workflows: int = 10_000
    max_queued_calls: int = 100_000
    recovery_grace_s: float = 5.0


DEFAULT_CAPACITY = Capacity()


class Deadlines:
    """Keys due at given times, found without a scan: a heap with lazy deletion. A key dropped
    or re-added leaves a stale entry, skipped when it comes up; the heap is rebuilt when stale
    entries outnumber live ones, so it stays within twice the live keys."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._at: dict[str, float] = {}

    def add(self, key: str, at: float) -> None:
        self._at[key] = at
        heapq.heappush(self._heap, (at, key))
        if len(self._heap) > 2 * len(self._at) + 64:
            self._heap = [(t, k) for k, t in self._at.items()]
            heapq.heapify(self._heap)

    def drop(self, key: str) -> None:
        self._at.pop(key, None)

    def due(self, now: float) -> list[str]:
        """The keys due by ``now``, earliest first; they are dropped."""
        out: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            at, key = heapq.heappop(self._heap)
            if self._at.get(key) == at:
                del self._at[key]
                out.append(key)
        return out
