"""A small tool-using agent loop through the SwarmX gateway, with the official `openai` client.

    swarmx up --gateway-port 8000          # in another terminal
    pip install openai
    python examples/agent.py --base-url http://127.0.0.1:8000/v1 --model tiny-lm

Each turn asks the model, runs the tool it called (locally, here in the agent), and sends the
result back as a ``tool`` message, as agent frameworks do. All turns carry one
``X-SwarmX-Session`` header, so SwarmX sees one agent session: the predictor gets the session's
turn and history, the traces group its calls, and ``X-SwarmX-SLO-S`` gives the whole session one
deadline. The embedded ``tiny-lm`` of ``swarmx up`` has random weights and cannot choose a
tool; when a model answers with text instead of a tool call, the agent runs the next tool of its
own plan, so the loop runs the same way on every model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import uuid
from collections.abc import Callable
from typing import Any

from openai import OpenAI


def count_words(text: str) -> str:
    return str(len(text.split()))


def python_version() -> str:
    return platform.python_version()


TOOLS: dict[str, tuple[Callable[..., str], dict[str, Any]]] = {
    "count_words": (
        count_words,
        {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    ),
    "python_version": (python_version, {"type": "object", "properties": {}}),
}
PLAN = ["python_version", "count_words"]


def tool_specs() -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": name, "parameters": params}}
        for name, (_, params) in TOOLS.items()
    ]


def run(base_url: str, model: str, turns: int, api_key: str, slo_s: float | None) -> None:
    session = f"agent-{uuid.uuid4().hex[:8]}"
    headers = {"X-SwarmX-Session": session}
    if slo_s is not None:
        headers["X-SwarmX-SLO-S"] = str(slo_s)
    client = OpenAI(base_url=base_url, api_key=api_key, default_headers=headers)
    messages: list[Any] = [
        {"role": "system", "content": "You are a careful agent. Use the tools."},
        {"role": "user", "content": "Which Python runs you, and how long is your plan?"},
    ]
    print(f"session {session} on {base_url} ({model})")
    for turn in range(turns):
        stream = client.chat.completions.create(
            model=model, messages=messages, tools=tool_specs(), max_tokens=48, stream=True
        )
        text, calls = "", {}
        for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is None:
                continue
            text += delta.content or ""
            for tc in delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
        if not calls or any(c["name"] not in TOOLS for c in calls.values()):
            name = PLAN[turn % len(PLAN)]  # the model chose no tool we have: follow the plan
            args = {"text": text} if "text" in TOOLS[name][1]["properties"] else {}
            calls = {0: {"id": f"call_{turn}", "name": name, "arguments": json.dumps(args)}}
        print(f"turn {turn}: model said {text[:60]!r}")
        messages.append(
            {
                "role": "assistant",
                "content": text or None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in calls.values()
                ],
            }
        )
        for c in calls.values():
            fn = TOOLS[c["name"]][0]
            result = fn(**json.loads(c["arguments"] or "{}"))
            print(f"turn {turn}: tool {c['name']} -> {result}")
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})
    final = client.chat.completions.create(model=model, messages=messages, max_tokens=32)
    print(f"answer: {final.choices[0].message.content!r}")
    print(f"{turns + 1} calls in session {session}: see them with `swarmx traces export --out -`")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="tiny-lm")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--api-key", default="none", help="a gateway API key, if it has keys")
    ap.add_argument("--slo-s", type=float, default=None, help="the whole session's deadline")
    args = ap.parse_args()
    run(args.base_url, args.model, args.turns, args.api_key, args.slo_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
