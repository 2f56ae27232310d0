"""Empirical statistics with one definition each, shared by the scheduler, the simulator, the
predictors and the benches (pure Python: routers and `swarmx top` use them on the event loop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def quantile(ordered: Sequence[float], p: float) -> float:
    """The ``p`` quantile of sorted values: the smallest value with a share of at least ``p`` of
    them at or below it (the inverse empirical CDF, numpy's ``inverted_cdf``). It minimises the
    pinball loss at ``p`` over the values and covers ``p`` of them, so a forecast, a figure in a
    table and a metric built from the same samples agree."""
    if not ordered:
        raise ValueError("the quantile of no values")
    i = math.ceil(p * len(ordered) - 1e-9) - 1
    return ordered[min(max(i, 0), len(ordered) - 1)]


def upper_quantile(ordered: Sequence[float], p: float) -> float:
    """The value at 0-based rank ``floor(p * n)``: `quantile` one rank up where ``p * n`` is
    whole, else the same. The scheduler reads its pools' service mixtures this way (the tail
    the slack queue and the scaler plan on); the simulator's decisions, and the figures in
    bench/RESULTS.md, rest on it."""
    if not ordered:
        raise ValueError("the quantile of no values")
    return ordered[min(len(ordered) - 1, max(0, int(p * len(ordered))))]


def conformal_quantile(ordered: Sequence[float], p: float) -> float:
    """The split-conformal quantile of sorted scores: the ``ceil((n + 1) p)``-th smallest (the
    largest when that is past the end), which covers ``p`` of a new exchangeable value."""
    if not ordered:
        raise ValueError("the quantile of no values")
    k = math.ceil(p * (len(ordered) + 1)) - 1
    return ordered[min(max(k, 0), len(ordered) - 1)]


def pinball(actual: float, predicted: float, level: float) -> float:
    """The pinball (quantile) loss of one forecast at ``level``: its mean over many calls is
    minimised by the true ``level`` quantile."""
    r = actual - predicted
    return max(level * r, (level - 1) * r)
