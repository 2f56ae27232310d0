"""How good a latency forecast is: pinball loss and coverage at each level, the median's error,
a markdown table and a PNG figure for bench/RESULTS.md.

The metrics are pure Python; the figure needs matplotlib, an optional extra
(`swarmx.models.plotting`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmx import stats
from swarmx.models import plotting
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
        total += stats.pinball(y, _q(d, level), level)
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

_MAX_POINTS = 1500
"""Points a predictor in the scatter: more only hide each other."""


def write_plot_png(
    path: str | Path,
    results_by_name: dict[str, tuple[Sequence[LatencyDist], Sequence[float]]],
    levels: Sequence[float],
) -> None:
    """Left, a reliability diagram (nominal level vs observed coverage, one line a predictor);
    right, forecast median vs actual latency, log-log (at most `_MAX_POINTS` a predictor).
    Raises `plotting.PlotUnavailable` without matplotlib."""
    fig = plotting.figure(10.0, 5.0)
    rel, sc = fig.subplots(1, 2)
    rel.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)  # perfect calibration
    ps = sorted(levels)
    shown: list[float] = []  # the scatter's positive values, for its diagonal
    for name, (dists, actual) in results_by_name.items():
        (line,) = rel.plot(ps, [coverage(dists, actual, p) for p in ps], marker="o", label=name)
        stride = max(1, len(dists) // _MAX_POINTS)
        pairs = [(y, _q(d, 0.5)) for d, y in zip(dists, actual, strict=True)][::stride]
        sc.scatter(*zip(*pairs, strict=True), s=4, color=line.get_color(), alpha=0.5)
        shown += [v for pair in pairs for v in pair if v > 0]
    rel.set(title="coverage vs nominal level", xlabel="nominal level", ylabel="coverage")
    rel.set(xlim=(0, 1), ylim=(0, 1))
    rel.legend(loc="upper left")
    if shown:
        lo, hi = min(shown), max(shown)
        sc.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    sc.set(xscale="log", yscale="log", title="forecast median vs actual")
    sc.set(xlabel="actual (s)", ylabel="forecast median (s)")
    plotting.save(fig, Path(path))
