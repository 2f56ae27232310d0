"""The learned distributional latency predictor: quantiles of a call's service time from what is
known at dispatch (prompt, target model, device, runtime load, the agent session so far).

Why it is built this way:

- Quantiles in log-latency space, monotone by construction (a base plus cumulative softplus
  gaps) and trained with the pinball loss, so routers get a tail and not just a mean.
- An ensemble whose disagreement widens the forecast, an "unknown" model row trained on random
  calls (a marginal, hence wider, forecast for models never seen), and a novelty input (share of
  the prompt's n-grams never seen in training, simulated in training by n-gram dropout) so
  unfamiliar calls get wider tails instead of confident guesses.
- Split-conformal shifts per load bucket, fitted on held-out sessions, so the tails hold where
  the scheduler uses them; plus an online shift the runtime calibration monitor sets.
- Device and runtime inputs join late in the network: scoring one call on many candidate
  placements encodes the call once (`QuantilePredictor.predict_candidates`).

This is the only module that runs torch for prediction; `swarmx.models.train` fits it.
"""

from __future__ import annotations

import array
import copy
import dataclasses
import functools
import hashlib
import io
import itertools
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmx.models.dist import LatencyDist, trusted_dists
from swarmx.models.query import Candidate, Query, place_of

FORMAT = 1

_WORD = re.compile(r"\w+")
_CALL_FEATURES = 17
_PLACE_FEATURES = 5


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
    spread: float = 1.0
    """Ensemble std times the level's normal score is added to the members' mean quantile."""
    load_edges: tuple[int, ...] = (1, 3, 8)
    """Conformal load buckets by inflight + queue_depth: 0, 1-2, 3-7, 8+."""
    min_bucket_calls: int = 50
    """A load bucket with fewer calibration calls uses the global shift."""

    def __post_init__(self) -> None:
        levels = tuple(sorted(float(p) for p in self.levels))
        if not levels or any(not 0 < p < 1 for p in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct and in (0, 1): {self.levels}")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "load_edges", tuple(int(e) for e in self.load_edges))
        sizes = (self.hash_buckets, self.embed_dim, self.hidden, self.head_hidden, self.ensemble)
        if min(sizes) < 1:
            raise ValueError(f"sizes must be positive: {sizes}")


# --- feature encoding ------------------------------------------------------------------------


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


def _log1p(x: float | None) -> float:
    return math.nan if x is None else math.log1p(max(x, 0.0))


def _log(x: float | None) -> float:
    return math.nan if x is None else math.log(max(x, 1e-6))


def _call_row(q: Query, has_text: bool) -> list[float]:
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
    ]


def _place_raw(places: Sequence[Candidate]) -> tuple[Tensor, Tensor]:
    """[N, 5] unstandardised placement features and each placement's load (inflight + queue)."""
    if not places:
        return torch.zeros(0, _PLACE_FEATURES), torch.zeros(0)
    columns = itertools.chain.from_iterable(list(zip(*places, strict=True))[1:])
    flat = array.array("f", columns)
    raw = torch.frombuffer(flat, dtype=torch.float32).view(_PLACE_FEATURES, -1).t()
    counts = raw[:, 3:].clamp(min=0)
    raw[:, 3:] = torch.log1p(counts)
    return raw, counts.sum(1)


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


def _standardise(raw: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return torch.nan_to_num((raw - mean) / std, nan=0.0)


def _moments(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Column mean and std over the non-missing (non-NaN) values; std 1 for constant columns."""
    mean = torch.nan_to_num(torch.nanmean(raw, 0), nan=0.0)
    std = torch.nan_to_num(torch.nanmean((raw - mean) ** 2, 0).sqrt(), nan=1.0)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


@dataclass
class Vocab:
    """Names seen in training; index 0 of each table is "unknown"."""

    models: list[str] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)

    def index(self, table: str) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(getattr(self, table))}


# --- the network -----------------------------------------------------------------------------


def _uniform(*shape: int, fan_in: int, gen: torch.Generator | None) -> nn.Parameter:
    """nn.Linear's default initialisation."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound, generator=gen))


def _by_member(x: Tensor, n: int, members: int) -> Tensor:
    """[N, E*d] (all members' embeddings side by side) -> [E, N, d]."""
    return x.view(n, members, -1).transpose(0, 1)


def _monotone(out: Tensor) -> Tensor:
    """[..., K] raw outputs -> non-decreasing log quantiles: a base plus softplus gaps."""
    gaps = F.softplus(out)  # on all of out: 3x faster than on a strided slice
    gaps[..., 0] = out[..., 0]
    return gaps.cumsum_(-1)


class QuantileNet(nn.Module):
    """E independently initialised members, vectorised along a leading member dimension.

    Call-side inputs go through a two-layer trunk; device/runtime inputs are added to its
    output before the head, so many placements of one call reuse the trunk. Embedding tables
    hold all members side by side ([rows, E*d]) so vocabularies grow by appending rows."""

    def __init__(
        self, cfg: FeatureConfig, vocab: Vocab, gen: torch.Generator | None = None
    ) -> None:
        super().__init__()
        n_models, n_gpus, n_kinds, n_inputs = (
            len(vocab.models) + 1,
            len(vocab.gpus) + 1,
            len(vocab.kinds) + 1,
            len(vocab.inputs) + 1,
        )
        e, d, h, k, s = cfg.ensemble, cfg.embed_dim, cfg.hidden, len(cfg.levels), cfg.small_dim
        self.members = e

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=gen))

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:
            return _uniform(*shape, fan_in=fan_in, gen=gen)

        self.text = nn.EmbeddingBag(cfg.hash_buckets, e * d, mode="mean")
        nn.init.normal_(self.text.weight, generator=gen)
        self.model = normal(n_models, e * d)
        self.workflow = normal(cfg.workflow_buckets, e * s)
        self.gpu = normal(n_gpus, e * s)
        n_in = 2 * d + s + _CALL_FEATURES + 1
        self.kind = uniform(n_kinds, e * h, fan_in=n_in)  # one-hot rows into the first layer
        self.inputs = uniform(n_inputs, e * h, fan_in=n_in)  # multi-hot rows, likewise
        self.w1, self.b1 = uniform(e, n_in, h, fan_in=n_in), uniform(e, 1, h, fan_in=n_in)
        self.w2, self.b2 = uniform(e, h, h, fan_in=h), uniform(e, 1, h, fan_in=h)
        self.wp = uniform(e, s + _PLACE_FEATURES, h, fan_in=s + _PLACE_FEATURES)
        g = cfg.head_hidden
        self.w3, self.b3 = uniform(e, h, g, fan_in=h), uniform(e, 1, g, fan_in=h)
        self.w4, self.b4 = uniform(e, g, k, fan_in=g), uniform(e, 1, k, fan_in=g)

    def tables(self) -> list[nn.Parameter]:
        """The vocabulary tables: a row of one is trained only by the calls that use it."""
        return [self.model, self.gpu, self.kind, self.inputs, self.workflow]

    def call_part(
        self, calls: Calls, ids: Tensor, offsets: Tensor, novelty: Tensor, model: Tensor
    ) -> Tensor:
        """[E, N, H]: the call's contribution to the head's first layer."""
        e, n = self.members, calls.num.shape[0]
        text: Tensor = self.text(ids, offsets)  # an empty bag (no familiar n-gram) gives 0
        x = torch.cat(
            [
                _by_member(text, n, e),
                _by_member(F.embedding(model, self.model), n, e),
                _by_member(F.embedding(calls.workflow, self.workflow), n, e),
                calls.num.expand(e, n, -1),
                novelty.view(1, n, 1).expand(e, n, 1),
            ],
            2,
        )
        pre = (
            torch.baddbmm(self.b1, x, self.w1)
            + _by_member(F.embedding(calls.kind, self.kind), n, e)
            + _by_member(calls.inputs @ self.inputs, n, e)
        )
        return torch.baddbmm(self.b2, torch.relu(pre), self.w2)

    def head(self, call: Tensor, gpu: Tensor, place_num: Tensor) -> Tensor:
        """[E, N, K] monotone log quantiles; ``call`` is [E, N, H] or [E, 1, H] (broadcast)."""
        e, n = self.members, place_num.shape[0]
        p = torch.cat([_by_member(F.embedding(gpu, self.gpu), n, e), place_num.expand(e, n, -1)], 2)
        z = torch.relu(call + torch.bmm(p, self.wp))
        z = torch.relu(torch.baddbmm(self.b3, z, self.w3))
        out = torch.baddbmm(self.b4, z, self.w4)
        return _monotone(out)


def _longs(xs: list[int]) -> Tensor:
    """torch.tensor(xs) in half the time."""
    return (
        torch.frombuffer(array.array("q", xs), dtype=torch.long)
        if xs
        else torch.zeros(0, dtype=torch.long)
    )


def _projected(table: Tensor, w: Tensor) -> Tensor:
    """[R, E*k] member-major embedding rows through per-member weights [E, k, H] -> [R, E*H]."""
    r, e = table.shape[0], w.shape[0]
    return torch.bmm(table.view(r, e, -1).transpose(0, 1), w).transpose(0, 1).reshape(r, -1)


class RoutingNet:
    """A `QuantileNet` folded for scoring one call on many placements, the routing hot path.

    Every embedding table is pushed through the linear layer it feeds and the per-member
    weights are laid out side by side, so the call's first layer is one bag sum plus two
    matrix products and a placement's contribution is one row lookup plus one product: a
    decision is a dozen small torch ops instead of forty. Same numbers as the net, in another
    order of summation."""

    def __init__(self, net: QuantileNet, cfg: FeatureConfig, norm: dict[str, Tensor]) -> None:
        d, s, e = cfg.embed_dim, cfg.small_dim, net.members
        self.call_mean: list[float] = norm["call_mean"].tolist()
        self.call_std: list[float] = norm["call_std"].tolist()
        self._start = torch.zeros(1, dtype=torch.long)  # one bag, starting at 0
        with torch.no_grad():
            w1 = net.w1.detach()
            n_models, n_kinds = net.model.shape[0], net.kind.shape[0]
            self.rows = torch.cat(
                [
                    net.b1.detach().reshape(1, -1),
                    _projected(net.model.detach(), w1[:, d : 2 * d]),
                    _projected(net.workflow.detach(), w1[:, 2 * d : 2 * d + s]),
                    net.kind.detach(),
                    net.inputs.detach(),
                ]
            )
            """[1 + models + workflow buckets + kinds + input kinds, E*H]: bias and lookups."""
            self.workflow_row = 1 + n_models
            self.kind_row = self.workflow_row + cfg.workflow_buckets
            self.input_row = self.kind_row + n_kinds
            self.text = net.text.weight.detach()
            self.text_w = w1[:, :d]  # [E, d, H]
            self.num_w = w1[:, 2 * d + s :].permute(1, 0, 2).reshape(_CALL_FEATURES + 1, -1)
            self.w2, self.b2 = net.w2.detach(), net.b2.detach()
            self.gpu = _projected(net.gpu.detach(), net.wp.detach()[:, :s])
            self.place_w = net.wp.detach()[:, s:].permute(1, 0, 2).reshape(_PLACE_FEATURES, -1)
            self.w3, self.b3 = net.w3.detach(), net.b3.detach()
            self.w4, self.b4 = net.w4.detach(), net.b4.detach()
        self.members = e

    def call(self, fields: tuple[list[int], list[float], list[int], list[int]]) -> Tensor:
        """[E, 1, H]: the trunk's output for one call's `QuantilePredictor._call_fields`."""
        grams, raw, inputs, (model, workflow, kind) = fields
        num = [
            0.0 if math.isnan(x) else (x - m) / sd  # missing at the mean
            for x, m, sd in zip(raw, self.call_mean, self.call_std, strict=False)
        ]
        num.append(raw[-1])  # the novelty, not standardised
        rows = [0, 1 + model, self.workflow_row + workflow, self.kind_row + kind]
        rows += [self.input_row + i for i in inputs]
        # sum-mode bags are 2-3x faster than mean-mode ones; the mean's 1/n goes in alpha below
        text = F.embedding_bag(_longs(grams), self.text, self._start, mode="sum")
        pre = F.embedding_bag(_longs(rows), self.rows, self._start, mode="sum")
        pre.addmm_(
            torch.frombuffer(array.array("f", num), dtype=torch.float32).view(1, -1), self.num_w
        )
        e = self.members
        pre.view(e, 1, -1).baddbmm_(text.view(e, 1, -1), self.text_w, alpha=1 / max(len(grams), 1))
        return torch.baddbmm(self.b2, pre.relu_().view(e, 1, -1), self.w2)

    def head(self, call: Tensor, gpu: Tensor, place_num: Tensor) -> Tensor:
        """[E, N, K] monotone log quantiles of the call on N placements."""
        n, e = place_num.shape[0], self.members
        base = F.embedding(gpu, self.gpu).add_(call.view(1, -1))
        z = torch.addmm(base, place_num, self.place_w).relu_().view(n, e, -1).transpose(0, 1)
        z = torch.bmm(z, self.w3).add_(self.b3).relu_()  # baddbmm's bias costs a third more
        out = torch.baddbmm(self.b4, z, self.w4)
        return _monotone(out)


# --- the predictor ---------------------------------------------------------------------------


class QuantilePredictor:
    """Batched quantile forecasts from a trained `QuantileNet`; see the module docstring."""

    kind = "trained"

    def __init__(
        self,
        cfg: FeatureConfig,
        vocab: Vocab,
        norm: dict[str, Tensor],
        seen: Tensor,
        net: QuantileNet,
        *,
        version: str = "untrained",
        metrics: dict[str, Any] | None = None,
        extras: dict[str, Any] | None = None,
        cal_shift: Tensor | None = None,
        online_shift: Tensor | None = None,
    ) -> None:
        k = len(cfg.levels)
        self.cfg = cfg
        self.vocab = vocab
        self.norm = norm
        self.seen = seen
        """[hash_buckets] bool: the n-gram buckets the embeddings were trained on."""
        self.net = net
        self.version = version
        self.metrics: dict[str, Any] = metrics if metrics is not None else {}
        self.extras: dict[str, Any] = extras if extras is not None else {}
        """Free-form plain data saved with the model (e.g. fitted baselines)."""
        self.cal_shift = (
            cal_shift if cal_shift is not None else torch.zeros(len(cfg.load_edges) + 1, k)
        )
        """[load buckets, K] conformal log-space shifts."""
        self.online_shift = online_shift if online_shift is not None else torch.zeros(k)
        self._widen = cfg.spread * torch.tensor([NormalDist().inv_cdf(p) for p in cfg.levels])
        self._edges = torch.tensor(cfg.load_edges, dtype=torch.float32)
        self._reindex()
        self._seen_bytes = bytes(self.seen.to(torch.uint8).tolist())  # fast lookups in encoding
        self._routing: tuple[tuple[int, ...], RoutingNet] | None = None

    @property
    def levels(self) -> tuple[float, ...]:
        return self.cfg.levels

    def _reindex(self) -> None:
        self._models = self.vocab.index("models")
        self._gpus = self.vocab.index("gpus")
        self._kinds = self.vocab.index("kinds")
        self._inputs = self.vocab.index("inputs")

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def fresh(
        cls, cfg: FeatureConfig, queries: Sequence[Query], log_latency: Tensor, seed: int
    ) -> QuantilePredictor:
        """An untrained predictor with vocabularies, normalisation and seen n-grams from
        ``queries``, its output biases at the marginal quantiles of ``log_latency``."""
        vocab = Vocab(
            models=sorted({q.model for q in queries}),
            gpus=sorted({q.gpu for q in queries}),
            kinds=sorted({q.kind for q in queries}),
            inputs=sorted({k for q in queries for k in q.input_kinds}),
        )
        net = QuantileNet(cfg, vocab, torch.Generator().manual_seed(seed))
        grams = [ngram_buckets(q.prompt, cfg.hash_buckets, cfg.max_words) for q in queries]
        call_mean, call_std = _moments(
            torch.tensor([_call_row(q, bool(g)) for q, g in zip(queries, grams, strict=True)])
        )
        place_mean, place_std = _moments(_place_raw([place_of(q) for q in queries])[0])
        norm = {"call_mean": call_mean, "call_std": call_std}
        norm |= {"place_mean": place_mean, "place_std": place_std}
        seen = torch.zeros(cfg.hash_buckets, dtype=torch.bool)
        seen[torch.tensor([i for g in grams for i in g], dtype=torch.long)] = True
        model = cls(cfg, vocab, norm, seen, net)
        model._init_output(log_latency)
        return model

    def _init_output(self, log_latency: Tensor) -> None:
        """Start every member at the marginal quantiles, so training refines, not discovers."""
        q = torch.quantile(log_latency.float(), torch.tensor(self.levels))
        gaps = (q[1:] - q[:-1]).clamp(min=1e-3)
        with torch.no_grad():
            self.net.b4.copy_(
                torch.cat([q[:1], gaps + torch.log(-torch.expm1(-gaps))]).view(1, 1, -1)
            )
            self.net.w4.mul_(0.1)

    def grow(self, queries: Sequence[Query]) -> None:
        """Add the models, GPUs, kinds and input kinds of ``queries`` not yet in the vocabularies
        (new rows start as the "unknown" row; new input kinds with no effect) and mark their
        n-grams seen: for fine-tuning on calls the model has not met."""
        net = self.net
        for table, names in (
            ("models", {q.model for q in queries}),
            ("gpus", {q.gpu for q in queries}),
            ("kinds", {q.kind for q in queries}),
            ("inputs", {k for q in queries for k in q.input_kinds}),
        ):
            new = sorted(names - set(getattr(self.vocab, table)))
            if not new:
                continue
            getattr(self.vocab, table).extend(new)
            param = {"models": "model", "gpus": "gpu", "kinds": "kind", "inputs": "inputs"}[table]
            old: Tensor = getattr(net, param).detach()
            rows = torch.zeros(len(new), old.shape[1]) if table == "inputs" else old[:1]
            setattr(net, param, nn.Parameter(torch.cat([old, rows.expand(len(new), -1)])))
        self._reindex()
        cfg = self.cfg
        grams = [
            i for q in queries for i in ngram_buckets(q.prompt, cfg.hash_buckets, cfg.max_words)
        ]
        self.seen[torch.tensor(grams, dtype=torch.long)] = True
        self._seen_bytes = bytes(self.seen.to(torch.uint8).tolist())

    def copy(self) -> QuantilePredictor:
        """An independent deep copy (for fine-tuning without touching the live model)."""
        return copy.deepcopy(self)

    # --- encoding ----------------------------------------------------------------------------

    def _call_fields(self, q: Query) -> tuple[list[int], list[float], list[int], list[int]]:
        """One query's encoder inputs: its familiar n-gram buckets; its raw numeric row with
        the novelty (share of its n-grams never seen in training, whose embeddings are
        untrained noise) last; its input-kind columns; its model, workflow and kind ids."""
        cfg, seen = self.cfg, self._seen_bytes
        grams = ngram_buckets(q.prompt, cfg.hash_buckets, cfg.max_words)
        kept = list(itertools.compress(grams, map(seen.__getitem__, grams)))
        row = [*_call_row(q, bool(grams)), (len(grams) - len(kept)) / max(len(grams), 1)]
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
        longs: list[list[int]] = []
        for q in queries:
            kept, row, inputs, idx = self._call_fields(q)
            ids.extend(kept)
            hot = [0.0] * n_inputs
            for i in inputs:
                hot[i] = 1.0
            rows.append(row + hot)
            longs.append([len(kept), *idx])
        n = len(queries)
        floats = torch.tensor(rows, dtype=torch.float32).view(n, _CALL_FEATURES + 1 + n_inputs)
        ints = torch.tensor(longs, dtype=torch.long).view(n, 4)
        return Calls(
            ids=torch.tensor(ids, dtype=torch.long),
            counts=ints[:, 0],
            model=ints[:, 1],
            workflow=ints[:, 2],
            kind=ints[:, 3],
            inputs=floats[:, _CALL_FEATURES + 1 :],
            num=_standardise(
                floats[:, :_CALL_FEATURES], self.norm["call_mean"], self.norm["call_std"]
            ),
            novelty=floats[:, _CALL_FEATURES],
        )

    def encode_places(self, places: Sequence[Candidate]) -> Places:
        raw, load = _place_raw(places)
        return Places(
            gpu=_longs([self._gpus.get(c[0], 0) for c in places]),
            num=_standardise(raw, self.norm["place_mean"], self.norm["place_std"]),
            bucket=torch.bucketize(load, self._edges, right=True),
        )

    def encode(self, queries: Sequence[Query]) -> tuple[Calls, Places]:
        return self.encode_calls(queries), self.encode_places([place_of(q) for q in queries])

    # --- forward -----------------------------------------------------------------------------

    def _call_part(self, calls: Calls, gen: torch.Generator | None) -> Tensor:
        """With ``gen`` (training), drops a random share of some calls' n-grams and feeds it as
        novelty, so the network learns what unfamiliar wording costs; and hides model ids."""
        ids, counts, novelty, model = calls.ids, calls.counts, calls.novelty, calls.model
        if gen is not None:
            n = counts.shape[0]
            row = torch.repeat_interleave(torch.arange(n), counts)
            draw = torch.rand(n, generator=gen) / self.cfg.novelty_p  # < 1: loses n-grams
            rate = torch.where(draw < 0.5, 1.0, torch.rand(n, generator=gen)) * (draw < 1)
            keep = torch.rand(ids.shape[0], generator=gen) >= rate[row]
            ids = ids[keep]
            kept = torch.bincount(row[keep], minlength=n)
            novelty = (counts - kept) / counts.clamp(min=1)
            counts = kept
            hide = torch.rand(n, generator=gen) < self.cfg.unknown_p
            model = torch.where(hide, torch.zeros_like(model), model)
        offsets = torch.cumsum(counts, 0) - counts
        return self.net.call_part(calls, ids, offsets, novelty, model)

    def members(self, calls: Calls, places: Places, gen: torch.Generator | None = None) -> Tensor:
        """[E, N, K] each member's log quantiles; ``gen`` turns on the training noise."""
        gpu = places.gpu
        if gen is not None:
            hide = torch.rand(gpu.shape[0], generator=gen) < self.cfg.unknown_p
            gpu = torch.where(hide, torch.zeros_like(gpu), gpu)
        return self.net.head(self._call_part(calls, gen), gpu, places.num)

    def combine(self, members: Tensor) -> Tensor:
        """[N, K] uncalibrated log quantiles: members' mean, widened by their disagreement."""
        mean = members.mean(0)
        if members.shape[0] == 1:
            return mean
        std = (members - mean).square().mean(0).sqrt()  # Tensor.std is slow on small inputs
        return std.mul_(self._widen).add_(mean)

    def _shifted(self, raw: Tensor, bucket: Tensor) -> Tensor:
        return raw + self.cal_shift[bucket] + self.online_shift

    def _calibrated(self, raw: Tensor, bucket: Tensor) -> Tensor:
        # shifts differ per level; keep quantiles monotone
        return torch.cummax(self._shifted(raw, bucket), 1).values

    def raw_log(self, calls: Calls, places: Places) -> Tensor:
        """[N, K] uncalibrated log quantiles of encoded calls."""
        with torch.inference_mode():
            return self.combine(self.members(calls, places))

    def predict_encoded(self, calls: Calls, places: Places) -> Tensor:
        """[N, K] calibrated log quantiles of encoded calls."""
        return self._calibrated(self.raw_log(calls, places), places.bucket)

    def predict_log(self, queries: Sequence[Query]) -> Tensor:
        """[N, K] calibrated log-latency quantiles (log seconds)."""
        return self.predict_encoded(*self.encode(queries))

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]:
        if not queries:
            return []
        return self._dists(self.predict_log(queries))

    def predict_candidates(
        self, query: Query, candidates: Sequence[Candidate]
    ) -> list[LatencyDist]:
        """``query`` placed on each candidate (gpu, gpu_util, gpu_mem_frac, cpu_util, inflight,
        queue_depth): the call is encoded and run through the trunk once."""
        if not candidates:
            return []
        net = self._routing_net()
        places = self.encode_places(candidates)
        with torch.inference_mode():
            call = net.call(self._call_fields(query))
            raw = self.combine(net.head(call, places.gpu, places.num))
            return self._dists(self._shifted(raw, places.bucket))  # _dists keeps them in order

    def _routing_net(self) -> RoutingNet:
        """The folded net, rebuilt whenever a weight or the normalisation changed (training
        steps bump a tensor's version; `grow` replaces tables)."""
        net = self.net
        tensors = (*net._parameters.values(), net.text.weight, *self.norm.values())
        key = (*map(id, tensors), *(t._version for t in tensors))  # type: ignore[union-attr]
        if self._routing is None or self._routing[0] != key:
            self._routing = (key, RoutingNet(self.net, self.cfg, self.norm))
        return self._routing[1]

    def _dists(self, log_q: Tensor) -> list[LatencyDist]:
        """LatencyDists built without re-checking their order, which costs more than the whole
        network on the routing path: levels are sorted by `FeatureConfig` and values by the
        running max taken here, after exp, so rounding cannot unsort them."""
        return trusted_dists(self.levels, torch.cummax(torch.exp(log_q), 1).values.tolist())

    # --- calibration -------------------------------------------------------------------------

    def calibrate(self, queries: Sequence[Query], latency_s: Sequence[float]) -> None:
        """Split-conformal shifts from held-out calls (see `calibrate_encoded`)."""
        log_latency = torch.log(torch.tensor(latency_s, dtype=torch.float32).clamp(min=1e-6))
        self.calibrate_encoded(*self.encode(queries), log_latency)

    def calibrate_encoded(self, calls: Calls, places: Places, log_latency: Tensor) -> None:
        """Per level, the finite-sample corrected quantile of log(actual) - forecast over
        held-out calls, per load bucket; buckets with too few calls get the global one."""
        if log_latency.shape[0] == 0:
            raise ValueError("no calibration calls")
        scores = log_latency.view(-1, 1) - self.raw_log(calls, places)
        shift = self._conformal(scores).expand(len(self.cfg.load_edges) + 1, -1).clone()
        for b in range(shift.shape[0]):
            mask = places.bucket == b
            if int(mask.sum()) >= self.cfg.min_bucket_calls:
                shift[b] = self._conformal(scores[mask])
        self.cal_shift = shift

    def _conformal(self, scores: Tensor) -> Tensor:
        n = scores.shape[0]
        ordered = torch.sort(scores, 0).values
        ranks = [min(n, math.ceil((n + 1) * p)) - 1 for p in self.levels]
        return ordered[ranks, torch.arange(len(ranks))]

    def set_online_shift(self, shifts: dict[float, float]) -> None:
        """Extra per-level log-space shifts (the runtime calibration monitor's); levels not
        named get 0."""
        unknown = [p for p in shifts if not any(abs(p - q) < 1e-9 for q in self.levels)]
        if unknown:
            raise ValueError(f"no such levels {unknown}; the model has {self.levels}")
        self.online_shift = torch.tensor(
            [next((v for p, v in shifts.items() if abs(p - q) < 1e-9), 0.0) for q in self.levels]
        )

    # --- persistence -------------------------------------------------------------------------

    def digest(self) -> str:
        """A short hash of the weights and vocabularies, for version names."""
        buf = io.BytesIO()
        torch.save((self.net.state_dict(), dataclasses.asdict(self.vocab)), buf)
        return hashlib.blake2b(buf.getvalue(), digest_size=6).hexdigest()

    def save(self, path: str | Path) -> None:
        """One file, tensors and plain data only (loads with ``weights_only=True``)."""
        torch.save(
            {
                "format": FORMAT,
                "version": self.version,
                "config": dataclasses.asdict(self.cfg),
                "vocab": dataclasses.asdict(self.vocab),
                "norm": self.norm,
                "seen": self.seen,
                "state": self.net.state_dict(),
                "cal_shift": self.cal_shift,
                "online_shift": self.online_shift,
                "metrics": self.metrics,
                "extras": self.extras,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> QuantilePredictor:
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a swarmx quantile predictor (format {FORMAT})")
        cfg = FeatureConfig(**d["config"])
        vocab = Vocab(**{k: list(v) for k, v in d["vocab"].items()})
        net = QuantileNet(cfg, vocab)
        net.load_state_dict(d["state"])
        return cls(
            cfg,
            vocab,
            dict(d["norm"]),
            d["seen"],
            net,
            version=d["version"],
            metrics=d["metrics"],
            extras=d["extras"],
            cal_shift=d["cal_shift"],
            online_shift=d["online_shift"],
        )
