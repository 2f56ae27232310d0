"""OpenAI streaming chunks for the tokens of the embedded backends (torch, emulated).

A gateway client reads the same chunks from an embedded replica as from a real engine behind the
OpenAI backend: ``chat.completion.chunk`` or ``text_completion`` objects, a finish chunk, then a
usage-only chunk (see `CallRequest.stream`). One chunk is built per token, so they are compact
JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Literal

from swarmx.backends.base import Api

FinishReason = Literal["stop", "length"]


def _json(chunk: dict[str, object]) -> str:
    return json.dumps(chunk, separators=(",", ":"))


class ChunkWriter:
    """Builds one call's streaming chunks and passes each, as JSON text, to ``sink`` in order.

    ``created`` is the call's Unix time in whole seconds, as OpenAI's chunks carry it. ``sink``
    runs on the thread that calls the writer: an engine thread gives one that hands each chunk
    to the event loop.
    """

    def __init__(
        self, api: Api, call_id: str, model: str, created: int, sink: Callable[[str], None]
    ) -> None:
        self._chat = api == "chat"
        self._head: dict[str, object] = {
            "id": f"chatcmpl-{call_id}" if self._chat else f"cmpl-{call_id}",
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": created,
            "model": model,
        }
        self._sink = sink
        self._opened = not self._chat
        """Chat streams open with a role-only chunk, as OpenAI's do; completions have none."""

    def text(self, delta: str) -> None:
        """One chunk carrying ``delta``; nothing for "" (a token that ends mid UTF-8 character
        adds no text until the next one completes it)."""
        if delta:
            self._open()
            self._choice(delta, None)

    def finish(self, reason: FinishReason, prompt_tokens: int, output_tokens: int) -> None:
        """End the stream: a chunk with ``finish_reason`` and no text, then the usage chunk."""
        self._open()
        self._choice("", reason)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens,
        }
        self._sink(_json({**self._head, "choices": [], "usage": usage}))

    def _open(self) -> None:
        if not self._opened:
            self._opened = True
            role = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": role, "finish_reason": None}
            self._sink(_json({**self._head, "choices": [choice]}))

    def _choice(self, text: str, reason: FinishReason | None) -> None:
        choice: dict[str, object]
        if self._chat:
            delta = {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        self._sink(_json({**self._head, "choices": [choice]}))
