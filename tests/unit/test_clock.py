"""SteppedClock: virtual time whose sleeps wait for the test to advance it."""

from __future__ import annotations

import asyncio

import pytest

from swarmx.clock import SteppedClock


def test_a_sleep_waits_until_time_is_advanced_past_its_end():
    async def main() -> list[tuple[str, float]]:
        clock = SteppedClock(now=10.0)
        woke: list[tuple[str, float]] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append((name, clock.monotonic()))

        tasks = [asyncio.create_task(sleeper(n, s)) for n, s in [("long", 2.0), ("short", 1.0)]]
        for _ in range(10):
            await asyncio.sleep(0)
        assert (woke, clock.sleepers) == ([], 2)  # no wall time moves it, however much passes
        clock.advance(0.5)
        await asyncio.sleep(0)
        assert woke == []
        clock.advance(0.5)  # the short sleep's end, exactly
        await asyncio.sleep(0)
        assert (woke, clock.sleepers) == ([("short", 11.0)], 1)
        clock.advance(5.0)
        await asyncio.gather(*tasks)
        return woke

    assert asyncio.run(main()) == [("short", 11.0), ("long", 16.0)]


def test_wake_next_jumps_to_the_earliest_sleep_still_waiting():
    async def main() -> tuple[float, float, int]:
        clock = SteppedClock(now=0.0)
        first = asyncio.create_task(clock.sleep(3.0))
        cancelled = asyncio.create_task(clock.sleep(1.0))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        clock.wake_next()  # skips the cancelled sleep: 3.0, not 1.0
        await first
        at = clock.monotonic()
        clock.wake_next()  # nothing left: time stays
        return at, clock.monotonic(), clock.sleepers

    assert asyncio.run(main()) == (3.0, 3.0, 0)


def test_zero_sleeps_pass_and_time_never_goes_back():
    async def main() -> float:
        clock = SteppedClock(now=5.0)
        await clock.sleep(0)  # does not wait for an advance
        with pytest.raises(ValueError, match="negative sleep"):
            await clock.sleep(-1)
        with pytest.raises(ValueError, match="time cannot go back"):
            clock.advance(-1)
        return clock.time() - clock.epoch

    assert asyncio.run(main()) == 5.0
