"""A forecast of one call's latency as a distribution, given by a few quantiles.

Pure Python (no torch), because routers and scalers consume it in the scheduler's event loop and
in the simulator. Between the known levels the quantile function is interpolated linearly in
log-latency against the normal score of the level (exact for a lognormal, smooth elsewhere);
beyond the extreme levels it is extrapolated along the same line, so tail queries such as p99.9
stay finite and monotone.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

_NORMAL = NormalDist()
MIN_S = 1e-6
"""The floor put under latencies before taking logs."""
LOG_MIN_S = math.log(MIN_S)


@functools.lru_cache(maxsize=4096)
def _z(p: float) -> float:
    return _NORMAL.inv_cdf(min(max(p, 1e-9), 1 - 1e-9))


@functools.lru_cache(maxsize=256)
def _zs(levels: tuple[float, ...]) -> tuple[float, ...]:
    """Normal scores of a level grid: forecasts share a handful of grids."""
    return tuple(map(_z, levels))


def trusted_dists(
    levels: tuple[float, ...], rows: list[list[float]], logs: list[list[float]] | None = None
) -> list[LatencyDist]:
    """LatencyDists built without `LatencyDist`'s checks, which cost more than a forecast on the
    routing path: for callers whose levels and rows are already sorted (frozen dataclass fields
    written straight into the instance dict, a third faster than object.__setattr__). With
    ``logs`` (each value's log, floored at 1 us: a model that forecasts in log space has them),
    `LatencyDist.log_values` and the routers' fits read them instead of taking logs again."""
    new, out = object.__new__, []
    for k, row in enumerate(rows):
        d = new(LatencyDist)
        fields = d.__dict__
        fields["levels"] = levels
        fields["values_s"] = tuple(row)
        if logs is not None:
            fields["_logs"] = logs[k]
        out.append(d)
    return out


@dataclass(frozen=True)
class LatencyDist:
    levels: tuple[float, ...]
    """Increasing probability levels in (0, 1)."""
    values_s: tuple[float, ...]
    """Latency at each level, seconds; non-decreasing."""

    def __post_init__(self) -> None:
        if not self.levels or len(self.levels) != len(self.values_s):
            raise ValueError("levels and values_s must be non-empty and of equal length")
        if any(b <= a for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError(f"levels must increase: {self.levels}")
        if any(b < a for a, b in zip(self.values_s, self.values_s[1:], strict=False)):
            raise ValueError(f"quantiles must not decrease: {self.values_s}")

    @classmethod
    def point(cls, value_s: float, levels: tuple[float, ...]) -> LatencyDist:
        """All the mass at one value (a point forecast). Built without the checks, which are
        trivially true and cost more than the forecast itself on the simulator's hot path."""
        dist = object.__new__(cls)
        object.__setattr__(dist, "levels", levels)
        object.__setattr__(dist, "values_s", (value_s,) * len(levels))
        return dist

    @classmethod
    def lognormal(cls, median_s: float, sigma: float, levels: Sequence[float]) -> LatencyDist:
        mu = math.log(max(median_s, MIN_S))
        return cls(tuple(levels), tuple(math.exp(mu + sigma * _z(p)) for p in levels))

    def log_values(self) -> list[float]:
        """``log`` of each value (floored at 1 us), worked out once per forecast and kept
        beside the fields: a routed call's forecast is read at several levels and its CDF at
        the deadline, each of which needs them."""
        logs: list[float] | None = self.__dict__.get("_logs")
        if logs is None:
            logs = self.__dict__["_logs"] = [math.log(max(v, MIN_S)) for v in self.values_s]
        return logs

    def quantile(self, p: float) -> float:
        """Latency at level ``p`` (0 < p < 1)."""
        values = self.values_s
        if values[0] == values[-1]:  # one value (a point forecast): every quantile is it
            return values[0] if len(values) == 1 else max(values[0], MIN_S)
        known: dict[float, float] | None = self.__dict__.get("_quantiles")
        if known is None:
            known = self.__dict__["_quantiles"] = {}
        elif p in known:  # a pool's service mixture is read at the same levels at every call
            return known[p]
        zs = _zs(self.levels)
        logs = self.log_values()
        z = _z(p)
        i = bisect.bisect_left(zs, z)
        i = min(max(i, 1), len(zs) - 1)  # the segment to interpolate or extrapolate along
        z0, z1, l0, l1 = zs[i - 1], zs[i], logs[i - 1], logs[i]
        slope = max(0.0, (l1 - l0) / (z1 - z0))
        known[p] = out = math.exp(l0 + slope * (z - z0))
        return out

    def quantiles(self, ps: Sequence[float]) -> tuple[float, ...]:
        """`quantile` at each of ``ps``, the log-latencies taken once (the service mixture asks
        for five at every routed call)."""
        values = self.values_s
        if values[0] == values[-1]:
            return tuple(self.quantile(p) for p in ps)
        zs = _zs(self.levels)
        logs = self.log_values()
        last, out = len(zs) - 1, []
        for p in ps:
            z = _z(p)
            i = min(max(bisect.bisect_left(zs, z), 1), last)
            z0, l0 = zs[i - 1], logs[i - 1]
            out.append(math.exp(l0 + max(0.0, (logs[i] - l0) / (zs[i] - z0)) * (z - z0)))
        return tuple(out)

    def cdf(self, latency_s: float, tol: float = 1e-4) -> float:
        """P(latency <= latency_s), by bisection on the quantile function."""
        lo, hi = 1e-6, 1 - 1e-6
        if self.quantile(lo) >= latency_s:
            return 0.0
        if self.quantile(hi) <= latency_s:
            return 1.0
        while hi - lo > tol:
            mid = (lo + hi) / 2
            if self.quantile(mid) <= latency_s:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def mean(self, points: int = 200) -> float:
        """E[latency] = integral of the quantile function over (0, 1), midpoint rule."""
        return sum(self.quantile((i + 0.5) / points) for i in range(points)) / points

    def sample(self, rng: random.Random, n: int = 1) -> list[float]:
        """Draws by inverse transform."""
        return [self.quantile(rng.random()) for _ in range(n)]

    def scaled(self, factor: float) -> LatencyDist:
        return LatencyDist(self.levels, tuple(v * factor for v in self.values_s))

    def as_dict(self) -> dict[str, float]:
        """``{"0.5": s, ...}``: the JSON shape of `swarmx predictor predict`."""
        return {f"{p:g}": v for p, v in zip(self.levels, self.values_s, strict=True)}
