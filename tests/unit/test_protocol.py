import math
from typing import get_args

import msgpack
import msgspec
import pytest

from swarmx.protocol import (
    MAX_WARMUPS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AbortCall,
    Ack,
    CallEnded,
    CancelCalls,
    CancelWorkflow,
    Chunk,
    DecisionView,
    Dispatch,
    Error,
    ExportTraces,
    GatewayCall,
    Goodbye,
    GpuInfo,
    GpuProcess,
    GpuSample,
    Heartbeat,
    Hello,
    HostSample,
    InstallPredictor,
    Message,
    ModelStats,
    NodesReply,
    NodeView,
    PredictorStatus,
    ProtocolError,
    QueryNodes,
    QueryPredictor,
    QueryTop,
    QueryWorkflows,
    ReplicaInfo,
    ReplicaPool,
    ReplicaRuntime,
    ReplicaStats,
    Result,
    ScaleCommand,
    SchedulerInfo,
    StepView,
    Submit,
    Submitted,
    Telemetry,
    TopReply,
    TracesReply,
    WorkflowBrief,
    WorkflowsReply,
    WorkflowSummary,
    WorkflowView,
    decode_frame,
    encode_frame,
)

HOST = HostSample(12.5, [10.0, 15.0], 0.5, 0.4, 0.3, 100, 40, 60, 10, 1, 1.5, 2.5, 3.5, 4.5)
GPU = GpuSample(
    0,
    "NVIDIA H100",
    "GPU-1",
    50.0,
    20.0,
    1 << 30,
    80 << 30,
    300.5,
    700.0,
    61.0,
    1980,
    [GpuProcess(42, "python", None)],
)
HELLO = Hello(
    node="n1",
    host="h",
    pid=7,
    version="0.1.0",
    cpu_cores_logical=2,
    cpu_cores_physical=None,
    mem_total_bytes=1 << 34,
    gpus=[GpuInfo(0, "NVIDIA H100", "GPU-1", 80 << 30)],
    replicas=[
        ReplicaInfo("r1", "llama", "torch", "cpu", 4),
        ReplicaInfo("r2", "llama", "torch", "cpu", 4, draining=True),
    ],
    heartbeat_interval_s=1.0,
    telemetry_interval_s=1.0,
    started_ts=1.5,
    labels={"zone": "a"},
    pools=[ReplicaPool("llama", "torch", "cpu", 4, 1, 4, 2, 0.5)],
)
TELEMETRY = Telemetry(HOST, [GPU], [ReplicaRuntime("r1", "llama", 1, 2, 3, 0, [0.5])], 0.002)
PREDICTOR = PredictorStatus(
    "v1",
    "trained",
    [0.5, 0.9],
    10,
    10,
    {"0.9": 0.88},
    {"0.9": 0.1},
    {"0.9": 0.05},
    False,
    1,
    0,
    123.0,
)
INFO = SchedulerInfo("tcp://127.0.0.1:7700", "0.1.0", 5.0, {"garbage": 1})
TOP = TopReply(
    ts=1000.0,
    scheduler=INFO,
    router="tail",
    scaler="tail",
    nodes=[NodeView("n1", "stale", 1.0, 4.0, 0.5, 9, HELLO, TELEMETRY)],
    models=[ModelStats("llama", 1, 3, 20, {"0.5": 1.0}, {"0.5": 1.1}, {"0.5": 0.55})],
    replicas=[
        ReplicaStats(
            replica="r1",
            node="n1",
            model="llama",
            device="cpu",
            concurrency=4,
            state="serving",
            outstanding=2,
            queued=1,
            inflight=2,
            completed=3,
            failed=0,
            calls=20,
            actual_s={"0.5": 1.0, "0.9": 2.0},
            pred_s={"0.5": 1.1, "0.9": 1.8},
            covered={"0.5": 0.55, "0.9": 0.85},
        )
    ],
    workflows=[
        WorkflowBrief("wf-1", "x", "running", 990.0, 10.0, 30.0, 12.5, 1, 3, 2),
        WorkflowBrief("wf-0", "x", "succeeded", 900.0, 20.0, 30.0, None, None, None),
    ],
    summary=WorkflowSummary(1, 7, 300.0, 6, 5, 4, 12.0, 20.0, 28.0),
    predictor=PREDICTOR,
    decisions=[
        DecisionView(999.0, "route", "llama", "r1", "wf-1:a:0:1", {"0.5": 1.0}, {"0.5": 1.5}),
        DecisionView(998.0, "scale", "llama", "1 -> 2", "tail: 3 waiting", {"0.5": 1.0}),
    ],
)

SAMPLES = [
    HELLO,
    TELEMETRY,
    Heartbeat(3.0, 2, {"wf-1:a:0:1": "n1/lm#0"}),
    Heartbeat(3.0, 0, {}, telemetry=TELEMETRY),
    Goodbye(True, ["wf-1:a:0:1"]),
    Dispatch("c1", "w1", "s1", "r1", "llm", "llama", "hi", 16, {"k": "v"}),
    Dispatch("c2", "w1", "t", "cpu", "tool", "", command=["pytest", "-q"], timeout_s=30.0),
    Dispatch("c3", "ses-1", "turn-1", "r1", "llm", "lm", "hi", api="chat", body="{}"),
    Result("c1", "r1", True, "out", "", 0.1, 1.2, 0.05, 3, 16),
    ScaleCommand("llama", "torch", 2, "tail risk"),
    ScaleCommand("llama", "torch", 1, "idle", ["n1/llama#1"]),
    Ack(3, "registered"),
    Error(-1, "garbage", "bad"),
    CancelCalls(["wf-1:a:0:1"]),
    Chunk("ses-1:turn-1", ['{"choices":[{"index":0,"delta":{"content":"hi"}}]}']),
    GatewayCall(
        "7",
        "agent-7",
        "alice",
        "lm",
        "chat",
        '{"messages":[{"role":"user","content":"hi"}]}',
        "user: hi\n",
        16,
        ["tool_result"],
        slo_s=30.0,
        priority=2,
        timeout_s=600.0,
    ),
    CallEnded("7", True, 200, "", 3, 16, "n1/lm#0"),
    CallEnded("8", False, 429, "the scheduler is full", retry_after_s=1.0),
    AbortCall("7"),
    Submit("wf.toml", "name = 'x'", {"topic": "y"}),
    Submitted("wf-1"),
    QueryWorkflows("wf-1", 5),
    CancelWorkflow("wf-1"),
    WorkflowsReply(
        [
            WorkflowView(
                "wf-1",
                "x",
                "succeeded",
                "",
                1.0,
                2.5,
                1.5,
                30.0,
                [
                    StepView(
                        "code[1]", "code", 1, "succeeded", 1, "n1", "n1/lm#0", 0.1, 1.2, 0.05, 64
                    ),
                    StepView(
                        "code[2]",
                        "code",
                        2,
                        "running",
                        1,
                        "n1",
                        "n1/lm#1",
                        None,
                        None,
                        None,
                        None,
                        pred={"0.5": 1.0, "0.95": 2.5},
                        pred_completion={"0.5": 1.4, "0.95": 3.0},
                    ),
                ],
                {"review": "ok"},
            )
        ]
    ),
    ExportTraces(10, 100),
    TracesReply(['{"ts": 1.0}'], 11),
    QueryPredictor(),
    InstallPredictor("/var/lib/swarmx/m.pt"),
    PREDICTOR,
    QueryTop(20, 10),
    TOP,
    QueryNodes(),
    NodesReply(INFO, [NodeView("n1", "stale", 1.0, 4.0, 0.5, 9, HELLO, TELEMETRY)]),
]


def test_every_message_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


def test_every_message_has_a_type_name_of_its_own():
    assert sorted(MESSAGE_TYPES) == sorted(cls.TYPE for cls in get_args(Message))


@pytest.mark.parametrize("body", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(body):
    env = decode_frame(encode_frame("node-a", 41, 1234.5, body))
    assert env.body == body
    assert (env.sender, env.seq, env.ts, env.v, env.type) == (
        "node-a",
        41,
        1234.5,
        PROTOCOL_VERSION,
        body.TYPE,
    )


def _raw(**overrides):
    env = {
        "v": PROTOCOL_VERSION,
        "type": "heartbeat",
        "sender": "n",
        "seq": 1,
        "ts": 0.0,
        "body": {"uptime_s": 1.0},
    }
    env.update(overrides)
    return msgpack.packb(env)


def _reason(data, **kw):
    with pytest.raises(ProtocolError) as info:
        decode_frame(data, **kw)
    return info.value.reason


def test_an_older_peer_without_the_scaling_fields_still_decodes():
    """Hellos and scale commands from before scaling: the new fields take their defaults."""
    hello = encode_frame("n1", 1, 0.0, HELLO)
    raw = msgpack.unpackb(hello)
    del raw["body"]["pools"]
    for r in raw["body"]["replicas"]:
        del r["draining"]
    body = decode_frame(msgpack.packb(raw)).body
    assert body.pools == []
    assert [r.draining for r in body.replicas] == [False, False]
    raw = msgpack.unpackb(encode_frame("s", 2, 0.0, ScaleCommand("llama", "torch", 2)))
    del raw["body"]["remove"]
    assert decode_frame(msgpack.packb(raw)).body == ScaleCommand("llama", "torch", 2)


def test_a_nodes_engine_figures_are_checked_at_decode():
    """What a node says of its launched engines: an older node's hello has none (defaults); more
    start-ups than `MAX_WARMUPS`, a negative one or negative restarts are refused, naming the
    field; a result says nothing of infra unless it does."""
    raw = msgpack.unpackb(encode_frame("n1", 1, 0.0, HELLO))
    for pool in raw["body"]["pools"]:
        del pool["warmup_s"], pool["restarts"]
    [pool] = decode_frame(msgpack.packb(raw)).body.pools
    assert (pool.warmup_s, pool.restarts) == ([], 0)
    for bad, where in (
        ({"warmup_s": [1.0] * (MAX_WARMUPS + 1)}, "warmup_s"),
        ({"warmup_s": [-1.0]}, "warmup_s"),
        ({"restarts": -1}, "restarts"),
    ):
        raw = msgpack.unpackb(encode_frame("n1", 1, 0.0, HELLO))
        raw["body"]["pools"][0].update(bad)
        with pytest.raises(ProtocolError, match=where) as info:
            decode_frame(msgpack.packb(raw))
        assert info.value.reason == "schema"
    result = msgpack.unpackb(
        encode_frame("n1", 2, 0.0, Result("c", "r", False, "", "x", 0, 0, None, 0, 0))
    )
    del result["body"]["infra"]
    assert decode_frame(msgpack.packb(result)).body.infra is False


def test_a_results_stop_and_output_kinds_are_bounded_and_optional():
    """An older node's result has neither (defaults); a long reason or too many kinds is
    refused, naming the field."""
    good = Result("c", "r", True, "", "", 0, 0, None, 0, 0, stop_reason="tool_calls")
    raw = msgpack.unpackb(encode_frame("n1", 2, 0.0, good))
    assert decode_frame(msgpack.packb(raw)).body.stop_reason == "tool_calls"
    del raw["body"]["stop_reason"], raw["body"]["output_kinds"]
    assert decode_frame(msgpack.packb(raw)).body.output_kinds == []
    for bad, where in (
        ({"stop_reason": "x" * 65}, "stop_reason"),
        ({"output_kinds": ["text"] * 9}, "output_kinds"),
        ({"output_kinds": ["x" * 65]}, "output_kinds"),
    ):
        raw = msgpack.unpackb(encode_frame("n1", 2, 0.0, good))
        raw["body"].update(bad)
        with pytest.raises(ProtocolError, match=where):
            decode_frame(msgpack.packb(raw))


def test_version_mismatch_is_refused():
    assert _reason(_raw(v=PROTOCOL_VERSION + 1)) == "version"
    assert _reason(_raw(v=None)) == "version"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"not msgpack at all \xff\xfe",
        msgpack.packb([1, 2]),
        msgpack.packb(7),
        msgpack.packb({1: 2}),
    ],
)
def test_garbage_is_refused(data):
    assert _reason(data) in {"garbage", "version", "schema"}


def test_oversized_is_refused_before_parsing():
    assert _reason(b"\x00" * 101, max_bytes=100) == "oversized"
    big = encode_frame("n", 1, 0.0, Dispatch("c", "w", "s", "r", "llm", "m", "x" * 5000))
    assert _reason(big, max_bytes=1000) == "oversized"
    assert decode_frame(big, max_bytes=len(big)).body.prompt == "x" * 5000


def test_unknown_type_is_refused():
    assert _reason(_raw(type="launch_missiles")) == "unknown_type"


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"body": {"uptime_s": "soon"}}, "body.uptime_s"),
        ({"body": {}}, "body.uptime_s"),
        ({"body": [1]}, "body"),
        ({"seq": "1"}, "envelope.seq"),
        ({"sender": None}, "envelope.sender"),
        ({"ts": True}, "envelope.ts"),
    ],
)
def test_bad_fields_name_the_field(overrides, where):
    with pytest.raises(ProtocolError) as info:
        decode_frame(_raw(**overrides))
    assert info.value.reason == "schema"
    assert where in str(info.value)


def test_nested_field_errors_name_the_path():
    body = {"host": {}, "gpus": [], "replicas": [], "collect_s": 0.0}
    with pytest.raises(ProtocolError, match=r"body\.host\.cpu_percent: missing"):
        decode_frame(_raw(type="telemetry", body=body))
    dispatch = {
        "call_id": "c",
        "workflow_id": "w",
        "step_id": "s",
        "replica": "r",
        "kind": "shell",
        "model": "m",
    }
    with pytest.raises(ProtocolError, match=r"body\.kind: invalid enum value 'shell'"):
        decode_frame(_raw(type="dispatch", body=dispatch))


def test_unknown_body_fields_are_ignored_for_forward_compatibility():
    env = decode_frame(_raw(body={"uptime_s": 2.0, "added_in_a_later_release": [1]}))
    assert env.body == Heartbeat(2.0)


def test_integers_are_accepted_as_floats_but_not_the_reverse():
    assert decode_frame(_raw(body={"uptime_s": 2})).body.uptime_s == 2.0
    with pytest.raises(ProtocolError):
        decode_frame(_raw(body={"uptime_s": 1.0, "unsent_frames": 1.5}))


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_numbers_out_of_range_are_refused_at_decode(value):
    with pytest.raises(ProtocolError, match=r"body\.uptime_s") as info:
        decode_frame(encode_frame("n", 1, 0.0, Heartbeat(value)))
    assert info.value.reason == "schema"


def test_telemetry_riding_on_a_heartbeat_is_checked_as_telemetry_is():
    bad = msgspec.structs.replace(
        TELEMETRY, host=msgspec.structs.replace(TELEMETRY.host, cpu_percent=math.nan)
    )
    with pytest.raises(ProtocolError, match=r"body\.telemetry\.host\.cpu_percent") as info:
        decode_frame(encode_frame("n", 1, 0.0, Heartbeat(1.0, telemetry=bad)))
    assert info.value.reason == "schema"


def _hello_with(**changes):
    return encode_frame("n1", 1, 0.0, msgspec.structs.replace(HELLO, **changes))


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"heartbeat_interval_s": 0.0}, "body.heartbeat_interval_s"),
        ({"telemetry_interval_s": math.nan}, "body.telemetry_interval_s"),
        ({"node": "x" * 3_000_000}, "body.node"),
        ({"node": "../etc"}, "body.node"),
        ({"replicas": [HELLO.replicas[0]] * 50_000}, "body.replicas"),
        ({"labels": {"k": "v" * 1000}}, "body.labels"),
    ],
)
def test_hello_fields_have_ranges(changes, where):
    """The frames that stopped the scheduler (a zero heartbeat interval divided its node sweep)
    or would bloat it are refused at decode, naming the field."""
    with pytest.raises(ProtocolError) as info:
        decode_frame(_hello_with(**changes), max_bytes=64 << 20)
    assert info.value.reason == "schema"
    assert where in str(info.value)


def test_an_unhashable_type_is_a_protocol_error():
    """`{"type": [1]}` once raised TypeError (unhashable) out of the decoder and stopped both
    daemons."""
    assert _reason(_raw(type=[1])) == "schema"
    assert _reason(_raw(type={"a": 1})) == "schema"


@pytest.mark.parametrize("depth", [100, 3000])
def test_deep_nesting_is_a_protocol_error(depth):
    frame = _raw(body=[7])
    assert frame.count(b"\x91\x07") == 1
    nested = b"\x91" * depth + b"\x07"  # [[[...7...]]] as the body
    assert _reason(frame.replace(b"\x91\x07", nested)) in {"schema", "garbage"}


_GATEWAY_CALL = {
    "call_id": "7",
    "session": "s",
    "client": "alice",
    "model": "lm",
    "api": "chat",
    "body": "{}",
    "prompt": "user: hi",
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("priority", 5000),  # past the header's range: no call jumps every queue
        ("slo_s", 0.0),  # a deadline already passed
        ("slo_s", math.nan),
        ("timeout_s", -1.0),
        ("api", "embeddings"),  # an endpoint no backend speaks
        ("session", "s" * 300),  # names become trace fields and log lines
        ("input_kinds", ["tool_result"] * 17),
    ],
)
def test_a_gateway_calls_worst_values_are_refused_at_decode(field, value):
    with pytest.raises(ProtocolError) as info:
        decode_frame(_raw(type="gateway_call", body={**_GATEWAY_CALL, field: value}))
    assert info.value.reason == "schema" and f"body.{field}" in str(info.value)


_RESULT = {
    "call_id": "c1",
    "replica": "n/lm#0",
    "ok": True,
    "output": "hi",
    "error": "",
    "queue_s": 0.0,
    "latency_s": 1.0,
    "ttft_s": 0.1,
    "prompt_tokens": 10,
    "output_tokens": 2,
}


@pytest.mark.parametrize("value", [-1, 1 << 41, 1.5, "10"])
def test_a_results_worst_cached_token_counts_are_refused_at_decode(value):
    with pytest.raises(ProtocolError) as info:
        decode_frame(_raw(type="result", body={**_RESULT, "cached_tokens": value}))
    assert info.value.reason == "schema" and "body.cached_tokens" in str(info.value)


def test_a_result_from_a_node_that_does_not_say_what_was_cached_decodes_as_none():
    """An older node's frame has no ``cached_tokens``: unknown, not zero."""
    env = decode_frame(_raw(type="result", body=_RESULT))
    assert isinstance(env.body, Result) and env.body.cached_tokens is None


def test_an_engines_cache_report_is_bounded_at_decode():
    """Telemetry's evicted block ids are 53-bit and at most `MAX_REMOVED` a frame; an older
    node's telemetry has none (defaults)."""
    from swarmx.protocol import MAX_REMOVED

    raw = msgpack.unpackb(encode_frame("n1", 1, 0.0, TELEMETRY))
    [rep] = decode_frame(msgpack.packb(raw)).body.replicas
    assert (rep.cache_removed, rep.cache_resets, rep.cache_capacity_tokens) == ([], 0, None)
    for bad in ([1 << 53], [-1], [1] * (MAX_REMOVED + 1)):
        raw = msgpack.unpackb(encode_frame("n1", 1, 0.0, TELEMETRY))
        raw["body"]["replicas"][0]["cache_removed"] = bad
        with pytest.raises(ProtocolError, match="cache_removed"):
            decode_frame(msgpack.packb(raw))
