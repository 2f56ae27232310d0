"""Per-call scheduler overhead on loopback: submit-to-dispatch and result-to-next-dispatch.

A real scheduler process; a stand-in node agent in this process speaks the real protocol over real
ZeroMQ (it registers one replica and answers every dispatch at once), so what is timed is the
scheduler alone plus its loopback hops: parsing, the SQLite journal, the engine, the router.

- submit-to-dispatch: client sends `submit` -> the node receives the first `dispatch`
  (one-step workflows, submitted one after another);
- result-to-next-dispatch: the node sends a `result` -> it receives the dependent step's
  `dispatch` (a chain of steps).

    .venv/bin/python bench/sched_overhead.py --chain 300 --submits 100

``--queue-ops 100,5000,50000`` instead times the dispatcher alone, in this process, per operation
with that many calls queued behind one busy slot (slack order, deadlines on every call): what each
call costs the scheduler at saturation must not grow with the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from swarmx.clock import RealClock
from swarmx.daemon.scheduler import read_state_file
from swarmx.protocol import (
    Ack,
    Dispatch,
    Heartbeat,
    Hello,
    ReplicaInfo,
    Result,
    Submit,
    Submitted,
)
from swarmx.sched.dispatch import Assign, Dispatcher, Ticket
from swarmx.sched.router import LeastOutstanding, ReplicaView
from swarmx.stats import quantile
from swarmx.transport import connect_dealer, request
from swarmx.workflow.engine import CallSpec


def chain(n: int) -> str:
    steps = []
    for i in range(n):
        after = f'"s{i - 1}"' if i else ""
        steps.append(
            f'[[steps]]\nid = "s{i}"\nkind = "llm"\nafter = [{after}]\n'
            f'model = "lm"\nprompt = "step {i}"\nmax_tokens = 1\n'
        )
    return 'name = "chain"\n' + "\n".join(steps)


def summary(xs: list[float]) -> dict[str, float]:
    ms = sorted(x * 1e3 for x in xs)
    return {
        "n": len(ms),
        "p50_ms": round(quantile(ms, 0.5), 3),
        "p99_ms": round(quantile(ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


async def fake_node(
    endpoint: str, arrivals: dict[str, float], sent: dict[str, float], stop: asyncio.Event
) -> None:
    clock = RealClock()
    ch = connect_dealer(endpoint, "bench", clock)
    hello = Hello(
        "bench",
        "localhost",
        os.getpid(),
        "bench",
        2,
        1,
        1 << 30,
        [],
        [ReplicaInfo("bench/lm#0", "lm", "emulated", "emulated:H100", 64)],
        1.0,
        1.0,
        clock.time(),
    )
    while True:  # like the real agent: hello until acknowledged (the socket connects lazily)
        await ch.send(hello)
        try:
            if isinstance((await asyncio.wait_for(ch.recv(), 0.2)).body, Ack):
                break
        except asyncio.TimeoutError:
            continue

    async def heartbeats() -> None:
        while True:
            await ch.send(Heartbeat(0.0))
            await asyncio.sleep(0.5)

    hb = asyncio.create_task(heartbeats())
    try:
        while not stop.is_set():
            try:
                env = await asyncio.wait_for(ch.recv(), 0.2)
            except asyncio.TimeoutError:
                continue
            if isinstance(env.body, Dispatch):
                d = env.body
                arrivals[d.call_id] = time.monotonic()
                sent[d.call_id] = time.monotonic()
                await ch.send(Result(d.call_id, d.replica, True, "x", "", 0.0, 0.0, None, 1, 1))
    finally:
        hb.cancel()
        ch.close()


async def main_async(args: argparse.Namespace, endpoint: str) -> dict[str, object]:
    arrivals: dict[str, float] = {}
    sent: dict[str, float] = {}
    stop = asyncio.Event()
    node = asyncio.create_task(fake_node(endpoint, arrivals, sent, stop))
    await asyncio.sleep(1.0)
    clock = RealClock()

    submit_lat = []
    one = (
        'name = "one"\n[[steps]]\nid = "a"\nkind = "llm"\nafter = []\nmodel = "lm"\nprompt = "hi"\n'
    )
    for _ in range(args.submits):
        t0 = time.monotonic()
        reply = await asyncio.to_thread(
            request, endpoint, Submit("one.toml", one), "bench", clock, 5.0
        )
        assert isinstance(reply.body, Submitted), reply.body
        call_id = f"{reply.body.workflow_id}:a:0:1"
        while call_id not in arrivals:
            await asyncio.sleep(0.0005)
        submit_lat.append(arrivals[call_id] - t0)

    reply = await asyncio.to_thread(
        request, endpoint, Submit("chain.toml", chain(args.chain)), "bench", clock, 5.0
    )
    assert isinstance(reply.body, Submitted), reply.body
    wf = reply.body.workflow_id
    last = f"{wf}:s{args.chain - 1}:0:1"
    while last not in arrivals:
        await asyncio.sleep(0.01)
    gaps = [arrivals[f"{wf}:s{i}:0:1"] - sent[f"{wf}:s{i - 1}:0:1"] for i in range(1, args.chain)]
    stop.set()
    await node
    return {"submit_to_dispatch": summary(submit_lat), "result_to_next_dispatch": summary(gaps)}


CALLS_PER_WORKFLOW = 5
QUEUE_OPS = ("submit", "budget_s", "cancel", "finished", "cancel_workflow", "end_workflow_scan")


class QueueBench:
    """A dispatcher whose one slot is busy, with ``size`` calls queued behind it, and the
    operations the scheduler runs per call, each leaving ``size`` calls queued."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.size = size
        self.d = Dispatcher(LeastOutstanding(), "slack")
        self.d.add_replica(ReplicaView("n/lm#0", "n", "lm", "emulated", "emulated:H100", 1, 0), 0.0)
        self.now, self.running, self.serial = 0.0, "", 0
        self.workflows: list[str] = []
        self.booked(self.d.submit(self.ticket("busy:s:0:1", "busy"), 0.0))
        while self.d.queued() < size:
            self.add_workflow(min(CALLS_PER_WORKFLOW, size - self.d.queued()))

    def ticket(self, call_id: str, wf: str) -> Ticket:
        call = CallSpec(call_id, wf, "s", None, 1, "llm", "lm", "p", 8, {}, [], None, [])
        slack = self.rng.uniform(1.0, 100.0)
        return Ticket(call, self.now, self.now + slack + 5.0, slack)

    def booked(self, assigns: list[Assign]) -> None:
        for a in assigns:
            self.running = a.ticket.call.call_id

    def new_id(self) -> str:
        self.serial += 1
        return f"w{self.serial}"

    def add_workflow(self, calls: int) -> None:
        wf = self.new_id()
        self.workflows.append(wf)
        for k in range(calls):
            self.booked(self.d.submit(self.ticket(f"{wf}:s{k}:0:1", wf), self.now))

    def op_submit_then_cancel(self, times: dict[str, list[float]]) -> None:
        wf = self.new_id()
        t0 = time.perf_counter()
        self.booked(self.d.submit(self.ticket(f"{wf}:s:0:1", wf), self.now))
        t1 = time.perf_counter()
        self.d.budget_s("lm")
        t2 = time.perf_counter()
        self.booked(self.d.cancel([f"{wf}:s:0:1"], self.now))
        t3 = time.perf_counter()
        times["submit"].append(t1 - t0)
        times["budget_s"].append(t2 - t1)
        times["cancel"].append(t3 - t2)

    def op_finished(self, times: dict[str, list[float]]) -> None:
        """The running call ends, the next queued one takes its slot; a new call refills."""
        self.now += 0.001
        t0 = time.perf_counter()
        self.booked(self.d.finished(self.running, self.now))
        times["finished"].append(time.perf_counter() - t0)
        self.add_workflow(self.size - self.d.queued())

    def op_end_workflow(self, times: dict[str, list[float]], scan: bool) -> None:
        """A workflow ends (its calls dropped); a new one refills the queue."""
        wf = self.workflows.pop(self.rng.randrange(len(self.workflows)))
        t0 = time.perf_counter()
        if scan:  # the caller's way before cancel_workflow: every queued call looked at
            queued = [t.call.call_id for t in self.d.queued_tickets()]
            self.booked(self.d.cancel([c for c in queued if c.startswith(f"{wf}:")], self.now))
        else:
            self.booked(self.d.cancel_workflow(wf, self.now))
        times["end_workflow_scan" if scan else "cancel_workflow"].append(time.perf_counter() - t0)
        self.add_workflow(self.size - self.d.queued())


def queue_ops(sizes: list[int], reps: int) -> dict[str, dict[str, float]]:
    """Mean microseconds per operation, per queue size."""
    out: dict[str, dict[str, float]] = {}
    for size in sizes:
        bench = QueueBench(size)
        times: dict[str, list[float]] = {k: [] for k in QUEUE_OPS}
        for _ in range(reps):
            bench.op_submit_then_cancel(times)
            bench.op_finished(times)
            bench.op_end_workflow(times, scan=False)
        for _ in range(max(3, reps // 20)):  # O(n log n): a few are enough
            bench.op_end_workflow(times, scan=True)
        assert bench.d.queued() == size, bench.d.queued()
        out[str(size)] = {k: round(statistics.fmean(v) * 1e6, 2) for k, v in times.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", type=int, default=300)
    ap.add_argument("--submits", type=int, default=100)
    ap.add_argument(
        "--queue-ops",
        metavar="SIZES",
        help="time the dispatcher's per-call operations with these many calls queued "
        "(comma-separated), in this process, instead of the loopback run",
    )
    ap.add_argument("--reps", type=int, default=2000, help="operations timed per size")
    args = ap.parse_args()
    if args.queue_ops:
        sizes = [int(s) for s in args.queue_ops.split(",")]
        print(json.dumps({"queue_ops_us": queue_ops(sizes, args.reps)}, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        sched = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swarmx",
                "scheduler",
                "start",
                "--listen",
                "tcp://127.0.0.1:0",
                "--state-dir",
                tmp,
                "--log-level",
                "warning",
            ]
        )
        try:
            while not (state := read_state_file(tmp)):
                time.sleep(0.05)
            print(json.dumps(asyncio.run(main_async(args, state["endpoint"])), indent=2))
        finally:
            sched.send_signal(signal.SIGTERM)
            sched.wait(timeout=10)


if __name__ == "__main__":
    main()
