"""The scheduler's scaling loop against a fake cluster: pool states, placement, drain and
reconciliation with what nodes announce (no sockets, a hand-driven clock)."""

from __future__ import annotations

import asyncio

import msgspec

from swarmx.clock import ManualClock
from swarmx.cluster import NodeTable
from swarmx.config import ScalerConfig
from swarmx.daemon import scaling
from swarmx.daemon.observe import Observer
from swarmx.daemon.scaling import ScaleController
from swarmx.daemon.workflows import WorkflowService
from swarmx.metrics import SchedulerMetrics
from swarmx.models.online import OnlineLearner
from swarmx.protocol import (
    Hello,
    ReplicaInfo,
    ReplicaPool,
    ReplicaRuntime,
    ScaleCommand,
    SchedulerInfo,
    Telemetry,
)
from swarmx.sched.dispatch import Ticket
from swarmx.sched.router import LeastOutstanding
from swarmx.sched.scaler import NoScaler, PoolState
from swarmx.store import Store
from swarmx.workflow.engine import CallSpec
from tests.unit.test_protocol import TELEMETRY


class Fixed:
    """A scaler that asks for fixed targets and remembers what it was shown."""

    name = "fixed"

    def __init__(self, targets: dict[str, int]) -> None:
        self.targets = targets
        self.seen: list[PoolState] = []

    def decide(self, now_s, pools):
        self.seen = list(pools)
        return dict(self.targets)


def hello(
    node: str,
    replicas: list[str],
    target: int | None = None,
    draining=(),
    max_count=3,
    *,
    startup_delay_s=0.0,
    warmup_s=(),
):
    infos = [
        ReplicaInfo(r, "lm", "emulated", "emulated:H100", 2, draining=r in draining)
        for r in replicas
    ]
    serving = len([r for r in replicas if r not in draining])
    pool = ReplicaPool(
        "lm",
        "emulated",
        "emulated:H100",
        2,
        1,
        max_count,
        serving if target is None else target,
        startup_delay_s=startup_delay_s,
        warmup_s=list(warmup_s),
    )
    return Hello(node, "host", 1, "0", 2, 1, 1 << 30, [], infos, 1.0, 1.0, 0.0, {}, [pool])


INFO = SchedulerInfo("tcp://127.0.0.1:7700", "0.1.0", 1.0, {})


def call(n: int) -> CallSpec:
    return CallSpec(f"wf:s:{n}:1", "wf", "s", n, 1, "llm", "lm", "hi", 8, {}, [], None, [])


class Cluster:
    def __init__(self, tmp_path, scaler, cfg: ScalerConfig | None = None) -> None:
        self.clock = ManualClock(1000.0)
        self.sent: list[tuple[str, object]] = []
        self.nodes = NodeTable(3, 10)
        self.store = Store(tmp_path / "swarmx.db")
        self.service = WorkflowService(
            self.store, LeastOutstanding(), self.nodes, self.clock, self.send
        )
        self.ctl = ScaleController(
            cfg or ScalerConfig(policy="threshold", interval_s=5),
            scaler,
            self.service,
            self.clock,
            self.send,
        )

    async def send(self, node, body) -> bool:
        self.sent.append((node, body))
        return True

    async def hello(self, h: Hello) -> None:
        self.nodes.register(h, h.node.encode(), self.clock.monotonic(), self.clock.time())
        self.ctl.on_hello(h)
        await self.service.on_hello(h)

    def commands(self) -> list[tuple[str, ScaleCommand]]:
        return [(n, b) for n, b in self.sent if isinstance(b, ScaleCommand)]

    def busy(self, replica: str, n: int) -> None:
        """Book ``n`` calls on ``replica`` (others are made unavailable meanwhile)."""
        d = self.service.dispatcher
        others = [v.replica for v in d.views() if v.replica != replica]
        for r in others:
            d.set_live(r, False, 0.0)
        for i in range(n):
            d.submit(Ticket(call(hash(replica) % 1000 * 100 + i), 0.0), 0.0)
        for r in others:
            d.set_live(r, True, 0.0)


def run(coro):
    return asyncio.run(coro)


def test_scale_up_goes_to_the_node_with_the_fewest_replicas(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({"lm": 5}))
        await c.hello(hello("a", ["a/lm#0"]))
        await c.hello(hello("b", ["b/lm#0", "b/lm#1"]))
        decisions = await c.ctl.tick()
        state = c.ctl.scaler.seen[0]
        c.ctl.scaler.targets = {}  # keep: the next state counts what is starting
        await c.ctl.tick()
        return c.commands(), decisions, state, c.ctl.scaler.seen[0]

    commands, decisions, state, after = run(main())
    assert (state.ready, state.starting, state.concurrency) == (3, 0, 2)
    assert (state.min_replicas, state.max_replicas) == (2, 6)  # declared 1+1; max_count 3+3
    assert [(n, c.model, c.backend, c.target_replicas, c.remove) for n, c in commands] == [
        ("a", "lm", "emulated", 3, []),
    ]
    assert "fixed: 3 ready + 0 starting" in commands[0][1].reason
    assert decisions[0].commands == {"a": 3}
    assert (after.ready, after.starting) == (3, 2)  # asked for, not announced yet


def test_targets_are_kept_within_min_and_max(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({"lm": 50}))
        await c.hello(hello("a", ["a/lm#0"]))
        await c.ctl.tick()
        return c.commands()

    [(node, cmd)] = run(main())
    assert (node, cmd.target_replicas) == ("a", 3)  # max_count


def test_the_configured_floor_holds_whatever_the_policy_says(tmp_path):
    async def main():
        cfg = ScalerConfig(policy="threshold", min_replicas={"lm": 2})
        c = Cluster(tmp_path, NoScaler(), cfg)
        await c.hello(hello("a", ["a/lm#0"]))
        await c.ctl.tick()
        return c.commands()

    [(node, cmd)] = run(main())
    assert (node, cmd.target_replicas) == ("a", 2)
    assert cmd.reason.startswith("outside min/max")


def test_scale_down_drains_an_idle_replica_and_routes_around_it(tmp_path):
    async def main():
        cfg = ScalerConfig(policy="threshold", min_replicas={"lm": 1})
        c = Cluster(tmp_path, Fixed({"lm": 2}), cfg)
        await c.hello(hello("a", ["a/lm#0", "a/lm#1"]))
        await c.hello(hello("b", ["b/lm#0"]))
        c.busy("a/lm#0", 2)
        await c.ctl.tick()
        draining = dict(c.service.draining)
        # new calls never go to the draining replica
        routed = []
        for i in range(4):
            assigns = c.service.dispatcher.submit(Ticket(call(500 + i), 0.0), 0.0)
            routed += [a.replica.replica for a in assigns]
        return c.commands(), draining, c.service.dispatcher.views(), routed

    commands, draining, views, dispatched = run(main())
    assert [(n, c.target_replicas, c.remove) for n, c in commands] == [("a", 1, ["a/lm#1"])]
    assert draining == {"a/lm#1": "a"}
    assert "a/lm#1" in {v.replica for v in views}  # still booked until the node says it is gone
    assert set(dispatched) == {"b/lm#0"}


def test_the_node_is_believed_once_it_has_applied_the_command(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({"lm": 1}))
        await c.hello(hello("a", ["a/lm#0", "a/lm#1"]))
        await c.ctl.tick()
        [(_, cmd)] = c.commands()
        gone = cmd.remove[0]
        steps = []
        # a hello sent before the node saw the command: the drain stands
        await c.hello(hello("a", ["a/lm#0", "a/lm#1"]))
        steps.append(dict(c.service.draining))
        # the node applied it: it says so itself
        await c.hello(hello("a", ["a/lm#0", "a/lm#1"], target=1, draining=[gone]))
        steps.append(dict(c.service.draining))
        # drained and closed: the replica leaves the dispatcher
        await c.hello(hello("a", sorted({"a/lm#0", "a/lm#1"} - {gone})))
        steps.append(dict(c.service.draining))
        return gone, steps, [v.replica for v in c.service.dispatcher.views()]

    gone, steps, left = run(main())
    assert steps == [{gone: "a"}, {gone: "a"}, {}]
    assert left == sorted({"a/lm#0", "a/lm#1"} - {gone})


def test_an_unconfirmed_drain_is_given_up_and_the_replica_serves_again(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({"lm": 1}))
        await c.hello(hello("a", ["a/lm#0", "a/lm#1"]))
        await c.ctl.tick()
        before = dict(c.service.draining)
        c.ctl.scaler.targets = {}
        c.clock.now += scaling.COMMAND_TIMEOUT_S + 1
        c.nodes.seen("a", b"a", c.clock.monotonic(), c.clock.time())
        await c.ctl.tick()
        return before, dict(c.service.draining)

    before, after = run(main())
    assert len(before) == 1
    assert after == {}


def test_a_refused_command_is_forgotten_at_once(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({"lm": 1}))
        await c.hello(hello("a", ["a/lm#0", "a/lm#1"]))
        await c.ctl.tick()
        before = {r for r, rep in c.service.dispatcher.replicas.items() if not rep.live}
        await c.ctl.on_refused("a")
        live = [
            v.replica for v in c.service.dispatcher.views() if v.replica not in c.service.draining
        ]
        return before, dict(c.service.draining), live

    before, after, live = run(main())
    assert len(before) == 1
    assert after == {}
    assert sorted(live) == ["a/lm#0", "a/lm#1"]


def test_a_node_restart_clears_its_drains(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({"lm": 1}))
        await c.hello(hello("a", ["a/lm#0", "a/lm#1"]))
        await c.ctl.tick()
        c.ctl.scaler.targets = {}
        restarted = msgspec.structs.replace(hello("a", ["a/lm#0", "a/lm#1"]), pid=2)
        await c.hello(restarted)
        return dict(c.service.draining), [v.replica for v in c.service.dispatcher.views()]

    draining, views = run(main())
    assert draining == {}
    assert sorted(views) == ["a/lm#0", "a/lm#1"]


def test_stale_nodes_do_not_count(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({}))
        await c.hello(hello("a", ["a/lm#0"]))
        await c.hello(hello("b", ["b/lm#0"]))
        c.clock.now += 5
        c.nodes.seen("a", b"a", c.clock.monotonic(), c.clock.time())
        c.nodes.sweep(c.clock.monotonic())
        await c.ctl.tick()
        return c.ctl.scaler.seen

    [state] = run(main())
    assert (state.ready, state.min_replicas, state.max_replicas) == (1, 1, 3)


def test_models_no_node_can_scale_are_left_alone(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({"other": 3}))
        await c.hello(hello("a", ["a/lm#0"]))
        await c.ctl.tick()
        return c.commands()

    assert run(main()) == []


def test_the_lead_time_is_the_nodes_measured_start_ups_pooled_else_the_slowest_prior(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({"lm": 3}))
        leads = []
        await c.hello(hello("a", ["a/lm#0"]))
        await c.ctl.tick()
        leads.append(c.ctl.scaler.seen[0].lead_s)
        await c.hello(hello("a", ["a/lm#0"], startup_delay_s=40.0, warmup_s=[20.0]))
        await c.hello(hello("b", ["b/lm#0"], startup_delay_s=60.0, warmup_s=[25.0]))
        await c.ctl.tick()
        leads.append(c.ctl.scaler.seen[0].lead_s)
        await c.hello(hello("b", ["b/lm#0"], startup_delay_s=60.0, warmup_s=[25.0, 90.0, 30.0]))
        await c.ctl.tick()
        leads.append(c.ctl.scaler.seen[0].lead_s)
        return leads, c.commands()

    leads, commands = run(main())
    assert leads[0] is None  # neither configured nor measured
    assert leads[1] == 60.0  # two start-ups measured: the slowest configured one
    assert leads[2] == 90.0  # the p90 of a's 20 s and b's 25, 90 and 30 s
    first, second = (cmd.reason for _, cmd in commands)  # up to 3 on a; down to 3 with b
    assert "lead" not in first and second.endswith(", lead 60.0s")  # the decision says its lead


def test_top_shows_each_scalable_models_measured_warm_up_even_at_zero_replicas(tmp_path):
    async def main():
        c = Cluster(tmp_path, Fixed({}))
        learner = OnlineLearner(tmp_path)
        observer = Observer(
            c.service, c.nodes, learner, c.clock, SchedulerMetrics(), router="r", scaler="s"
        )
        tops = []
        await c.hello(hello("a", [], startup_delay_s=40.0, warmup_s=[20.0, 30.0]))
        tops.append(await observer.snapshot(INFO))
        await c.hello(hello("b", ["b/lm#0"], warmup_s=[90.0]))
        tops.append(await observer.snapshot(INFO))
        c.clock.now += 5  # b goes stale: its start-ups no longer count
        c.nodes.seen("a", b"a", c.clock.monotonic(), c.clock.time())
        c.nodes.sweep(c.clock.monotonic())
        tops.append(await observer.snapshot(INFO))
        return [[(m.model, m.replicas, m.warmup_p90_s) for m in t.models] for t in tops]

    unmeasured, measured, stale = run(main())
    assert unmeasured == [("lm", 0, None)]  # scaled to zero, listed; the prior is not shown
    assert measured == [("lm", 1, 90.0)]  # the p90 of 20, 30 and 90 s
    assert stale == [("lm", 0, None)]


def test_an_engines_own_queue_reaches_the_routers_as_calls_from_elsewhere(tmp_path):
    """vLLM on a/lm#0 says 6 running and 2 waiting, of which the node has 3 in it: 5 are not
    this scheduler's; the least-outstanding router then sends the next call to a/lm#1."""

    async def main():
        c = Cluster(tmp_path, Fixed({}))
        await c.hello(hello("a", ["a/lm#0", "a/lm#1"]))
        rt = [
            ReplicaRuntime("a/lm#0", "lm", 0, 3, 0, 0, [], engine_queued=2, engine_running=6),
            ReplicaRuntime("a/lm#1", "lm", 0, 0, 0, 0, []),  # its engine says nothing
            ReplicaRuntime("b/lm#0", "lm", 0, 0, 0, 0, [], engine_running=9),  # not a's
        ]
        c.service.on_telemetry("a", Telemetry(TELEMETRY.host, [], rt, 0.0))
        d = c.service.dispatcher
        external = {v.replica: v.external for v in d.views()}
        sent = d.submit(Ticket(call(1), 0.0), 0.0)
        quiet = [ReplicaRuntime("a/lm#0", "lm", 0, 0, 0, 0, [], engine_running=0)]
        c.service.on_telemetry("a", Telemetry(TELEMETRY.host, [], quiet, 0.0))
        return external, [a.replica.replica for a in sent], d.view("a/lm#0")

    external, sent, after = run(main())
    assert external == {"a/lm#0": 5, "a/lm#1": 0}
    assert sent == ["a/lm#1"]
    assert after is not None and after.external == 0 and after.load == 0
