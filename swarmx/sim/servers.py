"""Emulated replicas in simulated time, event by event rather than token by token.

An LLM replica runs continuous batching with the emulated backend's timing model
(`swarmx.backends.emulated`): every step advances each active sequence by one token and lasts
``max(memory time, compute time) + overhead``, where memory time grows with the batch's KV cache.
Steps are treated as a fluid (fractional steps), so the time to run from step K1 to K2 with a fixed
batch is a closed-form integral and the simulator only wakes when a sequence finishes or joins:
that keeps a simulated call to a few events whatever its length. A joining sequence's prefill
stalls the batch for its prefill time (no chunked prefill), as in the emulated backend, and the
backend's prefix cache (`PrefixCache`) spares it the prefill of its cached leading blocks.

Vision replicas and CPU tool hosts are processor-sharing servers: ``n`` jobs on ``cores`` cores
each progress at ``min(1, cores / n)`` of their solo speed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from swarmx.backends.emulated import (
    GpuProfile,
    ModelProfile,
    PrefixCache,
    kv_capacity_tokens,
    prefill_s,
)


@dataclass
class Finished:
    call_id: str
    ttft_s: float | None
    """LLM calls: from the call reaching the server (its wait for a slot included) to the end of
    its prefill."""


_Waiting = tuple[str, int, int, Sequence[int], int, float]
"""(call id, prompt tokens, output tokens, prefix blocks, tokens per block, when it came)."""


class LlmServer:
    def __init__(
        self,
        gpu: GpuProfile,
        model: ModelProfile,
        slots: int,
        kv_cache_tokens: int | None = None,
    ) -> None:
        self.gpu, self.model, self.slots = gpu, model, slots
        self.cache = PrefixCache(
            kv_capacity_tokens(gpu, model) if kv_cache_tokens is None else kv_cache_tokens
        )
        """Its prefix cache, whose ``prompt_tokens`` and ``cached_tokens`` count the calls that
        joined; ``kv_cache_tokens`` in all (default: what the GPU's memory holds)."""
        eff_bw = gpu.hbm_bytes_per_s * gpu.bandwidth_efficiency
        self._w = model.params * model.bytes_per_param / eff_bw
        """Seconds to read the weights once."""
        self._kv = model.kv_bytes_per_token / eff_bw
        """Seconds to read one token's KV cache."""
        self._flop = 2 * model.params / (gpu.dense_flops * gpu.mfu)
        """Seconds of compute per sequence per step."""
        self.now_s = 0.0
        self.k = 0.0
        """Steps run so far (fluid)."""
        self.stall_until_s = 0.0
        self._ctx0 = 0.0
        """Sum over active sequences of (prompt tokens - step at which they joined): the batch's
        KV tokens are ``ctx0 + n * k``."""
        self._active: list[tuple[float, int, str]] = []
        """Heap of (step at which it finishes, tie-break, call id)."""
        self._info: dict[str, tuple[int, float, float]] = {}
        """call id -> (prompt tokens, joined at step, its TTFT)."""
        self._waiting: list[_Waiting] = []
        self._tie = 0

    @property
    def outstanding(self) -> int:
        return len(self._info) + len(self._waiting)

    @property
    def batch(self) -> int:
        return len(self._info)

    def kv_tokens(self) -> float:
        return self._ctx0 + len(self._info) * self.k

    def step_s(self, batch: int, kv_tokens: float) -> float:
        """One decode step of ``batch`` sequences holding ``kv_tokens`` tokens in all."""
        return max(self._w + kv_tokens * self._kv, self._flop * batch) + self.gpu.step_overhead_s

    def solo_s(
        self,
        prompt_tokens: int,
        output_tokens: int,
        batch: int,
        kv_tokens: float,
        cached_tokens: int = 0,
    ) -> float:
        """A call's service time if the batch it joins stayed as it is (the oracle's estimate):
        the prefill of its uncached prompt (``_flop`` per token, as `prefill_s`) and its decode
        steps at the batch's mid-call KV cache."""
        n = batch + 1
        mid_kv = kv_tokens + prompt_tokens + n * output_tokens / 2
        step = max(self._w + mid_kv * self._kv, self._flop * n) + self.gpu.step_overhead_s
        return self._flop * (prompt_tokens - cached_tokens) + output_tokens * step

    def solo_now_s(
        self,
        prompt_tokens: int,
        output_tokens: int,
        now_s: float,
        blocks: Sequence[int] = (),
        block_tokens: int = 0,
    ) -> float:
        """`solo_s` joining the batch as it is now (the oracle asks this of every candidate),
        behind the prefills already under way (without chunked prefill they run one after
        another, so a call sent to a replica that has just taken long prompts waits for them
        before its own prefill starts), with the prefix its cache holds now of ``blocks``."""
        backlog_s = max(0.0, self.stall_until_s - now_s)
        n = len(self._info)
        cached = self.cache.lookup(blocks, block_tokens, prompt_tokens)
        kv = self._ctx0 + n * self.k
        return backlog_s + self.solo_s(prompt_tokens, output_tokens, n, kv, cached)

    # --- fluid integration ------------------------------------------------------------------

    def _time_for(self, k1: float, k2: float) -> float:
        """Seconds to run from step k1 to k2 with the current batch."""
        n = len(self._info)
        if k2 <= k1 or n == 0:
            return 0.0
        a, b = self._w + self._ctx0 * self._kv, n * self._kv  # memory time at step k: a + b k
        c, o = self._flop * n, self.gpu.step_overhead_s
        kx = (c - a) / b if b > 0 else (math.inf if c > a else -math.inf)
        total = o * (k2 - k1)
        lo, hi = k1, k2
        if kx > lo:  # compute-bound part
            cut = min(hi, kx)
            total += c * (cut - lo)
            lo = cut
        if hi > lo:  # memory-bound part
            total += a * (hi - lo) + b * (hi * hi - lo * lo) / 2
        return total

    def _steps_in(self, k1: float, dt: float) -> float:
        """Inverse of `_time_for`: the step reached after ``dt`` seconds from step k1."""
        n = len(self._info)
        if dt <= 0 or n == 0:
            return k1
        a, b = self._w + self._ctx0 * self._kv, n * self._kv
        c, o = self._flop * n, self.gpu.step_overhead_s
        kx = (c - a) / b if b > 0 else (math.inf if c > a else -math.inf)
        k = k1
        if kx > k:  # compute-bound at rate 1 / (c + o)
            t_cb = (kx - k) * (c + o)
            if dt <= t_cb:
                return k + dt / (c + o)
            dt -= t_cb
            k = kx
        # memory-bound: dt = (a + o)(K - k) + b/2 (K^2 - k^2), solve for K
        qa, qb = b / 2, a + o
        qc = -(dt + qb * k + qa * k * k)
        if qa == 0:
            return -qc / qb
        return (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)

    def _advance(self, now_s: float) -> None:
        start = max(self.now_s, self.stall_until_s)
        if now_s > start:
            self.k = self._steps_in(self.k, now_s - start)
            self.cache.fit(self.kv_tokens())  # the contexts grew: memory pressure
        self.now_s = max(self.now_s, now_s)

    # --- events -----------------------------------------------------------------------------

    def admit(
        self,
        call_id: str,
        prompt_tokens: int,
        output_tokens: int,
        now_s: float,
        *,
        blocks: Sequence[int] = (),
        block_tokens: int = 0,
    ) -> None:
        """A call reaches the server; ``blocks`` (of ``block_tokens`` tokens each) are its
        prompt's prefix blocks, where known."""
        self._advance(now_s)
        waiting = (call_id, prompt_tokens, output_tokens, blocks, block_tokens, now_s)
        if len(self._info) >= self.slots:
            self._waiting.append(waiting)
            return
        self._join(waiting, now_s)

    def _join(self, waiting: _Waiting, now_s: float) -> None:
        call_id, prompt_tokens, output_tokens, blocks, block_tokens, came_s = waiting
        running = self.kv_tokens() + prompt_tokens
        cached = self.cache.join(call_id, blocks, block_tokens, prompt_tokens, running)
        self.stall_until_s = max(self.stall_until_s, now_s) + prefill_s(
            self.gpu, self.model, prompt_tokens - cached
        )
        self._tie += 1
        heapq.heappush(self._active, (self.k + max(1, output_tokens), self._tie, call_id))
        self._info[call_id] = (prompt_tokens, self.k, self.stall_until_s - came_s)
        self._ctx0 += prompt_tokens - self.k

    def next_event_s(self) -> float:
        if not self._active:
            return math.inf
        start = max(self.now_s, self.stall_until_s)
        return start + self._time_for(self.k, self._active[0][0])

    def advance(self, now_s: float) -> list[Finished]:
        """Run to ``now_s``; return the calls that finished by then."""
        due = self.next_event_s()
        self._advance(now_s)
        if now_s >= due:  # woken for this finish: rounding must not leave it a hair short
            self.k = max(self.k, self._active[0][0])
        done: list[Finished] = []
        while self._active and self._active[0][0] <= self.k + 1e-9:
            _, _, call_id = heapq.heappop(self._active)
            prompt, joined_k, ttft_s = self._info.pop(call_id)
            self._ctx0 -= prompt - joined_k
            self.cache.leave(call_id)
            done.append(Finished(call_id, ttft_s))
        if not self._info:
            self._ctx0 = 0.0  # no float drift carried into the next busy period
        while self._waiting and len(self._info) < self.slots:
            self._join(self._waiting.pop(0), now_s)
        return done

    def cancel(self, call_id: str, now_s: float) -> None:
        self._advance(now_s)
        self._waiting = [w for w in self._waiting if w[0] != call_id]
        info = self._info.pop(call_id, None)
        if info is not None:
            self._ctx0 -= info[0] - info[1]
            self.cache.leave(call_id)
            self._active = [e for e in self._active if e[2] != call_id]
            heapq.heapify(self._active)


class SharedServer:
    """Processor sharing: each of ``n`` jobs progresses at ``min(1, cores / n)``."""

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self.now_s = 0.0
        self.v = 0.0
        """Virtual time: solo-seconds of progress each active job has received."""
        self._active: list[tuple[float, int, str]] = []
        self._jobs: set[str] = set()
        self._tie = 0

    @property
    def outstanding(self) -> int:
        return len(self._jobs)

    def rate(self, n: int) -> float:
        return min(1.0, self.cores / n) if n else 1.0

    def _advance(self, now_s: float) -> None:
        if now_s > self.now_s:
            self.v += (now_s - self.now_s) * self.rate(len(self._jobs))
            self.now_s = now_s

    def admit(self, call_id: str, work_s: float, now_s: float) -> None:
        self._advance(now_s)
        self._tie += 1
        heapq.heappush(self._active, (self.v + max(work_s, 1e-6), self._tie, call_id))
        self._jobs.add(call_id)

    def next_event_s(self) -> float:
        while self._active and self._active[0][2] not in self._jobs:
            heapq.heappop(self._active)
        if not self._active:
            return math.inf
        return self.now_s + (self._active[0][0] - self.v) / self.rate(len(self._jobs))

    def advance(self, now_s: float) -> list[Finished]:
        due = self.next_event_s()
        self._advance(now_s)
        if now_s >= due:  # as `LlmServer.advance`: the finish woken for is reached
            self.v = max(self.v, self._active[0][0])
        done: list[Finished] = []
        while self._active and self._active[0][0] <= self.v + 1e-9:
            _, _, call_id = heapq.heappop(self._active)
            if call_id in self._jobs:
                self._jobs.discard(call_id)
                done.append(Finished(call_id, None))
        return done

    def cancel(self, call_id: str, now_s: float) -> None:
        self._advance(now_s)
        self._jobs.discard(call_id)
