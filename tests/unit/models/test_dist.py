"""LatencyDist: reading several levels at once, and the values it keeps between reads, give
exactly what a fresh forecast would."""

import pytest

from swarmx.models.dist import LatencyDist
from swarmx.sched import tailmath

LEVELS = (0.1, 0.5, 0.9, 0.99)
PS = (0.01, 0.1, 0.3, 0.5, 0.7, 0.95, 0.999)  # below, between and beyond the known levels


def fresh() -> LatencyDist:
    return LatencyDist(LEVELS, (0.5, 1.0, 3.0, 9.0))


def test_quantiles_at_once_are_each_quantile():
    d = fresh()
    assert d.quantiles(PS) == pytest.approx([fresh().quantile(p) for p in PS], rel=1e-12)
    point = LatencyDist.point(2.0, LEVELS)
    assert point.quantiles(PS) == (2.0,) * len(PS)


def test_reads_kept_between_calls_change_no_answer_and_no_equality():
    d = fresh()
    first = [d.quantile(p) for p in PS]
    assert [d.quantile(p) for p in PS] == first  # now from what it kept
    assert tailmath.cdf(d, 3.0) == pytest.approx(0.9)
    assert tailmath.moments(d) == tailmath.moments(fresh())
    assert d == fresh() and hash(d) == hash(fresh())
    assert d.log_values() is d.log_values()
