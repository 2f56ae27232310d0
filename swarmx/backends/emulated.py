"""A timing model of a GPU model server that computes no tokens, so one host can stand in for
hundreds of GPU replicas (scale tests, the simulator).

Figures come from a roofline over vendor datasheets, for an 8B-parameter dense decoder in 16-bit
weights (Llama-3-8B shapes: 32 layers, 8 KV heads of 128 dims, so 128 KiB of KV cache per token):

- prefill is compute-bound: ``2 * params * tokens / (peak dense FLOPS * MFU)``, MFU 0.5;
- a decode step is bandwidth-bound: it reads all weights once plus every active sequence's KV cache,
  ``(weight bytes + sum(context) * kv bytes) / (HBM bandwidth * 0.8)``, or compute-bound at large
  batch, whichever is slower, plus a fixed 2 ms of engine overhead per step;
- peak dense BF16 tensor FLOPS and HBM bandwidth from NVIDIA's datasheets: H100 SXM 989 TFLOPS,
  3.35 TB/s; A100 80GB SXM 312 TFLOPS, 2.04 TB/s; L40S 362 TFLOPS, 0.864 TB/s.

So an H100 decodes a lone sequence at ~160 tokens/s and slows as the batch's KV cache grows: the
batch-size dependence that makes routing matter. A replica keeps a prefix cache (`PrefixCache`,
the simulator's too) in the KV memory its running contexts leave free: a call whose leading prompt
blocks it holds prefills only the rest. How many tokens a call outputs is drawn from a lognormal
around a third of ``max_tokens``, seeded by the prompt (the same prompt always gives the same
length), unless the caller fixes it (the simulator replays real output lengths). A call with a
``stream`` gets each word as an OpenAI chunk when the decode step that makes it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from swarmx.backends.base import BackendMetrics, CacheReport, CallOutcome, CallRequest
from swarmx.backends.chunks import ChunkWriter, FinishReason
from swarmx.clock import Clock, RealClock
from swarmx.config import ReplicaConfig
from swarmx.sched.prefix import BLOCK_TOKENS, PrefixIndex, block_hashes


@dataclass(frozen=True)
class GpuProfile:
    name: str
    dense_flops: float
    hbm_bytes_per_s: float
    mfu: float = 0.5
    bandwidth_efficiency: float = 0.8
    step_overhead_s: float = 0.002
    memory_bytes: float = 80e9


GPUS: dict[str, GpuProfile] = {
    "H100": GpuProfile("H100", 989e12, 3.35e12),
    "A100": GpuProfile("A100", 312e12, 2.04e12),
    "L40S": GpuProfile("L40S", 362e12, 0.864e12, memory_bytes=48e9),
}


@dataclass(frozen=True)
class ModelProfile:
    params: float = 8.0e9
    bytes_per_param: float = 2.0
    kv_bytes_per_token: float = 131072.0


KV_MEMORY_SHARE = 0.9
"""Share of the GPU's memory the engine takes (vLLM's ``gpu_memory_utilization`` default)."""


def kv_capacity_tokens(gpu: GpuProfile, model: ModelProfile) -> int:
    """Tokens of KV cache a replica has room for: the engine's memory less the weights (the 8B
    model: 427k on an 80 GB A100 or H100, 207k on a 48 GB L40S)."""
    free = gpu.memory_bytes * KV_MEMORY_SHARE - model.params * model.bytes_per_param
    return max(0, int(free // model.kv_bytes_per_token))


def prefill_s(gpu: GpuProfile, model: ModelProfile, tokens: int) -> float:
    return 2 * model.params * tokens / (gpu.dense_flops * gpu.mfu)


def decode_step_s(gpu: GpuProfile, model: ModelProfile, contexts: list[int]) -> float:
    """One decode step for a batch whose sequences hold ``contexts`` tokens each."""
    memory = model.params * model.bytes_per_param + sum(contexts) * model.kv_bytes_per_token
    memory_s = memory / (gpu.hbm_bytes_per_s * gpu.bandwidth_efficiency)
    compute_s = 2 * model.params * len(contexts) / (gpu.dense_flops * gpu.mfu)
    return max(memory_s, compute_s) + gpu.step_overhead_s


def vision_s(gpu: GpuProfile, image_px: int, steps: int) -> float:
    """A ViT-L-sized encoder pass (~60 GFLOPs at 224 px, growing with pixel count) per step."""
    flops = 60e9 * (image_px / 224) ** 2 * steps
    return flops / (gpu.dense_flops * gpu.mfu) + gpu.step_overhead_s


def prompt_tokens(prompt: str) -> int:
    """About four bytes of English per token, as with common BPE vocabularies."""
    return max(1, len(prompt.encode()) // 4)


def drawn_output_tokens(prompt: str, max_tokens: int) -> int:
    seed = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    median = max(1.0, max_tokens / 3)
    return max(1, min(max_tokens, round(random.Random(seed).lognormvariate(math.log(median), 0.7))))


_WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "plan",
    "test",
    "code",
    "read",
    "search",
    "fix",
    "report",
    "step",
    "item",
    "check",
    "node",
    "model",
    "data",
    "query",
    "result",
    "value",
]


def filler_tokens(seed_text: str, tokens: int) -> list[str]:
    """`filler_text` token by token: each word with the space or newline that goes before it."""
    rng = random.Random(seed_text)
    words = [rng.choice(_WORDS) for _ in range(tokens)]
    return [
        word if i == 0 else ("\n" if i % 12 == 0 else " ") + word for i, word in enumerate(words)
    ]


def filler_text(seed_text: str, tokens: int) -> str:
    """Deterministic words, ``tokens`` of them, a dozen per line (downstream steps split lines)."""
    return "".join(filler_tokens(seed_text, tokens))


class PrefixCache:
    """A replica's prefix cache: the prompt blocks (`swarmx.sched.prefix`) of the calls it ran,
    least recently used evicted first, in the KV memory its running contexts leave free.

    A joining call's leading blocks held here need no prefill (all but its last prompt token at
    most). Its blocks enter the cache as it joins: prefills run one after another, so every later
    prefill finds them computed. While it runs they count once, as cached blocks (an engine shares
    a block between its sequences and its cache); the rest of its context (generated tokens, a
    partial last block) is running KV, and cached blocks are evicted until cached + running KV fit
    ``capacity_tokens``. A running call's blocks are not pinned: under heavy pressure the oldest
    may go before it ends. The block size is the first call's; blocks of another size miss.
    """

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self.block_tokens = 0
        self.index = PrefixIndex(0)
        self._held: dict[str, int] = {}
        """Running call -> tokens of its prompt that its blocks in the cache hold."""
        self._held_tokens = 0
        self.prompt_tokens = 0
        """Prompt tokens of the calls that joined."""
        self.cached_tokens = 0
        """Of those, the tokens served from the cache."""

    def lookup(self, blocks: Sequence[int], block_tokens: int, prompt_tokens: int) -> int:
        """Prompt tokens of a call the cache would serve now."""
        if not blocks or block_tokens != self.block_tokens:
            return 0
        return max(0, min(self.index.match(blocks) * block_tokens, prompt_tokens - 1))

    def join(
        self,
        call_id: str,
        blocks: Sequence[int],
        block_tokens: int,
        prompt_tokens: int,
        running_tokens: float,
    ) -> int:
        """A call starts its prefill, the running contexts (it included) holding
        ``running_tokens``: the prompt tokens it finds cached. Its blocks enter the cache."""
        if not self.block_tokens and blocks and block_tokens > 0:
            self.block_tokens = block_tokens
        cached = self.lookup(blocks, block_tokens, prompt_tokens)
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached
        if blocks and block_tokens == self.block_tokens:
            self.leave(call_id)
            held = self._held[call_id] = min(len(blocks) * block_tokens, prompt_tokens)
            self._held_tokens += held
            self.fit(running_tokens)
            self.index.insert(blocks)
        return cached

    def leave(self, call_id: str) -> None:
        """A call ended: its blocks stay cached, free to evict."""
        self._held_tokens -= self._held.pop(call_id, 0)

    def fit(self, running_tokens: float) -> None:
        """Evict down to the memory the running contexts leave: their KV beyond their blocks."""
        if self.block_tokens:
            free = self.capacity_tokens - max(0.0, running_tokens - self._held_tokens)
            self.index.capacity_blocks = int(max(0.0, free) // self.block_tokens)
            self.index.insert(())


@dataclass
class _Seq:
    request: CallRequest
    prompt_tokens: int
    target_tokens: int
    future: asyncio.Future[CallOutcome]
    started: float
    generated: int = 0
    ttft_s: float | None = None
    cached_tokens: int = 0
    waiting_prefill: bool = True
    text: list[str] = field(default_factory=list)
    """The output, one entry per token (`filler_tokens`)."""
    chunks: ChunkWriter | None = None
    """Set when the caller streams: each token goes out through it as its step ends."""


@dataclass
class EmulatedServer:
    """Continuous batching in simulated time: each step advances every active sequence by one
    token and lasts as long as the timing model says for the current batch."""

    cfg: ReplicaConfig
    clock: Clock = field(default_factory=RealClock)
    model: ModelProfile = field(default_factory=ModelProfile)

    def __post_init__(self) -> None:
        if self.cfg.gpu not in GPUS:
            raise ValueError(f"unknown GPU {self.cfg.gpu!r} (known: {', '.join(GPUS)})")
        self.gpu = GPUS[self.cfg.gpu]
        self.cache = PrefixCache(kv_capacity_tokens(self.gpu, self.model))
        self._evicted: list[int] = []
        self.cache.index.on_evict = self._evicted.extend
        self._active: list[_Seq] = []
        self._engine: asyncio.Task[None] | None = None

    async def start(self) -> None:
        return None

    def metrics(self) -> BackendMetrics:
        waiting = sum(s.waiting_prefill for s in self._active)
        return BackendMetrics(
            queued=waiting,
            running=len(self._active) - waiting,
            prefix_cache_blocks=len(self.cache.index),
            prefix_cache_capacity=self.cache.capacity_tokens // BLOCK_TOKENS,
        )

    def cache_report(self) -> CacheReport:
        """Its cache is keyed by the scheduler's block ids: what it evicts is exact."""
        gone, self._evicted[:] = list(self._evicted), []
        return CacheReport(gone, 0, self.cache.capacity_tokens)

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.cancel()
        for seq in self._active:
            if not seq.future.done():
                seq.future.set_result(CallOutcome(False, "", "replica closed"))
        self._active.clear()

    async def run(self, request: CallRequest) -> CallOutcome:
        if request.kind == "model":
            return await self._vision(request)
        if request.kind != "llm":
            return CallOutcome(
                False, "", f"emulated replicas serve llm and model calls, not {request.kind}"
            )
        future: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
        target = drawn_output_tokens(request.prompt, max(1, request.max_tokens))
        seq = _Seq(
            request,
            prompt_tokens(request.prompt),
            target,
            future,
            self.clock.monotonic(),
            text=filler_tokens(request.prompt, target),
        )
        if request.stream is not None:
            created = int(self.clock.time())
            seq.chunks = ChunkWriter(
                request.api, request.call_id, request.model, created, request.stream
            )
        self._active.append(seq)
        if self._engine is None or self._engine.done():
            self._engine = asyncio.create_task(self._steps())
        try:
            return await future
        finally:
            self.cache.leave(request.call_id)
            if seq in self._active:  # cancelled: leave the batch
                self._active.remove(seq)

    async def _vision(self, request: CallRequest) -> CallOutcome:
        try:
            px = int(request.inputs.get("image_px", "224"))
            steps = int(request.inputs.get("steps", "1"))
        except ValueError as exc:
            return CallOutcome(False, "", f"bad model inputs: {exc}")
        await self.clock.sleep(vision_s(self.gpu, px, steps))
        words = 8 + px // 128
        return CallOutcome(
            True,
            filler_text(request.prompt + str(px), words),
            prompt_tokens=prompt_tokens(request.prompt),
            output_tokens=words,
        )

    async def _steps(self) -> None:
        while self._active:
            # a sequence arriving during the step joins the next one (and pays its prefill there)
            batch = list(self._active)
            contexts = [s.prompt_tokens + s.generated for s in batch]
            running = sum(contexts)
            self.cache.fit(running)
            step = decode_step_s(self.gpu, self.model, contexts)
            for s in batch:
                if s.waiting_prefill:  # its cached prefix needs no prefill
                    blocks = block_hashes(s.request.prompt)
                    s.cached_tokens = self.cache.join(
                        s.request.call_id, blocks, BLOCK_TOKENS, s.prompt_tokens, running
                    )
                    step += prefill_s(self.gpu, self.model, s.prompt_tokens - s.cached_tokens)
            await self.clock.sleep(step)
            now = self.clock.monotonic()
            for seq in batch:
                if seq not in self._active:  # cancelled during the step
                    continue
                seq.generated += 1
                if seq.waiting_prefill:
                    seq.waiting_prefill, seq.ttft_s = False, now - seq.started
                if seq.chunks is not None:
                    seq.chunks.text(seq.text[seq.generated - 1])
                if seq.generated >= seq.target_tokens:
                    self._active.remove(seq)
                    self._finish(seq)

    def _finish(self, seq: _Seq) -> None:
        """Resolve a call that made its last token: its stream's finish and usage chunks first."""
        if seq.future.done():
            return
        capped = seq.generated >= max(1, seq.request.max_tokens)
        reason: FinishReason = "length" if capped else "stop"
        if seq.chunks is not None:
            seq.chunks.finish(reason, seq.prompt_tokens, seq.generated)
        seq.future.set_result(
            CallOutcome(
                True,
                "".join(seq.text),
                "",
                seq.prompt_tokens,
                seq.generated,
                seq.ttft_s,
                cached_tokens=seq.cached_tokens,
                stop_reason=reason,
                output_kinds=["text"],
            )
        )
