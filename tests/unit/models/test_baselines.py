"""The baselines fit synthetic data with a known answer, survive a JSON round trip, and the
cold-start predictor moves from its prior to observed latencies."""

import json
import math
import random

import pytest

from swarmx.models.baselines import (
    BASELINES,
    EmpiricalPerModel,
    FallbackPredictor,
    LinearQuantile,
    MeanConformal,
    baseline_from_dict,
)
from swarmx.models.dist import LatencyDist
from swarmx.models.query import Query, place, queries
from swarmx.stats import quantile
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord

LEVELS = (0.5, 0.9, 0.95, 0.99)
Z90 = 1.2815515655446004


def rec(
    latency_s: float,
    model: str = "m",
    *,
    prompt_tokens: int = 100,
    max_tokens: int = 0,
    inflight: int = 0,
    queue_depth: int = 0,
    ok: bool = True,
) -> TraceRecord:
    return TraceRecord(
        ts=0.0,
        workflow="wf",
        step="s",
        deps=[],
        kind="llm",
        model=model,
        prompt="",
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        output_tokens=10,
        latency_s=latency_s,
        queue_s=0.0,
        ttft_s=None,
        node="n",
        replica=f"n/{model}",
        device=DeviceAtDispatch("cpu", 0.0, 0.0, 0.0),
        runtime=RuntimeAtDispatch(inflight, queue_depth),
        ok=ok,
    )


def token_data(n: int = 3000, seed: int = 0) -> list[TraceRecord]:
    """log latency = 0.3 + 0.6 log1p(prompt) + 0.2 log1p(max_tokens) + N(0, 0.4)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, m = rng.randint(10, 50_000), rng.randint(1, 2000)
        mu = 0.3 + 0.6 * math.log1p(p) + 0.2 * math.log1p(m)
        out.append(rec(math.exp(rng.gauss(mu, 0.4)), prompt_tokens=p, max_tokens=m))
    return out


def load_data(n: int = 4000, seed: int = 0) -> list[TraceRecord]:
    """latency = 0.5 + 0.3 inflight + 0.2 queue_depth + 1e-4 prompt + Exp(mean 1) s."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i, qd, p = rng.randint(0, 8), rng.randint(0, 4), rng.randint(10, 20_000)
        lat = 0.5 + 0.3 * i + 0.2 * qd + 1e-4 * p + rng.expovariate(1.0)
        out.append(rec(lat, prompt_tokens=p, inflight=i, queue_depth=qd))
    return out


def test_empirical_per_model_matches_sorted_data() -> None:
    lat = [float(x) for x in range(1, 101)]
    random.Random(0).shuffle(lat)
    records = [rec(x, "a") for x in lat] + [rec(1000.0 + x, "b") for x in range(10)]
    records.append(rec(5000.0, "a", ok=False))  # failures are not fitted
    model = EmpiricalPerModel.fit(records, LEVELS)
    assert model.per_model["a"] == [50.0, 90.0, 95.0, 99.0]
    overall = sorted([*lat, *(1000.0 + x for x in range(10))])
    assert model.overall == [quantile(overall, p) for p in LEVELS]
    a, unknown = model.predict([Query("a", "llm", "", 1, 0), Query("zz", "llm", "", 1, 0)])
    assert a.values_s == (50.0, 90.0, 95.0, 99.0)
    assert list(unknown.values_s) == model.overall


def test_linear_quantile_recovers_token_slopes() -> None:
    model = LinearQuantile.fit(token_data(), LEVELS)
    for p, (a, b, c) in zip(LEVELS[:2], model.coef, strict=False):
        z = 0.0 if p == 0.5 else Z90
        assert b == pytest.approx(0.6, abs=0.03)
        assert c == pytest.approx(0.2, abs=0.03)
        assert a == pytest.approx(0.3 + 0.4 * z, abs=0.25)
    (d,) = model.predict([Query("m", "llm", "", 1000, 100)])
    median = math.exp(0.3 + 0.6 * math.log1p(1000) + 0.2 * math.log1p(100))
    assert d.values_s[0] == pytest.approx(median, rel=0.1)
    assert d.values_s[1] == pytest.approx(median * math.exp(0.4 * Z90), rel=0.1)


def test_linear_quantile_stays_monotone_where_fits_cross() -> None:
    model = LinearQuantile(LEVELS, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3, 0, 0]])
    (d,) = model.predict([Query("m", "llm", "", 100_000, 0)])  # level 0.5 says e^11.5
    assert list(d.values_s) == sorted(d.values_s)


def test_linear_quantile_without_max_tokens() -> None:
    """Imported API traces have max_tokens 0 everywhere: a constant column gets weight 0."""
    data = [rec(r.latency_s, prompt_tokens=r.prompt_tokens) for r in token_data(500)]
    model = LinearQuantile.fit(data, LEVELS)
    assert all(c == 0.0 and math.isfinite(a + b) for a, b, c in model.coef)


def test_mean_conformal_covers_its_levels() -> None:
    data = load_data()
    model = MeanConformal.fit(data, LEVELS)
    w0, w_inflight, w_queue, w_prompt = model.weights
    assert w_inflight == pytest.approx(0.3, abs=0.05)
    assert w_queue == pytest.approx(0.2, abs=0.05)
    assert w_prompt == pytest.approx(1e-4, abs=2e-5)
    assert w0 == pytest.approx(1.5, abs=0.15)  # 0.5 plus the noise's mean
    dists = model.predict(queries(data))
    for i, p in enumerate(LEVELS):
        covered = sum(r.latency_s <= d.values_s[i] for r, d in zip(data, dists, strict=True))
        assert covered / len(data) == pytest.approx(p, abs=0.03)
    # One constant shift: the spread is the same whatever the call.
    spreads = {round(d.values_s[1] - d.values_s[0], 9) for d in dists}
    assert len(spreads) == 1


def test_mean_conformal_without_load_data() -> None:
    data = [rec(r.latency_s, prompt_tokens=r.prompt_tokens) for r in load_data(500)]
    model = MeanConformal.fit(data, LEVELS)
    assert model.weights[1:3] == [0.0, 0.0]


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.name)
def test_round_trip_predicts_the_same(cls) -> None:
    data = token_data(400) + [rec(2.0, "other") for _ in range(5)]
    model = cls.fit(data, LEVELS)
    loaded = baseline_from_dict(json.loads(json.dumps(model.to_dict())))
    assert type(loaded) is type(model) and loaded.levels == LEVELS
    qs = [*queries(data[:50]), Query("unknown", "llm", "", 7, 3, inflight=2)]
    assert loaded.predict(qs) == model.predict(qs)
    with pytest.raises(ValueError, match="not a"):
        cls.from_dict({**model.to_dict(), "name": "something-else"})


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_from_dict({"name": "nope"})
    with pytest.raises(ValueError, match="levels"):
        EmpiricalPerModel.fit([rec(1.0)], [0.9, 0.5])
    with pytest.raises(ValueError, match="no successful records"):
        LinearQuantile.fit([rec(1.0, ok=False)], LEVELS)


def test_fallback_moves_from_prior_to_observations() -> None:
    fb = FallbackPredictor(LEVELS, window=30)
    assert (fb.kind, fb.version) == ("fallback", "fallback")
    q = Query("m", "llm", "", 1000, 0)
    (prior,) = fb.predict([q])
    median = 0.05 + 1000 * 0.2e-3 + 64 * 20e-3
    assert prior == LatencyDist.lognormal(median, 1.0, LEVELS)
    (longer,) = fb.predict([Query("m", "llm", "", 1000, 256)])
    assert longer.values_s[0] == pytest.approx(0.05 + 0.2 + 256 * 0.02)
    for x in range(1, 20):
        fb.observe(rec(float(x)))
    fb.observe(rec(99.0, ok=False))  # failures do not count
    assert fb.predict([q]) == [prior]  # 19 observations: still the prior
    fb.observe(rec(20.0))
    (seen,) = fb.predict([q])
    assert seen.values_s == (10.0, 18.0, 19.0, 20.0)
    for x in range(100, 130):  # the window keeps the last 30
        fb.observe(rec(float(x)))
    assert fb.predict([q])[0].values_s == (114.0, 126.0, 128.0, 129.0)
    (other,) = fb.predict([Query("other", "llm", "", 1000, 0)])
    assert other == prior


def test_load_only_scores_each_placement() -> None:
    """`predict_candidates` (what routers call) is `predict` on the call placed on each replica."""
    model = MeanConformal.fit(load_data(), LEVELS)
    q = queries(load_data(1))[0]
    places = [("H100", 0.2, 0.1, 0.1, 0, 0), ("H100", 0.9, 0.8, 0.5, 4, 2)]
    quiet, busy = model.predict_candidates(q, places)
    assert quiet == model.predict([place(q, places[0])])[0]
    assert busy.values_s[0] == pytest.approx(quiet.values_s[0] + 4 * 0.3 + 2 * 0.2, abs=0.15)
