"""Closed-form latency arithmetic for routers and scalers: lognormal fits of forecasts, the
residual service of a call already running, and sums of independent latencies by moment matching
(Fenton-Wilkinson).

Routers score every candidate replica for every call, so this avoids `LatencyDist.cdf` and
`LatencyDist.mean` (bisection, 200-point quadrature): a fit reads two quantiles straight off the
forecast's grid, and everything after it is a handful of ``exp``/``log``/``erfc`` calls. The
scaler's `cdf` and `moments` of a forecast are exact for `LatencyDist`'s own interpolation.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import NamedTuple

from swarmx.models.dist import LOG_MIN_S as _LOG_MIN_S
from swarmx.models.dist import MIN_S as _MIN_S
from swarmx.models.dist import LatencyDist

_NORMAL = NormalDist()
_LOG_HUGE_S = math.log(1e100)
"""The log of the largest mean latency routers reason with (`Moments.of`)."""
_SQRT1_2 = math.sqrt(0.5)
_ASYMPTOTIC_Z = 30.0
"""Past this the normal tail probability is taken from its asymptotic series (erfc underflows
near 38)."""


@functools.lru_cache(maxsize=1024)
def z_score(p: float) -> float:
    """Standard normal quantile, clamped as `LatencyDist` clamps levels."""
    return _NORMAL.inv_cdf(min(max(p, 1e-9), 1 - 1e-9))


def phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-z * _SQRT1_2)


@functools.lru_cache(maxsize=256)
def _grid(levels: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(z_score(p) for p in levels)


@functools.lru_cache(maxsize=1024)
def _weights(levels: tuple[float, ...], p: float) -> tuple[int, int, float]:
    """Where level ``p`` falls on a forecast's grid: ``log q(p) = (1 - w) log v[i] + w log v[k]``
    (`LatencyDist.quantile`: linear in log-latency against normal score, extrapolated along the
    end segments)."""
    if len(levels) == 1:
        return 0, 0, 0.0
    zs, z = _grid(levels), z_score(p)
    k = min(max(bisect.bisect_left(zs, z), 1), len(zs) - 1)
    w = (z - zs[k - 1]) / (zs[k] - zs[k - 1])
    if w == 1.0:
        return k, k, 0.0
    return k - 1, k, w


def _log_s(value_s: float) -> float:
    return math.log(value_s) if value_s > _MIN_S else _LOG_MIN_S


def log_quantile(dist: LatencyDist, p: float) -> float:
    """``log(dist.quantile(p))`` by the same interpolation, without recomputing the grid."""
    i, k, w = _weights(dist.levels, p)
    lo = _log_s(dist.values_s[i])
    return lo + w * (_log_s(dist.values_s[k]) - lo) if w else lo


def cdf(dist: LatencyDist, latency_s: float) -> float:
    """``dist.cdf(latency_s)`` exactly (no bisection): invert the log-linear interpolation."""
    x = math.log(max(latency_s, _MIN_S))
    logs = dist.log_values()
    if len(logs) == 1 or logs[0] == logs[-1]:
        return 1.0 if x >= logs[0] else 0.0
    zs = _grid(dist.levels)
    if x < logs[0]:
        j = 1  # below the grid: along the first segment, as the quantile extrapolates
    elif x >= logs[-1]:
        j = len(logs) - 1
    else:
        j = bisect.bisect_right(logs, x)  # logs[j - 1] <= x < logs[j]: a rising segment
    rise = logs[j] - logs[j - 1]
    if rise <= 0:  # a flat end segment: the quantile never leaves it
        return 0.0 if x < logs[0] else 1.0
    z = zs[j - 1] + (x - logs[j - 1]) * (zs[j] - zs[j - 1]) / rise
    return phi(z)


_Z_STEP = 0.05
_Z_GRID = tuple(-8.0 + _Z_STEP * k for k in range(401))
"""Normal scores -8..12: the moments' integrands ``e^(k log q(z)) phi(z)`` peak at ``k sigma``,
so the second moment is covered for sigma up to 4."""
_Z_WEIGHTS = tuple(
    _Z_STEP * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (0.5 if k in (0, 400) else 1.0)
    for k, z in enumerate(_Z_GRID)
)


def moments(dist: LatencyDist) -> tuple[float, float]:
    """``(E[L], E[L^2])`` of a forecast as `LatencyDist` defines it (log-latency piecewise
    linear in the normal score): the trapezoid rule over the normal score, accurate to about
    1e-6 where `LatencyDist.mean`'s midpoint rule in probability misses the tail."""
    logs = dist.log_values()
    if len(logs) == 1:
        return math.exp(logs[0]), math.exp(2 * logs[0])
    zs = _grid(dist.levels)
    first = second = 0.0
    j = 1
    for z, weight in zip(_Z_GRID, _Z_WEIGHTS, strict=True):
        while j < len(zs) - 1 and z > zs[j]:
            j += 1
        q = math.exp(logs[j - 1] + (logs[j] - logs[j - 1]) * (z - zs[j - 1]) / (zs[j] - zs[j - 1]))
        first += weight * q
        second += weight * q * q
    return first, second


class LogNormal(NamedTuple):
    """``log(L) ~ Normal(mu, sigma**2)``: the shape routers reason in (a tuple: routers make
    hundreds per decision)."""

    mu: float
    sigma: float

    @classmethod
    def from_moments(cls, mean_s: float, var_s2: float) -> LogNormal:
        """The lognormal with this mean and variance. Given the summed means and variances of
        independent latencies, the Fenton-Wilkinson approximation of their sum."""
        mean_s = max(mean_s, _MIN_S)
        s2 = math.log1p(var_s2 / (mean_s * mean_s)) if var_s2 > 0 else 0.0
        return cls(math.log(mean_s) - s2 / 2, math.sqrt(s2))

    @property
    def mean_s(self) -> float:
        return math.exp(self.mu + self.sigma * self.sigma / 2)

    @property
    def var_s2(self) -> float:
        s2 = self.sigma * self.sigma
        return math.expm1(s2) * math.exp(2 * self.mu + s2)

    def quantile(self, p: float) -> float:
        return math.exp(self.mu + self.sigma * z_score(p))

    def cdf(self, latency_s: float) -> float:
        if latency_s <= 0:
            return 0.0
        if self.sigma <= 0:
            return 1.0 if math.log(latency_s) >= self.mu else 0.0
        return phi((math.log(latency_s) - self.mu) / self.sigma)

    def dist(self, levels: Sequence[float]) -> LatencyDist:
        """As a forecast on the given levels."""
        return LatencyDist(tuple(levels), tuple(self.quantile(p) for p in levels))


@functools.lru_cache(maxsize=256)
def _fit_plan(levels: tuple[float, ...], hi: float) -> tuple[int, int, float, int, int, float]:
    """`_weights` of the median and of ``hi``, one cache lookup per fit."""
    return (*_weights(levels, 0.5), *_weights(levels, hi))


def fit(dist: LatencyDist, hi: float = 0.95) -> LogNormal:
    """The lognormal through the forecast's median and its quantile at level ``hi`` (> 0.5).

    Two points rather than a least-squares fit over all levels, so the quantile a router scores
    (``hi``) is exactly the forecast's own, and a fit costs a few logs.
    """
    return fit_many((dist,), hi)[0]


def fit_many(dists: Iterable[LatencyDist], hi: float = 0.95) -> list[LogNormal]:
    """`fit` of each forecast, in one loop (a router fits every candidate's forecast for every
    call: the per-call overhead is most of a fit's cost)."""
    if not hi > 0.5:
        raise ValueError(f"fit level must be above the median, got {hi}")
    z_hi, log, floor = z_score(hi), math.log, _MIN_S
    new = tuple.__new__  # a third of the namedtuple's own constructor's cost
    out: list[LogNormal] = []
    plan_of: tuple[float, ...] | None = None
    i = k = i_hi = k_hi = 0
    w = w_hi = 0.0
    for dist in dists:
        v = dist.values_s
        if v[0] == v[-1]:
            out.append(LogNormal(_log_s(v[0]), 0.0))
            continue
        if dist.levels is not plan_of:
            plan_of = dist.levels
            i, k, w, i_hi, k_hi, w_hi = _fit_plan(plan_of, hi)
        logs = dist.__dict__.get("_logs")
        if logs is not None:  # worked out with the forecast (`LatencyDist.log_values`)
            mu, top = logs[i], logs[i_hi]
            if w:
                mu += w * (logs[k] - mu)
            if w_hi:
                top += w_hi * (logs[k_hi] - top)
            out.append(new(LogNormal, (mu, (top - mu if top > mu else 0.0) / z_hi)))
            continue
        a, b, c, d = v[i], v[k], v[i_hi], v[k_hi]
        mu = log(a) if a > floor else _LOG_MIN_S
        if w:
            mu += w * ((log(b) if b > floor else _LOG_MIN_S) - mu)
        top = log(c) if c > floor else _LOG_MIN_S
        if w_hi:
            top += w_hi * ((log(d) if d > floor else _LOG_MIN_S) - top)
        out.append(LogNormal(mu, max(top - mu, 0.0) / z_hi))
    return out


def _log_tail(x: float) -> float:
    """``log P(Z > x)`` for a standard normal Z, past where erfc underflows."""
    r = 1 / (x * x)
    return -x * x / 2 - math.log(x * math.sqrt(2 * math.pi)) + math.log1p(-r + 3 * r * r)


class Moments(NamedTuple):
    """A lognormal with its mean and second moment worked out once: what a router keeps for
    each call in flight, whose residual it asks for at every decision."""

    ln: LogNormal
    mean_s: float
    second_s2: float
    """``E[L^2]``."""

    @classmethod
    def of(cls, ln: LogNormal) -> Moments:
        """Its moments, the mean at most 1e100 s and ``E[L^2]`` 1e200 s^2: a forecast whose
        spread is absurd (a broken model's, 1 s at the median and 1e30 s at p95) stands
        for a call that never ends instead of overflowing the routers' sums."""
        mu, s = ln
        return cls(ln, mean_of(ln), math.exp(min(2 * (mu + s * s), 2 * _LOG_HUGE_S)))

    @property
    def var_s2(self) -> float:
        return self.second_s2 - self.mean_s * self.mean_s


def mean_of(ln: LogNormal) -> float:
    """A lognormal's mean, at most 1e100 s (as `Moments.of`): one exp, where a router needs
    only the mean of each candidate's forecast."""
    mu, s = ln
    return math.exp(min(mu + s * s / 2, _LOG_HUGE_S))


def residuals(running: Iterable[tuple[Moments, float]]) -> tuple[float, float]:
    """Mean and variance of what is left of independent calls ``(service, elapsed_s)``, summed:
    for each, ``L - t`` given ``L > t`` with ``t = elapsed_s``. One loop, as routers ask for
    every call in flight on every candidate.

    With ``a = (ln t - mu) / s`` and ``Q(x) = P(Z > x)``: ``P(L > t) = Q(a)``,
    ``E[L; L > t] = E[L] Q(a - s)``, ``E[L^2; L > t] = E[L^2] Q(a - 2s)``. An overdue call's
    residual grows with its age (about ``s t / a``): a lognormal's tail is heavy, so a call far
    past its forecast is not nearly done.
    """
    erfc, log, c = math.erfc, math.log, _SQRT1_2
    mean = var = 0.0
    for ((mu, s), m_all, second), t in running:
        if t <= 0:  # not started: all of it is left
            mean += m_all
            var += second - m_all * m_all
            continue
        if s <= 0:  # a certain duration: what the forecast has left, if anything
            mean += m_all - t if m_all > t else 0.0
            continue
        a = (log(t) - mu) / s
        if a < _ASYMPTOTIC_Z:
            tail = erfc(a * c)
            m1 = m_all * erfc((a - s) * c) / tail
            m2 = second * erfc((a - 2 * s) * c) / tail
        else:
            log_tail = _log_tail(a)
            m1 = m_all * math.exp(_log_tail(a - s) - log_tail)
            m2 = second * math.exp(_log_tail(a - 2 * s) - log_tail)
        left, spread = m1 - t, m2 - m1 * m1
        mean += left if left > 0 else 0.0  # rounding only: m1 > t in exact arithmetic
        var += spread if spread > 0 else 0.0
    return mean, var
