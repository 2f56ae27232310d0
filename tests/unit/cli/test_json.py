"""Every command that reads something prints one JSON document with ``--json``; a new command
must say here which kind it is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec
import typer.main
from typer.testing import CliRunner

import swarmx.cli.nodes
import swarmx.cli.top
from swarmx import __version__
from swarmx.cli.main import app
from swarmx.protocol import ModelStats, NodesReply, NodeView, ReplicaPool
from tests.unit.test_protocol import HELLO, TELEMETRY, TOP

WITHOUT_JSON = {
    "up": "runs a local cluster in the foreground",
    "scheduler start": "a daemon",
    "node start": "a daemon",
    "gateway": "a daemon",
    "cancel": "an action, answered in one line",
    "traces export": "writes JSONL to a file or stdout",
    "traces import": "writes JSONL",
    "traces split": "writes JSONL",
    "predictor predict": "prints JSONL, one forecast a line",
    "predictor install": "an action, answered in one line",
}


def commands(cmd: Any, ctx: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            yield from commands(cmd.get_command(ctx, name), ctx, f"{prefix} {name}".strip())
    else:
        yield prefix, cmd


def test_every_read_command_takes_json():
    root = typer.main.get_command(app)
    ctx = typer.Context(root)
    found = {name: any("--json" in p.opts for p in cmd.params) for name, cmd in commands(root, ctx)}
    assert {name for name, has in found.items() if not has} == set(WITHOUT_JSON)
    assert {"nodes", "status", "result", "top", "version", "predictor status"} <= {
        name for name, has in found.items() if has
    }


def test_version_json_is_one_document():
    result = CliRunner().invoke(app, ["version", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"version": __version__}


def test_the_warm_ups_reach_the_json_per_node_pool_and_pooled_per_model(tmp_path, monkeypatch):
    """``nodes --json``: each node's pools with the start-ups it measured; ``top --json``: per
    model, their p90 over the live nodes (the scaler's lead time), null until measured."""
    pool = ReplicaPool("llama", "torch", "cpu", 4, 1, 4, 2, 30.0, warmup_s=[41.5, 38.0, 44.0])
    hello = msgspec.structs.replace(HELLO, pools=[pool])
    nodes = [NodeView("n1", "live", 1.0, 0.5, 0.5, 9, hello, TELEMETRY)]
    models = [
        ModelStats("llama", 1, 0, 20, {}, {}, {}, warmup_p90_s=44.0),
        ModelStats("qwen", 0, 0, 0, {}, {}, {}),
    ]
    monkeypatch.setattr(swarmx.cli.nodes, "ask", lambda *_: NodesReply(TOP.scheduler, nodes))
    monkeypatch.setattr(
        swarmx.cli.top, "fetch", lambda *_: msgspec.structs.replace(TOP, models=models)
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text("[client]\ntimeout_s = 0.3\n")
    listed = CliRunner().invoke(app, ["nodes", "--json", "--config", str(cfg)])
    top = CliRunner().invoke(app, ["top", "--json", "--config", str(cfg)])
    assert listed.exit_code == top.exit_code == 0, (listed.output, top.output)
    [shown] = json.loads(listed.stdout)["nodes"][0]["hello"]["pools"]
    assert (shown["startup_delay_s"], shown["warmup_s"]) == (30.0, [41.5, 38.0, 44.0])
    by_model = {m["model"]: m["warmup_p90_s"] for m in json.loads(top.stdout)["models"]}
    assert by_model == {"llama": 44.0, "qwen": None}
