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
- A floor under the upper quantiles of unfamiliar wording (`novelty_floor`): the share of a
  prompt the model cannot read is the weight it gives the model's marginal latency, which knows
  nothing of the prompt. The ensemble does not disagree more on wording it never saw (its
  unseen n-grams are simply absent), so only a rule that reads the novelty itself widens there;
  conformal shifts per novelty bucket correct it wherever held-out calls show how it fares.
- Device and runtime inputs join late in the network: scoring one call on many candidate
  placements encodes the call once (`QuantilePredictor.predict_candidates`).

`QuantilePredictor` ties the parts together: `features` (what is read off a call),
`net` (the ensemble), `routing` (the net folded for the routing hot path) and `modelfile` (the
saved file). `swarmx.models.train` fits it. Like them, this module imports torch: nothing that
runs without a trained model (the node agent, the CLI at start-up) imports it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from swarmx.models import modelfile
from swarmx.models.dist import LOG_MIN_S, LatencyDist, trusted_dists
from swarmx.models.features import Calls, Encoder, FeatureConfig, Places, longs
from swarmx.models.modelfile import ModelFile
from swarmx.models.net import QuantileNet
from swarmx.models.query import Candidate, Query
from swarmx.models.routing import RoutingNet
from swarmx.stats import conformal_quantile

MARGINAL_POINTS = 128
"""Points of each model's latency marginal (`QuantilePredictor.marginal`)."""
MARGINAL_MIN_CALLS = 30
"""Training calls a model needs for a marginal of its own."""


Stamp = tuple[RoutingNet, Tensor | None, Tensor, int]
"""The folded net, the novelty floor's tensors and the shifts' version (held, so that no other
tensor can take their place unseen)."""


@dataclass(frozen=True)
class Prepared:
    """One call's part of its forecasts (`QuantilePredictor.prepare`): what every candidate
    replica, and every retry on the same weights, shares."""

    query: Query
    stamp: Stamp
    """`QuantilePredictor._stamp` when it was worked out: another one means other weights or
    another novelty floor."""
    trunk: Tensor
    """[E*H] the trunk's output, members side by side."""
    novel: tuple[Tensor, Tensor] | None
    """Its novelty floor and shift ([1, K] each), for unfamiliar wording."""


class QuantilePredictor:
    """Batched quantile forecasts from a trained `QuantileNet`; see the module docstring."""

    kind = "trained"

    def __init__(
        self,
        encoder: Encoder,
        net: QuantileNet,
        *,
        version: str = "untrained",
        metrics: dict[str, Any] | None = None,
        extras: dict[str, Any] | None = None,
        cal_shift: Tensor | None = None,
        online_shift: Tensor | None = None,
        output_shift: Tensor | None = None,
        marginal: Tensor | None = None,
        novelty_shift: Tensor | None = None,
    ) -> None:
        cfg = encoder.cfg
        k = len(cfg.levels)
        self.encoder = encoder
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
        self.output_shift = output_shift
        """[K] conformal shifts of the output-length head (log1p tokens); None where the model
        has no trained output head (files from before it)."""
        self.marginal = marginal
        """[models + 1, `MARGINAL_POINTS`] each model's training log latencies at levels
        (i + 1) / points (row 0: every model's, for models without enough calls or unknown);
        None in files from before it (no novelty floor)."""
        self.novelty_shift = (
            novelty_shift
            if novelty_shift is not None
            else torch.zeros(len(cfg.novelty_edges) + 1, k)
        )
        """[novelty buckets, K] conformal log-space shifts after the novelty floor (bucket 0,
        familiar wording, none: the load buckets' shifts are its calibration)."""
        self._novelty_edges = torch.tensor(cfg.novelty_edges, dtype=torch.float32)
        self._levels_t = torch.tensor(cfg.levels, dtype=torch.float32)
        self._widen = cfg.spread * torch.tensor([NormalDist().inv_cdf(p) for p in cfg.levels])
        self._routing: tuple[tuple[int, ...], RoutingNet] | None = None

    @property
    def cfg(self) -> FeatureConfig:
        return self.encoder.cfg

    @property
    def levels(self) -> tuple[float, ...]:
        return self.encoder.cfg.levels

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def fresh(
        cls,
        cfg: FeatureConfig,
        queries: Sequence[Query],
        log_latency: Tensor,
        seed: int,
        log_output: Tensor | None = None,
    ) -> QuantilePredictor:
        """An untrained predictor with vocabularies, normalisation and seen n-grams from
        ``queries``, its output biases at the marginal quantiles of ``log_latency`` (and of
        ``log_output``, log1p output tokens, for the output-length head)."""
        encoder = Encoder.fit(cfg, queries)
        net = QuantileNet(cfg, encoder.vocab, torch.Generator().manual_seed(seed))
        model = cls(encoder, net)
        model._init_output(net.b4, net.w4, log_latency)
        if log_output is not None:
            model._init_output(net.bo, net.wo, log_output)
        return model

    def _init_output(self, bias: Tensor, weight: Tensor, target: Tensor) -> None:
        """Start every member at the marginal quantiles, so training refines, not discovers."""
        q = torch.quantile(target.float(), torch.tensor(self.levels))
        gaps = (q[1:] - q[:-1]).clamp(min=1e-3)
        with torch.no_grad():
            bias.copy_(torch.cat([q[:1], gaps + torch.log(-torch.expm1(-gaps))]).view(1, 1, -1))
            weight.mul_(0.1)

    def grow(self, queries: Sequence[Query]) -> None:
        """Add the models, GPUs, kinds and input kinds of ``queries`` not yet in the vocabularies
        (new rows start as the "unknown" row; new input kinds with no effect) and mark their
        n-grams seen: for fine-tuning on calls the model has not met."""
        added = self.encoder.grow(queries)
        self.net.grow(added)
        if self.marginal is not None and added.get("models"):
            row = self.marginal[:1].expand(added["models"], -1)
            self.marginal = torch.cat([self.marginal, row])

    def fit_marginal(self, model: Tensor, log_latency: Tensor) -> None:
        """Each model's latency marginal (`marginal`) from calls' model ids and log latencies:
        rows of models with at least `MARGINAL_MIN_CALLS` calls are (re)fitted, the others
        keep theirs, and a model without one yet starts from every call's."""
        levels = torch.arange(1, MARGINAL_POINTS + 1, dtype=torch.float32) / MARGINAL_POINTS
        if self.marginal is None:
            everyone = torch.quantile(log_latency.float(), levels)
            self.marginal = everyone.expand(len(self.encoder.vocab.models) + 1, -1).clone()
        for m in torch.unique(model).tolist():
            mask = model == m
            if m > 0 and int(mask.sum()) >= MARGINAL_MIN_CALLS:
                self.marginal[m] = torch.quantile(log_latency[mask].float(), levels)

    def copy(self) -> QuantilePredictor:
        """An independent deep copy (for fine-tuning without touching the live model)."""
        return copy.deepcopy(self)

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
        return self.net.head(self._call_part(calls, gen), self._gpus(places, gen), places.num)

    def members_both(
        self, calls: Calls, places: Places, gen: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """([E, N, K] log latency, [E, N, K] log1p output tokens) of each member, one trunk
        pass for both heads (training)."""
        call = self._call_part(calls, gen)
        return self.net.head(call, self._gpus(places, gen), places.num), self.net.output_head(call)

    def _gpus(self, places: Places, gen: torch.Generator | None) -> Tensor:
        """The placements' GPU ids; with ``gen`` (training) some hidden, so the unknown-GPU
        row learns an average device."""
        gpu = places.gpu
        if gen is not None:
            hide = torch.rand(gpu.shape[0], generator=gen) < self.cfg.unknown_p
            gpu = torch.where(hide, torch.zeros_like(gpu), gpu)
        return gpu

    def knows_gpu(self, gpu: str) -> bool:
        """Calls on this GPU were in training: the latency head knows its speed."""
        return self.encoder.knows_gpu(gpu)

    def predict_output_tokens(self, queries: Sequence[Query]) -> list[LatencyDist]:
        """Quantiles of each call's output tokens (the values are tokens, not seconds): what
        a service time is made of besides the replica's speed. Raises for a model without a
        trained output head."""
        shift = self._output_shift()
        if not queries:
            return []
        calls, _ = self.encoder.encode(queries)
        with torch.inference_mode():
            return self._tokens(self.net.output_head(self._call_part(calls, None)), shift)

    def output_tokens(self, query: Query) -> LatencyDist:
        """`predict_output_tokens` of one call on the routing path: its encoding cached, the
        folded trunk (`predict_candidates` has usually just run both for the same call)."""
        shift = self._output_shift()
        net = self._routing_net()
        with torch.inference_mode():
            call = net.call(self.encoder.call_fields(query))
            return self._tokens(self.net.output_head(call), shift)[0]

    def _output_shift(self) -> Tensor:
        if self.output_shift is None:
            raise ValueError(f"{self.version} has no output-length head (trained before it)")
        return self.output_shift

    def _tokens(self, members: Tensor, shift: Tensor) -> list[LatencyDist]:
        """Whole-token quantiles from the members' log1p outputs: a quantile at 63.99 of a call
        capped at 64 tokens is 64."""
        log_q = self.combine(members) + shift
        tokens = torch.ceil(torch.expm1(torch.cummax(log_q, 1).values) - 1e-3).clamp(min=0.0)
        return trusted_dists(self.levels, tokens.tolist())

    def combine(self, members: Tensor) -> Tensor:
        """[N, K] uncalibrated log quantiles: members' mean, widened by their disagreement."""
        mean = members.mean(0)
        if members.shape[0] == 1:
            return mean
        std = (members - mean).square().mean(0).sqrt()  # Tensor.std is slow on small inputs
        return std.mul_(self._widen).add_(mean)

    def novelty_floor(self, novelty: Tensor, model: Tensor) -> Tensor:
        """[N, K] the least each level may be for calls whose prompts are a share ``novelty``
        unread (their unseen n-grams), of model ids ``model``: -inf where there is no floor.

        Read the forecast as a mixture: with weight ``novelty`` the call is any call of its
        model (the marginal), else what the model forecasts. The mixture's p-quantile is at
        least the marginal's at (p - 1 + novelty) / novelty, whatever the model says; that
        level is positive only for upper quantiles of unfamiliar prompts, so familiar wording
        (novelty 0) and the median of most calls are left alone."""
        if self.marginal is None:
            return torch.full((novelty.shape[0], len(self.levels)), -torch.inf)
        nu = novelty.clamp(0.0, 1.0).unsqueeze(1)
        at = (self._levels_t + nu - 1) / nu.clamp(min=1e-9)  # [N, K] levels in the marginal
        points = self.marginal.shape[1]
        index = torch.ceil(at * points).long().sub_(1).clamp_(0, points - 1)
        floor = self.marginal[model.clamp(0, self.marginal.shape[0] - 1)].gather(1, index)
        return floor.masked_fill_(at <= 0, -torch.inf)

    def _novelty_bucket(self, novelty: Tensor) -> Tensor:
        return torch.bucketize(novelty.contiguous(), self._novelty_edges, right=True)

    def _novel(self, novelty: Tensor, model: Tensor) -> tuple[Tensor, Tensor]:
        """([N, K] novelty floor, [N, K] novelty-bucket shift) of calls: what `_shifted`
        applies to unfamiliar wording."""
        return self.novelty_floor(novelty, model), self.novelty_shift[self._novelty_bucket(novelty)]

    def _shifted(self, raw: Tensor, bucket: Tensor, novel: tuple[Tensor, Tensor] | None) -> Tensor:
        """Load-bucket shifts; for ``novel`` calls (`_novel`; None: all familiar) the novelty
        floor and novelty-bucket shifts; the online shift."""
        out = raw + self.cal_shift[bucket]
        if novel is not None:
            floor, shift = novel
            out = torch.maximum(out, floor).add_(shift)
        return out.add_(self.online_shift)

    def _calibrated(self, raw: Tensor, calls: Calls, places: Places) -> Tensor:
        # shifts differ per level; keep quantiles monotone
        novel = None
        if bool((calls.novelty > 0).any()):
            novel = self._novel(calls.novelty, calls.model)
        return torch.cummax(self._shifted(raw, places.bucket, novel), 1).values

    def _stamp(self) -> Stamp:
        """What a `Prepared` call's parts were worked out from: the folded net (the weights)
        and the novelty floor's marginal and shifts."""
        shift = self.novelty_shift
        return self._routing_net(), self.marginal, shift, shift._version

    def raw_log(self, calls: Calls, places: Places) -> Tensor:
        """[N, K] uncalibrated log quantiles of encoded calls."""
        with torch.inference_mode():
            return self.combine(self.members(calls, places))

    def predict_encoded(self, calls: Calls, places: Places) -> Tensor:
        """[N, K] calibrated log quantiles of encoded calls."""
        return self._calibrated(self.raw_log(calls, places), calls, places)

    def predict_log(self, queries: Sequence[Query]) -> Tensor:
        """[N, K] calibrated log-latency quantiles (log seconds)."""
        return self.predict_encoded(*self.encoder.encode(queries))

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]:
        if not queries:
            return []
        return self._dists(self.predict_log(queries))

    def predict_candidates(
        self,
        query: Query,
        candidates: Sequence[Candidate],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        """``query`` placed on each candidate (gpu, gpu_util, gpu_mem_frac, cpu_util, inflight,
        queue_depth), each holding ``cached_tokens`` of its prompt (none: 0): the call is
        encoded and run through the trunk once."""
        if not candidates:
            return []
        return self.predict_prepared(self.prepare([query])[0], candidates, cached_tokens)

    def prepare(self, queries: Sequence[Query]) -> list[Prepared]:
        """The calls' part of their forecasts, worked out together: their n-grams (cached per
        prompt) and the trunk, in one batch for all of them. What is left for a routing
        decision is the placements' part (`predict_prepared`)."""
        if not queries:
            return []
        stamp = self._stamp()
        fields = [self.encoder.call_fields(q) for q in queries]
        novelty = [row[-1] for _, row, _, _ in fields]
        novel: list[tuple[Tensor, Tensor] | None] = [None] * len(queries)
        with torch.inference_mode():
            trunks = stamp[0].calls(fields).unbind(0)
            if any(nu > 0 for nu in novelty):
                model = longs([ids[0] for _, _, _, ids in fields])
                floors, shifts = self._novel(torch.tensor(novelty), model)
                for j, nu in enumerate(novelty):
                    if nu > 0:
                        novel[j] = (floors[j : j + 1], shifts[j : j + 1])
        return [
            Prepared(q, stamp, trunk, parts)
            for q, trunk, parts in zip(queries, trunks, novel, strict=True)
        ]

    def predict_prepared(
        self,
        prepared: Prepared,
        candidates: Sequence[Candidate],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        """`predict_candidates` of a call `prepare` encoded: if the weights changed since (a
        training step, a grown vocabulary), it is encoded again."""
        if not candidates:
            return []
        net, (was_net, marginal, shift, version) = self._routing_net(), prepared.stamp
        now = self.novelty_shift
        if not (
            was_net is net
            and marginal is self.marginal
            and shift is now
            and version == now._version
        ):
            prepared = self.prepare([prepared.query])[0]
        cached = cached_tokens if cached_tokens is not None else [0] * len(candidates)
        keys = list(zip(candidates, cached, strict=True))
        with torch.inference_mode():
            placed, bucket = net.placed(
                keys,
                lambda at: self.encoder.encode_places(
                    [candidates[j] for j in at], [cached[j] for j in at]
                ),
            )
            raw = self.combine(net.head(prepared.trunk, placed))
            return self._dists(self._shifted(raw, bucket, prepared.novel))  # kept in order

    def _routing_net(self) -> RoutingNet:
        """The folded net, rebuilt whenever a weight or the normalisation changed (training
        steps bump a tensor's version; `grow` replaces tables)."""
        net, norm = self.net, self.encoder.norm
        tensors = (*net._parameters.values(), net.text.weight, *norm.values())
        key = (*map(id, tensors), *(t._version for t in tensors))  # type: ignore[union-attr]
        if self._routing is None or self._routing[0] != key:
            self._routing = (key, RoutingNet(net, self.cfg, norm))
        return self._routing[1]

    def _dists(self, log_q: Tensor) -> list[LatencyDist]:
        """LatencyDists built without re-checking their order, which costs more than the whole
        network on the routing path: levels are sorted by `FeatureConfig` and values by the
        running max taken here, after exp, so rounding cannot unsort them."""
        ordered = torch.cummax(log_q, 1).values.clamp_(min=LOG_MIN_S)
        return trusted_dists(self.levels, torch.exp(ordered).tolist(), ordered.tolist())

    # --- calibration -------------------------------------------------------------------------

    def calibrate(self, queries: Sequence[Query], latency_s: Sequence[float]) -> None:
        """Split-conformal shifts from held-out calls (see `calibrate_encoded`)."""
        log_latency = torch.log(torch.tensor(latency_s, dtype=torch.float32).clamp(min=1e-6))
        self.calibrate_encoded(*self.encoder.encode(queries), log_latency)

    def calibrate_encoded(
        self,
        calls: Calls,
        places: Places,
        log_latency: Tensor,
        log_output: Tensor | None = None,
    ) -> None:
        """Per level, the finite-sample corrected quantile of log(actual) - forecast over
        held-out calls, per load bucket; buckets with too few calls get the global one. The
        load buckets are fitted on the calls of familiar wording (novelty bucket 0) where there
        are enough of them, and each novelty bucket with enough calls gets its own shift, after
        the novelty floor, from its calls: unfamiliar wording is not evidence of how familiar
        wording fares, nor the other way round. With
        ``log_output`` (log1p output tokens), the output-length head's shifts likewise, from the
        calls that generated tokens: a tool or vision call's zero is no evidence of how long an
        answer runs, and among many it would pull every level down."""
        if log_latency.shape[0] == 0:
            raise ValueError("no calibration calls")
        if log_output is not None:
            with torch.inference_mode():
                raw = self.combine(self.net.output_head(self._call_part(calls, None)))
            scores = log_output.view(-1, 1) - raw
            spoke = log_output > 0
            self.output_shift = self._conformal(scores[spoke] if bool(spoke.any()) else scores)
        least = self.cfg.min_bucket_calls
        raw = self.raw_log(calls, places)
        scores = log_latency.view(-1, 1) - raw
        novelty = self._novelty_bucket(calls.novelty)
        familiar = novelty == 0
        if int(familiar.sum()) >= least:
            scores_f, load = scores[familiar], places.bucket[familiar]
        else:
            scores_f, load = scores, places.bucket
        shift = self._conformal(scores_f).expand(len(self.cfg.load_edges) + 1, -1).clone()
        for b in range(shift.shape[0]):
            mask = load == b
            if int(mask.sum()) >= least:
                shift[b] = self._conformal(scores_f[mask])
        self.cal_shift = shift
        floored = torch.maximum(
            raw + shift[places.bucket], self.novelty_floor(calls.novelty, calls.model)
        )
        scores = log_latency.view(-1, 1) - floored
        novel = torch.zeros_like(self.novelty_shift)
        for b in range(1, novel.shape[0]):
            mask = novelty == b
            if int(mask.sum()) >= least:
                novel[b] = self._conformal(scores[mask])
        self.novelty_shift = novel

    def _conformal(self, scores: Tensor) -> Tensor:
        """[K]: each level's `conformal_quantile` of its column of ``scores`` [N, K]."""
        columns: list[list[float]] = torch.sort(scores, 0).values.T.tolist()
        return torch.tensor(
            [conformal_quantile(c, p) for c, p in zip(columns, self.levels, strict=True)],
            dtype=scores.dtype,
        )

    def set_online_shift(self, shifts: dict[float, float]) -> None:
        """Extra per-level log-space shifts (the runtime calibration monitor's); levels not
        named get 0."""
        unknown = [p for p in shifts if not any(abs(p - q) < 1e-9 for q in self.levels)]
        if unknown:
            raise ValueError(f"no such levels {unknown}; the model has {self.levels}")
        self.online_shift = torch.tensor(
            [next((v for p, v in shifts.items() if abs(p - q) < 1e-9), 0.0) for q in self.levels]
        )

    # --- persistence (`swarmx.models.modelfile`) -----------------------------------------------

    def digest(self) -> str:
        """A short hash of the weights and vocabularies, for version names."""
        return modelfile.digest(self.net, self.encoder.vocab)

    def save(self, path: str | Path) -> None:
        """One file, tensors and plain data only (loads with ``weights_only=True``)."""
        modelfile.save(
            ModelFile(
                self.encoder,
                self.net,
                self.version,
                self.metrics,
                self.extras,
                self.cal_shift,
                self.online_shift,
                self.output_shift,
                self.marginal,
                self.novelty_shift,
            ),
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> QuantilePredictor:
        f = modelfile.load(path)
        return cls(
            f.encoder,
            f.net,
            version=f.version,
            metrics=f.metrics,
            extras=f.extras,
            cal_shift=f.cal_shift,
            online_shift=f.online_shift,
            output_shift=f.output_shift,
            marginal=f.marginal,
            novelty_shift=f.novelty_shift,
        )
