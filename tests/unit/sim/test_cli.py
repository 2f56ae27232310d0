"""`swarmx sim` from the command line: the JSON the issue names, traces out, clear errors."""

import json
from typing import get_args

import pytest
from typer.testing import CliRunner

from swarmx.backends.emulated import GPUS
from swarmx.cli.main import app
from swarmx.cli.sim import Gpu
from swarmx.traces import read_traces
from tests.unit.sim.tracefiles import AgentCall, conversations, write_claude_code, write_mooncake

runner = CliRunner()
KEYS = {
    "policy",
    "scaler",
    "replicas",
    "calls",
    "workflows",
    "workflow_latency_s",
    "call_latency_s",
    "slo_attainment",
    "goodput_wps",
    "replica_seconds",
}


def sim(*args: str):
    return runner.invoke(app, ["sim", *args])


def test_json_has_every_named_key_and_traces_can_be_written(tmp_path):
    out = tmp_path / "sim.jsonl"
    result = sim(
        "--workload",
        "research",
        "--workflows",
        "30",
        "--replicas",
        "4",
        "--gpu",
        "mixed",
        "--policy",
        "tail",
        "--queue",
        "slack",
        "--scaler",
        "threshold",
        "--traces-out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data.keys() >= KEYS
    assert data["policy"] == "tail" and data["scaler"] == "threshold" and data["workflows"] == 30
    for key in ("workflow_latency_s", "call_latency_s"):
        assert set(data[key]) == {"p50", "p95", "p99", "mean"}
        assert 0 < data[key]["p50"] <= data[key]["p99"]
    records = read_traces([out])
    assert len(records) == data["calls"]
    assert {r.workflow_name for r in records} == {"research"}
    assert all(r.latency_s > 0 for r in records)


def test_a_trace_file_replays(tmp_path):
    trace = tmp_path / "azure.csv"
    rows = [f"2023-11-16 18:15:{i:02d}.0000000,{300 + 10 * i},{20 + i}" for i in range(40)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    result = sim("--trace", str(trace), "--slo-s", "30", "--replicas", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["calls"] == data["workflows"] == 40
    assert data["slo_attainment"] is not None


def test_bad_choices_are_usage_errors():
    for args, message in (
        (["--workload", "research", "--queue", "lifo"], "--queue"),
        (["--workload", "research", "--policy", "fastest"], "fastest"),
        (["--workload", "poetry"], "poetry"),
        (["--workload", "research", "--gpu", "V100"], "V100"),
    ):
        result = sim(*args)
        assert result.exit_code == 2, args
        text = " ".join(result.stderr.replace("│", " ").split())  # unwrapped from Rich's box
        assert message in text and "is not one of" in text, (args, result.stderr)


def test_errors_of_the_command_are_one_line():
    for args, message in (
        ([], "exactly one of --workload and --trace"),
        (["--workload", "research", "--load", "0"], "--load must be positive"),
    ):
        result = sim(*args)
        assert result.exit_code == 2, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)


def test_policies_default_to_the_config(tmp_path):
    small = ["--workload", "research", "--workflows", "6", "--replicas", "2", "--json"]
    data = json.loads(sim(*small).stdout)
    assert (data["policy"], data["queue"], data["scaler"]) == ("tail", "slack", "tail")
    config = tmp_path / "swarmx.toml"
    config.write_text('[router]\npolicy = "least_outstanding"\nqueue = "fifo"\n')
    data = json.loads(sim(*small, "--config", str(config)).stdout)
    assert (data["policy"], data["queue"]) == ("least_outstanding", "fifo")
    data = json.loads(sim(*small, "--config", str(config), "--queue", "slack").stdout)
    assert data["queue"] == "slack"


def test_gpu_choices_are_the_emulated_gpus():
    assert get_args(Gpu) == (*GPUS, "mixed")


PREFIX_KEYS = {"ttft_s", "call_latency_s", "prefix_hit_rate", "sessions_completed"}


def test_a_mooncake_trace_replays_with_its_hash_ids(tmp_path):
    trace = write_mooncake(tmp_path / "mc.jsonl", conversations(3, turns=8))

    def run(router: str) -> dict:
        result = sim("--trace", str(trace), "--replicas", "4", "--router", router, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    affinity, rotation = run("prefix_affinity"), run("round_robin")
    assert affinity.keys() >= PREFIX_KEYS
    assert affinity["policy"] == "prefix_affinity" and affinity["calls"] == 24
    for key in ("ttft_s", "call_latency_s"):
        assert {"p50", "p95", "p99"} <= set(affinity[key])
        assert 0 < affinity[key]["p50"] <= affinity[key]["p99"]
    assert affinity["ttft_s"]["p99"] < affinity["call_latency_s"]["p99"]
    # each turn holds its conversation's previous turns: only affinity keeps them together
    assert 0.6 < affinity["prefix_hit_rate"] < 1
    assert affinity["prefix_hit_rate"] > rotation["prefix_hit_rate"] + 0.2
    assert affinity["ttft_s"]["mean"] < rotation["ttft_s"]["mean"]
    assert run("kv_cost")["prefix_hit_rate"] > rotation["prefix_hit_rate"]


def test_the_floor_bounds_every_router_from_below_and_is_the_same_for_each(tmp_path):
    """The floor: each call alone on an idle replica holding every block sent before it."""
    trace = write_mooncake(tmp_path / "mc.jsonl", conversations(4, turns=6))
    floors = []
    for router in ("round_robin", "least_outstanding", "prefix_affinity", "kv_cost"):
        result = sim("--trace", str(trace), "--replicas", "3", "--router", router, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        floor = (data["ttft_floor_s"], data["call_latency_floor_s"])
        for got, least in zip((data["ttft_s"], data["call_latency_s"]), floor, strict=True):
            assert all(0 < least[q] <= got[q] + 1e-9 for q in ("p50", "p95", "p99", "mean"))
        floors.append(floor)
        if router == "round_robin":
            rotated = data["ttft_s"]
    assert all(f == floors[0] for f in floors)
    # each turn adds one block to what its conversation sent before: the floor prefills just
    # that block, every call alike, where a rotation misses blocks it sent elsewhere
    ttft = floors[0][0]
    assert ttft["p50"] == pytest.approx(ttft["p99"])
    assert rotated["p99"] > 2 * ttft["p99"]


def test_the_floor_caches_no_more_than_a_replica_holds(tmp_path):
    """A prompt longer than a replica's KV memory is prefilled in part on any replica: the floor
    says so, and still bounds the routers."""
    trace = write_mooncake(tmp_path / "mc.jsonl", conversations(4, turns=6))

    def run(*extra: str) -> dict:
        args = ["--trace", str(trace), "--replicas", "3", "--router", "prefix_affinity"]
        result = sim(*args, *extra, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    roomy, tight = run(), run("--kv-cache-tokens", "1024")  # two 512-token blocks
    assert tight["ttft_floor_s"]["p99"] > 2 * roomy["ttft_floor_s"]["p99"]
    for key in ("ttft", "call_latency"):
        least, got = tight[f"{key}_floor_s"], tight[f"{key}_s"]
        assert all(least[q] <= got[q] + 1e-9 for q in ("p50", "p95", "p99", "mean"))


def test_claude_code_sessions_replay_in_closed_loop(tmp_path):
    rows = [
        AgentCall(f"t{t}", "parent", 0.0, k, 2.0 if k else 0.0, 20 + 10 * k, 20 + 10 * k - 10)
        for t in range(4)
        for k in range(3)
    ]
    trace = write_claude_code(tmp_path / "requests.csv", rows)
    args = [
        "--trace",
        str(trace),
        "--replicas",
        "2",
        "--sessions",
        "2",
        "--scaler",
        "none",
        "--json",
    ]
    result = sim(*args, "--router", "prefix_affinity", "--kv-cache-tokens", "100000")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data.keys() >= PREFIX_KEYS
    assert (data["sessions_completed"], data["calls"], data["sessions"]) == (4, 12, 2)
    assert data["load"] is None
    assert data["prefix_hit_rate"] > 0.5
    quick = json.loads(sim(*args, "--rate-scale", "4").stdout)  # think times over 4
    assert quick["duration_s"] < data["duration_s"] - 4.0  # two waves of 2 x 1.5 s less think
    result = sim(*args, "--load", "0.5")
    assert result.exit_code == 2 and "closed loop" in result.stderr


def test_tail_with_and_without_the_cache(tmp_path):
    trace = write_mooncake(tmp_path / "mc.jsonl", conversations(3, turns=6))
    rates = []
    for predictor in ("oracle", "oracle:nocache"):
        result = sim(
            *("--trace", str(trace), "--replicas", "4", "--router", "tail"),
            *("--predictor", predictor, "--json"),
        )
        assert result.exit_code == 0, result.output
        rates.append(json.loads(result.stdout)["prefix_hit_rate"])
    assert rates[0] > rates[1]
    priced = sim(
        *("--trace", str(trace), "--replicas", "4", "--router", "tail"),
        *("--predictor", "oracle", "--capacity-price", "--json"),
    )
    assert priced.exit_code == 0, priced.output
    assert json.loads(priced.stdout)["prefix_hit_rate"] >= rates[1]
    valued = sim(
        *("--trace", str(trace), "--replicas", "4", "--router", "tail", "--session-value"),
        *("--kv-cache-tokens", "2048", "--predictor", "oracle", "--json"),
    )
    assert valued.exit_code == 0, valued.output
    assert json.loads(valued.stdout)["prefix_hit_rate"] >= rates[1]
