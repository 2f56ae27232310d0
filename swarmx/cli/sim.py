"""`swarmx sim`: the scheduler's policies at cluster scale, on a simulated clock."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from swarmx.backends.emulated import GPUS, ModelProfile, kv_capacity_tokens
from swarmx.cli.common import ConfigOpt, JsonOpt, fail, load, print_json
from swarmx.config import RouterConfig, RouterPolicy, ScalerConfig, ScalerPolicy
from swarmx.sched.dispatch import QueueOrder
from swarmx.sim.generators import Workload

if TYPE_CHECKING:
    from swarmx.sim.simworkflow import SimWorkflow

Gpu = Literal["H100", "A100", "L40S", "mixed"]
"""A GPU of `swarmx.backends.emulated.GPUS`, or equal parts of each (the tests keep the two in
step)."""


def _default(text: object) -> str:
    """``[default: text]`` in a help text, its brackets escaped from Rich markup."""
    return f"\\[default: {text}]"


def _config_default(section: str, key: str, value: object) -> str:
    return _default(f"the config's \\[{section}] {key}, else {value}")


def sim(
    workload: Annotated[Workload | None, typer.Option(help="Built-in workload.")] = None,
    trace: Annotated[
        Path | None,
        typer.Option(
            help="Replay a trace: SwarmX trace JSONL, an Azure LLM CSV, a Mooncake JSONL or a "
            "claude-code requests.csv (sessions of agents in closed loop).",
            dir_okay=False,
        ),
    ] = None,
    workflows: Annotated[int, typer.Option(help="Workflows to generate (built-ins).")] = 2000,
    limit: Annotated[
        int | None,
        typer.Option(help="Replay at most this many of a trace's workflows (its first)."),
    ] = None,
    policy: Annotated[
        RouterPolicy | None,
        typer.Option(
            "--policy",
            "--router",
            help="Router " + _config_default("router", "policy", RouterConfig.policy) + ".",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        QueueOrder | None,
        typer.Option(
            help="Queue order " + _config_default("router", "queue", RouterConfig.queue) + ".",
            show_default=False,
        ),
    ] = None,
    scaler: Annotated[
        ScalerPolicy | None,
        typer.Option(
            help="Scaler " + _config_default("scaler", "policy", ScalerConfig.policy) + ".",
            show_default=False,
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(help="GPU replicas at the start.")] = 16,
    max_replicas: Annotated[
        int | None,
        typer.Option(help="GPU replica cap for scalers " + _default("4x --replicas") + "."),
    ] = None,
    gpu: Annotated[Gpu, typer.Option(help="GPU of the replicas.")] = "A100",
    load_: Annotated[
        float | None,
        typer.Option(
            "--load",
            help="Offered load as a fraction of GPU capacity; arrivals are stretched to it "
            + _default("0.7 for built-ins, as recorded for traces")
            + ".",
        ),
    ] = None,
    rate_scale: Annotated[
        float,
        typer.Option(
            help="Multiply the arrival rate (after --load); in a claude-code replay, divide the "
            "agents' think times and sub-agents' start offsets instead."
        ),
    ] = 1.0,
    sessions: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Run this many workflows (a claude-code trace's sessions) at once, the next "
            "starting as one ends, instead of at their arrival times "
            + _default("all at once for claude-code, else as they arrive")
            + ".",
            show_default=False,
        ),
    ] = None,
    kv_cache_tokens: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="KV-cache tokens of an LLM replica, its prefix cache's room beside its running "
            "contexts "
            + _default(
                "from the GPU's memory: 90% less the 16 GB of weights, at 128 KiB a token: "
                f"{kv_capacity_tokens(GPUS['A100'], ModelProfile()):,} on an A100 or H100, "
                f"{kv_capacity_tokens(GPUS['L40S'], ModelProfile()):,} on an L40S"
            )
            + ".",
            show_default=False,
        ),
    ] = None,
    kv_events: Annotated[
        bool,
        typer.Option(
            "--kv-events",
            help="Replicas tell the prefix index what their caches evict, as vLLM and SGLang do "
            "with KV events; without, the index knows only what was routed.",
        ),
    ] = False,
    capacity_price: Annotated[
        bool,
        typer.Option(
            "--capacity-price",
            help="The tail router charges the pool capacity a prefill burns (also [router] "
            "capacity_price).",
        ),
    ] = False,
    session_value: Annotated[
        bool,
        typer.Option(
            "--session-value",
            help="The tail router charges the prefill a call's evictions cost the sessions "
            "still wanting those prefixes (also [router] session_value).",
        ),
    ] = False,
    slo_s: Annotated[
        float | None, typer.Option(help="SLO for workflows without one (seconds).")
    ] = None,
    predictor: Annotated[
        str,
        typer.Option(
            help="Forecasts for policies: a model file, oracle, constant, shuffled or noisy:SIGMA "
            "(MODEL:noload drops load features, MODEL:point keeps only the median; oracle, "
            "shuffled and noisy:SIGMA with :nocache ignore the replicas' prefix caches)."
        ),
    ] = "oracle",
    slots: Annotated[int, typer.Option(help="Sequences an LLM replica batches.")] = 32,
    startup_s: Annotated[float, typer.Option(help="Replica start-up delay.")] = 60.0,
    level: Annotated[
        float | None,
        typer.Option(
            help="Tail level the tail router minimises "
            + _config_default("router", "level", RouterConfig.level)
            + ".",
            show_default=False,
        ),
    ] = None,
    traces_out: Annotated[
        Path | None, typer.Option(help="Write every simulated call as a trace (JSONL).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run a discrete-event simulation with the scheduler's own routers, queue orders, scalers
    and predictors over emulated GPU replicas (documented in docs/simulator.md)."""
    from swarmx.sched.router import make_router
    from swarmx.sched.scaler import make_scaler
    from swarmx.sim.engine import SimConfig, Simulation, offered_load, summary
    from swarmx.sim.importers import detect_format
    from swarmx.traces import TraceRecord, write_traces

    cfg = load(config)
    policy = policy or cfg.router.policy
    queue = queue or cfg.router.queue
    scaler = scaler or cfg.scaler.policy
    level = cfg.router.level if level is None else level
    if (workload is None) == (trace is None):
        fail("give exactly one of --workload and --trace")
    if rate_scale <= 0 or (load_ is not None and load_ <= 0):
        fail("--rate-scale and --load must be positive")
    try:
        router = make_router(
            policy,
            seed=seed,
            level=level,
            kv_overlap_weight=cfg.router.kv_overlap_weight,
            capacity_price=capacity_price or cfg.router.capacity_price,
            session_value=session_value or cfg.router.session_value,
        )
        scale = make_scaler(scaler, **(cfg.scaler.options if scaler == cfg.scaler.policy else {}))
        agents = trace is not None and detect_format(trace) == "claude-code"
        wfs = _workflows(workload, trace, workflows, limit, slo_s, seed)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if not wfs:
        fail("the workload has no workflows")
    closed = agents or sessions is not None  # no arrival rate: workflows start as others end
    if closed and load_ is not None:
        fail("--load sets arrival rates: a closed loop (--sessions, claude-code) has none")
    if load_ is None and trace is None and not closed:
        load_ = 0.7
    wfs = _on_clock(wfs, agents, load_, rate_scale, replicas, slots)
    sim_cfg = SimConfig(
        replicas=replicas,
        max_replicas=max_replicas,
        gpu=gpu,
        llm_slots=slots,
        startup_s=startup_s,
        slo_s=slo_s,
        seed=seed,
        kv_cache_tokens=kv_cache_tokens,
        sessions=sessions,
        kv_events=kv_events,
    )
    recorded: list[TraceRecord] = []
    try:
        simulation = Simulation(
            sim_cfg,
            wfs,
            router=router,
            order=queue,
            scaler=scale,
            predictor=predictor,
            record=recorded.append if traces_out else None,
        )
    except (ValueError, OSError) as exc:
        fail(f"--predictor: {exc}")
    wall = time.monotonic()
    result = simulation.run()
    wall = time.monotonic() - wall
    if traces_out is not None:
        write_traces(traces_out, recorded)
    data: dict[str, Any] = {
        "policy": router.name,
        "queue": queue,
        "scaler": scale.name,
        "replicas": replicas,
        "gpu": gpu,
        "predictor": predictor,
        "workload": workload or str(trace),
        "load": None if closed else offered_load(wfs, replicas, slots),
        "sessions": sessions,
        **summary(result),
        "wall_s": wall,
        "calls_per_wall_s": result.calls / wall if wall > 0 else None,
    }
    if json_:
        print_json(data)
        return
    for key in ("workflow_latency_s", "call_latency_s", "ttft_s"):
        figures = data.pop(key)
        data[key.removesuffix("_s")] = "  ".join(f"{k} {v:.2f}s" for k, v in figures.items())
    width = max(map(len, data))
    for key, value in data.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        typer.echo(f"{key:<{width}}  {shown}")


def _on_clock(
    wfs: list[SimWorkflow],
    agents: bool,
    load: float | None,
    rate_scale: float,
    replicas: int,
    slots: int,
) -> list[SimWorkflow]:
    """The workflows on the run's clock: in a claude-code replay the agents' think times and
    start offsets over ``rate_scale``; otherwise the arrivals from 0, stretched to ``load`` and
    by ``rate_scale``."""
    from swarmx.sim.engine import offered_load

    if agents:
        return [
            dataclasses.replace(
                w,
                release_s={k: v / rate_scale for k, v in w.release_s.items()},
                think_s={k: v / rate_scale for k, v in w.think_s.items()},
            )
            for w in wfs
        ]
    stretch = 1.0 / rate_scale
    if load is not None:
        stretch *= offered_load(wfs, replicas, slots) / load
    t0 = wfs[0].arrival_s
    return [dataclasses.replace(w, arrival_s=(w.arrival_s - t0) * stretch) for w in wfs]


def _workflows(
    workload: Workload | None,
    trace: Path | None,
    workflows: int,
    limit: int | None,
    slo_s: float | None,
    seed: int,
) -> list[SimWorkflow]:
    from swarmx.sim.generators import generate
    from swarmx.sim.importers import load_trace

    if trace is not None:
        return load_trace(trace, limit=limit, slo_s=slo_s)
    assert workload is not None
    return generate(workload, workflows=workflows, rate_per_s=1.0, seed=seed, slo_s=slo_s)
