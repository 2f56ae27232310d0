"""The emulated GPU server: the roofline timing functions and continuous batching in fake time."""

import asyncio
import itertools
import json
from collections.abc import Callable

import pytest

from swarmx.backends.base import Api, CallOutcome, CallRequest
from swarmx.backends.emulated import (
    GPUS,
    EmulatedServer,
    ModelProfile,
    decode_step_s,
    drawn_output_tokens,
    filler_text,
    filler_tokens,
    kv_capacity_tokens,
    prefill_s,
    prompt_tokens,
    vision_s,
)
from swarmx.clock import ManualClock
from swarmx.config import ReplicaConfig
from swarmx.sched.prefix import block_hashes

H100, A100, L40S = GPUS["H100"], GPUS["A100"], GPUS["L40S"]
M = ModelProfile()


def llm(prompt: str, max_tokens: int = 64, call_id: str = "c") -> CallRequest:
    return CallRequest(call_id, "llm", "lm", prompt=prompt, max_tokens=max_tokens)


def streamed(prompt: str, max_tokens: int, api: Api, stream: Callable[[str], None]) -> CallRequest:
    return CallRequest(
        "s", "llm", "lm", prompt=prompt, max_tokens=max_tokens, api=api, stream=stream
    )


def server(gpu: str = "H100") -> tuple[EmulatedServer, ManualClock]:
    clock = ManualClock(100.0)
    return EmulatedServer(ReplicaConfig("lm", "emulated", gpu=gpu), clock), clock


def alone_s(gpu, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency, ttft, output tokens) of a lone call, from the timing functions."""
    p = prompt_tokens(prompt)
    n = drawn_output_tokens(prompt, max_tokens)
    first = prefill_s(gpu, M, p) + decode_step_s(gpu, M, [p])
    rest = sum(decode_step_s(gpu, M, [p + g]) for g in range(1, n))
    return first + rest, first, n


# --- timing functions -----------------------------------------------------------------------


def test_prefill_is_linear_in_tokens():
    one = prefill_s(H100, M, 1)
    assert one > 0
    assert prefill_s(H100, M, 0) == 0
    for tokens in (10, 100, 4096):
        assert prefill_s(H100, M, tokens) == pytest.approx(tokens * one)
    # 2 * 8e9 * 1000 / (989e12 * 0.5)
    assert prefill_s(H100, M, 1000) == pytest.approx(0.03236, rel=1e-3)


def test_decode_step_grows_with_batch_and_context():
    base = decode_step_s(H100, M, [100])
    assert decode_step_s(H100, M, [100, 100]) > base
    assert decode_step_s(H100, M, [100] * 16) > decode_step_s(H100, M, [100] * 8)
    assert decode_step_s(H100, M, [4000]) > decode_step_s(H100, M, [1000]) > base
    # the memory term: every extra context token costs its KV bytes once per step
    extra = decode_step_s(H100, M, [1100]) - decode_step_s(H100, M, [100])
    assert extra == pytest.approx(1000 * M.kv_bytes_per_token / (3.35e12 * 0.8))


def test_decode_step_is_compute_bound_at_large_batch():
    batch = [1] * 4096
    compute = 2 * M.params * len(batch) / (H100.dense_flops * H100.mfu)
    assert decode_step_s(H100, M, batch) == pytest.approx(compute + H100.step_overhead_s)


def test_decode_is_fastest_on_h100_then_a100_then_l40s():
    for contexts in ([1], [512], [512] * 8, [2048] * 32):
        h100, a100, l40s = (decode_step_s(g, M, contexts) for g in (H100, A100, L40S))
        assert h100 < a100 < l40s


def test_lone_8b_decode_step_on_h100_matches_the_docstring():
    step = decode_step_s(H100, M, [1])
    assert 0.006 <= step <= 0.008
    assert 125 <= 1 / step <= 170  # "~160 tokens/s"


def test_vision_time_grows_with_pixels_and_steps():
    base = vision_s(H100, 224, 1)
    assert base > H100.step_overhead_s
    assert vision_s(H100, 448, 1) > base
    assert vision_s(H100, 224, 4) > base
    compute = vision_s(H100, 224, 1) - H100.step_overhead_s
    assert vision_s(H100, 448, 2) - H100.step_overhead_s == pytest.approx(8 * compute)


def test_prompt_tokens_is_about_four_bytes_each():
    assert prompt_tokens("") == 1
    assert prompt_tokens("abc") == 1
    assert prompt_tokens("x" * 400) == 100


def test_drawn_output_tokens_is_deterministic_and_bounded():
    prompts = [f"prompt number {i}" for i in range(300)]
    for max_tokens in (1, 2, 16, 256):
        drawn = [drawn_output_tokens(p, max_tokens) for p in prompts]
        assert drawn == [drawn_output_tokens(p, max_tokens) for p in prompts]
        assert all(1 <= d <= max_tokens for d in drawn)
    drawn = [drawn_output_tokens(p, 300) for p in prompts]
    assert len(set(drawn)) > 50  # a spread, not one length
    assert min(drawn) < 60
    assert max(drawn) > 200
    median = sorted(drawn)[len(drawn) // 2]
    assert 70 <= median <= 130  # around a third of max_tokens
    assert drawn_output_tokens("x", 1) == 1


def test_filler_text_is_deterministic_with_a_dozen_words_per_line():
    text = filler_text("seed", 30)
    assert text == filler_text("seed", 30)
    assert [len(line.split()) for line in text.splitlines()] == [12, 12, 6]
    assert filler_text("seed", 0) == ""


def test_filler_tokens_are_the_text_word_by_word() -> None:
    tokens = filler_tokens("seed", 30)
    assert "".join(tokens) == filler_text("seed", 30)
    assert tokens[0] == tokens[0].strip()
    assert [t[0] for t in tokens[1:]] == ["\n" if i % 12 == 0 else " " for i in range(1, 30)]
    assert filler_tokens("seed", 12) == tokens[:12]


# --- the server -----------------------------------------------------------------------------


def test_lone_call_takes_prefill_plus_its_decode_steps():
    prompt = "summarise the repository layout " * 8
    srv, clock = server("H100")
    expected, first, n = alone_s(H100, prompt, 64)
    assert n > 1

    async def main():
        t0 = clock.monotonic()
        out = await srv.run(llm(prompt, 64))
        return out, clock.monotonic() - t0

    out, took = asyncio.run(main())
    assert out.ok
    assert took == pytest.approx(expected, rel=1e-9)
    assert out.ttft_s == pytest.approx(first, rel=1e-9)
    assert out.output_tokens == n
    assert out.prompt_tokens == prompt_tokens(prompt)
    assert out.output == filler_text(prompt, n)
    assert srv.metrics().running == 0


def test_slower_gpu_takes_longer():
    prompt = "write a test plan " * 4

    def took(gpu: str) -> float:
        srv, clock = server(gpu)
        asyncio.run(srv.run(llm(prompt, 64)))
        return clock.monotonic() - 100.0

    assert took("H100") < took("A100") < took("L40S")


def test_concurrent_calls_batch_and_each_take_longer_than_alone():
    a, b = "first prompt about routing " * 6, "second prompt about queues " * 6
    alone_a, _, _ = alone_s(H100, a, 48)
    alone_b, _, _ = alone_s(H100, b, 48)
    srv, clock = server("H100")

    async def timed(request):
        t0 = clock.monotonic()
        out = await srv.run(request)
        return out, clock.monotonic() - t0

    async def main():
        return await asyncio.gather(timed(llm(a, 48, "a")), timed(llm(b, 48, "b")))

    (out_a, took_a), (out_b, took_b) = asyncio.run(main())
    assert out_a.ok
    assert out_b.ok
    assert took_a > alone_a
    assert took_b > alone_b
    # one batch, so the whole lasts less than running them one after the other
    assert max(took_a, took_b) < alone_a + alone_b
    # both prefilled in the same first step
    assert out_a.ttft_s == pytest.approx(out_b.ttft_s)


def test_metrics_count_waiting_and_running_sequences():
    srv, _ = server("H100")
    seen = []

    async def main():
        task = asyncio.create_task(srv.run(llm("a long prompt " * 10, 64)))
        await asyncio.sleep(0)  # inside run, waiting for its prefill
        seen.append(srv.metrics())
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # one step done
        seen.append(srv.metrics())
        await task
        seen.append(srv.metrics())

    asyncio.run(main())
    assert (seen[0].queued, seen[0].running) == (1, 0)
    assert (seen[1].queued, seen[1].running) == (0, 1)
    assert (seen[2].queued, seen[2].running) == (0, 0)


def test_a_call_joining_mid_stream_pays_its_own_prefill():
    late_prompt = "a late prompt " * 100
    srv, _ = server("H100")

    async def main():
        early = asyncio.create_task(srv.run(llm("an early prompt", 200, "early")))
        for _ in range(5):
            await asyncio.sleep(0)
        late = await srv.run(llm(late_prompt, 8, "late"))
        await early
        return late

    late = asyncio.run(main())
    assert late.ok
    assert late.ttft_s is not None
    assert late.ttft_s >= prefill_s(H100, M, prompt_tokens(late_prompt))


def test_cancelled_call_leaves_the_batch():
    srv, _ = server("H100")

    async def main():
        task = asyncio.create_task(srv.run(llm("to be cancelled " * 4, 256)))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert srv.metrics().running == 0
        out = await srv.run(llm("next", 8))  # the server keeps serving
        assert out.ok

    asyncio.run(main())


def test_model_calls_take_vision_time():
    srv, clock = server("A100")
    request = CallRequest(
        "v", "model", "vision", prompt="a cat", inputs={"image_px": "448", "steps": "3"}
    )
    out = asyncio.run(srv.run(request))
    assert out.ok
    assert clock.monotonic() - 100.0 == pytest.approx(vision_s(A100, 448, 3))
    assert out.output_tokens == 8 + 448 // 128
    assert out.ttft_s is None


def test_model_calls_default_to_one_step_at_224px():
    srv, clock = server("H100")
    out = asyncio.run(srv.run(CallRequest("v", "model", "vision")))
    assert out.ok
    assert clock.monotonic() - 100.0 == pytest.approx(vision_s(H100, 224, 1))


def test_bad_model_inputs_fail_the_call():
    srv, _ = server("H100")
    out = asyncio.run(srv.run(CallRequest("v", "model", "vision", inputs={"image_px": "big"})))
    assert not out.ok
    assert "bad model inputs" in out.error


def test_unknown_gpu_raises():
    with pytest.raises(ValueError, match="unknown GPU 'TPU'"):
        EmulatedServer(ReplicaConfig("lm", "emulated", gpu="TPU"), ManualClock(100.0))


def test_tool_calls_are_refused():
    srv, clock = server("H100")
    out = asyncio.run(srv.run(CallRequest("t", "tool", "tool", command=["echo", "hi"])))
    assert not out.ok
    assert "not tool" in out.error
    assert clock.monotonic() == 100.0


def test_close_fails_active_calls():
    srv, _ = server("H100")

    async def main():
        task = asyncio.create_task(srv.run(llm("closing " * 4, 256)))
        await asyncio.sleep(0)
        await srv.close()
        return await task

    out = asyncio.run(main())
    assert not out.ok
    assert out.error == "replica closed"


def test_a_streamed_call_sends_a_chunk_per_token_as_each_step_ends() -> None:
    prompt = "stream the plan " * 8
    srv, clock = server("H100")
    _, first_s, n = alone_s(H100, prompt, 64)
    assert 12 < n < 64  # a newline among the words, and a stop before max_tokens
    arrived: list[tuple[float, str]] = []

    async def main() -> CallOutcome:
        t0 = clock.monotonic()
        out = await srv.run(
            streamed(prompt, 64, "chat", lambda c: arrived.append((clock.monotonic() - t0, c)))
        )
        assert len(arrived) == 1 + n + 2  # all of them before the outcome
        return out

    out = asyncio.run(main())
    times = [t for t, _ in arrived]
    chunks = [json.loads(c) for _, c in arrived]
    assert {(c["id"], c["object"], c["created"]) for c in chunks} == {
        ("chatcmpl-s", "chat.completion.chunk", int(ManualClock(100.0).time()))
    }
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert deltas == filler_tokens(prompt, n)
    assert "".join(deltas) == out.output
    assert times[1] == pytest.approx(first_s)  # the first token as its step ends
    assert all(a < b for a, b in itertools.pairwise(times[1:-2]))  # a step each
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": out.prompt_tokens + n,
    }


def test_a_streamed_completion_that_hits_max_tokens_finishes_for_length() -> None:
    srv, _ = server("H100")
    chunks: list[str] = []
    out = asyncio.run(srv.run(streamed("a prompt", 1, "completions", chunks.append)))
    assert (out.ok, out.output_tokens) == (True, 1)
    assert [json.loads(c)["choices"] for c in chunks] == [
        [{"index": 0, "text": out.output, "finish_reason": None, "logprobs": None}],
        [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}],
        [],
    ]


def test_a_cancelled_streamed_call_sends_no_more_chunks() -> None:
    srv, _ = server("H100")
    chunks: list[str] = []

    async def main() -> None:
        def stream(chunk: str) -> None:
            chunks.append(chunk)
            if len(chunks) == 3:  # the role and two tokens
                assert task.cancel()

        task = asyncio.create_task(srv.run(streamed("to be cancelled " * 4, 256, "chat", stream)))
        with pytest.raises(asyncio.CancelledError):
            await task
        seen = len(chunks)
        assert (await srv.run(llm("next", 8))).ok  # steps go on for the server's other calls
        assert len(chunks) == seen
        assert not any(json.loads(c)["choices"] == [] for c in chunks)

    asyncio.run(main())


def test_a_prompt_seen_before_prefills_only_its_uncached_tail() -> None:
    """The emulated replica keeps the prompt blocks of the calls it ran (`PrefixCache`, the
    simulator's too): a call repeating a prompt prefills only its last partial block."""
    prompt = "the repository layout, file by file: " * 40  # 1,520 bytes: 5 whole blocks
    srv, clock = server("H100")

    async def timed() -> tuple[CallOutcome, float]:
        t0 = clock.monotonic()
        out = await srv.run(llm(prompt, 64))
        return out, clock.monotonic() - t0

    cold, cold_s = asyncio.run(timed())
    warm, warm_s = asyncio.run(timed())
    tokens = prompt_tokens(prompt)
    assert (cold.cached_tokens, warm.cached_tokens) == (0, 5 * 64)
    saved_s = prefill_s(H100, M, tokens) - prefill_s(H100, M, tokens - 5 * 64)
    assert cold.ttft_s - warm.ttft_s == pytest.approx(saved_s)
    assert cold_s - warm_s == pytest.approx(saved_s)
    metrics = srv.metrics()
    assert metrics.prefix_cache_blocks == 5
    assert metrics.prefix_cache_capacity == kv_capacity_tokens(H100, M) // 64
    assert (srv.cache.prompt_tokens, srv.cache.cached_tokens) == (2 * tokens, 5 * 64)
    report = srv.cache_report()  # nothing evicted: the scheduler's index is told so
    assert (report.removed, report.capacity_tokens) == ([], kv_capacity_tokens(H100, M))
    srv.cache.fit(kv_capacity_tokens(H100, M) - 2 * 64)  # running contexts take the room
    assert srv.cache_report().removed == block_hashes(prompt)[:1:-1]  # 2 stay: the tail went
    assert srv.cache_report().removed == []
