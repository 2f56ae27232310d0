"""The leakage guard: no feature of a call may read the outcome of a call that had not finished
when it arrived. Training featurizes whole traces at once (`queries`), where every outcome is
at hand, so this is checked on random traces: change what any unfinished call did (its latency,
output, success, why it stopped, what it output) and every feature of the call must stay as it
was. Calls of two models across three sessions, so the serving side's last minute (any
session's calls of the model) is checked too."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from swarmx.models.query import queries
from swarmx.traces import TraceRecord
from tests.support.records import trace_record

STOPS = ("end_turn", "tool_use", "max_tokens", "")

calls = st.lists(
    st.tuples(
        st.integers(0, 2),  # session
        st.floats(0.0, 50.0),  # arrival
        st.floats(0.01, 20.0),  # latency
        st.floats(0.0, 5.0),  # queue
        st.integers(1, 500),  # output tokens
        st.booleans(),  # ok
        st.integers(0, 1),  # model
        st.sampled_from(STOPS),  # stop reason
    ),
    min_size=2,
    max_size=12,
)


def _trace(rows: list[tuple[int, float, float, float, int, bool, int, str]]) -> list[TraceRecord]:
    return [
        trace_record(
            workflow=f"agent-{s}",
            step=f"turn-{i}",
            call_id=f"c{i}",
            ts=ts,
            latency_s=lat,
            queue_s=q,
            output_tokens=out,
            ok=ok,
            model=f"m{m}",
            stop_reason=stop,
            output_kinds=["tool_use"] if stop == "tool_use" else ["text"],
        )
        for i, (s, ts, lat, q, out, ok, m, stop) in enumerate(rows)
    ]


def _later(records: list[TraceRecord], i: int) -> list[int]:
    """The calls not finished when call ``i`` arrived, itself included."""
    return [
        j for j, r in enumerate(records) if j == i or r.ts + r.queue_s + r.latency_s > records[i].ts
    ]


def _redone(r: TraceRecord, slower: float, output: int, ok: bool, stop: str) -> TraceRecord:
    return dataclasses.replace(
        r,
        latency_s=r.latency_s * slower,
        output_tokens=output,
        ok=ok,
        stop_reason=stop,
        output_kinds=["tool_use"] if stop == "tool_use" else [],
    )


@settings(max_examples=300, deadline=None)
@given(calls, st.data())
def test_no_feature_reads_an_outcome_that_was_not_known_yet(rows, data):
    """(The call's own cache hit, ``cached_tokens``, stands for the prefix its placement
    holds, which the live path estimates at dispatch: a placement feature, not an outcome.)"""
    records = _trace(rows)
    i = data.draw(st.integers(0, len(records) - 1), label="the call")
    changed = list(records)
    for j in _later(records, i):
        changed[j] = _redone(
            records[j],
            data.draw(st.floats(1.0, 100.0), label=f"slower {j}"),
            data.draw(st.integers(1, 10_000), label=f"output {j}"),
            data.draw(st.booleans(), label=f"ok {j}"),
            data.draw(st.sampled_from(STOPS), label=f"stop {j}"),
        )
    assert queries(changed)[i] == queries(records)[i]


def test_the_guard_catches_a_feature_that_peeks(monkeypatch):
    """The same check on a featurizer that leaks (session context from every call of the
    session, finished or not) fails: the guard has teeth."""
    from swarmx.models import query as query_mod

    def whole_session(records):
        tracker = query_mod.SessionTracker()
        for r in records:
            tracker.observe_record(r)
        return [tracker.context(r.session_id, r.model, r.ts) for r in records]

    records = _trace(
        [(0, 0.0, 1.0, 0.0, 10, True, 0, "end_turn"), (0, 5.0, 30.0, 0.0, 10, True, 0, "")]
    )
    changed = list(records)
    for j in _later(records, 0):
        changed[j] = _redone(records[j], 2.0, 99, True, "tool_use")
    assert queries(changed)[0] == queries(records)[0]  # the real one: no leak
    monkeypatch.setattr(query_mod, "session_contexts", whole_session)
    assert queries(changed)[0] != queries(records)[0]  # the leaky one: caught
