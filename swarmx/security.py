"""Who may do what: roles from the key a frame arrived with, never from the frame itself.

The scheduler's ``[security] authorized_keys`` directory holds public keys in three folders; the
folder a key lies in is its role:

- ``nodes/``: register, report telemetry, heartbeats and results, only under the node name the
  key first registered with (`NodeNames`), and results only for calls sent to that node;
- ``clients/``: submit workflows, read and cancel their own, read the cluster's state;
- ``admins/``: everything a client may, for every workflow, plus exporting traces and installing
  predictors;
- ``gateways/``: the OpenAI-compatible gateways: run and abort gateway calls on behalf of the
  clients their API keys name, and read the cluster's state (the models it serves).

Without keys (loopback only, or ``--insecure``) every peer is `ANYONE`, as before keys existed.
Pure code apart from reading the key directory; the transport checks the handshake, this module
the message.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from swarmx.config import SecurityConfig
from swarmx.protocol import (
    AbortCall,
    Ack,
    CancelWorkflow,
    Chunk,
    Error,
    ExportTraces,
    GatewayCall,
    Goodbye,
    Heartbeat,
    Hello,
    InstallPredictor,
    Message,
    QueryNodes,
    QueryPredictor,
    QueryTop,
    QueryWorkflows,
    Result,
    Submit,
    Telemetry,
)
from swarmx.transport import (
    ClientCurve,
    TransportError,
    generate_keys,
    load_keypair,
    load_public_key,
)

log = logging.getLogger(__name__)

Role = Literal["node", "client", "admin", "gateway", "any"]
ROLE_DIRS: dict[str, Role] = {
    "nodes": "node",
    "clients": "client",
    "admins": "admin",
    "gateways": "gateway",
}


@dataclass(frozen=True)
class Peer:
    """The holder of a key: its role and the key file's name (``node-7`` for ``node-7.key``)."""

    role: Role
    name: str


ANYONE = Peer("any", "")
"""Every peer of a scheduler without keys."""

_NODE: frozenset[type[Message]] = frozenset(
    {Hello, Telemetry, Heartbeat, Goodbye, Result, Chunk, Ack, Error}
)
_CLIENT: frozenset[type[Message]] = frozenset(
    {Submit, QueryWorkflows, CancelWorkflow, QueryNodes, QueryTop, QueryPredictor}
)
_GATEWAY: frozenset[type[Message]] = frozenset({GatewayCall, AbortCall, QueryNodes})
ALLOWED: dict[Role, frozenset[type[Message]]] = {
    "node": _NODE,
    "client": _CLIENT,
    "admin": _CLIENT | {ExportTraces, InstallPredictor},
    "gateway": _GATEWAY,
    "any": _NODE | _CLIENT | _GATEWAY | {ExportTraces, InstallPredictor},
}


def may_send(peer: Peer, message: type[Message]) -> bool:
    return message in ALLOWED[peer.role]


def sees_everything(peer: Peer) -> bool:
    """Admins (and everyone, without keys) act on every workflow, not only their own."""
    return peer.role in ("admin", "any")


LOCAL_KEYS_DIR = "keys"
"""Under a `swarmx up` state directory: the keys it made for its own processes."""
LOCAL_ADMIN_KEY = "admin"
"""The key the CLI uses against a `swarmx up` cluster it finds in the state directory."""
LOCAL_GATEWAY_KEY = "gateway"
"""The key `swarmx gateway` uses against a `swarmx up` cluster in the state directory."""


def client_curve(sec: SecurityConfig, what: str = "[security]") -> ClientCurve | None:
    """A node's or client's keys from its config; None without ``key``."""
    if not sec.enabled:
        return None
    if not sec.scheduler_key:
        raise TransportError(f"{what} scheduler_key: needed with key (the scheduler's .key file)")
    return ClientCurve(load_keypair(sec.key), load_public_key(sec.scheduler_key))


def local_client_curve(
    state_dir: Path, scheduler_public: str, name: str = LOCAL_ADMIN_KEY
) -> ClientCurve | None:
    """A key a `swarmx up` in ``state_dir`` made (the CLI's admin key, or the gateway's), if
    there is one, against the public key its scheduler published (so a stale keys folder never
    meets a keyless scheduler)."""
    secret = state_dir / LOCAL_KEYS_DIR / f"{name}.key_secret"
    if not scheduler_public or not secret.is_file():
        return None
    return ClientCurve(load_keypair(secret), scheduler_public.encode())


@dataclass(frozen=True)
class LocalKeys:
    """What `swarmx up` made in its state directory for its own processes."""

    directory: Path
    authorized: Path

    def secret(self, name: str) -> Path:
        return self.directory / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.directory / f"{name}.key"


def make_local_keys(state_dir: Path, nodes: list[str]) -> LocalKeys:
    """Key pairs for the scheduler, each node, the CLI (``admin``) and a gateway, kept across
    restarts, and an authorized_keys directory holding exactly this cluster's keys."""
    keys = LocalKeys(state_dir / LOCAL_KEYS_DIR, state_dir / LOCAL_KEYS_DIR / "authorized")
    for name in ("scheduler", LOCAL_ADMIN_KEY, LOCAL_GATEWAY_KEY, *nodes):
        if not keys.secret(name).is_file():
            for stale in (keys.public(name), keys.secret(name)):
                stale.unlink(missing_ok=True)
            generate_keys(keys.directory, name)
    for folder, names in (
        ("nodes", nodes),
        ("admins", [LOCAL_ADMIN_KEY]),
        ("clients", []),
        ("gateways", [LOCAL_GATEWAY_KEY]),
    ):
        target = keys.authorized / folder
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in target.glob("*.key"):
            if old.stem not in names:
                old.unlink()
        for name in names:
            (target / f"{name}.key").write_bytes(keys.public(name).read_bytes())
    return keys


class KeyRing:
    """The authorized public keys, by z85 key, re-read on `scan` (SIGHUP or a timer).

    The ZAP thread calls `allow` while the event loop scans, so the table is swapped whole under
    a lock, never mutated in place. A file that cannot be read is skipped with a warning (one bad
    file must not lock every node out)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._peers: dict[bytes, Peer] = {}
        self._files: dict[Path, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def scan(self) -> tuple[int, int]:
        """Re-read the directory; (keys added, keys removed)."""
        if not self.directory.is_dir():
            raise TransportError(f"{self.directory}: authorized_keys is not a directory")
        peers: dict[bytes, Peer] = {}
        files: dict[Path, tuple[float, bytes]] = {}
        for folder, role in ROLE_DIRS.items():
            for path in sorted((self.directory / folder).glob("*.key")):
                try:
                    mtime = path.stat().st_mtime
                    cached = self._files.get(path)
                    key = cached[1] if cached and cached[0] == mtime else load_public_key(path)
                except (OSError, TransportError) as exc:
                    log.warning("skipped authorized key %s: %s", path, exc)
                    continue
                if key in peers:
                    log.warning("skipped %s: the same key is also %s", path, peers[key])
                    continue
                files[path] = (mtime, key)
                peers[key] = Peer(role, path.stem)
        with self._lock:
            before = self._peers
            self._peers, self._files = peers, files
        added = sum(1 for k, p in peers.items() if before.get(k) != p)
        removed = sum(1 for k, p in before.items() if peers.get(k) != p)
        return added, removed

    def allow(self, key: bytes) -> bool:
        """The handshake's question (on the ZAP thread)."""
        with self._lock:
            return key in self._peers

    def peer(self, key: bytes) -> Peer | None:
        """Who holds ``key`` now (None: removed since it connected)."""
        with self._lock:
            return self._peers.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._peers)


class NodeNames:
    """Node keys bound to the node name each first registered with, kept in the state directory
    (0600) so a restarted scheduler does not let a node key claim another node's name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._names: dict[str, str] = {}
        """key name -> node name."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise TransportError(f"{path}: cannot read node name bindings: {exc}") from None
        if not isinstance(data, dict):
            raise TransportError(f"{path}: cannot read node name bindings: not a JSON object")
        self._names = {str(k): str(v) for k, v in data.items()}
        self._owners = {n: k for k, n in self._names.items()}
        """node name -> key name."""
        self._dirty = False

    def claim(self, key_name: str, node: str) -> str | None:
        """Bind ``key_name`` to ``node`` if both are free; why not, otherwise. A new binding is
        written by the next `save` (the scheduler's, with its journal commit: when 1,000 nodes
        register at once, one file write per batch, not per node)."""
        bound = self._names.get(key_name)
        if bound is not None:
            return None if bound == node else f"key {key_name!r} is node {bound!r}, not {node!r}"
        owner = self._owners.get(node)
        if owner is not None:
            return f"node {node!r} belongs to key {owner!r}"
        self._names[key_name] = node
        self._owners[node] = key_name
        self._dirty = True
        return None

    def node_of(self, key_name: str) -> str | None:
        return self._names.get(key_name)

    def save(self) -> None:
        """Write the bindings if any changed since the last save (atomically, 0600)."""
        if not self._dirty:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._names, f, indent=1, sort_keys=True)
        tmp.replace(self.path)
        self._dirty = False


class RateLimitedLog:
    """One warning per reason per ``every_s`` (with how many were held back): a peer hammering
    the scheduler with refused frames must not flood its log."""

    def __init__(
        self,
        monotonic: Callable[[], float],
        every_s: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self._monotonic = monotonic
        self._every_s = every_s
        self._log = logger or log
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, reason: str, message: str, *args: object) -> None:
        now = self._monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self._every_s:
            self._held[reason] = self._held.get(reason, 0) + 1
            return
        held = self._held.pop(reason, 0)
        self._last[reason] = now
        suffix = f" ({held} more like it since the last)" if held else ""
        self._log.warning(message + suffix, *args)
