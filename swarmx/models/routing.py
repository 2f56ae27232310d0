"""The predictor's network folded for the routing hot path: one call scored on many placements.

A cache of `QuantileNet`'s weights in another layout (`QuantilePredictor` rebuilds it whenever a
weight changes), so it must follow that net's parameter layout; a unit test holds the two paths
to the same numbers.
"""

from __future__ import annotations

import array
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from swarmx.models.features import (
    CallFields,
    FeatureConfig,
    longs,
)
from swarmx.models.net import QuantileNet, monotone


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

    def call(self, fields: CallFields) -> Tensor:
        """[E, 1, H]: the trunk's output for one call's `Encoder.call_fields`."""
        grams, raw, inputs, (model, workflow, kind) = fields
        num = [
            0.0 if math.isnan(x) else (x - m) / sd  # missing at the mean
            for x, m, sd in zip(raw, self.call_mean, self.call_std, strict=False)
        ]
        num.append(raw[-1])  # the novelty, not standardised
        rows = [0, 1 + model, self.workflow_row + workflow, self.kind_row + kind]
        rows += [self.input_row + i for i in inputs]
        # sum-mode bags are 2-3x faster than mean-mode ones; the mean's 1/n goes in alpha below
        text = F.embedding_bag(longs(grams), self.text, self._start, mode="sum")
        pre = F.embedding_bag(longs(rows), self.rows, self._start, mode="sum")
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
        return monotone(out)
