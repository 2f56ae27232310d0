import dataclasses

from msgspec.structs import replace

from swarmx.cluster import NodeTable, Transition
from swarmx.protocol import ReplicaRuntime
from tests.unit.test_protocol import HELLO, TELEMETRY


def table():
    return NodeTable(stale_after_missed=3, down_after_missed=10)


def test_register_then_age_to_stale_and_down():
    t = table()
    assert t.register(HELLO, b"p1", now_mono=100.0, now_ts=5.0) == Transition("n1", None, "live")
    assert t.sweep(102.9) == []
    assert t.sweep(103.0) == [Transition("n1", "live", "stale")]
    assert t.sweep(109.0) == []
    assert t.sweep(110.0) == [Transition("n1", "stale", "down")]
    assert t.views(111.0)[0].state == "down"
    assert t.views(111.0)[0].last_seen_age_s == 11.0


def test_any_frame_revives_a_node():
    t = table()
    t.register(HELLO, b"p1", 0.0, 0.0)
    t.sweep(20.0)
    assert t.seen("n1", b"p2", 20.5, 1.0) == Transition("n1", "down", "live")
    assert t.peer("n1") == b"p2"
    assert t.sweep(21.0) == []


def test_liveness_uses_each_nodes_own_heartbeat_interval():
    t = table()
    t.register(HELLO, b"a", 0.0, 0.0)
    t.register(replace(HELLO, node="slow", heartbeat_interval_s=10.0), b"b", 0.0, 0.0)
    assert t.sweep(5.0) == [Transition("n1", "live", "stale")]


def test_re_registration_keeps_one_entry_and_updates_hello():
    t = table()
    t.register(HELLO, b"a", 0.0, 0.0)
    t.sweep(4.0)
    change = t.register(replace(HELLO, pid=99), b"b", 4.0, 1.0)
    assert change == Transition("n1", "stale", "live")
    assert len(t) == 1
    view = t.views(4.0)[0]
    assert (view.hello.pid, view.frames, view.registered_ts) == (99, 2, 1.0)


def test_telemetry_is_kept_and_views_are_sorted():
    t = table()
    t.register(replace(HELLO, node="b"), b"b", 0.0, 0.0)
    t.register(HELLO, b"a", 0.0, 0.0)
    t.update_telemetry("b", TELEMETRY)
    views = t.views(0.0)
    assert [v.name for v in views] == ["b", "n1"]
    assert views[0].telemetry == TELEMETRY
    assert views[1].telemetry is None
    assert "b" in t
    assert "zzz" not in t


def test_time_the_scheduler_itself_stalled_is_not_held_against_its_nodes():
    t = table()
    t.register(HELLO, b"p1", now_mono=100.0, now_ts=5.0)
    t.excuse(8.0)  # the sweep ran 8 s late: heartbeats sent meanwhile wait unread
    assert t.sweep(109.0) == []
    assert t.sweep(118.0) == [Transition("n1", "live", "down")]


def test_a_node_that_left_is_forgotten():
    t = table()
    t.register(HELLO, b"p1", 0.0, 0.0)
    t.remove("n1")
    assert "n1" not in t and t.sweep(100.0) == []


def test_an_engines_kv_cache_in_use_is_its_replicas_memory_figure():
    """vLLM takes its GPU's memory at start: the predictor reads the KV cache the engine uses
    (per replica), where the engine reports it, instead of the device's flat memory use."""
    t = table()
    t.register(HELLO, b"p1", 0.0, 0.0)
    reps = [
        ReplicaRuntime("n1/vllm#0", "m", 0, 2, 0, 0, [], kv_cache_usage=0.75),
        ReplicaRuntime("n1/lm#0", "m", 0, 2, 0, 0, []),
    ]
    t.update_telemetry("n1", replace(TELEMETRY, replicas=reps))
    gpu = t.device_at("n1", "cuda:0")
    assert gpu.gpu_mem_frac == TELEMETRY.gpus[0].mem_used_bytes / TELEMETRY.gpus[0].mem_total_bytes
    assert t.device_at("n1", "cuda:0", "n1/vllm#0") == dataclasses.replace(gpu, gpu_mem_frac=0.75)
    assert t.device_at("n1", "cuda:0", "n1/lm#0") == gpu  # says nothing: the device's figure
