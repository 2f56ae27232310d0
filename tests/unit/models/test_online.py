"""The scheduler's online learner, without the scheduler: feed it calls, check what it does."""

from __future__ import annotations

import dataclasses
import math
import random

from swarmx.config import PredictorConfig
from swarmx.models.dist import LatencyDist
from swarmx.models.online import Monitor, OnlineLearner, held_out_pinball
from swarmx.models.query import Query
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord

LEVELS = (0.5, 0.9)


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
    import swarmx.models.train as train_mod
    from swarmx.models.predictor import FeatureConfig
    from tests.unit.models.test_predictor import synth

    model, _ = train_mod.train(synth(80, seed=3), FeatureConfig(levels=LEVELS), max_epochs=8)
    model.save(tmp_path / "offline.pt")
    cfg = PredictorConfig(levels=list(LEVELS), min_calls_to_train=50, retrain_every_calls=50)
    learner = OnlineLearner(tmp_path, cfg)
    version = learner.install(tmp_path / "offline.pt")
    good = learner.live
    assert (good.kind, good.version) == ("trained", version)
    assert (tmp_path / "predictors" / "live.json").exists()

    def broken(model, recs, **kw):  # a candidate whose forecasts are 20x too slow
        worse = model.copy()
        worse.set_online_shift({p: math.log(20) for p in LEVELS})
        return worse

    monkeypatch.setattr(train_mod, "fine_tune", broken)
    for r in synth(60, seed=4):
        learner.observe(r)
    assert learner.maybe_retrain()
    learner.wait_training()
    assert not learner.poll()
    assert learner.live is good
    assert learner.refused == 1

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
    from swarmx.models.predictor import FeatureConfig
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
        (d,) = learner.forecast([query_from_record(r, learner.sessions.context(r.session_id))])
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
    assert learner.maybe_retrain()
    learner.wait_training()
    fit = seen["records"]
    fresh = [(r.workflow, r.step) for r in fit if r.model == "new"]
    # The shift's calls but the newest 20% (held out) and the 25% before them (calibration)...
    assert fresh == [(r.workflow, r.step) for r in new[:60]]
    # ...and about as many older calls, whole sessions of them.
    assert 60 <= len(fit) - len(fresh) < 80
    assert seen["kw"]["cal_frac"] == 0.0  # calibrated on the shift's calls instead
    learner.poll()

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
    assert learner.maybe_retrain()
    learner.wait_training()
    assert not learner.poll()
    assert learner.live is live and learner.refused == 1
