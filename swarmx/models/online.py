"""Online adaptation inside the scheduler: forecast at dispatch, learn from every result.

- Every finished call feeds a replay buffer, the session tracker and the cold-start fallback.
- A trainer process retrains (by call count and by time, sooner when calibration drifts):
  fine-tunes a copy of the live model on the buffer, or trains the first one once enough calls
  have been seen. Routing never waits for it, and the scheduler's event loop never stalls on
  it: torch holds the GIL for seconds at a time, so training runs in its own process (a fresh
  interpreter, never a fork of one with threads), handed the records through a file that a
  thread writes a chunk at a time; `OnlineLearner.poll` only looks whether the process has
  ended, and a thread loads the model it saved.
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
  A training round works in ``<state_dir>/predictors/training/``.

About 800 lines: the learner and the trainer process it starts share one protocol (the job file,
the result file, the candidate it loads) and this module names the trainer's entry point
(`TRAINER`), so the two halves change together.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import math
import operator
import os
import pickle
import random
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

import msgspec

from swarmx import stats
from swarmx.config import PredictorConfig
from swarmx.models.baselines import FallbackPredictor
from swarmx.models.dist import LatencyDist, trusted_dists
from swarmx.models.query import Candidate, Query, SessionTracker, queries
from swarmx.traces import TraceRecord

if TYPE_CHECKING:
    from swarmx.models.predictor import Prepared, QuantilePredictor

log = logging.getLogger(__name__)


ACI_GAIN = 0.02
"""Log-space step of the per-call coverage tracking: a miss at p=0.99 widens that quantile by 2%."""
MAX_SHIFT = math.log(10.0)
"""The most the online correction moves a quantile, either way (10x): past that the model is
wrong, not off, and retraining is the remedy; an unbounded correction swung by e^22."""
GROUPS_REMEMBERED = 4096
"""Recent evidence groups (`evidence_group`) whose calls are counted."""


def evidence_group(rec: TraceRecord) -> str:
    """The unit of evidence a call belongs to: the instances of one fan-out step (same workflow
    and step) ran together on the same inputs, so their misses are one event, not hundreds;
    any other call is its own."""
    if rec.index is not None:
        return f"{rec.workflow}\x00{rec.step}"
    return rec.call_id or f"{rec.workflow}\x00{rec.step}\x00{rec.ts}"


SHIFT_CAL_FRAC = 0.25
"""After a shift, the newest share of its calls (before the held-out ones) that recalibrates a
candidate instead of training it: the newest, as the traffic may still be moving."""

JOB_CHUNK = 500
"""Records encoded at a time into a training job's file: about a millisecond each, so the
thread writing it never holds the GIL (and the event loop) for long."""
TRAINER_NICE = 10
"""The trainer process's niceness: on a busy host the scheduler comes first."""
STOP_GRACE_S = 5.0
"""How long a trainer told to stop (SIGTERM) has before it is killed."""
JOB_FILE, RESULT_FILE, CANDIDATE_FILE = "job.bin", "result.json", "candidate.pt"
"""In the training directory: what the trainer is given, what it says, what it trained."""
TRAINER = "swarmx.models.online:_trainer_main"
"""The trainer process's entry point (``module:function``, given the training directory)."""
_BOOT = (
    "import importlib, json, sys; sys.path[:] = json.loads(sys.argv[3]); "
    "module, _, name = sys.argv[2].partition(':'); "
    "getattr(importlib.import_module(module), name)(sys.argv[1])"
)
"""What the trainer's interpreter runs: the parent's import path, then `TRAINER`. Not
multiprocessing's spawn, which imports the parent's ``__main__`` again in the child."""


class Predictor(Protocol):
    version: str
    kind: str

    @property
    def levels(self) -> tuple[float, ...]: ...

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]: ...

    def predict_candidates(
        self,
        query: Query,
        candidates: Sequence[Candidate],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        """``query`` on each placement, holding ``cached_tokens`` of its prompt there: a
        routing decision's forecasts."""
        ...


@dataclass
class Monitor:
    """Sliding-window coverage and pinball of the forecasts made at dispatch."""

    levels: tuple[float, ...]
    size: int
    hits: dict[float, collections.deque[bool]] = field(default_factory=dict)
    residuals: dict[float, collections.deque[float]] = field(default_factory=dict)
    losses: dict[float, collections.deque[float]] = field(default_factory=dict)
    groups: dict[float, collections.deque[str]] = field(default_factory=dict)
    """Each call's evidence group (`evidence_group`), aligned with ``hits``."""
    _seq: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        for p in self.levels:
            self.hits[p] = collections.deque(maxlen=self.size)
            self.residuals[p] = collections.deque(maxlen=self.size)
            self.losses[p] = collections.deque(maxlen=self.size)
            self.groups[p] = collections.deque(maxlen=self.size)

    def add(self, pred: dict[float, float], actual_s: float, group: str = "") -> None:
        """One call's forecast and outcome; ``group``: its evidence group (default: its own)."""
        group = group or f"#{next(self._seq)}"
        for p in self.levels:
            q = pred.get(p)
            if q is None or q <= 0:
                continue
            self.hits[p].append(actual_s <= q)
            self.residuals[p].append(math.log(max(actual_s, 1e-6)) - math.log(q))
            self.losses[p].append(stats.pinball(actual_s, q, p))
            self.groups[p].append(group)

    def calls(self) -> int:
        """Calls in the window (of the level with the most)."""
        return max((len(h) for h in self.hits.values()), default=0)

    def coverage(self) -> dict[float, float]:
        return {p: sum(h) / len(h) for p, h in self.hits.items() if h}

    def pinball(self) -> dict[float, float]:
        return {p: sum(v) / len(v) for p, v in self.losses.items() if v}

    def _estimable(self, p: float, n: int) -> bool:
        """Enough independent evidence in the window to see this level's misses (at least 5
        expected); ``n``: its evidence groups."""
        return len(self.hits[p]) >= self.size and n * min(p, 1 - p) >= 5 - 1e-9

    def drifted(self) -> list[float]:
        """Levels whose coverage is off by more than sampling noise (2 standard errors, at least
        3 points), among those the window can judge. The noise is that of the window's evidence
        groups, not its calls: a fan-out of 256 calls that all missed together is one event,
        and no more than sampling noise on its own."""
        out = []
        for p, h in self.hits.items():
            n = len(set(self.groups[p]))
            if not self._estimable(p, n):
                continue
            tol = max(0.03, 2 * math.sqrt(p * (1 - p) / n))
            if abs(sum(h) / len(h) - p) > tol:
                out.append(p)
        return out

    def correction(self, levels: list[float]) -> dict[float, float]:
        """For ``levels``, the log-space shift that would have given nominal coverage in the
        window: the finite-sample conformal quantile of the residuals, one per evidence group
        (its median), so a burst weighs as one call."""
        out = {}
        for p in levels:
            by_group: dict[str, list[float]] = {}
            for g, r in zip(self.groups[p], self.residuals[p], strict=True):
                by_group.setdefault(g, []).append(r)
            if by_group:
                medians = sorted(stats.quantile(sorted(rs), 0.5) for rs in by_group.values())
                out[p] = stats.conformal_quantile(medians, p)
        return out

    def clear(self) -> None:
        for table in (self.hits, self.residuals, self.losses, self.groups):
            for d in table.values():
                d.clear()


def _bounded(shift: float) -> float:
    return max(-MAX_SHIFT, min(MAX_SHIFT, shift))


def _apply_shift(dists: list[LatencyDist], shift: dict[float, float]) -> list[LatencyDist]:
    """``dists`` with each level's log-space ``shift``, kept monotone by a running max. On the
    routing path this runs for every candidate of every call: the factors are worked out once
    per level grid, and the results built without re-checking their order."""
    out: list[LatencyDist] = []
    for levels, group in itertools.groupby(dists, key=lambda d: d.levels):
        factors = [math.exp(shift.get(p, 0.0)) for p in levels]
        rows = [
            list(itertools.accumulate(map(operator.mul, d.values_s, factors), max)) for d in group
        ]
        out.extend(trusted_dists(levels, rows))
    return out


class _Served:
    """A predictor with an online shift applied, as `OnlineLearner.forecast` serves it."""

    def __init__(self, model: Predictor, shift: dict[float, float]) -> None:
        self.model, self.shift = model, shift
        self.version, self.kind = model.version, model.kind

    @property
    def levels(self) -> tuple[float, ...]:
        return self.model.levels

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]:
        return _apply_shift(self.model.predict(queries), self.shift)

    def predict_candidates(
        self,
        query: Query,
        candidates: Sequence[Candidate],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        dists = self.model.predict_candidates(query, candidates, cached_tokens)
        return _apply_shift(dists, self.shift)


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
        self._group_calls: dict[str, int] = {}
        """Calls seen per recent evidence group, oldest group first (`_track`)."""
        self.shift: dict[float, float] = {}
        self.calls_seen = 0
        self.swaps = 0
        self.refused = 0
        self.last_trained_ts: float | None = None
        self._since_train = 0
        self._last_train_mono = time.monotonic()
        self._hurry = False
        self._hurried = 0
        """Rounds brought forward by drift since calibration last held for a whole window: each
        one doubles the calls the next must wait (`_hurry_gap`)."""
        self._quiet = 0
        """Calls observed since coverage last drifted."""
        self._rest_until = 0.0
        """Monotonic time before which no round starts (`PredictorConfig.trainer_duty`)."""
        self._regime: int | None = None
        """Calls observed since the current shift was detected; None when there is none (or it
        has filled the buffer, which then holds nothing older)."""
        self._regime_trained = 0
        """``_regime`` when the last training run started."""
        self.last_error: str | None = None
        """Why the last training round failed (None if it did not)."""
        self._work = self.dir / "training"
        self._live_file: Path | None = None
        """The live model's file: what a trainer process fine-tunes."""
        self._round: _Round | None = None
        self._loading: _Loading | None = None
        self._load_live()

    # --- forecasting ------------------------------------------------------------------------

    def forecast(self, queries: Sequence[Query]) -> list[LatencyDist]:
        return self._shifted(self.live.predict(queries))

    def forecast_candidates(
        self,
        query: Query,
        candidates: Sequence[Candidate],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        """``query`` on each placement, as the live model (and calibration monitor) see it."""
        return self._shifted(self.live.predict_candidates(query, candidates, cached_tokens))

    def prepare(self, queries: Sequence[Query]) -> list[Prepared] | None:
        """The live model's `QuantilePredictor.prepare` of calls about to be routed; None
        where the live model works nothing out ahead (a baseline, the cold-start fallback)."""
        prepare = getattr(self.live, "prepare", None)
        return prepare(queries) if prepare is not None else None

    def forecast_prepared(
        self,
        prepared: Prepared,
        candidates: Sequence[Candidate],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        """`forecast_candidates` of a call `prepare` worked out (from its query where the
        live model since swapped for one that does not prepare)."""
        predict = getattr(self.live, "predict_prepared", None)
        if predict is None:
            return self.forecast_candidates(prepared.query, candidates, cached_tokens)
        dists: list[LatencyDist] = predict(prepared, candidates, cached_tokens)
        return self._shifted(dists)

    def _shifted(self, dists: list[LatencyDist]) -> list[LatencyDist]:
        return _apply_shift(dists, self.shift) if self.shift else dists

    # --- learning ---------------------------------------------------------------------------

    def observe(self, rec: TraceRecord) -> None:
        """A finished call. Cheap: the heavy work happens in the trainer process."""
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
        self.sessions.observe_record(rec)
        if rec.pred and rec.predictor == self.live.version:
            pred = {float(k): v for k, v in rec.pred.items()}
            group = evidence_group(rec)
            self.monitor.add(pred, rec.latency_s, group)
            self._track(pred, rec.latency_s, group)
            drifted = self.monitor.drifted()
            self._quiet = 0 if drifted else self._quiet + 1
            if self._quiet >= self.cfg.window_calls:  # calibration held for a whole window:
                self._hurry, self._hurried = False, 0  # the correction did; drift may hurry again
            if drifted:
                if self._regime is None:  # a new shift: its calls are the window's
                    self._regime, self._regime_trained = self.monitor.calls(), 0
                correction = self.monitor.correction(drifted)
                self.shift = {
                    p: _bounded(self.shift.get(p, 0.0) + c) for p, c in correction.items()
                }
                log.warning(
                    "predictor %s: coverage drifted (%s); conformal correction %s, "
                    "retraining sooner",
                    self.live.version,
                    _fmt(self.monitor.coverage()),
                    _fmt(self.shift),
                )
                self.monitor.clear()
                self._hurry = True

    def _track(self, pred: dict[float, float], actual_s: float, group: str = "") -> None:
        """Adaptive conformal inference (Gibbs & Candes, 2021): after every call, move each
        level's log-space shift up by ``gain * level`` on a miss and down by ``gain * (1 - level)``
        on a hit, so long-run coverage converges to the level whatever the shift in traffic.
        The k-th call of an evidence group moves it 1/k as far (a fan-out of n weighs about
        ln n calls), and the shift stays within `MAX_SHIFT`."""
        weight = 1.0
        if group:
            seen = self._group_calls.pop(group, 0) + 1
            self._group_calls[group] = seen
            if len(self._group_calls) > GROUPS_REMEMBERED:
                del self._group_calls[next(iter(self._group_calls))]
            weight = 1.0 / seen
        for p, q in pred.items():
            if p in self.levels and q > 0:
                miss = actual_s > q
                step = weight * ACI_GAIN * (miss - (1 - p))
                self.shift[p] = _bounded(self.shift.get(p, 0.0) + step)

    def _adapting(self) -> bool:
        """Early in a shift: fewer of its calls than the regular retraining cadence, so it retrains
        every ``window_calls`` calls."""
        return self._regime is not None and self._regime < self.cfg.retrain_every_calls

    def due(self) -> bool:
        if self.training or len(self.buffer) < self.cfg.min_calls_to_train:
            return False
        if time.monotonic() < self._rest_until:
            return False
        if self._hurry and self._since_train >= self._hurry_gap():
            return True
        if self.live is self.fallback:
            return self._since_train >= min(self.cfg.min_calls_to_train, 100)
        regime = self._regime
        if regime is not None and self._adapting():
            return regime >= self._regime_trained + self.cfg.window_calls or self._time_due()
        return self._since_train >= self.cfg.retrain_every_calls or self._time_due()

    def _hurry_gap(self) -> int:
        """Calls a drift-hurried round waits for since the last round: none the first time;
        then, while drift keeps coming back though rounds keep running (traffic no model
        calibrates, such as lockstep bursts), twice as many each time, up to the regular
        ``retrain_every_calls``, so a trainer that cannot fix it stops running flat out."""
        if self._hurried == 0:
            return 0
        return min(self.cfg.window_calls << self._hurried, self.cfg.retrain_every_calls)

    def _time_due(self) -> bool:
        return time.monotonic() - self._last_train_mono >= self.cfg.retrain_every_s

    @property
    def training(self) -> bool:
        """A round is under way: its trainer running, or its candidate loading."""
        return self._round is not None or self._loading is not None

    def take_job(self) -> tuple[TrainJob, list[TraceRecord]] | None:
        """The training round that is due, with its bookkeeping done (None if none is):
        `maybe_retrain` runs it in a trainer process; a test may run it here (`train_round`)."""
        if not self.due():
            return None
        records = list(self.buffer)
        recent = len(records) if self._regime is None else min(self._regime, len(records))
        self._regime_trained = self._regime or 0
        if self._hurry:
            self._hurried += 1
        self._since_train, self._hurry = 0, False
        self._last_train_mono = time.monotonic()
        base = None if self.live is self.fallback else self._live_file
        job = TrainJob(
            recent=recent,
            live_shift=dict(self.shift),
            base_file=None if base is None else str(base),
            fallback=pickle.dumps(self.fallback),
            levels=list(self.levels),
            holdout_frac=self.cfg.holdout_frac,
            fine_tune_epochs=self.cfg.fine_tune_epochs,
            seed=self.calls_seen,
        )
        return job, records

    def maybe_retrain(self) -> bool:
        """Start a training round in a trainer process if one is due; True if started. Costs
        the event loop a copy of the buffer's list: the rest happens on a thread and there."""
        taken = self.take_job()
        if taken is None:
            return False
        self._round = _Round(self._work, *taken)
        return True

    def wait_training(self, timeout_s: float | None = None) -> None:
        """Block until the round under way (if any) has ended and its candidate, if it won,
        is loaded; the next `poll` installs it. For tests and offline replays."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        run = self._round
        if run is not None:
            run.wait(timeout_s)
            if not run.done():
                return
            self._round = None
            self._collect(run)
        if self._loading is not None:
            self._loading.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def poll(self) -> bool:
        """Never waits (the scheduler calls it from its event loop): takes a finished round's
        result, and installs the candidate once a thread has loaded it. True on a swap."""
        run = self._round
        if run is not None and run.done():
            self._round = None
            self._collect(run)
        loading = self._loading
        if loading is None or not loading.done():
            return False
        self._loading = None
        if loading.model is None:
            self._failed(f"cannot load the trained model {loading.path}: {loading.error}")
            loading.path.unlink(missing_ok=True)
            return False
        self._install(loading.model, loading.path)
        log.info(
            "predictor %s is live (held-out pinball %.4f < %.4f)",
            loading.model.version,
            loading.cand_loss,
            loading.live_loss,
        )
        return True

    def close(self) -> None:
        """Stop the round under way, its trainer process included (the scheduler calls this
        as it stops, so no trainer outlives it). Idempotent."""
        run, loading, self._round, self._loading = self._round, self._loading, None, None
        if run is not None:
            run.stop()
            log.info("predictor training stopped")
        if loading is not None:  # a thread still in torch's C++ when the interpreter ends aborts
            loading.wait(LOAD_WAIT_S)

    def _collect(self, run: _Round) -> None:
        """A round ended: a candidate that beat the live model is loaded (a thread reads its
        file; `poll` installs it), a worse one dropped, a failure logged for `status`."""
        took_s = time.monotonic() - self._last_train_mono
        self._rest_until = time.monotonic() + took_s * (1 / self.cfg.trainer_duty - 1)
        result = run.result()
        if isinstance(result, str):
            run.clear()
            self._failed(result)
            return
        version, cand_loss, live_loss = result
        self.last_trained_ts = time.time()
        self.last_error = None
        if cand_loss >= live_loss:
            self.refused += 1
            log.info(
                "predictor candidate %s refused: held-out pinball %.4f >= live %.4f",
                version,
                cand_loss,
                live_loss,
            )
            run.clear()
            return
        path = self.dir / f"{version}.pt"
        try:
            (run.work / CANDIDATE_FILE).replace(path)
        except OSError as exc:
            self._failed(f"cannot keep the trained model: {exc}")
            return
        finally:
            run.clear()
        self._loading = _Loading(path, cand_loss, live_loss)

    def _failed(self, error: str) -> None:
        """A round that gave nothing: the next is due on the usual schedule."""
        self.last_error = error
        log.error("predictor training failed: %s", error)

    def _install(self, candidate: Predictor, path: Path | None = None) -> None:
        """Make ``candidate`` live; ``path``, its file if already saved there."""
        self.live, self._live_file = candidate, None
        self.swaps += 1
        self.shift = {}
        self.monitor.clear()
        if path is None:
            self._save(candidate)
        else:
            self._point(path)

    # --- persistence ------------------------------------------------------------------------

    def _save(self, model: Predictor) -> None:
        path = self.stage(model)
        if path is not None:
            self._point(path)

    def stage(self, model: Predictor) -> Path | None:
        """Write a model's file into the predictor directory, not yet live (blocking: torch
        writes it, a second or more, so the daemon calls this off its event loop); its path,
        None for a model with no file (the fallback)."""
        from swarmx.models.predictor import QuantilePredictor

        if not isinstance(model, QuantilePredictor):
            return None
        path = self.dir / f"{model.version}.pt"
        model.save(path)
        return path

    def _point(self, path: Path) -> None:
        """``path`` is the live model's file (after a restart too); old versions go."""
        self._live_file = path
        tmp = self.dir / "live.json.tmp"
        tmp.write_text(json.dumps({"version": path.stem, "file": path.name}))
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
            path = self.dir / json.loads(pointer.read_text())["file"]
            self.live = QuantilePredictor.load(path)
            self._live_file = path
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.error(
                "cannot load the live predictor from %s (%s); using the fallback", pointer, exc
            )
            return
        log.info("predictor %s loaded from %s", self.live.version, self.dir)

    def install(self, path: Path) -> str:
        """Make a trained model file live (e.g. one from `swarmx predictor train`); its version."""
        return self.install_model(load_model(path))

    def install_model(self, model: Predictor, staged: Path | None = None) -> str:
        """Make a loaded model live (the daemon loads it off its event loop first, and writes
        its file there too: ``staged``, from `stage`; without it the file is written here)."""
        self.check(model)
        self._install(model, staged)
        return model.version

    def check(self, model: Predictor) -> None:
        """Raises ValueError for a model this scheduler cannot serve (other quantile levels)."""
        if tuple(model.levels) != self.levels:
            raise ValueError(f"model forecasts levels {model.levels}, the scheduler {self.levels}")

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
            "training": self.training,
            "swaps": self.swaps,
            "refused_swaps": self.refused,
            "last_trained_ts": self.last_trained_ts,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class TrainJob:
    """What a training round needs besides the records, as the trainer process gets it."""

    recent: int
    """The newest calls that judge (and, after a shift, train) the candidate."""
    live_shift: dict[float, float]
    """The online shift the live model is served with (it is judged as served)."""
    base_file: str | None
    """The live model's file, fine-tuned; None to train the first model."""
    fallback: bytes
    """The fallback predictor as it stood (pickled): the live model judged when none is."""
    levels: list[float]
    holdout_frac: float
    fine_tune_epochs: int
    seed: int


def train_round(
    job: TrainJob,
    records: list[TraceRecord],
    base: Predictor | None,
    fallback: Predictor,
) -> tuple[QuantilePredictor, float, float]:
    """A candidate trained on ``records`` (the buffer, oldest first), with its held-out pinball
    and the live model's (``base``, or ``fallback`` when None, as served) on the newest
    ``holdout_frac`` of the ``recent`` calls (those of the current shift, if any)."""
    from swarmx.models.features import FeatureConfig
    from swarmx.models.predictor import QuantilePredictor
    from swarmx.models.train import fine_tune, train

    recent = job.recent
    cut = len(records) - recent + int(recent * (1 - job.holdout_frac))
    qs = queries(records)  # session contexts from the whole buffer
    held_q, held_s = qs[cut:], [r.latency_s for r in records[cut:]]
    older = len(records) - recent
    fresh = records[older:cut]
    if isinstance(base, QuantilePredictor) and older > 0 and fresh:
        # A shift: fit its calls and as many older ones; calibrate on its newest.
        split = older + max(1, int(len(fresh) * (1 - SHIFT_CAL_FRAC)))
        fit = _replay(records[:older], split - older, job.seed)
        fit += records[older:split]
        cand: QuantilePredictor = fine_tune(base, fit, epochs=job.fine_tune_epochs, cal_frac=0.0)
        if split < cut:
            cand.calibrate(qs[split:cut], [r.latency_s for r in records[split:cut]])
    elif isinstance(base, QuantilePredictor):
        cand = fine_tune(base, records[:cut], epochs=job.fine_tune_epochs)
    else:
        cand, _ = train(records[:cut], FeatureConfig(levels=tuple(job.levels)))
    digest = cand.version.removeprefix("q-")[:6]
    cand.version = f"v{int(time.time())}-{len(records)}-{digest}"
    live = _Served(base if base is not None else fallback, job.live_shift)
    return cand, held_out_pinball(cand, held_q, held_s), held_out_pinball(live, held_q, held_s)


def _write_job(
    path: Path, job: TrainJob, records: list[TraceRecord], stop: threading.Event
) -> None:
    """The job, then the records `JOB_CHUNK` at a time, each a length-prefixed msgpack frame."""
    enc = msgspec.msgpack.Encoder()
    with path.open("wb") as f:
        _frame(f, enc.encode(job))
        for i in range(0, len(records), JOB_CHUNK):
            if stop.is_set():
                return
            _frame(f, enc.encode(records[i : i + JOB_CHUNK]))


def _frame(f: IO[bytes], data: bytes) -> None:
    f.write(len(data).to_bytes(8, "little"))
    f.write(data)


def _read_job(path: Path) -> tuple[TrainJob, list[TraceRecord]]:
    data = memoryview(path.read_bytes())
    frames, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 8], "little")
        frames.append(data[pos + 8 : pos + 8 + n])
        pos += 8 + n
    job = msgspec.msgpack.decode(frames[0], type=TrainJob)
    chunk = msgspec.msgpack.Decoder(list[TraceRecord])
    return job, [r for f in frames[1:] for r in chunk.decode(f)]


def _trainer_main(work: str) -> None:
    """The trainer process: train on the job in ``work``, save the candidate there and write
    the result (or the error) beside it. It stops by itself if the scheduler dies."""
    os.nice(TRAINER_NICE)
    # as in the scheduler's own tests: SwarmX never hands tensors to numpy, absent or not
    warnings.filterwarnings("ignore", "Failed to initialize NumPy", UserWarning)
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    out = Path(work)
    try:
        job, records = _read_job(out / JOB_FILE)
        base = load_model(Path(job.base_file)) if job.base_file else None
        fallback: Predictor = pickle.loads(job.fallback)
        cand, cand_loss, live_loss = train_round(job, records, base, fallback)
        cand.save(out / CANDIDATE_FILE)
        result: dict[str, object] = {
            "version": cand.version,
            "candidate_loss": cand_loss,
            "live_loss": live_loss,
        }
    except Exception:  # the process boundary: whatever went wrong, the scheduler is told why
        result = {"error": traceback.format_exc()}
    tmp = out / f"{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(out / RESULT_FILE)
    if "error" in result:
        raise SystemExit(1)


def _exit_with(parent: int) -> None:
    """A trainer whose scheduler is gone (killed without a chance to stop it) stops too."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(3)


class _Round:
    """One training round: a thread writes the job file and starts the trainer process; the
    event loop only asks whether it has ended, never waits for it."""

    def __init__(self, work: Path, job: TrainJob, records: list[TraceRecord]) -> None:
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        """Why the trainer could not be started."""
        self._stop = threading.Event()
        self._starter = threading.Thread(
            target=self._start, args=(job, records), name="swarmx-trainer-start", daemon=True
        )
        self._starter.start()

    def _start(self, job: TrainJob, records: list[TraceRecord]) -> None:
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            self.clear()
            _write_job(self.work / JOB_FILE, job, records, self._stop)
            if self._stop.is_set():
                return
            argv = [sys.executable, "-c", _BOOT, str(self.work), TRAINER, json.dumps(sys.path)]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        except Exception as exc:  # a thread's boundary: the round fails and says why
            log.exception("cannot start the predictor trainer")
            self.error = f"cannot start the trainer: {exc!r}"

    def done(self) -> bool:
        """Without waiting: the trainer has exited (or never started)."""
        if self._starter.is_alive():
            return False
        return self.proc is None or self.proc.poll() is not None

    def wait(self, timeout_s: float | None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._starter.join(timeout_s)
        if self.proc is not None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(left)

    def result(self) -> tuple[str, float, float] | str:
        """(candidate version, its held-out pinball, the live model's), or what went wrong."""
        if self.error is not None:
            return self.error
        if self.proc is None:
            return "the trainer did not start"
        code = self.proc.returncode
        try:
            out = json.loads((self.work / RESULT_FILE).read_text())
        except (OSError, ValueError):
            return f"the trainer exited with code {code}, leaving no result"
        if "error" in out:
            return f"the trainer exited with code {code}: {out['error']}"
        return str(out["version"]), float(out["candidate_loss"]), float(out["live_loss"])

    def stop(self) -> None:
        """Stop the trainer, waiting for it (`STOP_GRACE_S`, then killed)."""
        self._stop.set()
        self._starter.join()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.clear()

    def clear(self) -> None:
        """Remove the round's files (the job's records are the large one)."""
        for name in (JOB_FILE, RESULT_FILE, CANDIDATE_FILE):
            (self.work / name).unlink(missing_ok=True)


LOAD_WAIT_S = 60.0
"""How long `OnlineLearner.close` waits for a model file being read (with torch) to be read."""


class _Loading:
    """A trained model's file read on a thread: loading takes long enough (and importing torch,
    the first time, far longer) that the event loop must not do it."""

    def __init__(self, path: Path, cand_loss: float, live_loss: float) -> None:
        self.path, self.cand_loss, self.live_loss = path, cand_loss, live_loss
        self.model: Predictor | None = None
        self.error = "the loader stopped"
        self._thread = threading.Thread(target=self._load, name="swarmx-model-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self.model = load_model(self.path)
        except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
            self.error = str(exc)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout_s: float | None) -> None:
        self._thread.join(timeout_s)


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
            total += stats.pinball(y, q, p)
    return total / (len(qs) * len(dists[0].levels))


def _fmt(values: dict[float, float]) -> str:
    return ", ".join(f"{p:g}: {v:.3f}" for p, v in values.items())
