"""Prometheus endpoints of real daemons, scraped over HTTP and parsed with prometheus-client's
own parser after a real workflow; and the daemons' JSON logs."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmx import __version__
from tests.integration.conftest import FAST_CONFIG, wait_for
from tests.integration.test_top import finished_workflow
from tests.integration.test_up import start_up

pytestmark = pytest.mark.integration

Samples = dict[str, list[tuple[dict[str, str], float]]]


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now (asked of the kernel)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            if base + n > 65535:
                continue
            others = [socket.socket() for _ in range(n - 1)]
            try:
                for i, s in enumerate(others, 1):
                    s.bind(("127.0.0.1", base + i))
                return base
            except OSError:
                continue
            finally:
                for s in others:
                    s.close()
    raise AssertionError(f"no {n} consecutive free ports")


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return next((v for lab, v in samples.get(name, []) if labels.items() <= lab.items()), None)


def test_scheduler_and_node_metrics_after_a_workflow(procs):
    sched_port, node_port = free_ports(1), free_ports(1)
    procs.config.write_text(
        FAST_CONFIG.replace("[scheduler]\n", f"[scheduler]\nmetrics_port = {sched_port}\n").replace(
            "[node]\n", f"[node]\nmetrics_port = {node_port}\n"
        )
    )
    json_logs = {"SWARMX_LOG_FORMAT": "json"}
    sched, endpoint = procs.scheduler(env=json_logs)
    node = procs.node(endpoint, "alpha", env=json_logs)
    wait_for(lambda: procs.nodes(endpoint).get("alpha", {}).get("state") == "live", what="alpha")
    finished_workflow(procs, endpoint)  # a tool, three lm calls fanned out, a tool

    n = wait_for(
        lambda: (
            (m := scrape(node_port))
            and value(m, "swarmx_replica_calls_total", replica="alpha/lm#0", outcome="ok") == 3
            and value(m, "swarmx_replica_calls_total", replica="alpha/tool", outcome="ok") == 2
            and m
        ),
        what="the node's replica counters: three lm calls, two tool runs",
    )
    assert value(n, "swarmx_node_registered", node="alpha") == 1
    assert value(n, "swarmx_node_memory_total_bytes", node="alpha") == (
        psutil.virtual_memory().total
    )
    assert 0 <= value(n, "swarmx_node_cpu_utilization_ratio", node="alpha") <= 1
    assert value(n, "swarmx_replica_inflight_calls", replica="alpha/lm#0", model="lm") == 0
    assert "swarmx_gpu_utilization_ratio" not in n  # no GPU here: no series, not zeros

    s = wait_for(
        lambda: (m := scrape(sched_port)) and "swarmx_slo_attainment_ratio" in m and m,
        what="the scheduler's published snapshot",
    )
    assert value(s, "swarmx_calls_total", model="lm", outcome="ok") == 3
    assert value(s, "swarmx_calls_total", model="tool", outcome="ok") == 2
    assert value(s, "swarmx_call_latency_seconds_count", model="lm") == 3
    assert value(s, "swarmx_call_latency_seconds_bucket", model="lm", le="+Inf") == 3
    routes = [v for _, v in s["swarmx_route_decisions_total"]]
    assert sum(routes) == 5
    assert value(s, "swarmx_route_decisions_total", model="lm", node="alpha", policy="tail") == 3
    assert value(s, "swarmx_workflows_finished_total", state="succeeded") == 1
    assert value(s, "swarmx_workflow_slo_total", outcome="met") == 1
    assert value(s, "swarmx_workflow_latency_seconds_count") == 1
    assert value(s, "swarmx_slo_attainment_ratio") == 1.0
    assert value(s, "swarmx_nodes", state="live") == 1
    assert value(s, "swarmx_replicas", model="lm") == 1
    assert value(s, "swarmx_node_memory_total_bytes", node="alpha") == (
        psutil.virtual_memory().total
    )  # relayed from the node's telemetry
    for q in ("0.5", "0.95"):
        actual = value(s, "swarmx_call_latency_actual_seconds", model="lm", quantile=q)
        predicted = value(s, "swarmx_call_latency_predicted_seconds", model="lm", quantile=q)
        assert actual is not None and actual > 0
        assert predicted is not None and predicted > 0
    assert value(s, "swarmx_predictor_info", kind="fallback") == 1
    assert value(s, "swarmx_predictor_observed_calls_total") == 5

    daemons = {
        "alpha": (node, node_port, "node agent alpha (0"),
        "scheduler": (sched, sched_port, f"scheduler {__version__} listening on {endpoint}"),
    }
    for name, (proc, port, hello) in daemons.items():
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        records = [json.loads(line) for line in procs.log(name).splitlines()]
        assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
        assert any(r["msg"].startswith(hello) for r in records)
        url = f"http://127.0.0.1:{port}/metrics"
        served = [r for r in records if r["msg"].startswith("metrics on")]
        assert [(r["msg"], r["metrics_url"]) for r in served] == [(f"metrics on {url}", url)]
        with pytest.raises(urllib.error.URLError):  # the server stopped with its daemon
            scrape(port)


def test_up_serves_metrics_for_the_scheduler_and_each_node(procs):
    base = free_ports(3)
    procs.config.write_text(
        FAST_CONFIG.replace("[scheduler]\n", f"[scheduler]\nmetrics_port = {base}\n")
    )
    up, _, _ = start_up(procs, nodes=2)
    wait_for(
        lambda: f"metrics: http://127.0.0.1:{base}/metrics (scheduler)" in procs.log("up"),
        what="the metrics addresses printed",
    )
    # the scheduler's snapshot is rebuilt every second, the agents' every telemetry interval
    wait_for(
        lambda: value(scrape(base), "swarmx_nodes", state="live") == 2,
        what="two live nodes in the scheduler's series",
    )
    for i in (1, 2):
        n = wait_for(
            lambda i=i: (
                (m := scrape(base + i))
                and value(m, "swarmx_node_registered", node=f"node-{i}") == 1
                and m
            ),
            what=f"node-{i}'s series",
        )
        assert {lab["node"] for lab, _ in n["swarmx_node_cpu_utilization_ratio"]} == {f"node-{i}"}
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=30) == 0
