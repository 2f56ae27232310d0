"""The engine backends' HTTP/1.1 client against a real socket server whose answers are scripted
byte for byte: framing, reuse, limits, malformed answers, cancels and deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from swarmx.backends.http1 import (
    MAX_HEAD_BYTES,
    HttpClient,
    ProtocolError,
    Response,
)
from swarmx.clock import _TimeLimit

CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"


@dataclass
class Script:
    """A server: each request (head and sized body) is kept, and answered with ``answer``'s
    pieces, written one at a time; ``None`` in them closes the connection there."""

    answer: Callable[[int], list[bytes | None]]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a client closed its connection while an answer was being written."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                for piece in self.answer(len(self.requests)):
                    if piece is None:
                        writer.close()
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.gone.set()
        finally:
            writer.close()


async def _serve(script: Script) -> tuple[asyncio.Server, HttpClient]:
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, HttpClient("http", "127.0.0.1", port, max_idle=4, connect_timeout_s=5)


def run(script: Script, body: Callable[[HttpClient], object]) -> object:
    async def go() -> object:
        server, client = await _serve(script)
        try:
            return await body(client)  # type: ignore[misc]
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(go())


async def body_of(resp: Response) -> list[bytes]:
    parts = []
    while data := await resp.read_some():
        parts.append(data)
    return parts


def test_a_chunked_body_in_pieces_with_extensions_and_trailers_then_reuse() -> None:
    pieces: list[bytes | None] = [
        CHUNKED,
        b"5;ext=1\r\nhel",
        b"lo\r\n",
        b"6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n",
    ]
    script = Script(lambda n: pieces)

    async def body(client: HttpClient) -> list[bytes]:
        got = []
        for _ in range(2):
            resp = await client.request("GET", "/x", {"Accept": "text/plain"})
            got.append(b"".join(await body_of(resp)))
            assert resp.complete and resp.keep_alive
            await client.release(resp)
        return got

    assert run(script, body) == [b"hello world"] * 2
    assert script.connections == 1
    assert script.requests[0].startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nAccept: text/plain\r\n" in script.requests[0]


def test_a_sized_body_read_in_part_is_finished_on_release_and_the_connection_kept() -> None:
    script = Script(lambda n: [b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\n0123456789"])

    async def body(client: HttpClient) -> tuple[int, str, bytes, bytes]:
        resp = await client.request("POST", "/v1/x", {"Content-Type": "application/json"}, b"{}")
        head = await resp.read(4)
        await client.release(resp)
        again = await client.request("GET", "/v1/y", {})
        rest = await again.read(100)
        await client.release(again)
        return resp.status, resp.reason, head, rest

    assert run(script, body) == (404, "Not Found", b"0123", b"0123456789")
    assert script.connections == 1
    assert script.requests[0].endswith(b"Content-Length: 2\r\n\r\n{}")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",  # no length: the body ends with the connection
        b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
    ],
)
def test_answers_that_end_their_connection_are_not_reused(head: bytes) -> None:
    script = Script(lambda n: [head, b"data", None])

    async def body(client: HttpClient) -> list[bytes]:
        got = []
        for _ in range(2):
            resp = await client.request("GET", "/", {})
            assert not resp.keep_alive
            got.append(b"".join(await body_of(resp)))
            await client.release(resp)
        return got

    assert run(script, body) == [b"data"] * 2
    assert script.connections == 2


def test_an_interim_answer_is_skipped() -> None:
    script = Script(
        lambda n: [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    )

    async def body(client: HttpClient) -> tuple[int, bytes]:
        resp = await client.request("GET", "/", {})
        return resp.status, await resp.read(10)

    assert run(script, body) == (200, b"ok")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
        (CHUNKED + b"zz\r\n", "bad chunk size line"),
        (CHUNKED + b"2\r\nabXY", "a chunk does not end with CRLF"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * MAX_HEAD_BYTES + b"\r\n\r\n", "a response head over"),
        (CHUNKED + b"1" * (MAX_HEAD_BYTES + 10), "a line over"),
    ],
)
def test_malformed_answers_are_protocol_errors(answer: bytes, error: str) -> None:
    script = Script(lambda n: [answer])

    async def body(client: HttpClient) -> None:
        resp = await client.request("GET", "/", {})
        await body_of(resp)

    with pytest.raises(ProtocolError, match=error):
        run(script, body)


def test_a_connection_cut_mid_body_is_an_incomplete_read() -> None:
    script = Script(lambda n: [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", None])

    async def body(client: HttpClient) -> None:
        resp = await client.request("GET", "/", {})
        await body_of(resp)

    with pytest.raises(asyncio.IncompleteReadError):
        run(script, body)


def test_a_new_connection_closed_before_any_answer_is_not_retried() -> None:
    """Only a kept-alive connection may have been closed while it idled; on a fresh one the
    request may have reached the engine, so it is not sent twice."""
    script = Script(lambda n: [None])

    async def body(client: HttpClient) -> None:
        await client.request("POST", "/", {}, b"x")

    with pytest.raises(asyncio.IncompleteReadError):
        run(script, body)
    assert len(script.requests) == 1


def test_a_cancelled_read_closes_the_connection() -> None:
    pieces: list[bytes | None] = [CHUNKED, b"1\r\na\r\n"] + [b"1\r\nb\r\n"] * 2000
    script = Script(lambda n: pieces)

    async def body(client: HttpClient) -> int:
        resp = await client.request("GET", "/", {})
        task = asyncio.create_task(body_of(resp))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        client.discard(resp)
        await asyncio.wait_for(script.gone.wait(), 5)
        resp2 = await client.request("GET", "/", {})  # a new connection
        client.discard(resp2)
        return script.connections

    assert run(script, body) == 2


def test_the_time_limit_turns_its_own_cancel_into_a_timeout_and_passes_others() -> None:
    async def limited(delay_s: float) -> str:
        async with _TimeLimit(delay_s):
            await asyncio.sleep(10)
        return "done"

    async def go() -> None:
        with pytest.raises(TimeoutError):
            await limited(0.01)
        task = asyncio.create_task(limited(5))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with _TimeLimit(5):
            await asyncio.sleep(0)

    asyncio.run(go())
