"""The dispatcher: calls wait until a replica has room, leave in queue order, go where the router
says, and every slot is given back."""

from collections.abc import Sequence

import pytest

from swarmx.models.dist import LatencyDist
from swarmx.sched.dispatch import MIX_CALLS, Dispatcher, ServiceMix, Ticket
from swarmx.sched.router import LeastOutstanding, ReplicaView, make_router
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

    def service(self, c: CallSpec, cands: Sequence[ReplicaView]) -> list[LatencyDist]:
        self.asked.append(len(cands))
        return [LatencyDist.lognormal(self.seconds[v.replica], 0.1, (0.5, 0.9)) for v in cands]

    def load_only(self, c: CallSpec, cands: Sequence[ReplicaView]) -> list[LatencyDist]:
        return self.service(c, cands)


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
        name, forecast = "fastest", "service"

        def choose(self, inp):
            from swarmx.sched.router import Decision

            best = min(range(len(inp.candidates)), key=lambda i: inp.forecasts[i].quantile(0.5))
            return Decision(best, inp.forecasts[best])

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
    """Nine 1 s calls and one 20 s call: the pool's p90 is the long call, which queueing is made
    of; averaging log-quantiles would have given about 1.35 s."""
    fc = Fixed({"a/lm": 1.0, "b/lm": 20.0})
    d = Dispatcher(LeastOutstanding(), forecaster=fc)
    d.add_replica(replica("a/lm", slots=100), 0.0)
    d.add_replica(replica("b/lm", slots=0), 0.0)
    for k in range(9):
        d.submit(Ticket(call(f"w{k}:x"), 0.0), 0.0)
    fc.seconds["a/lm"] = 20.0
    d.submit(Ticket(call("w9:x"), 0.0), 0.0)
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
