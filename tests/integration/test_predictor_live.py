"""The live predictor: forecasts recorded with every call, a model trained offline from the
scheduler's own traces installed live, and still live after a scheduler restart."""

from __future__ import annotations

import json
import signal
import textwrap

import pytest

from tests.integration.conftest import FAST_CONFIG, wait_for
from tests.integration.test_workflows import FAN

pytestmark = pytest.mark.integration


def status(procs, endpoint):
    return json.loads(procs.cli("predictor", "status", "--json", "--scheduler", endpoint).stdout)


def test_forecasts_recorded_trained_installed_and_kept(procs):
    procs.config.write_text(
        FAST_CONFIG
        + textwrap.dedent("""
        [predictor]
        min_calls_to_train = 100000
    """)
    )
    sched, endpoint = procs.scheduler()
    procs.node(endpoint, "alpha")
    procs.node(endpoint, "beta")
    wait_for(lambda: len(procs.nodes(endpoint)) == 2, what="two nodes")
    assert status(procs, endpoint)["kind"] == "fallback"

    wf = procs.tmp / "fan.toml"
    wf.write_text(FAN)
    for i in range(12):
        procs.cli("submit", str(wf), "--wait", "--scheduler", endpoint, "--set", f"topic=t{i}")
    traces = procs.tmp / "traces.jsonl"
    procs.cli("traces", "export", "--out", str(traces), "--scheduler", endpoint)
    rows = [json.loads(line) for line in traces.read_text().splitlines()]
    assert len(rows) == 60
    for r in rows:  # every call carries the forecast made when it was dispatched
        assert r["predictor"] == "fallback"
        assert set(r["pred"]) == {"0.5", "0.9", "0.95", "0.99"}
        assert r["pred"]["0.5"] <= r["pred"]["0.99"]
    llm = [r for r in rows if r["kind"] == "llm"]
    assert all(r["input_kinds"] == ["tool_result"] for r in llm)
    live = status(procs, endpoint)
    assert live["calls_seen"] == 60
    assert set(live["recent_coverage"]) == {"0.5", "0.9", "0.95", "0.99"}

    model = procs.tmp / "model.pt"
    procs.cli("predictor", "train", "--traces", str(traces), "--out", str(model), "--epochs", "5")
    out = procs.cli("predictor", "install", str(model), "--scheduler", endpoint).stdout
    version = out.split()[1]
    assert status(procs, endpoint)["kind"] == "trained"
    assert status(procs, endpoint)["version"] == version

    procs.cli("submit", str(wf), "--wait", "--scheduler", endpoint)
    rows = [
        json.loads(x)
        for x in procs.cli(
            "traces", "export", "--out", "-", "--scheduler", endpoint
        ).stdout.splitlines()
    ]
    assert {r["predictor"] for r in rows[-5:]} == {version}

    sched.send_signal(signal.SIGTERM)
    assert sched.wait(timeout=15) == 0
    procs.scheduler(listen=endpoint)
    after = wait_for(lambda: (s := status(procs, endpoint)) and s, what="the restarted scheduler")
    assert (after["kind"], after["version"]) == ("trained", version)

    bad = procs.cli("predictor", "install", str(traces), "--scheduler", endpoint, check=False)
    assert bad.returncode == 2
    assert "cannot load a predictor" in bad.stderr
