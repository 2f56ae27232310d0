"""LeastOutstanding: fewest outstanding calls wins, ties rotate, failed-on replicas avoided."""

from collections import Counter

from swarmx.sched.router import LeastOutstanding, ReplicaView, usable
from swarmx.workflow.engine import CallSpec


def call(avoid=(), call_id="c") -> CallSpec:
    return CallSpec(
        call_id, "wf", "step", None, 0, "llm", "lm", "p", 16, {}, [], None, [], list(avoid)
    )


def view(replica: str, outstanding: int = 0) -> ReplicaView:
    node = replica.split("/", maxsplit=1)[0]
    return ReplicaView(replica, node, "lm", "emulated", "emulated:H100", 4, outstanding)


def test_picks_the_replica_with_fewest_outstanding():
    router = LeastOutstanding()
    pool = [view("a/lm#0", 3), view("b/lm#0", 1), view("c/lm#0", 2)]
    for i in range(5):  # no tie: always the same one
        assert router.choose(call(call_id=f"c{i}"), pool).replica == "b/lm#0"


def test_zero_outstanding_beats_any_load():
    pool = [view("a/lm#0", 7), view("b/lm#0", 0), view("c/lm#0", 1)]
    assert LeastOutstanding().choose(call(), pool).replica == "b/lm#0"


def test_ties_rotate_round_robin_across_calls():
    router = LeastOutstanding()
    pool = [view("c/lm#0", 1), view("a/lm#0", 1), view("b/lm#0", 1), view("d/lm#0", 5)]
    picks = [router.choose(call(call_id=f"c{i}"), pool).replica for i in range(9)]
    assert Counter(picks) == {"a/lm#0": 3, "b/lm#0": 3, "c/lm#0": 3}
    # a full rotation before any repeat, in the same order every round
    assert len(set(picks[:3])) == 3
    assert picks[3:6] == picks[:3]
    assert picks[6:9] == picks[:3]


def test_rotation_does_not_depend_on_candidate_order():
    pool = [view("a/lm#0"), view("b/lm#0"), view("c/lm#0")]
    first, second = LeastOutstanding(), LeastOutstanding()
    picks1 = [first.choose(call(), pool).replica for _ in range(6)]
    picks2 = [second.choose(call(), list(reversed(pool))).replica for _ in range(6)]
    assert picks1 == picks2


def test_following_outstanding_counts_spreads_load_evenly():
    router = LeastOutstanding()
    load = {"a/lm#0": 0, "b/lm#0": 0, "c/lm#0": 0}
    for i in range(30):
        pool = [view(r, n) for r, n in load.items()]
        load[router.choose(call(call_id=f"c{i}"), pool).replica] += 1
    assert set(load.values()) == {10}


def test_avoided_replicas_are_skipped():
    router = LeastOutstanding()
    pool = [view("a/lm#0", 0), view("b/lm#0", 4), view("c/lm#0", 6)]
    retry = call(avoid=["a/lm#0"])
    for _ in range(4):
        assert router.choose(retry, pool).replica == "b/lm#0"
    assert router.choose(call(avoid=["a/lm#0", "b/lm#0"]), pool).replica == "c/lm#0"


def test_avoided_ties_are_left_out_of_the_rotation():
    router = LeastOutstanding()
    pool = [view("a/lm#0"), view("b/lm#0"), view("c/lm#0")]
    picks = {router.choose(call(avoid=["b/lm#0"]), pool).replica for _ in range(6)}
    assert picks == {"a/lm#0", "c/lm#0"}


def test_all_avoided_falls_back_to_every_candidate():
    router = LeastOutstanding()
    pool = [view("a/lm#0", 2), view("b/lm#0", 1)]
    everyone = call(avoid=["a/lm#0", "b/lm#0"])
    assert router.choose(everyone, pool).replica == "b/lm#0"
    assert usable(everyone, pool) == pool


def test_avoiding_an_unknown_replica_changes_nothing():
    pool = [view("a/lm#0", 2), view("b/lm#0", 1)]
    assert list(usable(call(avoid=["zzz/lm#9"]), pool)) == pool
    assert LeastOutstanding().choose(call(avoid=["zzz/lm#9"]), pool).replica == "b/lm#0"


def test_single_candidate():
    only = view("a/lm#0", 9)
    router = LeastOutstanding()
    assert router.choose(call(), [only]) is only
    assert router.choose(call(avoid=["a/lm#0"]), [only]) is only
    assert router.name == "least_outstanding"
