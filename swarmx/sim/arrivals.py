"""Arrival times of generated workflows: a two-state Markov-modulated Poisson process, because
agent traffic comes in bursts (docs/simulator.md, "Arrivals")."""

from __future__ import annotations

import math
import random

BURST_RATE_X = 2.5
"""Arrival rate during a burst, as a multiple of the mean rate."""
CALM_RATE_X = 0.625
"""Arrival rate between bursts: with bursts 20% of the time the mean is exactly 1x."""
BURST_GAPS = 8.0
"""Mean burst length, in mean inter-arrival gaps (``1 / rate``): about 20 arrivals per burst."""
CALM_GAPS = 32.0
"""Mean calm period, in mean inter-arrival gaps: about 20 arrivals, so bursts cover 20% of
the time and a calm-burst cycle brings about 40 workflows."""


def arrival_times(n: int, rate_per_s: float, rng: random.Random) -> list[float]:
    """``n`` arrival times (s, from 0) of a two-state Markov-modulated Poisson process whose
    long-run rate is ``rate_per_s``: exponential calm and burst periods (means `CALM_GAPS` and
    `BURST_GAPS` mean gaps), Poisson arrivals at `CALM_RATE_X` or `BURST_RATE_X` times the rate
    within them. Durations scale with ``1 / rate`` so a burst's shape (arrivals per burst, peak
    to mean) is the same at every load."""
    if not rate_per_s > 0 or math.isinf(rate_per_s):
        raise ValueError(f"rate_per_s must be a positive finite number, got {rate_per_s}")
    gap = 1.0 / rate_per_s
    burst_share = BURST_GAPS / (BURST_GAPS + CALM_GAPS)
    burst = rng.random() < burst_share
    rates = (rate_per_s * CALM_RATE_X, rate_per_s * BURST_RATE_X)
    means = (CALM_GAPS * gap, BURST_GAPS * gap)
    t = 0.0
    end = rng.expovariate(1.0 / means[burst])
    out: list[float] = []
    while len(out) < n:
        nxt = t + rng.expovariate(rates[burst])
        if nxt >= end:  # memoryless: restarting the clock at the switch is exact
            t, burst = end, not burst
            end = t + rng.expovariate(1.0 / means[burst])
            continue
        t = nxt
        out.append(t)
    return out
