"""OpenAIBackend against a real engine: llama-cpp-python's OpenAI-compatible server running a tiny
random-weight GGUF written by the test (no model download)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import openai
import psutil
import pytest

from swarmx.backends.base import Api, CallOutcome, CallRequest
from swarmx.backends.openai import OpenAIBackend
from swarmx.backends.tiny_gguf import N_CTX, write_tiny_llama_gguf
from swarmx.config import ReplicaConfig
from tests.integration.conftest import Procs, free_port, needs_llama, wait_for

pytestmark = pytest.mark.integration

needs_llama()

MODEL = "tiny"
API_KEY = "test-key"
KEY_ENV = "SWARMX_TEST_LLAMA_KEY"


def models_answer(url: str, proc: subprocess.Popen[bytes], log: str) -> bool:
    assert proc.poll() is None, f"llama_cpp.server exited:\n{log}"
    req = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A llama_cpp.server on a free loopback port; killed at teardown whatever happened.

    It wants an API key, and queues concurrent requests rather than ending the running stream
    early for the newest one (its default, which would make concurrent calls fail).
    """
    tmp = tmp_path_factory.mktemp("llama")
    model = tmp / "tiny.gguf"
    write_tiny_llama_gguf(model)
    port = free_port()
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--model_alias",
                MODEL,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                str(N_CTX),
                "--api_key",
                API_KEY,
                "--interrupt_requests",
                "False",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_for(
            lambda: models_answer(url, proc, log.read_text(errors="replace")),
            timeout_s=60,
            what="llama_cpp.server to answer /v1/models",
        )
        yield url
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)


def backend(url: str, key_env: str = KEY_ENV) -> OpenAIBackend:
    return OpenAIBackend(
        ReplicaConfig(model=MODEL, backend="openai", concurrency=2, url=url, api_key_env=key_env)
    )


def llm(prompt: str = "Say something.", max_tokens: int = 16) -> CallRequest:
    return CallRequest(
        call_id="c", kind="llm", model=MODEL, prompt=prompt, max_tokens=max_tokens, timeout_s=30
    )


def usage_of_non_streamed(url: str, request: CallRequest) -> dict[str, int]:
    """The server's own token counts for ``request``: llama-cpp-python ignores
    ``stream_options.include_usage``, so streams carry none and the backend counts chunks."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": request.prompt}],
        "max_tokens": request.max_tokens,
    }
    req = urllib.request.Request(
        f"{url}/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        usage: dict[str, int] = json.loads(resp.read())["usage"]
    return usage


def test_streamed_chat_completion(server):
    request = llm()

    async def go() -> tuple[CallOutcome, float]:
        b = backend(server)
        await b.start()
        try:
            t0 = time.monotonic()
            outcome = await b.run(request)
            return outcome, time.monotonic() - t0
        finally:
            await b.close()

    outcome, latency = asyncio.run(go())
    assert outcome.ok, outcome.error
    usage = usage_of_non_streamed(server, request)
    assert 0 < outcome.output_tokens <= request.max_tokens
    assert outcome.output_tokens == usage["completion_tokens"]
    assert len(outcome.output) == outcome.output_tokens  # the tiny model emits one char a token
    assert outcome.prompt_tokens > 0
    assert outcome.ttft_s is not None
    assert 0 < outcome.ttft_s <= latency


def passthrough(url: str, api: Api, body: dict[str, object]) -> tuple[CallOutcome, list[str]]:
    """A gateway call of ``body`` on ``api`` through the backend, and the chunks it streamed."""
    chunks: list[str] = []
    request = CallRequest(
        call_id="g",
        kind="llm",
        model=MODEL,
        prompt="Say something.",
        timeout_s=30,
        api=api,
        body=json.dumps(body),
        stream=chunks.append,
    )

    async def go() -> CallOutcome:
        b = backend(url)
        try:
            return await b.run(request)
        finally:
            await b.close()

    return asyncio.run(go()), chunks


def assert_ends_with_usage(chunks: list[dict[str, Any]], outcome: CallOutcome) -> None:
    """A finish_reason on the last chunk with a choice, then one usage-only chunk."""
    *content, usage = chunks
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"] for c in content)
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == outcome.output_tokens
    assert usage["id"] == content[0]["id"]


def test_a_chat_body_streams_through(server: str) -> None:
    body: dict[str, object] = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something."},
        ],
        "max_tokens": 6,
        "temperature": 0.5,
    }
    outcome, raw = passthrough(server, "chat", body)
    assert outcome.ok, outcome.error
    assert outcome.output_tokens == 6
    chunks = [json.loads(c) for c in raw]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == outcome.output
    assert_ends_with_usage(chunks, outcome)


def test_a_completions_body_streams_through(server: str) -> None:
    outcome, raw = passthrough(server, "completions", {"prompt": "Once upon a", "max_tokens": 6})
    assert outcome.ok, outcome.error
    assert outcome.output_tokens == 6
    chunks = [json.loads(c) for c in raw]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == outcome.output
    assert_ends_with_usage(chunks, outcome)


def test_concurrent_calls_all_complete(server):
    async def go() -> list[CallOutcome]:
        b = backend(server)
        try:
            return await asyncio.gather(*(b.run(llm(f"Call {i}.", 8)) for i in range(4)))
        finally:
            await b.close()

    outcomes = asyncio.run(go())
    assert [(o.ok, o.error, o.output_tokens) for o in outcomes] == [(True, "", 8)] * 4


def connections_to(url: str) -> set[int]:
    """The local ports of this process's open connections to the server at ``url``."""
    port = urlsplit(url).port
    return {
        c.laddr.port
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def test_sequential_calls_reuse_one_kept_alive_connection(server: str) -> None:
    """llama-cpp-python's server (uvicorn) keeps a connection open after a stream: the calls
    after the first go on it, with no new connection each."""

    async def go() -> list[tuple[CallOutcome, set[int]]]:
        b = backend(server)
        try:
            return [(await b.run(llm(p, 4)), connections_to(server)) for p in ("A.", "B.", "C.")]
        finally:
            await b.close()

    calls = asyncio.run(go())
    assert [(o.ok, o.error, o.output_tokens) for o, _ in calls] == [(True, "", 4)] * 3
    first = calls[0][1]
    assert len(first) == 1
    assert [ports for _, ports in calls] == [first] * 3
    assert not connections_to(server)  # closing the backend closed it


def test_http_errors_are_outcomes_with_the_status(server, monkeypatch):
    monkeypatch.setenv("SWARMX_TEST_WRONG_KEY", "wrong")

    async def go() -> tuple[CallOutcome, CallOutcome]:
        wrong_path = backend(server.removesuffix("/v1") + "/nope")
        wrong_key = backend(server, key_env="SWARMX_TEST_WRONG_KEY")
        try:
            return await wrong_path.run(llm()), await wrong_key.run(llm())
        finally:
            await wrong_path.close()
            await wrong_key.close()

    not_found, unauthorized = asyncio.run(go())
    assert (not_found.ok, not_found.error) == (False, "HTTP 404 Not Found: Not Found")
    assert not unauthorized.ok
    assert (unauthorized.ok, unauthorized.error) == (
        False,
        "HTTP 401 Unauthorized: Invalid API key",
    )


def test_cancel_stops_a_long_generation(server):
    async def go() -> tuple[float, CallOutcome, float]:
        b = backend(server)
        try:
            task = asyncio.create_task(b.run(llm(max_tokens=N_CTX - 100)))
            await asyncio.sleep(0.5)  # mid-generation: all of it takes seconds
            assert not task.done()
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            cancel_s = time.monotonic() - t0
            # The server runs one generation at a time: this one waits unless the first stopped.
            t1 = time.monotonic()
            after = await b.run(llm(max_tokens=4))
            return cancel_s, after, time.monotonic() - t1
        finally:
            await b.close()

    cancel_s, after, after_s = asyncio.run(go())
    assert cancel_s < 0.5
    assert after.ok, after.error
    assert after_s < 1.5


def cluster_on(server: str, procs: Procs) -> str:
    """A scheduler and a node agent (``llama-host``) whose one replica is the engine at
    ``server``; returns the scheduler's address once the replica is registered."""
    procs.config.write_text(
        "[node]\nheartbeat_interval_s = 0.2\ntelemetry_interval_s = 0.2\ntool_slots = 0\n"
        f'[[node.replicas]]\nmodel = "{MODEL}"\nbackend = "openai"\nurl = "{server}"\n'
        f'api_key_env = "{KEY_ENV}"\nconcurrency = 2\ndevice = "cpu"\n'
    )
    _, endpoint = procs.scheduler()
    procs.node(endpoint, "llama-host")
    wait_for(
        lambda: (n := procs.nodes(endpoint).get("llama-host")) and n["hello"]["replicas"],
        what="the node to register its openai replica",
    )
    return endpoint


def test_a_workflow_runs_on_a_node_serving_the_real_engine(server, procs):
    """The whole path: scheduler -> node agent -> OpenAI-compatible server -> trace."""
    endpoint = cluster_on(server, procs)
    wf = procs.tmp / "ask.toml"
    wf.write_text(
        'name = "ask"\n[[steps]]\nid = "q"\nkind = "llm"\nafter = []\n'
        f'model = "{MODEL}"\nprompt = "Say hi."\nmax_tokens = 12\n'
        '[[steps]]\nid = "a"\nkind = "llm"\nafter = ["q"]\n'
        f'model = "{MODEL}"\nprompt = "Answer: {{steps.q.output}}"\nmax_tokens = 12\n'
    )
    out = procs.cli("submit", str(wf), "--wait", "--json", "--scheduler", endpoint)
    view = json.loads(out.stdout)
    assert view["state"] == "succeeded"
    assert [s["output_tokens"] for s in view["steps"]] == [12, 12]
    rows = [
        json.loads(r)
        for r in procs.cli(
            "traces", "export", "--out", "-", "--scheduler", endpoint
        ).stdout.splitlines()
    ]
    assert [r["replica"] for r in rows] == ["llama-host/tiny#0"] * 2
    assert all(0 < r["ttft_s"] < r["latency_s"] for r in rows)


def test_the_gateway_streams_the_real_engine_and_a_cancel_frees_it(server, procs):
    """An OpenAI client -> `swarmx gateway` -> scheduler -> node -> llama.cpp, streamed and not;
    a client that goes away stops llama.cpp's generation (it serves one call at a time, so the
    next call would otherwise wait for the abandoned one)."""
    endpoint = cluster_on(server, procs)
    oa = openai.OpenAI(base_url=procs.gateway(endpoint), api_key="none", max_retries=0)
    chunks = list(
        oa.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    done = oa.completions.create(model=MODEL, prompt="Once upon", max_tokens=6)
    assert done.choices[0].text and done.usage is not None

    stream = oa.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Go on for ever."}],
        max_tokens=N_CTX - 64,
        stream=True,
    )
    next(stream)
    stream.close()
    wait_for(
        lambda: "cancelled 1 of 1 calls on request" in procs.log("llama-host"),
        what="the node to stop the call",
    )
    after = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "And now?"}], max_tokens=4
    )
    assert after.usage is not None and after.usage.completion_tokens == 4
    rows = [
        json.loads(r)
        for r in procs.cli(
            "traces", "export", "--out", "-", "--scheduler", endpoint
        ).stdout.splitlines()
    ]
    assert [r["output_tokens"] for r in rows] == [12, 6, 4]  # the cancelled call left none
