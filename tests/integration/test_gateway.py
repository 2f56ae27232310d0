"""`swarmx gateway` with the official `openai` client as the caller: a real scheduler, node
agents and gateway on loopback (the emulated GPU replica and the embedded torch LM as engines;
llama.cpp's server is in test_openai_backend.py)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.request

import openai
import pytest

from tests.integration.conftest import free_port, wait_for

pytestmark = pytest.mark.integration


def cluster(procs, node="alpha"):
    _, endpoint = procs.scheduler()
    procs.node(endpoint, node)
    wait_for(
        lambda: (n := procs.nodes(endpoint).get(node)) and n["state"] == "live",
        what="the node to register",
    )
    return endpoint


def client(url: str, key: str = "none", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60, **kwargs)


def traces(procs, endpoint: str) -> list[dict]:
    out = procs.cli("traces", "export", "--out", "-", "--scheduler", endpoint)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_chat_and_completions_streamed_and_not(procs):
    endpoint = cluster(procs)
    oa = client(procs.gateway(endpoint))

    assert [m.id for m in oa.models.list()] == ["lm"]

    whole = oa.chat.completions.create(
        model="lm", messages=[{"role": "user", "content": "Plan the fix."}], max_tokens=24
    )
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens == len(text.split())

    stream = oa.chat.completions.create(
        model="lm",
        messages=[{"role": "user", "content": "Plan the fix."}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # the emulated engine is deterministic in the prompt
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    done = oa.completions.create(model="lm", prompt="def main():", max_tokens=8)
    assert done.choices[0].text and done.usage is not None

    with pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "nope" in str(err.value) and "lm" in str(err.value)
    with pytest.raises(openai.BadRequestError) as bad:
        oa.chat.completions.create(model="lm", messages=[])
    assert "messages" in str(bad.value)


def test_api_keys_name_the_client_and_unknown_keys_get_401(procs):
    keys = procs.tmp / "api_keys.toml"
    key = procs.cli("keys", "api", "--file", str(keys), "--name", "alice").stdout.strip()
    endpoint = cluster(procs)
    port = free_port()
    url = procs.gateway(endpoint, "--api-keys", str(keys), "--metrics-port", str(port))

    with pytest.raises(openai.AuthenticationError):
        client(url, "sk-swarmx-wrong").models.list()
    answer = client(url, key).chat.completions.create(
        model="lm", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert answer.choices[0].message.content
    req = urllib.request.Request(f"{url}/models")  # no key at all
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(req, timeout=10)
    assert missing.value.code == 401
    assert json.loads(missing.value.read())["error"]["code"] == "invalid_api_key"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'swarmx_gateway_auth_refused_total{reason="unknown_key"} 1.0' in metrics
    assert 'swarmx_gateway_auth_refused_total{reason="missing_key"} 1.0' in metrics
    assert 'swarmx_gateway_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics


def test_a_cancelled_stream_stops_the_engine(procs):
    endpoint = cluster(procs)
    oa = client(procs.gateway(endpoint))
    stream = oa.chat.completions.create(
        model="lm",
        messages=[{"role": "user", "content": "Write a very long report."}],
        max_tokens=50_000,  # minutes of decoding on the emulated H100
        stream=True,
    )
    first = [next(stream) for _ in range(3)]
    assert any(c.choices and c.choices[0].delta.content for c in first)
    stream.close()  # the client goes away
    wait_for(
        lambda: "cancelled 1 of 1 calls on request" in procs.log("alpha"),
        what="the node to stop the call",
    )

    def inflight() -> int | None:
        tel = procs.nodes(endpoint)["alpha"]["telemetry"]
        return None if tel is None else sum(r["inflight"] for r in tel["replicas"])

    wait_for(lambda: inflight() == 0, what="the replica to be idle")
    assert traces(procs, endpoint) == []  # a cancelled call leaves no trace


def test_an_agent_loop_is_one_session_in_the_traces(procs):
    endpoint = cluster(procs)
    oa = client(procs.gateway(endpoint), default_headers={"X-SwarmX-Session": "agent-7"})
    messages: list[dict] = [{"role": "user", "content": "Count the words of your plan."}]
    for turn in range(3):
        answer = oa.chat.completions.create(model="lm", messages=messages, max_tokens=16)
        text = answer.choices[0].message.content or ""
        call = {"id": f"call_{turn}", "type": "function"}
        call["function"] = {"name": "word_count", "arguments": json.dumps({"text": text})}
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{turn}", "content": str(len(text.split()))},
        ]
    rows = traces(procs, endpoint)
    assert [r["session"] for r in rows] == ["agent-7"] * 3
    assert [r["turn"] for r in rows] == [0, 1, 2]
    assert len({r["workflow"] for r in rows}) == 1
    assert [r["input_kinds"] for r in rows] == [[], ["tool_result"], ["tool_result"]]
    assert all(r["workflow_name"] == "gateway" and r["ok"] for r in rows)
    assert all(r["prefix_share"] > 0.3 for r in rows[1:])  # each turn repeats the last one
    top = json.loads(procs.cli("top", "--json", "--scheduler", endpoint).stdout)
    routed = {d["detail"] for d in top["decisions"] if d["kind"] == "route"}
    assert {r["call_id"] for r in rows} <= routed  # `swarmx top` shows where each went
    [session] = [w for w in top["workflows"] if w["id"] == rows[0]["workflow"]]
    assert (session["name"], session["state"], session["steps_done"]) == ("agent-7", "running", 3)
    assert session["calls_running"] == 0 and session["steps_total"] is None


def test_the_embedded_torch_lm_answers_through_the_gateway(procs):
    procs.config.write_text(
        "[node]\nheartbeat_interval_s = 0.2\ntelemetry_interval_s = 0.2\ntool_slots = 0\n"
        '[[node.replicas]]\nmodel = "tiny-lm"\nbackend = "torch"\nconcurrency = 2\n'
    )
    endpoint = cluster(procs)
    oa = client(procs.gateway(endpoint))
    stream = oa.chat.completions.create(
        model="tiny-lm",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 12
    assert len(text.encode()) >= usage.completion_tokens - 3  # bytes; a few may be replaced
    whole = oa.chat.completions.create(
        model="tiny-lm", messages=[{"role": "user", "content": "hello"}], max_tokens=12
    )
    assert whole.choices[0].message.content == text  # seeded by the prompt: the same answer
    assert whole.usage is not None and whole.usage.completion_tokens == usage.completion_tokens
    rows = traces(procs, endpoint)
    assert [r["model"] for r in rows] == ["tiny-lm"] * 2
    assert [r["output_tokens"] for r in rows] == [usage.completion_tokens] * 2
    # why each stopped, as the next call of a session is forecast knowing it
    finish = whole.choices[0].finish_reason
    assert [(r["stop_reason"], r["output_kinds"]) for r in rows] == [(finish, ["text"])] * 2


def test_an_agent_sessions_turns_follow_their_prefix_to_the_replica_holding_it(procs):
    """Two torch replicas behind the prefix-affinity router: each turn of a session re-sends
    the turns before, so every later turn lands on the replica that ran the first, whose
    prefix cache serves the shared blocks (the engine says how many), as the scheduler's
    index expected; `swarmx top` shows that replica's hit rate."""
    procs.config.write_text(
        "[node]\nheartbeat_interval_s = 0.2\ntelemetry_interval_s = 0.2\ntool_slots = 0\n"
        '[[node.replicas]]\nmodel = "tiny-lm"\nbackend = "torch"\ncount = 2\nconcurrency = 2\n'
        '[router]\npolicy = "prefix_affinity"\n'
    )
    endpoint = cluster(procs)

    def replicas() -> int:
        tel = procs.nodes(endpoint)["alpha"]["telemetry"]
        return 0 if tel is None else len(tel["replicas"])

    wait_for(lambda: replicas() == 2, what="two replicas")
    oa = client(procs.gateway(endpoint), default_headers={"X-SwarmX-Session": "coder"})
    system = "You are a careful coding agent. Read the task, plan, then answer briefly. " * 8
    messages: list[dict] = [{"role": "system", "content": system}]
    for turn in range(3):
        messages.append({"role": "user", "content": f"Step {turn}: what next?"})
        answer = oa.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=8)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
    rows = traces(procs, endpoint)
    assert [r["turn"] for r in rows] == [0, 1, 2]
    assert all(len(r["prefix_blocks"]) >= 2 for r in rows)
    # a block is 256 bytes: 64 tokens until the model's counts show its tokens are bytes
    assert [r["block_tokens"] for r in rows] == [64, 256, 256]
    assert {r["replica"] for r in rows} == {rows[0]["replica"]}  # the prefix's holder
    assert rows[0]["cached_tokens"] == 0 and rows[0]["cached_tokens_est"] == 0
    for later in rows[1:]:
        assert later["cached_tokens_est"] >= 2 * 256  # the index expected the first blocks...
        assert later["cached_tokens"] >= later["cached_tokens_est"] - 1  # ...the engine served
        # them (less the prompt's last token, always fed again, when it ends a block)
    top = json.loads(procs.cli("top", "--json", "--scheduler", endpoint).stdout)
    [holder] = [r for r in top["replicas"] if r["replica"] == rows[0]["replica"]]
    assert holder["prefix_hit"] > 0


def test_off_loopback_it_serves_https_or_refuses_to_start(procs):
    refused = procs.cli("gateway", "--listen", "http://0.0.0.0:0", check=False)
    assert refused.returncode == 2
    assert "refusing to serve plain HTTP on http://0.0.0.0:0" in refused.stderr
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = procs.tmp / "cert.pem", procs.tmp / "key.pem"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x"]
    san = ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", *args, *san, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    endpoint = cluster(procs)
    url = procs.gateway(endpoint, "--tls-cert", str(cert), "--tls-key", str(key))
    assert url.startswith("https://127.0.0.1:")
    trust = ssl.create_default_context(cafile=str(cert))
    oa = client(url, http_client=openai.DefaultHttpxClient(verify=trust))
    with oa:
        answer = oa.chat.completions.create(
            model="lm", messages=[{"role": "user", "content": "over TLS"}], max_tokens=4
        )
    assert answer.choices[0].message.content


def test_two_gateways_beside_one_scheduler_each_get_their_own_answers(procs):
    """Both number their calls from 1: the scheduler keeps them apart by connection."""
    endpoint = cluster(procs)
    first = client(procs.gateway(endpoint, name="gw-a"))
    second = client(procs.gateway(endpoint, name="gw-b"))
    prompts = {first: "the first gateway's question", second: "a question for the second one"}
    streams = {
        oa: oa.chat.completions.create(
            model="lm", messages=[{"role": "user", "content": p}], max_tokens=32, stream=True
        )
        for oa, p in prompts.items()
    }
    texts = {
        oa: "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        for oa, s in streams.items()
    }
    for oa, p in prompts.items():  # the emulated engine's text is a function of the prompt
        whole = oa.chat.completions.create(
            model="lm", messages=[{"role": "user", "content": p}], max_tokens=32
        )
        assert texts[oa] == whole.choices[0].message.content
    assert texts[first] != texts[second]
