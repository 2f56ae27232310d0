"""Every command that reads something prints one JSON document with ``--json``; a new command
must say here which kind it is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import typer.main
from typer.testing import CliRunner

from swarmx import __version__
from swarmx.cli.main import app

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
