"""Service time composed from the call's output-length forecast and the replica's measured
speed, for replicas on a device the predictor never trained on.

The latency head learned how long calls take on the GPUs of its training traces; on a new GPU
type, or one whose engine got faster in place, it can only guess (the unknown-GPU embedding: an
average device). What a call asks for does not depend on the device: the tokens it will
generate (the output-length head's quantiles) and the prompt it must prefill (less what the
replica's cache holds). What the device brings is measured live on each replica, by the
dispatcher, from its own calls: prefill tokens a second and decode seconds a token under the
batches it runs (`ReplicaView.prefill_tokens_per_s`, `ReplicaView.decode_s_per_token`). Their
composition is right from a replica's first few calls whatever it runs on; once the learner has
trained on that GPU's calls its vocabulary knows it, and the latency head takes over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

from swarmx.models.dist import LatencyDist
from swarmx.models.query import Query


class LengthModel(Protocol):
    """A predictor with an output-length head (`swarmx.models.predictor.QuantilePredictor`;
    named structurally so that this module, imported by the daemons and the simulator, does not
    import torch). ``output_shift`` is None for a model trained before the head."""

    output_shift: object

    def knows_gpu(self, gpu: str) -> bool: ...

    def output_tokens(self, query: Query) -> LatencyDist: ...


class Measured(Protocol):
    """A candidate replica as the dispatcher measured it (`swarmx.sched.router.ReplicaView`); a
    speed not measured yet is 0."""

    @property
    def gpu(self) -> str: ...

    @property
    def prefill_tokens_per_s(self) -> float: ...

    @property
    def decode_s_per_token(self) -> float: ...


def compose_service(
    tokens: LatencyDist, uncached_tokens: int, prefill_tokens_per_s: float, decode_s: float
) -> LatencyDist:
    """The service time whose quantiles are the prefill of ``uncached_tokens`` plus each
    output-token quantile's decode after the first token (both monotone in the tokens, so the
    levels keep their order)."""
    prefill_s = max(0, uncached_tokens) / prefill_tokens_per_s
    return LatencyDist(
        tokens.levels, tuple(prefill_s + max(0.0, t - 1) * decode_s for t in tokens.values_s)
    )


def compose_unfamiliar(
    model: object,
    query: Query,
    views: Sequence[Measured],
    cached_tokens: Sequence[int] | None,
    forecasts: list[LatencyDist],
) -> list[LatencyDist]:
    """``forecasts`` (aligned with ``views``, one per candidate) with the composed service
    time in place of the latency head's for each LLM candidate on a GPU the model does not know
    whose speeds are measured; unchanged where there is none, or the model has no output-length
    head."""
    if query.kind != "llm" or getattr(model, "output_shift", None) is None:
        return forecasts
    lengths = cast(LengthModel, model)  # a model with an output shift has the head
    new = [
        i
        for i, v in enumerate(views)
        if v.prefill_tokens_per_s > 0 and v.decode_s_per_token > 0 and not lengths.knows_gpu(v.gpu)
    ]
    if not new:
        return forecasts
    tokens = lengths.output_tokens(query)
    out = list(forecasts)
    for i in new:
        v = views[i]
        held = cached_tokens[i] if cached_tokens is not None else 0
        out[i] = compose_service(
            tokens, query.prompt_tokens - held, v.prefill_tokens_per_s, v.decode_s_per_token
        )
    return out
