"""Scheduler load benchmark (issue 18): the real scheduler under many emulated nodes and a fixed
rate of calls.

    .venv/bin/python bench/load.py --nodes 1000 --rate 500 --seconds 300 --router tail --json

- **Scheduler**: the real daemon (``python -m swarmx scheduler start``, a child process) on
  127.0.0.1, port 0, in a temporary state directory, with CURVE on: keys for the scheduler, every
  node, an ``admin`` and the load client, authorized the way docs/security.md lays out
  (``nodes/``, ``admins/``, ``clients/``); metrics on a free port; the router under test
  (``--router``) and no scaler (``--scaler none``: the replica set stays fixed). A router that
  forecasts (``tail``, ``mean_predicted``, ``p90_load``) gets a neural predictor trained once on
  bench/data/example_traces.jsonl (cached under ``--cache-dir``) and installed live, as
  `swarmx predictor install` does.
- **Nodes**: ``--nodes`` node agents emulated over ``--procs`` worker processes, many per process.
  Each has its own DEALER socket (`connect_dealer`, CURVE) and speaks the agent's protocol:
  ``hello`` until acknowledged (again after ``unregistered``), a heartbeat (with the calls it runs)
  and a telemetry sample every ``--interval-s``, a ``result`` for every ``dispatch`` re-sent until
  acknowledged, a dispatch of a call it was given before answered instead of run twice,
  ``cancel_calls`` honoured, ``scale`` refused (its one replica is fixed). Calls run on the node
  agent's own `ReplicaSet` over one emulated replica (`EmulatedServer`: the GPU timing model of
  swarmx/backends/emulated.py, continuous batching and all), ``--concurrency`` slots. The
  telemetry sample is synthetic (a 64-core host, one H100), built once per node.
- **Workload**: this process submits one-step LLM workflows (a ~``--prompt-tokens`` prompt, up to
  ``--max-tokens`` out, an SLO of ``--slo-s``) at ``--rate`` per second for ``--seconds``,
  pipelined on one client DEALER socket. Then it waits (up to ``--drain-s``) for every workflow
  to finish, and reads from the scheduler's journal how each one ended.

Figures (``--json`` prints exactly one JSON object with these keys, and a few more):

- ``calls``: workflows submitted and accepted (one LLM call each);
- ``lost``: accepted workflows not ``succeeded`` when the drain ended;
- ``duplicated``: logical calls (workflow, step, instance: the call id without its attempt) that
  the nodes completed more than once, all nodes together;
- ``dispatch_overhead_ms``: p50 and p99 of the first dispatch of a workflow's call arriving at
  its node, minus the client sending its submit: parsing, the journal, the engine, routing and
  both loopback hops, for the submits sent in the measured window. With capacity to spare
  nothing waits for a replica; when calls may have waited (the scheduler's queue gauge above 0,
  or as many calls running at once as there are slots) a warning says so, as the figure then
  holds queueing;
- ``telemetry_lag_ms``: p50 and p99 of a node sending a heartbeat, which carries its telemetry
  (as the agent does at its default intervals), to the scheduler's acknowledgement of it arriving
  back: the round trip bounds telemetry's one-way delay;
- ``max_loop_gap_ms``: the longest stall of the scheduler's event loop: its metric
  ``swarmx_scheduler_loop_gap_max_seconds`` (the worst over the last 10 s) scraped every 2 s, the
  largest of the scrapes whose 10 s lie in the measured window (only the last scrape if the
  window is shorter than that); null (and a warning) if the scheduler does not export it;
- ``scheduler_cpu_cores``: the scheduler process's CPU time (every thread) over the measured
  window, divided by its wall time;
- ``scheduler_rss_mib``: its resident memory at the start and at the end of the measured window.

Extras to read them by: ``submitted`` and ``unanswered`` (submits the scheduler had not answered
when the drain ended: a rate it cannot sustain, with a warning; they are not in ``calls``, so
not in ``lost`` either), ``submit_reply_ms`` (submit to its ``submitted``), ``workflow_states``,
``ready_to_dispatch_ms`` (the journal's wait of each call from ready to dispatched),
``calls_running_max`` of ``slots``, ``node_counters`` and ``node_errors``, and ``warnings``.

The measured window is the load phase less a warm-up at its start (``--warmup-s``: 10% of the
run, 1 to 30 s); ``calls``, ``lost`` and ``duplicated`` count the whole run. Every timestamp is
CLOCK_MONOTONIC, which all processes on the host share. Both latencies include the emulators' own
event-loop delays: ``bench_loop_gap_max_ms`` says how long those got, and ``bench_cpu_cores`` how
much CPU the bench took (on a small machine it competes with the scheduler). Every process the
bench starts is stopped when it ends, Ctrl-C and errors included; ``--keep DIR`` keeps the state
directory (journal, keys, scheduler log) there.

About 1,400 lines, on purpose: a bench is one script to copy and run (the emulated node agents,
the client, the scheduler process and the report), and its node workers load it as their main
module.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from swarmx import __version__
from swarmx.clock import RealClock, ticks
from swarmx.config import NodeConfig, ReplicaConfig
from swarmx.daemon.node import ResultOutbox
from swarmx.daemon.replicas import ReplicaSet
from swarmx.daemon.scheduler import DB_FILE, read_state_file
from swarmx.protocol import (
    Ack,
    CancelCalls,
    Dispatch,
    Envelope,
    Error,
    GpuInfo,
    GpuSample,
    Heartbeat,
    Hello,
    HostSample,
    InstallPredictor,
    Message,
    PredictorStatus,
    QueryPredictor,
    Result,
    ScaleCommand,
    Submit,
    Submitted,
    Telemetry,
)
from swarmx.sched.router import make_router
from swarmx.security import LOCAL_ADMIN_KEY, LocalKeys, make_local_keys
from swarmx.stats import quantile
from swarmx.transport import (
    ClientCurve,
    DealerChannel,
    TransportError,
    connect_dealer,
    generate_keys,
    load_keypair,
    load_public_key,
    request,
)

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "bench" / "data" / "example_traces.jsonl"
"""What the predictor of a forecasting router is trained on."""
CLIENT_KEY = "load-client"
CONTRACT = (
    "nodes",
    "calls_per_s",
    "seconds",
    "router",
    "calls",
    "lost",
    "duplicated",
    "dispatch_overhead_ms",
    "telemetry_lag_ms",
    "max_loop_gap_ms",
    "scheduler_cpu_cores",
    "scheduler_rss_mib",
)
"""The keys of the JSON object, a contract other scripts rely on (more may follow them)."""
LOOP_GAP_METRIC = "swarmx_scheduler_loop_gap_max_seconds"
LOOP_GAP_WINDOW_S = 10.0
"""How far back the scheduler's loop-gap metric looks."""
QUEUED_METRIC = "swarmx_model_queued_calls"
NODES_METRIC = "swarmx_nodes"
SCRAPE_S = 2.0
RESEND_RESULT_AFTER_S = 2.0
"""As the node agent: a result not acknowledged by then is sent again."""
SILENT_AFTER_MISSED = 3
"""As the node agent: heartbeats unanswered before it registers again."""
HELLO_RETRY_S = 0.1
"""While a node's socket is not connected yet (its hello could not leave): the next try."""
PROBE_S = 0.02
"""The worker's own loop-gap probe period."""
REQ = re.compile(r"Request (\d+)\.")
"""The submit index a prompt carries (``{inputs.req}``), from which a dispatch is matched."""

log = logging.getLogger("bench.load")


class BenchError(RuntimeError):
    """The bench could not run (a process died, nodes did not register): one line to print."""


# --- the profile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    nodes: int
    rate: float
    seconds: float
    router: str
    scaler: str = "none"
    procs: int = 2
    model: str = "llama-8b"
    gpu: str = "H100"
    concurrency: int = 8
    max_tokens: int = 32
    prompt_tokens: int = 200
    slo_s: float = 30.0
    interval_s: float = 1.0
    warmup_s: float = 1.0
    drain_s: float = 60.0
    ready_timeout_s: float = 120.0
    train_epochs: int = 30
    scheduler_log_level: str = "info"
    scheduler_set: tuple[str, ...] = ()
    """More scheduler config, as ``SECTION.KEY=TOML_VALUE`` (``--set``)."""
    profile: str = ""
    """Run the scheduler under cProfile, its stats written here (``--profile``)."""

    @property
    def submits(self) -> int:
        return max(1, round(self.rate * self.seconds))


def default_warmup_s(seconds: float) -> float:
    return min(30.0, max(1.0, 0.1 * seconds))


def workflow_text(p: Profile) -> str:
    """The one-step workflow every submit carries; ``{inputs.req}`` numbers the submit."""
    words = itertools.cycle(["plan", "test", "code", "read", "search", "fix", "report", "step"])
    filler: list[str] = []
    while len(" ".join(filler)) < 4 * p.prompt_tokens:  # ~4 bytes a token
        filler.append(next(words))
    lines = [" ".join(filler[i : i + 12]) for i in range(0, len(filler), 12)]
    body = "\n".join(["Request {inputs.req}. Summarise these notes.", *lines])
    return (
        f'name = "load"\nslo_s = {p.slo_s}\n\n[inputs]\nreq = "0"\n\n'
        f'[[steps]]\nid = "answer"\nkind = "llm"\nmodel = "{p.model}"\n'
        f'max_tokens = {p.max_tokens}\nprompt = """\n{body}"""\n'
    )


def scheduler_config(p: Profile) -> str:
    """The scheduler's TOML: the router and scaler under test, ``--set`` on top."""
    sections: dict[str, dict[str, str]] = {
        # one client stands for many users: their quota must not refuse the load
        "scheduler": {"max_queued_workflows_per_client": str(max(1000, p.submits))},
        "router": {"policy": json.dumps(p.router)},
        "scaler": {"policy": json.dumps(p.scaler)},
        "log": {"level": json.dumps(p.scheduler_log_level)},
    }
    for item in p.scheduler_set:
        key, _, value = item.partition("=")
        section, _, name = key.strip().rpartition(".")
        sections.setdefault(section, {})[name] = value.strip()
    return "".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
        for section, values in sections.items()
    )


def node_names(n: int) -> list[str]:
    return [f"load-{i:05d}" for i in range(1, n + 1)]


def logical_call(call_id: str) -> str:
    """``wf:step:index:attempt`` without its attempt: one call, however often it was re-run."""
    return call_id.rpartition(":")[0]


# --- emulated node agents (worker processes) --------------------------------------------------


@dataclass
class WorkerReport:
    """What one worker's nodes saw; plain data, pickled back to the main process."""

    arrivals: list[tuple[int, str, float]] = field(default_factory=list)
    """(submit index, call id, monotonic time) of every dispatch received."""
    completed: collections.Counter[str] = field(default_factory=collections.Counter)
    """Logical call -> results with ``ok`` the nodes produced for it (re-sends not counted)."""
    spans: list[tuple[float, float]] = field(default_factory=list)
    """(arrival, end) of every call a replica ran, finished or cancelled (monotonic)."""
    lags: list[tuple[float, float]] = field(default_factory=list)
    """(monotonic send time, seconds to its ack) of every acknowledged heartbeat."""
    loop_gaps: list[tuple[float, float]] = field(default_factory=list)
    """(monotonic time, seconds late) of the worker loop's probe, when over 5 ms."""
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Errors the scheduler answered the nodes with, by code."""

    def to_wire(self) -> dict[str, Any]:
        """Builtins only: a class of a spawned worker's ``__main__`` does not unpickle here."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {
            "completed": dict(self.completed),
            "counters": dict(self.counters),
            "errors": dict(self.errors),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WorkerReport:
        return cls(
            arrivals=data["arrivals"],
            spans=data["spans"],
            completed=collections.Counter(data["completed"]),
            lags=data["lags"],
            loop_gaps=data["loop_gaps"],
            counters=collections.Counter(data["counters"]),
            errors=collections.Counter(data["errors"]),
        )


Handler = Callable[[Envelope], Awaitable[None]]


def _host_sample() -> HostSample:
    cores = 64
    return HostSample(
        cpu_percent=12.5,
        cpu_percent_per_core=[12.5] * cores,
        load_1m=8.0,
        load_5m=8.0,
        load_15m=8.0,
        mem_total_bytes=512 << 30,
        mem_used_bytes=96 << 30,
        mem_available_bytes=416 << 30,
        swap_total_bytes=0,
        swap_used_bytes=0,
        disk_read_bytes_per_s=1e6,
        disk_write_bytes_per_s=2e6,
        net_recv_bytes_per_s=5e6,
        net_sent_bytes_per_s=5e6,
    )


class NodeEmulator:
    """One node agent, protocol-true, with a synthetic host around an emulated replica."""

    GPU_NAME = "NVIDIA H100 80GB HBM3 (emulated)"
    GPU_MEM = 80 << 30

    def __init__(
        self,
        name: str,
        endpoint: str,
        *,
        curve: ClientCurve,
        p: Profile,
        host: HostSample,
        report: WorkerReport,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.curve = curve
        self.p = p
        self.report = report
        self.clock = RealClock()
        cfg = NodeConfig(
            name=name,
            scheduler=endpoint,
            telemetry_interval_s=p.interval_s,
            heartbeat_interval_s=p.interval_s,
            gpus="off",
            tool_slots=0,
            replicas=[
                ReplicaConfig(
                    p.model, "emulated", concurrency=p.concurrency, gpu=p.gpu, max_count=1
                )
            ],
        )
        self.replicas = ReplicaSet(cfg, self.clock)
        self.channel: DealerChannel | None = None
        self.registered = False
        self._hello_seq: int | None = None
        self._started_mono = self.clock.monotonic()
        self._started_ts = self.clock.time()
        self._last_answer = self._started_mono
        self.outbox = ResultOutbox(self.clock)
        self._running: dict[str, float] = {}
        """Calls the replica runs: call id -> arrival time."""
        self._heartbeats: dict[int, float] = {}
        """Heartbeats sent and not yet acknowledged: seq -> monotonic send time."""
        uuid = f"GPU-{hashlib.blake2b(name.encode(), digest_size=16).hexdigest()}"
        self._gpu = GpuInfo(0, self.GPU_NAME, uuid, self.GPU_MEM)
        self._gpu_sample = GpuSample(
            0, self.GPU_NAME, uuid, 35.0, 20.0, 60 << 30, self.GPU_MEM, 350.0, 700.0, 55.0, 1755
        )
        self._host = host
        self._handlers: dict[type[Message], Handler] = {
            Ack: self._on_ack,
            Error: self._on_error,
            Dispatch: self._on_dispatch,
            CancelCalls: self._on_cancel,
            ScaleCommand: self._on_scale,
        }

    async def start(self) -> None:
        await self.replicas.start()
        self.channel = connect_dealer(self.endpoint, self.name, self.clock, curve=self.curve)

    async def close(self) -> None:
        await self.replicas.close()
        if self.channel is not None:
            self.channel.close()

    def hello(self) -> Hello:
        return Hello(
            node=self.name,
            host=f"{self.name}.bench",
            pid=os.getpid(),
            version=__version__,
            cpu_cores_logical=64,
            cpu_cores_physical=32,
            mem_total_bytes=self._host.mem_total_bytes,
            gpus=[self._gpu],
            replicas=self.replicas.infos(),
            heartbeat_interval_s=self.p.interval_s,
            telemetry_interval_s=self.p.interval_s,
            started_ts=self._started_ts,
            labels={"bench": "load"},
            pools=self.replicas.pools(),
            running=self.replicas.running(),
        )

    @property
    def unacked_results(self) -> int:
        return len(self.outbox)

    async def run(self) -> None:
        assert self.channel is not None
        await asyncio.gather(self._receive(self.channel), self._beat(self.channel))

    async def _send_hello(self, ch: DealerChannel) -> None:
        self._hello_seq = await ch.send(self.hello())
        self.report.counters["hellos"] += 1

    async def _beat(self, ch: DealerChannel) -> None:
        while not self.registered:  # as the agent: a hello a heartbeat until acknowledged
            await self._send_hello(ch)
            sent = self._hello_seq is not None  # else not connected yet: soon again
            await self.clock.sleep(self.p.interval_s if sent else HELLO_RETRY_S)
        await self.clock.sleep(random.uniform(0, self.p.interval_s))  # nodes beat out of step
        interval = self.p.interval_s
        async for now in ticks(self.clock, interval):
            if self.registered and now - self._last_answer > SILENT_AFTER_MISSED * interval:
                self.registered = False
                self.report.counters["silent_scheduler"] += 1
            if not self.registered:
                await self._send_hello(ch)
                continue
            telemetry = Telemetry(
                self._host, [self._gpu_sample], self.replicas.runtime(), collect_s=0.0
            )
            beat = Heartbeat(
                now - self._started_mono,
                ch.stats.unsent,
                running=self.replicas.running(),
                telemetry=telemetry,  # as the agent sends it at its default intervals
            )
            sent_at = self.clock.monotonic()
            seq = await ch.send(beat)
            if seq is not None:
                self._heartbeats[seq] = sent_at
                self.report.counters["heartbeats"] += 1
            self.report.counters["results_resent"] += await self.outbox.resend_due(ch, now)
            for old in [s for s, t in self._heartbeats.items() if now - t > 30.0]:
                del self._heartbeats[old]
                self.report.counters["heartbeats_unanswered"] += 1

    async def _receive(self, ch: DealerChannel) -> None:
        while True:
            env = await ch.recv()
            self._last_answer = self.clock.monotonic()
            handler = self._handlers.get(type(env.body))
            if handler is not None:
                await handler(env)
            elif not isinstance(env.body, Error):
                await ch.send(Error(env.seq, "unsupported", f"load bench: no {env.type!r}"))

    # --- results ----------------------------------------------------------------------------

    async def _completed(self, result: Result) -> None:
        """A call ended on the replica (not a re-send): counted, then sent."""
        self._ended(result.call_id)
        if result.ok:
            self.report.completed[logical_call(result.call_id)] += 1
        else:
            self.report.counters["failed_calls"] += 1
        await self._send_result(result)

    async def _send_result(self, result: Result) -> None:
        assert self.channel is not None
        await self.outbox.send(self.channel, result)

    async def _on_dispatch(self, env: Envelope) -> None:
        d = env.body
        assert isinstance(d, Dispatch) and self.channel is not None
        arrived = self.clock.monotonic()
        match = REQ.match(d.prompt)
        self.report.arrivals.append((int(match.group(1)) if match else -1, d.call_id, arrived))
        seen = self.replicas.seen(d.call_id)
        if seen is None:
            self._running[d.call_id] = arrived
            self.replicas.submit(d, self._completed)
            return
        self.report.counters["dispatched_again"] += 1  # as the agent: answered, not run twice
        if not await self.outbox.send_again(self.channel, d.call_id):
            await self.channel.send(Ack(env.seq, f"call {d.call_id} already {seen}"))

    async def _on_cancel(self, env: Envelope) -> None:
        assert isinstance(env.body, CancelCalls)
        self.report.counters["cancelled"] += self.replicas.cancel(env.body.call_ids)
        for call_id in env.body.call_ids:
            self._ended(call_id)

    def _ended(self, call_id: str) -> None:
        arrived = self._running.pop(call_id, None)
        if arrived is not None:
            self.report.spans.append((arrived, self.clock.monotonic()))

    async def _on_scale(self, env: Envelope) -> None:
        assert self.channel is not None
        self.report.counters["scale_refused"] += 1
        await self.channel.send(
            Error(env.seq, "out_of_range", "load bench nodes keep their one replica")
        )

    async def _on_ack(self, env: Envelope) -> None:
        assert isinstance(env.body, Ack)
        ref = env.body.ref_seq
        self.outbox.acked(ref)
        sent = self._heartbeats.pop(ref, None)
        if sent is not None:
            self.report.lags.append((sent, self.clock.monotonic() - sent))
        if not self.registered and ref == self._hello_seq:
            self.registered = True

    async def _on_error(self, env: Envelope) -> None:
        assert isinstance(env.body, Error)
        code = env.body.code
        self.report.errors[code] += 1
        if code == "unregistered":
            self.registered = False
        else:  # a refused result (a call no longer this node's) is not sent again
            self.outbox.refused(env.body.ref_seq)


def _die_with_parent() -> None:
    """SIGTERM this process when the bench dies, however it dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def worker_main(
    conn: multiprocessing.connection.Connection,
    names: list[str],
    endpoint: str,
    keys_dir: str,
    p: Profile,
) -> None:
    """A worker process: host ``names``' emulators until the parent says stop; report back."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.basicConfig(level=logging.WARNING, format="worker: %(levelname)s %(message)s")
    try:
        report = asyncio.run(_worker(conn, names, endpoint, Path(keys_dir), p))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("report", report.to_wire()))


async def _probe(report: WorkerReport) -> None:
    """Record how late this process's event loop wakes (until cancelled)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + PROBE_S
        await asyncio.sleep(PROBE_S)
        late = loop.time() - due
        if late > 0.005:
            report.loop_gaps.append((time.monotonic(), late))


async def _worker(
    conn: multiprocessing.connection.Connection,
    names: list[str],
    endpoint: str,
    keys_dir: Path,
    p: Profile,
) -> WorkerReport:
    report = WorkerReport()
    keys = LocalKeys(keys_dir, keys_dir / "authorized")
    server = load_public_key(keys.public("scheduler"))
    host = _host_sample()
    nodes = [
        NodeEmulator(
            n,
            endpoint,
            curve=ClientCurve(load_keypair(keys.secret(n)), server),
            p=p,
            host=host,
            report=report,
        )
        for n in names
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), stop.set)  # the parent's only message: stop
    tasks: list[asyncio.Task[None]] = []
    try:
        for node in nodes:
            await node.start()
        tasks = [asyncio.create_task(n.run(), name=n.name) for n in nodes]
        tasks.append(asyncio.create_task(_probe(report), name="probe"))
        started = time.monotonic()
        while not all(n.registered for n in nodes):
            if stop.is_set():
                return report
            for t in tasks:
                if t.done():
                    t.result()
            if time.monotonic() - started > p.ready_timeout_s:
                missing = [n.name for n in nodes if not n.registered]
                raise BenchError(f"{len(missing)} nodes never registered, e.g. {missing[:3]}")
            await asyncio.sleep(0.1)
        conn.send(("ready", len(nodes)))
        stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait())
        waiting: list[asyncio.Task[Any]] = [stopper, *tasks]
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper:
                t.result()
                raise BenchError(f"node task {t.get_name()} ended unexpectedly")
        stopper.cancel()
    finally:
        loop.remove_reader(conn.fileno())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        report.counters["unsent_frames"] += sum(
            n.channel.stats.unsent for n in nodes if n.channel is not None
        )
        report.counters["results_unacked_at_end"] += sum(n.unacked_results for n in nodes)
        for node in nodes:
            await node.close()
    return report


# --- the client ---------------------------------------------------------------------------------


@dataclass
class ClientLog:
    sent_at: list[float]
    """Monotonic send time of each submit (NaN: not sent)."""
    accepted: list[str] = field(default_factory=list)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    unsent: int = 0
    predictor: PredictorStatus | None = None
    waiting: collections.OrderedDict[int, float] = field(default_factory=collections.OrderedDict)
    """Submits sent and not answered: frame seq -> send time. The scheduler answers one
    client's frames in order, so a ``submitted`` (which names no frame) answers the oldest."""
    reply_s: list[tuple[float, float]] = field(default_factory=list)
    """Per answered submit: its send time and the seconds its answer took."""

    @property
    def answered(self) -> int:
        return len(self.accepted) + sum(self.refused.values())


@dataclass
class Usage:
    """CPU seconds and resident memory of the processes measured, at one instant."""

    at: float
    sched_cpu_s: float
    sched_rss_bytes: int
    bench_cpu_s: float


@dataclass
class Scrape:
    at: float
    loop_gap_s: float | None
    queued: float
    not_live: float


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def parse_metrics(text: str) -> Scrape:
    """The few series the bench reads from the scheduler's Prometheus page."""
    gap: float | None = None
    queued = not_live = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        if name == LOOP_GAP_METRIC:
            gap = v
        elif name.startswith(QUEUED_METRIC + "{"):
            queued += v
        elif name.startswith(NODES_METRIC + "{") and 'state="live"' not in name:
            not_live += v
    return Scrape(time.monotonic(), gap, queued, not_live)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Journal:
    states: dict[str, str]
    wait_s: list[float]
    """Per call: ready to dispatched at the scheduler, plus any wait on the node (``queue_s``
    of its trace)."""


def read_journal(db: Path) -> Journal:
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA query_only = 1")
        states = {wf: state for wf, state in con.execute("SELECT id, state FROM workflows")}
        wait_s = []
        for (row,) in con.execute("SELECT row FROM traces"):
            value = json.loads(row).get("queue_s")
            if isinstance(value, (int, float)):
                wait_s.append(float(value))
    finally:
        con.close()
    return Journal(states, wait_s)


def running_workflows(db: Path) -> int | None:
    try:
        con = sqlite3.connect(db, timeout=1.0)
        try:
            con.execute("PRAGMA query_only = 1")
            (n,) = con.execute("SELECT count(*) FROM workflows WHERE state='running'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return int(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def forecasts(router: str) -> bool:
    return make_router(router).forecast != "none"


def _predictor_key(epochs: int) -> str:
    h = hashlib.sha256()
    h.update(TRACES.read_bytes())
    for src in sorted((ROOT / "swarmx" / "models").glob("*.py")):
        h.update(src.read_bytes())
    h.update(f"{__version__}/{epochs}".encode())
    return h.hexdigest()[:16]


def trained_predictor(cache_dir: Path, epochs: int) -> Path:
    """A model trained on the example traces, from the cache (keyed by the traces, the model
    code and the epochs), trained now (`swarmx predictor train`) if it is not there."""
    path = cache_dir / f"predictor-{_predictor_key(epochs)}.pt"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    say(f"training a predictor on {TRACES.name} ({epochs} epochs), cached in {cache_dir}")
    cmd = [sys.executable, "-m", "swarmx", "predictor", "train", "--traces", str(TRACES)]
    cmd += ["--out", str(tmp), "--epochs", str(epochs), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise BenchError(f"training the predictor failed: {out.stderr.strip()[-500:]}")
    tmp.replace(path)
    return path


def say(message: str) -> None:
    print(f"load: {message}", file=sys.stderr, flush=True)


class LoadBench:
    """Owns every process it starts; `close` stops them all (and is idempotent)."""

    def __init__(self, p: Profile, workdir: Path, cache_dir: Path) -> None:
        self.p = p
        self.workdir = workdir
        self.state = workdir / "state"
        self.cache_dir = cache_dir
        self.warnings: list[str] = []
        self.sched: subprocess.Popen[bytes] | None = None
        self.workers: list[
            tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]
        ] = []
        self.endpoint = ""
        self.metrics_url = ""
        self.predictor_version: str | None = None

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        say(f"warning: {message}")

    # --- setup ------------------------------------------------------------------------------

    def _keys(self) -> LocalKeys:
        t0 = time.monotonic()
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = make_local_keys(self.state, node_names(self.p.nodes))
        if not keys.secret(CLIENT_KEY).exists():
            generate_keys(keys.directory, CLIENT_KEY)
        shutil.copyfile(keys.public(CLIENT_KEY), keys.authorized / "clients" / f"{CLIENT_KEY}.key")
        say(f"{self.p.nodes + 3} CURVE key pairs in {time.monotonic() - t0:.1f} s")
        return keys

    def _config(self) -> Path:
        path = self.workdir / "scheduler.toml"
        path.write_text(scheduler_config(self.p))
        return path

    def _start_scheduler(self, keys: LocalKeys) -> None:
        port = free_port()
        log_file = self.workdir / "scheduler.log"
        cmd = [sys.executable, "-m", "swarmx", "scheduler", "start", "--config"]
        if self.p.profile:  # where the scheduler's time goes: cProfile, written as it exits
            cmd[1:1] = ["-m", "cProfile", "-o", self.p.profile]
        cmd += [str(self._config()), "--listen", "tcp://127.0.0.1:0", "--state-dir"]
        cmd += [str(self.state), "--metrics-port", str(port), "--key"]
        cmd += [str(keys.secret("scheduler")), "--authorized-keys", str(keys.authorized)]
        with open(log_file, "ab") as out:
            self.sched = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the bench, which stops it in order
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads yet in this process
            )
        deadline = time.monotonic() + 60
        while True:
            state = read_state_file(self.state)
            if state and state.get("pid") == self.sched.pid:
                self.endpoint = str(state["endpoint"])
                break
            if self.sched.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the scheduler did not start; its log:\n{self._sched_log()}")
            time.sleep(0.05)
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        say(f"scheduler pid {self.sched.pid} on {self.endpoint}, metrics {self.metrics_url}")

    def _sched_log(self, lines: int = 20) -> str:
        try:
            text = (self.workdir / "scheduler.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _curve(self, keys: LocalKeys, name: str) -> ClientCurve:
        return ClientCurve(
            load_keypair(keys.secret(name)), load_public_key(keys.public("scheduler"))
        )

    def _install_predictor(self, keys: LocalKeys) -> None:
        model = trained_predictor(self.cache_dir, self.p.train_epochs)
        env = request(
            self.endpoint,
            InstallPredictor(str(model)),
            "load-admin",
            RealClock(),
            120.0,
            curve=self._curve(keys, LOCAL_ADMIN_KEY),
        )
        if not isinstance(env.body, Ack):
            raise BenchError(f"installing the predictor failed: {env.body}")
        self.predictor_version = env.body.detail
        say(f"predictor {env.body.detail} installed ({model.name})")

    def _start_workers(self, keys: LocalKeys) -> None:
        ctx = multiprocessing.get_context("spawn")
        names = node_names(self.p.nodes)
        procs = max(1, min(self.p.procs, len(names)))
        t0 = time.monotonic()
        for i in range(procs):
            parent, child = ctx.Pipe()
            proc: multiprocessing.process.BaseProcess = ctx.Process(
                target=worker_main,
                args=(child, names[i::procs], self.endpoint, str(keys.directory), self.p),
                name=f"load-nodes-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.workers.append((proc, parent))
        for proc, conn in self.workers:
            kind, payload = self._from_worker(proc, conn, self.p.ready_timeout_s + 30)
            if kind != "ready":
                raise BenchError(f"worker {proc.name} failed:\n{payload}")
        say(f"{len(names)} nodes registered in {time.monotonic() - t0:.1f} s ({procs} processes)")

    def _from_worker(
        self,
        proc: multiprocessing.process.BaseProcess,
        conn: multiprocessing.connection.Connection,
        timeout_s: float,
    ) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not conn.poll(0.2):
            if not proc.is_alive():
                return "error", f"exited with code {proc.exitcode}"
            if self.sched is not None and self.sched.poll() is not None:
                raise BenchError(f"the scheduler exited; its log:\n{self._sched_log()}")
            if time.monotonic() > deadline:
                return "error", f"no answer within {timeout_s:g} s"
        kind, payload = conn.recv()
        return str(kind), payload

    # --- the load phase ---------------------------------------------------------------------

    def _usage(self) -> Usage:
        assert self.sched is not None
        sched = psutil.Process(self.sched.pid)
        bench = _cpu_s(psutil.Process())
        for proc, _ in self.workers:
            with contextlib.suppress(psutil.Error):
                if proc.pid is not None:
                    bench += _cpu_s(psutil.Process(proc.pid))
        return Usage(time.monotonic(), _cpu_s(sched), sched.memory_info().rss, bench)

    def _scrape(self) -> Scrape | None:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
                return parse_metrics(resp.read().decode())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    async def _drive(
        self, keys: LocalKeys
    ) -> tuple[ClientLog, list[Scrape], tuple[Usage, Usage], float]:
        clock = RealClock()
        p = self.p
        log_ = ClientLog(sent_at=[math.nan] * p.submits)
        ch = connect_dealer(self.endpoint, CLIENT_KEY, clock, curve=self._curve(keys, CLIENT_KEY))
        replies = asyncio.create_task(self._replies(ch, log_))
        scrapes: list[Scrape] = []
        sampler: asyncio.Task[None] | None = None
        try:
            deadline = time.monotonic() + 30
            while log_.predictor is None:  # the client socket is up once it has an answer
                if time.monotonic() > deadline:
                    raise BenchError("the load client got no answer from the scheduler")
                await ch.send(QueryPredictor())
                await asyncio.sleep(0.2)
            text = workflow_text(p)
            t0 = time.monotonic()
            warm_end, load_end = t0 + p.warmup_s, t0 + p.seconds
            sampler = asyncio.create_task(self._sample(scrapes, warm_end))
            start: Usage | None = None
            say(f"{p.rate:g} calls/s for {p.seconds:g} s (warm-up {p.warmup_s:g} s)")
            for i in range(p.submits):
                if start is None and time.monotonic() >= warm_end:
                    start = await asyncio.to_thread(self._usage)
                delay = t0 + i / p.rate - time.monotonic()
                await asyncio.sleep(max(0.0, delay))  # 0: behind schedule, still yield
                sent = time.monotonic()
                seq = await ch.send(Submit("load.toml", text, {"req": str(i)}))
                if seq is None:
                    log_.unsent += 1
                else:
                    log_.sent_at[i] = sent
                    log_.waiting[seq] = sent
            await asyncio.sleep(max(0.0, load_end - time.monotonic()))
            if start is None:
                start = await asyncio.to_thread(self._usage)
            end = await asyncio.to_thread(self._usage)
            if (last := await asyncio.to_thread(self._scrape)) is not None:
                scrapes.append(last)
            sampler.cancel()
            say(f"draining (up to {p.drain_s:g} s)")
            drained = await self._drain(log_, load_end + p.drain_s)
            return log_, scrapes, (start, end), drained
        finally:
            if sampler is not None:
                sampler.cancel()
            replies.cancel()
            await asyncio.gather(replies, return_exceptions=True)
            ch.close()

    async def _replies(self, ch: DealerChannel, log_: ClientLog) -> None:
        while True:
            env = await ch.recv()
            body, now = env.body, time.monotonic()
            sent: float | None = None
            if isinstance(body, Submitted):
                log_.accepted.append(body.workflow_id)
                if log_.waiting:
                    sent = log_.waiting.popitem(last=False)[1]
            elif isinstance(body, Error):
                log_.refused[body.code] += 1
                sent = log_.waiting.pop(body.ref_seq, None)
            elif isinstance(body, PredictorStatus):
                log_.predictor = body
            if sent is not None:
                log_.reply_s.append((sent, now - sent))

    async def _sample(self, scrapes: list[Scrape], warm_end: float) -> None:
        async for _ in ticks(RealClock(), SCRAPE_S):
            scrape = await asyncio.to_thread(self._scrape)
            if scrape is not None and scrape.at >= warm_end:
                scrapes.append(scrape)

    async def _drain(self, log_: ClientLog, deadline: float) -> float:
        t0 = time.monotonic()
        expected = self.p.submits - log_.unsent
        while log_.answered < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        db = self.state / DB_FILE
        while time.monotonic() < deadline:
            if await asyncio.to_thread(running_workflows, db) == 0:
                break
            await asyncio.sleep(0.25)
        return time.monotonic() - t0

    # --- teardown ---------------------------------------------------------------------------

    def _collect(self) -> list[WorkerReport]:
        reports = []
        for proc, conn in self.workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send("stop")
            kind, payload = self._from_worker(proc, conn, 60)
            if kind != "report":
                raise BenchError(f"worker {proc.name} failed:\n{payload}")
            reports.append(WorkerReport.from_wire(payload))
        return reports

    def _stop_workers(self) -> None:
        for _, conn in self.workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send("stop")
        for proc, conn in self.workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self.workers = []

    def _stop_scheduler(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; a failed exit is a warning (its log's last line)."""
        sched, self.sched = self.sched, None
        if sched is None:
            return
        if sched.poll() is None:
            sched.send_signal(signal.SIGTERM)
            try:
                sched.wait(20)
            except subprocess.TimeoutExpired:
                self.warn("the scheduler did not stop within 20 s of SIGTERM; killed it")
                sched.kill()
                sched.wait()
                return
        if sched.returncode != 0:
            self.warn(
                f"the scheduler exited with code {sched.returncode}: {self._sched_log(1).strip()}"
            )

    def close(self) -> None:
        try:
            self._stop_workers()
        finally:
            self._stop_scheduler()

    # --- everything -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        p = self.p
        keys = self._keys()
        self._start_scheduler(keys)
        if forecasts(p.router):
            self._install_predictor(keys)
        self._start_workers(keys)
        client, scrapes, (start, end), drained_s = asyncio.run(self._drive(keys))
        reports = self._collect()
        self._stop_workers()
        assert self.sched is not None
        sched_alive = self.sched.poll() is None
        self._stop_scheduler()  # the journal is read once it is closed
        if not sched_alive:
            raise BenchError(f"the scheduler died during the run; its log:\n{self._sched_log()}")
        journal = read_journal(self.state / DB_FILE)
        return self._figures(
            client, reports, journal, scrapes=scrapes, usage=(start, end), drained_s=drained_s
        )

    def _figures(
        self,
        client: ClientLog,
        reports: Sequence[WorkerReport],
        journal: Journal,
        *,
        scrapes: Sequence[Scrape],
        usage: tuple[Usage, Usage],
        drained_s: float,
    ) -> dict[str, Any]:
        p = self.p
        start, end = usage
        completed: collections.Counter[str] = collections.Counter()
        counters: collections.Counter[str] = collections.Counter()
        errors: collections.Counter[str] = collections.Counter()
        first: dict[int, float] = {}
        for r in reports:
            completed.update(r.completed)
            counters.update(r.counters)
            errors.update(r.errors)
            for req, _, at in r.arrivals:
                if req >= 0 and (req not in first or at < first[req]):
                    first[req] = at
        accepted = set(client.accepted)
        lost = sum(1 for wf in accepted if journal.states.get(wf) != "succeeded")
        states = collections.Counter(journal.states.get(wf, "missing") for wf in accepted)
        overhead = sorted(
            first[i] - sent
            for i, sent in enumerate(client.sent_at)
            if i in first and start.at <= sent <= end.at
        )
        lags = sorted(lag for r in reports for sent, lag in r.lags if start.at <= sent <= end.at)
        # the metric is the worst of the last LOOP_GAP_WINDOW_S: a scrape earlier than that into
        # the window also sees the warm-up (start-up, the predictor's install)
        gaps = [
            s.loop_gap_s
            for s in scrapes
            if s.loop_gap_s is not None and s.at >= start.at + LOOP_GAP_WINDOW_S
        ] or [s.loop_gap_s for s in scrapes[-1:] if s.loop_gap_s is not None]
        bench_gap = max(
            (g for r in reports for at, g in r.loop_gaps if start.at <= at <= end.at), default=0.0
        )
        wall = max(end.at - start.at, 1e-9)
        queued_max = max((s.queued for s in scrapes), default=0.0)
        not_live_max = max((s.not_live for s in scrapes), default=0.0)
        slots = p.nodes * p.concurrency
        busiest = max_concurrent([span for r in reports for span in r.spans])

        if not gaps:
            self.warn(
                f"the scheduler exports no {LOOP_GAP_METRIC} (or its metrics could not be read):"
                " max_loop_gap_ms is null"
            )
        if queued_max > 0 or busiest >= slots:
            self.warn(
                f"calls waited for a replica (up to {queued_max:g} queued at the scheduler; "
                f"up to {busiest} of {slots} slots busy): dispatch overhead includes queueing;"
                " add nodes or lower the rate to time the scheduler alone"
            )
        if not_live_max:
            self.warn(f"up to {not_live_max:g} nodes were stale or down during the run")
        if lost:
            self.warn(f"lost workflows by state: {dict(states)}")
        submitted = p.submits - client.unsent
        unanswered = submitted - client.answered
        if client.unsent or unanswered:
            self.warn(
                f"the scheduler did not keep up with {p.rate:g} calls/s: of {p.submits} submits "
                f"{client.unsent} could not be sent (the client socket's queue was full) and "
                f"{unanswered} were still unanswered when the drain ended"
            )
        if client.refused:
            self.warn(f"submits refused: {dict(client.refused)}")
        if len(overhead) < 10 or len(lags) < 10:
            self.warn("few samples in the measured window: percentiles are rough")
        duplicated = sum(1 for n in completed.values() if n > 1)
        rss_start, rss_end = start.sched_rss_bytes / 2**20, end.sched_rss_bytes / 2**20
        figures = {
            "nodes": p.nodes,
            "calls_per_s": p.rate,
            "seconds": p.seconds,
            "router": p.router,
            "calls": len(accepted),
            "lost": lost,
            "duplicated": duplicated,
            "dispatch_overhead_ms": _percentiles_ms(overhead),
            "telemetry_lag_ms": _percentiles_ms(lags),
            "max_loop_gap_ms": round(max(gaps) * 1e3, 3) if gaps else None,
            "scheduler_cpu_cores": round((end.sched_cpu_s - start.sched_cpu_s) / wall, 3),
            "scheduler_rss_mib": {"start": round(rss_start, 1), "end": round(rss_end, 1)},
            # extras (not part of the contract)
            "scheduler_rss_growth_pct": round(100 * (rss_end / rss_start - 1), 2),
            "measured_s": round(wall, 2),
            "warmup_s": p.warmup_s,
            "submitted": submitted,
            "unanswered": unanswered,
            "submit_reply_ms": _percentiles_ms(
                sorted(d for at, d in client.reply_s if start.at <= at <= end.at)
            ),
            "refused": dict(client.refused),
            "workflow_states": dict(states),
            "drain_s": round(drained_s, 2),
            "predictor": self.predictor_version,
            "queued_calls_max": queued_max,
            "calls_running_max": busiest,
            "slots": slots,
            "ready_to_dispatch_ms": _percentiles_ms(sorted(journal.wait_s)),
            "nodes_not_live_max": not_live_max,
            "node_counters": dict(sorted(counters.items())),
            "node_errors": dict(sorted(errors.items())),
            "bench_cpu_cores": round((end.bench_cpu_s - start.bench_cpu_s) / wall, 3),
            "bench_loop_gap_max_ms": round(bench_gap * 1e3, 3),
            "bench_procs": len(reports),
            "warnings": self.warnings,
        }
        assert list(figures)[: len(CONTRACT)] == list(CONTRACT)
        return figures


def max_concurrent(spans: Sequence[tuple[float, float]]) -> int:
    """The most spans open at one instant (one ending as another starts: not both)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    return max(itertools.accumulate(delta for _, delta in events), default=0)


def _percentiles_ms(sorted_s: Sequence[float]) -> dict[str, float | None]:
    if not sorted_s:
        return {"p50": None, "p99": None}
    return {
        "p50": round(quantile(sorted_s, 0.5) * 1e3, 3),
        "p99": round(quantile(sorted_s, 0.99) * 1e3, 3),
    }


def render(r: dict[str, Any]) -> str:
    """The human table."""

    def ms(d: dict[str, float | None]) -> str:
        p50, p99 = d["p50"], d["p99"]
        return "-" if p50 is None or p99 is None else f"p50 {p50:.2f} ms   p99 {p99:.2f} ms"

    gap = r["max_loop_gap_ms"]
    rss = r["scheduler_rss_mib"]
    rows = [
        ("profile", f"{r['nodes']} nodes, {r['calls_per_s']:g} calls/s for {r['seconds']:g} s, "
         f"router {r['router']}" + (f" (predictor {r['predictor']})" if r["predictor"] else "")),
        ("calls", f"{r['calls']} accepted   lost {r['lost']}   duplicated {r['duplicated']}"),
        ("dispatch overhead", ms(r["dispatch_overhead_ms"])),
        ("telemetry lag", ms(r["telemetry_lag_ms"])),
        ("longest loop stall", "n/a" if gap is None else f"{gap:.1f} ms"),
        ("scheduler CPU", f"{r['scheduler_cpu_cores']:.2f} cores"),
        ("scheduler RSS", f"{rss['start']:.1f} -> {rss['end']:.1f} MiB "
         f"({r['scheduler_rss_growth_pct']:+.1f}%)"),
        ("measured", f"{r['measured_s']:.1f} s after a {r['warmup_s']:g} s warm-up; "
         f"drained in {r['drain_s']:.1f} s"),
        ("bench itself", f"{r['bench_cpu_cores']:.2f} cores over {r['bench_procs']} node "
         f"processes, loop stall up to {r['bench_loop_gap_max_ms']:.0f} ms"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--nodes", type=int, default=100, help="emulated node agents")
    ap.add_argument("--rate", type=float, default=50.0, help="workflows (calls) per second")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the load phase")
    ap.add_argument("--router", default="least_outstanding", help="[router] policy")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--scaler", default="none", help="[scaler] policy")
    ap.add_argument(
        "--procs", type=int, default=min(4, os.cpu_count() or 1), help="node worker processes"
    )
    ap.add_argument("--warmup-s", type=float, help="[default: 10%% of --seconds, 1 to 30 s]")
    ap.add_argument("--drain-s", type=float, default=60.0, help="most time to wait for the end")
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--gpu", default="H100", help="emulated GPU timing profile")
    ap.add_argument("--concurrency", type=int, default=8, help="slots of each node's replica")
    ap.add_argument("--max-tokens", type=int, default=32, help="of each call")
    ap.add_argument("--prompt-tokens", type=int, default=200, help="about, of each call")
    ap.add_argument("--slo-s", type=float, default=30.0, help="each workflow's SLO")
    ap.add_argument("--interval-s", type=float, default=1.0, help="heartbeat and telemetry")
    ap.add_argument("--train-epochs", type=int, default=30, help="of the predictor")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swarmx-bench",
        help="where trained predictors are kept",
    )
    ap.add_argument("--scheduler-log-level", default="info")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="more scheduler config, the value in TOML (predictor.retrain_every_calls=5000)",
    )
    ap.add_argument("--keep", type=Path, help="keep the state directory and logs here")
    ap.add_argument(
        "--profile", type=Path, help="run the scheduler under cProfile; its stats go to this file"
    )
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.rate <= 0 or args.seconds <= 0 or args.procs < 1:
        ap.error("--nodes, --rate, --seconds and --procs must be positive")
    for item in args.set:
        key, eq, _ = item.partition("=")
        if not eq or "." not in key:
            ap.error(f"--set: expected SECTION.KEY=VALUE, got {item!r}")
    try:
        make_router(args.router)
    except (ValueError, KeyError) as exc:
        ap.error(f"--router: {exc}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops the bench as Ctrl-C does (everything it started is stopped); a second
    one kills it at once."""
    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    p = Profile(
        nodes=args.nodes,
        rate=args.rate,
        seconds=args.seconds,
        router=args.router,
        scaler=args.scaler,
        procs=args.procs,
        model=args.model,
        gpu=args.gpu,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens,
        slo_s=args.slo_s,
        interval_s=args.interval_s,
        warmup_s=args.warmup_s if args.warmup_s is not None else default_warmup_s(args.seconds),
        drain_s=args.drain_s,
        train_epochs=args.train_epochs,
        scheduler_log_level=args.scheduler_log_level,
        scheduler_set=tuple(args.set),
        profile=str(args.profile.resolve()) if args.profile else "",
    )
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swarmx-load-")))
        bench = LoadBench(p, workdir, args.cache_dir)
        stack.callback(bench.close)
        try:
            result = bench.run()
        except (BenchError, TransportError, TimeoutError) as exc:
            say(f"error: {exc}")
            return 1
        except KeyboardInterrupt:
            say("interrupted; stopping everything")
            return 130
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
