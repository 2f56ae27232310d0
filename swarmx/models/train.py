"""Fitting `QuantilePredictor`s on trace records, and fine-tuning copies on recent calls.

Splits are by agent session, never by row: calls of one session share their task, wording and
the API's load at the time, so a row split would leak the answer into early stopping and
calibration and make the tails look better calibrated than they are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from swarmx.models.features import Calls, FeatureConfig, Places
from swarmx.models.predictor import QuantilePredictor
from swarmx.models.query import Query, queries
from swarmx.traces import TraceRecord, split_keys

__all__ = [
    "TrainReport",
    "fine_tune",
    "pinball",
    "train",
]

DEFAULT_CONFIG = FeatureConfig()

_FUSED_ADAM = torch.__version__ >= "2.4"
"""Fused Adam runs on CPU from torch 2.4 and halves training time; older torch gets the loop."""

Progress = Callable[[int, int, float, float], None]
"""Called after each epoch with (epoch, max_epochs, train_loss, val_loss)."""


@dataclass(frozen=True)
class TrainReport:
    epochs: int
    best_val_pinball: float
    """Mean pinball loss over levels in log-latency space, before calibration."""
    val_pinball: dict[float, float]
    """Per level, log space, after calibration."""
    coverage: dict[float, float]
    """Per level, share of validation calls at or below the calibrated quantile."""
    wall_s: float
    n_train: int
    n_val: int
    n_cal: int


def pinball(log_latency: Tensor, log_q: Tensor, levels: Sequence[float]) -> Tensor:
    """Elementwise pinball loss of quantiles ``log_q`` [..., K] for targets [...]: the training
    loss, on tensors with gradients. `swarmx.stats.pinball` is the same loss on one float
    forecast, for scoring; this one must stay differentiable and batched."""
    r = log_latency.unsqueeze(-1) - log_q
    tau = torch.tensor(levels, dtype=log_q.dtype)
    return r * (tau - (r < 0).to(log_q.dtype))


OUTPUT_WEIGHT = 0.5
"""The output-length head's share of the training loss, beside the latency head's."""


@dataclass
class _Data:
    """The usable calls (ok, positive latency): queries, sessions, log latencies, log1p output
    tokens."""

    queries: list[Query]
    sessions: list[str]
    log_latency: Tensor
    log_output: Tensor


def _usable(records: Sequence[TraceRecord]) -> _Data:
    """Queries with session contexts built on the full ordered records (failed calls included,
    as they happened), then restricted to successful calls with a latency."""
    qs = queries(records)
    keep = [i for i, r in enumerate(records) if r.ok and r.latency_s > 0]
    if not keep:
        raise ValueError("no successful records with a positive latency")
    return _Data(
        [qs[i] for i in keep],
        [records[i].session_id for i in keep],
        torch.log(torch.tensor([records[i].latency_s for i in keep], dtype=torch.float32)),
        torch.log1p(
            torch.tensor([max(records[i].output_tokens, 0) for i in keep], dtype=torch.float32)
        ),
    )


def _epoch(
    model: QuantilePredictor,
    opt: torch.optim.Optimizer,
    *,
    calls: Calls,
    places: Places,
    log_latency: Tensor,
    log_output: Tensor,
    weights: Tensor,
    batch_size: int,
    gen: torch.Generator,
) -> float:
    """One pass in random minibatches; each member's loss is weighted by its bootstrap weights
    (so members differ in data as well as initialisation), the output-length head's added at
    `OUTPUT_WEIGHT`. Returns the members' mean latency pinball loss over levels, unweighted,
    comparable with the validation loss."""
    n, total, steps = log_latency.shape[0], 0.0, 0
    normal = NormalDist()
    level_w = torch.tensor(
        [normal.pdf(normal.inv_cdf(p)) ** -model.cfg.tail_weight for p in model.levels]
    )
    level_w /= level_w.mean()
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        q, out = model.members_both(calls.take(idx), places.take(idx), gen)  # [E, B, K] each
        loss_k = pinball(log_latency[idx], q, model.levels)  # [E, B, K]
        both = loss_k + OUTPUT_WEIGHT * pinball(log_output[idx], out, model.levels)
        w = weights[idx].T
        loss = (((both * level_w).mean(2) * w).sum(1) / w.sum(1).clamp(min=1.0)).sum()
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        total += float(loss_k.detach().mean())
        steps += 1
    return total / max(steps, 1)


def _bootstrap(n: int, members: int, gen: torch.Generator) -> Tensor:
    if members == 1:
        return torch.ones(n, 1)
    return torch.poisson(torch.ones(n, members), generator=gen)


def train(
    records: Sequence[TraceRecord],
    cfg: FeatureConfig = DEFAULT_CONFIG,
    *,
    seed: int = 0,
    max_epochs: int = 30,
    progress: Progress | None = None,
    batch_size: int = 512,
    lr: float = 3e-3,
    patience: int = 4,
    val_frac: float = 0.1,
    cal_frac: float = 0.15,
) -> tuple[QuantilePredictor, TrainReport]:
    """A predictor fitted on ``records``: sessions split into train / validation (early
    stopping on pinball loss) / calibration (conformal shifts). With a single session the
    held-out steps reuse the training calls."""
    if min(val_frac, cal_frac) < 0 or val_frac + cal_frac >= 1:
        raise ValueError(f"need 0 <= val_frac, cal_frac and a sum < 1: {val_frac}, {cal_frac}")
    start = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = _usable(records)
        rest, cal = split_keys(data.sessions, cal_frac, seed)
        fit_r, val_r = split_keys(
            [data.sessions[i] for i in rest], val_frac / (1 - cal_frac), seed + 1
        )
        fit, val = [rest[i] for i in fit_r], [rest[i] for i in val_r]
        val, cal = val or fit, cal or val or fit
        y = data.log_latency
        gen = torch.Generator().manual_seed(seed)
        model = QuantilePredictor.fresh(
            cfg, [data.queries[i] for i in fit], y[fit], seed, data.log_output[fit]
        )
        calls, places = model.encoder.encode(data.queries)
        fit_t, val_t, cal_t = (torch.tensor(ix, dtype=torch.long) for ix in (fit, val, cal))
        fit_c, fit_p = calls.take(fit_t), places.take(fit_t)
        val_c, val_p = calls.take(val_t), places.take(val_t)
        model.fit_marginal(fit_c.model, y[fit_t])
        weights = _bootstrap(len(fit), cfg.ensemble, gen)
        opt = torch.optim.Adam(model.net.parameters(), lr=lr, fused=_FUSED_ADAM)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
        best, best_state, bad, epochs = math.inf, model.net.state_dict(), 0, 0
        for epoch in range(1, max_epochs + 1):
            epochs = epoch
            loss = _epoch(
                model,
                opt,
                calls=fit_c,
                places=fit_p,
                log_latency=y[fit_t],
                log_output=data.log_output[fit_t],
                weights=weights,
                batch_size=batch_size,
                gen=gen,
            )
            val_loss = float(pinball(y[val_t], model.raw_log(val_c, val_p), model.levels).mean())
            if progress is not None:
                progress(epoch, max_epochs, loss, val_loss)
            plateau.step(val_loss)
            if val_loss < best - 1e-5:
                best, bad = val_loss, 0
                best_state = {k: v.clone() for k, v in model.net.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    break
        model.net.load_state_dict(best_state)
        model.calibrate_encoded(
            calls.take(cal_t), places.take(cal_t), y[cal_t], data.log_output[cal_t]
        )
        val_q = model.predict_encoded(val_c, val_p)
        loss_k = pinball(y[val_t], val_q, model.levels).mean(0)
        hits = (y[val_t].unsqueeze(1) <= val_q).float().mean(0)
        report = TrainReport(
            epochs=epochs,
            best_val_pinball=best,
            val_pinball={p: float(v) for p, v in zip(model.levels, loss_k, strict=True)},
            coverage={p: float(v) for p, v in zip(model.levels, hits, strict=True)},
            wall_s=time.monotonic() - start,
            n_train=len(fit),
            n_val=len(val),
            n_cal=len(cal),
        )
    finally:
        torch.set_num_threads(threads)
    model.metrics = _plain(asdict(report))
    model.version = f"q-{model.digest()}"
    return model, report


def fine_tune(
    model: QuantilePredictor,
    records: Sequence[TraceRecord],
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 64,
    cal_frac: float = 0.25,
    table_lr_mult: float = 30.0,
) -> QuantilePredictor:
    """A new predictor: a copy of ``model`` refitted on ``records`` (recent calls) and
    recalibrated on ``cal_frac`` of their sessions. Models, GPUs and input kinds first seen in
    ``records`` get vocabulary rows (starting from "unknown") and are learned: the vocabulary
    tables step ``table_lr_mult`` times faster, since a new row must travel from "unknown" to its
    own value in a few epochs. The online shift is reset, as the new calibration replaces it.
    With one session, calibration is kept."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = _usable(records)
        fit, cal = split_keys(data.sessions, cal_frac, seed)
        new = model.copy()
        new.grow([data.queries[i] for i in fit])
        calls, places = new.encoder.encode(data.queries)
        y = data.log_latency
        fit_t = torch.tensor(fit, dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        weights = _bootstrap(len(fit), new.cfg.ensemble, gen)
        tables = new.net.tables()
        rest = [p for p in new.net.parameters() if all(p is not t for t in tables)]
        groups: list[dict[str, Any]] = [
            {"params": rest},
            {"params": tables, "lr": lr * table_lr_mult},
        ]
        opt = torch.optim.Adam(groups, lr=lr, fused=_FUSED_ADAM)
        fit_c, fit_p = calls.take(fit_t), places.take(fit_t)
        new.fit_marginal(fit_c.model, y[fit_t])
        losses = [
            _epoch(
                new,
                opt,
                calls=fit_c,
                places=fit_p,
                log_latency=y[fit_t],
                log_output=data.log_output[fit_t],
                weights=weights,
                batch_size=batch_size,
                gen=gen,
            )
            for _ in range(epochs)
        ]
        if cal:
            cal_t = torch.tensor(cal, dtype=torch.long)
            new.calibrate_encoded(
                calls.take(cal_t), places.take(cal_t), y[cal_t], data.log_output[cal_t]
            )
    finally:
        torch.set_num_threads(threads)
    new.online_shift = torch.zeros_like(new.online_shift)
    new.metrics = {
        **model.metrics,
        "fine_tuned_from": model.version,
        "fine_tune": {"n_train": len(fit), "n_cal": len(cal), "train_losses": losses},
    }
    new.version = f"q-{new.digest()}"
    return new


def _plain(d: dict[str, object]) -> dict[str, object]:
    """Level-keyed dicts get string keys ("0.9"), as in the trace format."""
    return {
        k: {f"{p:g}": v for p, v in val.items()} if isinstance(val, dict) else val
        for k, val in d.items()
    }
