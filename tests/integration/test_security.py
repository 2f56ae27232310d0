"""The keyed control plane with real processes and real CURVE sockets: who gets in, what each
role may do, and a scheduler and node agent that outlive any frame an attacker sends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import msgpack
import pytest
import zmq

from swarmx.clock import RealClock
from swarmx.protocol import (
    Ack,
    Error,
    Hello,
    QueryNodes,
    ReplicaInfo,
    Result,
    decode_frame,
    encode_frame,
)
from swarmx.transport import (
    AuthRefused,
    ClientCurve,
    generate_keys,
    load_keypair,
    load_public_key,
    request,
)
from tests.integration.conftest import FAST_CONFIG, wait_for

pytestmark = pytest.mark.integration

ROLES = {"nodes": ["node-1", "node-2"], "clients": ["alice", "bob"], "admins": ["root"]}


class Keys:
    """A key directory like an operator's: every pair in ``keys/``, public halves authorized."""

    def __init__(self, tmp):
        self.dir = tmp / "keys"
        self.authorized = tmp / "authorized"
        for name in ["scheduler", "mallory", "carol", *(n for ns in ROLES.values() for n in ns)]:
            generate_keys(self.dir, name)
        for folder, names in ROLES.items():
            (self.authorized / folder).mkdir(parents=True)
            for name in names:
                shutil.copy(self.dir / f"{name}.key", self.authorized / folder)

    def secret(self, name):
        return str(self.dir / f"{name}.key_secret")

    def curve(self, name):
        return ClientCurve(load_keypair(self.secret(name)), load_public_key(self.scheduler))

    @property
    def scheduler(self):
        return str(self.dir / "scheduler.key")


@pytest.fixture
def keyed(procs):
    keys = Keys(procs.tmp)
    _, endpoint = procs.scheduler(
        env={
            "SWARMX_KEY": keys.secret("scheduler"),
            "SWARMX_AUTHORIZED_KEYS": str(keys.authorized),
            "SWARMX_LOG_LEVEL": "info",
        }
    )
    procs.node(
        endpoint,
        "node-1",
        env={"SWARMX_KEY": keys.secret("node-1"), "SWARMX_SCHEDULER_KEY": keys.scheduler},
    )
    wait_for(lambda: "node-1" in nodes(procs, keys, endpoint, "root"), what="node-1 live")
    return keys, endpoint


def as_client(procs, keys, name, *args):
    """The CLI with ``name``'s key in its config (None: no [security] at all)."""
    config = procs.tmp / f"{name}.toml"
    security = (
        f'\n[security]\nkey = "{keys.secret(name)}"\nscheduler_key = "{keys.scheduler}"\n'
        if name
        else ""
    )
    config.write_text(FAST_CONFIG + security)
    return subprocess.run(
        [sys.executable, "-m", "swarmx", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def nodes(procs, keys, endpoint, who):
    out = as_client(procs, keys, who, "nodes", "--json", "--scheduler", endpoint)
    assert out.returncode == 0, out.stderr
    return {n["name"]: n for n in json.loads(out.stdout)["nodes"] if n["state"] == "live"}


def workflow(procs, seconds):
    path = procs.tmp / f"sleep{seconds}.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            name = "sleepy"
            [[steps]]
            id = "nap"
            kind = "tool"
            command = ["sleep", "{seconds}"]
            """
        )
    )
    return str(path)


def test_keyed_peers_work_and_everyone_else_is_refused(procs, keyed):
    keys, endpoint = keyed
    # Nodes without a key, or with one the scheduler does not know, never register.
    procs.node(endpoint, "nokey")
    procs.node(
        endpoint,
        "ghost",
        env={"SWARMX_KEY": keys.secret("mallory"), "SWARMX_SCHEDULER_KEY": keys.scheduler},
    )
    out = as_client(procs, keys, "alice", "submit", workflow(procs, 0), "--wait", "--json",
                    "--scheduler", endpoint)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "succeeded"

    out = as_client(procs, keys, None, "nodes", "--scheduler", endpoint)
    assert out.returncode == 1 and "handshake failed" in out.stderr
    out = as_client(procs, keys, "mallory", "nodes", "--scheduler", endpoint)
    assert out.returncode == 1 and "refused this key" in out.stderr
    out = as_client(procs, keys, "node-1", "nodes", "--scheduler", endpoint)
    assert out.returncode == 2
    assert "a node key (node-1) may not send 'query_nodes'" in out.stderr

    # Clients read the cluster but not the traces (prompts); admins do.
    out = as_client(procs, keys, "alice", "traces", "export", "--out", "-", "--scheduler", endpoint)
    assert out.returncode == 2 and "may not send 'export_traces'" in out.stderr
    out = as_client(procs, keys, "root", "traces", "export", "--out", "-", "--scheduler", endpoint)
    assert out.returncode == 0
    assert [json.loads(line)["kind"] for line in out.stdout.splitlines()] == ["tool"]

    live = nodes(procs, keys, endpoint, "root")
    assert set(live) == {"node-1"}
    refused = json.loads(
        as_client(procs, keys, "root", "nodes", "--json", "--scheduler", endpoint).stdout
    )["scheduler"]["auth_refused"]
    assert refused["role"] >= 2
    assert refused["unknown_key"] >= 2  # mallory's CLI and mallory's node, at each retry
    assert refused["bad_handshake"] >= 2  # the keyless CLI and node


def test_clients_act_on_their_own_workflows_only(procs, keyed):
    keys, endpoint = keyed
    out = as_client(procs, keys, "alice", "submit", workflow(procs, 30), "--scheduler", endpoint)
    assert out.returncode == 0, out.stderr
    wf_id = out.stdout.strip().split()[-1]
    out = as_client(procs, keys, "bob", "cancel", wf_id, "--scheduler", endpoint)
    assert out.returncode == 2 and "belongs to another client" in out.stderr
    out = as_client(procs, keys, "bob", "status", wf_id, "--scheduler", endpoint)
    assert out.returncode == 2 and "belongs to another client" in out.stderr
    out = as_client(procs, keys, "bob", "status", "--json", "--scheduler", endpoint)
    assert wf_id not in out.stdout
    out = as_client(procs, keys, "alice", "status", "--json", "--scheduler", endpoint)
    assert wf_id in out.stdout
    out = as_client(procs, keys, "root", "cancel", wf_id, "--scheduler", endpoint)
    assert out.returncode == 0, out.stderr


def test_a_node_key_keeps_to_its_own_name_and_its_own_calls(procs, keyed):
    keys, endpoint = keyed
    clock = RealClock()
    node2 = keys.curve("node-2")

    def hello(name, replica):
        info = ReplicaInfo(replica, "lm", "emulated", "cpu", 4)
        return Hello(name, "h", 1, "x", 2, 1, 1 << 30, [], [info], 1.0, 1.0, 1.0)

    def send(body, sender="node-2"):
        return request(endpoint, body, sender, clock, 5.0, curve=node2).body

    # Under node-1's name (sent as node-1 or as itself), or with node-1's replica: refused.
    for body, sender in [
        (hello("node-1", "node-1/lm#9"), "node-1"),
        (hello("node-1", "node-1/lm#9"), "node-2"),
        (hello("node-2", "node-1/tool"), "node-2"),
    ]:
        reply = send(body, sender)
        assert isinstance(reply, Error) and reply.code == "forbidden", reply
    assert send(hello("node-2", "node-2/lm#0")).detail == "registered"
    assert isinstance(send(hello("node-3", "node-3/lm#0"), "node-3"), Error)  # bound to node-2

    out = as_client(procs, keys, "alice", "submit", workflow(procs, 3), "--scheduler", endpoint)
    wf_id = out.stdout.strip().split()[-1]
    forged = Result(f"{wf_id}:nap:0:1", "node-1/tool", True, "FORGED", "", 0.0, 0.1, None, 0, 1)
    reply = send(forged)
    assert isinstance(reply, Error) and reply.code == "forbidden", reply

    def finished():
        out = as_client(procs, keys, "alice", "status", wf_id, "--json", "--scheduler", endpoint)
        view = json.loads(out.stdout)
        return view if view["state"] != "running" else None

    view = wait_for(finished, what="the real result")
    assert view["state"] == "succeeded" and "FORGED" not in json.dumps(view)
    refused = json.loads(
        as_client(procs, keys, "root", "nodes", "--json", "--scheduler", endpoint).stdout
    )["scheduler"]["auth_refused"]
    assert refused["node_name"] >= 4 and refused["foreign_result"] == 1


def test_keys_are_picked_up_and_dropped_without_a_restart(procs, keyed):
    keys, endpoint = keyed
    scheduler = procs.started[0]
    with pytest.raises(AuthRefused, match="refused this key"):
        request(endpoint, QueryNodes(), "carol", RealClock(), 5.0, curve=keys.curve("carol"))
    added = keys.authorized / "clients" / "carol.key"
    shutil.copy(keys.dir / "carol.key", added)
    scheduler.send_signal(signal.SIGHUP)
    wait_for(lambda: ok(endpoint, keys.curve("carol")), what="carol's key accepted")
    added.unlink()
    scheduler.send_signal(signal.SIGHUP)
    wait_for(lambda: not ok(endpoint, keys.curve("carol")), what="carol's key dropped")
    assert scheduler.poll() is None  # SIGHUP reloads, it never kills


def ok(endpoint, curve):
    try:
        request(endpoint, QueryNodes(), "carol", RealClock(), 3.0, curve=curve)
    except AuthRefused:
        return False
    return True


GARBAGE = [
    [b""],
    [b"\xc1"],
    [os.urandom(64)],
    [b"a", b"b", b"c"],  # three frames
    [msgpack.packb([1, 2, 3])],
    [msgpack.packb({"v": 1, "type": [1], "sender": "x", "seq": 1, "ts": 0.0, "body": {}})],
    [msgpack.packb({"v": 1, "type": {"a": 1}, "sender": "x", "seq": 1, "ts": 0.0, "body": {}})],
    [msgpack.packb({"v": 1, "type": "hello", "sender": "x", "seq": 1, "ts": 0.0, "body": []})],
    [
        b"\x86\xa1v\x01\xa4type\xa9heartbeat\xa6sender\xa1n\xa3seq\x01\xa2ts\x00\xa4body"
        + b"\x91" * 50_000
        + b"\x00"
    ],
]


def bad_hello():
    body = hello_for("evil", heartbeat_interval_s=0.0)
    return msgpack.packb({"v": 1, "type": "hello", "sender": "evil", "seq": 1, "ts": 0.0,
                          "body": body})  # fmt: skip


def hello_for(name, **changes):
    raw = msgpack.unpackb(
        encode_frame(name, 1, 0.0, Hello(name, "h", 1, "x", 2, 1, 1 << 30, [], [], 1.0, 1.0, 0.0))
    )
    raw["body"].update(changes)
    return raw["body"]


def test_garbage_never_stops_the_scheduler_or_the_node(procs):
    _, endpoint = procs.scheduler()
    procs.node(endpoint, "alpha")
    wait_for(lambda: "alpha" in procs.nodes(endpoint), what="alpha")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for frames in [*GARBAGE, [bad_hello()]] * 3:
            sock.send_multipart(frames)
        for _ in range(200):
            sock.send(os.urandom(int.from_bytes(os.urandom(1), "big") + 1))
        wait_for(
            lambda: procs.nodes(endpoint).get("alpha", {}).get("state") == "live",
            what="the scheduler still serving",
        )
    finally:
        sock.close(linger=0)
        ctx.term()
    reply = json.loads(procs.cli("nodes", "--json", "--scheduler", endpoint).stdout)
    assert "evil" not in {n["name"] for n in reply["nodes"]}
    bad = reply["scheduler"]["bad_frames"]
    assert bad["schema"] >= 3 * 5 and bad["garbage"] >= 3 * 3, bad
    assert all(p.poll() is None for p in procs.started)


def test_garbage_never_stops_a_node_agent(procs):
    """A stand-in scheduler sends the agent every bad frame it has; the agent keeps talking."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    agent = procs.node(f"tcp://127.0.0.1:{port}", "alpha")
    try:
        assert router.poll(15_000), procs.log("alpha")
        peer, first = router.recv_multipart()
        assert decode_frame(first).type == "hello"
        for frames in GARBAGE * 3:
            router.send_multipart([peer, *frames])
        router.send_multipart([peer, encode_frame("scheduler", 7, 0.0, Error(-1, "x", "y"))])

        def next_frame():
            assert router.poll(5_000), procs.log("alpha")
            return decode_frame(router.recv_multipart()[1])

        hello = next_frame()  # still registering, as if nothing had happened
        while hello.type != "hello":
            hello = next_frame()
        router.send_multipart([peer, encode_frame("scheduler", 8, 0.0, Ack(hello.seq))])
        assert {next_frame().type for _ in range(6)} & {"telemetry", "heartbeat"}
        assert agent.poll() is None
    finally:
        router.close(linger=0)
        ctx.term()
    assert "dropped bad frame" in procs.log("alpha")
