"""The dispatcher: calls wait until a replica has room, leave in queue order, go where the router
says, and every slot is given back."""

import dataclasses
import heapq
import itertools
import math
import random
from collections.abc import Sequence

import pytest

from swarmx.models.dist import LatencyDist
from swarmx.sched.dispatch import MIX_CALLS, Assign, Dispatcher, ServiceMix, Ticket, _OpenSet
from swarmx.sched.router import Choice, LeastOutstanding, ReplicaView, make_router
from swarmx.workflow.engine import CallSpec


def call(cid: str, model: str = "lm", kind: str = "llm") -> CallSpec:
    return CallSpec(cid, cid.partition(":")[0], "s", None, 0, kind, model, "p", 8, {}, [], None, [])


def replica(name: str, model: str = "lm", slots: int = 1) -> ReplicaView:
    return ReplicaView(name, name.partition("/")[0], model, "emulated", "emulated:A100", slots, 0)


class Fixed:
    """Forecasts a fixed service time per replica, and counts what it was asked."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.asked: list[int] = []
        self.cached: list[Sequence[int] | None] = []
        self.prepared: list[list[str]] = []

    def service(
        self, c: CallSpec, cands: Sequence[ReplicaView], cached: Sequence[int] | None = None
    ) -> list[LatencyDist]:
        self.asked.append(len(cands))
        self.cached.append(cached)
        return [LatencyDist.lognormal(self.seconds[v.replica], 0.1, (0.5, 0.9)) for v in cands]

    def load_only(self, c: CallSpec, cands: Sequence[ReplicaView]) -> list[LatencyDist]:
        return self.service(c, cands)

    def prepare(self, calls: Sequence[CallSpec]) -> None:
        self.prepared.append([c.call_id for c in calls])


def ids(assigns) -> list[str]:
    return [a.ticket.call.call_id for a in assigns]


def test_a_call_waits_for_room_and_goes_when_a_slot_frees():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm"), 0.0)
    assert ids(d.submit(Ticket(call("w1:x"), 0.0), 0.0)) == ["w1:x"]
    assert d.submit(Ticket(call("w2:x"), 1.0), 1.0) == []  # the only slot is taken
    assert d.queued("lm") == 1
    after = d.finished("w1:x", 2.0)
    assert ids(after) == ["w2:x"] and after[0].replica.replica == "a/lm"
    assert d.queued() == 0


def test_fifo_runs_in_arrival_order_and_slack_runs_least_slack_first():
    for order, expected in (
        ("fifo", ["w1:x", "w2:x", "w3:x"]),
        ("slack", ["w3:x", "w1:x", "w2:x"]),
    ):
        d = Dispatcher(LeastOutstanding(), order)
        d.add_replica(replica("a/lm"), 0.0)
        d.submit(Ticket(call("w0:x"), 0.0), 0.0)  # occupies the slot
        d.submit(Ticket(call("w1:x"), 1.0, slack_s=10.0), 1.0)  # latest start 11
        d.submit(Ticket(call("w2:x"), 2.0, slack_s=50.0), 2.0)  # 52
        d.submit(Ticket(call("w3:x"), 3.0, slack_s=1.0), 3.0)  # 4: most urgent
        got = ids(d.finished("w0:x", 4.0))
        for _ in expected[:-1]:
            got += ids(d.finished(got[-1], 5.0))
        assert got == expected, order


def test_calls_without_a_deadline_go_after_deadline_calls_in_slack_order():
    d = Dispatcher(LeastOutstanding(), "slack")
    d.add_replica(replica("a/lm"), 0.0)
    d.submit(Ticket(call("w0:x"), 0.0), 0.0)
    d.submit(Ticket(call("w1:x"), 1.0), 1.0)
    d.submit(Ticket(call("w2:x"), 2.0, slack_s=100.0), 2.0)
    assert ids(d.finished("w0:x", 3.0)) == ["w2:x"]


def test_models_queue_separately():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm"), 0.0)
    d.add_replica(replica("b/vit", "vit"), 0.0)
    d.submit(Ticket(call("w0:x"), 0.0), 0.0)
    d.submit(Ticket(call("w1:x"), 0.0), 0.0)  # waits for the lm slot
    assert ids(d.submit(Ticket(call("w2:x", "vit", "model"), 0.0), 0.0)) == ["w2:x"]
    tool = call("w3:t", "", "tool")
    assert d.submit(Ticket(tool, 0.0), 0.0) == [] and d.queued("tool") == 1
    assert ids(d.add_replica(replica("c/tool", "tool", 2), 1.0)) == ["w3:t"]


def test_a_stale_replica_gets_nothing_until_live_again():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm"), 0.0)
    d.set_live("a/lm", False, 0.0)
    assert d.submit(Ticket(call("w1:x"), 0.0), 0.0) == []
    assert ids(d.set_live("a/lm", True, 1.0)) == ["w1:x"]


def test_live_replicas_count_those_taking_calls_through_every_change():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm"), 0.0)
    d.add_replica(replica("b/lm"), 0.0)
    d.add_replica(replica("c/vis", "vis"), 0.0)
    assert (d.live_replicas("lm"), d.live_replicas("vis"), d.live_replicas("x")) == (2, 1, 0)
    d.set_live("a/lm", False, 0.0)
    d.set_live("a/lm", False, 0.0)  # no change: counted once
    assert d.live_replicas("lm") == 1
    d.add_replica(replica("a/lm"), 1.0)  # re-registered: live again
    assert d.live_replicas("lm") == 2
    d.set_live("b/lm", False, 1.0)
    d.remove_replica("b/lm")  # a stale one leaves: nothing to subtract
    d.remove_replica("a/lm")
    assert d.live_replicas("lm") == 0


def test_removing_a_replica_hands_back_its_calls_and_cancel_frees_slots():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm", slots=2), 0.0)
    d.submit(Ticket(call("w1:x"), 0.0), 0.0)
    d.submit(Ticket(call("w2:x"), 0.0), 0.0)
    d.submit(Ticket(call("w3:x"), 0.0), 0.0)  # queued
    assert ids(d.cancel(["w1:x"], 1.0)) == ["w3:x"]  # its slot goes to the queued call
    d.submit(Ticket(call("w4:x"), 1.0), 1.0)
    d.cancel(["w4:x"], 1.0)  # a queued call is simply dropped
    assert d.queued() == 0
    assert sorted(d.remove_replica("a/lm")) == ["w2:x", "w3:x"]
    assert d.finished("w2:x", 2.0) == []  # nothing booked any more


def test_replica_queue_lets_calls_wait_at_the_replica():
    d = Dispatcher(LeastOutstanding(), replica_queue=2)
    d.add_replica(replica("a/lm"), 0.0)
    sent = [d.submit(Ticket(call(f"w{i}:x"), 0.0), 0.0) for i in range(4)]
    assert [len(s) for s in sent] == [1, 1, 1, 0]  # 1 running + 2 waiting there
    assert d.views("lm")[0].outstanding == 3


def test_every_candidate_is_forecast_for_a_forecasting_router_and_the_choice_recorded():
    class Fastest:
        name, forecast, uses_prefix, uses_evictions = "fastest", "service", False, False

        def choose(self, inp):
            from swarmx.sched.router import Choice

            best = min(range(len(inp.candidates)), key=lambda i: inp.forecasts[i].quantile(0.5))
            return Choice(best, inp.forecasts[best])

    fc = Fixed({"a/lm": 5.0, "b/lm": 1.0, "c/lm": 3.0})
    d = Dispatcher(Fastest(), forecaster=fc)
    for name in ("a/lm", "b/lm", "c/lm"):
        d.add_replica(replica(name), 0.0)
    (a,) = d.submit(Ticket(call("w1:x"), 0.0), 0.0)
    assert a.replica.replica == "b/lm"
    assert a.service.quantile(0.5) == pytest.approx(1.0)
    assert fc.asked == [3]
    assert d.typical_service("lm").quantile(0.5) == pytest.approx(1.0)
    (b,) = d.submit(Ticket(call("w2:x"), 0.0), 0.0)  # b is full now: c is the fastest left
    assert b.replica.replica == "c/lm"
    assert d.views("lm")[1].work[0].call_id == "w1:x"


def test_a_router_that_needs_no_forecast_still_records_one_for_its_choice():
    fc = Fixed({"a/lm": 2.0, "b/lm": 4.0})
    d = Dispatcher(LeastOutstanding(), forecaster=fc)
    d.add_replica(replica("a/lm"), 0.0)
    d.add_replica(replica("b/lm"), 0.0)
    (a,) = d.submit(Ticket(call("w1:x"), 0.0), 0.0)
    assert fc.asked == [1]  # only the chosen replica, after the choice
    assert a.service is not None


def test_a_forecasting_router_without_a_forecaster_is_refused():
    class Needy:
        name, forecast = "needy", "service"

        def choose(self, inp):
            raise AssertionError

    with pytest.raises(ValueError, match="needs a forecaster"):
        Dispatcher(Needy())


def test_typical_service_is_the_mixture_of_calls_not_their_average():
    """Eight 1 s calls and two 20 s calls: the pool's p90 is a long call, which queueing is made
    of; averaging log-quantiles would have given about 1.8 s."""
    fc = Fixed({"a/lm": 1.0, "b/lm": 20.0})
    d = Dispatcher(LeastOutstanding(), forecaster=fc)
    d.add_replica(replica("a/lm", slots=100), 0.0)
    d.add_replica(replica("b/lm", slots=0), 0.0)
    for k in range(8):
        d.submit(Ticket(call(f"w{k}:x"), 0.0), 0.0)
    fc.seconds["a/lm"] = 20.0
    for k in (8, 9):
        d.submit(Ticket(call(f"w{k}:x"), 0.0), 0.0)
    mix = d.typical_service("lm")
    assert mix.quantile(0.5) == pytest.approx(1.0, rel=0.2)
    assert mix.quantile(0.9) == pytest.approx(20.0, rel=0.2)


def test_service_by_load_is_the_forecast_times_what_calls_placed_that_full_took_over_theirs():
    fc = Fixed({"a/lm": 1.0})
    d = Dispatcher(LeastOutstanding(), forecaster=fc)
    d.add_replica(replica("a/lm", slots=4), 0.0)
    for r in range(20):  # four calls at once; the k-th placed (occupancy k/4) takes k + 1 s
        t = 100.0 * r
        for k in range(4):
            d.submit(Ticket(call(f"r{r}-{k}:x"), 0.0), t)
        for k in range(4):
            d.finished(f"r{r}-{k}:x", t + k + 1.0)
    bands = d.service_by_load("lm")
    assert [o for o, _ in bands] == [0.125, 0.375, 0.625, 0.875]
    for k, (_, dist) in enumerate(bands):
        assert dist.quantile(0.5) == pytest.approx((k + 1) * 1.0, rel=1e-6)


def test_service_by_load_never_has_a_fuller_band_serve_faster():
    """Calls placed on a busier replica took less than forecast (the forecast over-priced the
    load): the fuller bands keep the emptiest band's speed rather than look faster."""
    fc = Fixed({"a/lm": 1.0})
    d = Dispatcher(LeastOutstanding(), forecaster=fc)
    d.add_replica(replica("a/lm", slots=4), 0.0)
    for r in range(20):  # the k-th placed (occupancy k/4) takes 4 - k s: 4, 3, 2, 1
        t = 100.0 * r
        for k in range(4):
            d.submit(Ticket(call(f"r{r}-{k}:x"), 0.0), t)
        for k in range(4):
            d.finished(f"r{r}-{k}:x", t + 4.0 - k)
    medians = [dist.quantile(0.5) for _, dist in d.service_by_load("lm")]
    assert medians == pytest.approx([4.0, 4.0, 4.0, 4.0], rel=1e-6)


def test_service_by_load_waits_for_enough_calls_per_band():
    d = Dispatcher(LeastOutstanding(), forecaster=Fixed({"a/lm": 1.0}))
    d.add_replica(replica("a/lm", slots=4), 0.0)
    for k in range(19):
        d.submit(Ticket(call(f"e{k}:x"), 0.0), 10.0 * k)
        d.finished(f"e{k}:x", 10.0 * k + 2.0)
    assert d.service_by_load("lm") == []


def test_a_forecasting_router_scores_only_the_least_loaded_candidates():
    """r0 is the fastest, but once it holds a call eight idle replicas are the candidates."""
    fc = Fixed({f"r{i:02d}/lm": 1.0 + i for i in range(100)})
    d = Dispatcher(make_router("mean_predicted"), forecaster=fc, max_candidates=8)
    for i in range(100):
        d.add_replica(replica(f"r{i:02d}/lm", slots=4), 0.0)
    chosen = [d.submit(Ticket(call(f"w{k}:x"), 0.0), 0.0)[0].replica.replica for k in range(20)]
    assert set(fc.asked) == {8}
    assert chosen == [f"r{i:02d}/lm" for i in range(20)]


@pytest.mark.parametrize("seed", range(3))
def test_the_least_loaded_open_replicas_match_a_scan_as_loads_change(seed):
    rng, open_, loads = random.Random(seed), _OpenSet(), {}
    for _ in range(2000):
        name = f"r{rng.randrange(60)}/lm"
        if rng.random() < 0.2:
            open_.drop(name)
            loads.pop(name, None)
        else:
            loads[name] = rng.randrange(5)
            open_.put(ReplicaView(name, "r", "lm", "emulated", "emulated:A100", 8, loads[name]))
        k = rng.randint(1, 70)
        got = open_.least_loaded(k)
        assert len(open_) == len(loads) and len(got) == min(k, len(loads))
        assert all(loads[v.replica] == v.outstanding for v in got)
        # exactly what a scan gives, ties included (the simulator's figures rest on it)
        assert got == heapq.nsmallest(k, open_.all(), key=lambda v: v.outstanding)


def test_take_risk_is_the_mean_predicted_chance_of_missing_the_deadline_where_calls_went():
    """Service lognormal, median 1 s: a call with its median left has a 0.5 chance of missing;
    one placed after its deadline passed (it waited in the queue) certainly misses."""
    d = Dispatcher(LeastOutstanding(), forecaster=Fixed({"a/lm": 1.0}))
    d.add_replica(replica("a/lm", slots=1), 0.0)
    assert d.take_risk("lm") is None  # no call with a deadline yet
    d.submit(Ticket(call("w1:x"), 0.0, deadline_s=1.0), 0.0)  # placed at once: median left
    d.submit(Ticket(call("w2:x"), 0.0, deadline_s=2.0), 0.0)  # waits for the slot
    d.finished("w1:x", 3.0)  # w2 placed at 3.0, a second after its deadline
    d.submit(Ticket(call("w3:x"), 0.0), 3.0)  # no deadline: not counted
    assert d.take_risk("lm") == pytest.approx((0.5 + 1.0) / 2, abs=1e-3)
    assert d.take_risk("lm") is None  # taken: counts start again


def test_a_full_service_mixture_is_read_again_once_a_32nd_of_it_is_new():
    """The slack queue reads the mixture at every call; it stays one object (whose quantiles
    are kept) until more than 1/32 of its calls are new, and then shows them."""
    mix = ServiceMix((0.5, 0.99))
    one, five = (LatencyDist.lognormal(s, 0.1, (0.5, 0.99)) for s in (1.0, 5.0))
    for _ in range(MIX_CALLS):
        mix.add(one)
    before = mix.dist()
    for _ in range(MIX_CALLS // 32):
        mix.add(five)
        assert mix.dist() is before
    mix.add(five)
    assert mix.dist() is not before
    assert mix.dist().quantile(0.99) > 4 * before.quantile(0.99)


def test_a_cancelled_queued_call_is_never_assigned_and_the_counts_stay_exact():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm"), 0.0)
    d.submit(Ticket(call("w0:x"), 0.0), 0.0)  # holds the slot
    for k in range(1, 6):
        d.submit(Ticket(call(f"w{k}:x"), float(k)), float(k))
    assert d.cancel(["w2:x", "w4:x", "w2:x", "nope:x"], 6.0) == []
    assert d.queued() == d.queued("lm") == 3
    d.submit(Ticket(call("w6:x"), 6.0), 6.0)
    d.submit(Ticket(call("w2:x"), 7.0), 7.0)  # the same id again, after its cancel: a new call
    assert d.queued() == 5
    assert [t.call.call_id for t in d.queued_tickets()] == ["w1:x", "w3:x", "w5:x", "w6:x", "w2:x"]
    got, running = [], "w0:x"
    for _ in range(5):
        (a,) = d.finished(running, 8.0)
        got.append(running := a.ticket.call.call_id)
    assert got == ["w1:x", "w3:x", "w5:x", "w6:x", "w2:x"]
    assert d.queued() == 0 and d.queued_tickets() == []


def test_cancelled_entries_never_outnumber_the_calls_still_queued():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm", slots=0), 0.0)
    for k in range(100):
        d.submit(Ticket(call(f"w{k}:x"), float(k)), float(k))
    d.cancel([f"w{k}:x" for k in range(0, 100, 3)], 100.0)  # 34 of 100
    d.cancel([f"w{k}:x" for k in range(1, 100, 3)], 100.0)  # 33 more: 67 gone, 33 left
    assert d.queued("lm") == 33
    assert len(d._queues["lm"]) <= 2 * 33
    assert [t.call.call_id for t in d.queued_tickets()] == [f"w{k}:x" for k in range(2, 100, 3)]


def test_a_call_already_queued_or_running_is_refused():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm"), 0.0)
    d.submit(Ticket(call("w1:x"), 0.0), 0.0)
    d.submit(Ticket(call("w2:x"), 0.0), 0.0)
    for cid in ("w1:x", "w2:x"):
        with pytest.raises(ValueError, match="already queued or running"):
            d.submit(Ticket(call(cid), 1.0), 1.0)


def test_cancel_workflow_drops_its_queued_and_assigned_calls_only():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm", slots=2), 0.0)
    for cid in ("a:x", "b:x", "a:y", "b:y", "a:z"):  # a:x and b:x run, the rest wait
        d.submit(Ticket(call(cid), 0.0), 0.0)
    assert ids(d.cancel_workflow("a", 1.0)) == ["b:y"]  # a:x's slot goes to b's queued call
    assert d.queued() == 0
    assert sorted(w.call_id for w in d.views("lm")[0].work) == ["b:x", "b:y"]
    assert d.cancel_workflow("a", 1.0) == [] and d.cancel_workflow("nope", 1.0) == []
    assert d.finished("a:x", 2.0) == []  # nothing booked any more


def test_budget_is_the_tightest_of_the_calls_queued_or_running_as_they_come_and_go():
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("a/lm"), 0.0)
    assert d.budget_s("lm") is None
    d.submit(Ticket(call("w1:x"), 0.0, deadline_s=9.0), 0.0)  # runs: 9 s
    d.submit(Ticket(call("w2:x"), 1.0, deadline_s=4.0), 1.0)  # waits: 3 s
    d.submit(Ticket(call("w3:x"), 2.0, deadline_s=7.0), 2.0)  # waits: 5 s
    d.submit(Ticket(call("w4:x"), 3.0), 3.0)  # no deadline: no budget
    assert d.budget_s("lm") == 3.0
    d.cancel(["w2:x"], 4.0)
    assert d.budget_s("lm") == 5.0
    d.finished("w1:x", 5.0)  # w3 runs now, still counted
    assert d.budget_s("lm") == 5.0
    d.cancel_workflow("w3", 6.0)
    assert d.budget_s("lm") is None and d.budget_s("vit") is None
    d.submit(Ticket(call("w5:x"), 7.0, deadline_s=7.0), 7.0)
    assert d.budget_s("lm") == 1e-3  # never zero


class Naive:
    """The dispatcher's queue and bookings by brute force: every answer a scan of every call."""

    def __init__(self, order: str) -> None:
        self.order = order
        self.queued: dict[str, tuple[tuple[float, int], Ticket]] = {}  # id -> (queue key, ticket)
        self.running: dict[str, Ticket] = {}
        self.gone: set[str] = set()

    def submit(self, t: Ticket, seq: int) -> None:
        late = math.inf if t.slack_s is None else t.arrived_s + t.slack_s
        self.queued[t.call.call_id] = ((t.arrived_s if self.order == "fifo" else late, seq), t)

    def placed(self, assigns: list[Assign]) -> None:
        """Each call placed was its queue's head and never cancelled."""
        for a in assigns:
            cid = a.ticket.call.call_id
            assert cid in self.queued and cid not in self.gone, cid
            assert self.in_order(a.ticket.call.model)[0] == cid
            self.running[cid] = self.queued.pop(cid)[1]

    def drop(self, call_ids: list[str]) -> None:
        for cid in call_ids:
            self.queued.pop(cid, None)
            self.running.pop(cid, None)
        self.gone.update(call_ids)

    def in_order(self, model: str) -> list[str]:
        return [c for k, c in sorted((k, c) for c, (k, t) in self.queued.items())
                if self.queued[c][1].call.model == model]  # fmt: skip

    def budget_s(self, model: str) -> float | None:
        tickets = [t for _, t in self.queued.values()] + list(self.running.values())
        budgets = [
            t.deadline_s - t.arrived_s
            for t in tickets
            if t.call.model == model and t.deadline_s is not None
        ]
        return max(min(budgets), 1e-3) if budgets else None

    def check(self, d: Dispatcher) -> None:
        for model in ("lm", "vit"):
            assert d.queued(model) == len(self.in_order(model))
            assert d.budget_s(model) == self.budget_s(model)
            got = [t.call.call_id for t in d.queued_tickets() if t.call.model == model]
            assert got == self.in_order(model)
        assert d.queued() == len(self.queued)
        assert sorted(d.queued_models()) == sorted({t.call.model for _, t in self.queued.values()})
        assert sorted(w.call_id for v in d.views() for w in v.work) == sorted(self.running)


@pytest.mark.parametrize("order", ["fifo", "slack"])
@pytest.mark.parametrize("seed", range(4))
def test_queue_counts_order_and_budgets_match_a_naive_model_on_random_operations(order, seed):
    """Submits, finishes, cancels (of calls, of a workflow), replicas coming and going: after
    each, the counts, the queue and the budgets are what a brute-force recomputation says."""
    rng, d, naive = random.Random(seed), Dispatcher(LeastOutstanding(), order), Naive(order)
    serial, replicas = itertools.count(), []
    for step in range(400):
        now, op = float(step), rng.random()
        if op < 0.45:
            n, model = next(serial), rng.choice(["lm", "vit"])
            c = call(f"w{rng.randrange(12)}:s{n}", model, "llm" if model == "lm" else "model")
            deadline = now + rng.uniform(0.5, 50.0) if rng.random() < 0.7 else None
            t = Ticket(c, now, deadline, rng.uniform(-5.0, 30.0) if deadline else None)
            naive.submit(t, n)
            naive.placed(d.submit(t, now))
        elif op < 0.6 and naive.running:
            cid = rng.choice(sorted(naive.running))
            del naive.running[cid]
            naive.placed(d.finished(cid, now))
        elif op < 0.75:
            pool = [*sorted(naive.queued), *sorted(naive.running), "nope:x"]
            drop = rng.sample(pool, min(len(pool), rng.randint(1, 4)))
            naive.drop(drop)
            naive.placed(d.cancel(drop, now))
        elif op < 0.85:
            wf = f"w{rng.randrange(12)}"
            naive.drop([c for c in [*naive.queued, *naive.running] if c.startswith(f"{wf}:")])
            naive.placed(d.cancel_workflow(wf, now))
        elif op < 0.95 or not replicas:
            name = f"r{next(serial)}/{rng.choice(['lm', 'vit'])}"
            replicas.append(name)
            view = replica(name, name.partition("/")[2], rng.randint(0, 3))
            naive.placed(d.add_replica(view, now))
        else:
            for cid in d.remove_replica(replicas.pop(rng.randrange(len(replicas)))):
                del naive.running[cid]
        naive.check(d)


# --- the prefix index -----------------------------------------------------------------------


def with_prefix(cid: str, blocks: list[int]) -> CallSpec:
    return dataclasses.replace(call(cid), prefix_blocks=blocks, block_tokens=64)


def test_calls_routed_to_a_replica_teach_its_prefix_index_what_it_holds():
    """A prefix-using router sees what the calls routed before left in each replica's cache:
    the next turn of a session follows its prefix, another session's call does not."""
    d = Dispatcher(make_router("prefix_affinity"))
    for name in ("a", "b", "c"):
        d.add_replica(replica(name, slots=4), 0.0)
    first = d.submit(Ticket(with_prefix("s1-t1", [1, 2, 3, 4]), 0.0), 0.0)
    holder = first[0].replica.replica
    d.submit(Ticket(with_prefix("s2-t1", [9, 8, 7]), 0.0), 0.0)
    d.finished("s1-t1", 1.0)
    again = d.submit(Ticket(with_prefix("s1-t2", [1, 2, 3, 4, 5, 6]), 1.0), 1.0)
    assert again[0].replica.replica == holder
    assert d.prefixes.cached_blocks(holder, [1, 2, 3, 4, 5, 6, 7]) == 6
    assert d.replicas[holder].work["s1-t2"].kv_tokens == 6 * 64
    d.remove_replica(holder)
    assert d.prefixes.get(holder) is None


def test_each_replicas_prefill_duty_counts_what_it_was_sent_less_what_it_held():
    """Each routed call adds its prompt less the prefix the index expected the replica to hold,
    at the replica's prefill speed; the prefills run one after another from when they were
    sent; a replica whose speed is unknown is sent nothing it can count; a new hello keeps
    the duty, a replica that left takes it with it."""
    d = Dispatcher(make_router("prefix_affinity"))
    d.add_replica(dataclasses.replace(replica("n/a", slots=4), prefill_tokens_per_s=640.0), 0.0)
    d.submit(Ticket(with_prefix("s1-t1", [1, 2, 3, 4]), 0.0), 0.0)  # 256 tokens: 0.4 s
    d.submit(Ticket(with_prefix("s1-t2", [1, 2, 3, 4, 5]), 0.1), 0.1)  # 4 blocks held: 0.1 s
    duty = d.view("n/a").prefill_duty
    assert duty.until_s == pytest.approx(0.5)
    assert duty.seconds == pytest.approx(0.4 * math.exp(-0.1 / 30) + 0.1)
    assert duty.share(30.1) == pytest.approx(duty.seconds / 30 / math.e)
    with pytest.raises(ValueError, match="already queued or running"):  # sent twice: once
        d.submit(Ticket(with_prefix("s1-t2", [1, 2, 3, 4, 5]), 0.1), 0.1)
    assert d.view("n/a").prefill_duty == duty
    d.add_replica(dataclasses.replace(replica("n/a", slots=4), prefill_tokens_per_s=0.0), 1.0)
    assert d.view("n/a").prefill_duty == duty  # announced again: the duty stays
    d.remove_replica("n/a")
    d.add_replica(replica("n/a", slots=4), 2.0)  # back, its speed unknown: nothing counted
    d.submit(Ticket(with_prefix("s2-t1", [7, 8]), 2.0), 2.0)
    assert d.view("n/a").prefill_duty.seconds == 0.0


def test_the_index_holds_no_more_than_the_replicas_kv_cache():
    d = Dispatcher(make_router("kv_cost"))
    small = dataclasses.replace(replica("a", slots=8), kv_cache_tokens=4 * 64)
    d.add_replica(small, 0.0)
    d.submit(Ticket(with_prefix("c1", list(range(10))), 0.0), 0.0)
    index = d.prefixes.get("a")
    assert index is not None
    assert len(index) == 4
    assert index.match(list(range(10))) == 4  # the head stays


def test_what_the_engine_evicted_leaves_the_index_and_a_clear_empties_it():
    """The engine's own account (`Dispatcher.engine_cache`): the blocks it evicted leave the
    index, so the next call's estimate matches what the engine will serve; a changed count of
    clears starts the index over; the engine's cache size bounds the index, and stays when the
    replica is announced again. The same report twice does nothing more."""
    d = Dispatcher(make_router("prefix_affinity"))
    d.add_replica(replica("a", slots=8), 0.0)
    d.submit(Ticket(with_prefix("c1", [1, 2, 3, 4]), 0.0), 0.0)
    d.finished("c1", 0.5)
    d.engine_cache("a", [3, 4], 0, 10 * 64)
    d.engine_cache("a", [3, 4], 0, 10 * 64)
    assert d.prefixes.cached_blocks("a", [1, 2, 3, 4]) == 2
    assert d.view("a").kv_cache_tokens == 10 * 64
    d.add_replica(replica("a", slots=8), 1.0)  # a new hello: the engine's figure stays
    assert d.view("a").kv_cache_tokens == 10 * 64
    [assign] = d.submit(Ticket(with_prefix("c2", [1, 2, 3, 4]), 1.0), 1.0)
    assert assign.cached_tokens == 2 * 64  # what the engine still holds
    d.finished("c2", 1.5)
    d.engine_cache("a", [], 1, None)  # the engine cleared its cache
    assert d.prefixes.cached_blocks("a", [1, 2, 3, 4]) == 0
    d.submit(Ticket(with_prefix("c3", [1, 2]), 2.0), 2.0)
    d.engine_cache("a", [], 1, None)  # the same count again: not a new clear
    assert d.prefixes.cached_blocks("a", [1, 2]) == 2
    d.engine_cache("gone", [1], 5, 64)  # a replica not (or no longer) known: nothing
    assert d.prefixes.get("gone") is None


def test_routers_that_do_not_use_prefixes_are_not_given_cached_tokens():
    seen = []

    class Spy(LeastOutstanding):
        def choose(self, inp):
            seen.append(inp.cached_tokens)
            return super().choose(inp)

    d = Dispatcher(Spy())
    d.add_replica(replica("a"), 0.0)
    d.submit(Ticket(with_prefix("c1", [1, 2]), 0.0), 0.0)
    assert seen == [None]


def test_a_forecasting_router_gets_forecasts_that_know_each_candidates_cached_prefix():
    """The service forecast is asked with what each candidate holds of the call's prompt, so
    `tail` compares completion times with the prefill each cache saves."""
    fixed = Fixed({"a": 1.0, "b": 1.0})
    d = Dispatcher(make_router("tail"), forecaster=fixed)
    for name in ("a", "b"):
        d.add_replica(replica(name, slots=4), 0.0)
    first = d.submit(Ticket(with_prefix("t1", [1, 2, 3]), 0.0), 0.0)
    holder = first[0].replica.replica
    d.finished("t1", 1.0)
    second = d.submit(Ticket(with_prefix("t2", [1, 2, 3, 4]), 1.0), 1.0)
    names = [v.replica for v in d.views()]
    expected = [3 * 64 if n == holder else 0 for n in names]
    assert fixed.cached[0] == [0, 0]
    assert sorted(fixed.cached[-1] or []) == sorted(expected)
    assert second[0].cached_tokens == (3 * 64 if second[0].replica.replica == holder else 0)


def test_a_replicas_prefill_speed_is_read_from_its_first_tokens():
    """The fast first tokens say the speed (queueing only slows them): the 0.9 quantile of the
    recent ones with enough to prefill; short prompts and calls without a first token say
    nothing; a replica that leaves takes its figures with it."""
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("n/a"), 0.0)
    assert d.view("n/a").prefill_tokens_per_s == 0.0  # unknown until measured
    for k in range(10):  # 8,000 tokens a second at best; queueing made most slower
        d.observe_prefill("n/a", 8000, 1.0 + 0.25 * k)
    d.observe_prefill("n/a", 100, 0.001)  # a short prompt: overheads, not speed
    d.observe_prefill("n/a", 8000, None)
    d.observe_prefill("n/gone", 8000, 1.0)
    assert d.view("n/a").prefill_tokens_per_s == pytest.approx(8000 / 1.25, rel=0.05)
    d.add_replica(replica("n/a"), 1.0)  # announced again (a new hello): what was measured stays
    assert d.view("n/a").prefill_tokens_per_s == pytest.approx(8000 / 1.25, rel=0.05)
    d.remove_replica("n/a")
    d.add_replica(replica("n/a"), 2.0)
    assert d.view("n/a").prefill_tokens_per_s == 0.0


def test_a_replicas_decode_pace_is_the_median_of_its_recent_calls_tokens_after_the_first():
    """What a composed service time multiplies the output tokens by (`swarmx.models.compose`):
    short answers, calls without a first token and nonsense say nothing; a new hello keeps it."""
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("n/a"), 0.0)
    assert d.view("n/a").decode_s_per_token == 0.0
    for pace in (0.02, 0.03, 0.05):  # 101 tokens: 100 after the first
        d.observe_decode("n/a", 101, 0.5 + 100 * pace, 0.5)
    d.observe_decode("n/a", 8, 10.0, 0.1)  # too short to say
    d.observe_decode("n/a", 101, 3.0, None)
    d.observe_decode("n/a", 101, 0.4, 0.5)  # a latency before its first token
    d.observe_decode("n/gone", 101, 3.0, 0.5)
    assert d.view("n/a").decode_s_per_token == pytest.approx(0.03)
    d.add_replica(replica("n/a"), 1.0)
    assert d.view("n/a").decode_s_per_token == pytest.approx(0.03)
    d.remove_replica("n/a")
    d.add_replica(replica("n/a"), 2.0)
    assert d.view("n/a").decode_s_per_token == 0.0


def test_a_replicas_pace_is_not_moved_by_one_absurd_report():
    """A node's result is bounded at decode (seconds up to 1e9, tokens up to 2^40), so its worst
    values are finite: one such call among its recent ones leaves the median where it was."""
    d = Dispatcher(LeastOutstanding())
    d.add_replica(replica("n/a"), 0.0)
    for _ in range(20):
        d.observe_decode("n/a", 101, 2.5, 0.5)  # 20 ms a token
    d.observe_decode("n/a", 16, 1e9, 0.0)  # a day-long call
    d.observe_decode("n/a", 1 << 40, 1.0, 0.5)  # a trillion tokens in half a second
    assert d.view("n/a").decode_s_per_token == pytest.approx(0.02)
    assert math.isfinite(d.view("n/a").decode_s_per_token)


def test_a_session_router_is_told_what_each_candidate_would_evict_that_is_still_wanted():
    """Hits teach the dispatcher how long after its last use a prefix comes back (the horizon);
    a router with ``uses_evictions`` gets, per candidate, the tokens of prefixes used within it
    that its call would push out of that replica's cache."""
    seen: list[dict[str, int]] = []

    class Spy(LeastOutstanding):
        uses_prefix = uses_evictions = True

        def choose(self, inp):
            names = [c.replica for c in inp.candidates]
            seen.append(dict(zip(names, inp.evicted_tokens, strict=True)))
            return Choice(names.index("a"))

    d = Dispatcher(Spy())
    small = dataclasses.replace(replica("a", slots=8), kv_cache_tokens=8 * 64)
    d.add_replica(small, 0.0)
    d.add_replica(dataclasses.replace(small, replica="b", node="b"), 0.0)
    assert d.reuse.horizon_s == 0.0
    d.submit(Ticket(with_prefix("s1-t1", [1, 2, 3, 4]), 0.0), 0.0)
    d.submit(Ticket(with_prefix("s1-t2", [1, 2, 3, 4, 5]), 10.0), 10.0)  # 10 s after: a hit
    assert d.reuse.horizon_s == 10.0
    d.submit(Ticket(with_prefix("s2-t1", [20, 21, 22]), 30.0), 30.0)  # a holds 8 of 8 now
    # s1 was last used 20 s ago, beyond the horizon: what s3 pushes out of a is not wanted;
    # s2's blocks, 5 s old, are. b is empty.
    d.submit(Ticket(with_prefix("s3-t1", [40, 41, 42, 43, 44, 45, 46]), 35.0), 35.0)
    assert seen[-1] == {"a": 2 * 64, "b": 0}  # seven new blocks on a: s1's five, two of s2's
    assert seen[0] == {"a": 0, "b": 0}


def test_queued_calls_sure_to_be_placed_are_prepared_together_in_queue_order():
    """When replicas open onto a queue, the calls about to be placed (as many as the open
    replicas have room for) go to the forecaster in one batch, in queue order, cancelled ones
    skipped; a single call placed alone is not batched, and a router that reads no forecast
    batches nothing."""
    fc = Fixed({"a/lm": 1.0, "b/lm": 2.0, "c/lm": 3.0})
    d = Dispatcher(make_router("tail"), forecaster=fc)
    for i in range(6):
        assert d.submit(Ticket(call(f"w{i}:x"), float(i)), float(i)) == []
    d.cancel(["w1:x"], 6.0)
    d.add_replica(replica("a/lm"), 7.0)  # one open replica: one call, alone
    assert fc.prepared == []
    placed = d.add_replica(replica("b/lm", slots=3), 8.0)  # room for three
    assert ids(placed) == ["w2:x", "w3:x", "w4:x"]
    assert fc.prepared == [["w2:x", "w3:x", "w4:x"]]
    assert d.queued("lm") == 1  # w5 waits: no call was taken off the queue and lost
    assert ids(d.finished("w0:x", 9.0)) == ["w5:x"]
    plain = Fixed({"a/lm": 1.0, "b/lm": 1.0})
    d = Dispatcher(LeastOutstanding(), forecaster=plain)
    for i in range(3):
        d.submit(Ticket(call(f"v{i}:x"), float(i)), float(i))
    d.add_replica(replica("a/lm", slots=2), 3.0)
    d.add_replica(replica("b/lm", slots=2), 3.0)
    assert plain.prepared == []
