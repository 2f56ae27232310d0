"""Scalers: HPA-style threshold and the tail-latency scaler, against known answers."""

import heapq
import math
import random
from dataclasses import replace
from typing import get_args

import pytest

from swarmx.config import ScalerPolicy
from swarmx.models.dist import LatencyDist
from swarmx.sched.scaler import (
    SCALERS,
    NoOptions,
    NoScaler,
    PoolState,
    TailOptions,
    TailScaler,
    ThresholdOptions,
    ThresholdScaler,
    erlang_c,
    lead_time_s,
    make_scaler,
    scaler_options,
)
from swarmx.schema import SchemaError

_PS = sorted({k / 200 for k in range(1, 200)} | {0.001, 0.0025, 0.996, 0.998, 0.999, 0.9995})
EXP_1S = LatencyDist(tuple(_PS), tuple(-math.log(1 - p) for p in _PS))
"""Exponential service, mean 1 s: the pool is then an M/M/c queue."""


def pool(**changes) -> PoolState:
    base = PoolState(
        model="lm",
        ready=2,
        starting=0,
        concurrency=4,
        busy=0,
        waiting=0,
        arrivals=0,
        interval_s=10.0,
        service=None,
        budget_s=None,
    )
    return replace(base, **changes)


def mmc_latencies(servers: int, rate: float, calls: int = 60_000, seed: int = 1) -> list[float]:
    """Brute force: FIFO over ``servers`` with Poisson arrivals and exponential service."""
    rng = random.Random(seed)
    free, now, out = [0.0] * servers, 0.0, []
    for _ in range(calls):
        now += rng.expovariate(rate)
        start = max(now, heapq.heappop(free))
        end = start + rng.expovariate(1.0)
        heapq.heappush(free, end)
        out.append(end - now)
    return sorted(out)


def test_no_scaler_changes_nothing():
    assert NoScaler().decide(0.0, [pool(busy=100, waiting=50)]) == {}


# --- threshold ------------------------------------------------------------------------------


def test_threshold_scales_up_at_once():
    # 16 calls on 2 x 4 slots: utilisation 2.0, target 0.7 -> ceil(2 * 2.0 / 0.7) = 6
    assert ThresholdScaler().decide(0.0, [pool(busy=8, waiting=8)]) == {"lm": 6}


def test_threshold_leaves_utilisation_within_tolerance_alone():
    scaler = ThresholdScaler()
    assert scaler.decide(0.0, [pool(busy=6)]) == {}  # 0.75 / 0.7: within 10%
    assert scaler.decide(1.0, [pool(busy=7)]) == {"lm": 3}  # 0.875 / 0.7 = 1.25


def test_threshold_rounds_exact_ratios_exactly():
    # 14 / 8 / 0.7 is 2.5000000000000004 in floating point: still 5 replicas, not 6
    assert ThresholdScaler().decide(0.0, [pool(busy=14)]) == {"lm": 5}


def test_threshold_scales_down_only_after_the_window():
    scaler = ThresholdScaler(ThresholdOptions(down_window_s=300.0))
    assert scaler.decide(0.0, [pool(busy=8, waiting=8)]) == {"lm": 6}
    quiet = pool(ready=6, busy=2)  # wants ceil(6 * (2 / 24) / 0.7) = 1
    for t in (10.0, 100.0, 299.0):
        assert scaler.decide(t, [quiet]) == {}
    assert scaler.decide(301.0, [quiet]) == {"lm": 1}


def test_threshold_down_uses_the_highest_recommendation_in_the_window():
    scaler = ThresholdScaler(ThresholdOptions(down_window_s=300.0))
    scaler.decide(0.0, [pool(ready=6, busy=24)])  # 24 / 24 / 0.7: wants 9
    scaler.decide(0.0, [pool(ready=9, busy=24)])
    scaler.decide(200.0, [pool(ready=9, busy=12)])  # wants ceil(9 * 12/36 / 0.7) = 5
    assert scaler.decide(310.0, [pool(ready=9, busy=2)]) == {"lm": 5}  # not 1: 5 is on record
    assert scaler.decide(510.0, [pool(ready=5, busy=2)]) == {"lm": 1}


def test_threshold_starts_from_zero_and_counts_starting_replicas():
    scaler = ThresholdScaler()
    assert scaler.decide(0.0, [pool(ready=0, waiting=5)]) == {"lm": 1}
    assert scaler.decide(5.0, [pool(ready=0, starting=1, waiting=5)]) == {}
    # 2 ready + 4 starting already cover a demand that wants 6
    assert scaler.decide(6.0, [pool(ready=2, starting=4, busy=8, waiting=8)]) == {}
    assert scaler.decide(7.0, [pool(ready=0, starting=0)]) == {}


def test_threshold_respects_min_and_max_replicas():
    scaler = ThresholdScaler()
    assert scaler.decide(0.0, [pool(busy=8, waiting=80, max_replicas=4)]) == {"lm": 4}
    assert scaler.decide(0.0, [pool(model="b", ready=1, min_replicas=3)]) == {"b": 3}


# --- tail -----------------------------------------------------------------------------------


def test_erlang_c_known_values():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 0.0) == 0.0
    assert erlang_c(2, 2.0) == 1.0


def test_tail_picks_the_fewest_replicas_meeting_the_budget_as_brute_force_mm_c_does():
    # 6 calls/s of 1 s each on one-slot replicas; p95 must stay under 0.8 * 4.375 = 3.5 s
    scaler = TailScaler()
    state = pool(ready=1, concurrency=1, arrivals=60, service=EXP_1S, budget_s=4.375)
    assert scaler.decide(0.0, [state]) == {"lm": 8}
    p95 = {n: mmc_latencies(n, 6.0)[int(0.95 * 60_000)] for n in (7, 8)}
    assert p95[7] > 3.5 > p95[8]


@pytest.mark.parametrize(("rate", "fewest"), [(2.0, 4), (12.0, 14)])
def test_tail_pool_size_agrees_with_brute_force_mm_c(rate, fewest):
    target_s = 3.4 if rate == 2.0 else 3.5
    state = pool(concurrency=1, service=EXP_1S, budget_s=target_s / 0.8)
    assert TailScaler().needed(state, rate) == fewest
    on_time = {
        n: sum(x <= target_s for x in mmc_latencies(n, rate)) / 60_000 for n in (fewest - 1, fewest)
    }
    assert on_time[fewest - 1] < 0.95 <= on_time[fewest]


def test_tail_keeps_utilisation_under_the_cap():
    # a loose budget alone would allow near-saturation; 0.9 cap needs 60 / (4 * 0.9) -> 17
    loose = pool(service=LatencyDist.lognormal(1.0, 0.1, (0.5, 0.9, 0.95)), budget_s=1000.0)
    assert TailScaler().needed(loose, 60 / 1.0) == 17


def test_tail_scales_ahead_of_expected_calls():
    state = pool(ready=1, concurrency=1, arrivals=30, service=EXP_1S, budget_s=4.375)
    plain = TailScaler().decide(0.0, [state])["lm"]
    ahead = TailScaler(TailOptions(horizon_s=30.0)).decide(
        0.0, [replace(state, expected_calls=120)]
    )["lm"]
    assert ahead > plain  # 120 calls over 30 s: +4 calls/s


def test_tail_extrapolates_a_rising_arrival_rate():
    holt, level_only = TailScaler(TailOptions(horizon_s=30.0)), TailScaler(TailOptions(beta=0.0))
    for k in range(1, 9):
        seen = pool(arrivals=10 * k, interval_s=10.0)  # k calls/s, rising
        ahead, behind = holt.rate(seen), level_only.rate(seen)
        assert behind <= k  # plain smoothing lags a ramp
        assert ahead > k or k < 3  # the trend, once learnt, projects past it
    steady = TailScaler()
    for _ in range(5):
        flat = steady.rate(pool(arrivals=30, interval_s=10.0))
    assert flat == pytest.approx(3.0)


def test_lead_time_is_the_prior_until_three_start_ups_are_measured():
    assert lead_time_s([], 40.0) == 40.0
    assert lead_time_s([10.0, 12.0], 40.0) == 40.0  # two say little: the prior stays
    assert lead_time_s([12.0, 50.0, 10.0], 40.0) == 50.0  # the p90 of three is the slowest
    ten = [float(s) for s in range(10, 0, -1)]  # newest last, not sorted
    assert lead_time_s(ten, 40.0) == 9.0  # measured: the prior no longer counts
    assert lead_time_s(ten, 0.0, level=0.5) == 5.0
    assert lead_time_s([10.0, 12.0], 0.0) is None  # neither measured nor configured
    assert lead_time_s([], 0.0) is None


def ramp(lead_s: float | None, scaler: TailScaler | None = None) -> list[int]:
    """The tail scaler's targets over a rate rising by 1 call/s every 10 s decision."""
    scaler = scaler or TailScaler()
    out = []
    for k in range(1, 9):
        state = pool(
            ready=1,
            concurrency=1,
            arrivals=10 * k,
            service=EXP_1S,
            budget_s=4.375,
            max_replicas=1000,
            lead_s=lead_s,
        )
        out.append(scaler.decide(10.0 * k, [state])["lm"])
    return out


def test_tail_provisions_a_rising_rate_for_the_pools_lead_time():
    slow, fast = ramp(lead_s=120.0), ramp(lead_s=5.0)
    assert all(s >= f for s, f in zip(slow, fast, strict=True))
    assert slow[-1] > fast[-1] + 5  # 2 minutes of trend ahead, not one decision's
    assert ramp(lead_s=None) == [3, 4, 6, 9, 11, 13, 15, 17]  # horizon_s, as before
    assert ramp(lead_s=None) == ramp(lead_s=30.0)  # an unknown lead is horizon_s
    longer = ramp(None, TailScaler(TailOptions(horizon_s=120.0)))
    assert longer == slow  # a lead stands in for horizon_s exactly


def test_expected_calls_spread_over_the_horizon_whatever_the_lead():
    """How soon known fan-outs come is the workload's; a quick start-up is no reason to
    provision them at a higher rate."""
    for lead_s in (None, 1.0, 60.0):
        assert TailScaler().rate(pool(expected_calls=120, lead_s=lead_s)) == 4.0  # 120 / 30 s
    assert TailScaler().ahead_s(pool(lead_s=1.0)) == 10.0  # at least the 10 s interval
    assert TailScaler().ahead_s(pool(lead_s=60.0)) == 60.0
    assert TailScaler().ahead_s(pool()) == 30.0


def test_tail_scales_up_at_once_and_down_after_hysteresis():
    scaler = TailScaler(TailOptions(hysteresis_s=120.0))
    busy = pool(ready=1, concurrency=1, arrivals=60, service=EXP_1S, budget_s=4.375)
    assert scaler.decide(0.0, [busy]) == {"lm": 8}
    idle = replace(busy, ready=8, arrivals=0)
    for t in (10.0, 60.0, 110.0):
        assert scaler.decide(t, [idle]) == {}
    down = scaler.decide(130.0, [idle])
    assert down["lm"] < 8


def test_tail_never_scales_below_the_calls_in_hand():
    scaler = TailScaler(TailOptions(hysteresis_s=10.0))
    # no arrivals, but 10 calls running on 4-slot replicas: keep 3
    state = pool(ready=5, busy=10, service=EXP_1S, budget_s=100.0)
    assert scaler.decide(0.0, [state]) == {}  # the current count is on record
    assert scaler.decide(11.0, [state]) == {"lm": 3}


def test_tail_counts_starting_replicas_and_the_backlog():
    scaler = TailScaler()
    base = pool(ready=1, concurrency=1, arrivals=60, service=EXP_1S, budget_s=4.375)
    assert scaler.decide(0.0, [replace(base, starting=7)]) == {}  # 8 asked for already
    backlog = TailScaler().decide(0.0, [replace(base, waiting=40)])["lm"]
    assert backlog > 8  # 40 queued calls must clear within the budget too


def test_tail_without_a_budget_uses_twice_the_services_own_tail():
    state = pool(concurrency=1, service=EXP_1S)
    p95 = EXP_1S.quantile(0.95)
    scaler = TailScaler()
    assert scaler.needed(state, 6.0) == scaler.needed(replace(state, budget_s=2 * p95), 6.0)


def test_tail_with_an_unreachable_budget_still_asks_for_a_finite_pool():
    state = pool(concurrency=1, service=EXP_1S, budget_s=1.0)  # p95 of service alone: 3 s
    n = TailScaler().needed(state, 6.0)
    assert 8 <= n < 30


def test_tail_without_a_forecast_keeps_utilisation_under_the_cap():
    assert TailScaler().needed(pool(busy=18), 0.0) == 5  # ceil(18 / (4 * 0.9))
    assert TailScaler().needed(pool(), 0.0) == 0


def test_tail_idle_pool_goes_down_to_min_replicas():
    scaler = TailScaler(TailOptions(hysteresis_s=10.0))
    idle = pool(service=EXP_1S, min_replicas=1)
    scaler.decide(0.0, [idle])
    assert scaler.decide(11.0, [idle]) == {"lm": 1}


def test_make_scaler_names_and_options():
    assert isinstance(make_scaler("none"), NoScaler)
    threshold = make_scaler("threshold", target=0.5)
    assert isinstance(threshold, ThresholdScaler)
    assert threshold.options == ThresholdOptions(target=0.5)
    tail = make_scaler("tail", level=0.99, hysteresis_s=30.0)
    assert isinstance(tail, TailScaler)
    assert tail.options == TailOptions(level=0.99, hysteresis_s=30.0)
    assert {name: make_scaler(name).name for name in SCALERS} == {
        "none": "none",
        "threshold": "threshold",
        "tail": "tail",
    }
    assert get_args(ScalerPolicy) == tuple(SCALERS)  # the config accepts every policy
    with pytest.raises(ValueError, match="known: none, threshold, tail"):
        make_scaler("hpa")


def test_policy_defaults_are_unchanged():
    assert NoOptions() == scaler_options("none", {})
    assert scaler_options("threshold", {}) == ThresholdOptions(
        target=0.7, tolerance=0.1, down_window_s=300.0
    )
    assert scaler_options("tail", {}) == TailOptions(
        level=0.95,
        headroom=0.8,
        cap=0.9,
        hysteresis_s=120.0,
        horizon_s=30.0,
        alpha=0.5,
        beta=0.3,
        no_budget_factor=2.0,
        max_down=0.5,
        risk_target=0.002,
        risk_gain=1.0,
        risk_alpha=0.3,
    )


@pytest.mark.parametrize(
    ("policy", "options", "message"),
    [
        ("threshold", {"tolerance": "x"}, r"^opts.tolerance: expected a number, got str 'x'$"),
        ("threshold", {"target": True}, r"^opts.target: expected a number, got bool"),
        ("threshold", {"target": 0}, r"^opts.target: must be in \(0, 1\], got 0.0$"),
        ("threshold", {"tolerance": -0.1}, r"^opts.tolerance: must be >= 0, got -0.1$"),
        ("threshold", {"level": 0.9}, r"^opts.level: not an option of the 'threshold' scaler"),
        ("tail", {"horizon_s": 0}, r"^opts.horizon_s: must be > 0, got 0.0$"),
        ("tail", {"cap": float("nan")}, r"^opts.cap: must be in \(0, 1\), got nan$"),
        ("none", {"cap": 0.5}, r"^opts.cap: not an option of the 'none' scaler \(it takes none\)$"),
    ],
)
def test_bad_options_are_refused_naming_the_field(policy, options, message):
    with pytest.raises(SchemaError, match=message):
        scaler_options(policy, options, "opts")


def test_options_are_checked_however_they_are_built():
    with pytest.raises(SchemaError, match=r"^level: must be in \(0.5, 1\), got 1$"):
        TailScaler(TailOptions(level=1))
    assert TailOptions(level=0.99).build().options.level == 0.99


def test_tail_reads_the_service_at_the_occupancy_a_pool_size_implies():
    """Calls placed on full replicas took 4x longer: packing the pool tight is not free."""
    fast, slow = LatencyDist.point(1.0, (0.5, 0.9)), LatencyDist.point(4.0, (0.5, 0.9))
    bands = [(0.125, fast), (0.375, fast), (0.625, slow), (0.875, slow)]
    state = pool(concurrency=8, service=fast, budget_s=3.0)
    # 16 Erlangs on 8-slot replicas: 6 run a third full (a fast band), 5 over the middle of
    # the second band, read pessimistically as the next (slow), and slow calls pile up more
    banded = replace(state, service_by_load=bands)
    assert TailScaler.service_at(banded, 16.0, 6) is fast
    assert TailScaler.service_at(banded, 16.0, 5) is slow
    plain, aware = TailScaler().needed(state, 16.0), TailScaler().needed(banded, 16.0)
    assert plain == 3  # utilisation under the cap is all a 1 s call needs for a 3 s budget
    assert aware == 6


def test_tail_shrinks_a_pool_only_as_full_as_it_has_seen_replicas_run():
    seen = [(0.125, LatencyDist.point(1.0, (0.5, 0.9)))]  # only ever a quarter full
    state = pool(concurrency=8, service=seen[0][1], budget_s=30.0, service_by_load=seen)
    assert TailScaler.service_at(state, 8.0, 2) is None  # half full: unknown speed
    assert TailScaler().needed(state, 8.0) == 4  # 8 Erlangs within a quarter of 32 slots


def test_tail_provisions_more_for_bursty_arrivals():
    """Same mean rate, calls arriving in bursts (fan-outs): the wait grows, so does the pool."""
    steady, bursty = TailScaler(), TailScaler()
    base = pool(concurrency=4, service=EXP_1S, budget_s=3.0)
    for k in range(40):
        steady.rate(replace(base, arrivals=60))
        bursty.rate(replace(base, arrivals=240 if k % 4 == 0 else 0))
    assert steady._rates["lm"].burstiness() == pytest.approx(1.0)
    assert bursty._rates["lm"].burstiness() > 20
    assert bursty.needed(base, 6.0) > steady.needed(base, 6.0)


def test_tail_scale_down_keeps_half_the_pool_per_decision():
    scaler = TailScaler(TailOptions(hysteresis_s=10.0))
    idle = pool(ready=16, service=EXP_1S, min_replicas=1)
    scaler.decide(0.0, [idle])
    assert scaler.decide(11.0, [idle]) == {"lm": 8}


def test_tail_keeps_slots_for_the_largest_recent_burst():
    """A fan-out burst of 60 calls came and went: until it leaves the hysteresis window the
    pool keeps room for another like it to start at once, whatever the mean rate says."""
    scaler = TailScaler(TailOptions(hysteresis_s=60.0))
    burst = pool(ready=20, concurrency=4, busy=60, service=EXP_1S, budget_s=30.0)
    scaler.decide(0.0, [burst])
    quiet = replace(burst, busy=0, arrivals=10)
    for t in (10.0, 20.0, 30.0, 40.0, 50.0):
        target = scaler.decide(t, [quiet]).get("lm", 20)
        assert target >= math.ceil(60 / (4 * 0.9))
    assert scaler.decide(200.0, [replace(quiet, ready=17)]).get("lm", 17) < 17


def test_tail_grows_a_pool_whose_calls_are_predicted_to_miss_their_deadlines():
    """The queue model is content (no arrivals), but the calls placed lately were forecast to
    miss their deadlines 4x as often as the target: the pool doubles (gain 1, capped at 2x)."""
    scaler = TailScaler(TailOptions(risk_target=0.002, risk_gain=1.0))
    late = pool(ready=4, busy=4, service=EXP_1S, budget_s=100.0, risk=0.008)
    assert scaler.decide(0.0, [late]) == {"lm": 8}
    # a little over the target: one step of (risk / target - 1) * gain, at least one replica
    mild = TailScaler(TailOptions(risk_target=0.002, risk_gain=1.0))
    assert mild.decide(0.0, [replace(late, risk=0.0022)]) == {"lm": 5}


def test_tail_waits_for_starting_replicas_before_growing_again_on_risk():
    scaler = TailScaler(TailOptions(risk_target=0.002))
    state = pool(ready=4, starting=4, busy=4, service=EXP_1S, budget_s=100.0, risk=0.01)
    assert scaler.decide(0.0, [state]) == {}


def test_tail_does_not_shrink_while_risk_is_near_the_target():
    scaler = TailScaler(TailOptions(hysteresis_s=10.0, risk_target=0.002))
    idle = pool(ready=16, service=EXP_1S, min_replicas=1, risk=0.0015)
    scaler.decide(0.0, [idle])
    assert scaler.decide(11.0, [idle]) == {}  # smoothed risk 0.0015 > half the target
    calm = TailScaler(TailOptions(hysteresis_s=10.0, risk_target=0.002))
    calm.decide(0.0, [replace(idle, risk=0.0)])
    assert calm.decide(11.0, [replace(idle, risk=0.0)]) == {"lm": 8}


def test_tail_smooths_risk_over_decisions_and_an_idle_interval_counts_as_none():
    scaler = TailScaler(TailOptions(risk_alpha=0.5))
    assert scaler._smoothed_risk(pool(risk=None)) is None  # nothing placed with a deadline yet
    assert scaler._smoothed_risk(pool(risk=0.01)) == pytest.approx(0.01)
    assert scaler._smoothed_risk(pool(risk=None)) == pytest.approx(0.005)
    assert scaler._smoothed_risk(pool(risk=0.005)) == pytest.approx(0.005)
