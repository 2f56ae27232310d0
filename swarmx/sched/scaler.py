"""Scalers decide how many replicas each model should have. Pure code shared by the daemon and
the simulator: the caller describes each model's pool at ``now_s`` and carries out the targets
(the daemon sends `ScaleCommand`s to node agents; the simulator starts emulated replicas after
their start-up delay)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from swarmx.models.dist import LatencyDist
from swarmx.sched import tailmath
from swarmx.sched.dispatch import LOAD_BANDS


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
    risk: float | None = None
    """The mean predicted chance that the calls placed since the previous decision miss their
    deadlines, as forecast where they went (`Dispatcher.take_risk`); None: none had one."""
    service_by_load: Sequence[tuple[float, LatencyDist]] = ()
    """(occupancy, the typical service on replicas that full: the forecasts times what calls
    placed there actually took over theirs), by increasing occupancy
    (`Dispatcher.service_by_load`): how load slows calls down."""
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


class _Stabiliser:
    """Per model, the recommendations of the last ``window_s``: scaling up follows the newest at
    once, scaling down only to the highest of the window, so one quiet interval between bursts
    does not tear down replicas that take a while to come back (the HPA's stabilisation window).
    A model seen for the first time starts with its current count on record."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._history: dict[str, deque[tuple[float, int]]] = {}

    def target(self, pool: PoolState, now_s: float, wanted: int, floor: int = 0) -> int | None:
        """The new target for ``pool`` (ready + starting), or None to keep the current one;
        ``floor``: never scale down below it."""
        current = pool.ready + pool.starting
        history = self._history.setdefault(pool.model, deque([(now_s, current)]))
        history.append((now_s, wanted))
        while history[0][0] < now_s - self.window_s:
            history.popleft()
        if wanted > current:
            target = wanted
        else:
            target = max(min(current, max(n for _, n in history)), min(floor, current))
        target = min(max(target, pool.min_replicas), pool.max_replicas)
        return None if target == current else target


class ThresholdScaler:
    """Kubernetes HPA on utilisation: ``desired = ceil(ready * metric / target)`` with
    ``metric = (busy + waiting) / (ready * concurrency)``, left alone within ``tolerance`` of the
    target, scale-down stabilised over ``down_window_s``. The reactive baseline: it sees load
    only once it is there, and knows nothing of latency."""

    name = "threshold"

    def __init__(
        self, target: float = 0.7, tolerance: float = 0.1, down_window_s: float = 300.0
    ) -> None:
        if not 0 < target <= 1:
            raise ValueError(f"target utilisation must be in (0, 1], got {target}")
        self.target = target
        self.tolerance = tolerance
        self._stable = _Stabiliser(down_window_s)

    def decide(self, now_s: float, pools: Sequence[PoolState]) -> dict[str, int]:
        out: dict[str, int] = {}
        for pool in pools:
            target = self._stable.target(pool, now_s, self._wanted(pool))
            if target is not None:
                out[pool.model] = target
        return out

    def _wanted(self, pool: PoolState) -> int:
        current = pool.ready + pool.starting
        demand = pool.busy + pool.waiting
        if pool.ready == 0:  # no metric yet: start one replica for demand, as KEDA does from 0
            return max(current, 1) if demand > 0 else current
        ratio = demand / (pool.ready * pool.concurrency) / self.target
        if abs(ratio - 1) <= self.tolerance:
            return current
        return math.ceil(pool.ready * ratio - 1e-9)  # 2 * 2.5000000000000004 is 5 replicas


@dataclass
class _Holt:
    """Holt's linear (double exponential) smoothing of the arrival rate, trend per second; and
    the burstiness of arrivals (index of dispersion of the per-interval counts)."""

    rate: float
    trend: float = 0.0
    count_mean: float = 0.0
    count_var: float = 0.0

    def burstiness(self) -> float:
        """``Var(N) / E[N]`` of arrivals per interval: 1 for Poisson arrivals, about the mean
        burst size where calls come in bursts (fan-outs), as the arrival SCV of a GI/G/c."""
        if self.count_mean <= 0:
            return 1.0
        return min(max(self.count_var / self.count_mean, 1.0), _MAX_BURSTINESS)


class TailScaler:
    """The fewest replicas whose predicted tail latency of a call meets the budget.

    Arrival rate: Holt's linear smoothing of ``arrivals / interval_s`` (so a rising rate is
    extrapolated ``horizon_s`` ahead, about a replica's start-up), plus ``expected_calls``
    spread over ``horizon_s`` (fan-outs known or predicted but not submitted yet).

    Latency: the pool as a GI/G/c queue with ``c = n * concurrency`` servers. Erlang C gives the
    chance a call waits; Allen-Cunneen scales the wait by ``(ca2 + cs2) / 2`` (``cs2``: the
    service's squared coefficient of variation; ``ca2``: the arrivals', read off the dispersion
    of the arrival counts, large where fan-outs arrive in bursts) and it is exponential:
    ``P(W > w) = C e^(-theta w)``, ``theta = 2 (c / E[S] - lambda) / (ca2 + cs2)``. Calls beyond
    the slots now (``busy + waiting - c``) are a backlog a new call waits ``backlog E[S] / c``
    behind. S is the forecast at the occupancy n replicas would run at (batching servers serve
    each call slower the fuller they are; `service_at`), and
    ``P(W + S <= y) = (1 - C) F(y) + C E[F(y - W) | W > 0]``. The smallest n with
    ``P(latency <= headroom * budget) >= level`` and utilisation under ``cap`` wins; exact for
    M/M/c. Scaling down halves a pool at most per ``hysteresis_s``, on top of the hysteresis,
    and the pool keeps slots for the largest burst of calls in that window.

    Without a budget, the budget is ``no_budget_factor`` times the service's own tail.
    """

    name = "tail"

    def __init__(
        self,
        *,
        level: float = 0.95,
        headroom: float = 0.8,
        cap: float = 0.9,
        hysteresis_s: float = 120.0,
        horizon_s: float = 30.0,
        alpha: float = 0.5,
        beta: float = 0.3,
        no_budget_factor: float = 2.0,
        max_down: float = 0.5,
        risk_target: float = 0.002,
        risk_gain: float = 1.0,
        risk_alpha: float = 0.3,
    ) -> None:
        if not 0.5 < level < 1:
            raise ValueError(f"level must be in (0.5, 1), got {level}")
        if not 0 < cap < 1:
            raise ValueError(f"utilisation cap must be in (0, 1), got {cap}")
        self.level = level
        self.headroom = headroom
        self.cap = cap
        self.horizon_s = horizon_s
        self.alpha = alpha
        self.beta = beta
        self.no_budget_factor = no_budget_factor
        self.max_down = max_down
        """Share of its largest size over the hysteresis window a pool keeps at least."""
        if not 0 < risk_target < 1:
            raise ValueError(f"risk_target must be in (0, 1), got {risk_target}")
        self.risk_target = risk_target
        """The mean predicted chance of a call missing its deadline above which a pool grows
        (and at half of which it may shrink): a call's deadline is its workflow's less the
        predicted rest of the workflow, so a workflow of ten calls at 0.2% each misses its SLO
        about 1% of the time."""
        self.risk_gain = risk_gain
        self.risk_alpha = risk_alpha
        self._risk: dict[str, float] = {}
        self._counts: dict[str, deque[tuple[float, int]]] = {}
        self._bursts: dict[str, deque[tuple[float, int]]] = {}
        """Per model, the calls in hand (running and waiting) at each decision of the hysteresis
        window: fan-outs come in bursts, and a pool sized for the mean rate queues a burst for
        a replica start-up, so it keeps slots for the largest recent one (under ``cap``)."""
        self._stable = _Stabiliser(hysteresis_s)
        self._rates: dict[str, _Holt] = {}

    def decide(self, now_s: float, pools: Sequence[PoolState]) -> dict[str, int]:
        out: dict[str, int] = {}
        window = self._stable.window_s
        for pool in pools:
            rate = self.rate(pool)
            conc, demand = max(pool.concurrency, 1), pool.busy + pool.waiting
            floor = math.ceil(demand / conc)
            current = pool.ready + pool.starting
            peak = _windowed_max(self._counts, pool.model, now_s, window, current)
            floor = max(floor, math.ceil(peak * self.max_down))
            # calls arriving within one interval overlap for at most a service time of it
            mean_s = tailmath.moments(pool.service)[0] if pool.service is not None else 0.0
            overlap = min(1.0, mean_s / pool.interval_s) if pool.interval_s > 0 else 1.0
            together = max(demand, math.ceil(pool.arrivals * overlap))
            burst = _windowed_max(self._bursts, pool.model, now_s, window, together)
            wanted = max(self.needed(pool, rate), math.ceil(burst / (conc * self.cap)))
            risk = self._smoothed_risk(pool)
            if risk is not None and risk > self.risk_target / 2:
                floor = max(floor, current)  # tail risk near the target: no shrinking
                if risk > self.risk_target and pool.starting == 0 and current > 0:
                    step = min(1.0, self.risk_gain * (risk / self.risk_target - 1))
                    wanted = max(wanted, math.ceil(current * (1 + step)))
            target = self._stable.target(pool, now_s, min(wanted, pool.max_replicas), floor)
            if target is not None:
                out[pool.model] = target
        return out

    def _smoothed_risk(self, pool: PoolState) -> float | None:
        """The pool's predicted deadline-miss chance, smoothed over decisions (one interval's
        calls are few); an interval that placed no call with a deadline counts as no risk
        (nothing waited, nothing was late), so an idle pool can shrink."""
        old = self._risk.get(pool.model)
        if old is None and pool.risk is None:
            return None
        seen = pool.risk or 0.0
        new = seen if old is None else old + self.risk_alpha * (seen - old)
        self._risk[pool.model] = new
        return new

    def rate(self, pool: PoolState) -> float:
        """Update the model's smoothed arrival rate; the rate to provision for, calls/s."""
        holt = self._rates.get(pool.model)
        if pool.interval_s > 0:
            seen = pool.arrivals / pool.interval_s
            if holt is None:
                holt = self._rates[pool.model] = _Holt(seen, count_mean=pool.arrivals)
            else:
                gap = pool.arrivals - holt.count_mean
                holt.count_mean += _DISPERSION_ALPHA * gap
                holt.count_var = (1 - _DISPERSION_ALPHA) * (
                    holt.count_var + _DISPERSION_ALPHA * gap * gap
                )
                level = self.alpha * seen + (1 - self.alpha) * (
                    holt.rate + holt.trend * pool.interval_s
                )
                trend = (level - holt.rate) / pool.interval_s
                holt.trend = self.beta * trend + (1 - self.beta) * holt.trend
                holt.rate = level
        smoothed = 0.0 if holt is None else max(holt.rate, holt.rate + holt.trend * self.horizon_s)
        return max(smoothed, 0.0) + pool.expected_calls / self.horizon_s

    def needed(self, pool: PoolState, rate: float) -> int:
        """The fewest replicas meeting the budget at this arrival rate (calls/s)."""
        conc = max(pool.concurrency, 1)
        demand = pool.busy + pool.waiting
        if pool.service is None:  # no forecast yet: keep utilisation under the cap
            return math.ceil(demand / (conc * self.cap))
        if rate <= 0 and demand == 0:
            return 0
        # the service can get no faster than on the emptiest replicas: the budget's floor
        fastest = min(
            (d for _, d in pool.service_by_load),
            key=lambda d: tailmath.moments(d)[0],
            default=pool.service,
        )
        target = self._target(fastest, pool.budget_s)

        holt = self._rates.get(pool.model)
        ca2 = 1.0 if holt is None else holt.burstiness()

        def ok(n: int) -> bool:
            service = self.service_at(pool, rate, n)
            if service is None:  # fuller than any replica was seen: its speed is unknown
                return False
            return _Queue.of(service, target, ca2).meets(
                n * conc, rate, demand, self.level, self.cap
            )

        lo = max(1, math.ceil(rate * tailmath.moments(fastest)[0] / (conc * self.cap)))
        hi = lo
        while not ok(hi):  # met eventually: the target is above the service's own tail
            if hi >= pool.max_replicas:
                return pool.max_replicas
            lo, hi = hi + 1, min(hi * 2, pool.max_replicas)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        return hi

    @staticmethod
    def service_at(pool: PoolState, rate: float, replicas: int) -> LatencyDist | None:
        """The service forecast at the occupancy ``replicas`` would run at: by Little's law
        ``rate * E[S] / (replicas * concurrency)``, with E[S] itself read at that occupancy
        (two rounds of the fixed point; the band at or above it, so as not to flatter). None
        past the fullest band seen: how slow calls get there is unknown, so a pool is shrunk
        only as far as the evidence goes, and learns the next band on the way."""
        assert pool.service is not None
        bands = pool.service_by_load
        if not bands:
            return pool.service
        slots = replicas * max(pool.concurrency, 1)
        top = bands[-1][0] + 0.5 / LOAD_BANDS  # the fullest band's upper edge
        dist: LatencyDist | None = pool.service
        for _ in range(2):
            assert dist is not None
            occupancy = rate * tailmath.moments(dist)[0] / slots
            if occupancy > top and top < 1:
                return None
            dist = next((d for o, d in bands if o >= occupancy), bands[-1][1])
        return dist

    def _target(self, service: LatencyDist, budget_s: float | None) -> float:
        own_s = service.quantile(self.level)
        budget = self.no_budget_factor * own_s if budget_s is None else budget_s
        return max(self.headroom * budget, _MIN_WAIT_SHARE * own_s)


def _windowed_max(
    history: dict[str, deque[tuple[float, int]]],
    key: str,
    now_s: float,
    window_s: float,
    value: int,
) -> int:
    """Record ``value`` at ``now_s``; the largest recorded over the last ``window_s``."""
    kept = history.setdefault(key, deque())
    kept.append((now_s, value))
    while kept[0][0] < now_s - window_s:
        kept.popleft()
    return max(v for _, v in kept)


_MAX_BURSTINESS = 50.0
_DISPERSION_ALPHA = 0.1
"""Smoothing of the arrival counts' mean and variance: burstiness is a slow property."""
_MIN_WAIT_SHARE = 1.1
"""A budget the service alone (nearly) misses is raised to this multiple of the service's own
tail: scaling cannot shorten service, only remove waiting, and squeezing out the last few
percent of waiting would take without bound more replicas."""


def erlang_c(servers: int, load: float) -> float:
    """Probability that a call waits in an M/M/c queue with ``load = lambda / mu`` Erlangs,
    by the Erlang B recursion (stable for thousands of servers)."""
    if load <= 0:
        return 0.0
    if load >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1 - b))


@dataclass(frozen=True)
class _Queue:
    """The M/G/c latency model of one pool for one decision (see `TailScaler`)."""

    service: LatencyDist
    mean_s: float
    cs2: float
    """Squared coefficient of variation of the service time."""
    target_s: float
    ca2: float = 1.0
    """Squared coefficient of variation of the arrivals (1: Poisson)."""
    points: int = 64
    """Quadrature points over the wait."""

    @classmethod
    def of(cls, service: LatencyDist, target_s: float, ca2: float = 1.0) -> _Queue:
        mean, second = tailmath.moments(service)
        return cls(service, mean, max(second / (mean * mean) - 1, 0.0), target_s, ca2)

    def on_time(self, servers: int, rate: float, backlog: int) -> float:
        """``P(latency <= target_s)`` of a call arriving now at ``servers`` slots."""
        y = self.target_s - backlog * self.mean_s / servers
        if y <= 0:
            return 0.0
        service_ok = tailmath.cdf(self.service, y)
        wait = erlang_c(servers, rate * self.mean_s)
        if wait == 0:
            return service_ok
        theta = 2 * (servers / self.mean_s - rate) / (self.ca2 + self.cs2)
        # E[F(y - W) | W > 0], W ~ Exp(theta): substitute v = 1 - e^(-theta w) so the midpoint
        # rule needs no more points for short waits than for long ones
        span = -math.expm1(-theta * y)
        step = span / self.points
        waited = step * sum(
            tailmath.cdf(self.service, y + math.log1p(-(k + 0.5) * step) / theta)
            for k in range(self.points)
        )
        return (1 - wait) * service_ok + wait * waited

    def meets(self, servers: int, rate: float, demand: int, level: float, cap: float) -> bool:
        if servers <= 0:
            return rate <= 0 and demand == 0
        if rate * self.mean_s >= cap * servers:
            return False
        return self.on_time(servers, rate, max(demand - servers, 0)) >= level


SCALERS: dict[str, Callable[..., Scaler]] = {
    "none": NoScaler,
    "threshold": ThresholdScaler,
    "tail": TailScaler,
}
"""Scaler name -> constructor taking the scaler's options as keywords."""


def make_scaler(name: str, **options: Any) -> Scaler:
    factory = SCALERS.get(name)
    if factory is None:
        raise ValueError(f"unknown scaler {name!r} (known: {', '.join(SCALERS)})")
    return factory(**options)
