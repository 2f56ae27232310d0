"""Scalers decide how many replicas each model should have. Pure code shared by the daemon and
the simulator: the caller describes each model's pool at ``now_s`` and carries out the targets
(the daemon sends `ScaleCommand`s to node agents; the simulator starts emulated replicas after
their start-up delay)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from swarmx.models.dist import LatencyDist


@dataclass(frozen=True)
class PoolState:
    """One model's replicas and demand, as seen at one scaling decision."""

    model: str
    ready: int
    """Replicas serving now."""
    starting: int
    """Replicas asked for that are not ready yet (start-up takes time)."""
    concurrency: int
    """Calls one replica runs at once."""
    busy: int
    """Calls running or waiting on replicas."""
    waiting: int
    """Calls in the scheduler's queue for this model (no replica had room)."""
    arrivals: int
    """Calls that arrived since the previous decision."""
    interval_s: float
    """Time since the previous decision."""
    service: LatencyDist | None
    """Predicted service time of a typical recent call (None before any forecast)."""
    budget_s: float | None
    """Tail latency target for this model's calls (from the workflows' SLOs), if any."""
    expected_calls: int = 0
    """Calls predicted to arrive soon from fan-outs already known or predicted."""
    min_replicas: int = 0
    max_replicas: int = 1 << 30


class Scaler(Protocol):
    name: str

    def decide(self, now_s: float, pools: Sequence[PoolState]) -> dict[str, int]:
        """Target replica count (ready + starting) per model, for the models whose count should
        change; models not named keep theirs."""
        ...


class NoScaler:
    """Fixed pools: the replicas the nodes were configured with."""

    name = "none"

    def decide(self, now_s: float, pools: Sequence[PoolState]) -> dict[str, int]:
        return {}
