"""The live scheduler's `Forecaster`: the online predictor asked about one call on several
candidate replicas at once, each seen with its own device and load."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from swarmx.models.baselines import MeanConformal, baseline_from_dict
from swarmx.models.compose import compose_unfamiliar
from swarmx.models.dist import LatencyDist
from swarmx.models.online import OnlineLearner, Predictor
from swarmx.models.query import Candidate, Query
from swarmx.sched.router import ReplicaView
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch
from swarmx.workflow.engine import CallSpec


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
        query = self._query_of(call)
        dists = self.learner.forecast_candidates(query, self._placements(candidates), cached_tokens)
        return compose_unfamiliar(self.learner.live, query, candidates, cached_tokens, dists)

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
