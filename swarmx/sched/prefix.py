"""Prefix identity and per-replica prefix indexes: which replica holds how much of a call's
prompt in its KV cache.

A prompt is identified by chained hashes of fixed-size blocks: block i's hash covers blocks
0..i, so two prompts share their first k blocks exactly when their first k hashes are equal,
and a replica that holds a block holds the prefix through it (engines cache whole blocks, and
evict a sequence's tail before its head). Imported traces bring their own ids (Mooncake's
``hash_ids``, 512-token blocks); SwarmX hashes the text it routes.

Pure code: no I/O, no clock. The scheduler, the simulator and the engines' cache-event feeds
share it.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

BLOCK_TOKENS = 64
"""Tokens per block of SwarmX's own hashing (as claude-code's traces; vLLM uses 16, Mooncake's
trace 512)."""
BYTES_PER_TOKEN = 4
"""Without the engine's tokenizer a block is this many bytes of UTF-8 a token: the routing
index is approximate (an engine that reports its cache is precise). The embedded torch LM's
tokens are bytes, and its cache keys its blocks by these same hashes."""
BLOCK_BYTES = BLOCK_TOKENS * BYTES_PER_TOKEN
HASH_BITS = 53
"""Block hashes fit a JSON number any language reads exactly (2^53); a false match between two
given blocks has odds of 2^-53."""
_HASH_MASK = (1 << HASH_BITS) - 1


def block_hashes(prompt: str | bytes, block_bytes: int = BLOCK_BYTES) -> list[int]:
    """Chained hashes of the prompt's whole blocks of ``block_bytes`` bytes of UTF-8 (a partial
    last block is not hashed: engines cache whole blocks only). Deterministic across processes
    and machines (BLAKE2b, not Python's salted ``hash``)."""
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
    raw = prompt.encode("utf-8", "surrogatepass") if isinstance(prompt, str) else prompt
    data = memoryview(raw)
    out: list[int] = []
    running = hashlib.blake2b(digest_size=8)  # block i's id: the hash of every byte through it
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        running.update(data[start : start + block_bytes])
        out.append(int.from_bytes(running.digest(), "little") & _HASH_MASK)
    return out


def shared_blocks(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading blocks two prompts share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixIndex:
    """The blocks one replica's KV cache holds, at most ``capacity_blocks``, least recently
    used evicted first.

    A sequence's blocks are touched tail first, so its head is the most recent: under pressure
    the cache sheds a sequence from its end, as engines do, and a shorter prefix stays usable.
    """

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: collections.OrderedDict[int, int] = collections.OrderedDict()
        """Block -> the use (`insert`) that last touched it, least recently used first."""
        self._uses: dict[int, list[float]] = {}
        """Use -> [when (the caller's clock), how many blocks it is still the last use of],
        oldest first; a use that no block holds any longer is dropped."""
        self._next_use = 0
        self.evicted = 0
        """Blocks dropped to stay within capacity, since the index was made."""
        self.on_evict: Callable[[list[int]], None] | None = None
        """Told the blocks dropped to stay within capacity (an engine's cache that reports its
        evictions, as vLLM's KV events do)."""

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def __iter__(self) -> Iterator[int]:
        """The blocks held, least recently used first."""
        return iter(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` held here (stops at the first one not held)."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def last_used_s(self, block: int) -> float | None:
        """When ``block`` was last used here; None if it is not held."""
        use = self._blocks.get(block)
        return None if use is None else self._uses[use][0]

    def insert(self, hashes: Sequence[int], now_s: float = 0.0) -> None:
        """The replica now holds these blocks (it ran a call with this prompt at ``now_s``): each
        is the most recently used, the head most of all; the least recently used go past
        capacity."""
        blocks, head = self._blocks, hashes[: self.capacity_blocks]
        if head:
            use = self._next_use
            self._next_use += 1
            self._uses[use] = [now_s, float(len(head))]
            for h in reversed(head):
                old = blocks.get(h)
                if old is not None:
                    blocks.move_to_end(h)
                    self._release(old)
                blocks[h] = use
        excess = len(blocks) - self.capacity_blocks
        if excess > 0:
            gone = []
            for _ in range(excess):
                block, use = blocks.popitem(last=False)
                self._release(use)
                gone.append(block)
            self.evicted += excess
            if self.on_evict is not None:
                self.on_evict(gone)

    def _release(self, use: int) -> None:
        """One block is no longer last touched by ``use``."""
        entry = self._uses[use]
        entry[1] -= 1
        if entry[1] <= 0:
            del self._uses[use]

    def evicts_used_since(self, hashes: Sequence[int], since_s: float) -> int:
        """Of the blocks that taking a prompt of ``hashes`` would evict (`insert` keeps its
        first ``capacity_blocks``, and moves rather than evicts those it holds), those used at or
        after ``since_s``: prefixes a session may still come back for.

        Uses are in clock order, so the blocks not used since then lead the eviction order: they
        go first, then the ones still wanted. Counted by use, not by block (a use holds a
        call's blocks), less the prompt's own blocks among them, which move instead."""
        blocks, uses = self._blocks, self._uses
        head = hashes[: self.capacity_blocks]
        new = own_stale = 0
        for h in head:
            use = blocks.get(h)
            if use is None:
                new += 1
            elif uses[use][0] < since_s:
                own_stale += 1
        over = len(blocks) + new - self.capacity_blocks
        if over <= 0:
            return 0
        stale = -own_stale
        for when, held in uses.values():
            if when >= since_s or stale >= over:
                break
            stale += int(held)
        return max(0, over - stale)

    def remove(self, hashes: Iterable[int]) -> None:
        """The replica dropped these blocks (its engine said so)."""
        for h in hashes:
            use = self._blocks.pop(h, None)
            if use is not None:
                self._release(use)

    def clear(self) -> None:
        """The replica's cache is empty (it restarted, or its engine reset the cache)."""
        self._blocks.clear()
        self._uses.clear()


class PrefixIndexes:
    """A `PrefixIndex` per replica, each sized by its replica's KV cache."""

    def __init__(self) -> None:
        self._by_replica: dict[str, PrefixIndex] = {}

    def get(self, replica: str) -> PrefixIndex | None:
        return self._by_replica.get(replica)

    def ensure(self, replica: str, capacity_blocks: int) -> PrefixIndex:
        """The replica's index, made (or resized, keeping its most recent blocks) to hold
        ``capacity_blocks``."""
        index = self._by_replica.get(replica)
        if index is None:
            index = self._by_replica[replica] = PrefixIndex(capacity_blocks)
        elif index.capacity_blocks != capacity_blocks:
            index.capacity_blocks = capacity_blocks
            index.insert([])  # evicts down to the new capacity
        return index

    def cached_blocks(self, replica: str, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` the replica holds (0 for one without an index)."""
        index = self._by_replica.get(replica)
        return 0 if index is None else index.match(hashes)

    def drop(self, replica: str) -> None:
        """The replica is gone: its cache with it."""
        self._by_replica.pop(replica, None)

    def replicas(self) -> list[str]:
        return sorted(self._by_replica)


class ReuseGaps:
    """How long after its last use a cached prefix is used again, from the hits seen: the
    ``level`` quantile of the latest ``window`` gaps is the horizon within which a prefix still
    counts as wanted (a session between turns: its last call, then the agent's tool or think
    time). Pure: the gaps come in, no clock is read."""

    def __init__(self, level: float = 0.9, window: int = 1024) -> None:
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        self.level = level
        self._gaps: collections.deque[float] = collections.deque(maxlen=window)
        self._sorted: list[float] = []
        self._stale = 0

    def observe(self, gap_s: float) -> None:
        self._gaps.append(max(0.0, gap_s))
        self._stale += 1

    @property
    def horizon_s(self) -> float:
        """The quantile of the gaps seen (0 before any: nothing counts as wanted)."""
        if self._stale > len(self._sorted) // 8 or not self._sorted:
            self._sorted, self._stale = sorted(self._gaps), 0
        if not self._sorted:
            return 0.0
        k = min(len(self._sorted) - 1, int(self.level * len(self._sorted)))
        return self._sorted[k]
