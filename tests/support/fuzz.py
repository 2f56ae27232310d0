"""What the property tests share: the example budget (short in CI, ``SWARMX_FUZZ_EXAMPLES`` for a
long run by hand) and outcome counting for ``--hypothesis-show-statistics``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, event, settings
from hypothesis.control import currently_in_test_context

EXAMPLES = int(os.environ.get("SWARMX_FUZZ_EXAMPLES", "200"))
PROFILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def outcome(name: str) -> None:
    """Count an outcome (plain tests that share a checker with property tests count nothing)."""
    if currently_in_test_context():
        event(name)
