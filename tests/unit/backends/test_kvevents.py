"""The engine's KV events (vLLM's and SGLang's wire format) read into a mirror of its prefix cache,
and its evictions turned into SwarmX's block ids."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from swarmx.backends.kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineBlocks,
    EventError,
    decode_batch,
)
from swarmx.sched.prefix import block_hashes

SIZE = 16


def frame(*events: list) -> bytes:
    """A batch as vLLM's publisher encodes it: msgspec array-like structs, tagged by name."""
    return msgspec.msgpack.encode([1.5, list(events)])


def chain(tokens: list[int], size: int = SIZE) -> list[bytes]:
    """vLLM-style chained block hashes (newer releases send digests, not ints)."""
    out, parent = [], b""
    for start in range(0, len(tokens) - size + 1, size):
        parent = hashlib.sha256(parent + bytes(tokens[start : start + size])).digest()
        out.append(parent)
    return out


def stored(tokens: list[int], first: int = 0) -> BlockStored:
    """The engine stored ``tokens``' blocks from block ``first`` on."""
    hashes = chain(tokens)
    return BlockStored(
        hashes[first:],
        hashes[first - 1] if first else None,
        tokens[first * SIZE : len(hashes) * SIZE],
        SIZE,
    )


def prompt(text: str) -> tuple[list[int], list[int]]:
    """A prompt's SwarmX blocks, and its tokens as the fake engine's template makes them."""
    tokens = list(f"<|user|>{text}<|assistant|>".encode())
    return block_hashes(text), tokens


# --- the wire -----------------------------------------------------------------------------------


def test_a_batch_decodes_with_int_or_digest_hashes_and_ignores_fields_newer_releases_add():
    events = decode_batch(
        frame(
            ["BlockStored", [1, 2], None, list(range(32)), 16, None, "GPU", "lora-x", 7],
            ["BlockStored", [b"\x01" * 32], 2, list(range(16)), 16],
            ["BlockRemoved", [2], "GPU"],
            ["AllBlocksCleared"],
        )
        + b""
    )
    assert [type(e) for e in events] == [BlockStored, BlockStored, BlockRemoved, AllBlocksCleared]
    first = events[0]
    assert isinstance(first, BlockStored)
    assert first.block_hashes == [1, 2] and first.block_size == 16
    assert decode_batch(msgspec.msgpack.encode([1.0, [], 3])) == []  # data_parallel_rank


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "truncated"),
        (b"\xc1junk", "malformed"),
        (msgspec.msgpack.encode({"ts": 1}), "array"),
        (frame(["Evicted", [1]]), "Evicted"),
        (frame(["BlockStored", [1], None, [1, 2, 3], 16]), "3 token ids for 1 blocks of 16"),
        (frame(["BlockStored", [1], None, [], 0]), "blocks of 0"),
        (frame(["BlockRemoved", "not a list"]), "Expected `array`, got `str`"),
    ],
)
def test_a_frame_of_another_shape_is_refused_with_a_reason(payload, why):
    with pytest.raises(EventError, match=why):
        decode_batch(payload)


# --- the mirror ---------------------------------------------------------------------------------


def test_it_follows_what_the_engine_stores_and_evicts():
    blocks = EngineBlocks()
    tokens = list(range(64))
    blocks.apply([stored(tokens[:32])])
    assert len(blocks) == 2 and blocks.held(tokens) == chain(tokens)[:2]
    blocks.apply([stored(tokens, first=2)])  # a longer prompt sharing the first two blocks
    assert blocks.held(tokens) == chain(tokens)
    blocks.apply([BlockRemoved([chain(tokens)[2]])])
    assert blocks.held(tokens) == chain(tokens)[:2]  # the path stops at the first one gone
    assert blocks.held([9, *tokens[1:]]) == []  # another first block: nothing
    blocks.apply([AllBlocksCleared()])
    assert len(blocks) == 0 and blocks.resets == 1


def test_an_evicted_tail_is_reported_as_the_swarmx_blocks_past_what_stays_usable():
    blocks = EngineBlocks()
    ours, tokens = prompt("x" * 4096)  # 16 SwarmX blocks; 4117 tokens, 257 engine blocks
    blocks.apply([stored(tokens)])
    assert blocks.track(ours, tokens) == 257
    hashes = chain(tokens)
    blocks.apply([BlockRemoved(hashes[:99:-1])])  # the engine evicts from the tail: 157 go
    report = blocks.report()
    # 100 engine blocks stay: 1600 tokens, of which 1592 are the prompt's: 6 whole blocks of 256
    assert set(report.removed) == set(ours[6:]) and len(report.removed) == 10
    assert blocks.report().removed == []  # handed over once
    blocks.apply([BlockRemoved(hashes[:100][::-1])])
    assert set(blocks.report().removed) == set(ours[:6])


@pytest.mark.parametrize("kept", [0, 1, 15, 16, 17, 100, 200, 256])
def test_the_report_never_counts_a_block_held_that_the_engine_lost(kept):
    """Whatever the tail-first eviction leaves, the SwarmX blocks still counted held are
    covered by the engine blocks that are."""
    blocks = EngineBlocks()
    text = "y" * 4096
    ours, tokens = prompt(text)
    blocks.apply([stored(tokens)])
    blocks.track(ours, tokens)
    hashes = chain(tokens)
    blocks.apply([BlockRemoved(hashes[kept:][::-1])])
    gone = set(blocks.report().removed)
    still = [b for b in ours if b not in gone]
    held_bytes = max(0, kept * SIZE - len(b"<|user|>"))
    assert len(still) * 256 <= held_bytes
    assert len(still) >= held_bytes // 256 - 1  # exact to a step


def test_a_prompt_tracked_again_is_joined_once_and_old_prompts_age_out():
    blocks = EngineBlocks(max_tracked=2)
    prompts = [prompt(c * 1024) for c in "abc"]
    for ours, tokens in prompts:
        blocks.apply([stored(tokens)])
        blocks.track(ours, tokens)
        blocks.track(ours, tokens)
    # "a" aged out: its blocks going is not reported; "c"'s is
    tokens_a = prompts[0][1]
    ours_c, tokens_c = prompts[2]
    blocks.apply([BlockRemoved(chain(tokens_a)[::-1]), BlockRemoved(chain(tokens_c)[::-1])])
    assert set(blocks.report().removed) == set(ours_c)


def test_a_publisher_that_only_stores_is_bounded_and_counted():
    blocks = EngineBlocks(max_blocks=10)
    blocks.apply([stored(list(range(16 * 12)))])
    assert len(blocks) == 10 and blocks.refused == 1


def test_its_size_is_the_most_it_held_since_it_first_evicted():
    """An engine evicts only when full, and stays full after: what it holds from then on is
    its size (a mirror that joined late counts low at first, then grows to it)."""
    blocks = EngineBlocks()
    tokens = list(range(16 * 8))
    blocks.apply([stored(tokens[: 16 * 6])])
    assert blocks.report().capacity_tokens is None  # never full yet
    blocks.apply([BlockRemoved(chain(tokens)[5:6]), stored(tokens, first=6)])  # room, then 2
    assert blocks.report().capacity_tokens == 7 * SIZE
    blocks.apply([BlockRemoved(chain(tokens)[-1:])])  # holds fewer now: the size stands
    assert blocks.report().capacity_tokens == 7 * SIZE
    blocks.apply([stored(list(range(100, 100 + 16 * 3)))])  # blocks it held unseen before
    assert blocks.report().capacity_tokens == 9 * SIZE


def test_a_removal_of_blocks_never_seen_changes_nothing():
    blocks = EngineBlocks()
    ours, tokens = prompt("z" * 1024)
    blocks.apply([stored(tokens)])
    blocks.track(ours, tokens)
    blocks.apply([BlockRemoved([b"unknown", 12345])])
    assert blocks.report().removed == [] and len(blocks) == len(chain(tokens))


# --- the node's join loop (`OpenAIBackend._join_loop`) --------------------------------------


def test_the_join_goes_on_after_a_tokenizer_that_hangs_up_or_answers_garbage():
    """Whatever one `/tokenize` answer does (the engine hangs up mid-answer, sends no token
    list, errors), the calls after it are still joined: one bad answer must not end the task
    that keeps the index precise."""
    import asyncio

    from swarmx.backends.openai import OpenAIBackend
    from swarmx.config import ReplicaConfig

    ours, tokens = prompt("w" * 1024)
    answers: list[object] = [
        asyncio.IncompleteReadError(b"", 10),
        ValueError("the tokenizer's answer has no list of token ids"),
        OSError("500 Internal Server Error"),
        RuntimeError("a bug"),
        tokens,
    ]

    async def main() -> int:
        backend = OpenAIBackend(
            ReplicaConfig("m", "openai", url="http://127.0.0.1:9/v1", kv_events="tcp://x:1")
        )
        blocks = backend._blocks
        assert blocks is not None
        blocks.apply([stored(tokens)])

        async def tokenize(payload: dict[str, object]) -> list[int]:
            answer = answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            assert isinstance(answer, list)
            return answer

        backend._tokenize = tokenize  # type: ignore[method-assign]
        task = asyncio.create_task(backend._join_loop(blocks))
        for _ in range(len(answers)):
            backend._joins.append(("w" * 1024, {}))
        backend._joined.set()
        for _ in range(500):  # 5 s at most
            if not answers or task.done():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        assert not task.done()  # still joining
        task.cancel()
        blocks.apply([BlockRemoved(chain(tokens)[::-1])])
        return len(blocks.report().removed)

    assert asyncio.run(main()) == len(ours)  # the last call was joined: its eviction is told
