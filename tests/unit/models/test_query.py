"""What a call's forecast knows of its session and of the serving side, as of its arrival."""

from __future__ import annotations

import pytest

from swarmx.models.query import RECENT_S, SessionContext, SessionTracker, stop_class
from swarmx.tracefmt import import_claude_code


@pytest.mark.parametrize(
    ("reason", "kinds", "cls"),
    [
        ("tool_use", [], "tool"),
        ("tool_calls", [], "tool"),
        ("end_turn", ["text"], "end"),
        ("stop", [], "end"),
        ("length", [], "length"),
        ("max_tokens", ["text", "tool_use"], "length"),
        ("", ["text", "tool_use"], "tool"),
        ("", [], ""),
        ("content_filter", [], ""),
    ],
)
def test_stop_reasons_read_alike_whatever_the_apis_words(reason, kinds, cls):
    assert stop_class(reason, kinds) == cls


def test_the_session_and_the_models_last_minute_as_of_arrival():
    t = SessionTracker()
    assert t.context("a", "m", 0.0) == SessionContext()
    t.observe("a", 100, 2.0, stop="tool", end_ts=10.0, model="m")
    t.observe("a", 50, 1.0, stop="tool", end_ts=12.0, model="m")
    t.observe("b", 400, 8.0, stop="end", end_ts=20.0, model="m")
    t.observe("c", 10, 0.5, stop="end", end_ts=21.0, model="other")
    a = t.context("a", "m", 25.0)
    assert (a.prior_calls, a.last_stop, a.tool_loop, a.since_last_s) == (2, "tool", 2, 13.0)
    assert a.recent_calls == 3  # a's two and b's one: the model's, any session's
    assert a.recent_log_latency == pytest.approx((0.693147 + 0.0 + 2.079442) / 3, abs=1e-5)
    t.observe("a", 70, 1.5, stop="end", end_ts=30.0, model="m")
    assert t.context("a", "m", 31.0).tool_loop == 0  # the loop ended
    later = t.context("a", "m", 12.0 + RECENT_S + 1)  # the first two are out of the minute
    assert (later.recent_calls, later.prior_calls) == (2, 3)
    assert t.context("z", "m", 1e6) == SessionContext()  # a new session, nothing recent
    t.forget("a")
    assert t.context("a", "m", None).prior_calls == 0


def test_claude_code_rows_bring_their_stops_and_output_kinds(tmp_path):
    head = (
        "trace_id,agent_id,subagent_type,agent_start_s,req_idx,t_s,model,stream,in_tokens,"
        "out_tokens,api_time_s,ttft_s,think_time_s,stop,input_types,output_types,n_blocks,"
        "prefix_blocks_shared_prev,tool_tokens,system_tokens\n"
    )
    row = "t1,parent,,0.0,0,0.0,m,n,100,20,1.5,,0.0,tool_use,text,text|tool_use,2,0,0,0\n"
    path = tmp_path / "requests.csv"
    path.write_text(head + row)
    [rec] = import_claude_code(path)
    assert (rec.stop_reason, rec.output_kinds) == ("tool_use", ["text", "tool_use"])
