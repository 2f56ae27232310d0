"""What the scheduler knows of a call: its session's turn and previous prompt, tokens estimated
on the model's own scale, and the bounded memory of forecasts for the step views."""

import dataclasses

from swarmx.clock import ManualClock
from swarmx.daemon.features import CallFeatures, Inflight
from swarmx.daemon.views import MAX_REMEMBERED_PREDS, WorkflowViews
from swarmx.protocol import Result
from swarmx.sched.prefix import BLOCK_TOKENS, block_hashes
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch
from swarmx.workflow.engine import CallSpec
from swarmx.workflow.spec import DEFAULT_LIMITS


def call(wf: str, step: str, prompt: str, kind: str = "llm") -> CallSpec:
    return CallSpec(f"{wf}:{step}:0:1", wf, step, None, 1, kind, "lm", prompt, 8, {}, [], None, [])


def test_each_dispatch_is_the_next_turn_and_shares_the_prompt_it_repeats():
    f = CallFeatures({}, None, {}, ManualClock())
    assert f.dispatched(call("w1", "a", "You are a planner. Plan A")) == (0, [], 0.0)
    turn, _, share = f.dispatched(call("w1", "b", "You are a planner. Plan B"))
    assert turn == 1
    assert share == len("You are a planner. Plan ") / len("You are a planner. Plan B")
    assert f.dispatched(call("w2", "a", "You are a planner. Plan B"))[0] == 0  # its own session
    f.forget("w1")
    assert f.turn("w1") == 0
    assert f.query(call("w1", "c", "You are a planner. Plan C")).prefix_share == 0.0


def test_tokens_are_estimated_at_the_bytes_per_token_the_model_reported():
    f = CallFeatures({}, None, {}, ManualClock())
    c = call("w", "a", "x" * 400)
    assert f.query(c).prompt_tokens == 100  # 4 bytes a token until the model says otherwise
    done = f.trace(_inflight(c), _result(prompt_tokens=200))
    f.observe(done)
    assert f.query(c).prompt_tokens == 200
    assert f.query(call("w", "t", "sleep 1", kind="tool")).prompt_tokens == 0


def test_a_trace_carries_the_calls_prefix_blocks_and_what_was_cached():
    f = CallFeatures({}, None, {}, ManualClock())
    prompt = "You are a careful planner. " * 40  # 1,040 bytes: four whole blocks
    c = dataclasses.replace(
        call("w", "a", prompt), prefix_blocks=block_hashes(prompt), block_tokens=BLOCK_TOKENS
    )
    inflight = dataclasses.replace(_inflight(c), cached_est=128)
    rec = f.trace(inflight, Result("c", "n/lm#0", True, "ok", "", 0.0, 1.0, None, 10, 3, 192))
    assert rec.prefix_blocks == block_hashes(prompt)
    assert (len(rec.prefix_blocks), rec.block_tokens) == (4, BLOCK_TOKENS)
    assert (rec.cached_tokens, rec.cached_tokens_est) == (192, 128)
    plain = f.trace(_inflight(call("w", "b", prompt)), _result())
    assert (plain.prefix_blocks, plain.cached_tokens, plain.cached_tokens_est) == ([], None, None)


def test_views_remember_the_latest_forecasts_only():
    views = WorkflowViews(None, {}, DEFAULT_LIMITS)  # type: ignore[arg-type]
    for i in range(MAX_REMEMBERED_PREDS + 10):
        views.remember(f"c{i}", ({"0.5": float(i)}, None))
    assert len(views._preds) == MAX_REMEMBERED_PREDS
    assert "c0" not in views._preds and f"c{MAX_REMEMBERED_PREDS + 9}" in views._preds


def _inflight(c: CallSpec) -> Inflight:
    return Inflight(
        c,
        "n",
        "n/lm#0",
        0.0,
        0.0,
        DeviceAtDispatch("H100", 0.0, 0.0, 0.0),
        RuntimeAtDispatch(0, 0),
        0,
        [],
        0.0,
        None,
        "",
    )


def _result(prompt_tokens: int = 10) -> Result:
    return Result("c", "n/lm#0", True, "ok", "", 0.0, 1.0, None, prompt_tokens, 3)
