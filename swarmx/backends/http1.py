"""A small asyncio HTTP/1.1 client for engine backends: keep-alive connections and streamed
bodies (chunked, sized, or ending with the connection), read on the caller's event loop.

A node drives hundreds of engine streams from one event loop. With ``http.client`` each stream
held a thread, and the hand-offs between those threads and the loop cost the node about 3 ms of
CPU per call; here a chunk costs one wake-up of the loop. It speaks only what engines need: no
redirects, proxies, compression or ``Expect: 100-continue``. Deadlines are the caller's
(`time_limit`); cancelling a read aborts its connection, so the server sees the client go.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from swarmx.clock import time_limit

MAX_HEAD_BYTES = 64 * 1024
"""Largest response head (status line and headers) accepted."""
READ_BYTES = 64 * 1024
MAX_TRAILER_LINES = 100
TAIL_BYTES = 64 * 1024
"""The most read of what follows the part of a body the caller wanted (a stream's terminating
chunk after ``[DONE]``) for its connection to be reused."""
TAIL_TIMEOUT_S = 1.0
"""How long that end may take to come; a slower one closes the connection."""

Framing = Literal["none", "length", "chunked", "close"]


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.x as this client reads it."""


class _Connection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        opened: set[_Connection],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._opened = opened
        opened.add(self)

    def alive(self) -> bool:
        """Not closed from either side (a server that closed an idle connection has sent EOF)."""
        return not (self.reader.at_eof() or self.writer.transport.is_closing())

    def abort(self) -> None:
        self.writer.transport.abort()
        self._opened.discard(self)


@dataclass(frozen=True, slots=True)
class _Head:
    status: int
    reason: str
    headers: dict[str, str]
    framing: Framing
    length: int
    keep_alive: bool


class Response:
    """A response whose head is read; its body is read by `read_some` or `read`.

    A body not read to its end leaves the connection unusable: `HttpClient.release` closes it.
    """

    def __init__(self, conn: _Connection, head: _Head) -> None:
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        """Lower-case names; a repeated header's values joined by ", "."""
        self.keep_alive = head.keep_alive
        """The server keeps the connection open after this body (HTTP/1.1 without
        ``Connection: close``, and a body whose end is known)."""
        self._conn = conn
        self._framing = head.framing
        self._left = head.length
        """Bytes left of a sized body, or of the current chunk of a chunked one."""
        self._chunk_open = False
        self.complete = head.framing == "none"
        """The body has been read to its end."""

    async def read_some(self) -> bytes:
        """The next bytes of the body as they arrive; b"" at its end. Raises
        `asyncio.IncompleteReadError` when the connection ends before the body does."""
        if self.complete:
            return b""
        reader = self._conn.reader
        if self._framing == "close":
            data = await reader.read(READ_BYTES)
            self.complete = not data
            return data
        if self._framing == "chunked" and self._left == 0 and not await self._next_chunk():
            self.complete = True
            return b""
        data = await reader.read(min(self._left, READ_BYTES))
        if not data:
            raise asyncio.IncompleteReadError(b"", self._left)
        self._left -= len(data)
        if self._framing == "length" and self._left == 0:
            self.complete = True
        return data

    async def read(self, limit: int) -> bytes:
        """The body, or its first ``limit`` bytes (the rest is left unread)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (data := await self.read_some()):
            parts.append(data)
            size += len(data)
        return b"".join(parts)[:limit]

    async def _next_chunk(self) -> bool:
        """Start the next chunk of a chunked body; False at the last (size 0) chunk, whose
        trailers are read and dropped."""
        reader = self._conn.reader
        if self._chunk_open and await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("a chunk does not end with CRLF")
        self._chunk_open = True
        line = await _line(reader)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
        if size < 0:
            raise ProtocolError(f"bad chunk size line {line[:40]!r}")
        if size > 0:
            self._left = size
            return True
        for _ in range(MAX_TRAILER_LINES):
            if await _line(reader) == b"\r\n":
                return False
        raise ProtocolError(f"more than {MAX_TRAILER_LINES} trailer lines")


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"a line over {MAX_HEAD_BYTES} bytes") from None


def _parse_head(head: bytes, method: str) -> _Head:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"bad status line {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"bad header line {line[:60]!r}")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    status = int(code)
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    framing: Framing
    length = 0
    if method == "HEAD" or status in (204, 304):
        framing = "none"
    elif "transfer-encoding" in headers:
        if headers["transfer-encoding"].lower().rsplit(",", 1)[-1].strip() != "chunked":
            raise ProtocolError(f"unsupported Transfer-Encoding {headers['transfer-encoding']!r}")
        framing = "chunked"
    elif "content-length" in headers:
        value = headers["content-length"]
        if not value.isdigit():
            raise ProtocolError(f"bad Content-Length {value[:40]!r}")
        length = int(value)
        framing = "length" if length else "none"
    else:
        framing, keep_alive = "close", False
    return _Head(status, reason, headers, framing, length, keep_alive)


class HttpClient:
    """Requests to one origin (``http`` or ``https``, host and port) over kept-alive connections.

    Reuse saves a TCP (and TLS) handshake per call, and the sockets each closed connection
    leaves in TIME_WAIT, which at a thousand calls a second run a host out of ephemeral ports.
    At most ``max_idle`` idle connections are kept, the most recently used first.
    """

    def __init__(
        self, scheme: str, host: str, port: int, *, max_idle: int, connect_timeout_s: float
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl.create_default_context() if scheme == "https" else None
        default = 443 if scheme == "https" else 80
        self._authority = host if port == default else f"{host}:{port}"
        if ":" in host:  # an IPv6 literal
            self._authority = f"[{host}]" if port == default else f"[{host}]:{port}"
        self._max_idle = max_idle
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []
        self._opened: set[_Connection] = set()
        """Every connection not yet closed, idle or carrying a request: `close` ends them all."""
        self._closed = False

    async def request(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Response:
        """Send a request and read its response's head.

        A kept-alive connection that the server closed while it idled fails on the send or
        before the status line: that request never reached the engine, so it goes once more on
        a new connection (whose own failure is the caller's).
        """
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        conn = self._take()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect()
            try:
                return await self._exchange(conn, method, data)
            except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
                conn.abort()
                stale = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
                if not (reused and stale):
                    raise
            except BaseException:
                conn.abort()
                raise
            conn, reused = None, False

    async def release(self, response: Response) -> None:
        """Hand the response's connection back: kept for a later request when its body is read
        to the end and the server keeps it open, else closed. A body's unread end (the
        terminating chunk that follows a stream's ``[DONE]``, usually already here) is read
        first, bounded by `TAIL_BYTES` and `TAIL_TIMEOUT_S`."""
        conn = response._conn
        kept = False
        try:
            if response.keep_alive and not self._closed and conn.alive():
                if not response.complete:
                    async with time_limit(TAIL_TIMEOUT_S):
                        await response.read(TAIL_BYTES)
                if response.complete and not self._closed and len(self._idle) < self._max_idle:
                    self._idle.append(conn)
                    kept = True
        except (OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError):
            pass
        finally:
            if not kept:
                conn.abort()

    def discard(self, response: Response) -> None:
        """Close the response's connection (its request was cancelled or failed)."""
        response._conn.abort()

    async def close(self) -> None:
        """Close every connection, those of requests under way too (their reads fail)."""
        self._closed = True
        self._idle = []
        for conn in list(self._opened):
            conn.abort()

    def _take(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.alive():
                return conn
            conn.abort()
        return None

    async def _connect(self) -> _Connection:
        async with time_limit(self._connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
                limit=MAX_HEAD_BYTES,
            )
        return _Connection(reader, writer, self._opened)

    @staticmethod
    async def _exchange(conn: _Connection, method: str, data: bytes) -> Response:
        conn.writer.write(data)
        await conn.writer.drain()
        while True:
            try:
                head = await conn.reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise ProtocolError(f"a response head over {MAX_HEAD_BYTES} bytes") from None
            parsed = _parse_head(head[:-4], method)
            if not 100 <= parsed.status < 200:  # 1xx answers are interim: the real one follows
                return Response(conn, parsed)
