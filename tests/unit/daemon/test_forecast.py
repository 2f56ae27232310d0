"""The live forecaster's view of a candidate: the runtime features a forecast is made on."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from swarmx.daemon.forecast import candidate
from swarmx.sched.router import ReplicaView
from swarmx.traces import DeviceAtDispatch
from swarmx.workflow.engine import CallSpec

DEVICE = DeviceAtDispatch("H100", 0.5, 0.25, 0.1)


def view(outstanding: int, external: int = 0) -> ReplicaView:
    v = ReplicaView("n/a", "n", "lm", "openai", "gpu", 4, outstanding, "H100")
    return dataclasses.replace(v, external=external)


def test_the_predictor_sees_others_calls_on_an_engine_as_load():
    """Calls the engine runs for others count as in flight, and past the slots as queued,
    like the scheduler's own."""
    assert candidate(DEVICE, view(1)) == ("H100", 0.5, 0.25, 0.1, 1, 0)
    assert candidate(DEVICE, view(1, external=5)) == ("H100", 0.5, 0.25, 0.1, 4, 2)


def test_the_live_forecast_is_composed_on_a_replica_whose_gpu_the_model_never_saw():
    """`LiveForecaster.service` is the learner's forecast, except on a measured replica whose
    GPU the live model does not know: there, the prefill and the output-length head's tokens at
    the replica's own speeds."""
    from swarmx.daemon.forecast import LiveForecaster
    from swarmx.models.dist import LatencyDist
    from swarmx.models.query import Query

    levels = (0.5, 0.9)
    guess = LatencyDist(levels, (1.0, 2.0))

    class Live:
        output_shift = 0.0

        def knows_gpu(self, gpu: str) -> bool:
            return gpu == "H100"

        def output_tokens(self, query):
            return LatencyDist(levels, (51.0, 201.0))

    class Learner:
        live = Live()

        def forecast_candidates(self, query, places, cached):
            return [guess for _ in places]

    known = ReplicaView("n/a", "n", "lm", "openai", "gpu", 4, 0, "H100")
    new = dataclasses.replace(
        known, replica="m/a", gpu="B200", prefill_tokens_per_s=10_000.0, decode_s_per_token=0.01
    )
    fc = LiveForecaster(Learner(), lambda c: Query("lm", "llm", "hi", 5000, 512), lambda v: DEVICE)  # type: ignore[arg-type]
    call = CallSpec("w:c", "w", "s", None, 0, "llm", "lm", "hi", 512, {}, [], None, [])
    on_known, on_new = fc.service(call, [known, new], [0, 1000])
    assert on_known is guess
    assert on_new.values_s == pytest.approx((0.4 + 0.5, 0.4 + 2.0))


def test_calls_prepared_by_a_drain_are_forecast_from_their_prepared_part():
    """`LiveForecaster.prepare` builds each call's query once and has the learner work them out
    together; `service` then forecasts from that (each taken once), and a call not prepared, or
    prepared under a live model that prepares nothing, from its query as before."""
    from swarmx.daemon.forecast import LiveForecaster
    from swarmx.models.dist import LatencyDist
    from swarmx.models.query import Query

    levels = (0.5, 0.9)
    asked: list[str] = []

    class Live:
        def knows_gpu(self, gpu: str) -> bool:
            return True

    class Learner:
        live = Live()
        prepares = True

        def prepare(self, queries):
            return [SimpleNamespace(query=q) for q in queries] if self.prepares else None

        def forecast_prepared(self, prepared, places, cached):
            asked.append(f"prepared {prepared.query.prompt}")
            return [LatencyDist(levels, (1.0, 2.0)) for _ in places]

        def forecast_candidates(self, query, places, cached):
            asked.append(f"query {query.prompt}")
            return [LatencyDist(levels, (3.0, 4.0)) for _ in places]

    built: list[str] = []

    def query_of(c: CallSpec) -> Query:
        built.append(c.call_id)
        return Query("lm", "llm", c.call_id, 10, 8)

    learner = Learner()
    fc = LiveForecaster(learner, query_of, lambda v: DEVICE)  # type: ignore[arg-type]
    calls = [
        CallSpec(f"w:{i}", "w", "s", None, 0, "llm", "lm", "p", 8, {}, [], None, [])
        for i in range(3)
    ]
    fc.prepare(calls[:2])
    assert built == ["w:0", "w:1"]
    for c in calls:
        fc.service(c, [view(0)])
    assert asked == ["prepared w:0", "prepared w:1", "query w:2"]
    assert built == ["w:0", "w:1", "w:2"]  # each query built once
    fc.service(calls[0], [view(0)])  # taken already: from its query
    learner.prepares = False
    fc.prepare(calls[1:])
    fc.service(calls[1], [view(0)])
    assert asked[-2:] == ["query w:0", "query w:1"]
