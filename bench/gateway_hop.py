"""Cost of the gateway hop (issue 20): added time to first token, and CPU per streamed call.

The time to first token that `swarmx gateway` adds over calling the engine directly, and the CPU
the gateway (and the scheduler and node agent every gateway call crosses) spends per call.

    .venv/bin/python bench/gateway_hop.py --concurrency 100 --seconds 20 --json
    .venv/bin/python bench/gateway_hop.py --quick       # a smoke run: 20 streams, 5 s a path

- **Engine**: a fake OpenAI-compatible server, this script in a process of its own
  (``--serve-engine``), stdlib asyncio on 127.0.0.1 port 0: keep-alive HTTP/1.1, unlimited
  concurrency. ``POST /v1/chat/completions`` with ``stream: true`` answers server-sent events in
  chunked encoding: ``--ttft-ms`` after the request, a role chunk and the first of ``--tokens``
  content chunks, the rest ``--itl-ms`` apart, then a finish chunk, a usage chunk (when
  ``stream_options.include_usage``) and ``data: [DONE]``. ``GET /v1/models`` lists its one
  model; ``GET /bench/stats`` counts its connections and streams. Both paths call this engine.
- **Cluster**: a real ``swarmx scheduler start``, one ``swarmx node start`` whose one replica is
  ``backend = "openai"`` at the engine (``concurrency`` at least 200, so no call waits for a
  node slot; ``tool_slots = 0``; heartbeat and telemetry at their defaults) and a ``swarmx
  gateway``, every one on 127.0.0.1 with ephemeral ports, at the default log level, in a
  temporary state directory; the router is the default unless ``--router`` names one.
- **Client**: this process, stdlib asyncio, ``--concurrency`` streams, each on its own keep-alive
  connection, in a closed loop (the next call as soon as one ends, or after a think time of
  ``--think-ms`` on average: drawn from an exponential distribution, each stream its own, unless
  ``--think fixed``, which keeps streams that start together in step, arriving in bursts):
  the same streamed chat request (with ``include_usage``) to the engine directly and to the
  gateway. The two paths alternate in ``--rounds`` rounds ordered ABBA (direct, gateway, gateway,
  direct, ...), each phase ``--seconds / --rounds`` measured after ``--warmup-s`` of calls that
  are not counted. Every call is checked: status 200, an event stream, ``--tokens`` content
  chunks, a finish reason, the usage chunk and ``[DONE]``; anything else counts as an error.

Figures (the Markdown report defines each; ``--json`` prints one JSON document with them):
TTFT and total time per path (p50, p99), the added TTFT (gateway p50 - direct p50, gateway p99
- direct p99: the calls of the two paths are not paired, so no distribution of per-call
differences exists), completed calls/s, and per process the CPU cores used and CPU ms per call,
read through psutil (user + system, all threads) over each measured window. "Gateway streamed
calls/s per core" is gateway calls/s divided by the cores the gateway process used.

Every process shares one machine, this client included, so on a small machine the figures hold
CPU contention; the report says how busy the machine was and warns when it was saturated.
Every process the bench starts is stopped when it ends, Ctrl-C and errors included.

About 1,000 lines, on purpose: the engine, the cluster, the client and the report are one
measurement, and keeping them in one script keeps the engine both paths call the same.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import psutil

from swarmx.config import RouterConfig, RouterPolicy
from swarmx.daemon.scheduler import read_state_file
from swarmx.stats import quantile

MODEL = "bench-lm"
PROMPT = "Say something short."
CHAT_PATH = "/v1/chat/completions"
BUDGET_ADDED_P50_MS = 2.0
BUDGET_ADDED_P99_MS = 10.0
BUDGET_CALLS_PER_CORE = 1000.0
MIN_REPLICA_CONCURRENCY = 200
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
LAG_PROBE_S = 0.01
"""Period of the client's event-loop lag probe."""
ERROR_BACKOFF_S = 0.01
"""A stream waits this long after a failed call, so errors cannot spin the loop."""
SATURATED_SHARE = 0.9
"""A machine busier than this share of its cores is called saturated."""
OTHER_LOAD_CORES = 0.25
LOG_TAIL_LINES = 20
PROCESSES = ("engine", "scheduler", "node", "gateway", "children", "client")
"""``children``: processes the daemons started (the scheduler's predictor trainer)."""
PATHS = ("direct", "gateway")


class BenchError(RuntimeError):
    """The bench could not run (a process died, the cluster never served): one line to print."""


# --- the fake engine (runs in its own process) ------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    tokens: int
    ttft_s: float
    itl_s: float


def _frame(event: str) -> bytes:
    """One server-sent event as one HTTP chunk."""
    data = b"data: %s\n\n" % event.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], bool]:
    """Method, path, lower-cased headers, and whether the connection stays open after."""
    request_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    method, target, version = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    return method, target.partition("?")[0], headers, keep


class FakeEngine:
    """An OpenAI-compatible engine with fixed timing and no limit on concurrent streams."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.connections = 0
        self.streams = 0
        self.active = 0
        self.active_max = 0
        self._ids = itertools.count(1)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                method, path, headers, keep = _parse_head(head)
                if "transfer-encoding" in headers:
                    self._reply(writer, 400, {"error": {"message": "send a Content-Length"}}, False)
                    return
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                if method == "POST" and path == CHAT_PATH:
                    await self._chat(body, writer)
                elif method == "GET" and path == "/v1/models":
                    models = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
                    self._reply(writer, 200, models, keep)
                elif method == "GET" and path == "/bench/stats":
                    self._reply(writer, 200, self.stats(), keep)
                else:
                    self._reply(writer, 404, {"error": {"message": f"no route {path}"}}, keep)
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return  # the client left
        finally:
            writer.close()

    def stats(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "streams": self.streams,
            "active_max": self.active_max,
        }

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, status: int, body: object, keep: bool) -> None:
        data = json.dumps(body).encode()
        closing = "" if keep else "Connection: close\r\n"
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{closing}\r\n".encode()
            + data
        )

    async def _chat(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            req = json.loads(body)
        except ValueError:
            self._reply(writer, 400, {"error": {"message": "the body is not JSON"}}, True)
            return
        if req.get("model") != MODEL:
            self._reply(writer, 404, {"error": {"message": f"no model {req.get('model')!r}"}}, True)
            return
        if req.get("stream") is not True:
            self._reply(writer, 400, {"error": {"message": "this engine only streams"}}, True)
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.streams += 1
        self.active += 1
        self.active_max = max(self.active_max, self.active)
        try:
            for delay_s, events in self._events(req):
                wait_s = start + delay_s - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                data = b"".join(_frame(e) for e in events)
                if events[-1] == "[DONE]":
                    data += b"0\r\n\r\n"  # the end of the chunked body
                writer.write(data)
                await writer.drain()
        finally:
            self.active -= 1

    def _events(self, req: dict[str, object]) -> Iterator[tuple[float, list[str]]]:
        """(seconds after the request, the events to send then), as an engine streams them."""
        spec = self.spec
        head = (
            f'{{"id":"chatcmpl-{next(self._ids)}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":"{MODEL}","choices":'
        )
        role = (
            head + '[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
        )
        for i in range(spec.tokens):
            token = head + f'[{{"index":0,"delta":{{"content":"t{i} "}},"finish_reason":null}}]}}'
            yield spec.ttft_s + i * spec.itl_s, [role, token] if i == 0 else [token]
        ending = [head + '[{"index":0,"delta":{},"finish_reason":"stop"}]}']
        options = req.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            messages = req.get("messages")
            prompt = 1 + len(json.dumps(messages)) // 4
            usage = (
                f'{{"prompt_tokens":{prompt},"completion_tokens":{spec.tokens},'
                f'"total_tokens":{prompt + spec.tokens}}}'
            )
            ending.append(head + f'[],"usage":{usage}}}')
        ending.append("[DONE]")
        last = spec.ttft_s + (spec.tokens - 1) * spec.itl_s
        yield last, ending

    async def run(self) -> None:
        server = await asyncio.start_server(self.serve, "127.0.0.1", 0, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()


def _serve_engine(spec: EngineSpec) -> None:
    asyncio.run(FakeEngine(spec).run())


# --- the cluster ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a path's calls go: the engine directly, or the gateway."""

    name: str
    host: str
    port: int


def _target(name: str, url: str) -> Target:
    found = re.fullmatch(r"http://([^:/]+):(\d+)(/v1)?", url)
    if found is None:
        raise BenchError(f"{name}: cannot read the address {url!r}")
    return Target(name, found.group(1), int(found.group(2)))


class Cluster:
    """The engine, scheduler, node agent and gateway processes, and their logs."""

    def __init__(self, tmp: Path, spec: EngineSpec, router: str | None, slots: int) -> None:
        self.tmp = tmp
        self.spec = spec
        self.router = router
        self.slots = slots
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "SWARMX_STATE_DIR": str(tmp / "state")}
        """A `swarmx up` cluster's keys elsewhere on this host are never picked up."""

    def start(self) -> tuple[Target, Target]:
        """Start everything; the engine's and the gateway's addresses."""
        engine = self._spawn(
            "engine",
            [
                sys.executable,
                __file__,
                "--serve-engine",
                "--tokens",
                str(self.spec.tokens),
                "--ttft-ms",
                str(self.spec.ttft_s * 1e3),
                "--itl-ms",
                str(self.spec.itl_s * 1e3),
            ],
            stdout=subprocess.PIPE,
        )
        assert engine.stdout is not None
        port = engine.stdout.readline().strip()
        if not port.isdigit():
            raise BenchError(f"the engine did not start: {self.log_tail('engine')}")
        direct = Target("direct", "127.0.0.1", int(port))
        config = self.tmp / "swarmx.toml"
        config.write_text(self._config(direct))
        state = self.tmp / "state"

        def swarmx(name: str, *argv: str) -> subprocess.Popen[bytes]:
            return self._spawn(
                name, [sys.executable, "-m", "swarmx", *argv, "--config", str(config)]
            )

        sched = swarmx(
            "scheduler",
            "scheduler",
            "start",
            "--listen",
            "tcp://127.0.0.1:0",
            "--state-dir",
            str(state),
        )
        endpoint = self._wait(
            "scheduler",
            lambda: (s := read_state_file(state)) and s.get("pid") == sched.pid and s["endpoint"],
        )
        swarmx("node", "node", "start", "--scheduler", endpoint, "--name", "bench-node")
        swarmx("gateway", "gateway", "--listen", "http://127.0.0.1:0", "--scheduler", endpoint)
        url = self._wait(
            "gateway",
            lambda: (
                (m := re.search(r"serving the OpenAI API on (\S+/v1)", self.log("gateway")))
                and m.group(1)
            ),
        )
        return direct, _target("gateway", url)

    def _config(self, engine: Target) -> str:
        router = f'\n[router]\npolicy = "{self.router}"\n' if self.router else ""
        return (
            f'[node]\ntool_slots = 0\n\n[[node.replicas]]\nmodel = "{MODEL}"\n'
            f'backend = "openai"\nurl = "http://{engine.host}:{engine.port}/v1"\n'
            f"concurrency = {self.slots}\n{router}"
        )

    def _spawn(
        self, name: str, argv: list[str], stdout: int | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=stdout if stdout is not None else log,
                stderr=log,
                env=self.env,
            )
        self.procs[name] = proc
        return proc

    def _wait(self, name: str, ready: Callable[[], object]) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            if value := ready():
                return str(value)
            time.sleep(0.05)
        raise BenchError(f"{name} not ready in {READY_TIMEOUT_S:g} s: {self.log_tail(name)}")

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def log_tail(self, name: str) -> str:
        lines = self.log(name).splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "(its log is empty)"

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise BenchError(
                    f"the {name} process exited ({proc.returncode}):\n{self.log_tail(name)}"
                )

    def close(self) -> None:
        """SIGTERM each (the gateway first), then SIGKILL whatever is still up."""
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs.values()):
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# --- the client -------------------------------------------------------------------------------


class CallFailed(Exception):
    """A call that did not stream what it should; ``label`` counts it, the message says more."""

    def __init__(self, label: str, detail: str = "") -> None:
        super().__init__(detail or label)
        self.label = label


CLIENT_ERRORS = (CallFailed, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)
"""What a call can fail with: a bad answer, a reset or closed connection, a timeout (an OSError
from 3.11; `asyncio.wait_for` raises it)."""


def _request(target: Target, tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class _Received:
    """What one streamed answer carried."""

    ttft_s: float | None = None
    content_chunks: int = 0
    finished: bool = False
    usage: bool = False
    done: bool = False

    def feed(self, event: bytes, elapsed_s: float) -> None:
        data = b"\n".join(
            line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if data == b"[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise CallFailed("error event", str(chunk["error"])[:200])
        if chunk.get("usage"):
            self.usage = True
        for choice in chunk.get("choices") or ():
            if choice.get("delta", {}).get("content"):
                self.content_chunks += 1
                if self.ttft_s is None:
                    self.ttft_s = elapsed_s
            if choice.get("finish_reason"):
                self.finished = True


class Stream:
    """One client stream: a keep-alive connection (reopened after a failure) and its calls."""

    def __init__(self, target: Target, request: bytes, tokens: int) -> None:
        self.target = target
        self.request = request
        self.tokens = tokens
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    async def call(self) -> tuple[float, float]:
        """One streamed call: (time to its first content chunk, time to its end), from sending
        the request on an open connection."""
        if self._conn is None:
            self._conn = await asyncio.open_connection(self.target.host, self.target.port)
        reader, writer = self._conn
        start = time.perf_counter()
        writer.write(self.request)
        status_line, _, rest = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in rest.split(b"\r\n") if line)
        }
        status = int(status_line.split(b" ", 2)[1])
        if status != 200:
            self.close()  # its body is not read: the connection goes
            raise CallFailed(f"HTTP {status}")
        if headers.get(b"transfer-encoding") != b"chunked" or not headers.get(
            b"content-type", b""
        ).startswith(b"text/event-stream"):
            raise CallFailed("not a chunked event stream", repr(headers)[:200])
        got = _Received()
        buffer = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
            buffer += (await reader.readexactly(size + 2))[:-2]
            while (end := buffer.find(b"\n\n")) >= 0:
                got.feed(buffer[:end], time.perf_counter() - start)
                buffer = buffer[end + 2 :]
        await reader.readuntil(b"\r\n")  # the empty trailer
        total_s = time.perf_counter() - start
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        if got.ttft_s is None or got.content_chunks != self.tokens:
            raise CallFailed("wrong content", f"{got.content_chunks} of {self.tokens} chunks")
        if not (got.finished and got.usage and got.done):
            raise CallFailed("unfinished stream", repr(got))
        return got.ttft_s, total_s


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds so far of each process and of the machine, and the engine's counters."""

    at_s: float
    cpu_s: dict[str, float]
    machine_busy_s: float
    engine: dict[str, int]


def _cpu_s(proc: psutil.Process) -> tuple[float, float]:
    """CPU seconds of a process (user + system, every thread) and of the processes it started:
    those it has reaped, and those still running (with whatever they reaped)."""
    t = proc.cpu_times()
    children = t.children_user + t.children_system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            c = child.cpu_times()
            children += c.user + c.system + c.children_user + c.children_system
    return t.user + t.system, children


def _snapshot(procs: dict[str, psutil.Process], engine: Target) -> Snapshot:
    """Blocking: run it on a worker thread."""
    with urllib.request.urlopen(f"http://{engine.host}:{engine.port}/bench/stats", timeout=10) as r:
        stats = json.loads(r.read())
    at_s = time.perf_counter()
    cpu = {"children": 0.0}
    for name, proc in procs.items():
        if name == "client":  # its children are the processes measured here
            own = proc.cpu_times()
            cpu[name] = own.user + own.system
        else:
            cpu[name], children = _cpu_s(proc)
            cpu["children"] += children
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return Snapshot(at_s, cpu, busy, stats)


@dataclass
class Phase:
    """One measured phase of one path."""

    path: str
    window_start: float
    window_end: float
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(TTFT, total) of each call that started and ended inside the window."""
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    first_error: dict[str, str] = field(default_factory=dict)
    lags_s: list[float] = field(default_factory=list)
    begin: Snapshot | None = None
    end: Snapshot | None = None

    def fail(self, exc: BaseException) -> None:
        label = exc.label if isinstance(exc, CallFailed) else type(exc).__name__
        self.errors[label] += 1
        self.first_error.setdefault(label, str(exc)[:200])


async def _stream_loop(stream: Stream, phase: Phase, load: Load, rng: random.Random | None) -> None:
    """Calls back to back until the window ends; those inside it are recorded. With ``rng``,
    think times are exponential (the first one too, so streams do not start in step)."""
    timeout_s, think_s = load.timeout_s, load.think_s
    if think_s and rng is not None:
        await asyncio.sleep(rng.expovariate(1 / think_s))
    try:
        while (start := time.perf_counter()) < phase.window_end:
            try:
                ttft_s, total_s = await asyncio.wait_for(stream.call(), timeout_s)
            except CLIENT_ERRORS as exc:
                stream.close()
                if start >= phase.window_start:
                    phase.fail(exc)
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            if start >= phase.window_start and time.perf_counter() <= phase.window_end:
                phase.samples.append((ttft_s, total_s))
            if think_s:
                await asyncio.sleep(rng.expovariate(1 / think_s) if rng is not None else think_s)
    finally:
        stream.close()


async def _lag_probe(phase: Phase) -> None:
    """How late this client's event loop wakes up: both paths' times include it."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_S)
        after = time.perf_counter()
        if phase.window_start <= before and after <= phase.window_end:
            phase.lags_s.append(after - before - LAG_PROBE_S)


@dataclass(frozen=True)
class Load:
    concurrency: int
    warmup_s: float
    phase_s: float
    think_s: float
    exponential: bool
    timeout_s: float
    tokens: int


async def _phase(
    path: str, target: Target, load: Load, procs: dict[str, psutil.Process], engine: Target
) -> Phase:
    loop = asyncio.get_running_loop()
    now = time.perf_counter()
    phase = Phase(path, now + load.warmup_s, now + load.warmup_s + load.phase_s)
    request = _request(target, load.tokens)
    streams = [
        asyncio.create_task(
            _stream_loop(
                Stream(target, request, load.tokens),
                phase,
                load,
                random.Random(i) if load.exponential else None,
            )
        )
        for i in range(load.concurrency)
    ]
    probe = asyncio.create_task(_lag_probe(phase))
    try:
        await asyncio.sleep(phase.window_start - time.perf_counter())
        phase.begin = await loop.run_in_executor(None, _snapshot, procs, engine)
        await asyncio.sleep(phase.window_end - time.perf_counter())
        phase.end = await loop.run_in_executor(None, _snapshot, procs, engine)
        await asyncio.gather(*streams)
    finally:
        for task in [*streams, probe]:
            task.cancel()
        await asyncio.gather(*streams, probe, return_exceptions=True)
    return phase


async def _until_served(cluster: Cluster, target: Target, tokens: int) -> None:
    """Until one call on ``target`` streams as it should (the node registers, its replica
    starts, the scheduler learns of it)."""
    deadline = time.perf_counter() + READY_TIMEOUT_S
    while True:
        cluster.check_alive()
        stream = Stream(target, _request(target, tokens), tokens)
        try:
            await asyncio.wait_for(stream.call(), READY_TIMEOUT_S)
            return
        except CLIENT_ERRORS as exc:
            if time.perf_counter() > deadline:
                message = f"{target.name}: no good call in {READY_TIMEOUT_S:g} s: {exc!r}"
                raise BenchError(message) from None
        finally:
            stream.close()
        await asyncio.sleep(0.2)


def _order(rounds: int) -> list[str]:
    """ABBA: direct, gateway, gateway, direct, ... so a drift in the machine's load cancels."""
    return [path for r in range(rounds) for path in (PATHS if r % 2 == 0 else PATHS[::-1])]


async def _measure(
    cluster: Cluster, targets: dict[str, Target], load: Load, rounds: int
) -> list[Phase]:
    for target in targets.values():
        await _until_served(cluster, target, load.tokens)
    procs = {name: psutil.Process(p.pid) for name, p in cluster.procs.items()}
    procs["client"] = psutil.Process(os.getpid())
    phases = []
    for path in _order(rounds):
        phases.append(await _phase(path, targets[path], load, procs, targets["direct"]))
        cluster.check_alive()
    return phases


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """Milliseconds."""

    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values_s: list[float]) -> Dist | None:
        if not values_s:
            return None
        ordered = sorted(values_s)
        return cls(
            round(quantile(ordered, 0.5) * 1e3, 3),
            round(quantile(ordered, 0.99) * 1e3, 3),
            round(sum(ordered) / len(ordered) * 1e3, 3),
        )


@dataclass(frozen=True)
class PathFigures:
    calls: int
    """Calls that started and ended inside a measured window and streamed as they should."""
    errors: dict[str, int]
    first_errors: dict[str, str]
    calls_per_s: float
    ttft_ms: Dist | None
    total_ms: Dist | None
    cpu_cores: dict[str, float]
    """Per process, the machine (every process on it) and ``other`` (the machine less ours)."""
    busiest_phase_cores: float
    """The machine's busy cores in this path's busiest phase."""
    cpu_ms_per_call: dict[str, float | None]
    engine_streams: int
    engine_connections_per_stream: float | None
    """New connections the engine accepted per stream it served: 0 on keep-alive."""
    engine_active_max: int
    client_lag_ms: Dist | None


def _figures(phases: list[Phase]) -> PathFigures:
    ends = [(p.begin, p.end) for p in phases if p.begin is not None and p.end is not None]
    window_s = sum(p.window_end - p.window_start for p in phases)
    wall_s = sum(end.at_s - begin.at_s for begin, end in ends)
    cpu_s = {
        name: sum(end.cpu_s[name] - begin.cpu_s[name] for begin, end in ends) for name in PROCESSES
    }
    cores = {name: round(s / wall_s, 3) for name, s in cpu_s.items()}
    machine_s = sum(end.machine_busy_s - begin.machine_busy_s for begin, end in ends)
    cores["machine"] = round(machine_s / wall_s, 3)
    cores["other"] = round(max(0.0, machine_s - sum(cpu_s.values())) / wall_s, 3)
    calls = sum(len(p.samples) for p in phases)
    errors: collections.Counter[str] = collections.Counter()
    first: dict[str, str] = {}
    for p in phases:
        errors.update(p.errors)
        for label, text in p.first_error.items():
            first.setdefault(label, text)
    streams = sum(end.engine["streams"] - begin.engine["streams"] for begin, end in ends)
    # each end snapshot's own stats request is one more connection
    conns = sum(end.engine["connections"] - begin.engine["connections"] - 1 for begin, end in ends)
    return PathFigures(
        calls=calls,
        errors=dict(errors),
        first_errors=first,
        calls_per_s=round(calls / window_s, 1),
        ttft_ms=Dist.of([s[0] for p in phases for s in p.samples]),
        total_ms=Dist.of([s[1] for p in phases for s in p.samples]),
        cpu_cores=cores,
        busiest_phase_cores=round(
            max((e.machine_busy_s - b.machine_busy_s) / (e.at_s - b.at_s) for b, e in ends), 3
        ),
        cpu_ms_per_call={
            name: round(s / calls * 1e3, 3) if calls else None for name, s in cpu_s.items()
        },
        engine_streams=streams,
        engine_connections_per_stream=round(conns / streams, 3) if streams else None,
        engine_active_max=max(end.engine["active_max"] for _, end in ends),
        client_lag_ms=Dist.of([lag for p in phases for lag in p.lags_s]),
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Setup:
    concurrency: int
    seconds_per_path: float
    rounds: int
    order: list[str]
    warmup_s: float
    think_ms: float
    think: str
    tokens: int
    ttft_ms: float
    itl_ms: float
    router: str
    replica_concurrency: int


def _report(setup: Setup, paths: dict[str, PathFigures]) -> dict[str, object]:
    direct, gateway = paths["direct"], paths["gateway"]
    added: dict[str, float | None] = {"p50": None, "p99": None}
    if direct.ttft_ms is not None and gateway.ttft_ms is not None:
        added = {
            "p50": round(gateway.ttft_ms.p50 - direct.ttft_ms.p50, 3),
            "p99": round(gateway.ttft_ms.p99 - direct.ttft_ms.p99, 3),
        }
    gw_cores = gateway.cpu_cores["gateway"]
    per_core = round(gateway.calls_per_s / gw_cores, 1) if gw_cores > 0 else None
    cpus = psutil.cpu_count() or 1
    return {
        "machine": {
            "cpus": cpus,
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "shared": "the engine, scheduler, node agent, gateway and this client all run here",
        },
        "setup": dataclasses.asdict(setup),
        "direct": dataclasses.asdict(direct),
        "gateway": dataclasses.asdict(gateway),
        "added_ttft_ms": added,
        "gateway_calls_per_s_per_core": per_core,
        "budgets": {
            "added_ttft_p50_ms": BUDGET_ADDED_P50_MS,
            "added_ttft_p99_ms": BUDGET_ADDED_P99_MS,
            "gateway_calls_per_s_per_core": BUDGET_CALLS_PER_CORE,
        },
        "warnings": _warnings(setup, paths, cpus),
    }


def _warnings(setup: Setup, paths: dict[str, PathFigures], cpus: int) -> list[str]:
    out = []
    if setup.concurrency != 100:
        out.append(f"{setup.concurrency} streams: the issue's budgets are for 100")
    for path, fig in paths.items():
        for label, n in fig.errors.items():
            out.append(f"{path}: {n} calls failed ({label}: {fig.first_errors[label]})")
        if fig.busiest_phase_cores >= SATURATED_SHARE * cpus:
            out.append(
                f"{path}: the machine was saturated ({fig.busiest_phase_cores:.2f} of {cpus} "
                "cores busy in a phase): its times include waiting for a CPU"
            )
        if fig.cpu_cores["other"] > OTHER_LOAD_CORES:
            out.append(
                f"{path}: processes outside the bench used {fig.cpu_cores['other']:.2f} cores"
            )
        if fig.client_lag_ms is not None and fig.client_lag_ms.p99 > 1.0:
            out.append(
                f"{path}: this client's event loop woke up to {fig.client_lag_ms.p99:.1f} ms "
                "late (p99): its times include that"
            )
        if fig.calls < 1000:
            out.append(f"{path}: {fig.calls} calls: the p99 rests on few of them")
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _markdown(doc: dict[str, object], paths: dict[str, PathFigures]) -> str:
    machine, setup = doc["machine"], doc["setup"]
    assert isinstance(machine, dict) and isinstance(setup, dict)
    added = doc["added_ttft_ms"]
    assert isinstance(added, dict)
    lines = [
        "## Gateway hop (issue 20)",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), Python {machine['python']}; "
        f"{machine['shared']}, so every figure holds their contention for the CPUs.",
        f"Setup: {setup['concurrency']} streams, {setup['seconds_per_path']:g} s measured per "
        f"path in phases ordered {', '.join(setup['order'])}, {setup['warmup_s']:g} s of "
        f"uncounted warm-up before each; think time {setup['think_ms']:g} ms "
        f"({setup['think']}); engine: "
        f"{setup['tokens']} tokens, the first {setup['ttft_ms']:g} ms after the request, then "
        f"{setup['itl_ms']:g} ms apart; router {setup['router']}; replica concurrency "
        f"{setup['replica_concurrency']}.",
        "",
        "| path | calls | errors | calls/s | TTFT p50 | TTFT p99 | total p50 | total p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, fig in paths.items():
        ttft, total = fig.ttft_ms, fig.total_ms
        lines.append(
            f"| {path} | {fig.calls} | {sum(fig.errors.values())} | {fig.calls_per_s:g} | "
            f"{_ms(ttft.p50 if ttft else None)} | {_ms(ttft.p99 if ttft else None)} | "
            f"{_ms(total.p50 if total else None)} | {_ms(total.p99 if total else None)} |"
        )
    per_core = doc["gateway_calls_per_s_per_core"]
    lines += [
        "",
        "| the hop | measured | budget |",
        "|---|---|---|",
        f"| added TTFT p50 (gateway p50 - direct p50) | {_ms(added['p50'])} | "
        f"< {BUDGET_ADDED_P50_MS:g} ms |",
        f"| added TTFT p99 (gateway p99 - direct p99) | {_ms(added['p99'])} | "
        f"< {BUDGET_ADDED_P99_MS:g} ms |",
        f"| gateway streamed calls/s per core | {per_core if per_core is not None else '-'} | "
        f">= {BUDGET_CALLS_PER_CORE:g} |",
        "",
        "| process | cores, direct phases | cores, gateway phases | CPU ms per gateway call |",
        "|---|---|---|---|",
    ]
    direct, gateway = paths["direct"], paths["gateway"]
    for name in PROCESSES:
        per_call = gateway.cpu_ms_per_call[name]
        lines.append(
            f"| {name} | {direct.cpu_cores[name]:.3f} | {gateway.cpu_cores[name]:.3f} | "
            f"{'-' if per_call is None else f'{per_call:.3f}'} |"
        )
    for name in ("other", "machine"):
        lines.append(f"| {name} | {direct.cpu_cores[name]:.3f} | {gateway.cpu_cores[name]:.3f} | |")
    lines += [
        "",
        f"The engine opened {_num(direct.engine_connections_per_stream)} connections per "
        f"stream on the direct path and {_num(gateway.engine_connections_per_stream)} on the "
        f"gateway path; at most {max(direct.engine_active_max, gateway.engine_active_max)} "
        "streams ran on it at once.",
        "",
        *DEFINITIONS,
    ]
    warnings = doc["warnings"]
    assert isinstance(warnings, list)
    if warnings:
        lines += ["", "Warnings:", *(f"- {w}" for w in warnings)]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


DEFINITIONS = [
    "- TTFT: from writing the request on an open keep-alive connection to parsing the first "
    "event with non-empty `delta.content`; total: to the end of the chunked body.",
    "- calls, calls/s: calls that started and ended inside a measured window and streamed "
    "exactly `--tokens` content chunks, a finish reason, usage and `[DONE]`, over the windows' "
    "length; errors: calls started in a window that failed (any status but 200, a short or "
    "malformed stream, a reset, a timeout).",
    "- added TTFT: the gateway path's quantile minus the direct path's. The calls of the two "
    "paths are not paired, so the distribution of per-call differences is not available; the "
    "gateway path's calls also cross the scheduler and the node agent, so this is the whole "
    "hop, not the gateway alone.",
    "- cores: a process's CPU time (user + system, every thread, from psutil) over the measured "
    "windows, divided by their wall time; machine: every CPU's busy time (user, nice, system, "
    "irq, softirq); children: processes the daemons started (the default router's "
    "predictor trainer, in the scheduler); other: the machine less the processes listed. CPU ms "
    "per gateway call: its CPU time in the gateway phases over the calls completed in them.",
    "- gateway streamed calls/s per core: gateway calls/s divided by the cores the gateway "
    "process used, i.e. 1 / its CPU seconds per call; a measurement when it used a whole core, "
    "otherwise the linear extrapolation to one.",
]


# --- main -------------------------------------------------------------------------------------


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--concurrency", type=int, default=100, help="concurrent streams per path")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per path")
    ap.add_argument("--rounds", type=int, default=2, help="phases per path, ordered ABBA")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="uncounted calls before a phase")
    ap.add_argument(
        "--think-ms", type=float, default=0.0, help="mean pause between a stream's calls"
    )
    ap.add_argument(
        "--think",
        choices=("exponential", "fixed"),
        default="exponential",
        help="think times drawn at random, or all equal (streams in step: bursts)",
    )
    ap.add_argument("--tokens", type=int, default=16, help="content chunks per answer")
    ap.add_argument("--ttft-ms", type=float, default=20.0, help="engine: time to first token")
    ap.add_argument("--itl-ms", type=float, default=5.0, help="engine: time between tokens")
    ap.add_argument("--timeout-s", type=float, default=30.0, help="one call's limit")
    ap.add_argument(
        "--router", choices=get_args(RouterPolicy), help="[router] policy (default: the config's)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: defaults of 20 streams, 5 s, 1 round"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON document instead")
    ap.add_argument("--keep", type=Path, help="keep the logs and state in this directory")
    ap.add_argument("--serve-engine", action="store_true", help=argparse.SUPPRESS)
    if ap.parse_known_args()[0].quick:  # options given explicitly still win
        ap.set_defaults(concurrency=20, seconds=5.0, rounds=1, warmup_s=1.0)
    args = ap.parse_args()
    if args.concurrency < 1 or args.rounds < 1 or args.tokens < 1 or args.seconds <= 0:
        ap.error("--concurrency, --rounds and --tokens must be >= 1, --seconds > 0")
    return args


def main() -> None:
    args = _args()
    spec = EngineSpec(args.tokens, args.ttft_ms / 1e3, args.itl_ms / 1e3)
    if args.serve_engine:
        _serve_engine(spec)
        return
    slots = max(MIN_REPLICA_CONCURRENCY, 2 * args.concurrency)
    setup = Setup(
        concurrency=args.concurrency,
        seconds_per_path=args.seconds,
        rounds=args.rounds,
        order=_order(args.rounds),
        warmup_s=args.warmup_s,
        think_ms=args.think_ms,
        think=args.think,
        tokens=args.tokens,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        router=args.router or f"{RouterConfig().policy} (the default)",
        replica_concurrency=slots,
    )
    load = Load(
        args.concurrency,
        args.warmup_s,
        args.seconds / args.rounds,
        args.think_ms / 1e3,
        args.think == "exponential",
        args.timeout_s,
        args.tokens,
    )
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = args.keep
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-hop-")))
        cluster = Cluster(tmp, spec, args.router, slots)
        stack.callback(cluster.close)
        try:
            direct, gateway = cluster.start()
            phases = asyncio.run(
                _measure(cluster, {"direct": direct, "gateway": gateway}, load, args.rounds)
            )
        except BenchError as exc:
            sys.exit(f"gateway_hop: {exc}")
    paths = {path: _figures([p for p in phases if p.path == path]) for path in PATHS}
    doc = _report(setup, paths)
    print(json.dumps(doc, indent=2) if args.json else _markdown(doc, paths))


if __name__ == "__main__":
    main()
