"""ZeroMQ transport: the only module that imports zmq.

The scheduler binds one ROUTER socket at the address users name; node agents and CLI clients connect
DEALER sockets to it, so one endpoint carries registration, telemetry, commands and queries. Every
socket closes with linger 0, and bad frames are counted and answered, never raised to a handler.

With keys (docs/security.md), every connection is CURVE: encrypted, and the scheduler's ZAP handler
(pyzmq's `zmq.auth`, on its own thread so a busy event loop never stalls a handshake) lets in only
public keys its ``allow`` callback knows. Each frame the scheduler receives then carries the
sender's public key (ZeroMQ's ``User-Id``), from which the daemon, not the message, takes the role.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import zmq
import zmq.asyncio
import zmq.auth
import zmq.auth.thread
from zmq.utils.monitor import parse_monitor_message

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
    """A socket could not be set up (address in use, unresolvable host, unreadable key)."""


class AuthRefused(TransportError):
    """The scheduler refused this process's key (or lack of one) at the handshake."""


# --- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class ServerCurve:
    """The scheduler's side: its key pair, and which client public keys (z85) may connect."""

    keys: KeyPair
    allow: Callable[[bytes], bool]


@dataclass(frozen=True)
class ClientCurve:
    """A node's or client's side: its key pair and the scheduler's public key it must find."""

    keys: KeyPair
    server_public: bytes


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def generate_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600) in ZeroMQ's certificate
    format; the secret is never readable by others, not even for an instant."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise TransportError(f"{path}: exists; remove it first to make a new key")
    with _umask(0o077):
        zmq.auth.create_certificates(str(directory), name)
    public.chmod(0o644)
    return public, secret


def load_keypair(path: str | Path) -> KeyPair:
    """This process's own keys, from its secret key file (which holds both halves)."""
    public, secret = _load(path)
    if secret is None:
        raise TransportError(f"{path}: has no secret key (use the .key_secret file)")
    return KeyPair(public, secret)


def load_public_key(path: str | Path) -> bytes:
    """A peer's public key (z85) from a ``.key`` or ``.key_secret`` file."""
    return _load(path)[0]


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except OSError as exc:
        raise TransportError(f"{path}: cannot read key: {exc.strerror or exc}") from None
    except (ValueError, IndexError, UnicodeDecodeError):
        raise TransportError(f"{path}: not a ZeroMQ certificate file") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise TransportError(f"{path}: not a ZeroMQ certificate file (bad key length)")
    return public, secret


_zap_log = logging.getLogger("swarmx.transport.zap")
_zap_log.setLevel(logging.WARNING)  # pyzmq logs every handshake at debug; refusals are counted


class _KeyCallback:
    """pyzmq's credentials provider: the ZAP thread asks it about each handshake's key."""

    def __init__(self, allow: Callable[[bytes], bool]) -> None:
        self._allow = allow

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            return self._allow(key)
        except Exception:  # a bug in the lookup refuses the key; the ZAP thread lives on
            log.exception("key lookup failed")
            return False


@dataclass
class FrameStats:
    sent: int = 0
    received: int = 0
    unsent: int = 0
    """Frames that could not leave: no connection yet, peer gone, or queue full."""
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    """Bad incoming frames by reason (garbage, oversized, version, unknown_type, schema)."""
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    """Handshakes refused, by reason (unknown_key, bad_handshake)."""


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def _refusal(event: int) -> str:
    """A failed handshake as a counter label: a key the ZAP handler does not know, or no key /
    keys that do not match (the peer cannot even be told apart from line noise)."""
    return "unknown_key" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "bad_handshake"


class NothingWaiting(Exception):
    """`RouterChannel.recv_ready` found no frame waiting."""


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
        self._now: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        """The same socket without pyzmq's asyncio layer, which costs a future per frame (more
        than the frame itself) and a loop turn per send. Frames are read and sent with NOBLOCK;
        a receive with nothing waiting sleeps on the socket's fd (`_wait_readable`)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop watching the socket's fd, from the first receive that had to wait."""
        self._wakeup: asyncio.Future[None] | None = None
        """What the receive waiting for a frame sleeps on; None while none waits."""
        self._ctx = ctx
        self.sender = sender
        self._clock = clock
        self._max_frame_bytes = max_frame_bytes
        self._seq = 0
        self.stats = FrameStats()
        self._monitor: zmq.asyncio.Socket | None = None
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None

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

    async def _wait_frames(self) -> list[zmq.Frame]:
        """The next frames, waiting for them."""
        while True:
            try:
                return self._now.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                await self._wait_readable()

    async def _wait_readable(self) -> None:
        """Until a frame may be waiting. ZeroMQ's fd is edge-triggered: it signals that the
        socket's state changed, and reading ``EVENTS`` (which every send and receive also does)
        both takes that signal and says whether a frame is in; so the fd's callback and each
        send look at ``EVENTS`` and wake the receive themselves (`_frames_in`)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._now.FD, self._frames_in)
        self._wakeup = wakeup = loop.create_future()
        try:
            if not self._pollin():
                await wakeup
        finally:
            self._wakeup = None

    def _frames_in(self) -> None:
        """Reads ``EVENTS`` every time, waiter or not: that takes the fd's signal, which would
        otherwise call this again on every turn of the loop."""
        if self._pollin() and self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _pollin(self) -> bool:
        return bool(cast(int, self._now.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    async def _send(self, frames: list[bytes]) -> bool:
        try:
            self._now.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # Again (no peer / queue full) or EHOSTUNREACH (peer gone)
            self.stats.unsent += 1
            log.debug("frame not sent: %s", exc)
            return False
        finally:
            self._frames_in()  # the send may have taken the fd's signal of a frame come in
        self.stats.sent += 1
        return True

    async def watch_handshakes(self, on_refused: Callable[[str], None]) -> None:
        """Count (and report) every connection the CURVE handshake turned away; runs until
        cancelled. Without a monitor nothing can fail a handshake, so it just waits."""
        if self._monitor is None:
            self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            reason = _refusal(int(event["event"]))
            self.stats.refused[reason] += 1
            on_refused(reason)

    def close(self) -> None:
        """Idempotent; never blocks on unsent frames."""
        if not self._sock.closed:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._now.FD)
            if self._wakeup is not None and not self._wakeup.done():
                self._wakeup.cancel()
            if self._monitor is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.disable_monitor()
                self._monitor.close(linger=0)
            self._sock.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.destroy(linger=0)  # closes any socket still open, so it cannot block


class RouterChannel(_Channel):
    """The scheduler's single bound socket."""

    endpoint: str
    keyed: bool = False
    """CURVE is on: every frame carries its sender's public key."""

    async def recv(self) -> tuple[bytes, Envelope, bytes] | None:
        """The next frame with its peer's routing id and public key (z85; empty without keys);
        None for a bad frame (answered and counted)."""
        return await self._accept(await self._wait_frames())

    async def recv_ready(self) -> tuple[bytes, Envelope, bytes] | None:
        """As `recv`, for a frame already waiting; raises `NothingWaiting` when none is."""
        try:
            frames = self._now.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise NothingWaiting from None
        return await self._accept(frames)

    async def _accept(self, frames: list[zmq.Frame]) -> tuple[bytes, Envelope, bytes] | None:
        if len(frames) != 2:
            self.stats.dropped["garbage"] += 1
            return None
        peer, payload = frames
        key = str(payload.get("User-Id")).encode() if self.keyed else b""
        env = self._decode(payload.bytes)
        if isinstance(env, Envelope):
            return peer.bytes, env, key
        await self.send(peer.bytes, Error(ref_seq=-1, code=env.reason, message=env.message))
        return None

    async def send(self, peer: bytes, body: Message) -> bool:
        _, payload = self._frame(body)
        return await self._send([peer, payload])


class DealerChannel(_Channel):
    """A node agent's or client's connection to the scheduler; reconnects by itself."""

    async def recv(self) -> Envelope:
        while True:
            frames = await self._wait_frames()
            env = self._decode(frames[-1].bytes)
            if isinstance(env, Envelope):
                return env

    async def send(self, body: Message) -> int | None:
        """Send now or not at all (stale telemetry is worth nothing); the frame's seq if sent."""
        seq, payload = self._frame(body)
        return seq if await self._send([payload]) else None


def _zmq_address(url: str) -> str:
    """``tcp://host:0`` asks for any free port, spelt ``*`` in zmq."""
    return url[: -len(":0")] + ":*" if url.startswith("tcp://") and url.endswith(":0") else url


def _curve_options(curve: ServerCurve | ClientCurve | None) -> dict[zmq.SocketOption, int | bytes]:
    if isinstance(curve, ServerCurve):
        return {
            zmq.CURVE_SERVER: 1,
            zmq.CURVE_PUBLICKEY: curve.keys.public,
            zmq.CURVE_SECRETKEY: curve.keys.secret,
            zmq.ZAP_DOMAIN: b"swarmx",
        }
    if isinstance(curve, ClientCurve):
        return {
            zmq.CURVE_SERVERKEY: curve.server_public,
            zmq.CURVE_PUBLICKEY: curve.keys.public,
            zmq.CURVE_SECRETKEY: curve.keys.secret,
        }
    return {}


def _start_auth(
    ctx: zmq.asyncio.Context, curve: ServerCurve
) -> zmq.auth.thread.ThreadAuthenticator:
    """The ZAP handler, on a thread of its own over a plain view of the same context (so the
    handshake is answered even while the event loop is busy)."""
    auth = zmq.auth.thread.ThreadAuthenticator(zmq.Context.shadow(ctx.underlying), log=_zap_log)
    auth.start()
    auth.configure_curve_callback("swarmx", credentials_provider=_KeyCallback(curve.allow))
    return auth


def _open(
    kind: int,
    url: str,
    options: dict[zmq.SocketOption, int],
    max_frame_bytes: int,
    *,
    bind: bool,
    curve: ServerCurve | ClientCurve | None = None,
) -> tuple[zmq.asyncio.Context, zmq.asyncio.Socket, zmq.auth.thread.ThreadAuthenticator | None]:
    """A configured socket, bound or connected; on failure nothing is left open."""
    ctx = zmq.asyncio.Context()
    auth = _start_auth(ctx, curve) if isinstance(curve, ServerCurve) else None
    sock = ctx.socket(kind)
    settings: dict[zmq.SocketOption, int | bytes] = {
        zmq.LINGER: 0,
        zmq.MAXMSGSIZE: max_frame_bytes * _HARD_LIMIT_FACTOR,
        zmq.HEARTBEAT_IVL: 1000,  # detect a dead peer even when TCP does not
        zmq.HEARTBEAT_TIMEOUT: 5000,
        **options,
        **_curve_options(curve),
    }
    try:
        for option, value in settings.items():
            sock.setsockopt(option, value)
        if bind:
            sock.bind(_zmq_address(url))
        else:
            sock.connect(url)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()
        verb = "listen on" if bind else "connect to"
        raise TransportError(f"cannot {verb} {url}: {exc.strerror}") from None
    return ctx, sock, auth


def bind_router(
    url: str,
    sender: str,
    clock: Clock,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    curve: ServerCurve | None = None,
) -> RouterChannel:
    options = {zmq.ROUTER_MANDATORY: 1}  # a send to a vanished peer fails instead of vanishing
    ctx, sock, auth = _open(zmq.ROUTER, url, options, max_frame_bytes, bind=True, curve=curve)
    channel = RouterChannel(sock, ctx, sender, clock, max_frame_bytes)
    channel._auth = auth
    channel.keyed = curve is not None
    channel.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return channel


_DEALER_OPTIONS = {
    zmq.IMMEDIATE: 1,  # queue nothing while disconnected
    zmq.SNDHWM: 1000,
    zmq.RECONNECT_IVL: 100,
    zmq.RECONNECT_IVL_MAX: 2000,
}


def connect_dealer(
    url: str,
    sender: str,
    clock: Clock,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    curve: ClientCurve | None = None,
) -> DealerChannel:
    ctx, sock, _ = _open(zmq.DEALER, url, _DEALER_OPTIONS, max_frame_bytes, bind=False, curve=curve)
    return DealerChannel(sock, ctx, sender, clock, max_frame_bytes)


_REFUSED = {
    "unknown_key": "the scheduler refused this key (not in its authorized keys)",
    "bad_handshake": "the handshake failed: no key, or a [security] scheduler_key that is not "
    "the scheduler's (or the scheduler runs without keys)",
}


def request(
    url: str,
    body: Message,
    sender: str,
    clock: Clock,
    timeout_s: float,
    *,
    curve: ClientCurve | None = None,
) -> Envelope:
    """One blocking round trip for CLI commands; raises TimeoutError naming the address, or
    AuthRefused when the handshake fails."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
    try:
        try:
            for option, value in {
                zmq.LINGER: 0,
                zmq.MAXMSGSIZE: MAX_FRAME_BYTES * _HARD_LIMIT_FACTOR,
                **_curve_options(curve),
            }.items():
                sock.setsockopt(option, value)
            sock.connect(url)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot connect to {url}: {exc.strerror}") from None
        sock.send(encode_frame(sender, 1, clock.time(), body))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = clock.monotonic() + timeout_s
        while (left := deadline - clock.monotonic()) > 0:
            ready = dict(poller.poll(int(left * 1000) + 1))
            if monitor in ready:
                event = parse_monitor_message(monitor.recv_multipart())
                why = _REFUSED[_refusal(int(event["event"]))]
                raise AuthRefused(f"{url}: {why}")
            if sock not in ready:
                break
            try:
                return decode_frame(sock.recv(), MAX_FRAME_BYTES * _HARD_LIMIT_FACTOR)
            except ProtocolError as exc:
                log.warning("ignored bad reply from %s: %s", url, exc)
        raise TimeoutError(f"no scheduler answered at {url} within {timeout_s:g} s")
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


# --- engine events --------------------------------------------------------------------------------

ENGINE_EVENT_BYTES = 8 * 1024 * 1024
"""The largest engine event frame read (a batch storing a 1M-token prompt is about 3 MB); zmq
drops a publisher's larger ones unread."""
ENGINE_EVENTS_QUEUED = 1024
"""Frames queued unread at most: past it zmq drops new ones, the sequence numbers show the gap,
and the mirror starts over, rather than the node's memory growing with a runaway engine."""


class EventSubscriber:
    """A SUB socket on an engine's KV-event publisher (vLLM's and SGLang's ``zmq`` publisher):
    each message is ``[topic, sequence number (8 bytes, big-endian), payload]``. Reconnects on its
    own when the engine restarts; what was published meanwhile is lost (the sequence numbers say
    so)."""

    def __init__(self, url: str, topic: str) -> None:
        self.url = url
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, ENGINE_EVENT_BYTES)
            self._sock.setsockopt(zmq.RCVHWM, ENGINE_EVENTS_QUEUED)
            self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
            self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            self._sock.setsockopt_string(zmq.SUBSCRIBE, topic)
            self._sock.connect(url)
        except zmq.ZMQError as exc:
            self.close()
            raise TransportError(f"cannot subscribe to {url}: {exc.strerror}") from None

    async def recv(self) -> tuple[int, bytes] | None:
        """The next message's sequence number and payload; None for a message of another shape
        (the caller counts it)."""
        frames = await self._sock.recv_multipart()
        if len(frames) != 3 or len(frames[1]) != 8:
            return None
        return int.from_bytes(frames[1], "big"), frames[2]

    def close(self) -> None:
        """Idempotent."""
        self._sock.close(linger=0)
        self._ctx.destroy(linger=0)
