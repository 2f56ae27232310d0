"""ZeroMQ transport: the only module that imports zmq.

The scheduler binds one ROUTER socket at the address users name; node agents and CLI clients connect
DEALER sockets to it, so one endpoint carries registration, telemetry, commands and queries. Every
socket closes with linger 0, and bad frames are counted and answered, never raised to a handler.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from swarmx.clock import Clock
from swarmx.protocol import (
    MAX_FRAME_BYTES,
    Envelope,
    Error,
    Message,
    ProtocolError,
    decode_frame,
    encode_frame,
)

log = logging.getLogger(__name__)

_HARD_LIMIT_FACTOR = 4
"""zmq drops a peer that sends more than this many times the decode limit in one frame."""


class TransportError(OSError):
    """A socket could not be set up (address in use, unresolvable host)."""


@dataclass
class FrameStats:
    sent: int = 0
    received: int = 0
    unsent: int = 0
    """Frames that could not leave: no connection yet, peer gone, or queue full."""
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    """Bad incoming frames by reason (garbage, oversized, version, unknown_type, schema)."""


class _Channel:
    def __init__(
        self,
        sock: zmq.asyncio.Socket,
        ctx: zmq.asyncio.Context,
        sender: str,
        clock: Clock,
        max_frame_bytes: int,
    ) -> None:
        self._sock = sock
        self._ctx = ctx
        self.sender = sender
        self._clock = clock
        self._max_frame_bytes = max_frame_bytes
        self._seq = 0
        self.stats = FrameStats()

    @property
    def last_seq(self) -> int:
        """The seq of the last frame this channel numbered, sent or not (0 before any)."""
        return self._seq

    def _frame(self, body: Message) -> tuple[int, bytes]:
        self._seq += 1
        return self._seq, encode_frame(self.sender, self._seq, self._clock.time(), body)

    def _decode(self, payload: bytes) -> Envelope | ProtocolError:
        try:
            env = decode_frame(payload, self._max_frame_bytes)
        except ProtocolError as exc:
            self.stats.dropped[exc.reason] += 1
            log.warning("dropped bad frame (%s)", exc)
            return exc
        self.stats.received += 1
        return env

    async def _send(self, frames: list[bytes]) -> bool:
        try:
            await self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # Again (no peer / queue full) or EHOSTUNREACH (peer gone)
            self.stats.unsent += 1
            log.debug("frame not sent: %s", exc)
            return False
        self.stats.sent += 1
        return True

    def close(self) -> None:
        """Idempotent; never blocks on unsent frames."""
        if not self._sock.closed:
            self._sock.close(linger=0)
            self._ctx.term()


class RouterChannel(_Channel):
    """The scheduler's single bound socket."""

    endpoint: str

    async def recv(self) -> tuple[bytes, Envelope]:
        """Next valid frame with its peer's routing id; bad frames are answered and skipped."""
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 2:
                self.stats.dropped["garbage"] += 1
                continue
            peer, payload = frames
            env = self._decode(payload)
            if isinstance(env, Envelope):
                return peer, env
            await self.send(peer, Error(ref_seq=-1, code=env.reason, message=env.message))

    async def send(self, peer: bytes, body: Message) -> bool:
        _, payload = self._frame(body)
        return await self._send([peer, payload])


class DealerChannel(_Channel):
    """A node agent's or client's connection to the scheduler; reconnects by itself."""

    async def recv(self) -> Envelope:
        while True:
            frames = await self._sock.recv_multipart()
            env = self._decode(frames[-1])
            if isinstance(env, Envelope):
                return env

    async def send(self, body: Message) -> int | None:
        """Send now or not at all (stale telemetry is worth nothing); the frame's seq if sent."""
        seq, payload = self._frame(body)
        return seq if await self._send([payload]) else None


def _zmq_address(url: str) -> str:
    """``tcp://host:0`` asks for any free port, spelt ``*`` in zmq."""
    return url[: -len(":0")] + ":*" if url.startswith("tcp://") and url.endswith(":0") else url


def _open(
    kind: int, url: str, options: dict[zmq.SocketOption, int], max_frame_bytes: int, *, bind: bool
) -> tuple[zmq.asyncio.Context, zmq.asyncio.Socket]:
    """A configured socket, bound or connected; on failure nothing is left open."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(kind)
    for option, value in {
        zmq.LINGER: 0,
        zmq.MAXMSGSIZE: max_frame_bytes * _HARD_LIMIT_FACTOR,
        zmq.HEARTBEAT_IVL: 1000,  # detect a dead peer even when TCP does not
        zmq.HEARTBEAT_TIMEOUT: 5000,
        **options,
    }.items():
        sock.setsockopt(option, value)
    try:
        if bind:
            sock.bind(_zmq_address(url))
        else:
            sock.connect(url)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        ctx.term()
        verb = "listen on" if bind else "connect to"
        raise TransportError(f"cannot {verb} {url}: {exc.strerror}") from None
    return ctx, sock


def bind_router(
    url: str, sender: str, clock: Clock, max_frame_bytes: int = MAX_FRAME_BYTES
) -> RouterChannel:
    options = {zmq.ROUTER_MANDATORY: 1}  # a send to a vanished peer fails instead of vanishing
    ctx, sock = _open(zmq.ROUTER, url, options, max_frame_bytes, bind=True)
    channel = RouterChannel(sock, ctx, sender, clock, max_frame_bytes)
    channel.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return channel


def connect_dealer(
    url: str, sender: str, clock: Clock, max_frame_bytes: int = MAX_FRAME_BYTES
) -> DealerChannel:
    options = {
        zmq.IMMEDIATE: 1,  # queue nothing while disconnected
        zmq.SNDHWM: 1000,
        zmq.RECONNECT_IVL: 100,
        zmq.RECONNECT_IVL_MAX: 2000,
    }
    ctx, sock = _open(zmq.DEALER, url, options, max_frame_bytes, bind=False)
    return DealerChannel(sock, ctx, sender, clock, max_frame_bytes)


def request(url: str, body: Message, sender: str, clock: Clock, timeout_s: float) -> Envelope:
    """One blocking round trip for CLI commands; raises TimeoutError naming the address."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES * _HARD_LIMIT_FACTOR)
    try:
        try:
            sock.connect(url)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot connect to {url}: {exc.strerror}") from None
        sock.send(encode_frame(sender, 1, clock.time(), body))
        deadline = clock.monotonic() + timeout_s
        while (left := deadline - clock.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            try:
                return decode_frame(sock.recv(), MAX_FRAME_BYTES * _HARD_LIMIT_FACTOR)
            except ProtocolError as exc:
                log.warning("ignored bad reply from %s: %s", url, exc)
        raise TimeoutError(f"no scheduler answered at {url} within {timeout_s:g} s")
    finally:
        sock.close(linger=0)
        ctx.term()
