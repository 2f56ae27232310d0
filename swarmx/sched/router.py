"""Routers choose the replica for each call. The interface is what the daemon and the simulator
call; policies differ only in how they rank candidates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from swarmx.workflow.engine import CallSpec


@dataclass(frozen=True)
class ReplicaView:
    """What a router may know about a candidate replica at decision time."""

    replica: str
    node: str
    model: str
    backend: str
    device: str
    concurrency: int
    outstanding: int
    """Calls the scheduler has sent to this replica that have not finished."""


class Router(Protocol):
    name: str

    def choose(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> ReplicaView:
        """Pick one of ``candidates`` (never empty; all serve the call's model)."""


def usable(call: CallSpec, candidates: Sequence[ReplicaView]) -> Sequence[ReplicaView]:
    """Candidates other than those this call already failed on, unless that leaves none."""
    fresh = [c for c in candidates if c.replica not in call.avoid]
    return fresh or candidates


class LeastOutstanding:
    """Fewest outstanding calls; ties go round-robin so equal replicas share the load."""

    name = "least_outstanding"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> ReplicaView:
        pool = usable(call, candidates)
        least = min(c.outstanding for c in pool)
        tied = sorted((c for c in pool if c.outstanding == least), key=lambda c: c.replica)
        self._turn += 1
        return tied[self._turn % len(tied)]
