"""Routers: hand-made cases where the right replica is known."""

import dataclasses
import math
import random
import statistics
from collections import Counter

import pytest

from swarmx.models.dist import LatencyDist
from swarmx.sched.router import (
    ROUTERS,
    Choice,
    KvCost,
    LeastOutstanding,
    MeanPredicted,
    P90Load,
    PowerOfTwo,
    PrefillDuty,
    PrefixAffinity,
    RandomChoice,
    ReplicaView,
    RoundRobin,
    RouteInput,
    TailRouter,
    Work,
    make_router,
    usable,
)
from swarmx.workflow.engine import CallSpec

LEVELS = (0.5, 0.9, 0.95, 0.99)
NOW = 100.0


def call(avoid=(), call_id="c") -> CallSpec:
    return CallSpec(
        call_id, "wf", "step", None, 0, "llm", "lm", "p", 16, {}, [], None, [], list(avoid)
    )


def view(
    replica: str, outstanding: int = 0, concurrency: int = 4, work: tuple[Work, ...] = ()
) -> ReplicaView:
    node = replica.split("/", maxsplit=1)[0]
    return ReplicaView(
        replica, node, "lm", "emulated", "emulated:H100", concurrency, outstanding, "H100", work
    )


def dist(median_s: float, sigma: float = 0.3) -> LatencyDist:
    return LatencyDist.lognormal(median_s, sigma, LEVELS)


def running(started_s: float, median_s: float, sigma: float = 0.3, name: str = "w") -> Work:
    return Work(name, started_s, dist(median_s, sigma))


def route(router, pool, forecasts=None, deadline_s=None, c=None) -> Choice:
    return router.choose(RouteInput(c or call(), pool, NOW, forecasts, deadline_s))


def picks(router, pool, n, forecasts=None) -> list[str]:
    return [pool[route(router, pool, forecasts).index].replica for _ in range(n)]


# --- least outstanding ----------------------------------------------------------------------


def test_least_outstanding_picks_the_replica_with_fewest_outstanding():
    pool = [view("a/lm#0", 3), view("b/lm#0", 1), view("c/lm#0", 2)]
    assert set(picks(LeastOutstanding(), pool, 5)) == {"b/lm#0"}
    assert route(LeastOutstanding(), [view("a/lm#0", 7), view("b/lm#0", 0)]).index == 1


def test_least_outstanding_ties_rotate_round_robin_across_calls():
    pool = [view("c/lm#0", 1), view("a/lm#0", 1), view("b/lm#0", 1), view("d/lm#0", 5)]
    got = picks(LeastOutstanding(), pool, 9)
    assert Counter(got) == {"a/lm#0": 3, "b/lm#0": 3, "c/lm#0": 3}
    assert len(set(got[:3])) == 3
    assert got[3:6] == got[:3]
    assert got[6:9] == got[:3]


def test_rotation_does_not_depend_on_candidate_order():
    pool = [view("a/lm#0"), view("b/lm#0"), view("c/lm#0")]
    assert picks(LeastOutstanding(), pool, 6) == picks(LeastOutstanding(), pool[::-1], 6)


def test_following_outstanding_counts_spreads_load_evenly():
    router = LeastOutstanding()
    load = {"a/lm#0": 0, "b/lm#0": 0, "c/lm#0": 0}
    for _ in range(30):
        pool = [view(r, n) for r, n in load.items()]
        load[pool[route(router, pool).index].replica] += 1
    assert set(load.values()) == {10}


def test_avoided_replicas_are_skipped_unless_nothing_else_is_left():
    pool = [view("a/lm#0", 0), view("b/lm#0", 4), view("c/lm#0", 6)]
    router = LeastOutstanding()
    assert route(router, pool, c=call(avoid=["a/lm#0"])).index == 1
    assert route(router, pool, c=call(avoid=["a/lm#0", "b/lm#0"])).index == 2
    everyone = call(avoid=["a/lm#0", "b/lm#0", "c/lm#0"])
    assert usable(everyone, pool) == [0, 1, 2]
    assert route(router, pool, c=everyone).index == 0
    assert usable(call(avoid=["zzz/lm#9"]), pool) == [0, 1, 2]


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_honours_avoid(name):
    pool = [view("a/lm#0", 0), view("b/lm#0", 2), view("c/lm#0", 1)]
    forecasts = [dist(0.5), dist(2.0), dist(3.0)]  # a is best by every measure
    router = make_router(name, seed=5)
    retry = call(avoid=["a/lm#0"])
    chosen = {route(router, pool, forecasts, c=retry).index for _ in range(12)}
    assert chosen and 0 not in chosen
    single = [view("a/lm#0", 3)]
    assert route(router, single, [dist(1.0)], c=retry).index == 0


# --- load-blind baselines -------------------------------------------------------------------


def test_round_robin_cycles_in_name_order_whatever_the_candidate_order():
    router = RoundRobin()
    pool = [view("c/lm#0", 0), view("a/lm#0", 9), view("b/lm#0", 2)]
    assert picks(router, pool, 6) == ["a/lm#0", "b/lm#0", "c/lm#0"] * 2
    shuffled = [pool[2], pool[0], pool[1]]
    assert picks(RoundRobin(), shuffled, 3) == ["a/lm#0", "b/lm#0", "c/lm#0"]


def test_round_robin_continues_after_the_last_pick_when_candidates_change():
    router = RoundRobin()
    full = [view("a/lm#0"), view("b/lm#0"), view("c/lm#0"), view("d/lm#0")]
    assert picks(router, full, 2) == ["a/lm#0", "b/lm#0"]
    assert picks(router, [full[0], full[1], full[3]], 1) == ["d/lm#0"]  # c is full: skip it
    assert picks(router, full, 2) == ["a/lm#0", "b/lm#0"]


def test_random_is_seeded_and_covers_every_replica():
    pool = [view(f"n{i}/lm#0", i) for i in range(4)]
    first = picks(RandomChoice(seed=7), pool, 400)
    assert first == picks(RandomChoice(seed=7), pool, 400)
    assert first != picks(RandomChoice(seed=8), pool, 400)
    assert first == picks(RandomChoice(seed=7), pool[::-1], 400)  # by name, not position
    assert all(80 < n < 120 for n in Counter(first).values())


def test_power_of_two_never_picks_the_worse_of_its_two():
    pool = [view(f"n{i}/lm#0", outstanding=i) for i in range(5)]
    got = picks(PowerOfTwo(seed=3), pool, 300)
    shadow = random.Random(3)  # the same draws: the two sampled, by name
    for replica in got:
        a, b = shadow.sample(range(5), 2)
        assert replica == f"n{min(a, b)}/lm#0"
    assert "n4/lm#0" not in got  # the most loaded loses every comparison
    assert got == picks(PowerOfTwo(seed=3), pool, 300)
    assert set(picks(PowerOfTwo(), pool[3:], 10)) == {"n3/lm#0"}


# --- forecast-driven ------------------------------------------------------------------------


def test_p90_load_picks_the_smallest_point_p90_and_needs_forecasts():
    pool = [view("a/lm#0"), view("b/lm#0"), view("c/lm#0")]
    forecasts = [dist(1.0, 0.9), dist(1.5, 0.1), dist(2.0, 0.1)]  # a: best median, worst p90
    decision = route(P90Load(), pool, forecasts)
    assert decision.index == 1
    assert decision.completion is forecasts[1]
    with pytest.raises(ValueError, match="p90_load"):
        route(P90Load(), pool)


def test_mean_predicted_picks_the_shortest_expected_delay():
    pool = [view("a/lm#0"), view("b/lm#0")]
    # same median; a's long tail makes its mean longer
    assert route(MeanPredicted(), pool, [dist(1.0, 1.2), dist(1.0, 0.2)]).index == 1
    # a full replica adds the expected wait: b is faster but waits ~3 s for its running call
    busy = [view("a/lm#0"), view("b/lm#0", 1, 1, (running(NOW - 1, 4.0),))]
    assert route(MeanPredicted(), busy, [dist(2.0), dist(1.0)]).index == 0


def test_tail_avoids_a_long_residual_even_with_fewer_outstanding():
    long_call = running(NOW - 1.0, median_s=10.0, name="long")  # ~9 s still to go
    almost_done = running(NOW - 0.9, median_s=1.0, name="short")
    queued = running(NOW - 0.1, median_s=0.5, name="queued")
    pool = [
        view("a/lm#0", outstanding=1, concurrency=1, work=(long_call,)),
        view("b/lm#0", outstanding=2, concurrency=1, work=(almost_done, queued)),
    ]
    forecasts = [dist(1.0), dist(1.0)]
    assert route(LeastOutstanding(), pool).index == 0
    decision = route(TailRouter(), pool, forecasts)
    assert decision.index == 1
    assert decision.completion is not None
    assert decision.completion.quantile(0.5) > 1.0  # the wait is in the prediction


def test_tail_waits_for_a_fast_gpu_for_a_long_call_but_not_for_a_short_one():
    h100 = view("h100/lm#0", 1, 1, (running(NOW - 0.5, 1.0, name="other"),))  # ~0.5 s left
    a100 = view("a100/lm#0")  # free but slower
    assert route(TailRouter(), [h100, a100], [dist(5.0), dist(8.0)]).index == 0
    assert route(TailRouter(), [h100, a100], [dist(0.3), dist(0.5)]).index == 1


def test_tail_with_a_deadline_picks_the_best_chance_of_making_it():
    pool = [view("x/lm#0"), view("y/lm#0")]
    fast_wide, slow_tight = dist(1.0, 1.0), dist(3.0, 0.05)  # p95: 5.2 s and 3.3 s
    router = TailRouter()
    assert route(router, pool, [fast_wide, slow_tight]).index == 1  # smaller tail
    # 2 s left: y cannot make it, x has a 76% chance
    assert route(router, pool, [fast_wide, slow_tight], deadline_s=NOW + 2).index == 0
    # 4 s left: y (worse median) is all but sure, x only 92%
    assert route(router, pool, [fast_wide, slow_tight], deadline_s=NOW + 4).index == 1


def test_tail_chances_beyond_the_forecasts_top_level_tie():
    """x is 99.99...% sure, y 99.97%: both past the forecast's last quantile (p99), where the
    lognormal is only extrapolated; the smaller tail (y's p95 1.93 s against 2.17 s) decides."""
    pool = [view("x/lm#0"), view("y/lm#0")]
    tight_slow, wide_fast = dist(2.0, 0.05), dist(1.0, 0.4)
    assert route(TailRouter(), pool, [tight_slow, wide_fast], deadline_s=NOW + 4).index == 1
    # with 2.4 s left the difference is inside the forecast (y 98.6%, x past 99%): x
    assert route(TailRouter(), pool, [tight_slow, wide_fast], deadline_s=NOW + 2.4).index == 0


@pytest.mark.parametrize("name", ["tail", "mean_predicted"])
def test_forecasts_alike_go_to_the_less_loaded_replica_and_a_clear_lead_wins(name):
    busy, idle = view("a/lm#0", outstanding=3, concurrency=8), view("b/lm#0", concurrency=8)
    router = make_router(name)
    # uncertain forecasts (sigma 1) 5% apart: alike, so the idle replica
    assert route(router, [busy, idle], [dist(1.0, 1.0), dist(1.05, 1.0)]).index == 1
    # 30% apart: a real difference, whatever the load
    assert route(router, [busy, idle], [dist(1.0, 1.0), dist(1.3, 1.0)]).index == 0
    # sure forecasts (sigma 0.02) 5% apart: a real difference too
    assert route(router, [busy, idle], [dist(1.0, 0.02), dist(1.05, 0.02)]).index == 0
    # no margin: the smallest forecast, however close
    exact = TailRouter(near=0.0) if name == "tail" else MeanPredicted(near=0.0)
    assert route(exact, [busy, idle], [dist(1.0, 1.0), dist(1.05, 1.0)]).index == 0


def test_tail_with_an_impossible_deadline_falls_back_to_the_smaller_tail():
    pool = [view("x/lm#0"), view("y/lm#0")]
    forecasts = [dist(3.0, 0.3), dist(2.0, 0.6)]  # y: better median, worse p95
    assert route(TailRouter(), pool, forecasts, deadline_s=NOW - 1).index == 0


def test_tail_level_changes_the_choice():
    pool = [view("x/lm#0"), view("y/lm#0")]
    forecasts = [dist(1.0, 0.8), dist(1.6, 0.1)]  # x: p60 1.2 s, p95 3.7 s; y ~1.6-1.9 s
    assert route(TailRouter(level=0.6), pool, forecasts).index == 0
    assert route(TailRouter(level=0.95), pool, forecasts).index == 1
    with pytest.raises(ValueError, match="level"):
        TailRouter(level=0.4)


def test_identical_replicas_share_the_load():
    pool = [view(f"n{i}/lm#0", 1) for i in range(3)]
    for name in ("tail", "mean_predicted", "p90_load"):
        got = picks(make_router(name), pool, 6, [dist(1.0)] * 3)
        assert Counter(got) == {r.replica: 2 for r in pool}, name


def test_tail_completion_is_the_forecast_when_a_slot_is_free():
    forecast = dist(2.0)
    decision = route(TailRouter(), [view("a/lm#0", 3)], [forecast])
    assert decision == Choice(0, forecast)


def test_tail_completion_matches_monte_carlo_of_its_model():
    """One slot, a call in flight for 1 s: completion = residual + this call's service."""
    inflight, service = dist(2.0, 0.5), dist(1.0, 0.4)
    pool = [view("a/lm#0", 1, 1, (Work("w", NOW - 1.0, inflight),))]
    decision = route(TailRouter(), pool, [service])
    assert decision.completion is not None
    assert decision.completion.levels == LEVELS
    rng = random.Random(11)
    samples = []
    while len(samples) < 50_000:
        left = rng.lognormvariate(math.log(2.0), 0.5) - 1.0
        if left > 0:
            samples.append(left + rng.lognormvariate(0.0, 0.4))
    samples.sort()
    assert decision.completion.quantile(0.5) == pytest.approx(statistics.median(samples), rel=0.05)
    assert decision.completion.quantile(0.95) == pytest.approx(samples[47_500], rel=0.05)


def test_unlisted_and_unforecast_work_counts_like_this_call():
    forecasts = [dist(1.0), dist(1.0)]
    unknown = view("a/lm#0", outstanding=2, concurrency=1)  # counted, not listed
    listed = view("b/lm#0", 2, 1, (Work("w1", NOW, None), Work("w2", NOW, None)))
    both = route(TailRouter(), [unknown, listed], forecasts).completion
    alone = route(TailRouter(), [unknown], forecasts[:1]).completion
    assert both is not None and alone is not None
    assert both.quantile(0.95) == pytest.approx(alone.quantile(0.95))  # same prediction
    assert alone.quantile(0.5) > 2.5  # two calls of ~1 s ahead, then its own


def test_forecast_routers_need_one_forecast_per_candidate():
    pool = [view("a/lm#0"), view("b/lm#0")]
    with pytest.raises(ValueError, match="tail"):
        route(TailRouter(), pool, [dist(1.0)])


# --- prefix-cache baselines -----------------------------------------------------------------


def prefixed(blocks: int, block_tokens: int = 64, call_id: str = "c") -> CallSpec:
    c = call(call_id=call_id)
    return dataclasses.replace(c, prefix_blocks=list(range(blocks)), block_tokens=block_tokens)


def kv_work(*prompt_tokens: int) -> tuple[Work, ...]:
    return tuple(Work(f"w{i}", NOW, None, n) for i, n in enumerate(prompt_tokens))


def route_cached(router, pool, cached, c) -> int:
    return router.choose(RouteInput(c, pool, NOW, None, None, cached)).index


def test_prefix_affinity_follows_the_longest_cached_prefix_while_load_is_balanced():
    router = PrefixAffinity()
    pool = [view("a/lm#0", 3), view("b/lm#0", 0), view("c/lm#0", 1)]
    c = prefixed(10)  # 640 prompt tokens
    assert route_cached(router, pool, [512, 0, 64], c) == 0  # 80% held: the busier holder
    # under the 30% threshold: the replica with the least prompt KV in flight
    pool = [
        view("a/lm#0", 1, work=kv_work(5000)),
        view("b/lm#0", 2, work=kv_work(100, 100)),
        view("c/lm#0", 0, work=kv_work(900)),
    ]
    assert route_cached(router, pool, [128, 0, 0], c) == 1


def test_prefix_affinity_goes_to_the_least_loaded_when_load_is_imbalanced():
    router = PrefixAffinity()
    c = prefixed(10)
    # 70 over the idlest (more than 64) and more than 1.5x its load: balance wins
    pool = [view("a/lm#0", 80, concurrency=256), view("b/lm#0", 10), view("c/lm#0", 40)]
    assert route_cached(router, pool, [640, 0, 0], c) == 1
    # 70 over, but only 1.4x: not imbalanced, the cache wins
    pool = [view("a/lm#0", 245, concurrency=256), view("b/lm#0", 175, concurrency=256)]
    assert route_cached(router, pool, [640, 0], c) == 0


def test_prefix_affinity_without_blocks_is_least_loaded():
    router = PrefixAffinity()
    pool = [view("a/lm#0", 2), view("b/lm#0", 1)]
    assert route_cached(router, pool, None, call()) == 1


def test_kv_cost_weighs_prefill_saved_against_decode_load():
    c = prefixed(20)  # 20 blocks of 64 tokens
    hot = view("a/lm#0", 2, work=kv_work(640, 640))  # 20 blocks decoding, holds all 20
    idle = view("b/lm#0", 0)
    # a: 1 * 0 + 20 = 20; b: 1 * 20 + 0 = 20, tied on cost; b is less loaded by the tie-break
    assert route_cached(KvCost(), [hot, idle], [1280, 0], c) == 1
    hot = view("a/lm#0", 1, work=kv_work(640))  # 10 blocks decoding
    assert route_cached(KvCost(), [hot, idle], [1280, 0], c) == 0  # 10 < 20
    assert route_cached(KvCost(overlap_weight=0.25), [hot, idle], [1280, 0], c) == 1  # 10 > 5
    with pytest.raises(ValueError, match="overlap weight"):
        KvCost(-1)


# --- registry -------------------------------------------------------------------------------


def test_make_router_knows_every_policy():
    kinds = {name: make_router(name).forecast for name in ROUTERS}
    assert kinds == {
        "round_robin": "none",
        "random": "none",
        "least_outstanding": "none",
        "power_of_two": "none",
        "mean_predicted": "service",
        "p90_load": "load_only",
        "tail": "service",
        "prefix_affinity": "none",
        "kv_cost": "none",
    }
    assert {name for name in ROUTERS if make_router(name).uses_prefix} == {
        "prefix_affinity",
        "kv_cost",
    }
    assert all(make_router(name).name == name for name in ROUTERS)
    tail = make_router("tail", level=0.99)
    assert isinstance(tail, TailRouter)
    assert tail.level == 0.99
    with pytest.raises(ValueError, match="known: round_robin, random"):
        make_router("fastest")


def test_seeded_routers_repeat_their_choices():
    pool = [view(f"n{i}/lm#0", i % 3) for i in range(6)]
    for name in ROUTERS:
        runs = [picks(make_router(name, seed=4), pool, 20, [dist(1.0)] * 6) for _ in range(2)]
        assert runs[0] == runs[1], name


def test_tail_completion_is_never_faster_than_the_service_alone():
    """Moment matching thins a far tail: a heavy-tailed call behind a steady 3 s one would get a
    p99.9 below its own; the prediction is floored at the service's."""
    levels = (0.5, 0.9, 0.99, 0.999)
    service = LatencyDist.lognormal(math.exp(-1.125), 1.5, levels)
    steady = Work("w", NOW, LatencyDist.lognormal(3.0, 0.01, levels))
    decision = route(TailRouter(level=0.999), [view("a/lm#0", 1, 1, (steady,))], [service])
    assert decision.completion is not None
    assert decision.completion.quantile(0.5) > 3.0
    assert all(c >= s for c, s in zip(decision.completion.values_s, service.values_s, strict=True))
    assert decision.completion.quantile(0.999) == pytest.approx(service.quantile(0.999))


# --- calls the engines run for others ---------------------------------------------------------


def test_the_routers_weigh_calls_an_engine_runs_for_others():
    """Replica a looks idle to the scheduler, but its engine runs 5 calls that came from
    elsewhere (vLLM's own counts): every router that weighs load goes to b."""
    busy = dataclasses.replace(view("n1/a", outstanding=0), external=5)
    pool = [busy, view("n2/b", outstanding=1)]
    assert busy.load == 5 and not busy.work
    assert route(LeastOutstanding(), pool).index == 1
    assert route(PrefixAffinity(), pool).index == 1
    # same forecast on both: the tail router sees a has no free slot, and the work ahead
    assert route(TailRouter(), pool, [dist(1.0), dist(1.0)]).index == 1
    plain = [view("n1/a"), view("n2/b", outstanding=1)]
    assert route(LeastOutstanding(), plain).index == 0
    assert route(TailRouter(), plain, [dist(1.0), dist(1.0)]).index == 0


# --- the capacity price -----------------------------------------------------------------------


def _fits(router: TailRouter, inp: RouteInput) -> dict:
    """The service fits `TailRouter.choose` hands `TailRouter._stalls`."""
    from swarmx.sched.tailmath import fit

    assert inp.forecasts is not None
    return {i: fit(f, router.hi) for i, f in enumerate(inp.forecasts)}


def _prefixed(blocks: int = 40) -> CallSpec:
    c = call()
    return dataclasses.replace(c, prefix_blocks=list(range(blocks)), block_tokens=256)


def _priced_pool(busy_others: int) -> list[ReplicaView]:
    """A holds 36 of the call's 40 blocks and has a call running; B is idle and holds none;
    ``busy_others`` more replicas have their 4 slots full. All prefill 8,000 tokens a second."""
    hot = dataclasses.replace(view("n1/a", outstanding=1), prefill_tokens_per_s=8000.0)
    idle = dataclasses.replace(view("n2/b"), prefill_tokens_per_s=8000.0)
    full = [
        dataclasses.replace(view(f"n{3 + k}/c", outstanding=4), prefill_tokens_per_s=8000.0)
        for k in range(busy_others)
    ]
    return [hot, idle, *full]


def test_the_capacity_price_keeps_a_prefix_where_it_is_cached_only_when_the_pool_is_busy():
    """The forecasts already count each call's own prefill: on A it is 2 s, on idle B 1.5 s
    despite the 8,000 tokens B must prefill. An idle pool gives that prefill away: B. A busy
    pool pays for it in the other calls' time: A, the replica holding the prefix."""
    priced = TailRouter(capacity_price=True)
    assert priced.uses_prefix and not TailRouter().uses_prefix

    def pick(router: TailRouter, pool: list[ReplicaView]) -> str:
        cached = [36 * 256, 0] + [0] * (len(pool) - 2)
        forecasts = [dist(2.0), dist(1.5)] + [dist(1.5)] * (len(pool) - 2)
        inp = RouteInput(_prefixed(), pool, NOW, forecasts, cached_tokens=cached)
        return pool[router.choose(inp).index].replica

    quiet, busy = _priced_pool(0), _priced_pool(6)
    assert pick(priced, quiet) == "n2/b"  # 0.5 calls a replica: the greedy choice stands
    assert pick(priced, busy) == "n1/a"  # 3.1 calls a replica: 1.3 s of prefill costs 4 s
    assert pick(TailRouter(), busy) == "n2/b"  # unpriced, the idle replica every time
    unknown = [dataclasses.replace(v, prefill_tokens_per_s=0.0) for v in busy]
    assert pick(priced, unknown) == "n2/b"  # speeds unknown: nothing is charged


def test_a_crowded_replica_is_charged_its_own_batch_for_a_prefill():
    """The price is the pool's mean load, or the candidate's own where it is busier: without
    chunked prefill its whole batch waits out the prefill. 1.28 s of prompt to prefill on each
    of three replicas with 6, 0 and 0 calls (a mean of 2): charged 6 x 1.28 s on the crowded
    one, 2 x 1.28 s on the others."""
    from swarmx.sched.router import _priced

    pool = [
        dataclasses.replace(view(f"n{k}/r", outstanding=n), prefill_tokens_per_s=8000.0)
        for k, n in enumerate((6, 0, 0))
    ]
    router = TailRouter(capacity_price=True)
    inp = RouteInput(_prefixed(), pool, NOW, [dist(1.0)] * 3, cached_tokens=[0, 0, 0])
    tail = [0.0, 0.0, 0.0]
    _priced(inp, [0, 1, 2], tail, router._stalls(inp, _fits(router, inp)))
    assert [math.exp(t) - 1 for t in tail] == pytest.approx([6 * 1.28, 2 * 1.28, 2 * 1.28])
    # an engine that says it runs a billion calls for others: a finite, huge price, avoided
    pool[1] = dataclasses.replace(pool[1], external=10**9)
    inp = RouteInput(_prefixed(), pool, NOW, [dist(1.0)] * 3, cached_tokens=[0, 0, 0])
    tail = [0.0, 0.0, 0.0]
    _priced(inp, [0, 1, 2], tail, router._stalls(inp, _fits(router, inp)))
    assert all(math.isfinite(t) for t in tail) and tail[1] == max(tail)
    assert router.choose(inp).index == 2


def _decoding_pool() -> list[ReplicaView]:
    """A runs two long decodes (60 s forecasts), B two short calls (2 s), C is full of short
    ones; all started a second ago, all prefill 8,000 tokens a second."""

    def busy(name: str, n: int, median_s: float) -> ReplicaView:
        work = tuple(running(NOW - 1, median_s, name=f"{name}{k}") for k in range(n))
        return dataclasses.replace(view(name, n, work=work), prefill_tokens_per_s=8000.0)

    return [busy("n1/a", 2, 60.0), busy("n2/b", 2, 2.0), busy("n3/c", 4, 2.0)]


def test_a_prefill_is_priced_by_the_latency_of_the_calls_it_would_stall():
    """A and B each run two calls, but a 1.28 s prefill on A holds up two 60 s decodes, which
    the tail is made of: weighted by their expected latency over the pool's mean (16.5 s), A
    stalls 7.4 calls' worth and B 0.3 (charged the pool's mean load, 2.7). With equal
    forecasts the call goes to B every time, where counting calls alone would tie them; a
    forecast much faster on A (1.6 s against 9.8 s at the 0.95 level) still wins it A."""
    pool = _decoding_pool()
    router = TailRouter(capacity_price=True)
    inp = RouteInput(_prefixed(), pool, NOW, [dist(3.0)] * 3, cached_tokens=[0, 0, 0])
    stalls = router._stalls(inp, _fits(router, inp))
    held = [stalls.calls_held(i, 0.0) for i in range(3)]
    assert held == pytest.approx([120 / 16.5, 4 / 16.5, 8 / 16.5])
    # a long stall costs more than its seconds: (2 L + d) d, in seconds of the mean's 16.5 s
    m = math.exp(0.3**2 / 2)  # a lognormal's mean over its median
    assert stalls.calls_held(1, 12.5) == pytest.approx((4 * m + 2 * 6.25) / (16.5 * m))
    assert {pool[router.choose(inp).index].replica for _ in range(4)} == {"n2/b"}
    blind = TailRouter()
    assert {pool[blind.choose(inp).index].replica for _ in range(4)} == {"n1/a", "n2/b"}
    faster = RouteInput(
        _prefixed(), pool, NOW, [dist(1.0), dist(6.0), dist(6.0)], cached_tokens=[0, 0, 0]
    )
    assert pool[router.choose(faster).index].replica == "n1/a"
    # a call A holds every block of has nothing to prefill: nothing stalls, nothing is charged
    held = RouteInput(_prefixed(), pool, NOW, [dist(3.0)] * 3, cached_tokens=[40 * 256] * 3)
    assert {pool[router.choose(held).index].replica for _ in range(4)} == {"n1/a", "n2/b"}
    # a call overdue for its forecast counts for as long as it has run
    late = [dataclasses.replace(pool[1], outstanding=1, work=(running(NOW - 200, 2.0, name="x"),))]
    late_inp = RouteInput(_prefixed(), late + pool[2:], NOW, [dist(3.0)] * 2, cached_tokens=[0, 0])
    overdue = router._stalls(late_inp, _fits(router, late_inp)).calls_held(0, 0.0)
    assert overdue == pytest.approx(200 / ((200 + 8 * 1.0460) / 5), rel=1e-3)


def test_a_prefill_duty_decays_and_its_prefills_queue_one_after_another():
    duty = PrefillDuty().plus(6.0, 10.0).plus(3.0, 12.0)
    assert duty.until_s == 19.0 and duty.at_s == 12.0  # the second waits for the first
    assert duty.seconds == pytest.approx(6 * math.exp(-2 / 30) + 3)
    assert duty.share(12.0) == pytest.approx(duty.seconds / 30)
    assert duty.share(42.0) == pytest.approx(duty.seconds / 30 / math.e)
    assert duty.share(5.0) == pytest.approx(duty.seconds / 30)  # a clock that went back
    assert PrefillDuty().plus(1e9, 0.0).share(0.0) == 1.0  # at most all its time
    assert PrefillDuty().plus(-5.0, 0.0) == PrefillDuty(0.0, 0.0, 0.0)
    assert PrefillDuty().share(0.0) == 0.0
    # a prefill speed measured absurdly low (a prompt's prefill of inf or NaN seconds): the
    # duty stays a finite share that decays, and the queue ends at a finite time
    for absurd, counted in ((math.inf, 1.0), (1e308, 1.0), (math.nan, 0.0)):
        d = PrefillDuty().plus(absurd, 0.0).plus(absurd, 1.0)
        assert math.isfinite(d.seconds) and math.isfinite(d.until_s)
        assert d.share(1.0) == counted and 0 <= d.share(1e6) < 1e-6


def test_a_long_call_leaves_a_replica_busy_prefilling_for_a_quiet_one_and_a_short_call_stays():
    """Both replicas idle; A holds the call's 40 blocks (5 s of prefill saved) but spent half
    its last half-minute prefilling others' prompts, so whatever the call decodes there it
    can expect to be held up half as long again. A 20 s call would be held up 10 s, more than
    the prefill it saves: B. A 2 s call would be held up 1 s: A. The same replicas, opposite
    choices: what the call itself will do decides, and a load count cannot tell them apart."""
    busy = PrefillDuty(15.0, NOW, NOW)  # a share of 0.5, nothing left to prefill
    pool = [
        dataclasses.replace(view("n1/a"), prefill_tokens_per_s=2048.0, prefill_duty=busy),
        dataclasses.replace(view("n2/b"), prefill_tokens_per_s=2048.0),
    ]
    router = TailRouter(capacity_price=True)

    def picks(router: TailRouter, on_a_s: float, on_b_s: float) -> set[str]:
        inp = RouteInput(
            _prefixed(), pool, NOW, [dist(on_a_s), dist(on_b_s)], cached_tokens=[40 * 256, 0]
        )
        return {pool[router.choose(inp).index].replica for _ in range(4)}

    assert picks(router, 20.0, 25.0) == {"n2/b"}
    assert picks(router, 2.0, 7.0) == {"n1/a"}
    assert picks(TailRouter(), 20.0, 25.0) == {"n1/a"}  # blind to the duty: the cache wins
    # what is still queued to prefill there is waited out before the decode, not during it
    queued = PrefillDuty(15.0, NOW, NOW + 19.0)
    pool[0] = dataclasses.replace(pool[0], prefill_duty=queued)
    inp = RouteInput(_prefixed(), pool, NOW, [dist(20.0)] * 2, cached_tokens=[40 * 256, 0])
    stalls = router._stalls(inp, _fits(router, inp))
    assert stalls.endured_s[0] == pytest.approx(0.5 * (20 * math.exp(0.3**2 / 2) - 19))
    assert stalls.endured_s[1] == 0.0  # no duty there
    # where the call must prefill its whole prompt (5 s), it is held up only after that
    pool[1] = dataclasses.replace(pool[1], prefill_duty=busy)
    inp = RouteInput(_prefixed(), pool, NOW, [dist(20.0)] * 2, cached_tokens=[40 * 256, 0])
    stalls = router._stalls(inp, _fits(router, inp))
    assert stalls.endured_s[1] == pytest.approx(0.5 * (20 * math.exp(0.3**2 / 2) - 5))


@pytest.mark.parametrize(
    "values",
    [(1.0, 1e30, 1e35, 1e38), (1e300,) * 4, (1.0, math.inf, math.inf, math.inf)],
    ids=["spread", "huge", "overflowed"],
)
@pytest.mark.parametrize("slots", [4, 1], ids=["free", "full"])
def test_a_broken_forecast_in_flight_is_routed_around_not_raised(values, slots):
    """A call on A was sent with a broken model's forecast: a spread no lognormal's moments fit
    in a float, a huge one, or float32 overflow (built unchecked, as the predictor builds
    its own). Every decision reads it (the wait behind it on a full replica; the capacity
    price's stall weights on any), and none raises: the call counts as one that never ends,
    so a full A is avoided, and the price steers a prefill off A."""
    from swarmx.models.dist import trusted_dists

    (broken,) = trusted_dists(LEVELS, [list(values)])
    pool = [
        dataclasses.replace(
            view(name, 1, slots, (Work(f"w{name}", NOW - 1, service),)),
            prefill_tokens_per_s=8000.0,
        )
        for name, service in (("n1/a", broken), ("n2/b", dist(2.0)))
    ]
    for router in (TailRouter(capacity_price=True), TailRouter(), MeanPredicted()):
        for deadline_s in (None, NOW + 30):
            inp = RouteInput(
                _prefixed(), pool, NOW, [dist(2.0)] * 2, deadline_s, cached_tokens=[0, 0]
            )
            choice = router.choose(inp)
            assert choice.completion is not None
            assert all(math.isfinite(v) for v in choice.completion.values_s)
            priced = isinstance(router, TailRouter) and router.capacity_price
            if slots == 1 or priced:  # free and unpriced, the two replicas tie
                assert choice.index == 1, (router.name, deadline_s)


def test_the_session_value_leaves_a_wanted_prefix_where_its_next_turn_will_look_for_it():
    """Neither replica holds the call's 40 blocks; taking them would push a session's prefix
    that is still wanted (10,240 tokens, 1.28 s to prefill again) out of A, and only stale
    blocks out of B. With equal forecasts the session value sends the call to B every time,
    where the greedy router alternates; a forecast much faster on A outweighs the 1.28 s, a
    little faster does not."""
    pool = [
        dataclasses.replace(view(name), prefill_tokens_per_s=8000.0) for name in ("n1/a", "n2/b")
    ]
    valued = TailRouter(session_value=True)
    assert valued.uses_prefix and valued.uses_evictions and not TailRouter().uses_evictions

    def picks(router: TailRouter, forecasts: list[LatencyDist], n: int = 4) -> list[str]:
        inp = RouteInput(
            _prefixed(), pool, NOW, forecasts, cached_tokens=[0, 0], evicted_tokens=[40 * 256, 0]
        )
        return [pool[router.choose(inp).index].replica for _ in range(n)]

    alike = [dist(2.0), dist(2.0)]
    assert picks(valued, alike) == ["n2/b"] * 4
    assert set(picks(TailRouter(), alike)) == {"n1/a", "n2/b"}  # blind: a rotation of ties
    assert picks(valued, [dist(1.0), dist(5.0)]) == ["n1/a"] * 4
    # the tails at 0.95 decide: 1.64 s + 1.28 s on A against 2.46 s on B
    assert picks(valued, [dist(1.0), dist(1.5)]) == ["n2/b"] * 4
    assert picks(TailRouter(session_value=True, capacity_price=True), alike) == ["n2/b"] * 4


# --- scoring only the candidates that can matter ----------------------------------------------


def _score_all(router: TailRouter, inp: RouteInput) -> int:
    """The tail router's choice with every candidate's wait worked out: the naive model the
    pruned `TailRouter.choose` must match."""
    from swarmx.sched.router import (
        _SAME_PROBABILITY,
        _near_best,
        _priced,
        _Rotation,
    )
    from swarmx.sched.tailmath import z_score

    cands, forecasts = inp.candidates, inp.forecasts
    assert forecasts is not None
    pool = usable(inp.call, cands)
    preds = router.completions(inp, forecasts, pool)
    z = z_score(router.level)
    tail = [math.inf] * len(cands)
    for i, (done, service) in preds.items():
        tail[i] = max(done.mu + done.sigma * z, service.mu + service.sigma * z)
    if router.uses_prefix and inp.cached_tokens is not None:
        services = {i: service for i, (_, service) in preds.items()}
        stalls = router._stalls(inp, services) if router.capacity_price else None
        _priced(inp, pool, tail, stalls)
    if inp.deadline_s is not None:
        left_s = inp.deadline_s - inp.now_s
        on_time = [0.0] * len(cands)
        for i, (done, service) in preds.items():
            on_time[i] = min(done.cdf(left_s), forecasts[i].levels[-1], service.cdf(left_s))
        best = max(on_time[i] for i in pool)
        pool = [i for i in pool if on_time[i] >= best - _SAME_PROBABILITY]
    near = _near_best(cands, pool, tail, lambda i: preds[i][0].sigma, router.near)
    return _Rotation().pick(cands, near)


@pytest.mark.parametrize("seed", range(1000))
def test_scoring_only_the_candidates_that_can_matter_chooses_as_scoring_all_does(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 24)
    busy_of = rng.choice(
        (
            lambda slots: rng.choice((0, slots - 1, slots, slots + 2, slots + 6)),  # mixed
            lambda slots: rng.choice((slots, slots + 1, slots + 6)),  # all full
            lambda slots: rng.choice((slots - 1, slots, slots + 1)),  # just full, or free
        )
    )
    short = rng.random() < 0.5  # calls ahead nearly done: waits a hair, near-ties
    pool = []
    for i in range(n):
        slots = rng.choice((1, 2, 4))
        busy = busy_of(slots)
        work = tuple(
            running(NOW - rng.uniform(0, 0.01), 0.01, 0.1, f"w{i}-{k}")
            if short
            else running(
                NOW - rng.uniform(0, 8), rng.uniform(0.2, 6), rng.uniform(0, 1), f"w{i}-{k}"
            )
            for k in range(max(busy - rng.randint(0, 1), 0))  # some counted, not listed
        )
        v = view(f"n{i}/lm", busy, slots, work)
        duty = PrefillDuty(rng.choice((0.0, rng.uniform(0, 40))), NOW - 1, NOW + rng.uniform(-1, 3))
        pool.append(
            dataclasses.replace(
                v,
                prefill_tokens_per_s=rng.choice((0.0, 4000.0)),
                external=rng.randint(0, 1),
                prefill_duty=duty,
            )
        )
    if short:  # near-ties: alike forecasts, so the least loaded of the close ones wins
        sigma = rng.choice((0.0, 0.3, 1.0))
        forecasts = [dist(rng.uniform(1, 1.1), sigma) for _ in range(n)]
    else:
        forecasts = [dist(rng.uniform(0.3, 5), rng.choice((0.0, 0.3, 1.0))) for _ in range(n)]
    deadline = None if rng.random() < 0.4 else NOW + rng.uniform(0.5, 12)
    blocks = list(range(rng.randint(0, 40)))
    c = dataclasses.replace(call(), prefix_blocks=blocks, block_tokens=64)
    cached = [rng.randint(0, len(blocks)) * 64 for _ in range(n)] if rng.random() < 0.5 else None
    evicted = None
    if cached is not None and rng.random() < 0.5:
        evicted = [rng.choice((0, 64 * rng.randint(1, 60))) for _ in range(n)]
    router = TailRouter(
        level=rng.choice((0.9, 0.95, 0.99)),
        capacity_price=cached is not None and (evicted is None or rng.random() < 0.5),
        session_value=evicted is not None,
    )
    inp = RouteInput(c, pool, NOW, forecasts, deadline, cached, evicted)
    assert router.choose(inp).index == _score_all(router, inp)
