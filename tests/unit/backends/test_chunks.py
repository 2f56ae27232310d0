"""The OpenAI streaming chunks the embedded backends emit for their tokens."""

from __future__ import annotations

import json

from swarmx.backends.base import Api
from swarmx.backends.chunks import ChunkWriter, FinishReason
from swarmx.backends.openai import ChatStream


def written(api: Api, steps: list[str], reason: FinishReason = "stop") -> list[str]:
    """The chunk texts a writer gives for ``steps`` (text deltas), then its finish."""
    sink: list[str] = []
    writer = ChunkWriter(api, "c7", "tiny", 1700, sink.append)
    for delta in steps:
        writer.text(delta)
    writer.finish(reason, prompt_tokens=5, output_tokens=2)
    return sink


def test_chat_opens_with_the_role_then_a_chunk_per_text_then_finish_and_usage() -> None:
    head = '"id":"chatcmpl-c7","object":"chat.completion.chunk","created":1700,"model":"tiny"'
    assert written("chat", ["Hel", "", "lo"], "length") == [
        "{" + head + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        '"finish_reason":null}]}',
        "{" + head + ',"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}',
        "{" + head + ',"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}',
        "{" + head + ',"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}',
        "{" + head + ',"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,'
        '"total_tokens":7}}',
    ]


def test_completions_chunks_carry_text_and_no_role_chunk() -> None:
    chunks = [json.loads(c) for c in written("completions", ["a", "b"])]
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        ("cmpl-c7", "text_completion", 1700, "tiny")
    }
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "text": "a", "finish_reason": None, "logprobs": None}],
        [{"index": 0, "text": "b", "finish_reason": None, "logprobs": None}],
        [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}],
        [],
    ]
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_an_empty_chat_answer_still_opens_with_the_role() -> None:
    chunks = [json.loads(c) for c in written("chat", [])]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""},
        {},
    ]
    assert chunks[-1]["choices"] == []


def test_the_openai_backend_folds_what_the_writer_writes() -> None:
    apis: list[Api] = ["chat", "completions"]
    for api in apis:
        stream = ChatStream()
        for chunk in written(api, ["Hel", "lo"]):
            stream.feed(chunk)
        outcome = stream.outcome("p", ttft_s=None)
        assert (outcome.ok, outcome.output, outcome.prompt_tokens, outcome.output_tokens) == (
            True,
            "Hello",
            5,
            2,
        )
        assert stream.usage_chunk
