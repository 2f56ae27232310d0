"""Prometheus exposition: snapshots become series, served on a background thread and parsed back
with prometheus-client's own parser; ports that cannot be used are reported on one line."""

from __future__ import annotations

import socket
import urllib.request

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from swarmx.cli.main import app
from swarmx.metrics import MetricsError, MetricsServer, NodeMetrics, SchedulerMetrics, serve
from swarmx.protocol import GpuSample, ReplicaPool
from tests.unit.test_protocol import GPU, TELEMETRY, TOP


def scrape(server: MetricsServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Family -> {sorted labels: value}, through the real HTTP server and parser."""
    with urllib.request.urlopen(server.url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture
def served():
    servers: list[MetricsServer] = []

    def start(registry) -> MetricsServer:
        servers.append(MetricsServer(registry, 0, "127.0.0.1"))  # port 0: any free port
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_node_series_come_from_the_latest_telemetry(served):
    metrics = NodeMetrics("n1")
    server = served(metrics.registry)
    assert scrape(server) == {}  # nothing published yet: no made-up zeros
    half_known = GpuSample(
        1, "NVIDIA A100", "GPU-2", None, None, 2 << 30, 40 << 30, None, None, None, None
    )
    metrics.publish(msgspec.structs.replace(TELEMETRY, gpus=[GPU, half_known]), registered=True)
    m = scrape(server)
    node = (("node", "n1"),)
    assert m["swarmx_node_cpu_utilization_ratio"] == {node: 0.125}
    assert m["swarmx_node_memory_used_bytes"] == {node: 40}
    assert m["swarmx_node_registered"] == {node: 1.0}
    gpu0, gpu1 = (("gpu", "0"), ("node", "n1")), (("gpu", "1"), ("node", "n1"))
    assert m["swarmx_gpu_utilization_ratio"] == {gpu0: 0.5}  # GPU 1 cannot say: left out
    assert m["swarmx_gpu_memory_used_bytes"] == {gpu0: 1 << 30, gpu1: 2 << 30}
    assert m["swarmx_gpu_power_watts"] == {gpu0: 300.5}
    assert m["swarmx_gpu_temperature_celsius"] == {gpu0: 61.0}
    rep = (("model", "llama"), ("node", "n1"), ("replica", "r1"))
    assert m["swarmx_replica_queued_calls"] == {rep: 1}
    assert m["swarmx_replica_inflight_calls"] == {rep: 2}
    assert m["swarmx_replica_calls_total"] == {
        (*rep[:2], ("outcome", "ok"), rep[2]): 3,
        (*rep[:2], ("outcome", "error"), rep[2]): 0,
    }
    metrics.publish(TELEMETRY, registered=False)
    assert scrape(server)["swarmx_node_registered"] == {node: 0.0}


def test_scheduler_series_from_events_and_the_snapshot(served):
    metrics = SchedulerMetrics()
    server = served(metrics.registry)
    metrics.calls.labels("llama", "ok").inc()
    metrics.call_latency.labels("llama").observe(1.7)
    metrics.routes.labels("llama", "n1", "tail").inc(2)
    metrics.publish(TOP)
    m = scrape(server)
    assert m["swarmx_calls_total"] == {(("model", "llama"), ("outcome", "ok")): 1}
    buckets = m["swarmx_call_latency_seconds_bucket"]
    assert buckets[(("le", "1.0"), ("model", "llama"))] == 0
    assert buckets[(("le", "2.5"), ("model", "llama"))] == 1
    assert m["swarmx_route_decisions_total"] == {
        (("model", "llama"), ("node", "n1"), ("policy", "tail")): 2
    }
    assert m["swarmx_nodes"] == {
        (("state", "live"),): 0,
        (("state", "stale"),): 1,
        (("state", "down"),): 0,
    }
    assert m["swarmx_node_cpu_utilization_ratio"] == {(("node", "n1"),): 0.125}  # relayed
    assert m["swarmx_replicas"] == {(("model", "llama"),): 1}
    assert m["swarmx_model_queued_calls"] == {(("model", "llama"),): 3}
    q = (("model", "llama"), ("quantile", "0.5"))
    assert m["swarmx_call_latency_actual_seconds"] == {q: 1.0}
    assert m["swarmx_call_latency_predicted_seconds"] == {q: 1.1}
    assert m["swarmx_call_forecast_coverage_ratio"] == {q: 0.55}
    assert m["swarmx_workflows_running"] == {(): 1}
    assert m["swarmx_slo_attainment_ratio"] == {(): 4 / 5}
    assert m["swarmx_workflow_latency_window_seconds"][(("quantile", "0.99"),)] == 28.0
    assert m["swarmx_predictor_info"] == {(("kind", "trained"), ("version", "v1")): 1}
    assert m["swarmx_predictor_coverage_ratio"] == {(("quantile", "0.9"),): 0.88}
    assert m["swarmx_predictor_swaps_total"] == {
        (("outcome", "installed"),): 1,
        (("outcome", "refused"),): 0,
    }
    assert m["swarmx_scheduler_bad_frames_total"] == {(("reason", "garbage"),): 1}


def test_port_zero_is_off_and_a_busy_port_is_named():
    assert serve(SchedulerMetrics().registry, 0, "127.0.0.1") is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port}: "):
            serve(SchedulerMetrics().registry, port, "127.0.0.1")


def test_a_busy_metrics_port_stops_the_scheduler_with_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(
            app,
            [
                "scheduler",
                "start",
                "--listen",
                "tcp://127.0.0.1:0",
                "--state-dir",
                str(tmp_path),
                "--metrics-port",
                str(port),
            ],
        )
    assert result.exit_code == 1
    assert f"error: cannot serve metrics on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scheduler", "start", "--metrics-port", "70000"], "--metrics-port: must be 0 (off)"),
        (["node", "start", "--metrics-port", "-1"], "--metrics-port: must be 0 (off)"),
        (["up", "--metrics-port", "65535", "--nodes", "2"], "--metrics-port: 65535 + 2 nodes"),
    ],
)
def test_bad_metrics_ports_exit_2_on_one_line(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_metrics_keys_in_the_config(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nmetrics_port = 9101\nmetrics_addr = ""\n')
    result = CliRunner().invoke(app, ["version", "--config", str(cfg)])
    assert result.exit_code == 2
    assert f"{cfg}:3: node.metrics_addr: must be a host name or address" in result.stderr


def test_the_node_reports_its_engines_restarts_and_start_ups(served):
    metrics = NodeMetrics("n1")
    server = served(metrics.registry)
    launched = ReplicaPool("qwen", "openai", "gpu", 8, 1, 4, 2, 0.0, [41.5, 38.25], 3)
    idle = ReplicaPool("lm", "emulated", "emulated:H100", 4, 1, 4, 1)
    metrics.publish(TELEMETRY, registered=True, pools=[launched, idle])
    m = scrape(server)
    qwen = (("backend", "openai"), ("model", "qwen"), ("node", "n1"))
    lm = (("backend", "emulated"), ("model", "lm"), ("node", "n1"))
    assert m["swarmx_engine_restarts_total"] == {qwen: 3, lm: 0}
    assert m["swarmx_engine_warmup_seconds"] == {qwen: 38.25}  # the latest; none measured: none


def test_the_node_counts_the_frames_it_dropped(served):
    metrics = NodeMetrics("n1")
    server = served(metrics.registry)
    metrics.publish(TELEMETRY, registered=True, bad_frames={"schema": 3, "internal": 0})
    assert scrape(server)["swarmx_node_bad_frames_total"] == {
        (("node", "n1"), ("reason", "schema")): 3,
        (("node", "n1"), ("reason", "internal")): 0,
    }
