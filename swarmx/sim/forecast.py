"""Forecasters for the simulator: the trained predictor (the very model the live scheduler runs),
and reference forecasters that bound what prediction can buy.

- ``oracle``: knows each call's true output tokens (or tool work) and computes its service time
  from the emulated timing model at the replica's current batch, behind the prefills already
  under way there, with the prefix the replica's cache holds of the call; a point forecast.
- ``noisy:SIGMA``: the oracle times lognormal noise of that sigma, drawn once per call, with the
  matching lognormal spread (an honest forecaster of that accuracy).
- ``shuffled``: the oracle of another, random call of the same model: the right marginal with no
  per-call information.
- ``constant``: one forecast per model whatever the call and the replica.
- ``oracle``, ``noisy:SIGMA`` or ``shuffled`` with the suffix ``:nocache``: the same, blind to
  the replicas' prefix caches (every prompt forecast as if none of it were cached).
- a model file path: the trained `QuantilePredictor`, fed the same features as live; with the
  suffix ``:noload`` its load features are zeroed (the ablation without load features), with
  ``:point`` only its median is passed on, with no spread (what a point-estimate router sees);
  on a replica whose GPU the model never trained on, its service time is composed from the
  output-length forecast and the replica's measured speeds, as live (`swarmx.models.compose`),
  and ``:nocompose`` keeps the latency head's guess there instead (the ablation).

Per-call noise (``noisy``) scales a call's forecast on every candidate alike, so it cannot change
the order of the candidates while slots are free; it acts through the work ahead on full
replicas, the deadlines, the scaler's risk, and the routers' near-tie margin, which grows with
the spread a forecast states.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from swarmx.backends.emulated import GpuProfile, vision_s
from swarmx.models.baselines import MeanConformal
from swarmx.models.compose import compose_unfamiliar
from swarmx.models.dist import LatencyDist
from swarmx.models.query import Candidate, Query, SessionTracker
from swarmx.sched.router import ReplicaView
from swarmx.sim.servers import LlmServer, SharedServer
from swarmx.sim.simworkflow import CallTruth
from swarmx.stats import quantile
from swarmx.traces import TraceRecord
from swarmx.workflow.engine import CallSpec

if TYPE_CHECKING:
    from swarmx.models.predictor import Prepared

LEVELS = (0.5, 0.9, 0.95, 0.99)
GPU_MEMORY_BYTES = 80e9


@dataclass
class Replica:
    """A simulated replica: its server, what it is, and its lifecycle."""

    name: str
    model: str
    gpu: str
    profile: GpuProfile | None
    """Timing profile of the GPU (None for CPU tool hosts)."""
    kind: str
    """``llm``, ``vision`` or ``tool``."""
    server: LlmServer | SharedServer
    slots: int
    created_s: float
    ready_s: float
    retired_s: float | None = None
    draining: bool = False


class CallInfo(Protocol):
    def truth(self, call: CallSpec) -> CallTruth: ...

    def workflow_name(self, call: CallSpec) -> str: ...

    @property
    def now(self) -> float:
        """Simulated time, seconds."""
        ...


def oracle_s(
    call: CallSpec, truth: CallTruth, rep: Replica, now_s: float, cache: bool = True
) -> float:
    """Service time if the replica's load (and, with ``cache``, its prefix cache) stayed as it
    is now."""
    s = rep.server
    if isinstance(s, LlmServer):
        blocks = call.prefix_blocks if cache else ()
        return s.solo_now_s(
            truth.prompt_tokens, truth.output_tokens, now_s, blocks, call.block_tokens
        )
    if rep.kind == "vision":
        px = int(call.inputs.get("image_px", "224"))
        steps = int(call.inputs.get("steps", "1"))
        assert rep.profile is not None
        return vision_s(rep.profile, px, steps) / s.rate(s.outstanding + 1)
    return truth.work_s / s.rate(s.outstanding + 1)


def _point(v: float) -> LatencyDist:
    return LatencyDist.point(v, LEVELS)


class SimForecaster:
    def __init__(
        self,
        spec: str,
        replicas: dict[str, Replica],
        info: CallInfo,
        sessions: SessionTracker,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.replicas = replicas
        self.info = info
        self.sessions = sessions
        self._rng = random.Random(seed)
        self._noise: dict[str, float] = {}
        self._shuffle: dict[str, list[CallTruth]] = {}
        self._constant: dict[str, LatencyDist] = {}
        self._const_logs: dict[str, list[float]] = {}
        self._recent: list[TraceRecord] = []
        self._seen = 0
        self.wants_load_only = False
        """Set when the router ranks by the load-only baseline, which is then fitted."""
        self._load_model: MeanConformal | None = None
        self.sigma = 0.0
        self._model = None
        self._prepared: dict[str, Prepared] = {}
        """The calls of the current drain, worked out together (`prepare`), by call id."""
        self._noload = self._median_only = False
        self._compose = True
        base, _, variant = spec.rpartition(":")
        self._cache = variant != "nocache"
        if not self._cache and base.partition(":")[0] not in ("oracle", "noisy", "shuffled"):
            raise ValueError(f"{spec!r}: only oracle, noisy:SIGMA and shuffled take :nocache")
        kind, _, arg = (spec if self._cache else base).partition(":")
        self._kind = kind
        if kind == "noisy":
            try:
                self.sigma = float(arg)
            except ValueError:
                self.sigma = math.nan
            if not self.sigma >= 0:
                raise ValueError(f"noisy:SIGMA needs SIGMA >= 0, got {arg!r}")
        elif kind not in ("oracle", "shuffled", "constant"):
            from swarmx.models.predictor import QuantilePredictor  # torch, only for this path

            path, _, variant = spec.rpartition(":")
            if variant not in ("noload", "point", "nocompose"):
                path = spec
            elif not path:
                raise ValueError(f"{spec!r} needs a model file before it: MODEL:{variant}")
            self._noload, self._median_only = variant == "noload", variant == "point"
            self._compose = variant != "nocompose"
            self._model = QuantilePredictor.load(path)
        self._service = self._pick(kind if self._model is None else "oracle")
        self.wants_constant = spec == "constant"

    def _pick(self, kind: str) -> Callable[[CallSpec, Sequence[ReplicaView]], list[LatencyDist]]:
        """The forecast of a kind of spec (a learned model's is `_predicted`, which `service`
        calls itself: it takes the cached tokens too)."""
        return {
            "oracle": self._oracle,
            "noisy": self._noisy,
            "shuffled": self._shuffled,
            "constant": self._constant_of,
        }[kind]

    def observe(self, call: CallSpec, rec: Callable[[], TraceRecord], service_s: float) -> None:
        """A finished call. The constant forecaster and the load-only baseline are fitted on the
        calls seen so far, refreshed as they accumulate (as a live deployment would); each only
        when something asks for it."""
        self._seen += 1
        if self.wants_constant:
            logs = self._const_logs.setdefault(call.model, [])
            logs.append(math.log(max(service_s, 1e-6)))
            if len(logs) in (10, 100, 1000) or len(logs) % 5000 == 0:
                xs = sorted(logs[-20000:])
                self._constant[call.model] = LatencyDist(
                    LEVELS, tuple(math.exp(quantile(xs, p)) for p in LEVELS)
                )
        if self.wants_load_only:
            self._recent.append(rec())
            if len(self._recent) > 20000:
                del self._recent[:10000]
            if self._seen in (200, 1000) or self._seen % 5000 == 0:
                self._load_model = MeanConformal.fit(self._recent, LEVELS)

    def service(
        self,
        call: CallSpec,
        candidates: Sequence[ReplicaView],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        """The oracle and its ablations read each replica's real cache; a learned model is
        given the dispatcher's estimate (``cached_tokens``), as the live one is."""
        if self._model is not None:
            return self._predicted(call, candidates, cached_tokens)
        return self._service(call, candidates)

    def load_only(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> list[LatencyDist]:
        """llm-d's predicted-latency approach: a mean regressor on load and input length plus a
        conformal shift (`MeanConformal`, fitted on the calls seen so far); no prompt text, no
        device speed. Before it is fitted: the model's typical service scaled by the load."""
        truth = self.info.truth(call)
        if self._load_model is None:
            return [_point(1 + v.outstanding / max(1, v.concurrency)) for v in candidates]
        query = Query(call.model, call.kind, "", truth.prompt_tokens, call.max_tokens)
        places: list[Candidate] = [
            (
                "cpu",
                0.0,
                0.0,
                0.0,
                min(v.outstanding, v.concurrency),
                max(0, v.outstanding - v.concurrency),
            )
            for v in candidates
        ]
        return self._load_model.predict_candidates(query, places)

    def _oracle(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> list[LatencyDist]:
        truth, now_s, cache = self.info.truth(call), self.info.now, self._cache
        return [
            _point(oracle_s(call, truth, self.replicas[v.replica], now_s, cache))
            for v in candidates
        ]

    def _noisy(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> list[LatencyDist]:
        z = self._noise.get(call.call_id)
        if z is None:
            z = self._noise[call.call_id] = self._rng.gauss(0.0, 1.0)
            if len(self._noise) > 100_000:
                self._noise.clear()
        truth, now_s = self.info.truth(call), self.info.now
        out = []
        for v in candidates:
            true_s = oracle_s(call, truth, self.replicas[v.replica], now_s, self._cache)
            # the forecaster's median is off by exp(sigma z); its spread says so
            out.append(LatencyDist.lognormal(true_s * math.exp(self.sigma * z), self.sigma, LEVELS))
        return out

    def _shuffled(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> list[LatencyDist]:
        pool = self._shuffle.setdefault(call.model, [])
        truth = self.info.truth(call)
        pool.append(truth)
        if len(pool) > 1000:
            pool.pop(0)
        other, now_s, cache = self._rng.choice(pool), self.info.now, self._cache
        return [
            _point(oracle_s(call, other, self.replicas[v.replica], now_s, cache))
            for v in candidates
        ]

    def _constant_of(self, call: CallSpec, candidates: Sequence[ReplicaView]) -> list[LatencyDist]:
        dist = self._constant.get(call.model) or LatencyDist.lognormal(1.0, 1.0, LEVELS)
        return [dist] * len(candidates)

    def _query(self, call: CallSpec) -> Query:
        return Query(
            call.model,
            call.kind,
            call.prompt,
            self.info.truth(call).prompt_tokens,
            call.max_tokens,
            self.info.workflow_name(call),
            session=self.sessions.context(call.workflow_id, call.model, self.info.now),
        )

    def prepare(self, calls: Sequence[CallSpec]) -> None:
        """A learned model works out these calls' own part of their forecasts together, as
        the live forecaster does; the oracle and its ablations have nothing to prepare."""
        if self._model is not None:
            prepared = self._model.prepare([self._query(c) for c in calls])
            self._prepared = {c.call_id: p for c, p in zip(calls, prepared, strict=True)}

    def _predicted(
        self,
        call: CallSpec,
        candidates: Sequence[ReplicaView],
        cached_tokens: Sequence[int] | None,
    ) -> list[LatencyDist]:
        assert self._model is not None
        keys: dict[tuple[str, int, int, int], int] = {}
        places: list[Candidate] = []
        cached: list[int] = []
        slot: list[int] = []
        for k, v in enumerate(candidates):
            rep = self.replicas[v.replica]
            s = rep.server
            kv = s.kv_tokens() if isinstance(s, LlmServer) else 0.0
            inflight = 0 if self._noload else min(v.outstanding, v.concurrency)
            queued = 0 if self._noload else max(0, v.outstanding - v.concurrency)
            held = cached_tokens[k] if cached_tokens is not None else 0
            key = (rep.gpu, inflight, queued, held)
            if key not in keys:
                keys[key] = len(places)
                cached.append(held)
                places.append(
                    (
                        rep.gpu,
                        0.0 if self._noload else inflight / max(1, rep.slots),
                        0.0 if self._noload else kv * 131072.0 / GPU_MEMORY_BYTES,
                        0.0,
                        inflight,
                        queued,
                    )
                )
            slot.append(keys[key])
        prepared = self._prepared.pop(call.call_id, None)
        if prepared is None:  # routed alone: `predict_candidates` is exactly this
            (prepared,) = self._model.prepare([self._query(call)])
        query = prepared.query
        dists = self._model.predict_prepared(prepared, places, cached)
        if self._median_only:
            dists = [_point(d.quantile(0.5)) for d in dists]
        out = [dists[i] for i in slot]
        if self._compose:
            out = compose_unfamiliar(self._model, query, candidates, cached_tokens, out)
        return out
