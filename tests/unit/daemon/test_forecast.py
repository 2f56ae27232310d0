"""The live forecaster's view of a candidate: the runtime features a forecast is made on."""

from __future__ import annotations

import dataclasses

from swarmx.daemon.forecast import candidate
from swarmx.sched.router import ReplicaView
from swarmx.traces import DeviceAtDispatch

DEVICE = DeviceAtDispatch("H100", 0.5, 0.25, 0.1)


def view(outstanding: int, external: int = 0) -> ReplicaView:
    v = ReplicaView("n/a", "n", "lm", "openai", "gpu", 4, outstanding, "H100")
    return dataclasses.replace(v, external=external)


def test_the_predictor_sees_others_calls_on_an_engine_as_load():
    """Calls the engine runs for others count as in flight, and past the slots as queued,
    like the scheduler's own."""
    assert candidate(DEVICE, view(1)) == ("H100", 0.5, 0.25, 0.1, 1, 0)
    assert candidate(DEVICE, view(1, external=5)) == ("H100", 0.5, 0.25, 0.1, 4, 2)
