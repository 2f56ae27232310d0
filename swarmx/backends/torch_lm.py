"""The embedded default model server: small torch models with random weights and real compute.

These stand in for real model servers. The weights are random (seeded by ``ReplicaConfig.seed``),
so the text is gibberish, but every call does the real work of one: `TorchLM` prefills the prompt
into a KV cache and decodes token by token with continuous batching, and `TorchVision` runs a
convolutional network over an image whose size the call chooses. The latency a node records
therefore truly depends on prompt length, output length and load, which is what SwarmX's latency
predictors are trained on.

Each replica owns one engine thread that runs the model one iteration at a time with torch
limited to one thread, so several replicas can share a small CPU; ``device`` may also be a GPU.
Times to first token are read from an injected `Clock` (the real one unless a test gives its own).
A call with a ``stream`` gets each token as an OpenAI chunk the moment it is sampled.
`TorchLM` keeps the KV of recent prompts' whole blocks in a prefix cache, so a call that re-sends
an earlier prompt's start (an agent's next turn) prefills only the rest.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import hashlib
import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from swarmx.backends.base import BackendMetrics, CacheReport, CallKind, CallOutcome, CallRequest
from swarmx.backends.chunks import ChunkWriter, FinishReason
from swarmx.clock import Clock, RealClock
from swarmx.config import ReplicaConfig
from swarmx.sched.prefix import BLOCK_BYTES, block_hashes

EOS = 256
"""Byte tokens are 0-255; this one ends an output (and opens every prompt)."""
VOCAB = 257
D_MODEL = 256
N_HEADS = 4
HEAD_DIM = D_MODEL // N_HEADS
N_LAYERS = 4
D_FF = 1024
MAX_CONTEXT = 1024
DEFAULT_MAX_TOKENS = 256
"""Output limit of a call that gives ``max_tokens`` 0."""
TEMPERATURE = 1.0
LOGIT_STD = 1.5
"""Spread of the random model's logits: peaky enough that the context shapes what comes next."""
EOS_BIAS = 2.5
VERBOSITY = 1.5
"""Each call's EOS logit is shifted by this times the model's EOS logit after the prompt, so
how long an output runs depends on the prompt itself, not only on sampling luck. With EOS_BIAS,
about half of the outputs (measured over varied prompts) end within 50 tokens and one in five
runs past 256."""

VISION_WORDS = tuple(
    "invoice total date amount customer name address phone email order "  # noqa: SIM905 - words
    "number item quantity price tax discount subtotal payment due account bank reference "
    "signature stamp page table column row header footer title logo photo person face car road "
    "tree sky building window door street sign text label barcode receipt ticket form field "
    "checkbox chart graph line bar axis legend map city river mountain cat dog bird screen "
    "keyboard button menu icon warning error letter report contract policy id card passport "
    "license medical scan diagram arrow box circle red blue green black white paper hand shop "
    "food bottle cup desk chair house".split()
)
"""The vision head's fixed vocabulary: plain words an LLM step can take as its prompt."""

Job = TypeVar("Job", bound="_Call")


def _seed(data: bytes) -> int:
    """A seed that is the same for the same bytes in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _failed(error: str) -> CallOutcome:
    return CallOutcome(ok=False, output="", error=error)


def _settle(future: asyncio.Future[CallOutcome], outcome: CallOutcome) -> None:
    if not future.done():  # the caller may have been cancelled meanwhile
        future.set_result(outcome)


@dataclass(eq=False, kw_only=True)
class _Call:
    """A call between ``run`` and its outcome; the engine thread owns it once queued."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[CallOutcome]
    prompt_tokens: int
    t_start: float
    """The engine's clock when ``run`` was called."""
    cancelled: bool = False
    """Set by ``run`` when its task is cancelled; the engine drops the call next iteration."""

    def resolve(self, outcome: CallOutcome) -> None:
        """Hand the outcome to the caller's event loop (called from the engine thread)."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(_settle, self.future, outcome)

    def post(self, stream: Callable[[str], None], chunk: str) -> None:
        """Hand one streamed chunk to the caller's event loop (called from the engine thread).
        It takes the same queue as the outcome, so chunks arrive in order and before it."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._deliver, stream, chunk)

    def _deliver(self, stream: Callable[[str], None], chunk: str) -> None:
        if not self.cancelled:  # both run on the loop: no chunk reaches a cancelled caller
            stream(chunk)


class _Engine(ABC, Generic[Job]):
    """One model, owned by one engine thread that admits queued calls and runs iterations."""

    def __init__(self, cfg: ReplicaConfig, kind: CallKind, clock: Clock | None) -> None:
        self._cfg = cfg
        self._kind = kind
        self._clock = clock or RealClock()
        """Read by the event loop and the engine thread alike (``monotonic`` only)."""
        self._device = torch.device(cfg.device)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        if self._thread is not None:
            return
        await asyncio.to_thread(self._build)
        self._thread = threading.Thread(
            target=self._main, name=f"swarmx-torch-{self._cfg.model}", daemon=False
        )
        self._thread.start()

    async def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _check_kind(self, request: CallRequest) -> str:
        if request.kind == self._kind:
            return ""
        return f"torch replica {self._cfg.model} runs {self._kind} calls, not {request.kind}"

    async def _submit(self, job: Job) -> CallOutcome:
        with self._cond:
            if self._thread is None or self._stopping:
                return _failed(f"torch replica {self._cfg.model} is not running")
            self._waiting.append(job)
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def _main(self) -> None:
        torch.set_num_threads(1)  # replicas share the host's cores
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._in_flight()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._waiting = deque(job for job in self._waiting if not job.cancelled)
                    self._admit()
                try:
                    self._iterate()
                except Exception as exc:  # e.g. out of GPU memory: fail these calls, keep serving
                    self._fail(self._take_in_flight(), f"torch replica failed: {exc!r}")
        with self._cond:
            pending = [*self._take_in_flight(), *self._waiting]
            self._waiting.clear()
        self._fail(pending, f"torch replica {self._cfg.model} closed before the call finished")

    def _fail(self, jobs: list[Job], error: str) -> None:
        for job in jobs:
            job.resolve(_failed(error))

    @abstractmethod
    def _build(self) -> None:
        """Create the model on the device (runs in a worker thread)."""

    @abstractmethod
    def _admit(self) -> None:
        """Move calls from ``_waiting`` into the next iteration (called with the lock held)."""

    @abstractmethod
    def _iterate(self) -> None:
        """Run one engine iteration over the admitted calls and resolve those that finish."""

    @abstractmethod
    def _in_flight(self) -> list[Job]:
        """Admitted calls not yet resolved."""

    @abstractmethod
    def _take_in_flight(self) -> list[Job]:
        """Forget the admitted calls and return them, so they can be failed."""


class _Layer(NamedTuple):
    qkv: torch.Tensor
    out: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class _ByteLM:
    """A pre-LayerNorm decoder-only transformer over bytes with a KV cache of ``slots`` rows
    (8 MiB each at MAX_CONTEXT).

    Active sequences occupy rows ``0..n-1`` of the cache, so a batched decode step reads one
    contiguous slice, padded to the longest sequence and masked per row.
    """

    def __init__(self, seed: int, device: torch.device, slots: int, eos_bias: float) -> None:
        gen = torch.Generator().manual_seed(seed)

        def weight(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(shape, generator=gen) * std).to(device)

        self.tok = weight(VOCAB, D_MODEL, std=1.0)
        self.pos = weight(MAX_CONTEXT, D_MODEL, std=0.5)
        self.layers = [
            _Layer(
                qkv=weight(3 * D_MODEL, D_MODEL, std=D_MODEL**-0.5),
                out=weight(D_MODEL, D_MODEL, std=D_MODEL**-0.5),
                up=weight(D_FF, D_MODEL, std=D_MODEL**-0.5),
                down=weight(D_MODEL, D_FF, std=D_FF**-0.5),
            )
            for _ in range(N_LAYERS)
        ]
        self.head = weight(VOCAB, D_MODEL, std=LOGIT_STD * D_MODEL**-0.5)
        # A byte prior so outputs look like text: lowercase words, some lines, rare other bytes.
        prior = torch.full((VOCAB,), -6.0)
        prior[0x20:0x7F] = 0.0
        prior[ord("a") : ord("z") + 1] = 2.0
        prior[ord(" ")] = 3.5
        prior[ord("\n")] = 2.5
        prior[EOS] = eos_bias
        self.prior = prior.to(device)
        shape = (slots, N_HEADS, MAX_CONTEXT, HEAD_DIM)
        self.keys = [torch.zeros(shape, device=device) for _ in range(N_LAYERS)]
        self.values = [torch.zeros(shape, device=device) for _ in range(N_LAYERS)]
        self.forward(torch.tensor([[EOS]], device=device), [0], 0)  # no grad: no weight wants it
        self.eos_kv = self.read(0, 0, 1)
        """Position 0's KV: every prompt opens with EOS, so it is the same for all."""

    def forward(self, ids: torch.Tensor, starts: list[int], first_slot: int) -> torch.Tensor:
        """Feed ``ids`` [B, T] to the sequences in cache rows ``first_slot..+B`` (row b's tokens
        go to positions ``starts[b]..+T``); return the next-token logits [B, VOCAB]."""
        batch, steps = ids.shape
        device = ids.device
        span = max(starts) + steps
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(steps, device=device)
        rows = torch.arange(batch, device=device)[:, None]
        mask = (torch.arange(span, device=device) <= pos[:, :, None]).unsqueeze(1)
        x = self.tok[ids] + self.pos[pos]
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            q, k, v = (
                F.linear(F.layer_norm(x, (D_MODEL,)), layer.qkv)
                .view(batch, steps, 3, N_HEADS, HEAD_DIM)
                .permute(2, 0, 3, 1, 4)
                .unbind(0)
            )
            k_rows = keys[first_slot : first_slot + batch]
            v_rows = values[first_slot : first_slot + batch]
            k_rows[rows, :, pos] = k.transpose(1, 2)
            v_rows[rows, :, pos] = v.transpose(1, 2)
            attn = F.scaled_dot_product_attention(
                q, k_rows[:, :, :span], v_rows[:, :, :span], attn_mask=mask
            )
            x = x + F.linear(attn.transpose(1, 2).reshape(batch, steps, D_MODEL), layer.out)
            hidden = F.gelu(F.linear(F.layer_norm(x, (D_MODEL,)), layer.up))
            x = x + F.linear(hidden, layer.down)
        return F.linear(F.layer_norm(x[:, -1], (D_MODEL,)), self.head)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of row ``src`` to row ``dst``."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]

    def read(self, row: int, start: int, stop: int) -> torch.Tensor:
        """A copy (not a view: rows are reused) of row ``row``'s KV at positions
        ``start..stop``, as [2 (keys, values), N_LAYERS, N_HEADS, stop - start, HEAD_DIM]."""
        return torch.stack(
            [
                torch.stack([c[row, :, start:stop] for c in caches])
                for caches in (self.keys, self.values)
            ]
        )

    def write(self, row: int, start: int, kv: torch.Tensor) -> None:
        """Put KV shaped as `read` returns it into row ``row`` from position ``start`` on."""
        stop = start + kv.shape[3]
        for caches, part in zip((self.keys, self.values), kv, strict=True):
            for cache, layer in zip(caches, part, strict=True):
                cache[row, :, start:stop] = layer


class _PrefixStore:
    """The KV of whole prompt blocks, every layer's keys and values, keyed by the chained hashes
    of `swarmx.sched.prefix` (what the scheduler computes for the same prompt), at most
    ``capacity_blocks`` of them, least recently used evicted first.

    A prompt's blocks are touched tail first, so its head is the most recent (the rule of
    `PrefixIndex`): the store sheds a prompt from its end and a shorter prefix stays usable. The
    engine thread is the only writer and takes the lock to write; other threads take it to read.
    """

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"prefix_cache_blocks must be >= 0, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._kv: OrderedDict[int, torch.Tensor] = OrderedDict()
        """Least recently used first; each [2, N_LAYERS, N_HEADS, BLOCK_BYTES, HEAD_DIM]."""
        self._lock = threading.Lock()
        self._dropped: dict[int, None] = {}
        """Evicted since the last `take_dropped` (the scheduler's index drops them too)."""

    def __len__(self) -> int:
        return len(self._kv)

    def ids(self) -> list[int]:
        with self._lock:
            return list(self._kv)

    def match(self, hashes: Sequence[int]) -> list[torch.Tensor]:
        """The KV of the leading blocks of ``hashes`` held here (stops at the first not held)."""
        held = []
        for h in hashes:
            kv = self._kv.get(h)
            if kv is None:
                break
            held.append(kv)
        return held

    def insert(self, hashes: Sequence[int], read: Callable[[int], torch.Tensor]) -> None:
        """Hold a prompt's blocks, ``read(k)`` giving block k's KV for those not held yet: each
        is the most recently used, the head most of all; the least recently used go past
        capacity."""
        kept = hashes[: self.capacity_blocks]
        new = {h: read(k) for k, h in enumerate(kept) if h not in self._kv}  # copies: no lock
        with self._lock:
            for h in reversed(kept):
                if h in new:
                    self._kv[h] = new[h]
                else:
                    self._kv.move_to_end(h)
            while len(self._kv) > self.capacity_blocks:
                self._dropped[self._kv.popitem(last=False)[0]] = None
            for h in kept:
                self._dropped.pop(h, None)

    def take_dropped(self) -> list[int]:
        with self._lock:
            dropped = list(self._dropped)
            self._dropped.clear()
        return dropped


@dataclass(eq=False, kw_only=True)
class _Seq(_Call):
    ids: list[int]
    """EOS then the prompt's bytes."""
    blocks: list[int]
    """The prompt's block hashes (`block_hashes`): block k is the positions
    ``1 + k * BLOCK_BYTES .. 1 + (k + 1) * BLOCK_BYTES`` of ``ids``."""
    max_new: int
    gen: torch.Generator
    """Seeded from the prompt, so the same prompt samples the same output."""
    out: list[int] = field(default_factory=list)
    cached: int = 0
    """Tokens in the KV cache: the position the next fed token takes."""
    reused: int = 0
    """Prompt tokens whose KV came from the prefix store, not from prefill."""
    last: int = EOS
    done: bool = False
    t_first: float | None = None
    eos_shift: float = 0.0
    chunks: ChunkWriter | None = None
    """Set when the caller streams: each sampled token goes out through it."""
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    """Tokens are bytes: a character split over tokens is streamed once its last byte arrives,
    so the streamed text adds up to the outcome's exactly."""


class TorchLM(_Engine[_Seq]):
    """A byte-level causal transformer LM with a KV cache and continuous batching.

    Each engine iteration admits queued calls while cache rows are free (``concurrency`` rows),
    prefills each new prompt, then runs one decode step for all active sequences together, so
    concurrent calls share steps and every step gets slower as the batch grows. ``eos_bias``
    shifts the EOS logit (``-inf`` makes every call emit exactly ``max_tokens``); ``clock``
    times each call's first token.

    A prefix cache outside the rows keeps the KV of prompts' whole blocks (`_PrefixStore`): a
    new call copies its longest cached leading blocks into its row and prefills only the rest,
    and the output is the same as without. ``prefix_cache_blocks`` is its budget (None: as much
    KV again as the rows hold, ``concurrency * MAX_CONTEXT // BLOCK_BYTES`` blocks; 0: no cache).
    """

    def __init__(
        self,
        cfg: ReplicaConfig,
        *,
        eos_bias: float = EOS_BIAS,
        clock: Clock | None = None,
        prefix_cache_blocks: int | None = None,
    ) -> None:
        super().__init__(cfg, "llm", clock)
        self._eos_bias = eos_bias
        if prefix_cache_blocks is None:
            prefix_cache_blocks = cfg.concurrency * MAX_CONTEXT // BLOCK_BYTES
        self._prefix = _PrefixStore(prefix_cache_blocks)
        self._model: _ByteLM | None = None
        self._admitted: list[_Seq] = []
        self._active: list[_Seq] = []
        """Cache row i holds ``_active[i]``."""

    def _build(self) -> None:
        self._model = _ByteLM(self._cfg.seed, self._device, self._cfg.concurrency, self._eos_bias)

    async def run(self, request: CallRequest) -> CallOutcome:
        error = self._check_kind(request)
        if error:
            return _failed(error)
        if request.max_tokens < 0:
            return _failed(f"max_tokens must be >= 0, got {request.max_tokens}")
        # Half the context stays for the prompt; the prompt keeps its end, as chat servers do.
        max_new = min(request.max_tokens or DEFAULT_MAX_TOKENS, MAX_CONTEXT // 2)
        data = request.prompt.encode()
        prompt = data[-(MAX_CONTEXT - 1 - max_new) :]
        loop = asyncio.get_running_loop()
        seq = _Seq(
            loop=loop,
            future=loop.create_future(),
            prompt_tokens=len(prompt),
            t_start=self._clock.monotonic(),
            ids=[EOS, *prompt],
            blocks=block_hashes(prompt),  # what is fed: the scheduler hashes the same bytes
            max_new=max_new,
            gen=torch.Generator().manual_seed(_seed(data)),
        )
        if request.stream is not None:
            created = int(self._clock.time())
            sink = functools.partial(seq.post, request.stream)
            seq.chunks = ChunkWriter(request.api, request.call_id, request.model, created, sink)
        return await self._submit(seq)

    def metrics(self) -> BackendMetrics:
        active = list(self._active)
        used = sum(seq.cached for seq in active)
        return BackendMetrics(
            queued=len(self._waiting),
            running=len(active) + len(self._admitted),
            kv_cache_usage=used / (self._cfg.concurrency * MAX_CONTEXT),
            prefix_cache_blocks=len(self._prefix),
            prefix_cache_capacity=self._prefix.capacity_blocks,
        )

    def cache_report(self) -> CacheReport:
        """Its prefix cache is keyed by the scheduler's own block ids, and its tokens are
        bytes: what it evicts, and its size, are exact."""
        capacity = self._prefix.capacity_blocks * BLOCK_BYTES
        return CacheReport(self._prefix.take_dropped(), 0, capacity)

    def cached_block_ids(self) -> list[int]:
        """The block hashes the prefix cache holds, least recently used first: a snapshot, safe
        from any thread while the engine runs."""
        return self._prefix.ids()

    def _admit(self) -> None:
        while self._waiting and len(self._active) + len(self._admitted) < self._cfg.concurrency:
            self._admitted.append(self._waiting.popleft())

    def _in_flight(self) -> list[_Seq]:
        return [*self._admitted, *self._active]

    def _take_in_flight(self) -> list[_Seq]:
        jobs = self._in_flight()
        self._admitted.clear()
        self._active.clear()
        return jobs

    def _iterate(self) -> None:
        model = self._model
        assert model is not None, "started engines have a model"
        for row in reversed(range(len(self._active))):
            if self._active[row].cancelled:
                self._evict(model, row)
        while self._admitted:
            seq = self._admitted.pop(0)
            self._active.append(seq)
            row = len(self._active) - 1
            start = self._restore(model, seq, row)
            ids = torch.tensor([seq.ids[start:]], device=self._device)
            logits = model.forward(ids, [start], row)
            seq.cached = len(seq.ids)
            seq.eos_shift = VERBOSITY * float(logits[0, EOS])
            self._store(model, seq, row)  # before _retire can move the row
            self._sample(model, [seq], logits)
            self._retire(model)
        if self._active:
            ids = torch.tensor([[seq.last] for seq in self._active], device=self._device)
            logits = model.forward(ids, [seq.cached for seq in self._active], 0)
            for seq in self._active:
                seq.cached += 1
            self._sample(model, self._active, logits)
            self._retire(model)

    def _restore(self, model: _ByteLM, seq: _Seq, row: int) -> int:
        """Copy the KV of the prompt's leading blocks that the prefix store holds into ``row``
        and return the position its prefill starts at (0 when none is held). The last prompt
        token is always fed, even when cached: its logits sample the first output token."""
        blocks = self._prefix.match(seq.blocks)
        if not blocks:
            return 0
        model.write(row, 0, torch.cat([model.eos_kv, *blocks], dim=3))
        start = min(1 + len(blocks) * BLOCK_BYTES, len(seq.ids) - 1)
        seq.reused = start - 1
        return start

    def _store(self, model: _ByteLM, seq: _Seq, row: int) -> None:
        """Put the prompt's whole blocks into the prefix store from ``row``, whose prefill has
        just computed them in full (an error before leaves the store as it was)."""

        def block(k: int) -> torch.Tensor:
            return model.read(row, 1 + k * BLOCK_BYTES, 1 + (k + 1) * BLOCK_BYTES)

        self._prefix.insert(seq.blocks, block)

    def _sample(self, model: _ByteLM, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Draw each sequence's next token with its own prompt-seeded generator."""
        logits = logits.float() + model.prior
        logits[:, EOS] += torch.tensor([seq.eos_shift for seq in seqs], device=logits.device)
        probs = torch.softmax(logits / TEMPERATURE, dim=-1).cpu()
        now = self._clock.monotonic()
        for seq, row in zip(seqs, probs, strict=True):
            token = int(torch.multinomial(row, 1, generator=seq.gen))
            if seq.t_first is None:
                seq.t_first = now
            seq.last = token
            if token == EOS:
                seq.done = True
            else:
                seq.out.append(token)
                seq.done = len(seq.out) >= seq.max_new
                if seq.chunks is not None:
                    seq.chunks.text(seq.decoder.decode(bytes((token,))))

    def _retire(self, model: _ByteLM) -> None:
        """Resolve the finished sequences and free their cache rows."""
        for row in reversed(range(len(self._active))):
            seq = self._active[row]
            if seq.done:
                assert seq.t_first is not None, "a finished sequence has sampled a token"
                self._evict(model, row)  # first, so metrics are current when the caller wakes
                reason: FinishReason = "stop" if seq.last == EOS else "length"
                if seq.chunks is not None:
                    seq.chunks.text(seq.decoder.decode(b"", final=True))
                    seq.chunks.finish(reason, seq.prompt_tokens, len(seq.out))
                seq.resolve(
                    CallOutcome(
                        ok=True,
                        output=bytes(seq.out).decode("utf-8", errors="replace"),
                        prompt_tokens=seq.prompt_tokens,
                        output_tokens=len(seq.out),
                        ttft_s=seq.t_first - seq.t_start,
                        cached_tokens=seq.reused,
                        stop_reason=reason,
                        output_kinds=["text"],
                    )
                )

    def _evict(self, model: _ByteLM, row: int) -> None:
        """Drop the sequence in ``row``, moving the last row's sequence into it to stay compact."""
        last = self._active.pop()
        if row < len(self._active):
            model.move(len(self._active), row, last.cached)
            self._active[row] = last


class _VisionNet:
    """Diffusion-like denoising passes at full resolution, then a strided CNN and a word head.

    The head reads a 4x4 grid of features, each channel normalised over the grid: what differs
    between images is their layout, and random filters respond to every image's average alike.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)

        def weight(*shape: int) -> torch.Tensor:
            std = 1 / math.sqrt(math.prod(shape[1:]))  # keeps activations near unit scale
            return (torch.randn(shape, generator=gen) * std).to(device)

        self.denoise = (weight(16, 3, 3, 3), weight(3, 16, 3, 3))
        self.encoder = [weight(32, 3, 3, 3), weight(64, 32, 3, 3), weight(128, 64, 3, 3)]
        self.encoder.append(weight(128, 128, 3, 3))
        self.head = weight(len(VISION_WORDS), 128 * 4 * 4)

    def forward(self, images: torch.Tensor, steps: int) -> torch.Tensor:
        """Word scores [B, words] for images [B, 3, px, px]."""
        x = images
        for _ in range(steps):
            hidden = F.gelu(F.conv2d(x, self.denoise[0], padding=1))
            x = x - 0.1 * F.conv2d(hidden, self.denoise[1], padding=1)
        for w in self.encoder:
            x = F.gelu(F.conv2d(x, w, stride=2, padding=1))
        grid = F.instance_norm(F.adaptive_avg_pool2d(x, 4))
        return F.linear(grid.flatten(1), self.head)


@dataclass(eq=False, kw_only=True)
class _Image(_Call):
    image_px: int
    steps: int
    seed: int


def _pseudo_image(seed: int, px: int) -> torch.Tensor:
    """A [1, 3, px, px] image: a smooth random layout (so images differ in what the network sees,
    not only in noise) plus pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    layout = torch.rand((1, 3, 8, 8), generator=gen)
    image = F.interpolate(layout, size=(px, px), mode="bilinear", align_corners=False)
    return image + 0.1 * torch.randn((1, 3, px, px), generator=gen)


def _word_count(image_px: int) -> int:
    """Bigger images name more things: 8 words at 224 px, 4 to 32 in all."""
    return min(32, max(4, image_px // 28))


def _int_input(request: CallRequest, key: str, default: int, low: int, high: int) -> int:
    """An integer from ``request.inputs``, clamped to [low, high]; ValueError names the key."""
    text = request.inputs.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {text!r}") from None
    return max(low, min(high, value))


class TorchVision(_Engine[_Image]):
    """A small CNN for ``model`` steps (OCR, vision, diffusion-like calls) that names words.

    Inputs: ``image_px`` (default 224, 32..1024) sets the pseudo-image's side, so work grows with
    its square; ``steps`` (default 1, 1..50) repeats the denoising pass. The image is drawn from a
    hash of the prompt and inputs, so a call is deterministic. Waiting calls with the same image
    size and steps run as one batch; others queue behind it.
    """

    def __init__(self, cfg: ReplicaConfig, *, clock: Clock | None = None) -> None:
        super().__init__(cfg, "model", clock)
        self._model: _VisionNet | None = None
        self._batch: list[_Image] = []

    def _build(self) -> None:
        self._model = _VisionNet(self._cfg.seed, self._device)

    async def run(self, request: CallRequest) -> CallOutcome:
        error = self._check_kind(request)
        if error:
            return _failed(error)
        try:
            image_px = _int_input(request, "image_px", 224, 32, 1024)
            steps = _int_input(request, "steps", 1, 1, 50)
        except ValueError as exc:
            return _failed(str(exc))
        key = f"{request.prompt}\0{image_px}\0{steps}".encode()
        loop = asyncio.get_running_loop()
        job = _Image(
            loop=loop,
            future=loop.create_future(),
            prompt_tokens=len(request.prompt.encode()),
            t_start=self._clock.monotonic(),
            image_px=image_px,
            steps=steps,
            seed=_seed(key),
        )
        return await self._submit(job)

    def metrics(self) -> BackendMetrics:
        return BackendMetrics(queued=len(self._waiting), running=len(self._batch))

    def _admit(self) -> None:
        if not self._waiting:
            return
        first = self._waiting.popleft()
        self._batch = [first]
        rest: deque[_Image] = deque()
        for job in self._waiting:
            same = (job.image_px, job.steps) == (first.image_px, first.steps)
            if same and len(self._batch) < self._cfg.concurrency:
                self._batch.append(job)
            else:
                rest.append(job)
        self._waiting = rest

    def _in_flight(self) -> list[_Image]:
        return list(self._batch)

    def _take_in_flight(self) -> list[_Image]:
        jobs, self._batch = self._batch, []
        return jobs

    def _iterate(self) -> None:
        model = self._model
        assert model is not None, "started engines have a model"
        jobs = [job for job in self._batch if not job.cancelled]
        top: list[list[int]] = []
        if jobs:
            px, steps = jobs[0].image_px, jobs[0].steps
            images = torch.cat([_pseudo_image(job.seed, px) for job in jobs]).to(self._device)
            top = model.forward(images, steps).topk(_word_count(px), dim=-1).indices.tolist()
        self._batch = []  # first, so metrics are current when the callers wake
        for job, words in zip(jobs, top, strict=True):
            job.resolve(
                CallOutcome(
                    ok=True,
                    output=" ".join(VISION_WORDS[i] for i in words),
                    prompt_tokens=job.prompt_tokens,
                    output_tokens=len(words),
                )
            )
