"""The simple predictors a learned one must beat, and the cold-start predictor.

Each baseline is fitted from trace records (``fit``), forecasts `LatencyDist`s (``predict``) and
round-trips through plain JSON-able dicts (``to_dict``/``from_dict``) so it can be stored inside a
trained model file. Prediction is pure Python; torch is imported only while fitting, so the
scheduler can load a baseline, and run `FallbackPredictor`, without paying for torch.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from swarmx.models.dist import LatencyDist
from swarmx.models.query import Candidate, Query, place
from swarmx.stats import conformal_quantile, quantile
from swarmx.traces import TraceRecord

if TYPE_CHECKING:
    import torch

_FLOOR_S = 1e-6
"""Latencies are clamped to at least this: a linear model in seconds can go negative."""


def _check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(p) for p in levels)
    if not out or any(not 0 < p < 1 for p in out) or list(out) != sorted(set(out)):
        raise ValueError(f"levels must be increasing, in (0, 1): {levels}")
    return out


def _usable(records: Sequence[TraceRecord]) -> list[TraceRecord]:
    """Successful calls with a latency: a failure's time says little about a success's."""
    out = [r for r in records if r.ok and r.latency_s > 0]
    if not out:
        raise ValueError("no successful records with a positive latency to fit on")
    return out


def _check_name(name: str, d: dict[str, Any]) -> tuple[float, ...]:
    if d.get("name") != name:
        raise ValueError(f"not a {name} baseline: name {d.get('name')!r}")
    return _check_levels(d["levels"])


def _lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares, so constant-zero features (no load data) just get weight 0."""
    import torch

    solution: torch.Tensor = torch.linalg.lstsq(x, y.unsqueeze(1), driver="gelsd").solution
    return solution.squeeze(1)


class Baseline(Protocol):
    """A fitted baseline."""

    name: ClassVar[str]
    levels: tuple[float, ...]

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]: ...

    def to_dict(self) -> dict[str, Any]: ...


class PerPlacement:
    """`predict_candidates` for predictors that see each placed query on its own (the learned
    predictor instead encodes the call once for all placements)."""

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]:
        raise NotImplementedError

    def predict_candidates(
        self,
        query: Query,
        candidates: Sequence[Candidate],
        cached_tokens: Sequence[int] | None = None,
    ) -> list[LatencyDist]:
        cached = cached_tokens if cached_tokens is not None else [0] * len(candidates)
        return self.predict([place(query, c, n) for c, n in zip(candidates, cached, strict=True)])


class BaselineType(Protocol):
    """A baseline class: how to fit one, or load one from ``to_dict``."""

    name: str

    def fit(self, records: Sequence[TraceRecord], levels: Sequence[float]) -> Baseline: ...

    def from_dict(self, d: dict[str, Any]) -> Baseline: ...


class EmpiricalPerModel(PerPlacement):
    """Per-model empirical quantiles from the training data; the global ones for unknown models.
    Ignores everything about the call but its model: the floor any predictor must clear."""

    name: ClassVar[str] = "empirical-per-model"

    def __init__(
        self, levels: Sequence[float], per_model: dict[str, list[float]], overall: list[float]
    ) -> None:
        self.levels = _check_levels(levels)
        self.per_model = per_model
        self.overall = overall

    @classmethod
    def fit(cls, records: Sequence[TraceRecord], levels: Sequence[float]) -> EmpiricalPerModel:
        levels = _check_levels(levels)
        by_model: dict[str, list[float]] = defaultdict(list)
        recs = _usable(records)
        for r in recs:
            by_model[r.model].append(r.latency_s)
        overall = sorted(r.latency_s for r in recs)
        return cls(
            levels,
            {m: [quantile(sorted(xs), p) for p in levels] for m, xs in by_model.items()},
            [quantile(overall, p) for p in levels],
        )

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]:
        return [
            LatencyDist(self.levels, tuple(self.per_model.get(q.model, self.overall)))
            for q in queries
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "levels": list(self.levels),
            "per_model": self.per_model,
            "overall": self.overall,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmpiricalPerModel:
        return cls(_check_name(cls.name, d), d["per_model"], d["overall"])


def _token_features(prompt_tokens: int, max_tokens: int) -> tuple[float, float, float]:
    return (1.0, math.log1p(prompt_tokens), math.log1p(max_tokens))


def _smooth_pinball(r: torch.Tensor, tau: torch.Tensor, width: float) -> torch.Tensor:
    """tau*r + width*softplus(-r/width): the pinball loss with its kink rounded off over
    ``width``, so LBFGS converges; it is off by at most width*log(2)."""
    import torch

    return tau * r + width * torch.nn.functional.softplus(-r / width)


class LinearQuantile(PerPlacement):
    """Linear quantile regression on token counts: per level, log latency ~ a + b*log1p(prompt)
    + c*log1p(max_tokens), fitted by the pinball loss. Latency grows with prompt and output
    length roughly as a power law, which is linear in logs."""

    name: ClassVar[str] = "linear-quantile"

    def __init__(self, levels: Sequence[float], coef: list[list[float]]) -> None:
        self.levels = _check_levels(levels)
        if len(coef) != len(self.levels) or any(len(c) != 3 for c in coef):
            raise ValueError("coef must hold [a, b, c] for each level")
        self.coef = coef

    @classmethod
    def fit(cls, records: Sequence[TraceRecord], levels: Sequence[float]) -> LinearQuantile:
        import torch

        levels = _check_levels(levels)
        recs = _usable(records)
        x = torch.tensor(
            [_token_features(r.prompt_tokens, r.max_tokens) for r in recs], dtype=torch.float64
        )
        y = torch.tensor([math.log(r.latency_s) for r in recs], dtype=torch.float64)
        # Standardised features condition the optimisation; a zero spread (max_tokens unknown,
        # all 0) leaves the column at 0 and its weight at 0.
        mean, std = x.mean(0), x.std(0, correction=0)
        mean[0], std[0] = 0.0, 1.0
        std = torch.where(std > 0, std, torch.ones_like(std))
        xs = (x - mean) / std
        beta = _lstsq(xs, y)
        resid = sorted((y - xs @ beta).tolist())
        init = beta.unsqueeze(1).repeat(1, len(levels))
        init[0] += torch.tensor([quantile(resid, p) for p in levels], dtype=x.dtype)
        w = init.clone().requires_grad_(True)
        tau = torch.tensor(levels, dtype=x.dtype)
        # Tiny tensors: a thread pool only adds overhead, x50 on a busy 2-core host.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for width in (0.1, 0.01, 0.001):  # continuation: smooth first, then near the loss
                opt = torch.optim.LBFGS(
                    [w], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
                )

                def closure(width: float = width, opt: torch.optim.LBFGS = opt) -> torch.Tensor:
                    opt.zero_grad()
                    loss = _smooth_pinball(y.unsqueeze(1) - xs @ w, tau, width).mean(0).sum()
                    loss.backward()  # type: ignore[no-untyped-call]
                    return loss

                opt.step(closure)  # type: ignore[no-untyped-call]
        finally:
            torch.set_num_threads(threads)
        ws = w.detach()
        # Back to raw features: a + b*x1 + c*x2 with b = w1/s1 and the centring folded into a.
        slopes = ws[1:] / std[1:].unsqueeze(1)
        intercept = ws[0] - (mean[1:].unsqueeze(1) * slopes).sum(0)
        coef = torch.cat([intercept.unsqueeze(0), slopes]).T.tolist()
        return cls(levels, coef)

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]:
        out = []
        for q in queries:
            f = _token_features(q.prompt_tokens, q.max_tokens)
            logs = sorted(sum(c * v for c, v in zip(cs, f, strict=True)) for cs in self.coef)
            out.append(LatencyDist(self.levels, tuple(math.exp(v) for v in logs)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "levels": list(self.levels), "coef": self.coef}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearQuantile:
        return cls(_check_name(cls.name, d), d["coef"])


def _load_features(q: Query | TraceRecord) -> tuple[float, float, float, float]:
    if isinstance(q, TraceRecord):
        return (1.0, q.runtime.inflight, q.runtime.queue_depth, q.prompt_tokens)
    return (1.0, q.inflight, q.queue_depth, q.prompt_tokens)


class MeanConformal(PerPlacement):
    """A mean regressor plus one constant conformal shift per level, in the manner of llm-d's
    latency predictor: least squares of latency (seconds) on [1, inflight, queue depth, prompt
    tokens], and as the level-p quantile the mean plus the split-conformal p-quantile of the
    residuals on a held-out calibration slice. No prompt text, no device speed: the spread is the
    same for a 10-token and a 100k-token call, which is what a distributional model improves on.
    """

    name: ClassVar[str] = "mean-conformal"

    def __init__(self, levels: Sequence[float], weights: list[float], shifts: list[float]) -> None:
        self.levels = _check_levels(levels)
        if len(weights) != 4 or len(shifts) != len(self.levels):
            raise ValueError("need 4 weights and one shift per level")
        self.weights = weights
        self.shifts = shifts

    @classmethod
    def fit(
        cls,
        records: Sequence[TraceRecord],
        levels: Sequence[float],
        calib_frac: float = 0.2,
        seed: int = 0,
    ) -> MeanConformal:
        import torch

        levels = _check_levels(levels)
        recs = _usable(records)
        order = list(range(len(recs)))
        random.Random(seed).shuffle(order)
        n_cal = min(max(1, round(calib_frac * len(recs))), len(recs) - 1)
        cal, fit = order[:n_cal], order[n_cal:] or order  # one record: fit and calibrate on it
        x = torch.tensor([_load_features(r) for r in recs], dtype=torch.float64)
        y = torch.tensor([r.latency_s for r in recs], dtype=torch.float64)
        # Scale the columns so the solver's rank cut-off treats them alike; prompt tokens reach 1e5.
        scale = x.abs().amax(0).clamp(min=1.0)
        w = _lstsq(x[fit] / scale, y[fit]) / scale
        resid = sorted((y[cal] - x[cal] @ w).tolist())
        shifts = [conformal_quantile(resid, p) for p in levels]  # covers p of new calls
        return cls(levels, w.tolist(), shifts)

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]:
        out = []
        for q in queries:
            mean = sum(w * v for w, v in zip(self.weights, _load_features(q), strict=True))
            out.append(
                LatencyDist(self.levels, tuple(max(_FLOOR_S, mean + s) for s in self.shifts))
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "levels": list(self.levels),
            "weights": self.weights,
            "shifts": self.shifts,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeanConformal:
        return cls(_check_name(cls.name, d), d["weights"], d["shifts"])


BASELINES: tuple[BaselineType, ...] = (EmpiricalPerModel, LinearQuantile, MeanConformal)


def baseline_from_dict(d: dict[str, Any]) -> Baseline:
    """The baseline a ``to_dict`` came from, chosen by its ``name``."""
    for cls in BASELINES:
        if d.get("name") == cls.name:
            return cls.from_dict(d)
    raise ValueError(f"unknown baseline {d.get('name')!r}")


class FallbackPredictor(PerPlacement):
    """What the live scheduler uses before any model is trained: per model, the running empirical
    quantiles of the last ``window`` latencies once there are ``min_observations``; before that a
    lognormal prior from token counts.

    The prior's defaults describe a small model on one GPU: 50 ms overhead, 0.2 ms per prompt
    token (prefill) and 20 ms per output token (decode, 50 tokens/s), at least 64 output tokens
    assumed when ``max_tokens`` is unset; sigma 1 says the guess is rough (p90 = 3.6 x median).
    """

    kind = "fallback"
    version = "fallback"

    def __init__(
        self,
        levels: Sequence[float],
        *,
        window: int = 512,
        min_observations: int = 20,
        overhead_s: float = 0.05,
        prompt_token_s: float = 0.2e-3,
        output_token_s: float = 20e-3,
        sigma: float = 1.0,
    ) -> None:
        self.levels = _check_levels(levels)
        self.window = window
        self.min_observations = min_observations
        self.overhead_s = overhead_s
        self.prompt_token_s = prompt_token_s
        self.output_token_s = output_token_s
        self.sigma = sigma
        self._recent: dict[str, deque[float]] = {}

    def observe(self, record: TraceRecord) -> None:
        if record.ok and record.latency_s > 0:
            recent = self._recent.setdefault(record.model, deque(maxlen=self.window))
            recent.append(record.latency_s)

    def prior(self, q: Query) -> LatencyDist:
        median = (
            self.overhead_s
            + q.prompt_tokens * self.prompt_token_s
            + max(q.max_tokens, 64) * self.output_token_s
        )
        return LatencyDist.lognormal(median, self.sigma, self.levels)

    def predict(self, queries: Sequence[Query]) -> list[LatencyDist]:
        empirical: dict[str, LatencyDist] = {}
        out = []
        for q in queries:
            recent = self._recent.get(q.model, ())
            if len(recent) < self.min_observations:
                out.append(self.prior(q))
                continue
            if q.model not in empirical:
                xs = sorted(recent)
                empirical[q.model] = LatencyDist(
                    self.levels, tuple(quantile(xs, p) for p in self.levels)
                )
            out.append(empirical[q.model])
        return out
