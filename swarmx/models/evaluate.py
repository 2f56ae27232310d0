"""How good a latency forecast is: pinball loss and coverage at each level, the median's error,
a markdown table and a PNG figure for bench/RESULTS.md.

Pure Python, so no plotting library joins the dependencies: the figure is drawn on a small RGB
raster with a built-in 3x5 font and encoded as a PNG with zlib.
"""

from __future__ import annotations

import itertools
import math
import statistics
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmx.models.dist import LatencyDist


def _q(d: LatencyDist, p: float) -> float:
    """The quantile at ``p``: exact at a known level (ties with the actual count as covered)."""
    return d.values_s[d.levels.index(p)] if p in d.levels else d.quantile(p)


def _check(dists: Sequence[LatencyDist], actual_s: Sequence[float]) -> None:
    if not dists or len(dists) != len(actual_s):
        raise ValueError(
            f"need equally many forecasts and actuals, got {len(dists)}, {len(actual_s)}"
        )


def pinball(dists: Sequence[LatencyDist], actual_s: Sequence[float], level: float) -> float:
    """Mean pinball (quantile) loss at ``level``, seconds: minimised by the true quantile."""
    _check(dists, actual_s)
    total = 0.0
    for d, y in zip(dists, actual_s, strict=True):
        r = y - _q(d, level)
        total += max(level * r, (level - 1) * r)
    return total / len(dists)


def coverage(dists: Sequence[LatencyDist], actual_s: Sequence[float], level: float) -> float:
    """Share of calls at or under the forecast quantile: ``level`` when calibrated."""
    _check(dists, actual_s)
    return sum(y <= _q(d, level) for d, y in zip(dists, actual_s, strict=True)) / len(dists)


def median_abs_error(dists: Sequence[LatencyDist], actual_s: Sequence[float]) -> float:
    """Median of |forecast median - actual|, seconds."""
    _check(dists, actual_s)
    return statistics.median(abs(_q(d, 0.5) - y) for d, y in zip(dists, actual_s, strict=True))


@dataclass(frozen=True)
class EvalResult:
    name: str
    n: int
    pinball: dict[float, float]
    coverage: dict[float, float]
    median_abs_error_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON shape for ``--json``: levels as strings (``"0.9"``), as in `LatencyDist.as_dict`."""
        return {
            "name": self.name,
            "n": self.n,
            "pinball": {f"{p:g}": v for p, v in self.pinball.items()},
            "coverage": {f"{p:g}": v for p, v in self.coverage.items()},
            "median_abs_error_s": self.median_abs_error_s,
        }


def evaluate(
    name: str, dists: Sequence[LatencyDist], actual_s: Sequence[float], levels: Sequence[float]
) -> EvalResult:
    return EvalResult(
        name,
        len(dists),
        {p: pinball(dists, actual_s, p) for p in levels},
        {p: coverage(dists, actual_s, p) for p in levels},
        median_abs_error(dists, actual_s),
    )


def markdown_table(results: Sequence[EvalResult], levels: Sequence[float]) -> str:
    """One row per predictor: pinball (s) and coverage at each level, then the median's error."""
    head = (
        ["predictor", "n"]
        + [f"pinball p{p * 100:g} (s)" for p in levels]
        + [f"coverage p{p * 100:g}" for p in levels]
        + ["median abs err (s)"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = (
            [r.name, str(r.n)]
            + [f"{r.pinball[p]:.3f}" for p in levels]
            + [f"{r.coverage[p]:.3f}" for p in levels]
            + [f"{r.median_abs_error_s:.2f}"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- the figure -------------------------------------------------------------------------------

_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.-/_+()"
_BITS = (
    "75557262277174771717557117471774757711117575775717257556565634443655567464774644345535575572227"
    "1115255655444475775565555255526564425563656553421672222555575555255775552555522271247000020070"
    "01124400007027201222142224"
)
_GLYPHS = {ch: _BITS[5 * i : 5 * i + 5] for i, ch in enumerate(_CHARS)}
"""3x5 glyphs, one octal digit per row (4 = left pixel); text is upper-cased, unknowns blank."""
_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]
_INK, _GREY = (0, 0, 0), (170, 170, 170)
_PANEL, _MARGIN, _SCALE = 440, 56, 2  # panel size and inner margin, px; font pixel size


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color: tuple[int, int, int], size: int = 2) -> None:
        for yy in range(y, y + size):
            for xx in range(x, x + size):
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i : i + 3] = bytes(color)

    def line(
        self, a: tuple[int, int], b: tuple[int, int], color: tuple[int, int, int], dash: int = 0
    ) -> None:
        """Bresenham; ``dash`` > 0 draws dash-long runs with gaps as long."""
        (x0, y0), (x1, y1) = a, b
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x1 > x0 else -1), (1 if y1 > y0 else -1)
        err, step = dx + dy, 0
        while True:
            if not dash or (step // dash) % 2 == 0:
                self.dot(x0, y0, color)
            if (x0, y0) == (x1, y1):
                return
            step += 1
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color: tuple[int, int, int] = _INK) -> None:
        for k, ch in enumerate(s.upper()):
            for row, bits in enumerate(_GLYPHS.get(ch, "00000")):
                for col in range(3):
                    if int(bits) & (4 >> col):
                        self.dot(x + (4 * k + col) * _SCALE, y + row * _SCALE, color, _SCALE)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data))
            )

        stride = self.w * 3
        raw = b"".join(b"\x00" + self.px[y * stride : (y + 1) * stride] for y in range(self.h))
        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def _text_width(s: str) -> int:
    return 4 * _SCALE * len(s)


class _Axes:
    """A square panel mapping data (x, y) in [lo, hi]^2, linear or log10, to pixels."""

    def __init__(self, c: _Canvas, left: int, lo: float, hi: float, log: bool) -> None:
        self.c, self.log = c, log
        self.x0, self.y0 = left + _MARGIN, _PANEL - _MARGIN  # the origin, bottom left
        self.size = _PANEL - 2 * _MARGIN
        self.bounds = (lo, hi)
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)

    def to_px(self, x: float, y: float) -> tuple[int, int]:
        def frac(v: float) -> float:
            v = math.log10(max(v, 1e-12)) if self.log else v
            return min(max((v - self.lo) / (self.hi - self.lo), 0.0), 1.0)

        return self.x0 + round(frac(x) * self.size), self.y0 - round(frac(y) * self.size)

    def frame(self, title: str, xlabel: str, ticks: Sequence[float]) -> None:
        c, s = self.c, self.size
        c.line((self.x0, self.y0), (self.x0 + s, self.y0), _INK)
        c.line((self.x0, self.y0), (self.x0, self.y0 - s), _INK)
        for t in ticks:
            px, py = self.to_px(t, t)
            label = f"{t:g}"
            c.line((px, self.y0), (px, self.y0 + 5), _INK)
            c.line((self.x0 - 5, py), (self.x0, py), _INK)
            c.text(px - _text_width(label) // 2, self.y0 + 10, label)
            c.text(self.x0 - 8 - _text_width(label), py - 5, label)
        lo, hi = self.bounds
        c.line(self.to_px(lo, lo), self.to_px(hi, hi), _GREY, dash=4)  # perfect: on the diagonal
        c.text(self.x0, self.y0 - s - 24, title)
        c.text(self.x0 + (s - _text_width(xlabel)) // 2, self.y0 + 28, xlabel)


def write_plot_png(
    path: str | Path,
    results_by_name: dict[str, tuple[Sequence[LatencyDist], Sequence[float]]],
    levels: Sequence[float],
) -> None:
    """Left, a reliability diagram (nominal level vs observed coverage, one line a predictor);
    right, forecast median vs actual latency, log-log (at most 1500 points a predictor); a
    colour legend below."""
    rows = math.ceil(len(results_by_name) / 2)
    c = _Canvas(2 * _PANEL, _PANEL + 20 * rows + 10)
    rel = _Axes(c, 0, 0.0, 1.0, log=False)
    rel.frame("COVERAGE VS NOMINAL LEVEL", "NOMINAL LEVEL", [0.0, 0.5, 1.0])
    values = [
        v
        for dists, actual in results_by_name.values()
        for v in [*actual, *(_q(d, 0.5) for d in dists)]
        if v > 0
    ]
    lo = 10 ** math.floor(math.log10(min(values, default=0.1)))
    hi = 10 ** math.ceil(math.log10(max(values, default=10.0)))
    hi = hi if hi > lo else lo * 10
    sc = _Axes(c, _PANEL, lo, hi, log=True)
    decades = range(round(math.log10(lo)), round(math.log10(hi)) + 1)
    sc.frame("FORECAST MEDIAN VS ACTUAL S", "ACTUAL S", [10.0**k for k in decades])
    for i, (name, (dists, actual)) in enumerate(results_by_name.items()):
        color = _PALETTE[i % len(_PALETTE)]
        pts = [rel.to_px(p, coverage(dists, actual, p)) for p in sorted(levels)]
        for a, b in itertools.pairwise(pts):
            c.line(a, b, color)
        for x, y in pts:
            c.dot(x - 2, y - 2, color, 5)
        stride = max(1, len(dists) // 1500)
        for d, y_s in list(zip(dists, actual, strict=True))[::stride]:
            c.dot(*sc.to_px(y_s, _q(d, 0.5)), color)
        lx, ly = 20 + (i % 2) * _PANEL, _PANEL + 20 * (i // 2)
        c.dot(lx, ly, color, 10)
        c.text(lx + 16, ly, name)
    Path(path).write_bytes(c.png())
