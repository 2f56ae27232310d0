"""The predictor's network folded for the routing hot path: one call scored on many placements.

A cache of `QuantileNet`'s weights in another layout (`QuantilePredictor` rebuilds it whenever a
weight changes), so it must follow that net's parameter layout; a unit test holds the two paths
to the same numbers.
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from swarmx.models.features import (
    CallFields,
    FeatureConfig,
    Places,
    longs,
)
from swarmx.models.net import QuantileNet, monotone
from swarmx.models.query import Candidate

PLACED_KEPT = 4096
"""Placements whose head contribution a `RoutingNet` keeps (about 6 MB at the default sizes);
past it, it forgets them all and starts again."""


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
            self.num_w = w1[:, 2 * d + s :].permute(1, 0, 2).reshape(cfg.call_features + 1, -1)
            self.w2, self.b2 = net.w2.detach(), net.b2.detach()
            self.gpu = _projected(net.gpu.detach(), net.wp.detach()[:, :s])
            self.place_w = net.wp.detach()[:, s:].permute(1, 0, 2).reshape(cfg.place_features, -1)
            self.w3, self.b3 = net.w3.detach(), net.b3.detach()
            self.w4, self.b4 = net.w4.detach(), net.b4.detach()
        self.members = e
        self._placed: dict[tuple[Candidate, int], tuple[Tensor, int]] = {}
        """(candidate, cached tokens) -> (its contribution to the head, its load bucket)."""

    def call(self, fields: CallFields) -> Tensor:
        """[E, 1, H]: the trunk's output for one call's `Encoder.call_fields`."""
        return self.calls([fields]).view(self.members, 1, -1)

    def calls(self, many: Sequence[CallFields]) -> Tensor:
        """[B, E*H]: the trunk's outputs for B calls' `Encoder.call_fields` in one pass (row b
        is call b's [E, 1, H] laid flat, members side by side): queued calls are encoded
        together, and the per-op overhead that dominates one call's trunk is paid once."""
        grams: list[int] = []
        rows: list[int] = []
        num: list[float] = []
        text_at: list[int] = []
        rows_at: list[int] = []
        scale: list[float] = []
        for bag, raw, inputs, (model, workflow, kind) in many:
            text_at.append(len(grams))
            grams += bag
            scale.append(1 / max(len(bag), 1))
            rows_at.append(len(rows))
            rows += (0, 1 + model, self.workflow_row + workflow, self.kind_row + kind)
            rows += [self.input_row + i for i in inputs]
            num += [
                0.0 if math.isnan(x) else (x - m) / sd  # missing at the mean
                for x, m, sd in zip(raw, self.call_mean, self.call_std, strict=False)
            ]
            num.append(raw[-1])  # the novelty, not standardised
        b, e = len(many), self.members
        # sum-mode bags are 2-3x faster than mean-mode ones; each bag's 1/n is applied below
        text = F.embedding_bag(longs(grams), self.text, longs(text_at), mode="sum")
        pre = F.embedding_bag(longs(rows), self.rows, longs(rows_at), mode="sum")
        pre.addmm_(
            torch.frombuffer(array.array("f", num), dtype=torch.float32).view(b, -1), self.num_w
        )
        text_e = text.view(b, e, -1).transpose(0, 1)
        if b == 1:
            pre.view(e, 1, -1).baddbmm_(text_e, self.text_w, alpha=scale[0])
            first = pre.relu_().view(e, 1, -1)
        else:
            text_e = text_e * torch.tensor(scale).view(1, b, 1)
            first = torch.baddbmm(pre.view(b, e, -1).transpose(0, 1), text_e, self.text_w).relu_()
        return torch.baddbmm(self.b2, first, self.w2).transpose(0, 1).reshape(b, -1)

    def placed(
        self, keys: Sequence[tuple[Candidate, int]], encode: Callable[[list[int]], Places]
    ) -> tuple[Tensor, Tensor]:
        """([N, E*H] each placement's contribution to the head's first layer, [N] its load
        bucket) for placements keyed by (candidate, cached prompt tokens); ``encode`` encodes
        those at the given indices that were not met before.

        A placement's contribution does not depend on the call, and a pool's placements change
        a few at a time between decisions (the chosen replica's load, a heartbeat's
        utilisation): kept by key, most decisions encode none and gather 64 rows in one
        stack instead of building, standardising and projecting them again."""
        known, missing = self._placed, []
        rows: list[Tensor | None] = []
        buckets: list[int] = []
        for j, key in enumerate(keys):
            hit = known.get(key)
            if hit is None:
                missing.append(j)
                rows.append(None)
                buckets.append(0)
            else:
                rows.append(hit[0])
                buckets.append(hit[1])
        if missing:
            places = encode(missing)
            new = F.embedding(places.gpu, self.gpu).addmm_(places.num, self.place_w)
            if len(known) + len(missing) > PLACED_KEPT:
                known.clear()
            for j, row, bucket in zip(missing, new.unbind(0), places.bucket.tolist(), strict=True):
                rows[j], buckets[j] = row, bucket
                known[keys[j]] = (row, bucket)
        return torch.stack(cast(list[Tensor], rows)), longs(buckets)

    def head(self, call: Tensor, placed: Tensor) -> Tensor:
        """[E, N, K] monotone log quantiles of the call on N placements (`placed`)."""
        n, e = placed.shape[0], self.members
        z = torch.add(placed, call.view(1, -1)).relu_().view(n, e, -1).transpose(0, 1)
        z = torch.bmm(z, self.w3).add_(self.b3).relu_()  # baddbmm's bias costs a third more
        out = torch.baddbmm(self.b4, z, self.w4)
        return monotone(out)
