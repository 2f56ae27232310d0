"""What the learned predictor reads off a call, as tensors: the prompt's hashed n-grams, the
names seen in training (vocabularies), and the standardised numbers of a call and of a
placement.

Apart from the network because a saved model is only as good as this encoding: the n-gram
buckets, vocabulary rows and normalisation moments stored in a model file mean something only
through these functions, so changing one changes what every saved model predicts
(`tests/unit/models/test_features.py` pins the hashes).
"""

from __future__ import annotations

import array
import collections
import functools
import itertools
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from swarmx.models.query import Candidate, Query, place_of

CALL_FEATURES = 26
"""Numeric call features (`_call_row`), before the novelty and the input-kind columns (model
files from before the session's stops, tool loop, pause and the serving side's last minute
read the first 17: `FeatureConfig.call_features`)."""
PLACE_FEATURES = 6
"""Numeric placement features: gpu_util, gpu_mem_frac, cpu_util, log1p inflight, log1p queue,
log1p cached prompt tokens (model files from before the last one read the first 5:
`FeatureConfig.place_features`)."""

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that shapes the features and the network; stored in the model file."""

    levels: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99)
    hash_buckets: int = 1 << 15
    """Buckets for the prompt's hashed word uni/bigrams and char trigrams."""
    embed_dim: int = 32
    """Width of the prompt and model embeddings (per ensemble member)."""
    hidden: int = 128
    head_hidden: int = 64
    """Width of the head's last hidden layer, which runs once per candidate placement."""
    ensemble: int = 3
    small_dim: int = 8
    """Width of the workflow-name and GPU embeddings."""
    workflow_buckets: int = 1024
    max_words: int = 256
    """Words hashed per prompt: the first and last halves of this many (long agent prompts keep
    the task at the head and the latest turn at the tail)."""
    unknown_p: float = 0.1
    """Training share of calls whose model (and GPU) is replaced by "unknown"."""
    novelty_p: float = 0.5
    """Training share of calls that lose n-grams: half of them all, half a uniform share. Mean
    pooling hides a partial loss (a random half of the n-grams averages like all of them), so
    only the complete losses teach what a prompt with no familiar wording costs."""
    tail_weight: float = 0.5
    """Each level's training loss is weighted by pdf(z_p) ** -tail_weight: pinball gradients
    at tail levels are rare and small, so unweighted the tails learn last."""
    spread: float = 0.5
    """Ensemble std times the level's normal score, times this, is added to the members' mean
    quantile. 1.0 in files from before the session features: with them, members disagree most
    where training calls are few (a pause under a second before a call: 57 of 24,585
    claude-code calls), and the full widening put some p99 forecasts at hours where nothing
    took five minutes (p99 pinball 1.1-2.6x the per-model baseline's over three seeds, against
    0.83-0.87x at 0.5; p50 and p90 alike)."""
    load_edges: tuple[int, ...] = (1, 3, 8)
    """Conformal load buckets by inflight + queue_depth: 0, 1-2, 3-7, 8+."""
    place_features: int = PLACE_FEATURES
    """Placement columns the model reads: the first this many of `PLACE_FEATURES` (5 in files
    from before cached prompt tokens were one: `swarmx.models.modelfile.load`)."""
    call_features: int = CALL_FEATURES
    """Call columns the model reads: the first this many of `CALL_FEATURES` (17 in files from
    before the session's stops and the serving side's state were)."""
    min_bucket_calls: int = 50
    """A load bucket with fewer calibration calls uses the global shift; a novelty bucket with
    fewer, none but the marginal floor."""
    novelty_edges: tuple[float, ...] = (0.05, 0.15, 0.3, 0.5)
    """Conformal novelty buckets by the share of a prompt's n-grams never seen in training:
    familiar wording below the first edge, then ever less of the prompt readable."""

    def __post_init__(self) -> None:
        levels = tuple(sorted(float(p) for p in self.levels))
        if not levels or any(not 0 < p < 1 for p in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct and in (0, 1): {self.levels}")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "load_edges", tuple(int(e) for e in self.load_edges))
        edges = tuple(float(e) for e in self.novelty_edges)
        if any(not 0 < e < 1 for e in edges) or any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError(f"novelty_edges must increase within (0, 1): {self.novelty_edges}")
        object.__setattr__(self, "novelty_edges", edges)
        sizes = (self.hash_buckets, self.embed_dim, self.hidden, self.head_hidden, self.ensemble)
        if min(sizes) < 1:
            raise ValueError(f"sizes must be positive: {sizes}")


# --- the prompt's n-grams --------------------------------------------------------------------


def _crc(token: str, buckets: int) -> int:
    """A hash that is the same in every process (Python's hash() is salted per run)."""
    return zlib.crc32(token.encode()) % buckets


@functools.lru_cache(maxsize=1 << 16)
def _word(word: str, buckets: int) -> tuple[tuple[int, ...], int, bytes]:
    """A word's own buckets (the word and its char trigrams); the CRC state after "b:<word> ",
    which starts every bigram the word leads; and its bytes, which end every bigram it follows.
    CRC32 is incremental, so a bigram costs one short CRC instead of a string built and hashed."""
    padded = f"<{word}>"
    trigrams = (_crc("c:" + padded[i : i + 3], buckets) for i in range(len(padded) - 2))
    return (_crc("w:" + word, buckets), *trigrams), zlib.crc32(f"b:{word} ".encode()), word.encode()


def ngram_buckets(text: str, buckets: int, max_words: int) -> list[int]:
    """Distinct hashed buckets of the text's word unigrams, bigrams and char trigrams."""
    if len(text) > max_words * 16:
        half = max_words * 8
        text = text[:half] + " " + text[-half:]
    words = _WORD.findall(text.lower())
    if len(words) > max_words:
        words = words[: max_words // 2] + words[-(max_words - max_words // 2) :]
    parts = [_word(w, buckets) for w in words]
    bigrams = (zlib.crc32(b[2], a[1]) % buckets for a, b in itertools.pairwise(parts))
    return list(dict.fromkeys(itertools.chain(*(p[0] for p in parts), bigrams)))


TEXTS_CACHED = 4096
"""Prompts whose n-grams `Encoder` keeps, most recently scored first."""


# --- numeric rows ----------------------------------------------------------------------------


def _log1p(x: float | None) -> float:
    return math.nan if x is None else math.log1p(max(x, 0.0))


def _log(x: float | None) -> float:
    return math.nan if x is None else math.log(max(x, 1e-6))


def _call_row(q: Query, has_text: bool) -> list[float]:
    """The `CALL_FEATURES` raw numbers of a call; NaN where the session has no value yet."""
    s = q.session
    mean_log = math.nan if s.mean_log_latency is None else s.mean_log_latency
    return [
        math.log1p(max(q.prompt_tokens, 0)),
        math.log1p(max(1.0 - q.prefix_share, 0.0) * max(q.prompt_tokens, 0)),  # new tokens
        math.log1p(max(q.max_tokens, 0)),
        math.log1p(max(q.turn, 0)),
        q.prefix_share,
        math.log1p(max(s.prior_calls, 0)),
        _log1p(s.last_output_tokens),
        _log(s.last_latency_s),
        _log(s.last_latency_s) - _log1p(s.last_output_tokens),  # the service's recent pace
        mean_log,
        _log1p(s.mean_output_tokens),
        mean_log - _log1p(s.mean_output_tokens),
        float(s.last_output_tokens is None),
        float(s.last_latency_s is None),
        float(s.mean_log_latency is None),
        float(s.mean_output_tokens is None),
        float(has_text),
        float(s.last_stop == "tool"),
        float(s.last_stop == "length"),
        float(s.last_stop == "end"),
        math.log1p(s.tool_loop),
        _log1p(s.since_last_s),
        math.log1p(s.recent_calls),
        math.nan if s.recent_log_latency is None else s.recent_log_latency,
        math.nan if s.recent_log_pace is None else s.recent_log_pace,
        float(s.since_last_s is None),
    ]


def _place_raw(
    places: Sequence[Candidate], cached_tokens: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """[N, PLACE_FEATURES] unstandardised placement features and each placement's load
    (inflight + queue); ``cached_tokens`` (aligned with ``places``; none: 0) is the last."""
    if not places:
        return torch.zeros(0, PLACE_FEATURES), torch.zeros(0)
    cached = cached_tokens if cached_tokens is not None else itertools.repeat(0, len(places))
    columns = itertools.chain(*list(zip(*places, strict=True))[1:], cached)
    flat = array.array("f", columns)
    raw = torch.frombuffer(flat, dtype=torch.float32).view(PLACE_FEATURES, -1).t()
    counts = raw[:, 3:].clamp(min=0)
    raw[:, 3:] = torch.log1p(counts)
    return raw, counts[:, :2].sum(1)


def _places_of(queries: Sequence[Query]) -> tuple[Tensor, Tensor]:
    return _place_raw([place_of(q) for q in queries], [q.cached_tokens for q in queries])


def _standardise(raw: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return torch.nan_to_num((raw - mean) / std, nan=0.0)


def _moments(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean and std over the non-missing (non-NaN) values; std 1 for constant columns."""
    mean = torch.nan_to_num(torch.nanmean(raw, 0), nan=0.0)
    std = torch.nan_to_num(torch.nanmean((raw - mean) ** 2, 0).sqrt(), nan=1.0)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def longs(xs: list[int]) -> Tensor:
    """torch.tensor(xs) in half the time."""
    return (
        torch.frombuffer(array.array("q", xs), dtype=torch.long)
        if xs
        else torch.zeros(0, dtype=torch.long)
    )


# --- encoded batches -------------------------------------------------------------------------


@dataclass
class Calls:
    """The call-side inputs of N queries (everything but device and runtime)."""

    ids: Tensor
    """Flat n-gram buckets of all prompts, ``counts[i]`` of them for row i."""
    counts: Tensor
    model: Tensor
    workflow: Tensor
    kind: Tensor
    inputs: Tensor
    """[N, input-kind vocabulary] multi-hot (column 0: kinds not in the vocabulary)."""
    num: Tensor
    """[N, 17] standardised numeric features, missing values at the mean (0)."""
    novelty: Tensor
    """[N] share of the prompt's n-grams never seen in training."""

    def take(self, idx: Tensor) -> Calls:
        starts = torch.cumsum(self.counts, 0) - self.counts
        lens = self.counts[idx]
        first = torch.repeat_interleave(starts[idx], lens)
        within = torch.arange(int(lens.sum())) - torch.repeat_interleave(
            torch.cumsum(lens, 0) - lens, lens
        )
        return Calls(
            self.ids[first + within],
            lens,
            self.model[idx],
            self.workflow[idx],
            self.kind[idx],
            self.inputs[idx],
            self.num[idx],
            self.novelty[idx],
        )


@dataclass
class Places:
    """The device/runtime inputs of N placements."""

    gpu: Tensor
    num: Tensor
    """[N, 5] standardised: gpu_util, gpu_mem_frac, cpu_util, log1p inflight, log1p queue."""
    bucket: Tensor
    """Conformal load bucket of each placement."""

    def take(self, idx: Tensor) -> Places:
        return Places(self.gpu[idx], self.num[idx], self.bucket[idx])


@dataclass
class Vocab:
    """Names seen in training; index 0 of each table is "unknown"."""

    models: list[str] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)

    def index(self, table: str) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(getattr(self, table))}


CallFields = tuple[list[int], list[float], list[int], list[int]]
"""One call's encoder inputs (`Encoder.call_fields`): its familiar n-gram buckets; its raw
numeric row with the novelty last; its input-kind columns; its model, workflow and kind ids."""


class Encoder:
    """Queries to tensors, with the vocabularies, normalisation and seen n-grams a model was
    fitted with (all saved in its file)."""

    def __init__(
        self, cfg: FeatureConfig, vocab: Vocab, norm: dict[str, Tensor], seen: Tensor
    ) -> None:
        self.cfg = cfg
        self.vocab = vocab
        self.norm = norm
        """Moments of the numeric features: call_mean, call_std, place_mean, place_std."""
        self.seen = seen
        """[hash_buckets] bool: the n-gram buckets the embeddings were trained on."""
        self._edges = torch.tensor(cfg.load_edges, dtype=torch.float32)
        self._reindex()
        self._seen_bytes = bytes(self.seen.to(torch.uint8).tolist())  # fast lookups in encoding
        self._texts: collections.OrderedDict[tuple[int, int], tuple[list[int], int]]
        self._texts = collections.OrderedDict()
        """(Prompt hash, length) -> (its seen n-grams, how many it has): a call scored again (a
        retry, a call that waited in the queue, a fan-out's shared prompt) is not hashed
        again."""

    @classmethod
    def fit(cls, cfg: FeatureConfig, queries: Sequence[Query]) -> Encoder:
        """Vocabularies, normalisation and seen n-grams from ``queries`` (the training calls)."""
        vocab = Vocab(
            models=sorted({q.model for q in queries}),
            gpus=sorted({q.gpu for q in queries}),
            kinds=sorted({q.kind for q in queries}),
            inputs=sorted({k for q in queries for k in q.input_kinds}),
        )
        grams = [ngram_buckets(q.prompt, cfg.hash_buckets, cfg.max_words) for q in queries]
        call_mean, call_std = _moments(
            torch.tensor(
                [
                    _call_row(q, bool(g))[: cfg.call_features]
                    for q, g in zip(queries, grams, strict=True)
                ]
            )
        )
        place_mean, place_std = _moments(_places_of(queries)[0][:, : cfg.place_features])
        norm = {"call_mean": call_mean, "call_std": call_std}
        norm |= {"place_mean": place_mean, "place_std": place_std}
        seen = torch.zeros(cfg.hash_buckets, dtype=torch.bool)
        seen[torch.tensor([i for g in grams for i in g], dtype=torch.long)] = True
        return cls(cfg, vocab, norm, seen)

    def _reindex(self) -> None:
        self._models = self.vocab.index("models")
        self._gpus = self.vocab.index("gpus")
        self._kinds = self.vocab.index("kinds")
        self._inputs = self.vocab.index("inputs")

    def knows_gpu(self, gpu: str) -> bool:
        """The GPU is in the vocabulary: the latency head learned its speed."""
        return gpu in self._gpus

    def grow(self, queries: Sequence[Query]) -> dict[str, int]:
        """Append the models, GPUs, kinds and input kinds of ``queries`` not yet in the
        vocabularies and mark their n-grams seen (for fine-tuning on calls the model has not
        met); returns how many names each vocabulary gained, for the net's tables."""
        added = {}
        for table, names in (
            ("models", {q.model for q in queries}),
            ("gpus", {q.gpu for q in queries}),
            ("kinds", {q.kind for q in queries}),
            ("inputs", {k for q in queries for k in q.input_kinds}),
        ):
            new = sorted(names - set(getattr(self.vocab, table)))
            if new:
                getattr(self.vocab, table).extend(new)
                added[table] = len(new)
        self._reindex()
        cfg = self.cfg
        grams = [
            i for q in queries for i in ngram_buckets(q.prompt, cfg.hash_buckets, cfg.max_words)
        ]
        self.seen[torch.tensor(grams, dtype=torch.long)] = True
        self._seen_bytes = bytes(self.seen.to(torch.uint8).tolist())
        self._texts.clear()  # which n-grams are seen changed
        return added

    def _text(self, prompt: str) -> tuple[list[int], int]:
        """The prompt's seen n-grams and how many it has, from the cache where it was scored
        before (keyed by its hash and length, not held: prompts can be megabytes)."""
        texts, key = self._texts, (hash(prompt), len(prompt))
        hit = texts.get(key)
        if hit is not None:
            texts.move_to_end(key)
            return hit
        cfg, seen = self.cfg, self._seen_bytes
        grams = ngram_buckets(prompt, cfg.hash_buckets, cfg.max_words)
        kept = list(itertools.compress(grams, map(seen.__getitem__, grams)))
        hit = texts[key] = kept, len(grams)
        if len(texts) > TEXTS_CACHED:
            texts.popitem(last=False)
        return hit

    def call_fields(self, q: Query) -> CallFields:
        """One query's `CallFields`. The novelty is the share of its n-grams never seen in
        training, whose embeddings are untrained noise and are left out."""
        cfg = self.cfg
        kept, n_grams = self._text(q.prompt)
        row = _call_row(q, n_grams > 0)[: cfg.call_features]
        row.append((n_grams - len(kept)) / max(n_grams, 1))
        inputs = sorted({self._inputs.get(name, 0) for name in q.input_kinds})
        ids = [
            self._models.get(q.model, 0),
            _crc("wf:" + q.workflow_name, cfg.workflow_buckets),
            self._kinds.get(q.kind, 0),
        ]
        return kept, row, inputs, ids

    def encode_calls(self, queries: Sequence[Query]) -> Calls:
        n_inputs = len(self.vocab.inputs) + 1
        ids: list[int] = []
        rows: list[list[float]] = []
        ints: list[list[int]] = []
        for q in queries:
            kept, row, inputs, idx = self.call_fields(q)
            ids.extend(kept)
            hot = [0.0] * n_inputs
            for i in inputs:
                hot[i] = 1.0
            rows.append(row + hot)
            ints.append([len(kept), *idx])
        n, k = len(queries), self.cfg.call_features
        floats = torch.tensor(rows, dtype=torch.float32).view(n, k + 1 + n_inputs)
        columns = torch.tensor(ints, dtype=torch.long).view(n, 4)
        return Calls(
            ids=torch.tensor(ids, dtype=torch.long),
            counts=columns[:, 0],
            model=columns[:, 1],
            workflow=columns[:, 2],
            kind=columns[:, 3],
            inputs=floats[:, k + 1 :],
            num=_standardise(floats[:, :k], self.norm["call_mean"], self.norm["call_std"]),
            novelty=floats[:, k],
        )

    def encode_places(
        self, places: Sequence[Candidate], cached_tokens: Sequence[int] | None = None
    ) -> Places:
        raw, load = _place_raw(places, cached_tokens)
        raw = raw[:, : self.cfg.place_features]
        return Places(
            gpu=longs([self._gpus.get(c[0], 0) for c in places]),
            num=_standardise(raw, self.norm["place_mean"], self.norm["place_std"]),
            bucket=torch.bucketize(load, self._edges, right=True),
        )

    def encode(self, queries: Sequence[Query]) -> tuple[Calls, Places]:
        return self.encode_calls(queries), self.encode_places(
            [place_of(q) for q in queries], [q.cached_tokens for q in queries]
        )
