import pytest

from swarmx.config import (
    DEFAULT_SCHEDULER,
    Config,
    ConfigError,
    check_address,
    load_config,
    override,
)
from swarmx.schema import SchemaError


def write(tmp_path, text):
    p = tmp_path / "swarmx.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.scheduler.listen == DEFAULT_SCHEDULER
    assert (cfg.scheduler.stale_after_missed, cfg.scheduler.down_after_missed) == (3, 10)
    assert cfg.node.telemetry_interval_s == 1.0


def test_full_file(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            """
[scheduler]
listen = "tcp://0.0.0.0:7700"
state_dir = "/var/lib/swarmx"
stale_after_missed = 2
down_after_missed = 5

[node]
name = "gpu-7"
scheduler = "tcp://10.0.0.5:7700"
telemetry_interval_s = 2
gpus = "off"
labels = { zone = "eu-1" }

[client]
scheduler = "tcp://sched.example:7700"

[log]
level = "debug"
""",
        )
    )
    assert cfg.scheduler.listen == "tcp://0.0.0.0:7700"
    assert cfg.scheduler.down_after_missed == 5
    assert cfg.node.name == "gpu-7"
    assert cfg.node.telemetry_interval_s == 2.0
    assert cfg.node.labels == {"zone": "eu-1"}
    assert cfg.client.scheduler == "tcp://sched.example:7700"
    assert cfg.log.level == "debug"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[scheduler]\nlisten = "tcp://127.0.0.1:7700"\nlistne = 1\n',
            r"swarmx.toml:3: scheduler.listne: unknown key",
        ),
        ('[schedulr]\nlisten = "x"\n', r"swarmx.toml:1: schedulr: unknown key"),
        (
            '[node]\n\ntelemetry_interval_s = "fast"\n',
            r"swarmx.toml:3: node.telemetry_interval_s: expected a number, got str",
        ),
        (
            '[scheduler]\nlisten = "http://localhost:80"\n',
            r"swarmx.toml:2: scheduler.listen: expected tcp://HOST:PORT",
        ),
        ('[node]\nscheduler = "tcp://host:99999"\n', r"node.scheduler: port 99999 out of range"),
        ('[node]\nscheduler = "tcp://*:7700"\n', r"node.scheduler: '\*' is only valid for"),
        ("[node]\ntelemetry_interval_s = 0\n", r"node.telemetry_interval_s: must be > 0"),
        ('[node]\ngpus = "maybe"\n', r"node.gpus: must be one of 'auto', 'off'"),
        ('[node]\nname = "bad name!"\n', r"node.name: must be 1-63"),
        ("[scheduler]\ndown_after_missed = 2\n", r"scheduler.down_after_missed: must be greater"),
        ('[log]\nlevel = "loud"\n', r"log.level: must be one of"),
        ("[scheduler\n", r"swarmx.toml: invalid TOML"),
        ("scheduler = 3\n", r"swarmx.toml:1: scheduler: expected a table, got int"),
    ],
)
def test_errors_are_one_line_and_name_the_place(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_override_validates_and_names_the_flag():
    cfg = Config()
    assert override(cfg.scheduler, listen=None) is cfg.scheduler
    assert override(cfg.scheduler, listen="tcp://127.0.0.1:0").listen == "tcp://127.0.0.1:0"
    with pytest.raises(ConfigError, match=r"^--listen: expected tcp://"):
        override(cfg.scheduler, listen="localhost:7700")
    with pytest.raises(ConfigError, match=r"^--state-dir|^--name: must be"):
        override(cfg.node, name="")


@pytest.mark.parametrize(
    "url",
    [
        "tcp://127.0.0.1:7700",
        "tcp://sched.example.com:1",
        "tcp://[::1]:7700",
        "ipc:///run/swarmx.sock",
    ],
)
def test_good_addresses(url):
    assert check_address(url) == url


@pytest.mark.parametrize("url", ["tcp://*:7700", "tcp://0.0.0.0:0", "tcp://127.0.0.1:0"])
def test_bind_only_addresses(url):
    assert check_address(url, bind=True) == url
    with pytest.raises(SchemaError):
        check_address(url, bind=False)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "tcp://",
        "tcp://host",
        "tcp://:7700",
        "udp://h:1",
        "tcp://h:port",
        "ipc://",
        "tcp://h:1/path",
    ],
)
def test_bad_addresses(url):
    with pytest.raises(SchemaError):
        check_address(url, bind=True)
