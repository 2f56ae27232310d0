"""What the node's engine client costs per call (issue 22): the `openai` backend as it is, against
a connection opened per call (the client before, on a thread per call) and against httpx.

    .venv/bin/python bench/engine_client.py            # ~1 min; prints a Markdown table
    .venv/bin/python bench/engine_client.py --json

- **Engine**: `bench/gateway_hop.py`'s fake OpenAI-compatible server in a process of its own
  (asyncio, keep-alive HTTP/1.1, chunked server-sent events), answering at once: ``--tokens``
  content chunks with no delay, so what is measured is the client, not the engine.
- **Arms**, each streaming the same chat request (``stream: true``, ``include_usage``) and
  reading every chunk up to ``[DONE]``:
  - ``swarmx``: `OpenAIBackend.run`, what the node runs: `swarmx/backends/http1.py` on the
    node's event loop, kept-alive connections (at most ``concurrency`` idle);
  - ``per-call connection``: `http.client` on a thread per call with a new TCP connection each
    call (the node's client before session 11, which the issue describes);
  - ``httpx``: `httpx.AsyncClient` (pooled, HTTP/1.1) reading the stream line by line; only where
    httpx is installed (it is no SwarmX dependency: ``pip install httpx`` to run this arm).
- **Loads**: one stream in a closed loop, and ``--concurrency`` streams at once; each arm
  ``--seconds`` after a warm-up, arms in turn, twice (ABC CBA) so drift shows.
- **Figures**: calls/s, call latency p50 / p99 (request to ``[DONE]``), and the client process's
  CPU per call (user + system over the window / calls). Client and engine share this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

from swarmx.backends.base import CallRequest
from swarmx.backends.openai import OpenAIBackend
from swarmx.config import ReplicaConfig
from swarmx.stats import quantile

ROOT = Path(__file__).resolve().parents[1]
BODY = {
    "model": "bench-lm",
    "messages": [{"role": "user", "content": "Say something short."}],
    "max_tokens": 16,
    "stream": True,
    "stream_options": {"include_usage": True},
}

Call = Callable[[], Awaitable[bool]]


def _swarmx(port: int, concurrency: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    backend = OpenAIBackend(
        ReplicaConfig(
            "bench-lm", "openai", url=f"http://127.0.0.1:{port}/v1", concurrency=concurrency
        )
    )
    request = CallRequest("c", "llm", "bench-lm", "Say something short.", 16, timeout_s=30)

    async def call() -> bool:
        return (await backend.run(request)).ok

    return call, backend.close


def _per_call(port: int, concurrency: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    body = json.dumps(BODY).encode()

    def blocking() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            done = False
            for line in resp:
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
            return resp.status == 200 and done
        finally:
            conn.close()

    async def call() -> bool:
        return await asyncio.to_thread(blocking)

    async def close() -> None:
        return None

    return call, close


def _httpx(port: int, concurrency: int) -> tuple[Call, Callable[[], Awaitable[None]]] | None:
    try:
        import httpx
    except ImportError:
        return None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30)

    async def call() -> bool:
        async with client.stream("POST", "/v1/chat/completions", json=BODY) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: [DONE]"):
                    return resp.status_code == 200
        return False

    return call, client.aclose


async def _measure(call: Call, streams: int, seconds: float, warmup_s: float) -> dict[str, float]:
    me = psutil.Process()
    latencies: list[float] = []
    errors = 0
    counting = False
    stop = False

    async def stream() -> None:
        nonlocal errors
        while not stop:
            t0 = time.perf_counter()
            ok = await call()
            if counting:
                latencies.append(time.perf_counter() - t0)
                errors += not ok

    tasks = [asyncio.create_task(stream()) for _ in range(streams)]
    await asyncio.sleep(warmup_s)
    counting = True
    cpu0, t0 = me.cpu_times(), time.perf_counter()
    await asyncio.sleep(seconds)
    counting = False
    cpu1, wall = me.cpu_times(), time.perf_counter() - t0
    stop = True
    await asyncio.gather(*tasks)
    n = len(latencies)
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    s = sorted(latencies)
    return {
        "calls": n,
        "errors": errors,
        "calls_per_s": n / wall,
        "p50_ms": quantile(s, 0.5) * 1e3 if s else 0.0,
        "p99_ms": quantile(s, 0.99) * 1e3 if s else 0.0,
        "cpu_ms_per_call": cpu_s * 1e3 / max(n, 1),
    }


async def _run(port: int, args: argparse.Namespace) -> dict[str, dict[str, list[dict[str, float]]]]:
    arms = {"swarmx": _swarmx, "per-call connection": _per_call, "httpx": _httpx}
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for streams in (1, args.concurrency):
        order = list(arms) + list(reversed(arms))
        for name in order:
            made = arms[name](port, streams)
            if made is None:
                continue
            call, close = made
            try:
                got = await _measure(call, streams, args.seconds, args.warmup_s)
            finally:
                await close()
            out.setdefault(str(streams), {}).setdefault(name, []).append(got)
    return out


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per arm and turn")
    ap.add_argument("--warmup-s", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    engine = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "gateway_hop.py"),
            "--serve-engine",
            *("--tokens", str(args.tokens), "--ttft-ms", "0", "--itl-ms", "0"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert engine.stdout is not None
        port = int(engine.stdout.readline())
        results = asyncio.run(_run(port, args))
    finally:
        engine.terminate()
        engine.wait()
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(
        "| streams | client | calls/s | latency p50 / p99 (ms) | client CPU ms per call | errors |"
    )
    print("|---:|---|---:|---|---:|---:|")
    for streams, arms in results.items():
        for name, rows in arms.items():
            print(
                f"| {streams} | {name} | {_mean(rows, 'calls_per_s'):,.0f} | "
                f"{_mean(rows, 'p50_ms'):.2f} / {_mean(rows, 'p99_ms'):.2f} | "
                f"{_mean(rows, 'cpu_ms_per_call'):.2f} | {sum(int(r['errors']) for r in rows)} |"
            )


if __name__ == "__main__":
    main()
