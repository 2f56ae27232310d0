"""Scalers decide how many replicas each model should have. Pure code shared by the daemon and
the simulator: the caller describes each model's pool at ``now_s`` and carries out the targets
(the daemon sends `ScaleCommand`s to node agents; the simulator starts emulated replicas after
their start-up delay)."""

from __future__ import annotations

import abc
import dataclasses
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from swarmx.models.dist import LatencyDist
from swarmx.sched import tailmath
from swarmx.sched.dispatch import LOAD_BANDS
from swarmx.schema import SchemaError, decode
from swarmx.stats import quantile


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
    lead_s: float | None = None
    """How long a replica asked for now takes to serve: a high quantile of the measured
    start-ups, else the configured prior (`lead_time_s`); None: unknown."""


MIN_WARMUPS = 3
"""Measured start-ups that replace the configured prior: one or two say little of the tail."""


def lead_time_s(warmups_s: Sequence[float], prior_s: float, level: float = 0.9) -> float | None:
    """How long a replica asked for now takes to serve: the ``level`` quantile of the measured
    start-ups once there are `MIN_WARMUPS` (a high one: a scale-up planned on the typical
    start-up comes late half the time), else the configured start-up ``prior_s`` if set, else
    None (unknown)."""
    if len(warmups_s) >= MIN_WARMUPS:
        return quantile(sorted(warmups_s), level)
    return prior_s if prior_s > 0 else None


class Scaler(Protocol):
    name: str

    def decide(self, now_s: float, pools: Sequence[PoolState]) -> dict[str, int]:
        """Target replica count (ready + starting) per model, for the models whose count should
        change; models not named keep theirs."""
        ...


def _option(default: float, within: str) -> float:
    """A numeric option and the interval it must lie in, written as in maths (``"(0, 1]"``,
    ``"[0, inf)"``), checked by `ScalerOptions` on construction."""
    return dataclasses.field(default=default, metadata={"within": within})


def _outside(value: float, within: str) -> str | None:
    """Why ``value`` is not in the interval ``within``; None if it is (NaN never is)."""
    lo_text, hi_text = within[1:-1].split(", ")
    lo, hi = float(lo_text), float(hi_text)
    above = value > lo if within[0] == "(" else value >= lo
    below = value < hi if within[-1] == ")" else value <= hi
    if above and below:
        return None
    if hi == math.inf:
        return f"must be {'>' if within[0] == '(' else '>='} {lo_text}, got {value}"
    return f"must be in {within}, got {value}"


@dataclass(frozen=True)
class ScalerOptions(abc.ABC):
    """The ``[scaler] options`` of one policy, typed. Each policy declares a frozen dataclass of
    its options next to it, so loading the config rejects an unknown key, a wrong type or a value
    out of range (a `SchemaError` naming the field), where otherwise the scaler would fail at
    every decision."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            within = f.metadata.get("within")
            problem = _outside(getattr(self, f.name), within) if within else None
            if problem is not None:
                raise SchemaError(f.name, problem)

    @abc.abstractmethod
    def build(self) -> Scaler:
        """A new scaler of this policy with these options."""


@dataclass(frozen=True)
class NoOptions(ScalerOptions):
    """The ``none`` policy has no options."""

    def build(self) -> NoScaler:
        return NoScaler()


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


@dataclass(frozen=True)
class ThresholdOptions(ScalerOptions):
    """Options of the ``threshold`` policy (`ThresholdScaler`)."""

    target: float = _option(0.7, "(0, 1]")
    """Utilisation to hold."""
    tolerance: float = _option(0.1, "[0, inf)")
    """Relative distance from ``target`` left alone."""
    down_window_s: float = _option(300.0, "[0, inf)")
    """Scale-down stabilisation window."""

    def build(self) -> ThresholdScaler:
        return ThresholdScaler(self)


class ThresholdScaler:
    """Kubernetes HPA on utilisation: ``desired = ceil(ready * metric / target)`` with
    ``metric = (busy + waiting) / (ready * concurrency)``, left alone within ``tolerance`` of the
    target, scale-down stabilised over ``down_window_s``. The reactive baseline: it sees load
    only once it is there, and knows nothing of latency."""

    name = "threshold"

    def __init__(self, options: ThresholdOptions = ThresholdOptions()) -> None:
        self.options = options
        self._stable = _Stabiliser(options.down_window_s)

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
        ratio = demand / (pool.ready * pool.concurrency) / self.options.target
        if abs(ratio - 1) <= self.options.tolerance:
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


@dataclass(frozen=True)
class TailOptions(ScalerOptions):
    """Options of the ``tail`` policy (`TailScaler`)."""

    level: float = _option(0.95, "(0.5, 1)")
    """The quantile of a call's latency that must meet the budget."""
    headroom: float = _option(0.8, "(0, inf)")
    """Share of the budget aimed at."""
    cap: float = _option(0.9, "(0, 1)")
    """Most utilisation of a pool's slots."""
    hysteresis_s: float = _option(120.0, "[0, inf)")
    """Scale-down stabilisation window."""
    horizon_s: float = _option(30.0, "(0, inf)")
    """How far ahead the arrival rate's trend is provisioned for where a pool's start-up time is
    unknown (`PoolState.lead_s`): about a replica's start-up; and the window the expected
    fan-out calls are spread over."""
    alpha: float = _option(0.5, "(0, 1]")
    """Holt smoothing of the arrival rate's level."""
    beta: float = _option(0.3, "[0, 1]")
    """Holt smoothing of the arrival rate's trend."""
    no_budget_factor: float = _option(2.0, "(0, inf)")
    """Without a budget, the budget is this multiple of the service's own tail."""
    max_down: float = _option(0.5, "[0, 1]")
    """Share of its largest size over the hysteresis window a pool keeps at least."""
    risk_target: float = _option(0.002, "(0, 1)")
    """The mean predicted chance of a call missing its deadline above which a pool grows
    (and at half of which it may shrink): a call's deadline is its workflow's less the
    predicted rest of the workflow, so a workflow of ten calls at 0.2% each misses its SLO
    about 1% of the time."""
    risk_gain: float = _option(1.0, "[0, inf)")
    """Growth of a pool per unit of risk over ``risk_target``, as a share of its size."""
    risk_alpha: float = _option(0.3, "(0, 1]")
    """Smoothing of the risk over decisions."""

    def build(self) -> TailScaler:
        return TailScaler(self)


class TailScaler:
    """The fewest replicas whose predicted tail latency of a call meets the budget.

    Arrival rate: Holt's linear smoothing of ``arrivals / interval_s`` (so a rising rate is
    extrapolated a replica's start-up ahead: the pool's ``lead_s`` where known, measured on its
    nodes, else ``horizon_s``; see `ahead_s`), plus ``expected_calls`` spread over
    ``horizon_s`` (fan-outs known or predicted but not submitted yet: how soon they come is
    the workload's, not the start-up's).

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

    def __init__(self, options: TailOptions = TailOptions()) -> None:
        self.options = options
        self._risk: dict[str, float] = {}
        self._counts: dict[str, deque[tuple[float, int]]] = {}
        self._bursts: dict[str, deque[tuple[float, int]]] = {}
        """Per model, the calls in hand (running and waiting) at each decision of the hysteresis
        window: fan-outs come in bursts, and a pool sized for the mean rate queues a burst for
        a replica start-up, so it keeps slots for the largest recent one (under ``cap``)."""
        self._stable = _Stabiliser(options.hysteresis_s)
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
            floor = max(floor, math.ceil(peak * self.options.max_down))
            # calls arriving within one interval overlap for at most a service time of it
            mean_s = tailmath.moments(pool.service)[0] if pool.service is not None else 0.0
            overlap = min(1.0, mean_s / pool.interval_s) if pool.interval_s > 0 else 1.0
            together = max(demand, math.ceil(pool.arrivals * overlap))
            burst = _windowed_max(self._bursts, pool.model, now_s, window, together)
            wanted = max(self.needed(pool, rate), math.ceil(burst / (conc * self.options.cap)))
            risk, limit = self._smoothed_risk(pool), self.options.risk_target
            if risk is not None and risk > limit / 2:
                floor = max(floor, current)  # tail risk near the target: no shrinking
                if risk > limit and pool.starting == 0 and current > 0:
                    step = min(1.0, self.options.risk_gain * (risk / limit - 1))
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
        new = seen if old is None else old + self.options.risk_alpha * (seen - old)
        self._risk[pool.model] = new
        return new

    def rate(self, pool: PoolState) -> float:
        """Update the model's smoothed arrival rate; the rate to provision for, calls/s."""
        holt, o = self._rates.get(pool.model), self.options
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
                level = o.alpha * seen + (1 - o.alpha) * (holt.rate + holt.trend * pool.interval_s)
                trend = (level - holt.rate) / pool.interval_s
                holt.trend = o.beta * trend + (1 - o.beta) * holt.trend
                holt.rate = level
        ahead = self.ahead_s(pool)
        smoothed = 0.0 if holt is None else max(holt.rate, holt.rate + holt.trend * ahead)
        return max(smoothed, 0.0) + pool.expected_calls / o.horizon_s

    def ahead_s(self, pool: PoolState) -> float:
        """How far ahead ``pool``'s arrival trend is provisioned: until a replica asked for now
        serves (its ``lead_s``), but at least until the next decision (the target holds that
        long); ``horizon_s`` where the start-up is unknown."""
        if pool.lead_s is None:
            return self.options.horizon_s
        return max(pool.lead_s, pool.interval_s)

    def needed(self, pool: PoolState, rate: float) -> int:
        """The fewest replicas meeting the budget at this arrival rate (calls/s)."""
        conc = max(pool.concurrency, 1)
        demand = pool.busy + pool.waiting
        if pool.service is None:  # no forecast yet: keep utilisation under the cap
            return math.ceil(demand / (conc * self.options.cap))
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
                n * conc, rate, demand, self.options.level, self.options.cap
            )

        lo = max(1, math.ceil(rate * tailmath.moments(fastest)[0] / (conc * self.options.cap)))
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
        own_s = service.quantile(self.options.level)
        budget = self.options.no_budget_factor * own_s if budget_s is None else budget_s
        return max(self.options.headroom * budget, _MIN_WAIT_SHARE * own_s)


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


SCALERS: dict[str, type[ScalerOptions]] = {
    "none": NoOptions,
    "threshold": ThresholdOptions,
    "tail": TailOptions,
}
"""Scaler name -> its options class, whose `build` makes the scaler."""


def scaler_options(name: str, options: Mapping[str, Any], path: str = "") -> ScalerOptions:
    """The typed options of the ``name`` policy from a TOML table (or keywords): a `SchemaError`
    at ``path.KEY`` for an unknown key, a wrong type or a value out of range."""
    cls = SCALERS.get(name)
    if cls is None:
        raise SchemaError("", f"unknown scaler {name!r} (known: {', '.join(SCALERS)})")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in known:
            listed = f"known: {', '.join(known)}" if known else "it takes none"
            raise SchemaError(
                f"{path}.{key}" if path else key, f"not an option of the {name!r} scaler ({listed})"
            )
    return decode(cls, options, path)


def make_scaler(name: str, **options: Any) -> Scaler:
    """The ``name`` policy with ``options`` (fields of its options class), checked."""
    return scaler_options(name, options).build()
