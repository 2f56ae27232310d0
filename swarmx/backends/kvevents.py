"""An engine's own account of its prefix cache (vLLM's and SGLang's KV-cache events), turned into
what the scheduler's prefix index speaks: SwarmX block ids that are gone.

vLLM (``--kv-events-config``) and SGLang publish, over a ZeroMQ PUB socket, batches of
``BlockStored`` (chained block hashes, their parent, the blocks' token ids), ``BlockRemoved``
and ``AllBlocksCleared``. Their hashes cover token ids, SwarmX's cover the prompt's bytes
(`swarmx.sched.prefix`), so the two are joined through the engine's own tokenizer: after a call,
the node asks the engine to tokenize the same request, walks the engine's held blocks along
those tokens, and notes, for each engine block, which of the call's SwarmX blocks its loss
takes away. The engine evicts a sequence from its tail, so losing block j leaves the prompt's
first j blocks usable: the SwarmX blocks past that point are reported gone.

Pure code: no sockets, no clock. `decode_batch` raises `EventError` on a frame it cannot
read; the caller counts it and goes on.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from swarmx.backends.base import CacheReport

ExternalHash = int | bytes
"""vLLM's block hash: an int in older releases, a digest in newer ones."""

MAX_BLOCKS = 1 << 21
"""Engine blocks mirrored at most (2M: 32M tokens at vLLM's 16 a block, far beyond one GPU's
KV cache). A publisher that stores more without removing any is buggy or hostile: its excess
is dropped and counted, not held."""
MAX_TRACKED = 512
"""Recent prompts whose SwarmX blocks are joined to engine blocks, per replica."""


class EventError(ValueError):
    """A frame or event that is not a KV-event batch."""


class _Event(msgspec.Struct, array_like=True, tag=True):
    pass


class BlockStored(_Event):
    block_hashes: list[ExternalHash]
    parent_block_hash: ExternalHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(_Event):
    block_hashes: list[ExternalHash]
    medium: str | None = None


class AllBlocksCleared(_Event):
    pass


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_DECODER = msgspec.msgpack.Decoder(_Batch)


def decode_batch(payload: bytes) -> list[BlockStored | BlockRemoved | AllBlocksCleared]:
    """The events of one published batch (vLLM's ``KVEventBatch``; SGLang sends the same shape).
    Fields newer releases append are ignored; a frame of another shape raises `EventError`."""
    try:
        batch = _DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EventError(str(exc)) from None
    for e in batch.events:
        if isinstance(e, BlockStored) and (
            e.block_size < 1 or len(e.token_ids) != len(e.block_hashes) * e.block_size
        ):
            raise EventError(
                f"BlockStored: {len(e.token_ids)} token ids for {len(e.block_hashes)} blocks "
                f"of {e.block_size}"
            )
    return batch.events


@dataclass(eq=False)
class _Tracked:
    """One prompt's SwarmX blocks, and how many of them stay usable while each joined engine
    block is held."""

    ours: tuple[int, ...]
    engine: list[tuple[ExternalHash, int]] = field(default_factory=list)
    """(engine block, SwarmX blocks usable if it goes), shallowest first."""


class EngineBlocks:
    """A mirror of one engine's prefix cache, by its own block hashes, joined to SwarmX's."""

    def __init__(self, max_blocks: int = MAX_BLOCKS, max_tracked: int = MAX_TRACKED) -> None:
        self.max_blocks = max_blocks
        self.max_tracked = max_tracked
        self.block_size = 0
        """Tokens per engine block, from its events (0 until the first)."""
        self._child: dict[tuple[ExternalHash | None, int], ExternalHash] = {}
        """(parent, the block's tokens' digest) -> the block: a prompt's path through the cache."""
        self._key: dict[ExternalHash, tuple[ExternalHash | None, int]] = {}
        """Each held block's key in ``_child``."""
        self._owners: dict[ExternalHash, list[_Tracked]] = {}
        self._tracked: collections.OrderedDict[tuple[int, ...], _Tracked] = (
            collections.OrderedDict()
        )
        self._removed: dict[int, None] = {}
        self.resets = 0
        self.capacity_tokens: int | None = None
        self._full = False
        """It evicted once: from then on its cache is full."""
        self.refused = 0
        """Frames, and events in them, that could not be read or were past ``max_blocks``."""

    def __len__(self) -> int:
        return len(self._key)

    # --- the engine's events ----------------------------------------------------------------

    def apply(self, events: Sequence[BlockStored | BlockRemoved | AllBlocksCleared]) -> None:
        for e in events:
            if isinstance(e, BlockStored):
                self._stored(e)
            elif isinstance(e, BlockRemoved):
                self._gone(e.block_hashes)
                self._full = True
            else:
                self.clear()
        if self._full:  # an engine that evicted once stays full: what it holds is its size
            held = len(self._key) * self.block_size
            self.capacity_tokens = max(self.capacity_tokens or 0, held)

    def _stored(self, e: BlockStored) -> None:
        self.block_size = e.block_size
        parent = e.parent_block_hash
        for k, h in enumerate(e.block_hashes):
            if h not in self._key:
                if len(self._key) >= self.max_blocks:
                    self.refused += 1
                    return
                digest = hash(tuple(e.token_ids[k * e.block_size : (k + 1) * e.block_size]))
                self._key[h] = (parent, digest)
                self._child[(parent, digest)] = h
            parent = h

    def _gone(self, hashes: Sequence[ExternalHash]) -> None:
        for h in hashes:
            key = self._key.pop(h, None)
            if key is None:
                continue
            if self._child.get(key) == h:
                del self._child[key]
            for t in self._owners.pop(h, ()):
                self._truncate(t, h)

    def _truncate(self, t: _Tracked, h: ExternalHash) -> None:
        """Engine block ``h`` of ``t``'s path is gone: so is everything of ``t`` past it."""
        cut = next((i for i, (eh, _) in enumerate(t.engine) if eh == h), None)
        if cut is None:
            return
        usable = t.engine[cut][1]
        for eh, _ in t.engine[cut + 1 :]:
            owners = self._owners.get(eh)
            if owners is not None and t in owners:
                owners.remove(t)
        del t.engine[cut:]
        for b in t.ours[usable:]:
            self._removed[b] = None
        t.ours = t.ours[:usable]

    def clear(self) -> None:
        """The engine dropped its whole cache (``AllBlocksCleared``, or it restarted)."""
        self._child.clear()
        self._key.clear()
        self._owners.clear()
        self._tracked.clear()
        self._removed.clear()
        self.resets += 1

    # --- joining a prompt's two identities ----------------------------------------------------

    def held(self, token_ids: Sequence[int]) -> list[ExternalHash]:
        """The engine blocks that hold the leading whole blocks of ``token_ids``, in order."""
        size = self.block_size
        path: list[ExternalHash] = []
        parent: ExternalHash | None = None
        for start in range(0, len(token_ids) - size + 1 if size else 0, size):
            h = self._child.get((parent, hash(tuple(token_ids[start : start + size]))))
            if h is None:
                break
            path.append(h)
            parent = h
        return path

    def track(self, ours: Sequence[int], token_ids: Sequence[int]) -> int:
        """Join a prompt's SwarmX blocks ``ours`` to the engine blocks holding its tokens, so
        their eviction is reported in SwarmX's ids; returns how many engine blocks hold it.

        The two block grids differ (bytes against tokens, the chat template's tokens around the
        prompt), so SwarmX blocks count as held in proportion to the prompt's tokens held: losing
        engine block j leaves ``j * size * len(ours) // len(token_ids)`` of them. Only the last
        engine block of each such step is joined (a bounded map); the engine evicts a sequence
        tail first, so that block goes before any other of its step, and the report is exact
        to the step."""
        if not ours or not token_ids:
            return 0
        key = tuple(ours)
        old = self._tracked.pop(key, None)
        if old is not None:
            self._untrack(old)
        path = self.held(token_ids)
        t = _Tracked(key)
        per = self.block_size * len(ours)
        for j, h in enumerate(path):
            usable = j * per // len(token_ids)
            if j + 1 == len(path) or (j + 1) * per // len(token_ids) != usable:
                t.engine.append((h, usable))
                self._owners.setdefault(h, []).append(t)
        self._tracked[key] = t
        while len(self._tracked) > self.max_tracked:
            self._untrack(self._tracked.popitem(last=False)[1])
        return len(path)

    def _untrack(self, t: _Tracked) -> None:
        for h, _ in t.engine:
            owners = self._owners.get(h)
            if owners is not None and t in owners:
                owners.remove(t)
                if not owners:
                    del self._owners[h]

    def report(self) -> CacheReport:
        """What happened since the last report (the removed ids are handed over once)."""
        removed = list(self._removed)
        self._removed.clear()
        return CacheReport(removed, self.resets, self.capacity_tokens, self.refused)
