import pytest

from swarmx.config import (
    DEFAULT_SCHEDULER,
    Config,
    ConfigError,
    ReplicaConfig,
    check_address,
    load_config,
    override,
)
from swarmx.sched.scaler import TailOptions, ThresholdOptions
from swarmx.schema import SchemaError


def write(tmp_path, text):
    p = tmp_path / "swarmx.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.scheduler.listen == DEFAULT_SCHEDULER
    assert (cfg.scheduler.stale_after_missed, cfg.scheduler.down_after_missed) == (2, 3)
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
        ('[router]\npolicy = "fastest"\n', r"swarmx.toml:2: router.policy: must be one of"),
        ('[router]\nqueue = "lifo"\n', r"swarmx.toml:2: router.queue: must be one of 'fifo'"),
        ("[router]\n\nlevel = 1.5\n", r"swarmx.toml:3: router.level: must be in \(0.5, 1\)"),
        ("[router]\nreplica_queue = -1\n", r"swarmx.toml:2: router.replica_queue: must be >= 0"),
        ("[router]\npolcy = 1\n", r"swarmx.toml:2: router.polcy: unknown key"),
        ('[scaler]\npolicy = "magic"\n', r"swarmx.toml:2: scaler.policy: must be one of 'none'"),
        ("[scaler]\ninterval_s = 0\n", r"swarmx.toml:2: scaler.interval_s: must be > 0"),
        (
            "[scaler]\nmin_replicas = { lm = -1 }\n",
            r"swarmx.toml:2: scaler.min_replicas.lm: must be >= 0",
        ),
        (
            "[scaler]\nmin_replicas = { lm = 3 }\nmax_replicas = { lm = 2 }\n",
            r"swarmx.toml:3: scaler.max_replicas.lm: must be >= 1 and >= min_replicas \(3\)",
        ),
        (
            "[scaler]\nmax_replicas = { lm = 0 }\n",
            r"swarmx.toml:2: scaler.max_replicas.lm: must be >= 1",
        ),
        (
            '[scaler]\nmin_replicas = { lm = "two" }\n',
            r"swarmx.toml:2: scaler.min_replicas.lm: expected an integer, got str",
        ),
        (
            '[[node.replicas]]\nmodel = "lm"\nbackend = "emulated"\ncount = 2\nmax_count = 1\n',
            r"swarmx.toml:5: node.replicas\[0\].max_count: must be >= count \(2\), got 1",
        ),
        (
            '[[node.replicas]]\nmodel = "lm"\nbackend = "openai"\nurl = "http://h/v1"\n'
            "max_count = 2\n",
            r"node.replicas\[0\].max_count: openai replicas without `launch` cannot be started",
        ),
        (
            '[scaler]\npolicy = "threshold"\noptions = { target = 0.5, tolerence = 0.1 }\n',
            r"swarmx.toml:3: scaler.options.tolerence: not an option of the 'threshold' scaler",
        ),
        (
            '[scaler]\npolicy = "tail"\n\noptions = { level = 2.0 }\n',
            r"swarmx.toml:4: scaler.options.level: must be in \(0.5, 1\), got 2.0$",
        ),
        (
            '[scaler]\npolicy = "threshold"\noptions = { tolerance = "x" }\n',
            r"swarmx.toml:3: scaler.options.tolerance: expected a number, got str 'x'$",
        ),
        (
            "[scaler.options]\nlevel = 0.9\nhorizon_s = 0\n",
            r"swarmx.toml:3: scaler.options.horizon_s: must be > 0, got 0.0$",
        ),
        (
            '[scaler]\npolicy = "none"\noptions = { level = 0.9 }\n',
            r"swarmx.toml:3: scaler.options.level: not an option of the 'none' scaler",
        ),
        (
            "[scaler]\noptions = { level = [1] }\n",
            r"swarmx.toml:2: scaler.options.level: expected",
        ),
        (
            '[[node.replicas]]\nmodel = "lm"\nbackend = "emulated"\nstartup_delay_s = -1\n',
            r"node.replicas\[0\].startup_delay_s: must be >= 0",
        ),
        ("scheduler = 3\n", r"swarmx.toml:1: scheduler: expected a table, got int"),
    ],
)
def test_errors_are_one_line_and_name_the_place(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_router_and_scaler_sections(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            """
[router]
policy = "power_of_two"
queue = "fifo"
level = 0.9
replica_queue = 2
seed = 7
max_candidates = 16

[scaler]
policy = "threshold"
interval_s = 1.5
min_replicas = { "tiny-lm" = 1 }
max_replicas = { "tiny-lm" = 6, vision = 2 }
options = { target = 0.5, down_window_s = 30 }

[[node.replicas]]
model = "tiny-lm"
backend = "emulated"
count = 2
max_count = 5
startup_delay_s = 0.5
""",
        )
    )
    r, s = cfg.router, cfg.scaler
    assert (r.policy, r.queue, r.level, r.replica_queue, r.seed, r.max_candidates) == (
        "power_of_two",
        "fifo",
        0.9,
        2,
        7,
        16,
    )
    assert (s.policy, s.interval_s) == ("threshold", 1.5)
    assert s.min_replicas == {"tiny-lm": 1}
    assert s.max_replicas == {"tiny-lm": 6, "vision": 2}
    assert s.options == {"target": 0.5, "down_window_s": 30}
    assert s.policy_options == ThresholdOptions(target=0.5, tolerance=0.1, down_window_s=30.0)
    [rc] = cfg.node.replicas
    assert (rc.max_count, rc.scale_max, rc.startup_delay_s) == (5, 5, 0.5)


def test_routing_and_scaling_defaults():
    cfg = Config()
    assert (cfg.router.policy, cfg.router.queue, cfg.router.level) == ("tail", "slack", 0.95)
    assert (cfg.router.replica_queue, cfg.scaler.policy, cfg.scaler.interval_s) == (0, "tail", 5.0)
    assert cfg.scaler.min_replicas == cfg.scaler.max_replicas == cfg.scaler.options == {}
    assert cfg.scaler.policy_options == TailOptions()  # the tail policy's own defaults


@pytest.mark.parametrize(
    ("backend", "extra", "count", "expected"),
    [
        ("emulated", {}, 2, 8),
        ("torch", {}, 1, 4),
        ("openai", {"url": "http://h/v1"}, 3, 3),
    ],
)
def test_max_count_defaults(backend, extra, count, expected):
    rc = ReplicaConfig("lm", backend, count=count, **extra)
    assert rc.scale_max == expected


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


@pytest.mark.parametrize(
    ("extra", "field", "why"),
    [
        ({"kv_events": "http://127.0.0.1:5557"}, "kv_events", "tcp:// or ipc://"),
        ({"kv_events": "tcp://127.0.0.1:{kv_port}"}, "kv_events", "which `launch` never does"),
        ({"kv_events": "tcp://127.0.0.1:1", "tokenize_path": "tok"}, "tokenize_path", "with /"),
    ],
)
def test_a_bad_kv_events_setting_names_its_field(extra, field, why):
    with pytest.raises(SchemaError, match=f"{field}.*{why}"):
        ReplicaConfig("lm", "openai", url="http://127.0.0.1:8000/v1", **extra)
    with pytest.raises(SchemaError, match="only openai engines"):
        ReplicaConfig("lm", "torch", kv_events="tcp://127.0.0.1:1")
    ok = ReplicaConfig("lm", "openai", url="http://x/v1", kv_events="ipc:///run/vllm.events")
    assert ok.kv_events_topic == ""  # every topic: vLLM's default


def test_the_tail_routers_prefix_options_read_as_booleans_and_a_bad_one_names_its_line(tmp_path):
    cfg = load_config(write(tmp_path, "[router]\ncapacity_price = true\nsession_value = true\n"))
    assert (cfg.router.capacity_price, cfg.router.session_value) == (True, True)
    assert load_config(write(tmp_path, "[router]\n")).router.session_value is False
    with pytest.raises(ConfigError, match=r"swarmx.toml:3: router.session_value: expected a bool"):
        load_config(write(tmp_path, '[router]\n\nsession_value = "yes"\n'))
