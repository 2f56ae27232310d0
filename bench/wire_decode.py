"""Decode cost of one telemetry frame: the old hand-made typed decoder against the wire codec.

The frame is a big node's: 64 cores, 8 GPUs (each with 4 processes), 8 replicas with 32 recent
latencies each (about 7 KB). "old" is what `decode_frame` did before the msgspec codec: msgpack
into plain dicts, then `swarmx.schema.decode` walking the type hints field by field (the config
loader still uses it, so it is measured as it is, not copied here). "new" is `decode_frame`.
Both run in this process, interleaved, best of ``--repeat`` rounds.

    .venv/bin/python bench/wire_decode.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from swarmx.protocol import (
    MESSAGE_TYPES,
    GpuProcess,
    GpuSample,
    HostSample,
    ReplicaRuntime,
    Telemetry,
    decode_frame,
    encode_frame,
)
from swarmx.schema import decode


def big_telemetry() -> Telemetry:
    host = HostSample(
        37.5, [float(i % 100) for i in range(64)], 12.1, 10.4, 9.9, 1 << 39, 1 << 38, 1 << 38,
        1 << 33, 1 << 20, 1.5e6, 2.5e6, 3.5e7, 4.5e7,
    )  # fmt: skip
    gpus = [
        GpuSample(
            i, "NVIDIA H100 80GB HBM3", f"GPU-{i:08x}-aaaa-bbbb-cccc-{i:012x}", 87.0, 45.0,
            70 << 30, 80 << 30, 612.5, 700.0, 66.0, 1980,
            [GpuProcess(4000 + j, "python3 -m vllm.entrypoints.openai", 17 << 30) for j in range(4)],
        )  # fmt: skip
        for i in range(8)
    ]
    replicas = [
        ReplicaRuntime(
            f"node-7/llama-3-8b#{i}", "llama-3-8b", 3, 8, 12_345, 12,
            [0.1 + 0.01 * j for j in range(32)], 4, 8, 0.73,
        )  # fmt: skip
        for i in range(8)
    ]
    return Telemetry(host, gpus, replicas, collect_s=0.004)


@dataclass(frozen=True)
class _Head:
    sender: str
    seq: int
    ts: float


def old_decode(data: bytes) -> object:
    """The pre-msgspec path: msgpack to dicts, then the reflective schema walk."""
    raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if raw.get("v") != 1:
        raise ValueError("version")
    cls = MESSAGE_TYPES[raw["type"]]
    decode(_Head, {k: raw.get(k) for k in ("sender", "seq", "ts")}, "envelope")
    return decode(cls, raw["body"], "body", strict=False)


def per_call_us(fn: Callable[[bytes], object], data: bytes, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn(data)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    frame = encode_frame("node-7", 42, 1.7e9, big_telemetry())
    assert old_decode(frame) == decode_frame(frame).body  # the same message both ways
    old, new = [], []
    for _ in range(args.repeat):
        old.append(per_call_us(old_decode, frame, 500))
        new.append(per_call_us(decode_frame, frame, 5000))
    msgpack_only = min(
        per_call_us(lambda d: msgpack.unpackb(d, raw=False), frame, 5000) for _ in range(3)
    )
    result = {
        "frame_bytes": len(frame),
        "old_us": round(min(old), 1),
        "new_us": round(min(new), 1),
        "msgpack_only_us": round(msgpack_only, 1),
        "speedup": round(min(old) / min(new), 1),
    }
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    print(
        f"telemetry frame {result['frame_bytes']} B: old {result['old_us']} us, "
        f"new {result['new_us']} us ({result['speedup']}x); msgpack alone "
        f"{result['msgpack_only_us']} us"
    )


if __name__ == "__main__":
    main()
