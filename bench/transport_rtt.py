"""The floor under the gateway hop: round trips between two processes on this machine.

A gateway call crosses four ZeroMQ hops that a direct call does not (gateway -> scheduler ->
node, and the first chunk back node -> scheduler -> gateway) and two HTTP hops (node <-> engine)
on top of the client <-> engine pair both paths have. This measures one round trip of each kind
of hop with nothing else to do, so the report can say how much of the added time no code on the
path can remove on this machine:

- ``tcp``: stdlib asyncio streams, 300 bytes each way (what an HTTP hop costs at the least);
- ``swarmx``: SwarmX's own transport (``swarmx.transport``: a DEALER to a ROUTER, typed frames
  encoded and decoded, a ``Heartbeat`` there and an ``Ack`` back), plain and with CURVE keys.

    .venv/bin/python bench/transport_rtt.py            # 2,000 round trips of each, 2 ms apart

Each echo server runs in a process of its own; the client is this one. Round trips are paced
(``--gap-ms``) so each one starts on quiet processes, as a lone stream's calls do.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from swarmx.clock import RealClock
from swarmx.protocol import Ack, Heartbeat
from swarmx.transport import (
    ClientCurve,
    ServerCurve,
    bind_router,
    connect_dealer,
    generate_keys,
    load_keypair,
)

PAYLOAD = b"x" * 300


def _tcp_server(port: multiprocessing.Queue[int]) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def _swarmx_server(endpoint: multiprocessing.Queue[str], keys: Path | None) -> None:
    async def main() -> None:
        curve = None
        if keys is not None:
            client_public = load_keypair(keys / "client.key_secret").public
            server = load_keypair(keys / "server.key_secret")
            curve = ServerCurve(server, allow=lambda key: key == client_public)
        router = bind_router("tcp://127.0.0.1:0", "echo", RealClock(), curve=curve)
        endpoint.put(router.endpoint)
        while True:
            got = await router.recv()
            if got is not None:
                await router.send(got[0], Ack(ref_seq=got[1].seq))

    asyncio.run(main())


async def _pace(n: int, gap_s: float, once: Callable[[], Awaitable[None]]) -> list[float]:
    for _ in range(n // 10):  # warm-up, not counted
        await once()
    rtts = []
    for _ in range(n):
        start = time.perf_counter()
        await once()
        rtts.append(time.perf_counter() - start)
        await asyncio.sleep(gap_s)
    return rtts


async def _tcp(port: int, n: int, gap_s: float) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def once() -> None:
        writer.write(PAYLOAD)
        await reader.readexactly(len(PAYLOAD))

    try:
        return await _pace(n, gap_s, once)
    finally:
        writer.close()


async def _swarmx(endpoint: str, n: int, gap_s: float, curve: ClientCurve | None) -> list[float]:
    dealer = connect_dealer(endpoint, "bench", RealClock(), curve=curve)
    try:
        deadline = time.monotonic() + 10
        while await dealer.send(Heartbeat(uptime_s=0.0)) is None:  # until connected
            assert time.monotonic() < deadline, "never connected"
            await asyncio.sleep(0.01)
        await dealer.recv()

        async def once() -> None:
            await dealer.send(Heartbeat(uptime_s=1.0))
            await dealer.recv()

        return await _pace(n, gap_s, once)
    finally:
        dealer.close()


def _serve(target: Callable[..., None], *args: object) -> tuple[multiprocessing.Process, object]:
    ready: multiprocessing.Queue[object] = multiprocessing.Queue()
    proc = multiprocessing.Process(target=target, args=(ready, *args), daemon=True)
    proc.start()
    return proc, ready.get(timeout=30)


def _row(name: str, rtts: list[float]) -> str:
    q = statistics.quantiles(rtts, n=100, method="inclusive")
    return f"| {name} | {len(rtts)} | {q[49] * 1e3:.3f} ms | {q[98] * 1e3:.3f} ms |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--round-trips", type=int, default=2000)
    ap.add_argument("--gap-ms", type=float, default=2.0, help="pause between round trips")
    args = ap.parse_args()
    n, gap_s = args.round_trips, args.gap_ms / 1e3
    multiprocessing.set_start_method("spawn")
    rows = []
    proc, port = _serve(_tcp_server)
    try:
        assert isinstance(port, int)
        rows.append(_row("asyncio TCP (an HTTP hop's floor)", asyncio.run(_tcp(port, n, gap_s))))
    finally:
        proc.kill()
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        generate_keys(keys, "server")
        generate_keys(keys, "client")
        for keyed in (False, True):
            proc, endpoint = _serve(_swarmx_server, keys if keyed else None)
            try:
                assert isinstance(endpoint, str)
                curve = None
                if keyed:
                    server_public = load_keypair(keys / "server.key_secret").public
                    curve = ClientCurve(load_keypair(keys / "client.key_secret"), server_public)
                name = "swarmx transport, CURVE" if keyed else "swarmx transport, no keys"
                rows.append(_row(name, asyncio.run(_swarmx(endpoint, n, gap_s, curve))))
            finally:
                proc.kill()
    print(f"| round trip, {args.gap_ms:g} ms apart | round trips | p50 | p99 |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
