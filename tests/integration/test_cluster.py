"""A real scheduler and real node agents as processes, talking ZeroMQ over loopback."""

from __future__ import annotations

import json
import signal

import msgpack
import msgspec
import psutil
import pytest
import zmq

from swarmx.protocol import PROTOCOL_VERSION, GpuInfo, GpuSample, decode_frame
from swarmx.telemetry.gpu import NvmlGpus
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration


def live(nodes: dict[str, dict]) -> set[str]:
    return {name for name, n in nodes.items() if n["state"] == "live"}


def host_gpus() -> tuple[bool, list[GpuInfo]]:
    """Whether NVML works on this host, and the GPUs it lists (none without a driver or GPUs)."""
    nvml = NvmlGpus()
    try:
        return nvml.available, nvml.inventory()
    finally:
        nvml.close()


def assert_gpu_sample(sample: dict, expected: GpuInfo) -> None:
    """One GPU's telemetry: the host's GPU, with readings in range or None where unsupported."""
    assert set(sample) == set(GpuSample.__struct_fields__)
    assert (sample["index"], sample["name"], sample["uuid"]) == (
        expected.index,
        expected.name,
        expected.uuid,
    )
    for percent in ("util_percent", "mem_util_percent"):
        assert sample[percent] is None or 0 <= sample[percent] <= 100
    if sample["mem_total_bytes"] is not None:
        assert sample["mem_total_bytes"] == expected.mem_total_bytes
        used = sample["mem_used_bytes"]
        assert used is None or 0 <= used <= sample["mem_total_bytes"]
    assert isinstance(sample["processes"], list)


def test_two_nodes_report_real_telemetry(procs):
    nvml_works, gpus = host_gpus()
    _, endpoint = procs.scheduler()
    procs.node(endpoint, "alpha")
    procs.node(endpoint, "beta")
    nodes = wait_for(
        lambda: (
            (n := procs.nodes(endpoint))
            and live(n) == {"alpha", "beta"}
            and all(v["telemetry"] for v in n.values())
            and n
        ),
        what="two live nodes with telemetry",
    )
    for node in nodes.values():
        host = node["telemetry"]["host"]
        assert len(host["cpu_percent_per_core"]) == psutil.cpu_count()
        assert 0.0 <= host["cpu_percent"] <= 100.0
        assert host["mem_total_bytes"] == psutil.virtual_memory().total
        assert 0 < host["mem_used_bytes"] < host["mem_total_bytes"]
        assert node["hello"]["cpu_cores_logical"] == psutil.cpu_count()
        assert node["hello"]["heartbeat_interval_s"] == 0.2
        # the host's GPUs, as NVML lists them here; none on a CPU-only host, and not an error
        assert node["hello"]["gpus"] == [msgspec.to_builtins(g) for g in gpus]
        assert len(node["telemetry"]["gpus"]) == len(gpus)
        for sample, expected in zip(node["telemetry"]["gpus"], gpus, strict=True):
            assert_gpu_sample(sample, expected)
        assert node["telemetry"]["collect_s"] >= 0  # how fast: bench/, not a test's concern
        assert node["last_seen_age_s"] < 10 * 0.2  # seen within the down_after_missed window
    table = procs.cli("nodes", "--scheduler", endpoint).stdout
    assert "alpha" in table
    assert "beta" in table
    assert "live" in table
    assert ("NVML not available" in procs.log("alpha")) == (not nvml_works)


def test_missed_heartbeats_make_a_node_stale_then_down_then_live(procs):
    _, endpoint = procs.scheduler()
    procs.node(endpoint, "alpha")
    frozen = procs.node(endpoint, "beta")
    wait_for(lambda: live(procs.nodes(endpoint)) == {"alpha", "beta"}, what="two live nodes")
    frozen.send_signal(signal.SIGSTOP)  # alive but silent, like a hung host
    wait_for(lambda: procs.nodes(endpoint)["beta"]["state"] == "stale", what="stale")
    assert procs.nodes(endpoint)["alpha"]["state"] == "live"
    wait_for(lambda: procs.nodes(endpoint)["beta"]["state"] == "down", what="down")
    frozen.send_signal(signal.SIGCONT)
    wait_for(lambda: live(procs.nodes(endpoint)) == {"alpha", "beta"}, what="beta live again")
    assert "beta: stale -> down" in procs.log("scheduler")


def test_agents_reregister_after_a_scheduler_restart(procs):
    first, endpoint = procs.scheduler()
    procs.node(endpoint, "alpha")
    procs.node(endpoint, "beta")
    wait_for(lambda: live(procs.nodes(endpoint)) == {"alpha", "beta"}, what="two live nodes")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=10) == 0
    assert procs.nodes(endpoint) == {}
    second, again = procs.scheduler(listen=endpoint)
    assert again == endpoint
    nodes = wait_for(
        lambda: (n := procs.nodes(endpoint)) and live(n) == {"alpha", "beta"} and n,
        what="nodes registered with the new scheduler",
    )
    assert all(n["telemetry"] for n in nodes.values())
    assert second.poll() is None


def test_daemons_stop_cleanly_on_sigterm_and_sigint(procs):
    sched, endpoint = procs.scheduler()
    node = procs.node(endpoint, "alpha")
    wait_for(lambda: live(procs.nodes(endpoint)) == {"alpha"}, what="node live")
    node.send_signal(signal.SIGINT)
    assert node.wait(timeout=10) == 0
    assert "node agent alpha stopped" in procs.log("alpha")
    sched.send_signal(signal.SIGTERM)
    assert sched.wait(timeout=10) == 0
    assert "scheduler stopped" in procs.log("scheduler")
    assert not (procs.tmp / "state" / "scheduler.json").exists()


def test_bad_frames_are_counted_and_answered_never_fatal(procs):
    _, endpoint = procs.scheduler()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        sock.connect(endpoint)
        sock.send(b"\xc1 garbage")
        assert decode_frame(sock.recv()).body.code == "garbage"
        sock.send(msgpack.packb({"v": PROTOCOL_VERSION + 1, "type": "hello"}))
        assert decode_frame(sock.recv()).body.code == "version"
        sock.send(
            msgpack.packb(
                {
                    "v": PROTOCOL_VERSION,
                    "type": "heartbeat",
                    "sender": "ghost",
                    "seq": 1,
                    "ts": 0.0,
                    "body": {"uptime_s": 1.0},
                }
            )
        )
        reply = decode_frame(sock.recv()).body
        assert (reply.code, reply.ref_seq) == ("unregistered", 1)
        sock.send_multipart([b"a", b"b", b"c"])  # not one frame: dropped without an answer
        sock.send(b"\x93\x01\x02")  # msgpack, but not an envelope
        assert decode_frame(sock.recv()).body.code == "garbage"
    finally:
        sock.close()
        ctx.term()
    out = json.loads(procs.cli("nodes", "--json", "--scheduler", endpoint).stdout)
    assert out["scheduler"]["bad_frames"] == {"garbage": 3, "version": 1}
