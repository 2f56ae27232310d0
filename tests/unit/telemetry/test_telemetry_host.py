"""HostCollector: sane real readings, and rates from controlled clocks and counters."""

from __future__ import annotations

from types import SimpleNamespace

import psutil
import pytest

from swarmx.telemetry.host import HostCollector


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_real_sample_is_sane() -> None:
    sample = HostCollector().sample()
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert len(sample.cpu_percent_per_core) == psutil.cpu_count()
    assert all(0.0 <= p <= 100.0 for p in sample.cpu_percent_per_core)
    assert min(sample.load_1m, sample.load_5m, sample.load_15m) >= 0.0
    assert sample.mem_total_bytes > 0
    assert 0 < sample.mem_available_bytes <= sample.mem_total_bytes
    assert sample.mem_used_bytes == sample.mem_total_bytes - sample.mem_available_bytes
    assert 0 <= sample.swap_used_bytes <= max(sample.swap_total_bytes, sample.swap_used_bytes)
    # First sample: no previous counters, so no rate.
    assert sample.disk_read_bytes_per_s == 0.0
    assert sample.net_recv_bytes_per_s == 0.0


def test_static_info() -> None:
    info = HostCollector.static_info()
    assert info.cpu_cores_logical == psutil.cpu_count()
    assert info.cpu_cores_physical is None or info.cpu_cores_physical > 0
    assert info.mem_total_bytes == psutil.virtual_memory().total


def _counters(
    monkeypatch: pytest.MonkeyPatch, disk: tuple[int, int] | None, net: tuple[int, int] | None
) -> None:
    monkeypatch.setattr(
        psutil,
        "disk_io_counters",
        lambda: None if disk is None else SimpleNamespace(read_bytes=disk[0], write_bytes=disk[1]),
    )
    monkeypatch.setattr(
        psutil,
        "net_io_counters",
        lambda: None if net is None else SimpleNamespace(bytes_recv=net[0], bytes_sent=net[1]),
    )


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        # (disk read, disk write), (net recv, net sent) -> rates over 2 s
        (
            ((10_000, 20_000), (5_000, 7_000)),
            ((11_000, 24_000), (5_500, 7_000)),
            (500.0, 2000.0, 250.0, 0.0),
        ),
        # a counter going backwards (reset, wrap) gives 0, never a negative rate
        (
            ((10_000, 20_000), (5_000, 7_000)),
            ((9_000, 22_000), (1, 9_000)),
            (0.0, 1000.0, 0.0, 1000.0),
        ),
        # counters psutil cannot read (None) on either side give 0
        ((None, (5_000, 7_000)), ((9_000, 21_000), None), (0.0, 0.0, 0.0, 0.0)),
    ],
)
def test_rates_from_counter_deltas(
    monkeypatch: pytest.MonkeyPatch, first: tuple, second: tuple, expected: tuple
) -> None:
    clock = FakeClock()
    collector = HostCollector(monotonic=clock)
    _counters(monkeypatch, disk=first[0], net=first[1])
    collector.sample()
    clock.now += 2.0
    _counters(monkeypatch, disk=second[0], net=second[1])
    sample = collector.sample()
    assert (
        sample.disk_read_bytes_per_s,
        sample.disk_write_bytes_per_s,
        sample.net_recv_bytes_per_s,
        sample.net_sent_bytes_per_s,
    ) == expected


def test_unreadable_counters_give_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise FileNotFoundError("/proc/diskstats")

    clock = FakeClock()
    collector = HostCollector(monotonic=clock)
    monkeypatch.setattr(psutil, "disk_io_counters", fail)
    collector.sample()
    clock.now += 1.0
    assert collector.sample().disk_read_bytes_per_s == 0.0


def test_no_elapsed_time_gives_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    collector = HostCollector(monotonic=FakeClock())
    _counters(monkeypatch, disk=(0, 0), net=(0, 0))
    collector.sample()
    _counters(monkeypatch, disk=(1000, 1000), net=(1000, 1000))
    assert collector.sample().disk_read_bytes_per_s == 0.0
