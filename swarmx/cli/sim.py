"""`swarmx sim`: the scheduler's policies at cluster scale, on a simulated clock."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from swarmx.cli.common import ConfigOpt, JsonOpt, fail, load, print_json

if TYPE_CHECKING:
    from swarmx.sim.workload import SimWorkflow


def sim(
    workload: Annotated[
        str | None,
        typer.Option(help="Built-in workload: codegen, research, multimodal or mixed."),
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option(
            help="Replay a trace: SwarmX trace JSONL, an Azure LLM CSV or a Mooncake JSONL.",
            dir_okay=False,
        ),
    ] = None,
    workflows: Annotated[int, typer.Option(help="Workflows to generate (built-ins).")] = 2000,
    limit: Annotated[int | None, typer.Option(help="Read at most this many trace rows.")] = None,
    policy: Annotated[str, typer.Option(help="Router.")] = "tail",
    queue: Annotated[str, typer.Option(help="Queue order: fifo or slack.")] = "fifo",
    scaler: Annotated[str, typer.Option(help="Scaler: none, threshold or tail.")] = "none",
    replicas: Annotated[int, typer.Option(help="GPU replicas at the start.")] = 16,
    max_replicas: Annotated[
        int | None, typer.Option(help="GPU replica cap for scalers [default: 4x --replicas].")
    ] = None,
    gpu: Annotated[str, typer.Option(help="H100, A100, L40S or mixed.")] = "A100",
    load_: Annotated[
        float | None,
        typer.Option(
            "--load",
            help="Offered load as a fraction of GPU capacity; arrivals are stretched to it "
            "[default: 0.7 for built-ins, as recorded for traces].",
        ),
    ] = None,
    rate_scale: Annotated[
        float, typer.Option(help="Multiply the arrival rate (after --load).")
    ] = 1.0,
    slo_s: Annotated[
        float | None, typer.Option(help="SLO for workflows without one (seconds).")
    ] = None,
    predictor: Annotated[
        str,
        typer.Option(
            help="Forecasts for policies: a model file, oracle, constant, shuffled or noisy:SIGMA "
            "(MODEL:noload drops load features, MODEL:point keeps only the median)."
        ),
    ] = "oracle",
    slots: Annotated[int, typer.Option(help="Sequences an LLM replica batches.")] = 32,
    startup_s: Annotated[float, typer.Option(help="Replica start-up delay.")] = 60.0,
    level: Annotated[float, typer.Option(help="Tail level the tail router minimises.")] = 0.95,
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
    from swarmx.traces import TraceRecord, write_traces

    load(config)
    if (workload is None) == (trace is None):
        fail("give exactly one of --workload and --trace")
    if queue not in ("fifo", "slack"):
        fail(f"--queue: expected fifo or slack, got {queue!r}")
    if gpu != "mixed" and gpu not in ("H100", "A100", "L40S"):
        fail(f"--gpu: expected H100, A100, L40S or mixed, got {gpu!r}")
    if rate_scale <= 0 or (load_ is not None and load_ <= 0):
        fail("--rate-scale and --load must be positive")
    try:
        router = make_router(policy, seed=seed, level=level)
        scale = make_scaler(scaler)
        wfs = _workflows(workload, trace, workflows, limit, slo_s, seed)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if not wfs:
        fail("the workload has no workflows")
    if load_ is None and trace is None:
        load_ = 0.7
    stretch = 1.0 / rate_scale
    if load_ is not None:
        stretch *= offered_load(wfs, replicas, slots) / load_
    t0 = wfs[0].arrival_s
    wfs = [dataclasses.replace(w, arrival_s=(w.arrival_s - t0) * stretch) for w in wfs]
    cfg = SimConfig(
        replicas=replicas,
        max_replicas=max_replicas,
        gpu=gpu,
        llm_slots=slots,
        startup_s=startup_s,
        slo_s=slo_s,
        seed=seed,
    )
    recorded: list[TraceRecord] = []
    try:
        simulation = Simulation(
            cfg,
            wfs,
            router=router,
            order="slack" if queue == "slack" else "fifo",
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
        "load": offered_load(wfs, replicas, slots),
        **summary(result),
        "wall_s": wall,
        "calls_per_wall_s": result.calls / wall if wall > 0 else None,
    }
    if json_:
        print_json(data)
        return
    for key in ("workflow_latency_s", "call_latency_s"):
        figures = data.pop(key)
        data[key.removesuffix("_s")] = "  ".join(f"{k} {v:.2f}s" for k, v in figures.items())
    width = max(map(len, data))
    for key, value in data.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        typer.echo(f"{key:<{width}}  {shown}")


def _workflows(
    workload: str | None,
    trace: Path | None,
    workflows: int,
    limit: int | None,
    slo_s: float | None,
    seed: int,
) -> list[SimWorkflow]:
    from swarmx.sim.workloads import generate, load_trace

    if trace is not None:
        return load_trace(trace, limit=limit, slo_s=slo_s)
    assert workload is not None
    return generate(workload, workflows=workflows, rate_per_s=1.0, seed=seed, slo_s=slo_s)
