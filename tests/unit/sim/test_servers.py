"""The fluid LLM server against token-by-token stepping, and processor sharing against its
closed forms."""

import math

import pytest

from swarmx.backends.emulated import GPUS, ModelProfile, decode_step_s, prefill_s
from swarmx.sim.servers import Finished, LlmServer, SharedServer


def stepped(gpu: str, calls: list[tuple[str, int, int]]) -> dict[str, float]:
    """Token-by-token: all calls join at t=0, one prefill stall, then decode steps."""
    profile, model = GPUS[gpu], ModelProfile()
    t = sum(prefill_s(profile, model, p) for _, p, _ in calls)
    active = {cid: [p, 0, out] for cid, p, out in calls}
    done: dict[str, float] = {}
    while active:
        t += decode_step_s(profile, model, [p + g for p, g, _ in active.values()])
        for cid in list(active):
            active[cid][1] += 1
            if active[cid][1] >= active[cid][2]:
                done[cid] = t
                del active[cid]
    return done


def drain(server: LlmServer | SharedServer) -> dict[str, float]:
    done: dict[str, float] = {}
    while (t := server.next_event_s()) < math.inf:
        for f in server.advance(t):
            done[f.call_id] = t
    return done


@pytest.mark.parametrize("gpu", ["H100", "A100", "L40S"])
def test_fluid_batching_matches_token_stepping(gpu):
    calls = [("a", 2000, 50), ("b", 500, 300), ("c", 8000, 120), ("d", 100, 600)]
    server = LlmServer(GPUS[gpu], ModelProfile(), slots=8)
    for cid, prompt, out in calls:
        server.admit(cid, prompt, out, 0.0)
    fluid, exact = drain(server), stepped(gpu, calls)
    assert fluid.keys() == exact.keys()
    for cid in exact:
        assert fluid[cid] == pytest.approx(exact[cid], rel=0.01)


def test_batching_slows_each_call_but_raises_throughput():
    alone = LlmServer(GPUS["A100"], ModelProfile(), slots=32)
    alone.admit("x", 1000, 200, 0.0)
    t_alone = drain(alone)["x"]
    busy = LlmServer(GPUS["A100"], ModelProfile(), slots=32)
    for i in range(16):
        busy.admit(f"x{i}", 1000, 200, 0.0)
    t_busy = max(drain(busy).values())
    assert t_busy > t_alone  # each call is slower in a big batch...
    assert t_busy < 16 * t_alone / 4  # ...but the batch finishes far sooner than one by one


def test_calls_beyond_the_slots_wait_for_one():
    server = LlmServer(GPUS["H100"], ModelProfile(), slots=1)
    server.admit("first", 100, 100, 0.0)
    server.admit("second", 100, 100, 0.0)
    done = drain(server)
    assert done["second"] == pytest.approx(2 * done["first"], rel=0.02)


def test_a_late_joiner_stalls_the_batch_for_its_prefill():
    server = LlmServer(GPUS["A100"], ModelProfile(), slots=8)
    server.admit("early", 100, 400, 0.0)
    reference = LlmServer(GPUS["A100"], ModelProfile(), slots=8)
    reference.admit("early", 100, 400, 0.0)
    t_ref = drain(reference)["early"]
    server.advance(0.5)
    server.admit("late", 16000, 10, 0.5)
    done = drain(server)
    assert done["early"] > t_ref + 0.9 * prefill_s(GPUS["A100"], ModelProfile(), 16000)


def test_the_oracle_estimate_waits_behind_the_prefills_under_way():
    """A call sent just after a long prompt starts its prefill once that one's is done: the
    oracle's 'load as it is now' includes that backlog, and it is what a solo call really
    takes."""
    gpu, model = GPUS["A100"], ModelProfile()
    server = LlmServer(gpu, model, slots=8)
    server.admit("long", 8000, 1, 0.0)
    backlog_s = prefill_s(gpu, model, 8000)
    at_once = server.solo_now_s(1000, 1, 0.0)
    later = server.solo_now_s(1000, 1, backlog_s / 2)
    assert at_once - later == pytest.approx(backlog_s / 2)
    assert server.solo_now_s(1000, 1, backlog_s + 1.0) < later
    server.admit("next", 1000, 1, 0.0)
    assert drain(server)["next"] == pytest.approx(at_once, rel=0.05)


def test_processor_sharing_splits_the_cores():
    host = SharedServer(cores=2)
    for i in range(4):
        host.admit(f"j{i}", 1.0, 0.0)  # four 1-second jobs on two cores: all end at 2 s
    assert all(t == pytest.approx(2.0) for t in drain(host).values())
    host2 = SharedServer(cores=4)
    host2.admit("a", 1.0, 0.0)
    host2.admit("b", 3.0, 0.0)
    done = drain(host2)
    assert done == {"a": pytest.approx(1.0), "b": pytest.approx(3.0)}  # no contention


def test_cancel_frees_the_slot():
    server = LlmServer(GPUS["H100"], ModelProfile(), slots=1)
    server.admit("a", 100, 1000, 0.0)
    server.admit("b", 100, 10, 0.0)
    server.cancel("a", 0.1)
    server.advance(0.1)
    done = drain(server)
    assert set(done) == {"b"} and done["b"] < 1.0


@pytest.mark.parametrize("seed", range(20))
def test_every_wake_at_the_next_event_finishes_a_call(seed):
    """Late in a long run (large clock values, long-running step counters) the next finish's
    time and the progress made by it can round apart: a server woken at ``next_event_s`` must
    still finish something, or the simulator wakes it at the same instant forever."""
    import random

    rng = random.Random(seed)
    llm = LlmServer(GPUS[rng.choice(["A100", "H100", "L40S"])], ModelProfile(), slots=8)
    shared = SharedServer(cores=rng.choice([1, 4, 16]))
    now = 1e7 + rng.random()  # a clock where one ulp is about 2 ns
    for k in range(60):
        llm.admit(f"c{k}", rng.randint(1, 4000), rng.randint(1, 600), now)
        shared.admit(f"c{k}", rng.expovariate(1.0), now)
        now += rng.expovariate(5.0)
    for server in (llm, shared):
        left = 60 - len(server.advance(now))
        while left:
            due = server.next_event_s()
            assert due < math.inf
            done = server.advance(due)
            assert done, "woken for a finish that did not happen"
            left -= len(done)


# --- prefix caches ------------------------------------------------------------------------------


def finishes(server: LlmServer) -> dict[str, Finished]:
    """Run the server dry: each call's `Finished`, by id."""
    out: dict[str, Finished] = {}
    while (t := server.next_event_s()) < math.inf:
        out.update((f.call_id, f) for f in server.advance(t))
    return out


def test_a_cached_prefix_cuts_the_prefill_and_the_time_to_first_token():
    gpu, model = GPUS["A100"], ModelProfile()
    blocks = list(range(40))  # 2,560 of the prompt's 2,600 tokens
    warm = LlmServer(gpu, model, slots=8)
    warm.admit("first", 2600, 50, 0.0, blocks=blocks, block_tokens=64)
    first = finishes(warm)["first"]
    assert first.ttft_s == pytest.approx(prefill_s(gpu, model, 2600))
    now = warm.now_s
    warm.admit("again", 2600, 50, now, blocks=blocks, block_tokens=64)
    cold = LlmServer(gpu, model, slots=8)
    cold.admit("again", 2600, 50, now, blocks=blocks, block_tokens=64)
    again, fresh = finishes(warm)["again"], finishes(cold)["again"]
    assert again.ttft_s == pytest.approx(prefill_s(gpu, model, 40))
    assert fresh.ttft_s == pytest.approx(prefill_s(gpu, model, 2600))
    assert warm.now_s - now < cold.now_s - now  # the whole call is quicker too
    # counters: every prompt token seen, the cached ones among them
    assert (warm.cache.prompt_tokens, warm.cache.cached_tokens) == (5200, 2560)
    assert (cold.cache.prompt_tokens, cold.cache.cached_tokens) == (2600, 0)


def test_a_fully_cached_prompt_still_prefills_one_token():
    server = LlmServer(GPUS["H100"], ModelProfile(), slots=4)
    for call in ("a", "b"):
        server.admit(call, 640, 5, server.now_s, blocks=list(range(10)), block_tokens=64)
        finishes(server)
    assert server.cache.cached_tokens == 639


def test_only_the_shared_leading_blocks_hit():
    server = LlmServer(GPUS["H100"], ModelProfile(), slots=4)
    server.admit("a", 640, 5, 0.0, blocks=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], block_tokens=64)
    server.admit("b", 640, 5, 0.0, blocks=[1, 2, 3, 99, 5, 6, 7, 8, 9, 10], block_tokens=64)
    server.admit("c", 640, 5, 0.0, blocks=[77, 2, 3, 4, 5, 6, 7, 8, 9, 10], block_tokens=64)
    finishes(server)
    assert server.cache.cached_tokens == 3 * 64  # b's first three; c none: its head differs


def test_time_to_first_token_includes_the_wait_for_a_slot():
    gpu, model = GPUS["H100"], ModelProfile()
    server = LlmServer(gpu, model, slots=1)
    server.admit("first", 100, 100, 0.0)
    server.admit("second", 300, 10, 0.0)
    first_end_s = server.next_event_s()
    (first,) = server.advance(first_end_s)
    (second,) = server.advance(server.next_event_s())
    assert (first.call_id, second.call_id) == ("first", "second")
    assert first.ttft_s == pytest.approx(prefill_s(gpu, model, 100))
    assert second.ttft_s == pytest.approx(first_end_s + prefill_s(gpu, model, 300))


def test_the_cache_holds_what_fits_beside_the_running_contexts():
    """640 tokens of blocks cached, then a call that runs long: as its context grows, the
    cached blocks are evicted, least recently used first (a sequence's tail before its head),
    so cached blocks and running KV stay within the capacity."""
    capacity = 64 * 20
    server = LlmServer(GPUS["H100"], ModelProfile(), slots=4, kv_cache_tokens=capacity)
    old = list(range(100, 110))
    server.admit("old", 640, 1, 0.0, blocks=old, block_tokens=64)
    finishes(server)
    assert len(server.cache.index) == 10
    server.admit("long", 512, 600, server.now_s, blocks=list(range(8)), block_tokens=64)
    assert len(server.cache.index) == 18
    start, step_s = server.now_s, server.step_s(1, 900)
    for generated in (100, 200, 400, 599):
        server.advance(start + generated * step_s)
        decoded = server.kv_tokens() - 512  # the running KV its cached blocks do not hold
        assert len(server.cache.index) * 64 + decoded <= capacity
    assert len(server.cache.index) < 18
    assert 0 < server.cache.index.match(old) < 10  # the old prompt lost its tail, kept its head


def test_a_small_cache_keeps_the_most_recent_prompts():
    server = LlmServer(GPUS["H100"], ModelProfile(), slots=4, kv_cache_tokens=64 * 12)
    for i in range(5):
        server.admit(
            f"c{i}", 512, 1, server.now_s, blocks=[i * 100 + k for k in range(8)], block_tokens=64
        )
        finishes(server)
        assert len(server.cache.index) <= 12
    assert server.cache.index.match([400 + k for k in range(8)]) == 8
    assert server.cache.index.match([0 + k for k in range(8)]) == 0


def test_blocks_of_another_size_miss():
    server = LlmServer(GPUS["H100"], ModelProfile(), slots=4)
    server.admit("a", 1024, 1, 0.0, blocks=[1, 2], block_tokens=512)
    finishes(server)
    server.admit("b", 1024, 1, server.now_s, blocks=[1, 2], block_tokens=64)
    finishes(server)
    assert server.cache.cached_tokens == 0 and server.cache.block_tokens == 512
