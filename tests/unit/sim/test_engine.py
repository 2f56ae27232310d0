"""The simulator against queueing theory, and its bookkeeping on the built-in workloads."""

import random

import pytest

from swarmx.sched.router import LeastOutstanding, make_router
from swarmx.sched.scaler import NoScaler
from swarmx.sim.engine import SimConfig, Simulation, offered_load, summary
from swarmx.sim.generators import generate
from swarmx.sim.importers import load_trace
from swarmx.sim.servers import LlmServer
from swarmx.sim.simworkflow import LLM_MODEL, CallTruth, SimWorkflow
from swarmx.workflow.spec import StepSpec, WorkflowSpec
from tests.unit.sim.tracefiles import conversations, write_mooncake

TOOL = WorkflowSpec("mm1", None, {}, [StepSpec(id="t", kind="tool", after=[], command=["x"])], "-")


def poisson_tool_jobs(n: int, lam: float, mu: float, seed: int = 1) -> list[SimWorkflow]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(lam)
        truth = {("t", None): CallTruth(0, work_s=rng.expovariate(mu))}
        out.append(SimWorkflow(t, TOOL, truth, name="mm1"))
    return out


@pytest.mark.parametrize(("lam", "servers"), [(0.5, 1), (0.7, 1)])
def test_mm1_mean_latency_within_5_percent(lam, servers):
    jobs = poisson_tool_jobs(60_000, lam, 1.0)
    cfg = SimConfig(replicas=0, tool_hosts=servers, tool_cores=1, tool_slots=1)
    result = Simulation(cfg, jobs, router=LeastOutstanding(), order="fifo", scaler=NoScaler()).run()
    expected = 1 / (1.0 - lam)  # M/M/1: E[T] = 1 / (mu - lambda)
    assert summary(result)["workflow_latency_s"]["mean"] == pytest.approx(expected, rel=0.05)


def test_processor_sharing_host_has_the_same_mean_as_fifo():
    jobs = poisson_tool_jobs(60_000, 0.7, 1.0, seed=3)
    cfg = SimConfig(replicas=0, tool_hosts=1, tool_cores=1, tool_slots=1000)  # M/M/1-PS
    result = Simulation(cfg, jobs, router=LeastOutstanding(), order="fifo", scaler=NoScaler()).run()
    assert summary(result)["workflow_latency_s"]["mean"] == pytest.approx(1 / 0.3, rel=0.05)


def run(kind: str, policy: str, load: float = 0.5, seed: int = 0, n: int = 150):
    wfs = generate(kind, workflows=n, rate_per_s=1.0, seed=seed)
    stretch = offered_load(wfs, 8, 32) / load
    wfs = [SimWorkflow(w.arrival_s * stretch, w.spec, w.truth, w.release_s, w.name) for w in wfs]
    sim = Simulation(
        SimConfig(replicas=8, gpu="mixed", seed=seed),
        wfs,
        router=make_router(policy, seed=seed),
        order="fifo",
        scaler=NoScaler(),
    )
    return wfs, sim.run()


@pytest.mark.parametrize("kind", ["codegen", "research", "multimodal", "mixed"])
def test_every_workflow_finishes_and_every_call_is_counted(kind):
    wfs, result = run(kind, "least_outstanding")
    assert result.workflows == len(wfs) == len(result.workflow_latency_s)
    assert result.failed == 0
    assert result.calls == len(result.call_latency_s) >= len(wfs)
    assert all(x > 0 for x in result.workflow_latency_s)
    assert result.replica_seconds > 0


def test_a_run_is_deterministic_for_a_seed():
    _, a = run("mixed", "tail", seed=4, n=80)
    _, b = run("mixed", "tail", seed=4, n=80)
    assert a.workflow_latency_s == b.workflow_latency_s


def test_heavier_load_means_longer_workflows():
    _, light = run("research", "least_outstanding", load=0.2)
    _, heavy = run("research", "least_outstanding", load=1.2)
    assert summary(heavy)["workflow_latency_s"]["p95"] > summary(light)["workflow_latency_s"]["p95"]


def test_tool_hosts_are_sized_for_the_replica_budget_not_the_starting_pool():
    """Scalers grow GPU pools only: CPU hosts for tools come with the budget, so a run that
    starts small is not held up by tool hosts a full pool would have had."""
    wfs = generate("codegen", workflows=1, rate_per_s=1.0, seed=0)
    sim = Simulation(
        SimConfig(replicas=16, max_replicas=64),
        wfs,
        router=LeastOutstanding(),
        order="fifo",
        scaler=NoScaler(),
    )
    sim.run()
    assert sum(r.kind == "tool" for r in sim.replicas.values()) == 8


def test_a_run_that_reads_no_forecast_makes_none_and_decides_the_same():
    """Baseline router, FIFO, no scaler: no forecasts or deadlines are worked out (nothing reads
    them), and every call goes where it went with them."""
    wfs = generate("mixed", workflows=120, rate_per_s=2.0, seed=3)

    def sim(record: bool) -> Simulation:
        return Simulation(
            SimConfig(replicas=8, gpu="mixed", seed=3),
            wfs,
            router=LeastOutstanding(),
            order="fifo",
            scaler=NoScaler(),
            record=(lambda rec: None) if record else None,
        )

    plain, recorded = sim(False), sim(True)
    assert plain.dispatcher.forecaster is None and recorded.dispatcher.forecaster is not None
    a, b = plain.run(), recorded.run()
    assert a.workflow_latency_s == b.workflow_latency_s and a.calls == b.calls
    assert plain.dispatcher.typical_service(LLM_MODEL) is None
    assert recorded.dispatcher.typical_service(LLM_MODEL) is not None


@pytest.mark.parametrize("kv_events", [False, True])
def test_with_kv_events_the_index_holds_nothing_the_replicas_caches_evicted(tmp_path, kv_events):
    """Replicas whose caches report evictions (`SimConfig.kv_events`, vLLM's KV events) keep
    the dispatcher's index to what they hold; fed by routing alone it keeps blocks they lost."""
    trace = write_mooncake(tmp_path / "mc.jsonl", conversations(12, turns=8, gap_s=0.2))
    sim = Simulation(
        SimConfig(replicas=2, kv_cache_tokens=12 * 512, kv_events=kv_events),
        load_trace(trace),
        router=make_router("prefix_affinity"),
        order="fifo",
        scaler=NoScaler(),
    )
    sim.run()
    stale = 0
    for name, rep in sim.replicas.items():
        if isinstance(rep.server, LlmServer):
            index = sim.dispatcher.prefixes.get(name)
            assert index is not None
            held = rep.server.cache.index
            stale += sum(1 for block in index if block not in held)
    assert (stale == 0) == kv_events
