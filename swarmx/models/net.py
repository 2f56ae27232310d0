"""The network behind the learned predictor: an ensemble of small MLPs, vectorised along a
leading member dimension, whose outputs are monotone log quantiles by construction.

Its parameters are what a model file stores (``state_dict``); `swarmx.models.routing` folds them
for the routing hot path, so a change to their layout changes both.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmx.models.features import Calls, FeatureConfig, Vocab


def _uniform(*shape: int, fan_in: int, gen: torch.Generator | None) -> nn.Parameter:
    """nn.Linear's default initialisation."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound, generator=gen))


def _by_member(x: Tensor, n: int, members: int) -> Tensor:
    """[N, E*d] (all members' embeddings side by side) -> [E, N, d]."""
    return x.view(n, members, -1).transpose(0, 1)


def monotone(out: Tensor) -> Tensor:
    """[..., K] raw outputs -> non-decreasing log quantiles: a base plus softplus gaps."""
    gaps = F.softplus(out)  # on all of out: 3x faster than on a strided slice
    gaps[..., 0] = out[..., 0]
    return gaps.cumsum_(-1)


class QuantileNet(nn.Module):
    """E independently initialised members, vectorised along a leading member dimension.

    Call-side inputs go through a two-layer trunk; device/runtime inputs are added to its
    output before the head, so many placements of one call reuse the trunk. Embedding tables
    hold all members side by side ([rows, E*d]) so vocabularies grow by appending rows."""

    VOCAB_TABLES: ClassVar[dict[str, str]] = {
        "models": "model",
        "gpus": "gpu",
        "kinds": "kind",
        "inputs": "inputs",
    }
    """Each `Vocab` table's parameter: row i + 1 is the table's i-th name, row 0 "unknown"."""

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
        n_in = 2 * d + s + cfg.call_features + 1
        self.kind = uniform(n_kinds, e * h, fan_in=n_in)  # one-hot rows into the first layer
        self.inputs = uniform(n_inputs, e * h, fan_in=n_in)  # multi-hot rows, likewise
        self.w1, self.b1 = uniform(e, n_in, h, fan_in=n_in), uniform(e, 1, h, fan_in=n_in)
        self.w2, self.b2 = uniform(e, h, h, fan_in=h), uniform(e, 1, h, fan_in=h)
        p = cfg.place_features
        self.wp = uniform(e, s + p, h, fan_in=s + p)
        g = cfg.head_hidden
        self.w3, self.b3 = uniform(e, h, g, fan_in=h), uniform(e, 1, g, fan_in=h)
        self.w4, self.b4 = uniform(e, g, k, fan_in=g), uniform(e, 1, k, fan_in=g)
        self.wo, self.bo = uniform(e, h, k, fan_in=h), uniform(e, 1, k, fan_in=h)
        """The output-length head: log1p output-token quantiles from the call alone (a call's
        length does not depend on where it runs; how fast it runs does)."""

    def tables(self) -> list[nn.Parameter]:
        """The vocabulary tables: a row of one is trained only by the calls that use it."""
        return [self.model, self.gpu, self.kind, self.inputs, self.workflow]

    def grow(self, added: dict[str, int]) -> None:
        """Append rows for names a `Vocab` table gained (`Encoder.grow`): a new model, GPU or
        kind starts as the "unknown" row; a new input kind with no effect (zeros)."""
        for table, n in added.items():
            param = self.VOCAB_TABLES[table]
            old: Tensor = getattr(self, param).detach()
            rows = torch.zeros(n, old.shape[1]) if table == "inputs" else old[:1]
            setattr(self, param, nn.Parameter(torch.cat([old, rows.expand(n, -1)])))

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

    def output_head(self, call: Tensor) -> Tensor:
        """[E, N, K] monotone log1p output-token quantiles of ``call_part``'s calls."""
        return monotone(torch.baddbmm(self.bo, torch.relu(call), self.wo))

    def head(self, call: Tensor, gpu: Tensor, place_num: Tensor) -> Tensor:
        """[E, N, K] monotone log quantiles; ``call`` is [E, N, H] or [E, 1, H] (broadcast)."""
        e, n = self.members, place_num.shape[0]
        p = torch.cat([_by_member(F.embedding(gpu, self.gpu), n, e), place_num.expand(e, n, -1)], 2)
        z = torch.relu(call + torch.bmm(p, self.wp))
        z = torch.relu(torch.baddbmm(self.b3, z, self.w3))
        out = torch.baddbmm(self.b4, z, self.w4)
        return monotone(out)
