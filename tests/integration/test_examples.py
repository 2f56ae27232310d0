"""The README's promise: `swarmx up --nodes 2` with the embedded default (real torch models on the
CPU) runs every example workflow to success, well within a minute."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from swarmx.daemon.scheduler import read_state_file
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_examples_succeed_on_a_local_cluster(procs):
    procs.config.write_text("[client]\ntimeout_s = 5.0\n")  # no replicas: the embedded default
    state = procs.tmp / "up-state"
    up = procs.spawn(
        "up", "--nodes", "2", "--listen", "tcp://127.0.0.1:0", "--state-dir", str(state), log="up"
    )
    endpoint = wait_for(
        lambda: (s := read_state_file(state)) and s["endpoint"], what="scheduler endpoint"
    )
    wait_for(lambda: "local cluster up" in procs.log("up"), timeout_s=60, what="cluster ready")
    nodes = procs.nodes(endpoint)
    models = {r["model"] for n in nodes.values() for r in n["hello"]["replicas"]}
    assert models == {"tiny-lm", "tiny-vision", "tool"}
    for name in ("codegen", "research", "multimodal"):
        out = procs.cli(
            "submit",
            str(EXAMPLES / f"{name}.toml"),
            "--wait",
            "--json",
            "--scheduler",
            endpoint,
            check=False,
        )
        assert out.returncode == 0, out.stderr + out.stdout
        view = json.loads(out.stdout)
        assert view["state"] == "succeeded", view
        assert view["latency_s"] < view["slo_s"] == 60
        kinds = {s["replica"].split("/")[1].split("#")[0] for s in view["steps"]}
        assert kinds >= {"tiny-lm"}
        result = procs.cli("result", view["id"], "--scheduler", endpoint)
        assert result.stdout.strip() != ""
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=30) == 0
