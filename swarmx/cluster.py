"""The scheduler's membership table: which nodes exist, what they last reported, whether they are
alive. Pure state: callers pass the time in, so liveness is tested without sleeping."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from swarmx.protocol import Hello, NodeView, Telemetry
from swarmx.traces import DeviceAtDispatch

NodeState = Literal["live", "stale", "down"]


@dataclass(frozen=True)
class Transition:
    node: str
    old: NodeState | None
    """None when the node registers for the first time."""
    new: NodeState


@dataclass
class _Node:
    peer: bytes
    hello: Hello
    registered_ts: float
    last_seen_mono: float
    last_seen_ts: float
    state: NodeState = "live"
    telemetry: Telemetry | None = None
    frames: int = 0
    devices: dict[tuple[str, str], DeviceAtDispatch] = field(default_factory=dict)
    """`device_at` of this telemetry, per device and replica (cleared with each new sample)."""


class NodeTable:
    """Nodes keyed by name. A node is ``stale`` after missing ``stale_after_missed`` of its own
    heartbeat intervals and ``down`` after ``down_after_missed``; any frame from it revives it."""

    def __init__(self, stale_after_missed: int, down_after_missed: int) -> None:
        self._stale_after = stale_after_missed
        self._down_after = down_after_missed
        self._nodes: dict[str, _Node] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def register(
        self, hello: Hello, peer: bytes, now_mono: float, now_ts: float
    ) -> Transition | None:
        """Add or refresh a node (a restarted agent re-registers under the same name)."""
        node = self._nodes.get(hello.node)
        if node is None:
            self._nodes[hello.node] = _Node(peer, hello, now_ts, now_mono, now_ts, frames=1)
            return Transition(hello.node, None, "live")
        node.peer, node.hello, node.registered_ts = peer, hello, now_ts
        return self.seen(hello.node, peer, now_mono, now_ts)

    def seen(self, name: str, peer: bytes, now_mono: float, now_ts: float) -> Transition | None:
        """Record a frame from ``name``; raises KeyError for an unregistered node."""
        node = self._nodes[name]
        node.peer, node.last_seen_mono, node.last_seen_ts = peer, now_mono, now_ts
        node.frames += 1
        if node.state != "live":
            old, node.state = node.state, "live"
            return Transition(name, old, "live")
        return None

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def update_telemetry(self, name: str, telemetry: Telemetry) -> None:
        node = self._nodes[name]
        node.telemetry = telemetry
        node.devices.clear()

    def device_at(self, name: str, device: str, replica: str = "") -> DeviceAtDispatch:
        """The state of ``device`` (a replica's device name) on node ``name`` as its latest
        telemetry tells it: asked for every candidate of every routed call, so it is worked
        out once per sample. Where ``replica``'s engine reports the KV cache it uses, that is
        the memory figure: an engine such as vLLM takes most of its GPU's memory at start, so
        the device's memory use says nothing of its load, and its KV cache in use does."""
        node = self._nodes.get(name)
        if node is None:
            return device_at(None, device)
        key = (device, replica)  # a tuple, not a string built for every candidate
        known = node.devices.get(key)
        if known is None:
            known = device_at(node.telemetry, device)
            kv = _kv_usage(node.telemetry, replica) if replica else None
            if kv is not None:
                known = dataclasses.replace(known, gpu_mem_frac=kv)
            node.devices[key] = known
        return known

    def peer(self, name: str) -> bytes:
        return self._nodes[name].peer

    def state(self, name: str) -> NodeState:
        return self._nodes[name].state

    def hello(self, name: str) -> Hello | None:
        """The node's latest registration, None for a node not in the table."""
        node = self._nodes.get(name)
        return node.hello if node is not None else None

    def telemetry(self, name: str) -> Telemetry | None:
        node = self._nodes.get(name)
        return node.telemetry if node is not None else None

    def excuse(self, stall_s: float) -> None:
        """The scheduler itself stalled for ``stall_s``: frames its nodes sent meanwhile wait
        unread, so that time is not counted against them (no false ``down``)."""
        for node in self._nodes.values():
            node.last_seen_mono += stall_s

    def remove(self, name: str) -> None:
        """A node that said goodbye: it is gone, not ``down``."""
        self._nodes.pop(name, None)

    def sweep(self, now_mono: float) -> list[Transition]:
        """Age every node; returns the state changes (for the log and metrics)."""
        changes = []
        for name, node in self._nodes.items():
            missed = (now_mono - node.last_seen_mono) / node.hello.heartbeat_interval_s
            state: NodeState = (
                "down"
                if missed >= self._down_after
                else "stale"
                if missed >= self._stale_after
                else "live"
            )
            if state != node.state:
                changes.append(Transition(name, node.state, state))
                node.state = state
        return changes

    def views(self, now_mono: float) -> list[NodeView]:
        return [
            NodeView(
                name=name,
                state=node.state,
                last_seen_ts=node.last_seen_ts,
                last_seen_age_s=max(0.0, now_mono - node.last_seen_mono),
                registered_ts=node.registered_ts,
                frames=node.frames,
                hello=node.hello,
                telemetry=node.telemetry,
            )
            for name, node in sorted(self._nodes.items())
        ]


def _kv_usage(tel: Telemetry | None, replica: str) -> float | None:
    if tel is None:
        return None
    return next((r.kv_cache_usage for r in tel.replicas if r.replica == replica), None)


def device_at(tel: Telemetry | None, device: str) -> DeviceAtDispatch:
    """A replica's device (``cuda:1``, ``emulated:H100``, ``cpu``) as the predictor sees it:
    GPU model, its utilisation and memory use, and the node's CPU use."""
    cpu = tel.host.cpu_percent / 100 if tel else 0.0
    if device.startswith("emulated:"):
        return DeviceAtDispatch(device.split(":", 1)[1], 0.0, 0.0, cpu)
    if device.startswith("cuda") and tel and tel.gpus:
        index = int(device.split(":")[1]) if ":" in device else 0
        gpu = next((g for g in tel.gpus if g.index == index), None)
        if gpu is not None:
            mem = (gpu.mem_used_bytes or 0) / gpu.mem_total_bytes if gpu.mem_total_bytes else 0
            return DeviceAtDispatch(gpu.name, (gpu.util_percent or 0) / 100, mem, cpu)
    return DeviceAtDispatch("cpu", 0.0, 0.0, cpu)
