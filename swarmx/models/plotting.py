"""Figures through matplotlib, an optional extra (``pip install 'swarmx[plot]'``) imported on
first use: figures are for reports (`swarmx predictor eval --plot`, the benches' charts), never
needed to run a cluster, so nothing else imports it.

Figures are built on `matplotlib.figure.Figure` directly, not pyplot: no global figure
registry and no GUI backend, so plotting from a CLI or a worker process starts no window and
leaks no figure.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'swarmx[plot]'"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed: the message says how to install it, on one line."""


def require() -> None:
    """Raise `PlotUnavailable` now, before work whose figure could not be drawn."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as exc:
        raise PlotUnavailable(f"plotting needs matplotlib: {INSTALL_HINT}") from exc


def figure(width_in: float, height_in: float) -> Any:
    """A new `matplotlib.figure.Figure` (typed Any: matplotlib is not a dependency)."""
    require()
    from matplotlib.figure import Figure  # type: ignore[import-not-found, unused-ignore]

    return Figure(figsize=(width_in, height_in), layout="constrained")


def save(fig: Any, path: str | Path) -> None:
    """Write ``fig`` in the format of ``path``'s suffix, byte for byte the same for the same
    figure (no date, fixed SVG ids), so a regenerated chart changes in git only if its data
    did."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    with matplotlib.rc_context({"svg.hashsalt": "swarmx"}):
        fig.savefig(path, metadata={"Date": None} if str(path).endswith(".svg") else None)
