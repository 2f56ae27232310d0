"""Prefix identity (chained block hashes) and the per-replica prefix index."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from swarmx.sched.prefix import (
    BLOCK_BYTES,
    HASH_BITS,
    PrefixIndex,
    PrefixIndexes,
    ReuseGaps,
    block_hashes,
    shared_blocks,
)


def text(*blocks: str) -> str:
    """Whole blocks, each ``BLOCK_BYTES`` long, made from the given words."""
    return "".join((b * BLOCK_BYTES)[:BLOCK_BYTES] for b in blocks)


def test_hashes_are_chained_so_equal_hashes_mean_equal_prefixes() -> None:
    a = block_hashes(text("sys ", "user1 ", "tool ", "user2 "))
    b = block_hashes(text("sys ", "user1 ", "other ", "user2 "))
    assert len(a) == len(b) == 4
    assert a[:2] == b[:2]
    assert a[2] != b[2]
    assert a[3] != b[3]  # the same fourth block, after a different third: a different prefix
    assert shared_blocks(a, b) == 2


def test_one_changed_character_in_the_first_block_changes_every_hash() -> None:
    base = text("a", "b", "c")
    edited = "A" + base[1:]
    assert all(x != y for x, y in zip(block_hashes(base), block_hashes(edited), strict=True))


def test_a_partial_block_is_not_hashed_and_a_growing_prompt_keeps_its_prefix() -> None:
    turn1 = text("system ", "question ") + "half a block"
    turn2 = turn1 + "x" * (3 * BLOCK_BYTES)  # the next turn re-sends the context, then more
    h1, h2 = block_hashes(turn1), block_hashes(turn2)
    assert len(h1) == 2
    assert h2[:2] == h1
    assert block_hashes("short") == []


def test_hashes_fit_json_numbers_and_are_the_same_in_another_process() -> None:
    prompt = text(*(f"w{i} " for i in range(40))) + "é漢字🙂" * 100
    here = block_hashes(prompt)
    assert here == block_hashes(prompt.encode())  # blocks are of UTF-8 bytes
    assert all(0 <= h < 2**HASH_BITS for h in here)
    code = (
        "import sys, json; from swarmx.sched.prefix import block_hashes; "
        "print(json.dumps(block_hashes(sys.stdin.read())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=prompt,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONIOENCODING": "utf-8", "PATH": ""},
    )
    assert json.loads(out.stdout) == here


def test_bad_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="block_bytes"):
        block_hashes("abc", 0)


def test_match_counts_leading_blocks_and_stops_at_the_first_missing() -> None:
    index = PrefixIndex(100)
    index.insert([1, 2, 3])
    assert index.match([1, 2, 3, 4]) == 3
    assert index.match([1, 9, 3]) == 1
    assert index.match([9, 1, 2]) == 0
    assert index.match([]) == 0


def test_a_sequence_is_shed_from_its_tail_under_pressure() -> None:
    index = PrefixIndex(4)
    index.insert([1, 2, 3, 4])
    index.insert([10, 11])  # two more blocks: two of the first sequence's go, its tail first
    assert index.match([1, 2, 3, 4]) == 2
    assert index.match([10, 11]) == 2
    assert index.evicted == 2


def test_a_touched_sequence_outlives_one_left_alone() -> None:
    index = PrefixIndex(8)
    index.insert([1, 2, 3, 4])  # A
    index.insert([5, 6, 7, 8])  # B
    index.insert([1, 2, 3, 4])  # A again: now the most recent
    index.insert([9, 10, 11, 12])  # C pushes out B, not A
    assert index.match([1, 2, 3, 4]) == 4
    assert index.match([5, 6, 7, 8]) == 0
    assert index.match([9, 10, 11, 12]) == 4


def test_memory_stays_bounded_whatever_comes() -> None:
    rng = random.Random(3)
    index = PrefixIndex(100)
    for _ in range(1000):
        index.insert([rng.getrandbits(53) for _ in range(rng.randint(1, 300))])
        assert len(index) <= 100
    assert index.evicted > 0
    zero = PrefixIndex(0)
    zero.insert([1, 2, 3])
    assert (len(zero), zero.match([1])) == (0, 0)


def test_a_sequence_longer_than_the_cache_keeps_its_head() -> None:
    index = PrefixIndex(3)
    index.insert(list(range(10)))
    assert index.match(list(range(10))) == 3


def test_engine_reports_remove_blocks_and_a_reset_clears() -> None:
    index = PrefixIndex(10)
    index.insert([1, 2, 3])
    index.remove([2, 42])
    assert index.match([1, 2, 3]) == 1
    assert 3 in index and 2 not in index
    index.clear()
    assert len(index) == 0


def test_what_capacity_evicts_is_told_least_recently_used_first() -> None:
    index = PrefixIndex(4)
    told: list[list[int]] = []
    index.on_evict = told.append
    index.insert([1, 2, 3])
    index.insert([7, 8])  # one must go: 1..3 touched tail first, so 3 is the oldest
    index.insert([7])  # nothing goes: told nothing
    assert told == [[3]]
    index.capacity_blocks = 1
    index.insert([])
    assert told == [[3], [2, 1, 8]]


def test_indexes_per_replica_resize_and_forget_a_replica() -> None:
    indexes = PrefixIndexes()
    assert indexes.cached_blocks("r1", [1, 2]) == 0
    indexes.ensure("r1", 10).insert([1, 2, 3, 4, 5])
    indexes.ensure("r2", 10).insert([1, 7])
    assert indexes.cached_blocks("r1", [1, 2, 3]) == 3
    assert indexes.cached_blocks("r2", [1, 2, 3]) == 1
    indexes.ensure("r1", 2)  # the replica's KV cache shrank: its least recent blocks go
    assert indexes.cached_blocks("r1", [1, 2, 3]) == 2
    indexes.drop("r2")
    assert indexes.replicas() == ["r1"]
    assert indexes.get("r2") is None


def test_what_a_prompt_would_evict_that_is_still_wanted_is_counted_before_it_comes() -> None:
    index = PrefixIndex(10)
    index.insert([1, 2, 3, 4], now_s=0.0)  # a session that has gone quiet
    index.insert([5, 6, 7, 8], now_s=50.0)  # one between turns
    assert index.last_used_s(5) == 50.0 and index.last_used_s(9) is None
    new = [20, 21, 22, 23]  # two blocks of room: two go, the quiet session's
    assert index.evicts_used_since(new, since_s=30.0) == 0
    assert index.evicts_used_since(new, since_s=-1.0) == 2
    six = [20, 21, 22, 23, 24, 25]  # four go: all of the quiet session's
    assert index.evicts_used_since(six, since_s=30.0) == 0
    index.insert([9, 10], now_s=60.0)  # now full
    assert (
        index.evicts_used_since(six, since_s=30.0) == 2
    )  # six go: the quiet four, then two wanted
    own = [1, 2, 3, 4, 30, 31]  # the quiet session is back: its blocks move, they are not lost
    assert index.evicts_used_since(own, since_s=30.0) == 2
    huge = list(range(100, 140))  # longer than the cache: its first 10 blocks take all of it
    assert index.evicts_used_since(huge, since_s=30.0) == 6


@pytest.mark.parametrize("seed", range(200))
def test_the_count_of_wanted_blocks_evicted_is_what_inserting_then_evicts(seed: int) -> None:
    rng = random.Random(seed)
    index = PrefixIndex(rng.randint(1, 40))
    now = 0.0
    for _ in range(rng.randint(0, 12)):
        now += rng.uniform(0, 10)
        start = rng.randint(0, 60)
        index.insert(list(range(start, start + rng.randint(0, 20))), now_s=now)
        if rng.random() < 0.2:
            index.remove(rng.sample(range(80), 5))  # an engine's report punches holes
    since = rng.uniform(-1, now + 1)
    start = rng.randint(0, 80)
    call = list(range(start, start + rng.randint(0, 50)))
    used = {b: index.last_used_s(b) for b in index}
    predicted = index.evicts_used_since(call, since)
    gone: list[int] = []
    index.on_evict = gone.extend
    index.insert(call, now_s=now + 1)
    assert predicted == sum(1 for b in gone if (used[b] or 0.0) >= since)


def test_reuse_gaps_give_a_horizon_from_the_latest_hits() -> None:
    gaps = ReuseGaps(level=0.9, window=100)
    assert gaps.horizon_s == 0.0  # nothing seen: nothing counts as wanted
    for g in range(1, 101):
        gaps.observe(float(g))
    assert gaps.horizon_s == 91.0
    for _ in range(100):  # the window moves on: only the latest count
        gaps.observe(5.0)
    assert gaps.horizon_s == 5.0
    gaps.observe(-3.0)  # a clock that stepped back is no negative gap
    assert gaps.horizon_s >= 0.0
    with pytest.raises(ValueError, match="level"):
        ReuseGaps(level=1.0)
