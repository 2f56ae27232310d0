"""Service time composed from the output-length forecast and a replica's measured speeds."""

from __future__ import annotations

import dataclasses

import pytest

from swarmx.models.compose import compose_service, compose_unfamiliar
from swarmx.models.dist import LatencyDist
from swarmx.models.query import Query
from swarmx.sched.router import ReplicaView

LEVELS = (0.5, 0.9, 0.99)
TOKENS = LatencyDist(LEVELS, (101.0, 401.0, 1001.0))


class Lengths:
    """A model with an output-length head that knows the H100 only."""

    output_shift: object = 0.0

    def __init__(self) -> None:
        self.asked: list[Query] = []

    def knows_gpu(self, gpu: str) -> bool:
        return gpu == "H100"

    def output_tokens(self, query):
        self.asked.append(query)
        return TOKENS


def view(name: str, gpu: str, prefill: float = 0.0, decode: float = 0.0) -> ReplicaView:
    return ReplicaView(name, name, "lm", "openai", gpu, 8, 0, gpu, (), 0, prefill, decode)


def query(kind: str = "llm") -> Query:
    return Query("lm", kind, "write a haiku", 16_000, 2048)


def head(n: int) -> list[LatencyDist]:
    return [LatencyDist(LEVELS, (1.0, 2.0, 3.0)) for _ in range(n)]


def test_the_service_is_the_prefill_and_the_tokens_after_the_first_at_the_decode_pace():
    got = compose_service(TOKENS, 16_000, 8000.0, 0.02)
    assert got.levels == LEVELS
    assert got.values_s == pytest.approx((2.0 + 2.0, 2.0 + 8.0, 2.0 + 20.0))
    none_to_prefill = compose_service(TOKENS, -5, 8000.0, 0.02)  # more cached than asked
    assert none_to_prefill.values_s == pytest.approx((2.0, 8.0, 20.0))


def test_only_unfamiliar_measured_llm_candidates_are_composed_with_their_cached_prefix():
    model = Lengths()
    views = [
        view("known", "H100", 9000.0, 0.01),  # the head learned it
        view("new", "B200", 16_000.0, 0.01),  # new and measured
        view("unmeasured", "B200", 16_000.0, 0.0),  # new, its pace not measured yet
    ]
    got = compose_unfamiliar(model, query(), views, [0, 8000, 0], head(3))
    assert got[0].values_s == got[2].values_s == (1.0, 2.0, 3.0)
    assert got[1].values_s == pytest.approx((0.5 + 1.0, 0.5 + 4.0, 0.5 + 10.0))
    assert len(model.asked) == 1  # one length forecast for the decision


def test_calls_and_models_it_cannot_compose_for_keep_the_latency_heads_forecast():
    views = [view("new", "B200", 16_000.0, 0.01)]
    model = Lengths()
    assert compose_unfamiliar(model, query("tool"), views, None, head(1)) == head(1)
    assert compose_unfamiliar(object(), query(), views, None, head(1)) == head(1)  # no head
    old = Lengths()
    old.output_shift = None  # trained before the output-length head
    assert compose_unfamiliar(old, query(), views, None, head(1)) == head(1)
    assert compose_unfamiliar(
        model, query(), [dataclasses.replace(views[0], gpu="H100")], None, head(1)
    ) == head(1)
    assert model.asked == []  # nothing to compose: no length forecast asked
