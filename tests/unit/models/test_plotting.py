"""matplotlib stays optional: without it a one-line error says how to install it; with it,
figures are written the same, byte for byte, each time, their text escaped."""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from swarmx.models import plotting


def test_without_matplotlib_one_line_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package does
    with pytest.raises(plotting.PlotUnavailable) as err:
        plotting.require()
    assert str(err.value) == "plotting needs matplotlib: pip install 'swarmx[plot]'"
    with pytest.raises(plotting.PlotUnavailable):
        plotting.figure(4.0, 3.0)


def test_an_svg_is_reproducible_and_escapes_its_text(tmp_path: Path):
    pytest.importorskip("matplotlib")

    def draw(path: Path) -> bytes:
        fig = plotting.figure(4.0, 3.0)
        ax = fig.subplots()
        ax.plot([1.0, 10.0], [0.0, 1.0], label="<tail> & co")
        ax.set(title='p99 < 2 s & "fast"', xscale="log")
        ax.legend()
        plotting.save(fig, path)
        return path.read_bytes()

    first = draw(tmp_path / "a.svg")
    assert draw(tmp_path / "b.svg") == first
    ET.fromstring(first)  # well-formed XML whatever the title says
