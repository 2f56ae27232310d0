"""Decode cost of one telemetry frame: the old hand-made typed decoder against the wire codec.

The frame is a big node's: 64 cores, 8 GPUs (each with 4 processes), 8 replicas with 16 recent
latencies each (about 7 KB). "old" is what `decode_frame` did before the msgspec codec: msgpack
into plain dicts, then `swarmx.schema.decode` walking the type hints field by field into frozen
dataclasses (the config loader still uses it, so it is measured as it is; the dataclasses are
built here from the messages' own fields). "new" is `decode_frame`.
Both run in this process, interleaved, best of ``--repeat`` rounds.

    .venv/bin/python bench/wire_decode.py [--json] [--write]   # --write: its RESULTS.md section
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, make_dataclass
from datetime import date
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import msgpack
import msgspec

from swarmx import schema
from swarmx.protocol import (
    GpuProcess,
    GpuSample,
    HostSample,
    ReplicaRuntime,
    Telemetry,
    decode_frame,
    encode_frame,
)
from swarmx.schema import decode

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- wire_decode.py: begin -->", "<!-- wire_decode.py: end -->"


def big_telemetry() -> Telemetry:
    host = HostSample(
        37.5, [float(i % 100) for i in range(64)], 12.1, 10.4, 9.9, 1 << 39, 1 << 38, 1 << 38,
        1 << 33, 1 << 20, 1.5e6, 2.5e6, 3.5e7, 4.5e7,
    )  # fmt: skip
    gpus = [
        GpuSample(
            i,
            "NVIDIA H100 80GB HBM3",
            f"GPU-{i:08x}-aaaa-bbbb-cccc-{i:012x}",
            87.0,
            45.0,
            70 << 30,
            80 << 30,
            612.5,
            700.0,
            66.0,
            1980,
            [GpuProcess(4000 + j, "python3 -m vllm.entrypoints", 17 << 30) for j in range(4)],
        )
        for i in range(8)
    ]
    replicas = [
        ReplicaRuntime(
            f"node-7/llama-3-8b#{i}",
            "llama-3-8b",
            3,
            8,
            12_345,
            12,
            [0.1 + 0.01 * j for j in range(16)],
            4,
            8,
            0.73,
        )
        for i in range(8)
    ]
    return Telemetry(host, gpus, replicas, collect_s=0.004)


def _twin(tp: Any, made: dict[type, type]) -> Any:
    """The old-style frozen dataclass of a message Struct: the same fields with plain hints (no
    defaults: every frame carries every field)."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if tp not in made:
            hints = get_type_hints(tp)
            fields = [(name, _twin(hints[name], made)) for name in tp.__struct_fields__]
            made[tp] = make_dataclass(tp.__name__, fields, frozen=True)
        return made[tp]
    args = get_args(tp)
    if not args:
        return tp
    twins = tuple(_twin(a, made) for a in args)
    origin = get_origin(tp)
    if origin is list:
        return list[twins[0]]  # type: ignore[valid-type]
    if origin is dict:
        return dict[twins[0], twins[1]]  # type: ignore[valid-type]
    return Union[twins]  # noqa: UP007 - built at run time


OLD_TELEMETRY = _twin(Telemetry, {})


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
    decode(_Head, {k: raw.get(k) for k in ("sender", "seq", "ts")}, "envelope")
    return decode(OLD_TELEMETRY, raw["body"], "body", strict=False)


def per_call_us(fn: Callable[[bytes], object], data: bytes, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn(data)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write", action="store_true", help="rewrite its section of RESULTS.md")
    args = ap.parse_args()
    frame = encode_frame("node-7", 42, 1.7e9, big_telemetry())
    new_body = decode_frame(frame).body
    assert schema.encode(old_decode(frame)) == schema.encode(new_body)  # the same both ways
    old, new = [], []
    for _ in range(args.repeat):
        old.append(per_call_us(old_decode, frame, 500))
        new.append(per_call_us(decode_frame, frame, 5000))
    msgpack_only = min(
        per_call_us(lambda d: msgpack.unpackb(d, raw=False), frame, 5000) for _ in range(3)
    )
    msgspec_only = min(per_call_us(msgspec.msgpack.decode, frame, 5000) for _ in range(3))
    result = {
        "frame_bytes": len(frame),
        "old_us": round(min(old), 1),
        "new_us": round(min(new), 1),
        "msgpack_only_us": round(msgpack_only, 1),
        "msgspec_untyped_us": round(msgspec_only, 1),
        "speedup": round(min(old) / min(new), 1),
    }
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    section = "\n".join(
        [
            BEGIN,
            f"`.venv/bin/python bench/wire_decode.py --write` ({date.today()}): one telemetry "
            f"frame of a 64-core, 8-GPU, 8-replica node ({result['frame_bytes']:,} bytes), "
            "decoded in one process, best of 5 rounds each.",
            "",
            "| decoder | per frame | vs old |",
            "|---|---|---|",
            f"| old: msgpack + the reflective `schema.decode` into dataclasses | "
            f"{result['old_us']} µs | 1x |",
            f"| new: `decode_frame` (msgspec Structs, ranges checked) | {result['new_us']} µs | "
            f"{result['speedup']}x faster |",
            f"| msgpack alone, into dicts, no checks (reference) | {result['msgpack_only_us']} µs"
            " | |",
            f"| msgspec alone, into dicts, no checks (reference) | "
            f"{result['msgspec_untyped_us']} µs | |",
            END,
        ]
    )
    print(section)
    if args.write:
        text = RESULTS.read_text()
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
