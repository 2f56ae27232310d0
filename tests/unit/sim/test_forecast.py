"""The simulator's forecasters: what each variant of ``--predictor`` tells the policies, on one
call and candidates whose true service times are known."""

import dataclasses
import math

import pytest

from swarmx.backends.emulated import GPUS, ModelProfile, prefill_s
from swarmx.models.features import FeatureConfig
from swarmx.models.query import SessionTracker
from swarmx.models.train import train
from swarmx.sched.router import ReplicaView
from swarmx.sim.forecast import Replica, SimForecaster, oracle_s
from swarmx.sim.servers import LlmServer
from swarmx.sim.simworkflow import CallTruth
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord
from swarmx.workflow.engine import CallSpec
from tests.support.records import trace_record

TRUTH = CallTruth(prompt_tokens=800, output_tokens=200)


class Info:
    now = 0.0

    def truth(self, call: CallSpec) -> CallTruth:
        return TRUTH

    def workflow_name(self, call: CallSpec) -> str:
        return "chat"


def call(i: int = 0) -> CallSpec:
    return CallSpec(f"c{i}", "wf", "s", None, 1, "llm", "m", "hello there", 512, {}, [], None, [])


def pool() -> tuple[dict[str, Replica], list[ReplicaView]]:
    """An idle H100, and an L40S with four calls in its batch."""
    reps, views = {}, []
    for name, gpu, busy in (("h/m", "H100", 0), ("l/m", "L40S", 4)):
        server = LlmServer(GPUS[gpu], ModelProfile(), 32)
        for k in range(busy):
            server.admit(f"x{k}", 1000, 300, 0.0)
        reps[name] = Replica(name, "m", gpu, GPUS[gpu], "llm", server, 32, 0.0, 0.0)
        views.append(ReplicaView(name, name[0], "m", "emulated", gpu, 32, busy, gpu=gpu))
    return reps, views


def forecaster(spec: str) -> tuple[SimForecaster, list[ReplicaView], list[float]]:
    reps, views = pool()
    truth = [oracle_s(call(), TRUTH, reps[v.replica], 0.0) for v in views]
    return SimForecaster(spec, reps, Info(), SessionTracker(), seed=1), views, truth


def test_oracle_is_the_true_service_at_each_candidates_batch():
    f, views, truth = forecaster("oracle")
    dists = f.service(call(), views)
    assert [d.quantile(0.5) for d in dists] == pytest.approx(truth)
    assert all(d.quantile(0.99) == d.quantile(0.5) for d in dists)
    assert truth[0] < truth[1]  # the idle H100 is the right choice


def test_noisy_scales_every_candidate_by_one_draw_per_call_and_states_its_spread():
    f, views, truth = forecaster("noisy:0.5")
    first = f.service(call(0), views)
    again = f.service(call(0), views)
    ratios = [d.quantile(0.5) / t for d, t in zip(first, truth, strict=True)]
    assert ratios[0] == pytest.approx(ratios[1])  # the ranking of candidates survives the noise
    assert [d.values_s for d in again] == [d.values_s for d in first]  # drawn once per call
    spread = math.log(first[0].quantile(0.9) / first[0].quantile(0.5))
    assert spread == pytest.approx(0.5 * 1.2816, rel=1e-3)
    draws = {round(f.service(call(i), views)[0].quantile(0.5) / truth[0], 6) for i in range(1, 30)}
    assert len(draws) == 29


def test_constant_gives_every_candidate_the_same_forecast():
    f, views, _ = forecaster("constant")
    a, b = f.service(call(), views)
    assert a.values_s == b.values_s


def synth_records(n: int) -> list[TraceRecord]:
    """Latency grows with load, on a fast and a slow GPU."""
    out = []
    for i in range(n):
        gpu, load = ("H100", "L40S")[i % 2], (i // 2) % 8
        latency = (1.0 if gpu == "H100" else 3.0) * (1 + 0.2 * load) * (1 + (i % 7) / 10)
        out.append(
            trace_record(
                ts=float(i),
                workflow=f"wf{i}",
                prompt="hello there",
                prompt_tokens=800,
                max_tokens=512,
                output_tokens=200,
                latency_s=latency,
                replica=f"n/{gpu}",
                device=DeviceAtDispatch(gpu, load / 32, 0.0, 0.0),
                runtime=RuntimeAtDispatch(load, 0),
                workflow_name="chat",
            )
        )
    return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    cfg = FeatureConfig(hash_buckets=1 << 8, embed_dim=8, hidden=16, ensemble=1)
    model, _ = train(synth_records(600), cfg, seed=0, max_epochs=15, batch_size=128)
    path = tmp_path_factory.mktemp("model") / "m.pt"
    model.save(path)
    return str(path)


def test_a_trained_model_its_median_only_and_without_load(model_file):
    full = forecaster(model_file)
    point = forecaster(f"{model_file}:point")
    noload = forecaster(f"{model_file}:noload")
    dists = full[0].service(call(), full[1])
    assert all(d.quantile(0.99) > d.quantile(0.5) for d in dists)  # a spread, not a point
    medians = point[0].service(call(), point[1])
    for d, m in zip(dists, medians, strict=True):
        assert m.quantile(0.99) == m.quantile(0.5) == pytest.approx(d.quantile(0.5))
    # without load features the busy L40S is forecast as if idle: what an idle one would get
    idle_reps, idle_views = pool()
    idle_views[1] = ReplicaView("l/m", "l", "m", "emulated", "L40S", 32, 0, gpu="L40S")
    idle = SimForecaster(f"{model_file}:noload", idle_reps, Info(), SessionTracker())
    assert noload[0].service(call(), noload[1])[1].values_s == pytest.approx(
        idle.service(call(), idle_views)[1].values_s
    )


def test_calls_prepared_together_forecast_as_each_alone(model_file):
    """A drain hands the forecaster its calls first (`prepare`): a learned model's forecast for
    each is then what it would have been alone; the oracle has nothing to prepare."""
    prepared, _, _ = forecaster(model_file)
    alone, views, _ = forecaster(model_file)
    calls = [dataclasses.replace(call(i), prompt=p) for i, p in enumerate(["hi", "", "hello"])]
    prepared.prepare(calls)
    for c in calls:
        got, want = prepared.service(c, views), alone.service(c, views)
        for a, b in zip(got, want, strict=True):
            assert a.values_s == pytest.approx(b.values_s, rel=1e-5)
    assert prepared._prepared == {}  # each taken once
    oracle, views, truth = forecaster("oracle")
    oracle.prepare(calls)
    assert [d.quantile(0.5) for d in oracle.service(calls[0], views)] == pytest.approx(truth)


def test_an_unknown_model_file_or_a_bare_variant_fails_clearly():
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        forecaster("/nonexistent/model.pt:point")
    with pytest.raises(ValueError, match="MODEL:point"):
        forecaster("point")


def test_nocompose_needs_a_model_file_and_is_no_variant_of_the_references():
    with pytest.raises(ValueError, match="MODEL:nocompose"):
        forecaster("nocompose")
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        forecaster("/nonexistent/model.pt:nocompose")


def cached_pool() -> tuple[dict[str, Replica], list[ReplicaView], CallSpec]:
    """Two idle H100s, one of which has just run a call with the same 12 prompt blocks."""
    blocks = list(range(12))  # 768 of the call's 800 prompt tokens
    reps, views = {}, []
    for name in ("warm/m", "cold/m"):
        server = LlmServer(GPUS["H100"], ModelProfile(), 32)
        if name == "warm/m":
            server.admit("before", 800, 1, 0.0, blocks=blocks, block_tokens=64)
            server.advance(server.next_event_s())
        reps[name] = Replica(name, "m", "H100", GPUS["H100"], "llm", server, 32, 0.0, 0.0)
        views.append(ReplicaView(name, name[:4], "m", "emulated", "H100", 32, 0, gpu="H100"))
    now = max(r.server.now_s for r in reps.values())
    for rep in reps.values():
        rep.server.advance(now)
    cached_call = dataclasses.replace(call(), prefix_blocks=blocks, block_tokens=64)
    return reps, views, cached_call


class Later(Info):
    now = 1.0


@pytest.mark.parametrize("spec", ["oracle", "noisy:0.5", "shuffled"])
def test_the_oracle_sees_the_prefix_cache_and_nocache_does_not(spec):
    reps, views, cached_call = cached_pool()
    warm, cold = SimForecaster(spec, reps, Later(), SessionTracker(), seed=1).service(
        cached_call, views
    )
    assert warm.quantile(0.5) < cold.quantile(0.5)
    saved_s = cold.quantile(0.5) - warm.quantile(0.5)
    if spec == "oracle":  # exactly the prefill of the 768 cached tokens
        gpu, model = GPUS["H100"], ModelProfile()
        assert saved_s == pytest.approx(prefill_s(gpu, model, 768))
    blind = SimForecaster(f"{spec}:nocache", reps, Later(), SessionTracker(), seed=1)
    warm, cold = blind.service(cached_call, views)
    assert warm.values_s == pytest.approx(cold.values_s)


def test_nocache_is_only_for_forecasts_made_from_the_servers():
    reps, _ = pool()
    for spec in ("constant:nocache", "nocache", "/some/model.pt:nocache"):
        with pytest.raises(ValueError, match="nocache"):
            SimForecaster(spec, reps, Info(), SessionTracker())
    with pytest.raises(ValueError, match="noisy:SIGMA"):
        SimForecaster("noisy:nocache", reps, Info(), SessionTracker())


class Sized(Info):
    """Calls of a given prompt length, 200 output tokens."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens

    def truth(self, call: CallSpec) -> CallTruth:
        return CallTruth(prompt_tokens=self.prompt_tokens, output_tokens=200)


def hot_and_idle(
    prompt_tokens: int, busy: int, slots: int
) -> tuple[dict[str, Replica], list[ReplicaView], CallSpec]:
    """An H100 that just ran this prompt (its cache holds it) with ``busy`` calls of 1k-token
    prompts decoding in a batch of ``slots``, and an idle one that never saw it."""
    blocks = list(range(prompt_tokens // 64))
    reps, views = {}, []
    for name in ("hot/m", "idle/m"):
        server = LlmServer(GPUS["H100"], ModelProfile(), slots)
        load = 0
        if name == "hot/m":
            server.admit("before", prompt_tokens, 1, 0.0, blocks=blocks, block_tokens=64)
            server.advance(server.next_event_s())
            for k in range(busy):
                server.admit(f"x{k}", 1000, 5000, server.now_s)
            load = busy
        reps[name] = Replica(name, "m", "H100", GPUS["H100"], "llm", server, slots, 0.0, 0.0)
        views.append(ReplicaView(name, name[:3], "m", "emulated", "H100", slots, load, gpu="H100"))
    now = max(r.server.now_s for r in reps.values())
    for rep in reps.values():
        rep.server.advance(now)
    return reps, views, dataclasses.replace(call(), prefix_blocks=blocks, block_tokens=64)


@pytest.mark.parametrize(
    ("prompt_tokens", "busy", "slots", "winner"),
    [
        (32_000, 8, 32, "hot/m"),  # a 32k-token prefill saved beats decoding in a busy batch
        (1_024, 4, 4, "idle/m"),  # 1k tokens saved do not pay for waiting on a full replica
        (32_000, 4, 4, "idle/m"),  # nor do 32k: the calls ahead there take longer still
    ],
)
def test_a_hot_replica_holding_the_prefix_wins_when_it_should_and_loses_when_it_should(
    prompt_tokens: int, busy: int, slots: int, winner: str
) -> None:
    """The tail router on the oracle's forecasts, which include what each replica's cache
    holds: the hand-made hot-spot cases of issue 21. A cache-blind forecast sends the first
    case to the idle replica."""
    from swarmx.sched.router import RouteInput, TailRouter

    reps, views, c = hot_and_idle(prompt_tokens, busy, slots)
    info = Sized(prompt_tokens)
    info.now = max(r.server.now_s for r in reps.values())
    for spec, expected in (("oracle", winner), ("oracle:nocache", "idle/m")):
        forecasts = SimForecaster(spec, reps, info, SessionTracker()).service(c, views)
        choice = TailRouter().choose(RouteInput(c, views, info.now, forecasts))
        assert views[choice.index].replica == expected, spec


def test_a_gpu_the_model_never_saw_gets_its_service_composed_from_its_measured_speeds(
    model_file,
):
    """The model trained on H100s and L40Ss; an A100 is new to it. Once the dispatcher has
    measured the A100's speeds its forecast is the prompt's prefill plus the output-length
    head's tokens at its decode pace (`:nocompose` keeps the latency head's guess); GPUs the
    model knows, and an A100 not measured yet, keep the latency head's."""
    reps, views = pool()
    server = LlmServer(GPUS["A100"], ModelProfile(), 32)
    reps["a/m"] = Replica("a/m", "m", "A100", GPUS["A100"], "llm", server, 32, 0.0, 0.0)
    unmeasured = ReplicaView("a/m", "a", "m", "emulated", "A100", 32, 0, gpu="A100")
    measured = dataclasses.replace(unmeasured, prefill_tokens_per_s=8000.0, decode_s_per_token=0.02)
    slower = dataclasses.replace(measured, decode_s_per_token=0.04)
    cands = [*views, unmeasured, measured, slower]
    composed = SimForecaster(model_file, reps, Info(), SessionTracker()).service(call(), cands)
    head = SimForecaster(f"{model_file}:nocompose", reps, Info(), SessionTracker()).service(
        call(), cands
    )
    for k in range(3):
        assert composed[k].values_s == head[k].values_s
    assert composed[3].values_s != head[3].values_s  # the A100's own forecast changed
    prefill = 800 / 8000.0
    decode = [v - prefill for v in composed[3].values_s]
    assert all(d > 0 for d in decode)
    tokens = [d / 0.02 + 1 for d in decode]
    assert tokens == pytest.approx([round(t) for t in tokens])  # whole tokens, at 20 ms each
    assert [v - prefill for v in composed[4].values_s] == pytest.approx([2 * d for d in decode])
