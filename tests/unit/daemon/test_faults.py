"""The workflow service under faults, with a fake cluster and a hand-driven clock: fencing of calls
a node no longer owns, adoption after a restart, a node's goodbye, idempotent submits and the
scheduler's capacity (docs/reliability.md; the real-process versions are in
tests/integration/test_reliability.py)."""

from __future__ import annotations

import asyncio

import pytest

from swarmx.daemon.limits import Capacity, Overloaded
from swarmx.daemon.workflows import WorkflowService
from swarmx.protocol import Submit
from swarmx.sched.router import LeastOutstanding
from swarmx.store import Store
from tests.unit.daemon.test_deadlines import CHAIN, Cluster

ONE = """
name = "one"
[[steps]]
id = "a"
kind = "llm"
model = "lm"
prompt = "hi"
"""


def test_a_call_given_to_another_node_is_cancelled_where_it_still_runs(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        await c.submit(ONE)
        call = c.sent[0].call_id
        await c.service.reconcile("n", {call: "n/lm#0"})  # where it belongs: nothing to do
        assert c.cancelled == []
        await c.service.reconcile("m", {call: "m/lm#0", "wf-x:a:0:1": "m/lm#0"})
        return c, call

    c, call = asyncio.run(main())
    assert sorted(c.cancelled) == sorted([call, "wf-x:a:0:1"])
    assert c.service.faults.fenced_calls == 2


def test_a_call_re_run_after_its_node_was_lost_is_fenced_there(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        await c.submit(ONE)
        first = c.sent[0].call_id
        await c.service.on_node_down("n")  # re-run as attempt 2
        await c.service.reconcile("n", {first: "n/lm#0"})  # the node is back and still runs it
        late = c.service.faults.results_dropped["late"]
        await c.finish(first)  # and its result arrives
        return c, first, late

    c, first, late_before = asyncio.run(main())
    assert first.endswith(":1") and c.sent[-1].call_id.endswith(":2")
    assert c.cancelled == [first]
    assert c.service.faults.results_dropped["late"] == late_before + 1


def test_a_node_listing_a_call_whose_result_just_came_is_not_fenced(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        await c.submit(ONE)
        call = c.sent[0].call_id
        await c.finish(call)
        await c.service.reconcile("n", {call: "n/lm#0"})  # the heartbeat raced the result
        return c

    c = asyncio.run(main())
    assert c.cancelled == [] and c.service.faults.fenced_calls == 0


def _restarted(tmp_path, c: Cluster) -> Cluster:
    """A second service on the first one's journal, as after a crash (nothing was closed)."""
    c.service.store.commit()
    fresh = Cluster.__new__(Cluster)
    fresh.clock, fresh.sent, fresh.cancelled, fresh.nodes = c.clock, [], [], c.nodes
    fresh.tickets = []
    fresh.service = WorkflowService(
        Store(tmp_path / "swarmx.db"),
        LeastOutstanding(),
        c.nodes,
        c.clock,
        fresh.send,
        capacity=Capacity(recovery_grace_s=5.0),
    )
    return fresh


def test_after_a_restart_reported_calls_are_adopted_and_the_rest_re_run(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        kept = await c.submit(ONE)
        lost = await c.submit(ONE)
        sent = {d.workflow_id: d.call_id for d in c.sent}
        r = _restarted(tmp_path, c)
        assert await r.service.recover() == 2
        await r.start()
        assert r.sent == []  # nothing goes out during the grace
        await r.service.reconcile("n", {sent[kept]: "n/lm#0"})
        r.clock.now += 6
        await r.service.check_deadlines()  # the grace is over: the unreported call re-runs
        await r.finish(sent[kept], output="adopted")
        return r, sent, kept, lost

    r, sent, kept, lost = asyncio.run(main())
    assert r.service.faults.adopted == 1
    assert [d.call_id for d in r.sent] == [sent[lost][:-1] + "2"]  # a new attempt
    assert r.service.store.workflow(kept).state == "succeeded"
    assert r.service.views.view(kept, detailed=True).steps[0].output == "adopted"


def test_a_result_sent_while_the_scheduler_was_down_is_taken_after_the_restart(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        await c.submit(CHAIN)
        first = c.sent[0].call_id
        r = _restarted(tmp_path, c)
        await r.service.recover()
        await r.start()
        await r.finish(first, output="A")  # re-sent by the node: no heartbeat needed
        return r

    r = asyncio.run(main())
    assert [d.step_id for d in r.sent] == ["b"]
    assert "A" in r.sent[0].prompt
    assert r.service.faults.adopted == 1


def test_goodbye_stops_new_calls_and_the_final_one_re_runs_what_is_left(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        await c.submit(ONE)
        call = c.sent[0].call_id
        await c.service.on_goodbye("n", False, [])
        await c.submit(ONE)
        waiting = len(c.sent)  # the second call waits: the only node is leaving
        rerun = await c.service.on_goodbye("n", True, [call])
        return c, waiting, rerun

    c, waiting, rerun = asyncio.run(main())
    assert waiting == 1 and rerun == 1
    assert c.service.dispatcher.views() == []
    assert c.service.dispatcher.queued() == 2  # the handed-back call (attempt 2) and the new one


def test_a_submit_with_a_known_key_returns_the_first_workflow(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        first = await c.service.submit(Submit("wf.toml", ONE, idempotency_key="k"), "alice")
        again = await c.service.submit(Submit("wf.toml", ONE, idempotency_key="k"), "alice")
        other = await c.service.submit(Submit("wf.toml", ONE, idempotency_key="k"), "bob")
        return c, first, again, other

    c, first, again, other = asyncio.run(main())
    assert first == (first[0], False) and again == (first[0], True)
    assert other[0] != first[0] and not other[1]  # keys are per client
    assert len(c.sent) == 2


def test_a_full_scheduler_refuses_and_counts(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        c.service.capacity = Capacity(max_workflows=1)
        await c.start()
        await c.submit(ONE)
        with pytest.raises(Overloaded, match="nothing was accepted"):
            await c.submit(ONE)
        return c

    c = asyncio.run(main())
    assert c.service.faults.overloaded == 1 and len(c.service.runs) == 1


def test_after_a_restart_only_the_journaled_node_may_take_a_call_over(tmp_path):
    async def main():
        c = Cluster(tmp_path)
        await c.start()
        wf = await c.submit(ONE)
        call = c.sent[0].call_id  # journaled as dispatched to node "n"
        r = _restarted(tmp_path, c)
        await r.service.recover()
        await r.start()
        await r.service.reconcile("m", {call: "m/lm#0"})  # another node claims it
        claimed = r.service.faults.adopted
        await r.finish(call, output="from n")  # the rightful node's result
        return r, wf, call, claimed

    r, wf, call, claimed = asyncio.run(main())
    assert claimed == 0 and r.cancelled == [call]  # refused, and cancelled where claimed
    assert r.service.faults.adopted == 1
    assert r.service.store.workflow(wf).state == "succeeded"
