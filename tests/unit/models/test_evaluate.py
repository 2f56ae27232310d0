"""Forecast metrics on hand-computed cases, the results table, and the PNG figure (or, without
matplotlib, the error that says how to get it)."""

import json
import random
import struct
import sys
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
from swarmx.models.plotting import PlotUnavailable

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


def runs() -> tuple[dict[str, tuple[list[LatencyDist], list[float]]], tuple[float, ...]]:
    rng = random.Random(0)
    actual = [rng.lognormvariate(1.0, 0.8) for _ in range(300)]
    levels = (0.5, 0.9, 0.99)
    good = [LatencyDist.lognormal(2.7, 0.8, levels)] * 300
    narrow = [LatencyDist.lognormal(2.0, 0.1, levels)] * 300
    return {"good": (good, actual), "too-narrow": (narrow, actual)}, levels


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package does
    path = tmp_path / "fig.png"
    with pytest.raises(PlotUnavailable, match=r"pip install 'swarmx\[plot\]'"):
        write_plot_png(path, *runs())
    assert not path.exists()


def test_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "fig.png"
    write_plot_png(path, *runs())
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > height > 300  # two panels side by side
