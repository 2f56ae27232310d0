"""Per-call scheduler overhead on loopback: submit-to-dispatch and result-to-next-dispatch.

A real scheduler process; a stand-in node agent in this process speaks the real protocol over real
ZeroMQ (it registers one replica and answers every dispatch at once), so what is timed is the
scheduler alone plus its loopback hops: parsing, the SQLite journal, the engine, the router.

- submit-to-dispatch: client sends `submit` -> the node receives the first `dispatch`
  (one-step workflows, submitted one after another);
- result-to-next-dispatch: the node sends a `result` -> it receives the dependent step's
  `dispatch` (a chain of steps).

    .venv/bin/python bench/sched_overhead.py --chain 300 --submits 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from swarmx.transport import connect_dealer, request


def chain(n: int) -> str:
    steps = []
    for i in range(n):
        after = f'"s{i - 1}"' if i else ""
        steps.append(
            f'[[steps]]\nid = "s{i}"\nkind = "llm"\nafter = [{after}]\n'
            f'model = "lm"\nprompt = "step {i}"\nmax_tokens = 1\n'
        )
    return 'name = "chain"\n' + "\n".join(steps)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(xs: list[float]) -> dict[str, float]:
    ms = [x * 1e3 for x in xs]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 0.5), 3),
        "p99_ms": round(pct(ms, 0.99), 3),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", type=int, default=300)
    ap.add_argument("--submits", type=int, default=100)
    args = ap.parse_args()
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
