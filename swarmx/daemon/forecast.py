"""The live scheduler's `Forecaster`: the online predictor asked about one call on several
candidate replicas at once, each seen with its own device and load."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from swarmx.models.baselines import MeanConformal, baseline_from_dict
from swarmx.models.dist import LatencyDist
from swarmx.models.online import OnlineLearner, Predictor
from swarmx.models.query import Query
from swarmx.sched.router import ReplicaView
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch
from swarmx.workflow.engine import CallSpec


def runtime_of(view: ReplicaView) -> RuntimeAtDispatch:
    """In flight and queued on the replica as the scheduler booked them, before this call."""
    return RuntimeAtDispatch(
        min(view.outstanding, view.concurrency), max(0, view.outstanding - view.concurrency)
    )


def placed(q: Query, device: DeviceAtDispatch, runtime: RuntimeAtDispatch) -> Query:
    """The call's query as it would be on one replica."""
    return dataclasses.replace(
        q,
        gpu=device.gpu,
        gpu_util=device.gpu_util,
        gpu_mem_frac=device.gpu_mem_frac,
        cpu_util=device.cpu_util,
        inflight=runtime.inflight,
        queue_depth=runtime.queue_depth,
    )


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

    def _queries(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> list[Query]:
        base = self._query_of(call)
        return [placed(base, self._device_of(v), runtime_of(v)) for v in candidates]

    def service(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> list[LatencyDist]:
        return self.learner.forecast(self._queries(call, candidates))

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
        return model.predict(self._queries(call, candidates))
