"""Forecast metrics on hand-computed cases, the results table, and the PNG figure's validity."""

import json
import random
import struct
import zlib
from pathlib import Path

import pytest

from swarmx.models.dist import LatencyDist
from swarmx.models.evaluate import (
    EvalResult,
    coverage,
    evaluate,
    markdown_table,
    median_abs_error,
    pinball,
    write_plot_png,
)

D = LatencyDist((0.5, 0.9), (1.0, 2.0))


def test_pinball_by_hand() -> None:
    # level 0.5, q = 1: |0.5 - 1| * 0.5 = 0.25 and |3 - 1| * 0.5 = 1.0
    assert pinball([D, D], [0.5, 3.0], 0.5) == pytest.approx(0.625)
    # level 0.9, q = 2: over-forecast by 1.5 costs 0.1 * 1.5, under by 1 costs 0.9 * 1
    assert pinball([D, D], [0.5, 3.0], 0.9) == pytest.approx((0.15 + 0.9) / 2)
    assert pinball([D], [2.0], 0.9) == 0.0


def test_coverage_and_median_error_by_hand() -> None:
    assert coverage([D, D, D], [0.5, 3.0, 2.0], 0.9) == pytest.approx(2 / 3)  # a tie is covered
    assert coverage([D, D], [0.5, 3.0], 0.5) == 0.5
    assert median_abs_error([D, D], [0.5, 3.0]) == pytest.approx(1.25)
    # Levels between the known ones are read off the distribution.
    assert coverage([D], [D.quantile(0.7) * 0.999], 0.7) == 1.0


def test_mismatched_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="equally many"):
        pinball([D], [1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="equally many"):
        coverage([], [], 0.5)


def test_evaluate_and_table() -> None:
    levels = (0.5, 0.9)
    res = evaluate("toy", [D, D], [0.5, 3.0], levels)
    assert res == EvalResult("toy", 2, {0.5: 0.625, 0.9: 0.525}, {0.5: 0.5, 0.9: 0.5}, 1.25)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["pinball"] == {"0.5": 0.625, "0.9": pytest.approx(0.525)}
    assert d["coverage"]["0.9"] == 0.5 and d["median_abs_error_s"] == 1.25
    table = markdown_table([res, evaluate("other", [D], [1.0], levels)], levels).splitlines()
    assert len(table) == 4
    assert table[0].startswith("| predictor | n | pinball p50 (s) | pinball p90 (s) | coverage p50")
    assert table[2] == "| toy | 2 | 0.625 | 0.525 | 0.500 | 0.500 | 1.25 |"
    assert {line.count("|") for line in table} == {8}


def read_png(data: bytes) -> tuple[int, int, bytes]:
    """A minimal decoder for 8-bit RGB, filter-0 PNGs: checks every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, kinds = 8, b"", []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        kinds.append(kind)
        if kind == b"IHDR":
            w, h, depth, color, *_ = struct.unpack(">IIBBBBB", body)
            assert (depth, color) == (8, 2)
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + 3 * w)
    rows = [raw[y * (1 + 3 * w) : (y + 1) * (1 + 3 * w)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, b"".join(r[1:] for r in rows)


def test_plot_is_a_valid_png(tmp_path: Path) -> None:
    rng = random.Random(0)
    actual = [rng.lognormvariate(1.0, 0.8) for _ in range(300)]
    levels = (0.5, 0.9, 0.99)
    good = [LatencyDist.lognormal(2.7, 0.8, levels)] * 300
    narrow = [LatencyDist.lognormal(2.0, 0.1, levels)] * 300
    path = tmp_path / "fig.png"
    write_plot_png(path, {"good": (good, actual), "too-narrow": (narrow, actual)}, levels)
    w, h, px = read_png(path.read_bytes())
    assert w > h > 300
    colours = {px[i : i + 3] for i in range(0, len(px), 3)}
    white, black, blue, red = (255, 255, 255), (0, 0, 0), (31, 119, 180), (214, 39, 40)
    assert {bytes(c) for c in (white, black, blue, red)} <= colours
