"""swarmx.transport over real ZeroMQ sockets on loopback: frames both ways, bad frames dropped,
counted and answered, CURVE handshakes, and nothing left open however a channel ends.

Every test runs under `zmq_tracker` (tests/unit/conftest.py), so a socket or context the
transport leaves open fails it. Waits have generous deadlines; nothing asserts how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
import zmq

from swarmx.clock import ManualClock
from swarmx.protocol import Ack, Error, Heartbeat, QueryPredictor, decode_frame
from swarmx.transport import (
    AuthRefused,
    ClientCurve,
    DealerChannel,
    KeyPair,
    RouterChannel,
    ServerCurve,
    TransportError,
    bind_router,
    connect_dealer,
    request,
)
from tests.unit.conftest import ZmqTracker

pytestmark = pytest.mark.usefixtures("zmq_tracker")

T = TypeVar("T")
WITHIN_S = 10.0
"""How long a wait lasts before it fails: far beyond what a loopback round trip takes."""
LOOPBACK = "tcp://127.0.0.1:0"
needs_curve = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


async def within(awaitable: asyncio.Future[T] | Any) -> T:
    result: T = await asyncio.wait_for(awaitable, WITHIN_S)
    return result


async def until(predicate: Callable[[], object], what: str) -> None:
    """Poll until ``predicate()`` holds; fail after WITHIN_S."""
    deadline = time.monotonic() + WITHIN_S
    while not predicate():
        assert time.monotonic() < deadline, f"{what} never happened"
        await asyncio.sleep(0.005)


async def send_when_connected(dealer: DealerChannel, body: Heartbeat) -> int:
    """A dealer drops frames while it has no connection (IMMEDIATE): resend until one leaves."""
    deadline = time.monotonic() + WITHIN_S
    while (seq := await dealer.send(body)) is None:
        assert time.monotonic() < deadline, "the dealer never connected"
        await asyncio.sleep(0.005)
    return seq


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[tuple[RouterChannel, DealerChannel, bytes]]:
    """A router and a dealer connected to it, with the dealer's routing id; closed after."""
    clock = ManualClock()
    router = bind_router(LOOPBACK, "scheduler", clock)
    dealer = connect_dealer(router.endpoint, "node-a", clock)
    try:
        await send_when_connected(dealer, Heartbeat(uptime_s=0.0))
        first = await within(router.recv())
        assert first is not None
        yield router, dealer, first[0]
    finally:
        dealer.close()
        router.close()


def unused_url() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def keypair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


def test_frames_travel_both_ways_with_sender_seq_and_time():
    clock = ManualClock()

    async def main() -> None:
        router = bind_router(LOOPBACK, "scheduler", clock)
        dealer = connect_dealer(router.endpoint, "node-a", clock)
        try:
            seq = await send_when_connected(dealer, Heartbeat(uptime_s=1.5))
            got = await within(router.recv())
            assert got is not None
            peer, env, key = got
            assert (env.sender, env.seq, env.ts, key) == ("node-a", seq, clock.time(), b"")
            assert env.body == Heartbeat(uptime_s=1.5)
            assert await router.send(peer, Ack(ref_seq=seq, detail="seen"))
            reply = await within(dealer.recv())
            assert (reply.sender, reply.seq, reply.body) == ("scheduler", 1, Ack(seq, "seen"))
            assert (router.stats.received, router.stats.sent) == (1, 1)
            assert (dealer.stats.received, dealer.stats.sent) == (1, 1)
            assert dealer.last_seq == seq == dealer.stats.unsent + 1
        finally:
            dealer.close()
            router.close()

    asyncio.run(main())


def test_frames_arriving_while_both_sides_send_wake_the_waiting_receive():
    """ZeroMQ's fd is edge-triggered, and a send can take the signal of a frame that came in
    meanwhile. Both sides keep sending while a receive waits on each: every frame still
    arrives, and a receive with nothing to read does not spin the loop."""
    rounds = 300

    async def main() -> None:
        async with connected() as (router, dealer, peer):

            async def echo() -> None:
                for _ in range(rounds):
                    got = await router.recv()
                    assert got is not None
                    await router.send(peer, Ack(ref_seq=got[1].seq))
                    await router.send(peer, Ack(ref_seq=got[1].seq, detail="again"))

            async def replies() -> int:
                n = 0
                while n < 2 * rounds:
                    await dealer.recv()
                    n += 1
                return n

            echoing = asyncio.create_task(echo())
            receiving = asyncio.create_task(replies())
            for i in range(rounds):
                assert await dealer.send(Heartbeat(uptime_s=float(i))) is not None
                if i % 7 == 0:
                    await asyncio.sleep(0)
            assert await within(receiving) == 2 * rounds
            await within(echoing)
            idle = asyncio.create_task(dealer.recv())
            cpu = time.process_time()
            await asyncio.sleep(0.2)
            assert time.process_time() - cpu < 0.1  # waiting on the fd, not polling it
            idle.cancel()

    asyncio.run(main())


def test_a_send_that_takes_the_signal_of_a_frame_come_in_still_wakes_the_receive():
    """The hazard itself, made to happen: a frame reaches the dealer while its loop is busy, and
    the dealer sends before the loop looks at the fd; that send takes the fd's signal, so only
    the send's own look at the socket's events can wake the receive waiting meanwhile."""

    async def main() -> None:
        async with connected() as (router, dealer, peer):
            for i in range(20):
                waiting = asyncio.create_task(dealer.recv())
                await asyncio.sleep(0.01)  # the receive waits on the fd
                assert await router.send(peer, Ack(ref_seq=i + 1))
                time.sleep(0.02)  # the loop is busy: the frame arrives, its signal unread
                assert await dealer.send(Heartbeat(uptime_s=float(i))) is not None
                reply = await within(waiting)
                assert reply.body == Ack(ref_seq=i + 1)
                assert await within(router.recv()) is not None

    asyncio.run(main())


def test_closing_is_idempotent_and_closes_every_socket_and_context(zmq_tracker: ZmqTracker):
    async def main() -> None:
        router = bind_router(LOOPBACK, "scheduler", ManualClock())
        dealer = connect_dealer(router.endpoint, "node-a", ManualClock())
        assert len(zmq_tracker.open_sockets()) == 2
        for channel in (dealer, router, dealer, router):
            channel.close()

    asyncio.run(main())
    assert zmq_tracker.open_sockets() == []
    assert [ctx.closed for ctx, _ in zmq_tracker.contexts] == [True, True]


def test_the_handshake_monitor_closes_with_the_channel(zmq_tracker: ZmqTracker):
    async def main() -> None:
        router = bind_router(LOOPBACK, "scheduler", ManualClock())
        try:
            watcher = asyncio.create_task(router.watch_handshakes(lambda reason: None))
            await until(lambda: len(zmq_tracker.open_sockets()) == 2, "the monitor's start")
            assert "PAIR socket" in zmq_tracker.open_sockets()[1]
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher
        finally:
            router.close()

    asyncio.run(main())
    assert zmq_tracker.open_sockets() == []


def test_a_bad_frame_is_dropped_counted_and_answered(zmq_tracker: ZmqTracker):
    async def main() -> None:
        router = bind_router(LOOPBACK, "scheduler", ManualClock())
        peer = zmq_tracker.socket(zmq.DEALER)
        peer.connect(router.endpoint)
        try:
            peer.send_multipart([b"one", b"frame too many"])  # not answered: no frame to read
            assert await within(router.recv()) is None
            peer.send(b"\xc1 is never msgpack")
            assert await within(router.recv()) is None
            assert router.stats.dropped == {"garbage": 2}
            assert router.stats.received == 0
            assert peer.poll(int(WITHIN_S * 1000)), "no answer to the bad frame"
            answer = decode_frame(peer.recv())
            assert answer.sender == "scheduler"
            assert isinstance(answer.body, Error)
            assert (answer.body.ref_seq, answer.body.code) == (-1, "garbage")
            assert not peer.poll(0)  # one answer only
        finally:
            router.close()

    asyncio.run(main())


def test_binding_a_taken_address_fails_and_leaves_nothing_open(zmq_tracker: ZmqTracker):
    async def main() -> None:
        router = bind_router(LOOPBACK, "scheduler", ManualClock())
        try:
            open_before = zmq_tracker.open_sockets()
            with pytest.raises(
                TransportError, match=f"cannot listen on {re.escape(router.endpoint)}"
            ):
                bind_router(router.endpoint, "second", ManualClock())
            assert zmq_tracker.open_sockets() == open_before
            assert [ctx.closed for ctx, _ in zmq_tracker.contexts] == [False, True]
        finally:
            router.close()

    asyncio.run(main())


def test_connecting_to_a_bad_address_fails_and_leaves_nothing_open(zmq_tracker: ZmqTracker):
    async def main() -> None:
        with pytest.raises(TransportError, match="cannot connect to nope://host"):
            connect_dealer("nope://host", "node-a", ManualClock())

    asyncio.run(main())
    assert zmq_tracker.open_sockets() == []
    assert [ctx.closed for ctx, _ in zmq_tracker.contexts] == [True]


def test_a_request_nobody_answers_times_out_naming_the_address(zmq_tracker: ZmqTracker):
    url = unused_url()
    # the clock stands still: one poll of the whole timeout, then the error
    with pytest.raises(TimeoutError, match=f"no scheduler answered at {url} within 0.05 s"):
        request(url, QueryPredictor(), "cli", ManualClock(), timeout_s=0.05)
    assert zmq_tracker.open_sockets() == []


def test_a_request_gets_its_answer_and_closes_its_sockets(zmq_tracker: ZmqTracker):
    clock = ManualClock()

    async def main() -> Any:
        router = bind_router(LOOPBACK, "scheduler", clock)
        try:
            asking = asyncio.create_task(
                asyncio.to_thread(
                    request, router.endpoint, QueryPredictor(), "cli", clock, WITHIN_S
                )
            )
            got = await within(router.recv())
            assert got is not None
            peer, env, _ = got
            assert (env.sender, env.seq, env.body) == ("cli", 1, QueryPredictor())
            await router.send(peer, Ack(env.seq, "answered"))
            return await within(asking)
        finally:
            router.close()

    reply = asyncio.run(main())
    assert (reply.sender, reply.body) == ("scheduler", Ack(1, "answered"))
    assert zmq_tracker.open_sockets() == []


@needs_curve
def test_curve_lets_a_known_key_in_and_refuses_a_stranger(zmq_tracker: ZmqTracker):
    """The keyed path: a ZAP thread, a monitor on each side, all closed with their channels."""
    server, client, stranger = keypair(), keypair(), keypair()
    clock = ManualClock()
    refusals: list[str] = []

    def ask(keys: KeyPair) -> Any:
        curve = ClientCurve(keys, server.public)
        return request(router.endpoint, QueryPredictor(), "cli", clock, WITHIN_S, curve=curve)

    async def main() -> Any:
        watcher = asyncio.create_task(router.watch_handshakes(refusals.append))
        try:
            asking = asyncio.create_task(asyncio.to_thread(ask, client))
            got = await within(router.recv())
            assert got is not None
            peer, env, key = got
            assert key == client.public  # the frame carries its sender's key
            await router.send(peer, Ack(env.seq))
            reply = await within(asking)
            with pytest.raises(AuthRefused, match="the scheduler refused this key"):
                await within(asyncio.to_thread(ask, stranger))
            await until(lambda: refusals, "the refusal's report")
            return reply
        finally:
            watcher.cancel()
            router.close()

    allow = ServerCurve(server, allow=lambda key: key == client.public)
    router = bind_router(LOOPBACK, "scheduler", clock, curve=allow)
    reply = asyncio.run(main())
    assert reply.body == Ack(1)
    assert refusals == ["unknown_key"]
    assert router.stats.refused == {"unknown_key": 1}
    assert zmq_tracker.open_sockets() == []


# --- the tracker itself -------------------------------------------------------------------------


def test_the_tracker_names_and_closes_what_the_code_under_test_leaks():
    tracker = ZmqTracker()
    with pytest.MonkeyPatch.context() as patch:
        tracker.install(patch)
        ctx = zmq.Context()
        leaked = ctx.socket(zmq.DEALER)  # as code under test would, and then forgets it
        mine = tracker.socket(zmq.PAIR)
        leaks = tracker.finish()
    assert (leaked.closed, mine.closed, ctx.closed) == (True, True, True)
    assert len(leaks) == 2
    assert leaks[0].startswith("DEALER socket made at test_transport.py:")
    assert leaks[1].startswith("context made at test_transport.py:")
    assert leaks[1].endswith("was never terminated")


def test_the_tracker_reports_a_context_that_cannot_terminate_instead_of_hanging():
    tracker = ZmqTracker(term_within_s=0.1)
    with pytest.MonkeyPatch.context() as patch:
        tracker.install(patch)
        ctx = zmq.Context()
        unseen = zmq.Socket(ctx, zmq.PAIR)  # made past ctx.socket(): the tracker cannot see it
        try:
            leaks = tracker.finish()
        finally:
            unseen.close(linger=0)  # lets the term() still waiting on its thread end
    deadline = time.monotonic() + WITHIN_S
    while not ctx.closed:
        assert time.monotonic() < deadline, "the context never terminated"
        time.sleep(0.005)
    assert len(leaks) == 2
    assert leaks[1].endswith("hangs in term(): a socket is still open")
    assert tracker.open_sockets() == []


def test_a_clean_test_leaves_the_tracker_nothing_to_report():
    tracker = ZmqTracker()
    with pytest.MonkeyPatch.context() as patch:
        tracker.install(patch)
        ctx = zmq.Context()
        ctx.socket(zmq.PUSH).close()
        ctx.term()
        assert tracker.finish() == []
    assert len(tracker.sockets) == len(tracker.contexts) == 1
