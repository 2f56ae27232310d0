"""The live scheduler's `Forecaster`: the online predictor asked about one call on several
candidate replicas at once, each seen with its own device and load."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from swarmx.models.baselines import MeanConformal, baseline_from_dict
from swarmx.models.compose import compose_unfamiliar
from swarmx.models.dist import LatencyDist
from swarmx.models.online import OnlineLearner, Predictor
from swarmx.models.query import Candidate, Query
from swarmx.sched.router import ReplicaView
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch
from swarmx.workflow.engine import CallSpec

if TYPE_CHECKING:
    from swarmx.models.predictor import Prepared


def _booked(view: ReplicaView) -> tuple[int, int]:
    """(in flight, queued) on the replica before this call: what the scheduler booked there,
    and calls its engine runs for others (`ReplicaView.external`)."""
    load = view.load
    return min(load, view.concurrency), max(0, load - view.concurrency)


def runtime_of(view: ReplicaView) -> RuntimeAtDispatch:
    """The replica's load as a trace records it."""
    return RuntimeAtDispatch(*_booked(view))


def candidate(device: DeviceAtDispatch, view: ReplicaView) -> Candidate:
    """A replica as a placement for the predictor (a plain tuple, not the trace's objects: this
    runs for every candidate of every routed call)."""
    return (device.gpu, device.gpu_util, device.gpu_mem_frac, device.cpu_util, *_booked(view))


class LiveForecaster:
    def __init__(
        self,
        learner: OnlineLearner,
        query_of: Callable[[CallSpec], Query],
        device_of: Callable[[ReplicaView], DeviceAtDispatch],
    ) -> None:
        self.learner = learner
        self._query_of = query_of
        self._device_of = device_of
        self._load_only: tuple[Predictor, MeanConformal] | None = None
        self._prepared: dict[str, Prepared] = {}
        """The calls of the current drain, worked out together (`prepare`), by call id."""

    def _placements(self, candidates: Sequence[ReplicaView]) -> list[Candidate]:
        device_of = self._device_of
        return [candidate(device_of(v), v) for v in candidates]

    def service(
        self,
        call: CallSpec,
        candidates: Sequence[ReplicaView],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        """The live model's forecasts; on replicas whose GPU it never trained on, the service
        time composed from its output-length forecast and their measured speeds."""
        places = self._placements(candidates)
        prepared = self._prepared.pop(call.call_id, None)
        if prepared is None:
            query = self._query_of(call)
            dists = self.learner.forecast_candidates(query, places, cached_tokens)
        else:
            query = prepared.query
            dists = self.learner.forecast_prepared(prepared, places, cached_tokens)
        return compose_unfamiliar(self.learner.live, query, candidates, cached_tokens, dists)

    def prepare(self, calls: Sequence[CallSpec]) -> None:
        """The live model works out these calls' own part of their forecasts together; the
        queries are what `service` would build for them now (a drain places them before any
        of them leaves, so before their sessions move on)."""
        queries = [self._query_of(c) for c in calls]
        prepared = self.learner.prepare(queries) or []
        self._prepared = {c.call_id: p for c, p in zip(calls, prepared, strict=False)}

    def load_only(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> list[LatencyDist]:
        """The llm-d-style baseline fitted with the live model, else the cold-start fallback."""
        live = self.learner.live
        if self._load_only is None or self._load_only[0] is not live:
            fitted = next(
                (
                    b
                    for d in getattr(live, "extras", {}).get("baselines", [])
                    if isinstance(b := baseline_from_dict(d), MeanConformal)
                ),
                None,
            )
            self._load_only = (live, fitted) if fitted is not None else None
        model = self._load_only[1] if self._load_only else self.learner.fallback
        return model.predict_candidates(self._query_of(call), self._placements(candidates))
