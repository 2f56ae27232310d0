"""The OpenAI API surface, pure: request validation and flattening, error bodies, SSE framing, and
folding a streamed call back into the response a non-streaming client asked for.

No I/O here, so the gateway's HTTP shell stays thin and every rule is tested as data in, data out.
Validation is shallow on purpose: it checks what SwarmX itself reads (the model, the messages or
prompt, the fields that steer streaming and routing) and hands everything else to the engine
untouched, so a field OpenAI adds tomorrow works without a gateway release.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Api = Literal["chat", "completions"]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SSE_DONE = b"data: [DONE]\n\n"
"""The event that ends an OpenAI stream (the gateway writes it; an engine's own never passes)."""

_ENGINE_DROPS = frozenset({"model", "stream", "stream_options"})
"""Fields the backend sets itself: the served model's name, and always streaming with usage."""
_IMAGE_PARTS = frozenset({"image_url", "input_image"})
_TOOL_RESULT_ROLES = frozenset({"tool", "function"})


class ApiError(Exception):
    """An OpenAI-style error: the status and body clients expect."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class ParsedCall:
    """A validated client request: what routing, features and the engine each need from it."""

    api: Api
    model: str
    stream: bool
    include_usage: bool
    """stream_options.include_usage: whether the client wants the final usage chunk."""
    max_tokens: int
    """max_completion_tokens, else max_tokens; 0 when the client set neither."""
    prompt: str
    """The request flattened to text: what features, traces and embedded replicas see."""
    engine_body: str
    """The request as compact JSON, less model, stream and stream_options."""
    input_kinds: tuple[str, ...]
    """Sorted: "tool_result" (a tool message), "image" (an image content part)."""
    user: str


def _invalid(param: str, expected: str) -> ApiError:
    return ApiError(400, f"'{param}' must be {expected}", param=param)


def _reject_constant(name: str) -> Any:
    """json.loads hook: NaN and Infinity are not JSON, and an engine would choke on them later."""
    raise ValueError(f"{name} is not valid JSON")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return request


def _optional_bool(value: object, param: str) -> bool:
    if value is not None and not isinstance(value, bool):
        raise _invalid(param, "a boolean")
    return bool(value)


def _optional_count(value: object, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(param, "a non-negative integer")
    return value


def _content_text(content: object, where: str, kinds: set[str]) -> str:
    """A message's text: a string, or its text parts joined by newlines (images noted in kinds)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(where, "a string, a list of content parts, or null")
    texts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise _invalid(f"{where}[{j}].type", "a string (each part is an object with a type)")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{where}[{j}].text", "a string")
            texts.append(text)
        elif kind in _IMAGE_PARTS:
            kinds.add("image")
    return "\n".join(texts)


def _call_lines(role: str, tool_calls: object, where: str) -> list[str]:
    """One ``role: call name(arguments)`` line per tool call an assistant message made."""
    if not isinstance(tool_calls, list):
        raise _invalid(where, "a list of tool calls")
    lines: list[str] = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise _invalid(f"{where}[{j}].function", "an object")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str):
            raise _invalid(f"{where}[{j}].function.name", "a string")
        if not isinstance(arguments, str):
            raise _invalid(f"{where}[{j}].function.arguments", "a string (JSON text)")
        lines.append(f"{role}: call {name}({arguments})\n")
    return lines


def _flatten_chat(request: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The messages as one ``role: text`` line group each, and the kinds of input they hold."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "a non-empty list of message objects")
    lines: list[str] = []
    kinds: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, "a message object")
        role = message.get("role")
        if role not in ROLES:
            raise _invalid(f"{where}.role", "one of " + ", ".join(ROLES))
        if role in _TOOL_RESULT_ROLES:
            kinds.add("tool_result")
        tool_calls = message.get("tool_calls")
        calls = [] if tool_calls is None else _call_lines(role, tool_calls, f"{where}.tool_calls")
        content = message.get("content")
        if content is not None:
            lines.append(f"{role}: {_content_text(content, f'{where}.content', kinds)}\n")
        elif role != "assistant" or not calls:
            raise _invalid(
                f"{where}.content",
                "a string or a list of content parts (null only with an assistant's tool_calls)",
            )
        lines.extend(calls)
    return "".join(lines), tuple(sorted(kinds))


def _completions_prompt(request: dict[str, Any]) -> str:
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise ApiError(400, f"one prompt per request, not {len(prompt)}", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _invalid("prompt", "a string or a list of one string")
    return prompt


def parse_request(api: Api, body: bytes) -> ParsedCall:
    """Validate a /chat/completions or /completions body; ApiError(400) names the bad field."""
    request = _json_object(body)
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "a non-empty string")
    if api == "chat":
        prompt, input_kinds = _flatten_chat(request)
    else:
        prompt, input_kinds = _completions_prompt(request), ()
    n = request.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, "only n=1 is supported (one choice per request)", param="n")
    max_tokens = _optional_count(request.get("max_tokens"), "max_tokens")
    max_completion = _optional_count(request.get("max_completion_tokens"), "max_completion_tokens")
    stream = _optional_bool(request.get("stream"), "stream")
    stream_options = request.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _invalid("stream_options", "an object")
    include_usage = _optional_bool(
        (stream_options or {}).get("include_usage"), "stream_options.include_usage"
    )
    user = request.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid("user", "a string")
    engine = {k: v for k, v in request.items() if k not in _ENGINE_DROPS}
    engine_body = json.dumps(engine, ensure_ascii=False, separators=(",", ":"))
    try:  # a lone "\ud800" escape decodes to a str no wire codec can encode
        model.encode()
        engine_body.encode()
    except UnicodeEncodeError:
        raise ApiError(400, "the request holds an unpaired UTF-16 surrogate escape") from None
    return ParsedCall(
        api=api,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_completion if max_completion is not None else max_tokens or 0,
        prompt=prompt,
        engine_body=engine_body,
        input_kinds=input_kinds,
        user=user or "",
    )


def sse_event(data: str) -> bytes:
    """One server-sent event; a line break in ``data`` (JSON whitespace) continues it on a new
    ``data:`` line, as the SSE framing requires."""
    if "\n" in data or "\r" in data:
        data = data.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\ndata: ")
    return b"data: %s\n\n" % data.encode()


def usage_only(data: str) -> bool:
    """Whether a chunk is the usage-only one (``choices: []``) that ends an engine's stream.

    Every chunk passes through here, so the JSON is parsed only when ``"usage"`` appears at all.
    """
    if '"usage"' not in data:
        return False
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(chunk, dict)
        and chunk.get("choices") == []
        and isinstance(chunk.get("usage"), dict)
    )


def models_body(models: Sequence[str], created: int) -> bytes:
    """The /v1/models list."""
    data = [{"id": m, "object": "model", "created": created, "owned_by": "swarmx"} for m in models]
    return json.dumps({"object": "list", "data": data}).encode()


@dataclass
class _ToolCall:
    """A tool call assembled from its streamed deltas."""

    id: str = ""
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class Folder:
    """Folds a call's streamed chunks into the non-streamed response a client asked for."""

    def __init__(self, api: Api, response_id: str, model: str, created: int) -> None:
        self.api = api
        self.response_id = response_id
        self.model = model
        self.created = created
        self.finish_reason: str | None = None
        self.bad_chunks = 0
        """Chunks that were not JSON objects with a choices list: ignored."""
        self._texts: list[str] = []
        self._calls: dict[int, _ToolCall] = {}

    def feed(self, data: str) -> None:
        """Fold one chunk's JSON text."""
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            chunk = None
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not isinstance(choices, list):
            self.bad_chunks += 1
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            finish = choice.get("finish_reason")
            if isinstance(finish, str):
                self.finish_reason = finish
            if self.api == "completions":
                text = choice.get("text")
                if isinstance(text, str):
                    self._texts.append(text)
            elif isinstance(delta := choice.get("delta"), dict):
                self._fold_delta(delta)

    def _fold_delta(self, delta: dict[str, Any]) -> None:
        content = delta.get("content")
        if isinstance(content, str):
            self._texts.append(content)
        tool_calls = delta.get("tool_calls")
        for position, part in enumerate(tool_calls if isinstance(tool_calls, list) else ()):
            if not isinstance(part, dict):
                continue
            index = part.get("index")
            index = index if isinstance(index, int) else position
            call = self._calls.setdefault(index, _ToolCall())
            if isinstance(call_id := part.get("id"), str) and call_id and not call.id:
                call.id = call_id
            if isinstance(kind := part.get("type"), str) and kind:
                call.type = kind
            function = part.get("function")
            if isinstance(function, dict):
                if isinstance(name := function.get("name"), str) and name and not call.name:
                    call.name = name
                if isinstance(arguments := function.get("arguments"), str):
                    call.arguments.append(arguments)

    def response(self, prompt_tokens: int, output_tokens: int) -> bytes:
        """The chat.completion or text_completion object, as JSON."""
        text = "".join(self._texts)
        finish = self.finish_reason or ("tool_calls" if self._calls else "stop")
        choice: dict[str, Any]
        if self.api == "chat":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text if text or not self._calls else None,
            }
            if self._calls:
                message["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": c.type,
                        "function": {"name": c.name, "arguments": "".join(c.arguments)},
                    }
                    for _, c in sorted(self._calls.items())
                ]
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens,
        }
        return json.dumps(
            {
                "id": self.response_id,
                "object": "chat.completion" if self.api == "chat" else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                "usage": usage,
            }
        ).encode()
