"""One definition of each statistic: checked against their definitions by brute force."""

import random

import pytest

from swarmx.stats import conformal_quantile, pinball, quantile, upper_quantile


def test_quantile_is_the_inverse_empirical_cdf():
    rng = random.Random(0)
    for _ in range(200):
        xs = sorted(rng.uniform(0, 10) for _ in range(rng.randint(1, 40)))
        p = rng.choice([0.01, 0.1, 0.5, 0.9, 0.95, 0.99, rng.random()])
        q = quantile(xs, p)
        # the smallest value with a share >= p at or below it
        assert sum(x <= q for x in xs) >= p * len(xs) - 1e-9
        assert all(sum(y <= x for y in xs) < p * len(xs) - 1e-9 for x in xs if x < q)


def test_quantile_at_whole_ranks_and_the_ends():
    xs = [float(i) for i in range(1, 101)]
    assert quantile(xs, 0.99) == 99.0
    assert quantile(xs, 0.5) == 50.0
    assert quantile(xs, 0.0) == 1.0
    assert quantile(xs, 1.0) == 100.0
    with pytest.raises(ValueError, match="no values"):
        quantile([], 0.5)


def test_the_conformal_quantile_takes_one_rank_more():
    xs = [float(i) for i in range(1, 20)]  # n = 19: (n + 1) * 0.9 = 18
    assert conformal_quantile(xs, 0.9) == 18.0
    assert conformal_quantile(xs, 0.99) == 19.0  # capped at the largest


def test_pinball_weighs_under_and_over_forecasts_by_the_level():
    assert pinball(10.0, 8.0, 0.9) == pytest.approx(1.8)
    assert pinball(8.0, 10.0, 0.9) == pytest.approx(0.2)
    assert pinball(5.0, 5.0, 0.5) == 0.0


def test_the_upper_quantile_differs_only_at_whole_ranks():
    xs = [float(i) for i in range(1, 101)]
    assert upper_quantile(xs, 0.99) == 100.0  # quantile: 99
    assert upper_quantile(xs, 0.995) == quantile(xs, 0.995) == 100.0
    assert upper_quantile(xs, 0.123) == quantile(xs, 0.123) == 13.0
