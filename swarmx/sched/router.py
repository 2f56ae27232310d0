"""Routers choose the replica for each call. The interface is what the dispatcher (shared by the
daemon and the simulator) calls; policies differ only in how they rank candidates.

Pure code: no I/O, no wall clock. Time arrives as ``now_s`` in the `RouteInput`, forecasts as
distributions computed by the caller's `Forecaster` (the live predictor, or the simulator's oracle).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from swarmx.frozen import frozen
from swarmx.models.dist import LatencyDist
from swarmx.sched.tailmath import (
    LogNormal,
    Moments,
    fit,
    fit_many,
    log_quantile,
    mean_of,
    residuals,
    z_score,
)
from swarmx.workflow.engine import CallSpec


@frozen
class Work:
    """A call outstanding on a replica, as the scheduler forecast it when it was sent."""

    call_id: str
    dispatched_s: float
    service: LatencyDist | None
    """Predicted service time of that call on that replica (None: no forecast was made)."""
    kv_tokens: int = 0
    """The call's prompt tokens, as far as known (its prefix blocks): the KV it holds there."""


PREFILL_DUTY_S = 30.0
"""Time constant of a replica's prefill duty (`PrefillDuty`), about the life of a long call:
the span over which a call sent now endures the prefills its replica takes."""


_LONGEST_PREFILL_S = 1e9
"""A prefill counts for at most this long."""


@frozen
class PrefillDuty:
    """The prefill seconds a scheduler has sent one replica, decayed with time constant
    `PREFILL_DUTY_S`: how much of its recent time the replica spent prefilling. An engine that
    does not chunk prefills stalls its batch for each, so a call decoding there can expect to
    be held up about that share of its decode (`TailRouter`'s capacity price)."""

    seconds: float = 0.0
    at_s: float = 0.0
    """When ``seconds`` was last brought up to date."""
    until_s: float = 0.0
    """When the prefills sent so far end, run one after another as they came."""

    def _left(self, now_s: float) -> float:
        """``seconds`` decayed to ``now_s`` (a clock gone back decays nothing)."""
        return self.seconds * math.exp(-max(0.0, now_s - self.at_s) / PREFILL_DUTY_S)

    def share(self, now_s: float) -> float:
        """The share of the replica's recent time it spent prefilling, at ``now_s`` (0 to 1)."""
        if self.seconds <= 0:
            return 0.0
        return min(1.0, self._left(now_s) / PREFILL_DUTY_S)

    def plus(self, prefill_s: float, now_s: float) -> PrefillDuty:
        """The duty after ``prefill_s`` more seconds of prefill were sent at ``now_s``."""
        # a speed measured absurdly low must not make the sums infinite (then NaN as they decay)
        prefill_s = min(max(0.0, prefill_s), _LONGEST_PREFILL_S)
        return PrefillDuty(
            self._left(now_s) + prefill_s,
            max(now_s, self.at_s),
            max(now_s, self.until_s) + prefill_s,
        )


@dataclass(frozen=True)
class ReplicaView:
    """What a router may know about a candidate replica at decision time."""

    replica: str
    node: str
    model: str
    backend: str
    device: str
    concurrency: int
    outstanding: int
    """Calls the scheduler has sent to this replica that have not finished."""
    gpu: str = "cpu"
    """Device type as the predictor knows it (``H100``, ``A100``, ``cpu``, ...)."""
    work: tuple[Work, ...] = ()
    """The outstanding calls, oldest first (``len(work) == outstanding`` when the dispatcher
    builds the view)."""
    kv_cache_tokens: int = 0
    """Tokens the replica's KV cache holds at most, where known (0: unknown)."""
    prefill_tokens_per_s: float = 0.0
    """How fast the replica prefills a prompt, where known (0: unknown): the simulator's timing
    model, or live, what its calls' first tokens took (`Dispatcher.observe_prefill`)."""
    decode_s_per_token: float = 0.0
    """Seconds a generated token takes on the replica under the batches it runs, where measured
    (0: not yet): its calls' tokens after the first (`Dispatcher.observe_decode`)."""
    external: int = 0
    """Calls on the replica's engine that did not come through this scheduler (another router's,
    a user's): the engine's own running and waiting requests, as its metrics say, less those
    the node has in it; 0 where the engine does not say. Load the routers weigh, which the
    scheduler's bookkeeping (``outstanding``) cannot see."""

    prefill_duty: PrefillDuty = field(default_factory=PrefillDuty)
    """The prefill this scheduler sent the replica lately (`Dispatcher`: each routed call's
    prompt less what the prefix index expected the replica to hold, at its prefill speed)."""

    @property
    def load(self) -> int:
        """Calls on the replica: this scheduler's and others'."""
        return self.outstanding + self.external


ForecastKind = Literal["none", "service", "load_only"]
"""What a router needs from the forecaster: nothing; the full predictor's service-time
distribution per candidate; or the llm-d-style point predictor on load and input length only."""


@frozen
class RouteInput:
    call: CallSpec
    candidates: Sequence[ReplicaView]
    """Never empty; all serve the call's model and have room for it."""
    now_s: float
    forecasts: Sequence[LatencyDist] | None = None
    """This call's service-time distribution on each candidate (aligned with ``candidates``),
    present when the router's ``forecast`` is not ``none``."""
    deadline_s: float | None = None
    """Absolute time by which this call should finish to keep its workflow on schedule."""
    cached_tokens: Sequence[int] | None = None
    """Prompt tokens of this call each candidate holds in its prefix cache (aligned with
    ``candidates``), as the dispatcher's index estimates; present for routers that use it
    (``uses_prefix``) and calls with prefix blocks."""
    evicted_tokens: Sequence[int] | None = None
    """Prompt tokens of prefixes still wanted (used within the reuse horizon: a session between
    turns) that taking this call would evict from each candidate's cache; present with
    ``cached_tokens`` for routers with ``uses_evictions``."""


@frozen
class Choice:
    """A router's pick of a replica for one call."""

    index: int
    """Position of the chosen replica in ``RouteInput.candidates``."""
    completion: LatencyDist | None = None
    """Predicted completion time (wait + service) on the chosen replica, where the router made
    one; recorded with the call so predicted-vs-actual can be shown."""


class Router(Protocol):
    name: str
    forecast: ForecastKind
    uses_prefix: bool
    """Wants ``RouteInput.cached_tokens``: the dispatcher then looks each candidate up in its
    prefix index."""
    uses_evictions: bool
    """Wants ``RouteInput.evicted_tokens`` too."""

    def choose(self, inp: RouteInput) -> Choice: ...


class Forecaster(Protocol):
    """Service-time distributions of one call on each of several candidate replicas."""

    def service(
        self,
        call: CallSpec,
        candidates: Sequence[ReplicaView],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        """``cached_tokens``: of the call's prompt, what each candidate's prefix cache holds by
        the dispatcher's index (None: no estimate)."""
        ...

    def load_only(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> list[LatencyDist]: ...

    def prepare(self, calls: Sequence[CallSpec]) -> None:
        """``calls`` are about to be routed, one after the other: a forecaster may work out
        their own part of the forecast (what does not depend on the replica) together, for
        their `service` calls to use. A hint: doing nothing is correct."""
        ...


def usable(call: CallSpec, candidates: Sequence[ReplicaView]) -> list[int]:
    """Indices of candidates other than those this call already failed on, unless that leaves
    none."""
    if call.avoid:
        fresh = [i for i, c in enumerate(candidates) if c.replica not in call.avoid]
        if fresh:
            return fresh
    return list(range(len(candidates)))


_SAME = 1e-9
"""Relative difference under which two scores tie (float noise between identical replicas)."""
_SAME_PROBABILITY = 1e-6
"""On-time probabilities this close tie: chasing a millionth of a chance is not worth a worse
tail."""


class _Rotation:
    """Round-robin among tied candidates in replica-name order, so identical replicas share the
    load whatever order the candidates come in: each pick is the first tied name after the
    previous pick's, wrapping around."""

    def __init__(self) -> None:
        self._last = ""

    def pick(self, cands: Sequence[ReplicaView], tied: list[int]) -> int:
        if len(tied) == 1:
            return tied[0]
        names = [cands[i].replica for i in tied]  # no sort: this runs at every routed call
        last = self._last
        later = [n for n in names if n > last]
        self._last = name = min(later) if later else min(names)
        return tied[names.index(name)]


def _lowest(pool: Sequence[int], score: Sequence[float]) -> list[int]:
    best = min(score[i] for i in pool)
    return [i for i in pool if score[i] <= best + _SAME * abs(best)]


NEAR = 0.1
"""Log-scores within this many of the best forecast's own log standard deviations of the best
are alike: among such candidates a forecasting router takes the least loaded (`_near_best`)."""


def _near_best(
    cands: Sequence[ReplicaView],
    pool: Sequence[int],
    score: Sequence[float],
    spread: Callable[[int], float],
    near: float,
) -> list[int]:
    """The candidates whose log-score is within ``near`` times the best one's log spread
    (``spread(i)``: the sigma of its forecast) of the best, then the least loaded of them, then
    the best scoring of those.

    A forecast made now cannot see the calls that will join a replica after this one, and
    every call that joins a batch slows the others. Forecasts that differ by a small share of
    their own uncertainty (the fast GPUs, for calls whose length nothing predicts) would send
    every call to the same few replicas by a hair's difference, and their batches would then
    run slower than anyone forecast. Load breaks such near-ties: it spreads the interference the
    forecasts cannot see. A certain forecast (the simulator's oracle) has no margin."""
    best_i = min(pool, key=score.__getitem__)
    best = score[best_i]
    margin = near * spread(best_i)
    if margin <= 0:
        return _lowest(pool, score)
    close = [i for i in pool if score[i] <= best + margin]
    least = min(cands[i].load for i in close)
    return _lowest([i for i in close if cands[i].load == least], score)


def _by_name(cands: Sequence[ReplicaView], pool: list[int]) -> list[int]:
    return sorted(pool, key=lambda i: cands[i].replica)


def _forecasts(inp: RouteInput, router: str) -> Sequence[LatencyDist]:
    if inp.forecasts is None or len(inp.forecasts) != len(inp.candidates):
        raise ValueError(f"router {router!r} needs one forecast per candidate")
    return inp.forecasts


class RoundRobin:
    """Each call to the replica after the previous one, in name order: the load-blind
    baseline."""

    name = "round_robin"
    forecast: ForecastKind = "none"
    uses_prefix = False
    uses_evictions = False

    def __init__(self) -> None:
        self._last: str | None = None

    def choose(self, inp: RouteInput) -> Choice:
        cands = inp.candidates
        pool = _by_name(cands, usable(inp.call, cands))
        last = self._last
        index = next((i for i in pool if last is None or cands[i].replica > last), pool[0])
        self._last = cands[index].replica
        return Choice(index)


class RandomChoice:
    """A uniformly random replica (seeded, so runs repeat)."""

    name = "random"
    forecast: ForecastKind = "none"
    uses_prefix = False
    uses_evictions = False

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, inp: RouteInput) -> Choice:
        return Choice(self._rng.choice(_by_name(inp.candidates, usable(inp.call, inp.candidates))))


class LeastOutstanding:
    """Fewest outstanding calls; ties go round-robin so equal replicas share the load."""

    name = "least_outstanding"
    forecast: ForecastKind = "none"
    uses_prefix = False
    uses_evictions = False

    def __init__(self) -> None:
        self._ties = _Rotation()

    def choose(self, inp: RouteInput) -> Choice:
        cands = inp.candidates
        # comprehensions, not one loop: this runs for every call over every open replica
        load = [c.load for c in cands]
        if inp.call.avoid:
            pool = usable(inp.call, cands)
            least = min(load[i] for i in pool)
            tied = [i for i in pool if load[i] == least]
        else:
            least = min(load)
            tied = [i for i, n in enumerate(load) if n == least]
        return Choice(self._ties.pick(cands, tied))


class PowerOfTwo:
    """The less loaded of two random replicas (Mitzenmacher): nearly least-outstanding's balance
    without scanning every replica's state, and no herding onto one momentarily idle replica."""

    name = "power_of_two"
    forecast: ForecastKind = "none"
    uses_prefix = False
    uses_evictions = False

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, inp: RouteInput) -> Choice:
        cands = inp.candidates
        pool = _by_name(cands, usable(inp.call, cands))
        if len(pool) == 1:
            return Choice(pool[0])
        a, b = self._rng.sample(pool, 2)
        return Choice(b if cands[b].load < cands[a].load else a)


def _has_slot(view: ReplicaView) -> bool:
    return view.load < max(view.concurrency, 1)


class _Completion:
    """Predicted completion time (wait for a slot + service) of a call on each candidate.

    A call joining a replica with a free slot starts at once (calls in flight slow each other,
    but the service forecast already says by how much, through its runtime features). Otherwise
    the work ahead (what is left of the ``concurrency`` oldest calls given how long they have
    run, plus the whole service of those queued behind them) drains through ``concurrency``
    slots at once: a fluid approximation, exact for one slot. Calls without a forecast, or
    counted without being listed, are taken to be like this one.
    """

    _CACHE_SIZE = 4096

    def __init__(self, hi: float) -> None:
        self.hi = hi
        """The upper level the lognormal fits go through (besides the median)."""
        self._fits: dict[int, tuple[LatencyDist, Moments]] = {}
        """id -> (forecast, its fit) of calls in flight, which every decision rescans (the
        dispatcher keeps one `LatencyDist` per call; holding it keeps the id from being reused
        while cached)."""

    def _moments(self, dist: LatencyDist) -> Moments:
        hit = self._fits.get(id(dist))
        if hit is not None and hit[0] is dist:
            return hit[1]
        if len(self._fits) >= self._CACHE_SIZE:
            self._fits.clear()
        moments = Moments.of(fit(dist, self.hi))
        self._fits[id(dist)] = (dist, moments)
        return moments

    def _wait(self, view: ReplicaView, own: Moments, now_s: float) -> tuple[float, float]:
        """Mean and variance of the wait for a slot on a full replica."""
        slots = max(view.concurrency, 1)
        fits, moments = self._fits, self._moments
        running: list[tuple[Moments, float]] = []
        queued_mean = queued_var = 0.0
        for k, work in enumerate(view.work):
            dist = work.service
            if dist is None:
                m = own
            else:  # the cache hit inline: this loop runs for every call on every candidate
                hit = fits.get(id(dist))
                m = hit[1] if hit is not None and hit[0] is dist else moments(dist)
            if k < slots:
                running.append((m, now_s - work.dispatched_s))
            else:
                queued_mean += m.mean_s
                queued_var += m.var_s2
        unlisted = view.load - len(view.work)
        if unlisted > 0:
            queued_mean += unlisted * own.mean_s
            queued_var += unlisted * own.var_s2
        mean, var = residuals(running)
        return (mean + queued_mean) / slots, (var + queued_var) / (slots * slots)

    def completions(
        self, inp: RouteInput, forecasts: Sequence[LatencyDist], pool: list[int]
    ) -> dict[int, tuple[LogNormal, LogNormal]]:
        """Per candidate in ``pool``: ``(completion, service)`` fits (`completion`)."""
        hi = self.hi
        return {i: self.completion(inp, i, fit(forecasts[i], hi)) for i in pool}

    def completion(
        self, inp: RouteInput, i: int, service: LogNormal
    ) -> tuple[LogNormal, LogNormal]:
        """Candidate ``i``'s ``(completion, service)`` fits, given its service fit. With a slot
        free the completion is the service; else wait + service by Fenton-Wilkinson, which
        scorers floor at the service's own figures (moment matching can thin a far tail below
        the service's, and waiting never makes a call faster)."""
        view = inp.candidates[i]
        if _has_slot(view):
            return service, service
        own = Moments.of(service)
        wait = self._wait(view, own, inp.now_s)
        return LogNormal.from_moments(wait[0] + own.mean_s, wait[1] + own.var_s2), service

    @staticmethod
    def choice(
        inp: RouteInput, forecasts: Sequence[LatencyDist], index: int, completion: LogNormal
    ) -> Choice:
        """With a slot free, the forecast itself: no approximation to add. Else the completion
        fit at the forecast's levels, floored at the forecast."""
        forecast = forecasts[index]
        if _has_slot(inp.candidates[index]):
            return Choice(index, forecast)
        waited = completion.dist(forecast.levels).values_s
        return Choice(
            index,
            LatencyDist(forecast.levels, tuple(map(max, waited, forecast.values_s))),
        )


class MeanPredicted(_Completion):
    """Shortest expected delay: the least predicted mean wait + service. The tail router's
    model scored by its mean, so comparing the two isolates what scoring the tail buys."""

    name = "mean_predicted"
    forecast: ForecastKind = "service"
    uses_prefix = False
    uses_evictions = False

    def __init__(self, near: float = NEAR) -> None:
        super().__init__(hi=0.95)
        self.near = near
        """Margin within which means count as alike, in forecast log spreads (`_near_best`)."""
        self._ties = _Rotation()

    def choose(self, inp: RouteInput) -> Choice:
        pool = usable(inp.call, inp.candidates)
        forecasts = _forecasts(inp, self.name)
        preds = self.completions(inp, forecasts, pool)
        score = [math.inf] * len(inp.candidates)
        for i, (done, _) in preds.items():
            score[i] = math.log(done.mean_s)  # exact: means add; logs, so the margin is relative
        near = _near_best(inp.candidates, pool, score, lambda i: preds[i][0].sigma, self.near)
        index = self._ties.pick(inp.candidates, near)
        return self.choice(inp, forecasts, index, preds[index][0])


class P90Load:
    """The llm-d predicted-latency scorer as a baseline: the least point p90 of a forecast from
    load and input length only, with no model of the work already on the replica."""

    name = "p90_load"
    forecast: ForecastKind = "load_only"
    uses_prefix = False
    uses_evictions = False

    def __init__(self) -> None:
        self._ties = _Rotation()

    def choose(self, inp: RouteInput) -> Choice:
        forecasts = _forecasts(inp, self.name)
        pool = usable(inp.call, inp.candidates)
        score = [log_quantile(f, 0.9) for f in forecasts]
        index = self._ties.pick(inp.candidates, _lowest(pool, score))
        return Choice(index, forecasts[index])


class TailRouter(_Completion):
    """The least predicted tail (quantile at ``level``) of completion time = wait for a slot +
    service; with a deadline, the best chance of finishing by it (ties: the smaller tail).
    Chances above the forecast's top level tie: beyond its last quantile a forecast is an
    extrapolation, and ranking 99.9% against 99.99% there herds calls onto the replicas whose
    fitted far tail happens to be thinnest. Tails within ``near`` log spreads of the best go to
    the least loaded of them (`_near_best`).

    A mean hides what agentic workflows suffer from: one slow call holds up a whole fan-out, so
    a replica whose typical latency is good but whose tail is long (a long call in flight, a
    slow device for a long prompt) is the wrong choice.
    """

    name = "tail"
    forecast: ForecastKind = "service"
    uses_prefix = False
    uses_evictions = False

    def __init__(
        self,
        level: float = 0.95,
        near: float = NEAR,
        capacity_price: bool = False,
        session_value: bool = False,
    ) -> None:
        if not 0.5 < level < 1:
            raise ValueError(f"tail level must be in (0.5, 1), got {level}")
        super().__init__(hi=max(level, 0.9))
        self.level = level
        self.near = near
        """Margin within which tails count as alike, in forecast log spreads (`_near_best`)."""
        self.capacity_price = capacity_price
        """Charge each candidate the pool capacity its prefill burns (`_priced`)."""
        self.session_value = session_value
        """Charge each candidate the prefill that the wanted prefixes it would evict will cost
        their sessions' next turns (`_priced`)."""
        self.uses_prefix = capacity_price or session_value
        self.uses_evictions = session_value
        self._ties = _Rotation()

    def choose(self, inp: RouteInput) -> Choice:
        """Scores only the candidates that can matter, exactly as scoring all would choose.

        A candidate's tail is at least its service's (waiting never makes a call faster) and
        its chance of finishing on time at most its service's: both come from the forecast
        alone, for a few logs. Working out the wait (the residuals of every call on a full
        replica) is the expensive part, so it is done only for full candidates whose bounds
        say they could be the best, or close enough to it to share its near-tie, or raise the
        best chance of being on time; those added can only tighten the bar the others must
        pass."""
        cands = inp.candidates
        pool = usable(inp.call, cands)
        forecasts = _forecasts(inp, self.name)
        z = z_score(self.level)
        services = dict(zip(pool, fit_many((forecasts[i] for i in pool), self.hi), strict=True))
        free = [c.outstanding + c.external < max(c.concurrency, 1) for c in cands]  # _has_slot
        low = [math.inf] * len(cands)  # log tail at least
        for i, service in services.items():
            low[i] = service.mu + service.sigma * z
        own = low.copy()  # each service's own log tail: a free candidate's completion's
        priced = self.uses_prefix and inp.cached_tokens is not None
        if priced:
            stalls = (
                self._stalls(inp, services)
                if self.capacity_price and inp.call.prefix_blocks
                else None
            )
            _priced(inp, pool, low, stalls)
        left_s = None if inp.deadline_s is None else inp.deadline_s - inp.now_s
        high = [0.0] * len(cands)  # chance on time at most
        if left_s is not None:
            for i, service in services.items():
                high[i] = min(service.cdf(left_s), forecasts[i].levels[-1])
        preds: dict[int, tuple[LogNormal, LogNormal]] = {}
        tail = [math.inf] * len(cands)
        on_time = [0.0] * len(cands)
        waiting = sorted((i for i in pool if not free[i]), key=low.__getitem__)
        todo = [i for i in pool if free[i]] or waiting[:1]
        while todo:
            for i in todo:
                service = services[i]
                if free[i]:  # `completion` with a slot free: the service itself
                    preds[i] = (service, service)
                    tail[i] = own[i]
                    on_time[i] = high[i]  # its service's chance, as bounded
                    continue
                done, service = preds[i] = self.completion(inp, i, service)
                tail[i] = max(done.mu + done.sigma * z, own[i])
                if left_s is not None:
                    on_time[i] = min(done.cdf(left_s), high[i])
            if priced:
                _priced(inp, todo, tail, stalls)
            best_on_time = max(on_time[i] for i in preds)
            alive = [i for i in preds if on_time[i] >= best_on_time - _SAME_PROBABILITY]
            best = min(alive, key=tail.__getitem__)
            bar = tail[best] + max(self.near * preds[best][0].sigma, _SAME * abs(tail[best]))
            todo = [
                j
                for j in waiting
                if j not in preds
                and (
                    high[j] > best_on_time
                    or (high[j] >= best_on_time - _SAME_PROBABILITY and low[j] <= bar)
                )
            ]
        pool = list(preds)
        if left_s is not None:
            best_on_time = max(on_time[i] for i in pool)
            pool = [i for i in pool if on_time[i] >= best_on_time - _SAME_PROBABILITY]
        near = _near_best(cands, pool, tail, lambda i: preds[i][0].sigma, self.near)
        index = self._ties.pick(cands, near)
        return self.choice(inp, forecasts, index, preds[index][0])

    def _stalls(self, inp: RouteInput, services: dict[int, LogNormal]) -> Stalls:
        """What a prefill on each candidate would hold up (`Stalls`): its calls' expected
        latencies (each its forecast mean, or how long it has run where longer; a call without
        a forecast, or not listed, such as another router's, at the pool's mean), scaled by the
        mean of the pool's calls in flight; and what this call can expect to be held up there
        by others' prefills: the share of its recent time each replica spent prefilling."""
        now_s, fits, moments = inp.now_s, self._fits, self._moments
        endured = [0.0] * len(inp.candidates)
        cached = _cached(inp)
        prompt = len(inp.call.prefix_blocks) * inp.call.block_tokens
        for i, service in services.items():
            view = inp.candidates[i]
            duty, rate = view.prefill_duty, view.prefill_tokens_per_s
            if duty.seconds > 0 and rate > 0:  # else nothing is endured there
                # its time there after the prefills queued ahead of it and its own
                after_s = duty.until_s - now_s if duty.until_s > now_s else 0.0
                after_s += max(0, prompt - cached[i]) / rate
                endured[i] = duty.share(now_s) * max(0.0, mean_of(service) - after_s)
        sums: list[float] = []
        counts: list[int] = []
        for view in inp.candidates:  # every call on every candidate: the cache hit inline
            total, n = 0.0, 0
            for w in view.work:
                dist = w.service
                if dist is None:
                    continue
                hit = fits.get(id(dist))
                m = hit[1] if hit is not None and hit[0] is dist else moments(dist)
                total += max(m.mean_s, now_s - w.dispatched_s)
                n += 1
            sums.append(total)
            counts.append(n)
        loads = [float(view.load) for view in inp.candidates]
        listed = sum(counts)
        mean_load = sum(loads) / len(loads)
        if not listed:
            return Stalls(loads, loads, 0.0, mean_load, endured)
        mean_s = sum(sums) / listed
        held_s = [t + mean_s * (c - n) for t, c, n in zip(sums, loads, counts, strict=True)]
        return Stalls(held_s, loads, mean_s, mean_load, endured)


@frozen
class Stalls:
    """The calls a prefill on each candidate would hold up, priced as a squared latency costs.

    Delaying a call of latency ``L`` by ``d`` adds ``d (2 L + d)`` to its square, whose sum is
    what a tail is made of: a second of stall costs a long call more, and a long stall costs
    more than its seconds. In seconds of a typical call (``mean_s``, where a small stall counts
    at par) a ``d``-second prefill on candidate ``i`` costs
    ``d (held_s[i] + calls[i] d / 2) / mean_s``: with equal forecasts and a small prefill,
    ``d`` times the candidate's load. Both halves matter in the simulator: priced by count, the
    slowest 1% of Mooncake calls spent 44% of their time stalled behind later calls' prefills
    (31% priced so), and on claude-code's sessions, priced by their latency alone, replicas
    running a short call drew long prefills one after another (calls of 20 s stalled for
    100 s)."""

    held_s: Sequence[float]
    """Per candidate, the sum of its calls' expected latencies (seconds; the load itself where
    ``mean_s`` is 0)."""
    calls: Sequence[float]
    """Per candidate, its calls (its load)."""
    mean_s: float
    """Mean expected latency of the pool's calls in flight (0: none has a forecast)."""
    mean_load: float
    """The pool's mean calls per replica."""
    endured_s: Sequence[float]
    """Per candidate, the seconds this call can expect to be held up there by the prefills the
    replica takes while it runs: the share of its recent time the replica spent prefilling
    (`PrefillDuty`) of the call's expected time there after the prefills queued ahead of it
    and its own (0 outside the pool)."""

    def calls_held(self, i: int, stall_s: float) -> float:
        """Candidate ``i``'s calls held up ``stall_s`` seconds, each weighted by its cost."""
        if self.mean_s <= 0:
            return self.held_s[i]
        return (self.held_s[i] + self.calls[i] * stall_s / 2) / self.mean_s


def _priced(inp: RouteInput, pool: list[int], tail: list[float], stalls: Stalls | None) -> None:
    """Add to each candidate's log tail the capacity its prefill burns: the seconds of prompt it
    would prefill there (what its prefix cache does not hold, at its prefill speed) times the
    pool's mean calls per replica, or the calls it would stall there where more (``stalls``,
    `TailRouter._stalls`; None: no capacity price).

    Each candidate is also charged what this call can expect to be held up there by the
    prefills the replica takes while it runs (`Stalls.endured_s`): the other side of the same
    stall, which the call's own forecast does not see.

    Greedy routing counts a prefill only in the call's own time. But a busy pool's GPU time is
    shared: a second spent prefilling on a replica is a second the calls sharing it (the pool's
    mean load, by Little's law) wait, and a prefix prefilled again elsewhere takes cache room
    that later calls' prefixes needed. On a replica busier than the pool's mean the price is
    what it would stall: an engine that does not chunk prefills stalls its whole batch for one,
    so that many calls wait at least, the long ones counting for more. Priced this way, a
    prefix holder that is a little busier keeps the call when the pool is loaded, a crowded
    replica or one running long decodes does not take a long prefill for a small gain, and an
    idle pool routes as before (a price of nothing). Candidates whose prefill speed is unknown
    are charged nothing.

    With the session value (``RouteInput.evicted_tokens``, with the capacity price or not), each
    candidate is also charged the prefill of the prefixes still wanted that the call would evict
    there: the sessions that sent them prefill them again on their next turns, once in their own
    time and, with the capacity price, at that price in the pool's. Greedy routing sees only
    the call's own prefix; this is the value of leaving other sessions' where their next turns
    will want them.
    """
    cands, cached, evicted = inp.candidates, inp.cached_tokens, inp.evicted_tokens
    assert cached is not None
    prompt = len(inp.call.prefix_blocks) * inp.call.block_tokens
    price = 0.0 if stalls is None else stalls.mean_load
    idle = stalls is None or (price <= 0 and not any(stalls.endured_s))
    if prompt <= 0 or (idle and not evicted):
        return
    for i in pool:
        rate = cands[i].prefill_tokens_per_s
        if rate > 0 and tail[i] < math.inf:
            burnt_s = max(0, prompt - cached[i]) / rate
            lost_s = evicted[i] / rate if evicted else 0.0
            stalled = endured = 0.0
            if stalls is not None:
                stalled = max(price, stalls.calls_held(i, burnt_s))
                endured = stalls.endured_s[i]
            extra_s = endured + stalled * (burnt_s + lost_s) + lost_s
            tail[i] = math.log(math.exp(tail[i]) + extra_s)


def _cached(inp: RouteInput) -> Sequence[int]:
    return inp.cached_tokens if inp.cached_tokens is not None else [0] * len(inp.candidates)


def _kv_held(view: ReplicaView) -> int:
    """Prompt KV of the calls outstanding on a replica (what it decodes, what it caches)."""
    return sum(w.kv_tokens for w in view.work)


def _least_loaded(cands: Sequence[ReplicaView], pool: list[int]) -> list[int]:
    fewest = min(cands[i].load for i in pool)
    return [i for i in pool if cands[i].load == fewest]


class PrefixAffinity:
    """The cache-aware policy of SGLang's router (and vLLM's), with their defaults, as a
    baseline: the replica holding the longest prefix of the call, unless load is imbalanced
    (the busiest has more than ``balance_abs`` calls over the idlest *and* more than
    ``balance_rel`` times its calls: then the least loaded) or no replica holds more than
    ``cache_threshold`` of the prompt (then the one whose cache holds least, as SGLang's
    smallest radix tree, approximated by the least prompt KV outstanding there)."""

    name = "prefix_affinity"
    forecast: ForecastKind = "none"
    uses_prefix = True
    uses_evictions = False

    def __init__(
        self, balance_abs: int = 64, balance_rel: float = 1.5, cache_threshold: float = 0.3
    ) -> None:
        self.balance_abs, self.balance_rel = balance_abs, balance_rel
        self.cache_threshold = cache_threshold
        self._ties = _Rotation()

    def choose(self, inp: RouteInput) -> Choice:
        cands = inp.candidates
        pool = usable(inp.call, cands)
        load = [c.load for c in cands]
        most, least = max(load[i] for i in pool), min(load[i] for i in pool)
        cached = _cached(inp)
        prompt = len(inp.call.prefix_blocks) * inp.call.block_tokens
        imbalanced = most - least > self.balance_abs and most > self.balance_rel * least
        if not imbalanced and prompt > 0:
            best = max(cached[i] for i in pool)
            if best / prompt > self.cache_threshold:
                tied = [i for i in pool if cached[i] == best]
                return Choice(self._ties.pick(cands, _least_loaded(cands, tied)))
            score = [float(_kv_held(c)) for c in cands]
            return Choice(self._ties.pick(cands, _lowest(pool, score)))
        return Choice(self._ties.pick(cands, _least_loaded(cands, pool)))


class KvCost:
    """Dynamo's KV router as a baseline: the least ``overlap_weight * blocks to prefill + blocks
    of KV the replica decodes``, i.e. the prefill this call would cost there (what its cache
    does not hold) against the decode load already there (the prompt KV of its outstanding
    calls), in blocks of the call's size; Dynamo's default temperature 0 (the least, no
    sampling); equal costs go to the least loaded."""

    name = "kv_cost"
    forecast: ForecastKind = "none"
    uses_prefix = True
    uses_evictions = False

    def __init__(self, overlap_weight: float = 1.0) -> None:
        if overlap_weight < 0:
            raise ValueError(f"kv_cost overlap weight must be >= 0, got {overlap_weight}")
        self.overlap_weight = overlap_weight
        self._ties = _Rotation()

    def choose(self, inp: RouteInput) -> Choice:
        cands = inp.candidates
        pool = usable(inp.call, cands)
        block = max(1, inp.call.block_tokens)
        blocks = len(inp.call.prefix_blocks)
        cached = _cached(inp)
        score = [0.0] * len(cands)
        for i in pool:
            prefill = blocks - cached[i] / block
            score[i] = self.overlap_weight * prefill + _kv_held(cands[i]) / block
        return Choice(self._ties.pick(cands, _least_loaded(cands, _lowest(pool, score))))


@frozen
class RouterOptions:
    """What configures a router beyond its name (`swarmx.config.RouterConfig`)."""

    seed: int = 0
    level: float = 0.95
    kv_overlap_weight: float = 1.0
    capacity_price: bool = False
    session_value: bool = False


ROUTERS: dict[str, Callable[[RouterOptions], Router]] = {
    "round_robin": lambda o: RoundRobin(),
    "random": lambda o: RandomChoice(o.seed),
    "least_outstanding": lambda o: LeastOutstanding(),
    "power_of_two": lambda o: PowerOfTwo(o.seed),
    "mean_predicted": lambda o: MeanPredicted(),
    "p90_load": lambda o: P90Load(),
    "tail": lambda o: TailRouter(
        o.level, capacity_price=o.capacity_price, session_value=o.session_value
    ),
    "prefix_affinity": lambda o: PrefixAffinity(),
    "kv_cost": lambda o: KvCost(o.kv_overlap_weight),
}
"""Router name -> factory."""


def make_router(
    name: str,
    *,
    seed: int = 0,
    level: float = 0.95,
    kv_overlap_weight: float = 1.0,
    capacity_price: bool = False,
    session_value: bool = False,
) -> Router:
    factory = ROUTERS.get(name)
    if factory is None:
        raise ValueError(f"unknown router {name!r} (known: {', '.join(ROUTERS)})")
    return factory(RouterOptions(seed, level, kv_overlap_weight, capacity_price, session_value))
