"""The scheduler's online learner, without the scheduler: feed it calls, check what it does."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from swarmx.config import PredictorConfig
from swarmx.models import online
from swarmx.models.dist import LatencyDist
from swarmx.models.online import Monitor, OnlineLearner, held_out_pinball, train_round
from swarmx.models.query import Query
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord

LEVELS = (0.5, 0.9)
HERE = "tests.unit.models.test_online"


# Trainer entry points for `online.TRAINER`: they run in the trainer process, which imports
# this module again (a monkeypatch in the test's own process does not reach it).


def _stuck_trainer(work: str) -> None:
    """A trainer that does not finish."""
    time.sleep(60)


def _failing_trainer(work: str) -> None:
    """The real trainer, whose training raises."""

    def boom(*args: object) -> None:
        raise RuntimeError("boom")

    online.train_round = boom  # type: ignore[assignment]
    online._trainer_main(work)


def _twenty_times_too_slow(model, recs, **kw):
    worse = model.copy()
    worse.set_online_shift({p: math.log(20) for p in LEVELS})
    return worse


def _worse_trainer(work: str) -> None:
    """The real trainer, whose fine-tune makes a candidate 20x too slow."""
    import swarmx.models.train as train_mod

    train_mod.fine_tune = _twenty_times_too_slow
    online._trainer_main(work)


def _started(learner: OnlineLearner) -> subprocess.Popen[bytes]:
    """The trainer process of the round under way, once its job is written."""
    deadline = time.monotonic() + 30
    while (run := learner._round) is not None and run.proc is None:
        assert time.monotonic() < deadline, "no trainer started"
        time.sleep(0.01)
    assert run is not None and run.proc is not None
    return run.proc


def record(
    i: int,
    latency_s: float,
    pred: dict[str, float] | None = None,
    version: str = "",
    model: str = "lm",
) -> TraceRecord:
    return TraceRecord(
        ts=float(i),
        workflow=f"wf-{i // 4}",
        step="s",
        deps=[],
        kind="llm",
        model=model,
        prompt=f"prompt {i % 7}",
        prompt_tokens=10 + i % 7,
        max_tokens=64,
        output_tokens=20,
        latency_s=latency_s,
        queue_s=0.0,
        ttft_s=None,
        node="n",
        replica="n/lm#0",
        device=DeviceAtDispatch("cpu", 0.0, 0.0, 0.1),
        runtime=RuntimeAtDispatch(0, 0),
        pred=pred,
        predictor=version,
    )


def test_monitor_detects_drift_and_proposes_the_correction():
    m = Monitor(LEVELS, size=100)
    rng = random.Random(0)
    for _ in range(100):  # forecasts half of what really happens: coverage collapses
        actual = math.exp(rng.gauss(0, 0.3))
        m.add({0.5: actual / 2 * math.exp(rng.gauss(0, 0.01)), 0.9: actual / 2}, actual)
    assert m.coverage()[0.9] < 0.1
    assert m.drifted() == [0.5, 0.9]
    shift = m.correction([0.9])
    assert math.log(2) - 0.05 < shift[0.9] < math.log(2) + 0.1


def test_monitor_does_not_judge_tails_it_cannot_see():
    m = Monitor((0.5, 0.99), size=100)  # 100 calls: one expected miss at 0.99, too few to judge
    for _ in range(100):
        m.add({0.5: 1.0, 0.99: 1.0}, 2.0)
    assert m.drifted() == [0.5]


def test_monitor_is_quiet_when_calibrated():
    m = Monitor(LEVELS, size=400)
    rng = random.Random(1)
    for _ in range(400):
        actual = math.exp(rng.gauss(0, 1))
        m.add({0.5: 1.0, 0.9: math.exp(1.2816)}, actual)
    assert m.drifted() == []
    assert abs(m.coverage()[0.9] - 0.9) < 0.05


def test_fallback_is_live_before_training(tmp_path):
    learner = OnlineLearner(tmp_path, PredictorConfig(levels=list(LEVELS)))
    assert (learner.live.kind, learner.live.version) == ("fallback", "fallback")
    q = Query("lm", "llm", "hi", 10, 64)
    assert learner.prepare([q]) is None  # nothing to work out ahead
    (before,) = learner.forecast([q])
    for i in range(30):
        learner.observe(record(i, 2.0))
    (after,) = learner.forecast([q])
    assert after.quantile(0.5) == 2.0  # the running per-model quantiles took over from the prior
    assert before.quantile(0.5) != after.quantile(0.5)
    status = learner.status()
    assert status["kind"] == "fallback"
    assert status["calls_seen"] == 30


def test_drift_applies_a_conformal_correction_at_once(tmp_path):
    cfg = PredictorConfig(levels=list(LEVELS), window_calls=50, min_calls_to_train=10_000)
    learner = OnlineLearner(tmp_path, cfg)
    for i in range(500):  # the fallback's window: 512 calls, mostly these
        learner.observe(record(i, 1.0))
    q = Query("lm", "llm", "hi", 10, 64)
    for i in range(500, 550):  # the world got 3x slower than the forecasts say
        (d,) = learner.forecast([q])
        learner.observe(record(i, 3.0 + 0.01 * (i % 5), d.as_dict(), learner.live.version))
    assert learner.shift, "no correction applied"
    assert learner.shift[0.9] > 0
    (corrected,) = learner.forecast([q])
    assert corrected.quantile(0.9) >= 3.0
    assert learner._hurry  # and it asked for retraining sooner


def test_held_out_pinball_prefers_the_sharper_right_forecast():
    qs = [Query("lm", "llm", "", 1, 1)] * 50
    actual = [1.0] * 50
    good = type("P", (), {"predict": lambda self, q: [LatencyDist(LEVELS, (1.0, 1.2))] * len(q)})()
    bad = type("P", (), {"predict": lambda self, q: [LatencyDist(LEVELS, (3.0, 9.0))] * len(q)})()
    assert held_out_pinball(good, qs, actual) < held_out_pinball(bad, qs, actual)


def test_guarded_swap_refuses_a_worse_candidate_and_keeps_versions(tmp_path, monkeypatch):
    """Through a real trainer process, whose fine-tune is made to fail the guard."""
    import swarmx.models.train as train_mod
    from swarmx.models.features import FeatureConfig
    from tests.unit.models.test_predictor import synth

    model, _ = train_mod.train(synth(80, seed=3), FeatureConfig(levels=LEVELS), max_epochs=8)
    model.save(tmp_path / "offline.pt")
    cfg = PredictorConfig(levels=list(LEVELS), min_calls_to_train=50, retrain_every_calls=50)
    learner = OnlineLearner(tmp_path, cfg)
    version = learner.install(tmp_path / "offline.pt")
    good = learner.live
    assert (good.kind, good.version) == ("trained", version)
    assert (tmp_path / "predictors" / "live.json").exists()

    monkeypatch.setattr(online, "TRAINER", f"{HERE}:_worse_trainer")
    for r in synth(60, seed=4):
        learner.observe(r)
    assert learner.maybe_retrain()
    learner.wait_training(120)
    assert not learner.poll()
    assert learner.live is good
    assert learner.refused == 1
    assert learner.status()["last_error"] is None
    assert sorted(p.name for p in (tmp_path / "predictors").glob("*.pt")) == [f"{version}.pt"]
    assert list((tmp_path / "predictors" / "training").iterdir()) == []

    again = OnlineLearner(tmp_path, cfg)  # a restarted scheduler loads the live version
    assert again.live.kind == "trained"
    assert again.live.version == good.version


def test_monitor_counts_the_calls_in_its_window():
    m = Monitor(LEVELS, size=10)
    assert m.calls() == 0
    for _ in range(15):
        m.add({0.5: 1.0, 0.9: 2.0}, 1.5)
    assert m.calls() == 10


def test_replay_draws_whole_sessions_in_arrival_order():
    from swarmx.models.online import _replay

    recs = [record(i, 1.0) for i in range(40)]  # 10 sessions of 4 calls
    assert _replay(recs, 100, seed=0) == recs
    drawn = _replay(recs, 10, seed=0)
    assert 10 <= len(drawn) < 16  # whole sessions until there are enough calls
    assert [r.ts for r in drawn] == sorted(r.ts for r in drawn)
    for wf in {r.workflow for r in drawn}:
        assert sum(r.workflow == wf for r in drawn) == 4
    assert _replay(recs, 10, seed=1) != drawn


def _trained(tmp_path, cfg):
    import swarmx.models.train as train_mod
    from swarmx.models.features import FeatureConfig
    from tests.unit.models.test_predictor import synth

    model, _ = train_mod.train(synth(80, seed=3), FeatureConfig(levels=LEVELS), max_epochs=8)
    model.save(tmp_path / "offline.pt")
    learner = OnlineLearner(tmp_path, cfg)
    learner.install(tmp_path / "offline.pt")
    return learner


def _feed(learner, recs):
    """Forecast each call as the scheduler does at dispatch, then report its outcome."""
    from swarmx.models.query import query_from_record

    for r in recs:
        ctx = learner.sessions.context(r.session_id, r.model, r.ts)
        (d,) = learner.forecast([query_from_record(r, ctx)])
        learner.observe(dataclasses.replace(r, pred=d.as_dict(), predictor=learner.live.version))


def test_a_shift_is_learned_from_its_own_calls(tmp_path, monkeypatch):
    import swarmx.models.train as train_mod
    from tests.unit.models.test_predictor import synth

    cfg = PredictorConfig(
        levels=list(LEVELS), window_calls=100, retrain_every_calls=1000, min_calls_to_train=50
    )
    learner = _trained(tmp_path, cfg)
    old = synth(150, seed=5)
    for r in old:
        learner.observe(r)  # what the scheduler saw before the shift (no forecasts recorded)
    # The shift: a model never seen, 8x slower, under new session names.
    new = [
        dataclasses.replace(r, model="new", latency_s=8 * r.latency_s, workflow="n" + r.workflow)
        for r in synth(60, seed=6)
    ]
    _feed(learner, new[:100])
    assert learner._hurry and learner._regime == 100  # the drift window's calls start the shift

    seen: dict[str, object] = {}

    def fake_fine_tune(model, recs, **kw):
        seen["records"], seen["kw"] = list(recs), kw
        return model.copy()

    monkeypatch.setattr(train_mod, "fine_tune", fake_fine_tune)
    taken = learner.take_job()  # the round, run here rather than in a trainer process
    assert taken is not None
    train_round(*taken, learner.live, learner.fallback)
    fit = seen["records"]
    fresh = [(r.workflow, r.step) for r in fit if r.model == "new"]
    # The shift's calls but the newest 20% (held out) and the 25% before them (calibration)...
    assert fresh == [(r.workflow, r.step) for r in new[:60]]
    # ...and about as many older calls, whole sessions of them.
    assert 60 <= len(fit) - len(fresh) < 80
    assert seen["kw"]["cal_frac"] == 0.0  # calibrated on the shift's calls instead

    # While adapting, it retrains every window_calls calls, not every retrain_every_calls.
    _feed(learner, new[100:199])
    assert not learner.due()
    _feed(learner, new[199:200])
    assert learner._regime == 200
    assert learner.due()


class Scaled:
    """A stub predictor: every call's quantiles are ``scale`` times (1, 1.5) seconds."""

    kind = "trained"
    levels = LEVELS

    def __init__(self, scale: float, version: str) -> None:
        self.scale, self.version = scale, version

    def predict(self, qs):
        return [LatencyDist(LEVELS, (self.scale, 1.5 * self.scale))] * len(qs)


def test_guard_judges_the_live_model_as_served(tmp_path, monkeypatch):
    """A candidate better than the live model's raw forecasts, but worse than what the learner
    actually serves (with its online shift), is refused."""
    import swarmx.models.train as train_mod

    cfg = PredictorConfig(levels=list(LEVELS), min_calls_to_train=50, retrain_every_calls=50)
    learner = OnlineLearner(tmp_path, cfg)
    learner.live = live = Scaled(1.0, "live")
    for i in range(60):
        learner.observe(record(i, 3.0))
    learner.shift = {p: math.log(3) for p in LEVELS}  # what the calibration tracking learned
    # The candidate forecasts 2x too fast: better than the raw live model, worse than served.
    monkeypatch.setattr(train_mod, "train", lambda recs, cfg: (Scaled(1.5, "q-cand"), None))
    taken = learner.take_job()
    assert taken is not None
    job, recs = taken
    assert job.live_shift == learner.shift
    cand, cand_loss, live_loss = train_round(job, recs, live, learner.fallback)
    assert cand.version.startswith("v")
    raw = held_out_pinball(live, [Query("lm", "llm", "", 1, 1)] * 12, [3.0] * 12)
    assert cand_loss < raw  # better than the live model's own forecasts...
    assert cand_loss >= live_loss  # ...but not than what is served: the guard refuses it


@pytest.fixture
def learner(tmp_path):
    """A fallback learner with a round due; closed at the end, so no trainer outlives a test.
    Its trainer needs no rest between rounds, so a round is due by calls alone."""
    cfg = PredictorConfig(levels=list(LEVELS), min_calls_to_train=50, trainer_duty=1.0)
    learner = OnlineLearner(tmp_path, cfg)
    for i in range(60):
        learner.observe(record(i, 1.0 + 0.1 * (i % 5)))
    yield learner
    learner.close()


def test_the_first_model_is_trained_in_its_own_process_and_installed(tmp_path):
    from tests.unit.models.test_predictor import synth

    cfg = PredictorConfig(levels=list(LEVELS), min_calls_to_train=50)
    learner = OnlineLearner(tmp_path, cfg)
    for r in synth(50, seed=1):  # 357 calls: the model beats the fallback on the newest
        learner.observe(r)
    threads = set(threading.enumerate())
    assert learner.maybe_retrain()
    assert learner.status()["training"] and not learner.due()
    proc = _started(learner)
    assert proc.pid != os.getpid()
    learner.wait_training(120)
    assert set(threading.enumerate()) <= threads  # the writer and the loader are done
    assert learner.poll()
    status = learner.status()
    assert (status["kind"], status["swaps"], status["training"]) == ("trained", 1, False)
    assert status["last_error"] is None and status["last_trained_ts"] is not None
    live = json.loads((tmp_path / "predictors" / "live.json").read_text())
    assert live == {"version": learner.live.version, "file": f"{learner.live.version}.pt"}
    assert list((tmp_path / "predictors" / "training").iterdir()) == []
    assert OnlineLearner(tmp_path, cfg).live.version == learner.live.version
    # a drain's calls, prepared together, forecast as each alone, the online shift included
    learner.shift = {LEVELS[-1]: 0.2}
    qs = [
        Query("large", "llm", "Explain gardening in one sentence.", 300, 64),
        Query("x", "llm", "", 9, 8),
    ]
    places = [("H100", 0.5, 0.3, 0.2, 0, 0), ("H100", 0.5, 0.3, 0.2, 5, 2)]
    prepared = learner.prepare(qs)
    assert prepared is not None
    for q, p in zip(qs, prepared, strict=True):
        got, want = learner.forecast_prepared(p, places), learner.forecast_candidates(q, places)
        for a, b in zip(got, want, strict=True):
            assert a.values_s == pytest.approx(b.values_s, rel=1e-5)


def test_poll_never_waits_for_the_trainer_and_close_stops_it(tmp_path, learner, monkeypatch):
    monkeypatch.setattr(online, "TRAINER", f"{HERE}:_stuck_trainer")
    assert learner.maybe_retrain()
    proc = _started(learner)
    assert not learner.poll() and learner.status()["training"]
    learner.wait_training(0.05)  # a timeout: it returns with the trainer still running
    assert proc.poll() is None
    learner.close()
    assert proc.poll() == -signal.SIGTERM
    assert not learner.status()["training"]
    assert list((tmp_path / "predictors" / "training").iterdir()) == []
    learner.close()  # idempotent


def test_a_killed_trainer_is_reported_and_training_retried(learner, monkeypatch):
    monkeypatch.setattr(online, "TRAINER", f"{HERE}:_stuck_trainer")
    assert learner.maybe_retrain()
    os.kill(_started(learner).pid, signal.SIGKILL)
    learner.wait_training(10)
    assert not learner.poll()
    status = learner.status()
    assert not status["training"]
    assert status["last_error"] == "the trainer exited with code -9, leaving no result"
    assert learner.live is learner.fallback
    assert not learner.due()  # not at once: on the usual schedule
    for i in range(60, 110):
        learner.observe(record(i, 1.0))
    assert learner.maybe_retrain()


def test_the_trainer_rests_between_rounds(tmp_path, monkeypatch):
    """With ``trainer_duty`` 0.5, a round that ran T seconds is followed by T of rest: no round
    starts then however many calls ask for one."""
    monkeypatch.setattr(online, "TRAINER", f"{HERE}:_stuck_trainer")
    cfg = PredictorConfig(levels=list(LEVELS), min_calls_to_train=50, trainer_duty=0.5)
    learner = OnlineLearner(tmp_path, cfg)
    try:
        for i in range(60):
            learner.observe(record(i, 1.0))
        started = time.monotonic()
        assert learner.maybe_retrain()
        time.sleep(0.5)
        os.kill(_started(learner).pid, signal.SIGKILL)
        learner.wait_training(10)
        took_s = time.monotonic() - started
        for i in range(60, 400):
            learner.observe(record(i, 1.0))
        assert not learner.due()
        time.sleep(max(0.0, started + 2 * took_s + 0.05 - time.monotonic()))
        assert learner.due()
    finally:
        learner.close()


def _drifting(tmp_path):
    cfg = PredictorConfig(
        levels=list(LEVELS),
        window_calls=50,
        min_calls_to_train=50,
        retrain_every_calls=400,
        trainer_duty=1.0,
    )
    learner = OnlineLearner(tmp_path, cfg)
    learner.install_model(Scaled(1.0, "live"))
    return learner


def _calibrated(i: int, d: LatencyDist) -> float:
    """Of every 10 calls, 5 under the median, 4 between it and p90, 1 above: exact coverage."""
    low, high = d.quantile(0.5), d.quantile(0.9)
    k = i % 10
    return 0.5 * low if k < 5 else (low + high) / 2 if k < 9 else 2 * high


def test_drift_that_keeps_coming_back_hurries_rounds_less_and_less(tmp_path):
    """Latencies that flip every window (lockstep bursts do that) drift the coverage each time.
    The shift's first ``retrain_every_calls`` calls retrain every window, as adapting does; past
    them, each round that drift brings forward waits twice the calls of the one before, up to
    the regular cadence, rather than one round per window."""
    learner = _drifting(tmp_path)
    q = Query("lm", "llm", "hi", 10, 64)
    rounds = []
    for i in range(3000):
        (d,) = learner.forecast([q])
        actual_s = 5.0 if (i // 50) % 2 == 0 else 0.2
        learner.observe(record(i, actual_s, d.as_dict(), learner.live.version))
        if learner.take_job() is not None:
            rounds.append(i)
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    assert len(rounds) < 20  # not 60, one a window
    assert gaps[-3:] == [400, 400, 400]
    assert gaps == sorted(gaps)


def test_hurried_rounds_are_at_once_again_after_a_calm_window(tmp_path):
    """Once coverage holds for a whole window, the next drift is a new one: its round is
    brought forward at once again."""
    learner = _drifting(tmp_path)
    q = Query("lm", "llm", "hi", 10, 64)
    rounds, drifts = [], []
    for i in range(1700):
        (d,) = learner.forecast([q])
        if i < 1000:  # drift after drift
            actual_s = 5.0 if (i // 50) % 2 == 0 else 0.2
        elif i < 1600:  # calibrated: calm
            actual_s = _calibrated(i, d)
        else:  # a new shift
            actual_s = 50.0 * d.quantile(0.9)
        hurried = learner._hurry
        learner.observe(record(i, actual_s, d.as_dict(), learner.live.version))
        if learner._hurry and not hurried:
            drifts.append(i)
        if learner.take_job() is not None:
            rounds.append(i)
    assert [i for i in drifts if 1050 <= i < 1600] == []
    shift = next(i for i in drifts if i >= 1600)
    assert shift in rounds  # at once


def test_a_trainer_that_fails_says_why(learner, monkeypatch):
    monkeypatch.setattr(online, "TRAINER", f"{HERE}:_failing_trainer")
    assert learner.maybe_retrain()
    learner.wait_training(60)
    assert not learner.poll()
    error = learner.status()["last_error"]
    assert error.startswith("the trainer exited with code 1: Traceback")
    assert "RuntimeError: boom" in error


def test_a_training_job_survives_the_trip_to_the_trainer(tmp_path, learner):
    learner.shift = {0.9: 0.25}
    taken = learner.take_job()
    assert taken is not None
    job, recs = taken
    path = tmp_path / "job.bin"
    online._write_job(path, job, recs * 20, threading.Event())  # 1,200 records: three chunks
    assert online._read_job(path) == (job, recs * 20)
    assert job.live_shift == {0.9: 0.25} and job.base_file is None
    q = [Query("lm", "llm", "hi", 10, 64)]  # the fallback as it stood, running quantiles and all
    assert pickle.loads(job.fallback).predict(q) == learner.fallback.predict(q)


def test_starting_a_round_does_not_import_torch():
    """Where the live model is the fallback, the scheduler has no torch until a model wins."""
    code = f"""
import sys, tempfile
from pathlib import Path
from swarmx.config import PredictorConfig
from swarmx.models import online
from {HERE} import record
online.TRAINER = "{HERE}:_stuck_trainer"
with tempfile.TemporaryDirectory() as tmp:
    learner = online.OnlineLearner(Path(tmp), PredictorConfig(min_calls_to_train=50))
    for i in range(60):
        learner.observe(record(i, 1.0))
    assert learner.maybe_retrain()
    learner.wait_training(0.5)
    learner.poll()
    learner.close()
    assert "torch" not in sys.modules, "torch imported"
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_a_fan_out_that_misses_together_is_one_piece_of_evidence(tmp_path):
    """256 instances of one fan-out step all run 10x slower than forecast (one slow input, one
    hot replica): one event. It moves the correction by about ln(256) calls' worth, not 256,
    and sets off no drift; the same slowdown over independent calls does."""
    learner = _drifting(tmp_path)
    q = Query("lm", "llm", "hi", 10, 64)
    for i in range(200):  # calibrated, independent calls
        (d,) = learner.forecast([q])
        learner.observe(record(i, _calibrated(i, d), d.as_dict(), learner.live.version))
    before = dict(learner.shift)
    assert not learner._hurry
    for k in range(256):
        (d,) = learner.forecast([q])
        rec = record(1000 + k, 10 * d.quantile(0.9), d.as_dict(), learner.live.version)
        learner.observe(dataclasses.replace(rec, workflow="burst", step="write", index=k))
    assert not learner._hurry  # no drift from one event
    assert learner.shift[0.9] - before[0.9] < 0.15  # ~ 0.018 x (1 + 1/2 + ... + 1/256)
    for i in range(2000, 2200):  # the same, one call at a time: a shift in the traffic
        (d,) = learner.forecast([q])
        learner.observe(record(i, 10 * d.quantile(0.9), d.as_dict(), learner.live.version))
    assert learner._hurry
    assert learner.shift[0.9] > math.log(5)


def test_the_online_correction_is_bounded(tmp_path):
    """Calls 1000x slower than forecast, forever: the correction stops at 10x either way (the
    model is wrong, which retraining fixes), instead of swinging by e^22."""
    learner = _drifting(tmp_path)
    q = Query("lm", "llm", "hi", 10, 64)
    for i in range(3000):
        (d,) = learner.forecast([q])
        learner.observe(record(i, 1000 * d.quantile(0.9), d.as_dict(), learner.live.version))
    assert all(abs(s) <= online.MAX_SHIFT + 1e-9 for s in learner.shift.values())
    assert max(learner.shift.values()) == pytest.approx(math.log(10))
    (served,) = learner.forecast([q])
    assert served.quantile(0.9) <= 10 * 1.5 + 1e-9


def test_the_monitor_judges_drift_on_independent_evidence():
    """A window of 100 misses: from 100 calls, drift; from 4 fan-outs of 25, no more than noise
    (4 events); the correction weighs each fan-out once."""
    independent, bursts = Monitor((0.9,), size=100), Monitor((0.9,), size=100)
    for i in range(100):
        independent.add({0.9: 1.0}, 2.0)
        bursts.add({0.9: 1.0}, 2.0 if i < 75 else 8.0, group=f"fan-out {i // 25}")
    assert independent.drifted() == [0.9]
    assert bursts.drifted() == []
    # one residual a fan-out: log 2 three times and log 8 once; their 0.9 conformal quantile
    assert bursts.correction([0.9]) == {0.9: pytest.approx(math.log(8))}
