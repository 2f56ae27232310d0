import json
import socket
from pathlib import Path

import msgspec
import pytest
from rich.console import Console
from typer.testing import CliRunner

from swarmx import __version__
from swarmx.cli.main import app
from swarmx.cli.render import nodes_table
from swarmx.config import load_config
from swarmx.protocol import ReplicaInfo, ReplicaPool
from tests.unit.test_protocol import SAMPLES

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[3]


def run(*args, env=None):
    return runner.invoke(app, list(args), env=env)


def test_version():
    result = run("version")
    assert result.exit_code == 0
    assert result.stdout.strip() == __version__


def test_bad_config_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[client]\nscheduler = "tcp://127.0.0.1:7700"\ntimeout = 3\n')
    for args in (["nodes"], ["node", "start"], ["scheduler", "start"], ["up"], ["version"]):
        result = run(*args, "--config", str(cfg))
        assert result.exit_code == 2, args
        lines = result.stderr.strip().splitlines()
        assert lines == [
            f"error: {cfg}:3: client.timeout: unknown key (known: scheduler, timeout_s)"
        ], args


def test_config_from_environment(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node]\nheartbeat_interval_s = -1\n")
    result = run("node", "start", env={"SWARMX_CONFIG": str(cfg)})
    assert result.exit_code == 2
    assert "node.heartbeat_interval_s: must be > 0" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scheduler", "start", "--listen", "localhost:7700"], "--listen: expected tcp://"),
        (["node", "start", "--scheduler", "tcp://*:1"], "--scheduler: '*' is only valid"),
        (["node", "start", "--name", "a b"], "--name: must be 1-63"),
        (["nodes", "--scheduler", "tcp://h"], "--scheduler: expected tcp://HOST:PORT"),
        (["up", "--listen", "tcp://127.0.0.1:99999"], "--listen: port 99999 out of range"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_unreachable_scheduler_exits_1_quickly(tmp_path):
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text("[client]\ntimeout_s = 0.3\n")
    result = run("nodes", "--config", str(cfg), "--scheduler", f"tcp://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert f"no scheduler answered at tcp://127.0.0.1:{port} within 0.3 s" in result.stderr


def test_scheduler_reports_a_busy_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run(
            "scheduler",
            "start",
            "--listen",
            f"tcp://127.0.0.1:{port}",
            "--state-dir",
            str(tmp_path),
        )
    assert result.exit_code == 1
    assert f"cannot listen on tcp://127.0.0.1:{port}: Address already in use" in result.stderr


def test_nodes_table_renders_on_a_small_terminal():
    reply = SAMPLES[-1]
    console = Console(width=80, record=True, color_system=None)
    console.print(nodes_table(reply))
    text = console.export_text()
    assert "n1" in text
    assert "stale" in text
    assert "12%/2c" in text  # CPU from the latest telemetry, of 2 cores
    assert "0 H100 50% 1.0/80G 300W 61C" in text  # as `swarmx top` shows it
    assert "4.0s ago" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_example_config_is_valid():
    cfg = load_config(ROOT / "systemd" / "swarmx.toml.example")
    assert cfg.scheduler.listen == "tcp://0.0.0.0:7700"
    assert cfg.node.labels == {"rack": "r12"}


@pytest.mark.parametrize("listen", ["tcp://0.0.0.0:0", "tcp://*:0", "tcp://10.1.2.3:7700"])
def test_a_keyless_scheduler_refuses_to_listen_off_loopback(tmp_path, listen):
    result = run("scheduler", "start", "--listen", listen, "--state-dir", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: refusing to listen on {listen} without keys: make them with `swarmx keys "
        "generate` and set [security] (docs/security.md), or pass --insecure"
    ]
    assert not any(tmp_path.iterdir())  # refused before touching the state directory


def test_keys_generate_writes_a_private_secret(tmp_path):
    result = run("keys", "generate", "--out", str(tmp_path / "k"), "--name", "node-7", "--json")
    assert result.exit_code == 0, result.stderr
    paths = json.loads(result.stdout)
    assert Path(paths["secret"]).stat().st_mode & 0o777 == 0o600
    assert Path(paths["public"]).read_text().count("public-key") == 1
    assert "secret-key" not in Path(paths["public"]).read_text()
    again = run("keys", "generate", "--out", str(tmp_path / "k"), "--name", "node-7")
    assert again.exit_code == 2 and "exists" in again.stderr
    bad = run("keys", "generate", "--out", str(tmp_path / "k"), "--name", "../x")
    assert bad.exit_code == 2 and "--name" in bad.stderr


def test_an_idempotency_key_too_long_for_the_wire_exits_2_before_any_network(tmp_path):
    wf = tmp_path / "wf.toml"
    wf.write_text('name = "x"\n[[steps]]\nid = "a"\nkind = "tool"\ncommand = ["true"]\n')
    result = run("submit", str(wf), "--idempotency-key", "k" * 257)
    assert result.exit_code == 2
    assert "--idempotency-key: 1 to 256 characters, got 257" in result.stderr


def test_nodes_table_says_what_each_node_serves_and_its_engines_restarts():
    reply = SAMPLES[-1]
    node = reply.nodes[0]
    infos = [
        ReplicaInfo("n1/qwen#0", "qwen", "openai", "cuda:0", 8),
        ReplicaInfo("n1/qwen#1", "qwen", "openai", "cuda:1", 8),
        ReplicaInfo("n1/qwen#2", "qwen", "openai", "cuda:2", 8, draining=True),
        ReplicaInfo("n1/tool", "tool", "tool", "cpu", 2),
    ]
    pools = [ReplicaPool("qwen", "openai", "gpu", 8, 1, 4, 2, 0.0, [40.0], 1)]
    hello = msgspec.structs.replace(node.hello, replicas=infos, pools=pools)
    reply = msgspec.structs.replace(reply, nodes=[msgspec.structs.replace(node, hello=hello)])
    console = Console(width=80, record=True, color_system=None)
    console.print(nodes_table(reply))
    assert "replicas  n1: qwen 2 (1 restart)" in console.export_text()
