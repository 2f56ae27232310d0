"""The folded routing net gives the network's numbers, and follows the net as it changes."""

import dataclasses
import math

import pytest
import torch

from swarmx.models.dist import LatencyDist
from swarmx.models.predictor import QuantilePredictor
from swarmx.models.query import Candidate, Query, SessionContext, place, queries
from tests.unit.models.test_predictor import fresh, query, synth

CANDIDATES: list[Candidate] = [
    ("H100", 0.1, 0.2, 0.3, 0, 0),
    ("H100", 0.9, 0.8, 0.7, 6, 3),
    ("A10", 0.5, 0.5, 0.5, 1, 0),
    ("cpu", 0.0, 0.0, 0.9, 12, 10),
]


@pytest.fixture(scope="module")
def untrained() -> QuantilePredictor:
    """Random weights exercise the folding as well as trained ones, without the training."""
    return fresh(synth(40, seed=1))


def assert_candidates_agree(model: QuantilePredictor, q: Query) -> list[LatencyDist]:
    """The routing path (the folded net, call encoded once) gives the training path's numbers."""
    fast = model.predict_candidates(q, CANDIDATES)
    slow = model.predict([place(q, c) for c in CANDIDATES])
    for a, b in zip(fast, slow, strict=True):
        assert a.values_s == pytest.approx(b.values_s, rel=1e-5)
    return fast


@pytest.mark.parametrize(
    "q",
    [
        query(session=SessionContext(2, 300, 4.0, 1.2, 250.0)),
        query(prompt=""),  # no n-grams at all
        query(prompt="zyzzyva quux frobnicate", model="never-seen"),  # unfamiliar everything
        dataclasses.replace(query(), input_kinds=["image", "tool_result", "new-kind"]),
    ],
)
def test_predict_candidates_agrees_with_predict(untrained, q):
    assert_candidates_agree(untrained, q)


def test_predict_candidates_follows_weight_changes(untrained):
    """The folded net is a cache: in-place training steps and grown vocabularies must show."""
    model = untrained.copy()
    q = query(model="huge")
    before = model.predict_candidates(q, CANDIDATES)
    with torch.no_grad():
        model.net.b4.add_(0.5)  # as an optimiser step would, in place
    after = assert_candidates_agree(model, q)
    assert after[0].values_s[0] == pytest.approx(before[0].values_s[0] * math.exp(0.5), rel=1e-4)
    model.grow([q])  # replaces the model table
    with torch.no_grad():
        model.net.model[-1].add_(1.0)
    assert_candidates_agree(model, q)


def test_no_candidates_no_forecasts(untrained):
    assert untrained.predict_candidates(query(), []) == []


def test_calls_prepared_in_one_batch_forecast_as_each_alone(untrained):
    """`prepare` works out several calls' own parts in one batch (familiar, unfamiliar and
    empty prompts, an unknown model, input kinds): each then forecasts as `predict_candidates`
    does alone, and as the training path does."""
    model = untrained.copy()
    latency = torch.log(torch.tensor([r.latency_s for r in synth(40, seed=1)]))
    model.fit_marginal(model.encoder.encode_calls(queries(synth(40, seed=1))).model, latency)
    model.novelty_shift[2] += 0.3
    qs = [
        query(),
        query(prompt="zyzzyva quux frobnicate", model="never-seen"),
        query(prompt=""),
        dataclasses.replace(query(prompt="Explain quux"), input_kinds=["image", "tool_result"]),
    ]
    prepared = model.prepare(qs)
    assert [p.novel is not None for p in prepared] == [False, True, False, True]
    cached = [0, 500, 0, 9000]
    for q, p in zip(qs, prepared, strict=True):
        batch = model.predict_prepared(p, CANDIDATES, cached)
        alone = model.predict_candidates(q, CANDIDATES, cached)
        slow = model.predict([place(q, c, n) for c, n in zip(CANDIDATES, cached, strict=True)])
        for a, b, c in zip(batch, alone, slow, strict=True):
            assert a.values_s == pytest.approx(b.values_s, rel=1e-5)
            assert a.values_s == pytest.approx(c.values_s, rel=1e-5)


def test_a_prepared_call_follows_the_model_as_it_changes(untrained):
    """Worked out before a weight or the novelty shifts changed, a prepared call is worked out
    again: its forecast is the model's of now."""
    model = untrained.copy()
    latency = torch.log(torch.tensor([r.latency_s for r in synth(40, seed=1)]))
    model.fit_marginal(model.encoder.encode_calls(queries(synth(40, seed=1))).model, latency)
    q = query(prompt="zyzzyva quux frobnicate")
    (old,) = model.prepare([q])
    with torch.no_grad():
        model.net.b2.add_(0.3)  # a trunk weight, in place, as an optimiser step
    now = model.predict_candidates(q, CANDIDATES)
    assert [d.values_s for d in model.predict_prepared(old, CANDIDATES)] == [
        d.values_s for d in now
    ]
    (old,) = model.prepare([q])
    bucket = int(model._novelty_bucket(model.encoder.encode_calls([q]).novelty))
    model.novelty_shift[bucket] += 1.0
    moved = model.predict_prepared(old, CANDIDATES)
    assert [d.values_s for d in moved] == [
        d.values_s for d in model.predict_candidates(q, CANDIDATES)
    ]
    assert moved[0].values_s[0] == pytest.approx(now[0].values_s[0] * math.exp(1.0), rel=1e-4)
