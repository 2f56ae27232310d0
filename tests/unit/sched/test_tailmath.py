"""tailmath: the closed forms agree with `LatencyDist` and with Monte Carlo (seeded)."""

import math
import random
import statistics

import pytest

from swarmx.models.dist import LatencyDist
from swarmx.sched.tailmath import (
    LogNormal,
    Moments,
    cdf,
    fit,
    log_quantile,
    moments,
    residuals,
)

LEVELS = (0.5, 0.9, 0.95, 0.99)
SKEWED = LatencyDist((0.1, 0.5, 0.9, 0.95, 0.99), (0.4, 1.0, 2.5, 3.3, 6.0))
"""Not a lognormal: the slope in log-latency changes between levels."""


def residual(m: Moments, elapsed_s: float) -> tuple[float, float]:
    return residuals([(m, elapsed_s)])


def draws(ln: LogNormal, n: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(ln.mu, ln.sigma) for _ in range(n)]


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("p", [0.001, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.93, 0.95, 0.99, 0.999])
def test_log_quantile_is_the_dists_own_interpolation(p):
    assert math.exp(log_quantile(SKEWED, p)) == pytest.approx(SKEWED.quantile(p), rel=1e-12)


@pytest.mark.parametrize("x", [0.05, 0.4, 0.7, 1.0, 2.0, 3.3, 5.0, 6.0, 20.0])
def test_cdf_inverts_the_quantile_without_bisection(x):
    p = cdf(SKEWED, x)
    assert p == pytest.approx(SKEWED.cdf(x), abs=2e-4)  # the dist's own bisection tolerance
    assert SKEWED.quantile(p) == pytest.approx(x, rel=1e-6)


def test_cdf_of_degenerate_forecasts_is_a_step():
    point = LatencyDist((0.5,), (2.0,))
    assert (cdf(point, 1.9), cdf(point, 2.0)) == (0.0, 1.0)
    flat_top = LatencyDist((0.5, 0.9, 0.99), (1.0, 2.0, 2.0))
    assert cdf(flat_top, 2.5) == 1.0
    assert 0.5 < cdf(flat_top, 1.5) < 0.9


def test_fit_is_exact_for_a_lognormal_and_keeps_the_scored_quantile():
    ln = fit(LatencyDist.lognormal(2.0, 0.7, LEVELS))
    assert ln.mu == pytest.approx(math.log(2.0))
    assert ln.sigma == pytest.approx(0.7)
    skewed = fit(SKEWED, hi=0.99)
    assert skewed.quantile(0.5) == pytest.approx(1.0)
    assert skewed.quantile(0.99) == pytest.approx(6.0)
    assert fit(LatencyDist((0.9,), (3.0,))) == LogNormal(math.log(3.0), 0.0)
    with pytest.raises(ValueError, match="above the median"):
        fit(SKEWED, hi=0.5)


def test_lognormal_moments_match_monte_carlo():
    ln = LogNormal(math.log(1.5), 0.8)
    xs = draws(ln, 200_000)
    assert close(ln.mean_s, statistics.fmean(xs), 0.01)
    assert close(ln.var_s2, statistics.pvariance(xs), 0.05)
    assert close(ln.quantile(0.95), sorted(xs)[int(0.95 * len(xs))], 0.02)
    assert ln.cdf(ln.quantile(0.8)) == pytest.approx(0.8)
    back = LogNormal.from_moments(ln.mean_s, ln.var_s2)
    assert back.mu == pytest.approx(ln.mu)
    assert back.sigma == pytest.approx(ln.sigma)


@pytest.mark.parametrize(
    ("median_s", "sigma", "elapsed_s"),
    [
        (2.0, 0.6, 0.5),  # early: most of the call is left
        (2.0, 0.6, 3.0),  # past the median
        (2.0, 0.6, 6.0),  # past the p95: overdue
        (1.0, 1.2, 4.0),  # heavy tail
    ],
)
def test_residual_matches_monte_carlo(median_s, sigma, elapsed_s):
    ln = LogNormal(math.log(median_s), sigma)
    left = [x - elapsed_s for x in draws(ln, 400_000) if x > elapsed_s]
    assert len(left) > 5000
    mean, var = residual(Moments.of(ln), elapsed_s)
    assert close(mean, statistics.fmean(left), 0.03)
    assert close(var, statistics.pvariance(left), 0.1)


def test_residual_of_a_call_not_started_is_its_whole_service():
    m = Moments.of(LogNormal(0.3, 0.5))
    assert residual(m, 0.0) == pytest.approx((m.mean_s, m.var_s2))
    assert residual(m, -1.0) == pytest.approx((m.mean_s, m.var_s2))


def test_an_absurd_forecast_has_huge_finite_moments_not_an_overflow():
    """1 s at the median, 1e30 s at p95 (sigma 42): its mean would overflow a float; it stands
    for a call that never ends, and what is left of it stays finite at any age."""
    m = Moments.of(fit(LatencyDist(LEVELS, (1.0, 1e30, 1e30, 1e30))))
    assert m.mean_s == pytest.approx(1e100) and m.second_s2 == pytest.approx(1e200)
    for age in (0.0, 1.0, 1e6):
        mean, var = residual(m, age)
        assert math.isfinite(mean) and mean > 1e90 and math.isfinite(var)
    usual = LogNormal(0.3, 0.5)
    assert Moments.of(usual).mean_s == math.exp(0.3 + 0.125)  # untouched below the cap


def test_residual_of_an_overdue_call_grows_with_its_age_smoothly():
    ln = LogNormal(0.0, 0.5)
    m = Moments.of(ln)
    ages = [math.exp(0.5 * a) for a in (2, 10, 29.99, 30.01, 60)]  # 30 sigmas: the series
    means = [residual(m, t)[0] for t in ages]
    assert means == sorted(means)
    below, above = means[2], means[3]
    assert above == pytest.approx(below, rel=0.01)  # no jump where the formula switches
    assert means[-1] == pytest.approx(0.5 * ages[-1] / 60, rel=0.02)  # about sigma t / a


def test_deterministic_service_leaves_what_the_forecast_left():
    m = Moments.of(LogNormal(math.log(3.0), 0.0))
    assert residual(m, 1.0) == pytest.approx((2.0, 0.0))
    assert residual(m, 5.0) == (0.0, 0.0)


def test_residuals_sum_over_calls():
    a, b = Moments.of(LogNormal(0.0, 0.5)), Moments.of(LogNormal(1.0, 0.3))
    total = residuals([(a, 0.7), (b, 2.0)])
    parts = [residual(a, 0.7), residual(b, 2.0)]
    assert total == pytest.approx((parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]))


def test_fenton_wilkinson_sum_matches_monte_carlo():
    parts = [LogNormal(math.log(1.0), 0.5), LogNormal(math.log(2.0), 0.3), LogNormal(0.0, 0.8)]
    rngs = [draws(ln, 100_000, seed=i) for i, ln in enumerate(parts)]
    sums = sorted(map(sum, zip(*rngs, strict=True)))
    total = LogNormal.from_moments(sum(ln.mean_s for ln in parts), sum(ln.var_s2 for ln in parts))
    assert close(total.mean_s, statistics.fmean(sums), 0.01)
    assert close(total.quantile(0.5), sums[len(sums) // 2], 0.03)
    assert close(total.quantile(0.95), sums[int(0.95 * len(sums))], 0.03)


def test_moments_of_a_forecast_match_sampling_it():
    exact = moments(LatencyDist.lognormal(2.0, 1.0, LEVELS))
    assert exact == pytest.approx((2 * math.exp(0.5), 4 * math.exp(2.0)), rel=1e-5)
    xs = SKEWED.sample(random.Random(3), 60_000)
    mean, second = moments(SKEWED)
    assert close(mean, statistics.fmean(xs), 0.02)
    assert close(second, statistics.fmean(x * x for x in xs), 0.08)
    assert moments(LatencyDist((0.5,), (2.0,))) == (2.0, 4.0)
