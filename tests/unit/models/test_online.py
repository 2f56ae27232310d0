"""The scheduler's online learner, without the scheduler: feed it calls, check what it does."""

from __future__ import annotations

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
