import asyncio
import os
import socket
import time

import pytest

from swarmx.clock import ManualClock, ticks
from swarmx.daemon.lifecycle import LoopGap, SystemdNotifier, run_until_stopped


def test_notifier_is_a_no_op_outside_systemd():
    n = SystemdNotifier(environ={})
    assert not n.enabled
    assert n.notify("READY=1") is False
    assert n.watchdog_interval_s is None


def test_notifier_sends_datagrams(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        n = SystemdNotifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
        assert n.notify("READY=1", "STATUS=listening") is True
        assert server.recv(100) == b"READY=1\nSTATUS=listening"
        assert n.watchdog_interval_s == 2.0


def test_watchdog_belongs_to_the_named_pid_only():
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier(environ=env).watchdog_interval_s is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert SystemdNotifier(environ=env).watchdog_interval_s == 0.5


def test_notify_failure_is_reported_not_raised(tmp_path, caplog):
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert n.notify("READY=1") is False
    assert "sd_notify" in caplog.text


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def monotonic(self):
        return self.now

    def time(self):
        return 1e9 + self.now

    async def sleep(self, seconds):
        self.slept.append(round(seconds, 6))
        self.now += seconds


async def _take(agen, n, work_s, clock):
    out = []
    async for t in agen:
        out.append(t)
        clock.now += work_s[len(out) - 1]
        if len(out) == n:
            return out
    return out


def test_ticks_sleep_to_deadline_and_skip_missed_ticks():
    clock = FakeClock()
    got = asyncio.run(_take(ticks(clock, 1.0), 4, [0.25, 2.5, 0.0, 0.0], clock))
    # work time is absorbed by the next sleep; a 2.5 s stall skips ticks instead of bursting
    assert got == [0.0, 1.0, 3.5, 4.5]
    assert clock.slept == [0.75, 1.0]


def test_run_until_stopped_returns_on_stop_and_cancels_tasks():
    async def main():
        stop = asyncio.Event()
        forever = asyncio.create_task(asyncio.sleep(3600))
        asyncio.get_running_loop().call_later(0.01, stop.set)
        await run_until_stopped(stop, [forever])
        return forever.cancelled()

    assert asyncio.run(main()) is True


def test_run_until_stopped_raises_when_a_task_dies():
    async def boom():
        raise ValueError("collector broke")

    async def main():
        await run_until_stopped(asyncio.Event(), [asyncio.create_task(boom())])

    with pytest.raises(ValueError, match="collector broke"):
        asyncio.run(main())


def test_loop_gap_reports_the_worst_stall_of_the_last_window():
    clock = ManualClock(100.0)
    gap = LoopGap(clock, window_s=10.0)
    gap.record(0.001)
    gap.record(0.25)
    clock.now += 1
    gap.record(0.002)
    assert gap.max_s() == 0.25
    clock.now += 10  # the stall has left the window
    gap.record(0.003)
    assert gap.max_s() == 0.003


def test_run_until_stopped_runs_the_leave_while_the_tasks_still_run():
    async def main():
        stop = asyncio.Event()
        ticks_seen: list[int] = []

        async def ticker():
            while True:
                ticks_seen.append(1)
                await asyncio.sleep(0.001)

        async def leave():
            before = len(ticks_seen)
            await asyncio.sleep(0.02)
            return len(ticks_seen) - before

        task = asyncio.create_task(ticker())
        result: list[int] = []

        async def on_stop():
            result.append(await leave())

        stop.set()
        await run_until_stopped(stop, [task], on_stop=on_stop)
        return task, result

    task, result = asyncio.run(main())
    assert task.cancelled() and result[0] > 0


def test_a_task_that_will_not_end_does_not_keep_the_daemon_from_stopping(monkeypatch, caplog):
    from swarmx.daemon import lifecycle

    monkeypatch.setattr(lifecycle, "STOP_TASKS_S", 0.2)

    async def main():
        release = asyncio.Event()

        async def stubborn():
            while not release.is_set():
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    continue  # a bug: swallows its cancellation

        stop = asyncio.Event()
        task = asyncio.create_task(stubborn(), name="stubborn")
        stop.set()
        await run_until_stopped(stop, [task])
        returned_first = not task.done()
        release.set()
        await task
        return returned_first

    assert asyncio.run(main()) is True  # it returned while the task still ran
    assert "task stubborn did not end 0.2 s after it was cancelled" in caplog.text


def test_a_notify_queue_systemd_does_not_read_never_blocks_the_daemon(tmp_path, caplog):
    """A datagram socket nobody reads fills up (10 datagrams by default on Linux): notify then
    fails at once, where a blocking send would freeze the event loop."""
    path = str(tmp_path / "notify")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    try:
        n = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
        t0 = time.monotonic()
        sent = [n.notify("WATCHDOG=1") for _ in range(5000)]
        assert time.monotonic() - t0 < 5
        assert sent[0] is True and sent[-1] is False
    finally:
        sink.close()
