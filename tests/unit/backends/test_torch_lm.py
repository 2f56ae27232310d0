"""The embedded torch models: outcomes, determinism, and latency that truly follows prompt length,
output length and load (continuous batching), the LM's prefix cache (the same outputs, fewer
tokens prefilled, an LRU budget), plus cancellation and close.

Cost checks compare medians of a few runs as ratios of compute, read from the process's CPU time
(`CpuClock`, which the backend is also given): other processes on a busy machine stretch wall
time, not the work a call does. Queueing checks count engine iterations (`TickClock`) instead of
seconds. No check depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import torch

from swarmx.backends.base import Api, CallOutcome, CallRequest
from swarmx.backends.torch_lm import EOS, VISION_WORDS, TorchLM, TorchVision, _ByteLM
from swarmx.clock import RealClock
from swarmx.config import ReplicaConfig
from swarmx.sched.prefix import BLOCK_BYTES, block_hashes

B = TypeVar("B", TorchLM, TorchVision)
NO_EOS = float("-inf")
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 12


WITHIN_S = 30.0
"""How long a wait for the engine polls before it fails."""


class CpuClock(RealClock):
    """The process's CPU time as a clock: a duration it measures is the compute spent meanwhile
    (the engine thread's, as nothing else in the process works then), which a busy machine
    delays but does not inflate."""

    def monotonic(self) -> float:
        return time.process_time()


class TickClock(RealClock):
    """A clock that advances one tick each time it is read. The engine reads it once per token
    it samples, so a time to first token measured with it counts engine iterations."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def monotonic(self) -> float:
        return float(next(self._ticks))


CPU = CpuClock()


async def until(predicate: Callable[[], object], within_s: float = WITHIN_S) -> None:
    """Poll until ``predicate()`` holds; fail after ``within_s`` of wall time."""
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def lm_cfg(**changes: Any) -> ReplicaConfig:
    return ReplicaConfig(model="tiny-lm", backend="torch", **changes)


def vision_cfg() -> ReplicaConfig:
    return ReplicaConfig(model="tiny-ocr", backend="torch", arch="vision")


def llm(prompt: str, max_tokens: int) -> CallRequest:
    return CallRequest(
        call_id="c", kind="llm", model="tiny-lm", prompt=prompt, max_tokens=max_tokens
    )


def streamed(prompt: str, max_tokens: int, api: Api, chunks: list[str]) -> CallRequest:
    return CallRequest(
        call_id="s",
        kind="llm",
        model="tiny-lm",
        prompt=prompt,
        max_tokens=max_tokens,
        api=api,
        stream=chunks.append,
    )


def texts(chunks: list[str]) -> list[str]:
    """The text each chunk adds (chat deltas' content or completion text), "" where none."""
    added = []
    for chunk in map(json.loads, chunks):
        choice = chunk["choices"][0] if chunk["choices"] else {}
        added.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return added


def assert_stream_ends(chunks: list[str], reason: str, out: CallOutcome) -> None:
    """A finish chunk with ``reason`` and no text, then usage with the outcome's counts."""
    *_, finish, usage = map(json.loads, chunks)
    assert [c["finish_reason"] for c in finish["choices"]] == [reason]
    assert texts(chunks[-2:]) == ["", ""]
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.output_tokens,
        "total_tokens": out.prompt_tokens + out.output_tokens,
    }


def vision(prompt: str = "scan of an invoice", **inputs: str) -> CallRequest:
    return CallRequest(call_id="v", kind="model", model="tiny-ocr", prompt=prompt, inputs=inputs)


@asynccontextmanager
async def started(backend: B) -> AsyncIterator[B]:
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def timed(call: Awaitable[CallOutcome], clock: RealClock = CPU) -> tuple[float, CallOutcome]:
    """The call's outcome, and how long it took on ``clock`` (CPU time unless given)."""
    t0 = clock.monotonic()
    outcome = await call
    return clock.monotonic() - t0, outcome


async def median_s(make: Callable[[], Awaitable[object]], runs: int = 3) -> float:
    """The median CPU time of a few runs of ``make()``."""
    times = []
    for _ in range(runs):
        t0 = CPU.monotonic()
        await make()
        times.append(CPU.monotonic() - t0)
    return statistics.median(times)


def per_token_s(elapsed: float, outcome: CallOutcome) -> float:
    assert outcome.ttft_s is not None
    return (elapsed - outcome.ttft_s) / (outcome.output_tokens - 1)


def test_call_reports_tokens_and_ttft():
    prompt = "Résumé of the report, in three bullet points:\n"

    async def main() -> None:
        async with started(TorchLM(lm_cfg())) as lm:  # wall time: the order needs no speed
            elapsed, out = await timed(lm.run(llm(prompt, 32)), RealClock())
            assert out.ok, out.error
            assert out.prompt_tokens == len(prompt.encode())
            assert 0 <= out.output_tokens <= 32
            assert out.ttft_s is not None
            assert 0 < out.ttft_s < elapsed
            assert lm.metrics().queued == 0
            assert lm.metrics().running == 0

    asyncio.run(main())


def test_outputs_are_text_with_lines_and_hit_max_tokens_without_eos():
    async def main() -> None:
        async with started(TorchLM(lm_cfg(), eos_bias=NO_EOS)) as lm:
            out = await lm.run(llm("Write a long story.", 256))
            assert out.ok
            assert out.output_tokens == 256
            assert "\n" in out.output  # downstream steps split outputs into lines
            assert sum(c.isalpha() or c == " " for c in out.output) > 128

    asyncio.run(main())


def test_a_streamed_call_sends_its_tokens_as_openai_chunks() -> None:
    async def main() -> None:
        async with started(TorchLM(lm_cfg())) as lm:
            chat: list[str] = []
            # this prompt samples bytes that are no UTF-8: they stream as U+FFFD, as decoded
            out = await lm.run(streamed("Write a haiku.", 64, "chat", chat))
            assert out.ok
            assert "\ufffd" in out.output
            assert out.output_tokens == 64
            assert json.loads(chat[0])["choices"][0]["delta"] == {
                "role": "assistant",
                "content": "",
            }
            assert {json.loads(c)["object"] for c in chat} == {"chat.completion.chunk"}
            assert {json.loads(c)["id"] for c in chat} == {"chatcmpl-s"}
            assert "".join(texts(chat)) == out.output
            # role, a chunk a byte (but none for a byte that opens a character), finish, usage
            assert all(texts(chat[1:-2]))
            assert len(chat) - 3 == out.output_tokens - 1
            assert_stream_ends(chat, "length", out)

            completions: list[str] = []
            out = await lm.run(streamed("Once upon a time", 64, "completions", completions))
            assert out.ok
            assert out.output_tokens < 64  # it sampled EOS
            assert {json.loads(c)["object"] for c in completions} == {"text_completion"}
            assert "".join(texts(completions)) == out.output
            assert_stream_ends(completions, "stop", out)
            plain = await lm.run(llm("Once upon a time", 64))
            plain_counts = (plain.output, plain.prompt_tokens, plain.output_tokens)
            assert plain_counts == (out.output, out.prompt_tokens, out.output_tokens)

    asyncio.run(main())


def test_a_character_split_over_byte_tokens_streams_once_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sampled = iter([*"é€".encode(), 0xFF, *b"ok", EOS])

    def scripted(*args: object, **kwargs: object) -> torch.Tensor:
        return torch.tensor([next(sampled)])

    async def main() -> None:
        async with started(TorchLM(lm_cfg())) as lm:
            chunks: list[str] = []
            with monkeypatch.context() as patch:
                patch.setattr(torch, "multinomial", scripted)
                out = await lm.run(streamed("hi", 16, "completions", chunks))
            assert (out.output, out.output_tokens) == ("é€\ufffdok", 8)
            assert texts(chunks)[:-2] == ["é", "€", "\ufffd", "o", "k"]  # none for part of one
            assert_stream_ends(chunks, "stop", out)

    asyncio.run(main())


def test_no_chunk_reaches_a_cancelled_caller() -> None:
    async def main() -> None:
        async with started(TorchLM(lm_cfg(concurrency=1), eos_bias=NO_EOS)) as lm:
            chunks: list[str] = []

            def stream(chunk: str) -> None:
                chunks.append(chunk)
                if any(texts([chunk])):  # the first token: the call is still running
                    assert task.cancel()

            request = CallRequest(
                call_id="s",
                kind="llm",
                model="tiny-lm",
                prompt="long",
                max_tokens=512,
                stream=stream,
            )
            task = asyncio.create_task(lm.run(request))
            with pytest.raises(asyncio.CancelledError):
                await task
            seen = len(chunks)
            # the engine drops the call before it runs this one, and its outcome comes after
            # whatever the cancelled call had sampled meanwhile
            assert (await lm.run(llm("short", 4))).ok
            assert len(chunks) == seen
            assert not any(c["choices"] == [] for c in map(json.loads, chunks))

    asyncio.run(main())


def test_long_prompts_keep_their_end():
    async def main() -> None:
        async with started(TorchLM(lm_cfg())) as lm:
            out = await lm.run(llm("x" * 5000, 24))
            assert out.ok
            assert out.prompt_tokens == 1024 - 1 - 24  # context minus max_tokens minus EOS

    asyncio.run(main())


def test_same_prompt_same_output_and_lengths_vary_by_prompt():
    async def main() -> None:
        async with started(TorchLM(lm_cfg())) as lm:
            first = await lm.run(llm("Summarize: the cat sat on the mat.", 128))
            again = await lm.run(llm("Summarize: the cat sat on the mat.", 128))
            assert (again.output, again.output_tokens) == (first.output, first.output_tokens)
            lengths = {
                (await lm.run(llm(f"Task {i}: list the steps.", 128))).output_tokens
                for i in range(8)
            }
            assert len(lengths) >= 4
        async with started(TorchLM(lm_cfg())) as other:  # same seed, same weights
            same = await other.run(llm("Summarize: the cat sat on the mat.", 128))
            assert same.output == first.output

    asyncio.run(main())


def test_latency_grows_with_output_and_prompt_length():
    async def main() -> None:
        # no prefix cache: the runs after the first would find the long prompt's blocks cached
        lm = TorchLM(lm_cfg(), eos_bias=NO_EOS, clock=CPU, prefix_cache_blocks=0)
        async with started(lm):
            await lm.run(llm("warm up", 4))
            short_out = await median_s(lambda: lm.run(llm(TEXT[:20], 8)))
            long_out = await median_s(lambda: lm.run(llm(TEXT[:20], 128)))
            short_prompt = await median_s(lambda: lm.run(llm(TEXT[:20], 2)))
            long_prompt = await median_s(lambda: lm.run(llm(TEXT[:800], 2)))
        assert long_out > 1.5 * short_out
        assert long_prompt > 1.5 * short_prompt

    asyncio.run(main())


def test_concurrent_calls_share_decode_steps():
    async def main() -> None:
        async with started(TorchLM(lm_cfg(concurrency=4), eos_bias=NO_EOS, clock=CPU)) as lm:
            await lm.run(llm("warm up", 4))
            lone, batches = [], []
            for _ in range(5):
                lone.append(await timed(lm.run(llm(TEXT[:30], 64))))
                batches.append(await timed_batch(lm))
        # Compute (CPU time, ttft included): one call after another would take 4x.
        lone_cpu = statistics.median(cpu for cpu, _ in lone)
        assert statistics.median(cpu for cpu, _ in batches) < 2.5 * lone_cpu
        lone_tok = statistics.median(per_token_s(*run) for run in lone)
        batched_tok = statistics.median(per_token_s(*run) for _, runs in batches for run in runs)
        assert batched_tok > 1.2 * lone_tok  # a step over four rows costs more than over one

    async def timed_batch(lm: TorchLM) -> tuple[float, list[tuple[float, CallOutcome]]]:
        t0 = CPU.monotonic()
        runs = await asyncio.gather(*(timed(lm.run(llm(TEXT[i : i + 30], 64))) for i in range(4)))
        return CPU.monotonic() - t0, runs

    asyncio.run(main())


def test_admission_is_bounded_by_concurrency():
    async def main() -> None:
        ticks = TickClock()
        async with started(TorchLM(lm_cfg(concurrency=2), eos_bias=NO_EOS, clock=ticks)) as lm:
            calls = [asyncio.create_task(lm.run(llm(f"call {i}", 96))) for i in range(4)]
            await until(lambda: lm.metrics().kv_cache_usage)  # the engine has prefilled a call
            metrics = lm.metrics()
            assert (metrics.queued, metrics.running) == (2, 2)
            assert metrics.kv_cache_usage is not None
            assert 0 < metrics.kv_cache_usage < 1
            outs = await asyncio.gather(*calls)
            assert all(out.ok and out.output_tokens == 96 for out in outs)
            # The last two waited for rows: their time to first token includes the queue, here
            # the ~95 engine iterations a first call took to finish (a few for the first call).
            assert outs[3].ttft_s is not None
            assert outs[0].ttft_s is not None
            assert outs[3].ttft_s > outs[0].ttft_s + 48

    asyncio.run(main())


def test_cancelling_a_call_frees_its_slot():
    async def main() -> None:
        ticks = TickClock()
        async with started(TorchLM(lm_cfg(concurrency=1), eos_bias=NO_EOS, clock=ticks)) as lm:
            long_call = asyncio.create_task(lm.run(llm("a very long answer", 512)))
            await until(lambda: lm.metrics().kv_cache_usage)  # the engine has prefilled it
            assert lm.metrics().running == 1
            long_call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long_call
            out = await lm.run(llm("short", 8))
            assert out.ok
            # counted in engine iterations: the 512-token call would hold the only row for
            # hundreds more; the short call waits for the one that evicts it
            assert out.ttft_s is not None
            assert out.ttft_s < 100
            assert (lm.metrics().queued, lm.metrics().running) == (0, 0)

    asyncio.run(main())


def test_close_fails_pending_calls_and_later_ones():
    async def main() -> None:
        lm = TorchLM(lm_cfg(concurrency=1), eos_bias=NO_EOS)
        await lm.start()
        running = asyncio.create_task(lm.run(llm("a very long answer", 512)))
        queued = asyncio.create_task(lm.run(llm("next", 8)))
        await until(lambda: lm.metrics().kv_cache_usage and lm.metrics().queued == 1)
        await asyncio.wait_for(lm.close(), timeout=WITHIN_S)
        for task in (running, queued):
            out = await asyncio.wait_for(task, timeout=WITHIN_S)
            assert not out.ok
            assert "closed" in out.error
        after = await lm.run(llm("hello", 8))
        assert not after.ok
        assert "not running" in after.error
        await lm.close()  # idempotent

    asyncio.run(main())


def test_a_model_error_fails_the_call_not_the_replica(monkeypatch: pytest.MonkeyPatch):
    def out_of_memory(*args: object) -> None:
        raise RuntimeError("out of memory (simulated)")

    async def main() -> None:
        async with started(TorchLM(lm_cfg())) as lm:
            with monkeypatch.context() as patch:
                patch.setattr(_ByteLM, "forward", out_of_memory)
                out = await lm.run(llm(TEXT, 8))
            assert not out.ok
            assert "out of memory" in out.error
            assert lm.cached_block_ids() == []  # no block of a failed prefill is kept
            assert lm.metrics().running == 0
            assert (await lm.run(llm("hello", 8))).ok

    asyncio.run(main())


def uncached() -> TorchLM:
    return TorchLM(lm_cfg(), eos_bias=NO_EOS, prefix_cache_blocks=0)


def test_a_cached_prefix_is_not_prefilled_and_changes_no_output():
    turn1 = TEXT[:700]
    turn2 = TEXT[:900]  # the next agent turn: the first one's prompt plus more

    async def main() -> None:
        async with started(uncached()) as plain:
            want1 = await plain.run(llm(turn1, 16))
            want2 = await plain.run(llm(turn2, 16))
            whole = await plain.run(llm(TEXT[: 2 * BLOCK_BYTES], 16))
            assert (want1.cached_tokens, want2.cached_tokens) == (0, 0)
            assert plain.cached_block_ids() == []
            metrics = plain.metrics()
            assert (metrics.prefix_cache_blocks, metrics.prefix_cache_capacity) == (0, 0)
        async with started(TorchLM(lm_cfg(), eos_bias=NO_EOS)) as lm:
            first = await lm.run(llm(turn1, 16))
            again = await lm.run(llm(turn1, 16))
            assert (first.cached_tokens, again.cached_tokens) == (0, 2 * BLOCK_BYTES)
            assert first.output == again.output == want1.output
            assert again.prompt_tokens == want1.prompt_tokens == 700
            extended = await lm.run(llm(turn2, 16))
            assert extended.cached_tokens == 2 * BLOCK_BYTES  # turn 1 held its first two blocks
            assert extended.output == want2.output
            # a prompt of whole blocks, all held, still prefills its last token
            ends_a_block = await lm.run(llm(TEXT[: 2 * BLOCK_BYTES], 16))
            assert ends_a_block.cached_tokens == 2 * BLOCK_BYTES - 1
            assert ends_a_block.output == whole.output
            # the blocks are the scheduler's: the same hashes of the same prompt
            assert set(lm.cached_block_ids()) == set(block_hashes(turn2))
            metrics = lm.metrics()
            assert (metrics.prefix_cache_blocks, metrics.prefix_cache_capacity) == (3, 16)

    asyncio.run(main())


def test_a_cached_prefix_saves_its_prefill_compute():
    prompt = TEXT[:800]

    async def main() -> None:
        async with started(uncached()) as plain, started(TorchLM(lm_cfg(), eos_bias=NO_EOS)) as lm:
            await lm.run(llm(prompt, 2))  # now holds its three blocks
            computed = await median_s(lambda: plain.run(llm(prompt, 2)))
            reused = await median_s(lambda: lm.run(llm(prompt, 2)))
        assert reused < 0.5 * computed  # 33 tokens prefilled instead of 801

    asyncio.run(main())


def test_a_truncated_prompt_caches_the_blocks_it_feeds():
    prompt = TEXT * 3

    async def main() -> None:
        async with started(TorchLM(lm_cfg(), eos_bias=NO_EOS)) as lm:
            first = await lm.run(llm(prompt, 16))
            fed = prompt.encode()[-first.prompt_tokens :]
            assert lm.cached_block_ids() == block_hashes(fed)[::-1]  # least recent (tail) first
            again = await lm.run(llm(prompt, 16))
            assert again.cached_tokens == 3 * BLOCK_BYTES
            assert again.output == first.output

    asyncio.run(main())


def test_a_prompt_shorter_than_a_block_caches_nothing():
    async def main() -> None:
        async with started(TorchLM(lm_cfg(), eos_bias=NO_EOS)) as lm:
            for _ in range(2):
                out = await lm.run(llm(TEXT[: BLOCK_BYTES - 1], 8))
                assert out.ok
                assert out.cached_tokens == 0
            assert lm.cached_block_ids() == []
            assert lm.metrics().prefix_cache_blocks == 0

    asyncio.run(main())


def test_the_prefix_cache_keeps_its_budget_and_evicts_the_least_recently_used():
    with pytest.raises(ValueError, match="prefix_cache_blocks"):
        TorchLM(lm_cfg(), prefix_cache_blocks=-1)
    a, b, c, d = (f"{name}: {TEXT}"[:600] for name in ("a", "b", "c", "d"))  # two blocks each

    async def cached_tokens(lm: TorchLM, prompt: str) -> int:
        out = await lm.run(llm(prompt, 4))
        assert out.ok
        held = lm.metrics().prefix_cache_blocks
        assert held is not None
        assert held <= 4
        return out.cached_tokens

    async def main() -> None:
        async with started(TorchLM(lm_cfg(), eos_bias=NO_EOS, prefix_cache_blocks=4)) as lm:
            assert lm.metrics().prefix_cache_capacity == 4
            assert [await cached_tokens(lm, p) for p in (a, b, a, c)] == [0, 0, 512, 0]
            # a, used again, outlives b, left alone since
            assert set(lm.cached_block_ids()) == set(block_hashes(a) + block_hashes(c))
            report = lm.cache_report()  # what the scheduler's index is told: b's blocks went
            assert report.removed == block_hashes(b)[::-1]
            assert (report.resets, report.capacity_tokens) == (0, 4 * BLOCK_BYTES)
            assert lm.cache_report().removed == []  # told once
            # one more block sheds a's tail, not its head: its first block still serves
            assert await cached_tokens(lm, d[:BLOCK_BYTES]) == 0
            assert await cached_tokens(lm, a) == BLOCK_BYTES
            assert await cached_tokens(lm, b) == 0
            held = set(lm.cached_block_ids())
            assert not held & set(lm.cache_report().removed)  # evicted, then back: not gone

    asyncio.run(main())


def test_concurrent_calls_sharing_a_prefix_match_the_uncached_outputs():
    shared = TEXT[:600]
    calls = [(f"{shared} Question {i}: why?", 6 + 3 * i) for i in range(6)]

    async def main() -> None:
        async with started(uncached()) as plain:
            want = [(await plain.run(llm(p, n))).output for p, n in calls]
        # four rows for six calls: rows free up and move while later calls are admitted
        async with started(TorchLM(lm_cfg(concurrency=4), eos_bias=NO_EOS)) as lm:
            outs = await asyncio.gather(*(lm.run(llm(p, n)) for p, n in calls))
        assert [out.output for out in outs] == want
        # the first one admitted prefilled the shared blocks, the others found them
        assert sorted(out.cached_tokens for out in outs) == [0, *[2 * BLOCK_BYTES] * 5]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (CallRequest(call_id="t", kind="tool", model="tiny-lm", command=["ls"]), "llm calls"),
        (llm("hi", -1), "max_tokens"),
    ],
)
def test_lm_rejects_bad_requests(request_: CallRequest, error: str):
    async def main() -> None:
        async with started(TorchLM(lm_cfg())) as lm:
            out = await lm.run(request_)
            assert not out.ok
            assert error in out.error

    asyncio.run(main())


def test_vision_names_words_and_costs_grow_with_pixels_and_steps():
    async def main() -> None:
        async with started(TorchVision(vision_cfg(), clock=CPU)) as vm:
            out = await vm.run(vision())
            assert out.ok, out.error
            words = out.output.split(" ")
            assert len(words) == out.output_tokens == 8
            assert set(words) <= set(VISION_WORDS)
            assert len(set(words)) == 8
            assert out.prompt_tokens == len(b"scan of an invoice")
            assert out.ttft_s is None
            assert (await vm.run(vision())).output == out.output
            assert (await vm.run(vision("photo of a street"))).output != out.output
            big = await vm.run(vision(image_px="512"))
            assert big.output_tokens > 8
            small_s = await median_s(lambda: vm.run(vision(image_px="224")))
            big_s = await median_s(lambda: vm.run(vision(image_px="512")))
            many_steps_s = await median_s(lambda: vm.run(vision(image_px="224", steps="8")))
            assert big_s > 1.5 * small_s
            assert many_steps_s > 1.5 * small_s
            batch = await asyncio.gather(*(vm.run(vision(f"page {i}")) for i in range(4)))
            assert all(o.ok and o.output_tokens == 8 for o in batch)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (CallRequest(call_id="t", kind="tool", model="tiny-ocr", command=["ls"]), "model calls"),
        (vision(image_px="big"), "image_px"),
        (vision(steps="1.5"), "steps"),
    ],
)
def test_vision_rejects_bad_requests(request_: CallRequest, error: str):
    async def main() -> None:
        async with started(TorchVision(vision_cfg())) as vm:
            out = await vm.run(request_)
            assert not out.ok
            assert error in out.error

    asyncio.run(main())
