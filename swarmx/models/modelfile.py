"""A trained predictor's file: everything needed to predict (feature configuration,
vocabularies, normalisation, seen n-grams, weights, calibration, version, training metrics and
free-form extras such as the fitted baselines) in one torch file of tensors and plain data only,
so it loads with ``weights_only=True`` and a model file from elsewhere cannot run code.

`QuantilePredictor.save` and `QuantilePredictor.load` are the entry points; `FORMAT` changes
when a file written before would load wrongly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from swarmx.models.features import Encoder, FeatureConfig, Vocab
from swarmx.models.net import QuantileNet

FORMAT = 1
OUTPUT_HEAD = {"wo", "bo"}
"""The output-length head's weights, which files from before it lack."""


@dataclass
class ModelFile:
    """What a model file holds, as `QuantilePredictor` is built from it."""

    encoder: Encoder
    net: QuantileNet
    version: str
    metrics: dict[str, Any]
    extras: dict[str, Any]
    cal_shift: Tensor
    online_shift: Tensor
    output_shift: Tensor | None = None
    """None in files from before the output-length head (its weights are then untrained)."""
    marginal: Tensor | None = None
    """None in files from before the novelty floor."""
    novelty_shift: Tensor | None = None
    """None in files from before the novelty buckets (no shifts)."""


def save(contents: ModelFile, path: str | Path) -> None:
    enc = contents.encoder
    torch.save(
        {
            "format": FORMAT,
            "version": contents.version,
            "config": dataclasses.asdict(enc.cfg),
            "vocab": dataclasses.asdict(enc.vocab),
            "norm": enc.norm,
            "seen": enc.seen,
            "state": contents.net.state_dict(),
            "cal_shift": contents.cal_shift,
            "online_shift": contents.online_shift,
            "output_shift": contents.output_shift,
            "marginal": contents.marginal,
            "novelty_shift": contents.novelty_shift,
            "metrics": contents.metrics,
            "extras": contents.extras,
        },
        path,
    )


def load(path: str | Path) -> ModelFile:
    d = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{path}: not a swarmx quantile predictor (format {FORMAT})")
    # older files: 5 placement columns, 17 call columns
    cfg = FeatureConfig(**{"place_features": 5, "call_features": 17, **d["config"]})
    vocab = Vocab(**{k: list(v) for k, v in d["vocab"].items()})
    net = QuantileNet(cfg, vocab)
    missing, unexpected = net.load_state_dict(d["state"], strict=False)
    if unexpected or set(missing) - OUTPUT_HEAD:
        raise ValueError(f"{path}: weights do not fit the network ({missing + unexpected})")
    k = len(cfg.levels)
    marginal = _checked(path, d.get("marginal"), "marginal", (len(vocab.models) + 1, None))
    if marginal is not None and bool((marginal[:, 1:] < marginal[:, :-1]).any()):
        raise ValueError(f"{path}: marginal: each model's quantiles must not decrease")
    novelty_shift = _checked(
        path, d.get("novelty_shift"), "novelty_shift", (len(cfg.novelty_edges) + 1, k)
    )
    return ModelFile(
        Encoder(cfg, vocab, dict(d["norm"]), d["seen"]),
        net,
        version=d["version"],
        metrics=d["metrics"],
        extras=d["extras"],
        cal_shift=d["cal_shift"],
        online_shift=d["online_shift"],
        output_shift=None if missing else d.get("output_shift"),
        marginal=marginal,
        novelty_shift=novelty_shift,
    )


def _checked(
    path: str | Path, value: object, name: str, shape: tuple[int, int | None]
) -> Tensor | None:
    """A 2-D tensor of finite floats of ``shape`` (None: any width above 0), or None (a file
    from before it): a file whose numbers would make every forecast fail or NaN is refused at
    load, not at the first routed call."""
    if value is None:
        return None
    rows, width = shape
    if (
        not isinstance(value, Tensor)
        or value.dim() != 2
        or not value.is_floating_point()
        or value.shape[0] != rows
        or value.shape[1] < 1
        or (width is not None and value.shape[1] != width)
        or not bool(torch.isfinite(value).all())
    ):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        want = f"[{rows}, {'n' if width is None else width}] finite floats"
        raise ValueError(f"{path}: {name}: expected {want}, got {got}")
    return value.float()


def digest(net: QuantileNet, vocab: Vocab) -> str:
    """A short hash of the weights and vocabularies, for version names."""
    buf = io.BytesIO()
    torch.save((net.state_dict(), dataclasses.asdict(vocab)), buf)
    return hashlib.blake2b(buf.getvalue(), digest_size=6).hexdigest()
