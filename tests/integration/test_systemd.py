"""Both daemons speak sd_notify as systemd's Type=notify expects: READY once serving, watchdog
pings while the loop runs, STOPPING on the way out. A datagram socket stands in for systemd."""

from __future__ import annotations

import signal
import socket

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    yield sock
    sock.close()


def messages_until(sock, wanted: str) -> list[str]:
    seen: list[str] = []
    while not any(m.startswith(wanted) for m in seen):
        seen.extend(sock.recv(4096).decode().split("\n"))
    return seen


def test_scheduler_and_node_notify_systemd(procs, notify_socket, tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    sched, endpoint = procs.scheduler(env=env)
    first = messages_until(notify_socket, "READY=1")
    assert f"STATUS=listening on {endpoint}" in first
    assert "WATCHDOG=1" in messages_until(notify_socket, "WATCHDOG=1")

    node = procs.node(endpoint, "alpha", env=env)
    assert f"STATUS=reporting to {endpoint}" in messages_until(notify_socket, "READY=1")
    node.send_signal(signal.SIGTERM)
    assert node.wait(timeout=10) == 0
    messages_until(notify_socket, "STOPPING=1")

    sched.send_signal(signal.SIGTERM)
    assert sched.wait(timeout=10) == 0
    messages_until(notify_socket, "STOPPING=1")


def test_the_gateway_notifies_systemd(procs, notify_socket, tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    _, endpoint = procs.scheduler()
    gateway = procs.spawn(
        "gateway", "--listen", "http://127.0.0.1:0", "--scheduler", endpoint, log="gw", env=env
    )
    ready = messages_until(notify_socket, "READY=1")
    assert any(m.startswith("STATUS=serving http://127.0.0.1:") for m in ready)
    assert "WATCHDOG=1" in messages_until(notify_socket, "WATCHDOG=1")
    gateway.send_signal(signal.SIGTERM)
    assert gateway.wait(timeout=10) == 0
    messages_until(notify_socket, "STOPPING=1")
