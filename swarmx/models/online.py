"""Online adaptation inside the scheduler: forecast at dispatch, learn from every result.

- Every finished call feeds a replay buffer, the session tracker and the cold-start fallback.
- A background thread retrains (by call count and by time, sooner when calibration drifts):
  fine-tunes a copy of the live model on the buffer, or trains the first one once enough calls
  have been seen. Routing never waits for it.
- After a shift (calibration drift detected), the learner adapts to the calls since it began:
  it retrains at once, then every ``window_calls`` calls until ``retrain_every_calls`` of them
  have been seen; a fine-tune fits those calls (all but the newest) plus as many older ones
  (whole sessions drawn at random, so the old traffic is not forgotten), and is recalibrated on
  the newest of the shift's calls it did not fit.
- Guarded swap: the candidate replaces the live model only if its pinball loss on the most recent
  calls, which it was not trained on, beats the live model's as served (with its online shift)
  on the same calls.
- Calibration: every quantile forecast at dispatch is checked against what happened. Each call
  nudges a per-level log-space correction (adaptive conformal inference), and when coverage over
  a sliding window drifts beyond sampling noise, the window's conformal correction applies at
  once and retraining is brought forward.
- Versions live in ``<state_dir>/predictors/``; the live one is loaded again after a restart.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from swarmx.config import PredictorConfig
from swarmx.models.baselines import FallbackPredictor
from swarmx.models.dist import LatencyDist
from swarmx.models.query import Candidate, Query, SessionTracker, queries
from swarmx.traces import TraceRecord

log = logging.getLogger(__name__)


ACI_GAIN = 0.02
"""Log-space step of the per-call coverage tracking: a miss at p=0.99 widens that quantile by 2%."""

SHIFT_CAL_FRAC = 0.25
"""After a shift, the newest share of its calls (before the held-out ones) that recalibrates a
candidate instead of training it: the newest, as the traffic may still be moving."""


class Predictor(Protocol):
    version: str
    kind: str

    @property
    def levels(self) -> tuple[float, ...]: ...

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]: ...

    def predict_candidates(
        self, query: Query, candidates: Sequence[Candidate]
    ) -> list[LatencyDist]:
        """``query`` on each placement: a routing decision's forecasts."""
        ...


@dataclass
class Monitor:
    """Sliding-window coverage and pinball of the forecasts made at dispatch."""

    levels: tuple[float, ...]
    size: int
    hits: dict[float, collections.deque[bool]] = field(default_factory=dict)
    residuals: dict[float, collections.deque[float]] = field(default_factory=dict)
    losses: dict[float, collections.deque[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for p in self.levels:
            self.hits[p] = collections.deque(maxlen=self.size)
            self.residuals[p] = collections.deque(maxlen=self.size)
            self.losses[p] = collections.deque(maxlen=self.size)

    def add(self, pred: dict[float, float], actual_s: float) -> None:
        for p in self.levels:
            q = pred.get(p)
            if q is None or q <= 0:
                continue
            self.hits[p].append(actual_s <= q)
            self.residuals[p].append(math.log(max(actual_s, 1e-6)) - math.log(q))
            diff = actual_s - q
            self.losses[p].append(max(p * diff, (p - 1) * diff))

    def calls(self) -> int:
        """Calls in the window (of the level with the most)."""
        return max((len(h) for h in self.hits.values()), default=0)

    def coverage(self) -> dict[float, float]:
        return {p: sum(h) / len(h) for p, h in self.hits.items() if h}

    def pinball(self) -> dict[float, float]:
        return {p: sum(v) / len(v) for p, v in self.losses.items() if v}

    def _estimable(self, p: float, n: int) -> bool:
        """Enough calls in the window to see this level's misses (at least 5 expected)."""
        return n >= self.size and n * min(p, 1 - p) >= 5 - 1e-9

    def drifted(self) -> list[float]:
        """Levels whose coverage is off by more than sampling noise (2 standard errors, at least
        3 points), among those the window can judge."""
        out = []
        for p, h in self.hits.items():
            if not self._estimable(p, len(h)):
                continue
            tol = max(0.03, 2 * math.sqrt(p * (1 - p) / len(h)))
            if abs(sum(h) / len(h) - p) > tol:
                out.append(p)
        return out

    def correction(self, levels: list[float]) -> dict[float, float]:
        """For ``levels``, the log-space shift that would have given nominal coverage in the
        window (the finite-sample conformal quantile of the residuals)."""
        out = {}
        for p in levels:
            ordered = sorted(self.residuals[p])
            if ordered:
                k = min(len(ordered) - 1, max(0, math.ceil(p * (len(ordered) + 1)) - 1))
                out[p] = ordered[k]
        return out

    def clear(self) -> None:
        for table in (self.hits, self.residuals, self.losses):
            for d in table.values():
                d.clear()


def _apply_shift(dist: LatencyDist, shift: dict[float, float]) -> LatencyDist:
    values, floor = [], 0.0
    for p, v in zip(dist.levels, dist.values_s, strict=True):
        floor = max(floor, v * math.exp(shift.get(p, 0.0)))  # stays monotone
        values.append(floor)
    return LatencyDist(dist.levels, tuple(values))


class _Served:
    """A predictor with an online shift applied, as `OnlineLearner.forecast` serves it."""

    def __init__(self, model: Predictor, shift: dict[float, float]) -> None:
        self.model, self.shift = model, shift
        self.version, self.kind = model.version, model.kind

    @property
    def levels(self) -> tuple[float, ...]:
        return self.model.levels

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]:
        return [_apply_shift(d, self.shift) for d in self.model.predict(queries)]

    def predict_candidates(
        self, query: Query, candidates: Sequence[Candidate]
    ) -> list[LatencyDist]:
        dists = self.model.predict_candidates(query, candidates)
        return [_apply_shift(d, self.shift) for d in dists]


def _replay(records: Sequence[TraceRecord], n: int, seed: int) -> list[TraceRecord]:
    """About ``n`` of ``records`` (at least ``n`` where there are that many): whole sessions drawn
    at random, so each call keeps the session context it had; arrival order kept."""
    if len(records) <= n:
        return list(records)
    sizes = collections.Counter(r.session_id for r in records)
    sessions = sorted(sizes)
    random.Random(seed).shuffle(sessions)
    chosen: set[str] = set()
    total = 0
    for s in sessions:
        if total >= n:
            break
        chosen.add(s)
        total += sizes[s]
    return [r for r in records if r.session_id in chosen]


class OnlineLearner:
    def __init__(self, state_dir: Path, cfg: PredictorConfig | None = None) -> None:
        self.cfg = cfg or PredictorConfig()
        self.levels = tuple(self.cfg.levels)
        self.dir = state_dir / "predictors"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fallback = FallbackPredictor(self.levels)
        self.sessions = SessionTracker()
        self.live: Predictor = self.fallback
        self.buffer: collections.deque[TraceRecord] = collections.deque(
            maxlen=self.cfg.buffer_calls
        )
        self.monitor = Monitor(self.levels, self.cfg.window_calls)
        self.shift: dict[float, float] = {}
        self.calls_seen = 0
        self.swaps = 0
        self.refused = 0
        self.last_trained_ts: float | None = None
        self._since_train = 0
        self._last_train_mono = time.monotonic()
        self._hurry = False
        self._regime: int | None = None
        """Calls observed since the current shift was detected; None when there is none (or it
        has filled the buffer, which then holds nothing older)."""
        self._regime_trained = 0
        """``_regime`` when the last training run started."""
        self._lock = threading.Lock()
        self._candidate: tuple[Predictor, float, float] | None = None
        self._thread: threading.Thread | None = None
        self._load_live()

    # --- forecasting ------------------------------------------------------------------------

    def forecast(self, queries: Sequence[Query]) -> list[LatencyDist]:
        return self._shifted(self.live.predict(queries))

    def forecast_candidates(
        self, query: Query, candidates: Sequence[Candidate]
    ) -> list[LatencyDist]:
        """``query`` on each placement, as the live model (and calibration monitor) see it."""
        return self._shifted(self.live.predict_candidates(query, candidates))

    def _shifted(self, dists: list[LatencyDist]) -> list[LatencyDist]:
        return [_apply_shift(d, self.shift) for d in dists] if self.shift else dists

    # --- learning ---------------------------------------------------------------------------

    def observe(self, rec: TraceRecord) -> None:
        """A finished call. Cheap: the heavy work happens on the trainer thread."""
        if not rec.ok or rec.latency_s <= 0:
            return
        self.calls_seen += 1
        self._since_train += 1
        if self._regime is not None:
            self._regime += 1
            if self._regime >= self.cfg.buffer_calls:
                self._regime = None
        self.buffer.append(rec)
        self.fallback.observe(rec)
        self.sessions.observe(rec.session_id, rec.output_tokens, rec.latency_s)
        if rec.pred and rec.predictor == self.live.version:
            pred = {float(k): v for k, v in rec.pred.items()}
            self.monitor.add(pred, rec.latency_s)
            self._track(pred, rec.latency_s)
            if drifted := self.monitor.drifted():
                if self._regime is None:  # a new shift: its calls are the window's
                    self._regime, self._regime_trained = self.monitor.calls(), 0
                correction = self.monitor.correction(drifted)
                self.shift = {p: self.shift.get(p, 0.0) + c for p, c in correction.items()}
                log.warning(
                    "predictor %s: coverage drifted (%s); conformal correction %s, "
                    "retraining sooner",
                    self.live.version,
                    _fmt(self.monitor.coverage()),
                    _fmt(self.shift),
                )
                self.monitor.clear()
                self._hurry = True

    def _track(self, pred: dict[float, float], actual_s: float) -> None:
        """Adaptive conformal inference (Gibbs & Candes, 2021): after every call, move each
        level's log-space shift up by ``gain * level`` on a miss and down by ``gain * (1 - level)``
        on a hit, so long-run coverage converges to the level whatever the shift in traffic."""
        for p, q in pred.items():
            if p in self.levels and q > 0:
                miss = actual_s > q
                self.shift[p] = self.shift.get(p, 0.0) + ACI_GAIN * (miss - (1 - p))

    def _adapting(self) -> bool:
        """Early in a shift: fewer of its calls than the regular retraining cadence, so it retrains
        every ``window_calls`` calls."""
        return self._regime is not None and self._regime < self.cfg.retrain_every_calls

    def due(self) -> bool:
        if self._thread is not None or len(self.buffer) < self.cfg.min_calls_to_train:
            return False
        if self.live is self.fallback or self._hurry:
            return self._since_train >= min(self.cfg.min_calls_to_train, 100) or self._hurry
        regime = self._regime
        if regime is not None and self._adapting():
            return regime >= self._regime_trained + self.cfg.window_calls or self._time_due()
        return self._since_train >= self.cfg.retrain_every_calls or self._time_due()

    def _time_due(self) -> bool:
        return time.monotonic() - self._last_train_mono >= self.cfg.retrain_every_s

    def maybe_retrain(self) -> bool:
        """Start a background training run if one is due; True if started."""
        if not self.due():
            return False
        records = list(self.buffer)
        base = None if self.live is self.fallback else self.live
        recent = len(records) if self._regime is None else min(self._regime, len(records))
        self._regime_trained = self._regime or 0
        self._since_train, self._hurry = 0, False
        self._last_train_mono = time.monotonic()
        self._thread = threading.Thread(
            target=self._train,
            args=(records, base, recent, dict(self.shift)),
            name="swarmx-trainer",
            daemon=True,
        )
        self._thread.start()
        return True

    def wait_training(self, timeout_s: float | None = None) -> None:
        """Block until the running training run (if any) ends: for tests and offline replays."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def poll(self) -> bool:
        """Install a finished candidate if it beat the live model; True on a swap."""
        with self._lock:
            found, self._candidate = self._candidate, None
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
        if found is None:
            return False
        candidate, cand_loss, live_loss = found
        self.last_trained_ts = time.time()
        if cand_loss >= live_loss:
            self.refused += 1
            log.info(
                "predictor candidate %s refused: held-out pinball %.4f >= live %.4f",
                candidate.version,
                cand_loss,
                live_loss,
            )
            return False
        self._install(candidate)
        log.info(
            "predictor %s is live (held-out pinball %.4f < %.4f)",
            candidate.version,
            cand_loss,
            live_loss,
        )
        return True

    def _install(self, candidate: Predictor) -> None:
        self.live = candidate
        self.swaps += 1
        self.shift = {}
        self.monitor.clear()
        self._save(candidate)

    def _train(
        self,
        records: list[TraceRecord],
        base: Predictor | None,
        recent: int,
        live_shift: dict[float, float],
    ) -> None:
        """Train a candidate on ``records`` (the buffer, oldest first) and judge it on the newest
        ``holdout_frac`` of the ``recent`` calls (those of the current shift, if any)."""
        from swarmx.models.predictor import QuantilePredictor
        from swarmx.models.train import FeatureConfig, fine_tune, train

        try:
            cut = len(records) - recent + int(recent * (1 - self.cfg.holdout_frac))
            qs = queries(records)  # session contexts from the whole buffer
            held_q, held_s = qs[cut:], [r.latency_s for r in records[cut:]]
            older = len(records) - recent
            fresh = records[older:cut]
            if isinstance(base, QuantilePredictor) and older > 0 and fresh:
                # A shift: fit its calls and as many older ones; calibrate on its newest.
                split = older + max(1, int(len(fresh) * (1 - SHIFT_CAL_FRAC)))
                fit = _replay(records[:older], split - older, self.calls_seen)
                fit += records[older:split]
                cand: QuantilePredictor = fine_tune(
                    base, fit, epochs=self.cfg.fine_tune_epochs, cal_frac=0.0
                )
                if split < cut:
                    cand.calibrate(qs[split:cut], [r.latency_s for r in records[split:cut]])
            elif isinstance(base, QuantilePredictor):
                cand = fine_tune(base, records[:cut], epochs=self.cfg.fine_tune_epochs)
            else:
                cand, _ = train(records[:cut], FeatureConfig(levels=self.levels))
            digest = cand.version.removeprefix("q-")[:6]
            cand.version = f"v{int(time.time())}-{len(records)}-{digest}"
            live = _Served(base if base is not None else self.fallback, live_shift)
            c_loss = held_out_pinball(cand, held_q, held_s)
            l_loss = held_out_pinball(live, held_q, held_s)
        except Exception:  # a failed training run must never take the scheduler down
            log.exception("predictor training failed")
            return
        with self._lock:
            self._candidate = (cand, c_loss, l_loss)

    # --- persistence ------------------------------------------------------------------------

    def _save(self, model: Predictor) -> None:
        from swarmx.models.predictor import QuantilePredictor

        if not isinstance(model, QuantilePredictor):
            return
        path = self.dir / f"{model.version}.pt"
        model.save(path)
        tmp = self.dir / "live.json.tmp"
        tmp.write_text(json.dumps({"version": model.version, "file": path.name}))
        tmp.replace(self.dir / "live.json")
        versions = sorted(self.dir.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        for old in versions[: -self.cfg.keep_versions]:
            if old != path:
                old.unlink()

    def _load_live(self) -> None:
        pointer = self.dir / "live.json"
        if not pointer.exists():
            return
        from swarmx.models.predictor import QuantilePredictor

        try:
            name = json.loads(pointer.read_text())["file"]
            self.live = QuantilePredictor.load(self.dir / name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.error(
                "cannot load the live predictor from %s (%s); using the fallback", pointer, exc
            )
            return
        log.info("predictor %s loaded from %s", self.live.version, self.dir)

    def install(self, path: Path) -> str:
        """Make a trained model file live (e.g. one from `swarmx predictor train`); its version."""
        return self.install_model(load_model(path))

    def install_model(self, model: Predictor) -> str:
        """Make a loaded model live (the daemon loads it off its event loop first)."""
        if tuple(model.levels) != self.levels:
            raise ValueError(f"model forecasts levels {model.levels}, the scheduler {self.levels}")
        self._install(model)
        return model.version

    def status(self) -> dict[str, object]:
        return {
            "version": self.live.version,
            "kind": self.live.kind,
            "levels": list(self.levels),
            "calls_seen": self.calls_seen,
            "buffer_calls": len(self.buffer),
            "recent_coverage": {f"{p:g}": v for p, v in self.monitor.coverage().items()},
            "recent_pinball_s": {f"{p:g}": v for p, v in self.monitor.pinball().items()},
            "online_shift": {f"{p:g}": v for p, v in self.shift.items()},
            "training": self._thread is not None,
            "swaps": self.swaps,
            "refused_swaps": self.refused,
            "last_trained_ts": self.last_trained_ts,
        }


def load_model(path: Path) -> Predictor:
    """A model file as saved by `swarmx predictor train` (reading it imports torch)."""
    from swarmx.models.predictor import QuantilePredictor

    return QuantilePredictor.load(path)


def held_out_pinball(model: Predictor, qs: Sequence[Query], actual_s: Sequence[float]) -> float:
    """Mean pinball loss (seconds) over all levels."""
    if not qs:
        return math.inf
    dists = model.predict(qs)
    total = 0.0
    for d, y in zip(dists, actual_s, strict=True):
        for p, q in zip(d.levels, d.values_s, strict=True):
            total += max(p * (y - q), (p - 1) * (y - q))
    return total / (len(qs) * len(dists[0].levels))


def _fmt(values: dict[float, float]) -> str:
    return ", ".join(f"{p:g}: {v:.3f}" for p, v in values.items())
