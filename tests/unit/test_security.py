"""Roles from keys: the key ring, node name bindings, the permission table, the log limiter."""

from __future__ import annotations

import logging
import shutil

import pytest

from swarmx.protocol import MESSAGE_TYPES, ExportTraces, Hello, InstallPredictor, Result, Submit
from swarmx.security import ALLOWED, KeyRing, NodeNames, Peer, RateLimitedLog, may_send
from swarmx.transport import TransportError, generate_keys, load_public_key


@pytest.fixture
def ring(tmp_path):
    keys = tmp_path / "keys"
    for name in ("node-1", "alice", "root", "extra"):
        generate_keys(keys, name)
    authorized = tmp_path / "authorized"
    for folder, name in (("nodes", "node-1"), ("clients", "alice"), ("admins", "root")):
        (authorized / folder).mkdir(parents=True)
        shutil.copy(keys / f"{name}.key", authorized / folder)
    ring = KeyRing(authorized)
    assert ring.scan() == (3, 0)
    return ring, keys, authorized


def test_the_folder_is_the_role(ring):
    ring, keys, _ = ring
    assert ring.peer(load_public_key(keys / "node-1.key")) == Peer("node", "node-1")
    assert ring.peer(load_public_key(keys / "alice.key")) == Peer("client", "alice")
    assert ring.peer(load_public_key(keys / "root.key")) == Peer("admin", "root")
    assert ring.peer(load_public_key(keys / "extra.key")) is None
    assert not ring.allow(load_public_key(keys / "extra.key"))


def test_rescans_add_and_remove_and_skip_what_they_cannot_read(ring, caplog):
    ring, keys, authorized = ring
    shutil.copy(keys / "extra.key", authorized / "clients")
    (authorized / "clients" / "garbage.key").write_text("not a certificate")
    (authorized / "admins" / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    (authorized / "nodes" / "node-1.key").unlink()
    with caplog.at_level(logging.WARNING):
        assert ring.scan() == (1, 1)
    assert ring.allow(load_public_key(keys / "extra.key"))
    assert not ring.allow(load_public_key(keys / "node-1.key"))
    assert ring.peer(load_public_key(keys / "alice.key")) == Peer("client", "alice")  # not admin
    assert "garbage.key" in caplog.text and "the same key is also" in caplog.text


def test_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(TransportError, match="not a directory"):
        KeyRing(tmp_path / "nope").scan()


def test_node_names_bind_once_and_survive_a_restart(tmp_path):
    path = tmp_path / "node_keys.json"
    names = NodeNames(path)
    assert names.claim("node-1", "gpu-7") is None
    assert names.claim("node-1", "gpu-7") is None  # again: fine
    assert names.claim("node-1", "gpu-8") == "key 'node-1' is node 'gpu-7', not 'gpu-8'"
    assert names.claim("node-2", "gpu-7") == "node 'gpu-7' belongs to key 'node-1'"
    assert not path.exists()  # written by save (the scheduler's, with each journal commit)
    names.save()
    assert path.stat().st_mode & 0o777 == 0o600
    again = NodeNames(path)
    assert again.node_of("node-1") == "gpu-7"
    assert again.claim("node-2", "gpu-7") is not None


def test_roles_and_what_they_may_send():
    node, client, admin = Peer("node", "n"), Peer("client", "c"), Peer("admin", "a")
    assert may_send(node, Hello) and may_send(node, Result) and not may_send(node, Submit)
    assert may_send(client, Submit) and not may_send(client, Result)
    assert not may_send(client, ExportTraces) and not may_send(client, InstallPredictor)
    assert may_send(admin, ExportTraces) and may_send(admin, InstallPredictor)
    assert not may_send(admin, Hello)  # an admin is not a node
    inbound = {cls for roles in ALLOWED.values() for cls in roles}
    assert inbound <= set(MESSAGE_TYPES.values())


def test_refusals_are_logged_at_most_once_per_reason_per_interval(caplog):
    now = [0.0]
    limited = RateLimitedLog(lambda: now[0], every_s=10.0)
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            limited.warning("role", "refused %s", "x")
        limited.warning("node_name", "other")
        now[0] = 11.0
        limited.warning("role", "refused %s", "y")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused x", "other", "refused y (49 more like it since the last)"]


def test_unreadable_bindings_stop_the_scheduler_with_the_file_named(tmp_path):
    """Written by replace, the file is never half there; if someone corrupts it, the scheduler
    refuses to guess which key is which node rather than let any key claim any name."""
    path = tmp_path / "node_keys.json"
    path.write_text('{"node-1": "gpu-7"')
    for text in ('{"node-1": "gpu-7"', '["not", "a", "table"]'):
        path.write_text(text)
        with pytest.raises(TransportError, match=r"node_keys\.json: cannot read node name"):
            NodeNames(path)
