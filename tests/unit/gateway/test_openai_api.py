"""The OpenAI API surface as data in, data out: validation, flattening, SSE framing, folding."""

from __future__ import annotations

import json
from typing import Any

import pytest

from swarmx.gateway.openai_api import (
    SSE_DONE,
    Api,
    ApiError,
    Folder,
    models_body,
    parse_request,
    sse_event,
    usage_only,
)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def chat(*messages: dict[str, Any], **fields: Any) -> bytes:
    return body(model="m", messages=list(messages), **fields)


def test_a_chat_request_is_flattened_role_by_role_with_its_tool_traffic() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"q":1}'}}
    parsed = parse_request(
        "chat",
        chat(
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                    {"type": "text", "text": "this?"},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny.", "tool_calls": [call]},
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=50,
            user="u1",
        ),
    )
    assert parsed.prompt == (
        "system: Be brief.\n"
        "user: What is\nthis?\n"
        'assistant: call weather({"q":1})\n'
        "tool: sunny\n"
        "assistant: Sunny.\n"
        'assistant: call weather({"q":1})\n'
    )
    assert (parsed.api, parsed.model, parsed.stream, parsed.include_usage) == (
        "chat",
        "m",
        True,
        True,
    )
    assert (parsed.max_tokens, parsed.user) == (50, "u1")
    assert parsed.input_kinds == ("image", "tool_result")


def test_engine_body_is_compact_json_without_model_and_streaming_and_keeps_unknown_fields() -> None:
    request = {
        "model": "m",
        "messages": [{"role": "user", "content": "héllo"}],
        "stream": True,
        "stream_options": {"include_usage": False},
        "temperature": 0.5,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "x_vendor": {"anything": [1, None]},
    }
    parsed = parse_request("chat", json.dumps(request).encode())
    kept = {k: v for k, v in request.items() if k not in ("model", "stream", "stream_options")}
    assert parsed.engine_body == json.dumps(kept, separators=(",", ":"), ensure_ascii=False)
    assert (parsed.include_usage, parsed.input_kinds, parsed.user) == (False, (), "")


@pytest.mark.parametrize(
    ("fields", "max_tokens"),
    [
        ({}, 0),
        ({"max_tokens": 7}, 7),
        ({"max_completion_tokens": 9}, 9),
        ({"max_tokens": 7, "max_completion_tokens": 9}, 9),  # the newer field wins
        ({"max_tokens": None, "stream": None, "n": 1}, 0),  # null is as good as absent
    ],
)
def test_max_tokens_comes_from_either_field(fields: dict[str, Any], max_tokens: int) -> None:
    parsed = parse_request("chat", chat({"role": "user", "content": "hi"}, **fields))
    assert (parsed.max_tokens, parsed.stream) == (max_tokens, False)


@pytest.mark.parametrize("prompt", ["once upon", ["once upon"]])
def test_a_completions_prompt_is_a_string_or_a_list_of_one(prompt: str | list[str]) -> None:
    parsed = parse_request("completions", body(model="m", prompt=prompt, stream=True))
    assert (parsed.api, parsed.prompt, parsed.input_kinds, parsed.stream) == (
        "completions",
        "once upon",
        (),
        True,
    )
    assert json.loads(parsed.engine_body) == {"prompt": prompt}


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("api", "request_body", "param"),
    [
        ("chat", b"{not json", None),
        ("chat", b'{"model": "m", "max_tokens": NaN}', None),
        ("chat", b"[1]", None),
        ("chat", b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
        ("chat", body(messages=[USER]), "model"),
        ("chat", body(model="", messages=[USER]), "model"),
        ("chat", body(model="m"), "messages"),
        ("chat", chat(), "messages"),
        ("chat", chat(USER, "hi"), "messages[1]"),  # type: ignore[arg-type]
        ("chat", chat(USER, USER, {"role": "robot", "content": "x"}), "messages[2].role"),
        ("chat", chat({"role": "user", "content": 5}), "messages[0].content"),
        ("chat", chat({"role": "user", "content": None}), "messages[0].content"),
        ("chat", chat({"role": "assistant", "content": None}), "messages[0].content"),
        ("chat", chat({"role": "user", "content": [{"text": "x"}]}), "messages[0].content[0].type"),
        (
            "chat",
            chat({"role": "user", "content": [{"type": "text", "text": 1}]}),
            "messages[0].content[0].text",
        ),
        ("chat", chat({"role": "assistant", "tool_calls": {}}), "messages[0].tool_calls"),
        (
            "chat",
            chat({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}),
            "messages[0].tool_calls[0].function.name",
        ),
        ("chat", chat(USER, n=2), "n"),
        ("chat", chat(USER, n=True), "n"),
        ("chat", chat(USER, max_tokens=-1), "max_tokens"),
        ("chat", chat(USER, max_tokens=True), "max_tokens"),
        ("chat", chat(USER, max_completion_tokens=1.5), "max_completion_tokens"),
        ("chat", chat(USER, stream="yes"), "stream"),
        ("chat", chat(USER, stream_options=[]), "stream_options"),
        ("chat", chat(USER, stream_options={"include_usage": 1}), "stream_options.include_usage"),
        ("chat", chat(USER, user=5), "user"),
        ("completions", body(model="m"), "prompt"),
        ("completions", body(model="m", prompt=[1, 2]), "prompt"),
        ("completions", body(model="m", prompt=[]), "prompt"),
    ],
)
def test_an_invalid_request_is_a_400_naming_the_field(
    api: Api, request_body: bytes, param: str | None
) -> None:
    with pytest.raises(ApiError) as caught:
        parse_request(api, request_body)
    error = caught.value
    assert (error.status, error.type, error.param, error.code) == (
        400,
        "invalid_request_error",
        param,
        None,
    )
    assert "\n" not in error.message
    assert param is None or param in error.message
    assert json.loads(error.body()) == {
        "error": {"message": error.message, "type": error.type, "param": param, "code": None}
    }


def test_completions_take_one_prompt_per_request() -> None:
    with pytest.raises(ApiError, match="one prompt per request") as caught:
        parse_request("completions", body(model="m", prompt=["a", "b"]))
    assert caught.value.param == "prompt"


def test_an_api_error_body_carries_its_type_and_code() -> None:
    error = ApiError(429, "slow down", type="rate_limit_error", code="rate_limit_exceeded")
    assert json.loads(error.body()) == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
    return json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": choices, **extra})


def delta(finish: str | None = None, **fields: Any) -> str:
    return chunk([{"index": 0, "delta": fields, "finish_reason": finish}], usage=None)


USAGE_CHUNK = chunk([], usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})


def test_folding_a_chat_stream_joins_its_content() -> None:
    folder = Folder("chat", "chatcmpl-1", "m", 1700)
    for data in [
        delta(role="assistant", content=""),
        delta(content="Hel"),
        "not json",
        json.dumps({"choices": None}),
        delta(content="lo"),
        delta("length"),
        USAGE_CHUNK,
    ]:
        folder.feed(data)
    assert folder.bad_chunks == 2
    assert json.loads(folder.response(3, 2)) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def test_folding_tool_call_deltas_merges_them_by_index() -> None:
    def call_delta(index: int, **part: Any) -> str:
        return delta(tool_calls=[{"index": index, **part}])

    folder = Folder("chat", "chatcmpl-2", "m", 1700)
    for data in [
        delta(role="assistant", content=None),
        call_delta(0, id="call_a", type="function", function={"name": "weather", "arguments": ""}),
        call_delta(0, function={"arguments": '{"city": '}),
        call_delta(1, id="call_b", type="function", function={"name": "time", "arguments": "{}"}),
        call_delta(0, function={"arguments": '"Oslo"}'}),
        delta("tool_calls"),
    ]:
        folder.feed(data)
    [choice] = json.loads(folder.response(10, 4))["choices"]
    assert choice == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "time", "arguments": "{}"},
                },
            ],
        },
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert folder.bad_chunks == 0


def test_folding_a_completions_stream_joins_its_text() -> None:
    folder = Folder("completions", "cmpl-1", "m", 1700)
    for text, finish in [("Once", None), (" upon", None), (" a time", "stop")]:
        folder.feed(
            json.dumps(
                {
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                }
            )
        )
    folder.feed(USAGE_CHUNK)
    out = json.loads(folder.response(2, 3))
    assert (out["id"], out["object"], out["usage"]["total_tokens"]) == (
        "cmpl-1",
        "text_completion",
        5,
    )
    assert out["choices"] == [
        {"index": 0, "text": "Once upon a time", "logprobs": None, "finish_reason": "stop"}
    ]


def test_a_stream_with_no_finish_reason_folds_to_stop() -> None:
    folder = Folder("chat", "c", "m", 0)
    folder.feed(delta(content="hi"))
    assert json.loads(folder.response(1, 1))["choices"][0]["finish_reason"] == "stop"


def test_usage_only_picks_out_the_final_usage_chunk() -> None:
    assert usage_only(USAGE_CHUNK)
    assert not usage_only(delta(content="hi"))  # carries "usage": null
    assert not usage_only(json.dumps({"choices": [], "usage": None}))
    assert not usage_only('{"usage": {')
    assert not usage_only(json.dumps({"choices": [{"index": 0}]}))


def test_sse_framing() -> None:
    assert sse_event('{"a":1}') == b'data: {"a":1}\n\n'
    assert sse_event('{"a":\n1}') == b'data: {"a":\ndata: 1}\n\n'  # one event, two data lines
    assert sse_event("é") == "data: é\n\n".encode()
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_the_models_list() -> None:
    assert json.loads(models_body(["a", "b"], 1700)) == {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "created": 1700, "owned_by": "swarmx"},
            {"id": "b", "object": "model", "created": 1700, "owned_by": "swarmx"},
        ],
    }
