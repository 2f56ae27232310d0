"""Arrivals come at the asked rate, in bursts."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

from swarmx.sim.arrivals import arrival_times
from swarmx.sim.generators import generate


def test_arrival_rate_and_bursts() -> None:
    times = arrival_times(100_000, 5.0, random.Random(1))
    assert (len(times) - 1) / (times[-1] - times[0]) == pytest.approx(5.0, rel=0.03)
    # bursty: counts per 2 s window (10 mean gaps) vary far more than Poisson's (variance = mean)
    per: Counter[int] = Counter(int(t // 2.0) for t in times)
    counts = [per.get(i, 0) for i in range(int(times[-1] // 2.0))]
    assert statistics.pvariance(counts) / statistics.mean(counts) > 2.5
    wfs = generate("research", workflows=3000, rate_per_s=4.0, seed=2)
    span = wfs[-1].arrival_s - wfs[0].arrival_s
    assert (len(wfs) - 1) / span == pytest.approx(4.0, rel=0.1)
