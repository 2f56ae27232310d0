"""A stand-in OpenAI-compatible engine for the node's launch and supervision tests, run as a
script by a ``launch`` template: stdlib only, starts in a blink.

    python tests/support/fake_engine.py --port PORT [--model M] [--ready-after S] [--child]
        [--tokens N] [--token-s S] [--exit-after S] [--kv-port P --cache-blocks N [--garbage]]

``GET /v1/models`` lists ``--model`` (503 until ``--ready-after`` seconds have passed);
``POST /v1/chat/completions`` streams ``--tokens`` chunks ``--token-s`` apart. ``--child``
forks a sleeping child first (as engines fork workers) and prints its pid; ``--exit-after``
exits by itself (an engine that crashes). It prints its environment's ``FAKE_ENGINE_*``
variables, so tests can read what the template's ``env`` gave it.

With ``--kv-port`` it keeps a prefix cache as vLLM does and publishes vLLM's KV events on that
port: a chat's tokens are the UTF-8 bytes of its messages in a small template (what
``POST /tokenize`` answers too), cached in ``--block-size``-token blocks chained by hash,
``--cache-blocks`` of them, least recently used evicted first (a prompt's tail before its head);
``usage.prompt_tokens_details.cached_tokens`` says what a call found. ``POST
/reset_prefix_cache`` empties it (``AllBlocksCleared``). ``--garbage`` publishes one frame that
is not an event batch before the first real one.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import zmq


def render(body: dict) -> list[int]:
    """A chat's prompt tokens: its messages' bytes in a template, as an engine's chat template
    wraps them."""
    text = "".join(f"<|{m['role']}|>{m['content']}" for m in body.get("messages", []))
    return list((text + "<|assistant|>").encode())


class PrefixCache:
    """vLLM's prefix cache, in small: whole blocks keyed by chained hashes, LRU, events out."""

    def __init__(self, port: int, blocks: int, block_size: int, garbage: bool) -> None:
        self.capacity = blocks
        self.size = block_size
        self.held: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.seq = 0
        self.garbage = garbage
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{port}")

    def publish(self, events: list) -> None:
        if self.garbage:
            self.garbage = False
            self.pub.send_multipart([b"kv-events", self.seq.to_bytes(8, "big"), b"\xc1junk"])
            self.seq += 1
        payload = msgspec.msgpack.encode([time.time(), events])
        self.pub.send_multipart([b"kv-events", self.seq.to_bytes(8, "big"), payload])
        self.seq += 1

    def serve(self, tokens: list[int]) -> int:
        """Prompt tokens found cached; the prompt's blocks are cached after."""
        with self.lock:
            hashes, parent = [], b""
            for start in range(0, len(tokens) - self.size + 1, self.size):
                parent = hashlib.sha256(parent + bytes(tokens[start : start + self.size])).digest()
                hashes.append(parent)
            hit = 0
            while hit < len(hashes) and hashes[hit] in self.held:
                hit += 1
            events: list = []
            for h in reversed(hashes[:hit]):  # in use: not evicted for its own room
                self.held.move_to_end(h)
            new = hashes[hit:]
            gone = []
            while self.held and len(self.held) + len(new) > self.capacity:  # room first
                gone.append(self.held.popitem(last=False)[0])
            if gone:
                events.append(["BlockRemoved", gone, "GPU"])
            if hit < len(hashes):
                tokens_new = tokens[hit * self.size : len(hashes) * self.size]
                parent = hashes[hit - 1] if hit else None
                events.append(["BlockStored", hashes[hit:], parent, tokens_new, self.size])
            for h in reversed(hashes):  # the tail least recently used: evicted first
                self.held[h] = None
                self.held.move_to_end(h)
            if events:
                self.publish(events)
            return min(hit * self.size, len(tokens) - 1)

    def reset(self) -> None:
        with self.lock:
            self.held.clear()
            self.publish([["AllBlocksCleared"]])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="fake")
    ap.add_argument("--ready-after", type=float, default=0.0)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--tokens", type=int, default=3)
    ap.add_argument("--token-s", type=float, default=0.01)
    ap.add_argument("--exit-after", type=float, default=0.0)
    ap.add_argument("--kv-port", type=int, default=0)
    ap.add_argument("--cache-blocks", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--garbage", action="store_true")
    args = ap.parse_args()
    cache = (
        PrefixCache(args.kv_port, args.cache_blocks, args.block_size, args.garbage)
        if args.kv_port
        else None
    )
    started = time.monotonic()
    if args.child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"child pid {child.pid}", flush=True)
    for key, value in sorted(os.environ.items()):
        if key.startswith("FAKE_ENGINE_") or key == "CUDA_DEVICE_ORDER":
            print(f"env {key}={value}", flush=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *a: object) -> None:
            print(f"request {self.command} {self.path}", flush=True)

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if time.monotonic() - started < args.ready_after:
                self._send(503, b'{"error": "loading"}')
            elif self.path == "/v1/models":
                self._send(200, json.dumps({"data": [{"id": args.model}]}).encode())
            else:
                self._send(404, b"{}")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/tokenize":
                tokens = render(body)
                self._send(200, json.dumps({"tokens": tokens, "count": len(tokens)}).encode())
                return
            if self.path == "/reset_prefix_cache" and cache is not None:
                cache.reset()
                self._send(200, b"{}")
                return
            prompt = render(body)
            cached = cache.serve(prompt) if cache is not None else 0
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(args.tokens):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(args.token_s)
            end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            self.wfile.write(f"data: {json.dumps(end)}\n\n".encode())
            if cache is not None:
                usage = {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": args.tokens,
                    "prompt_tokens_details": {"cached_tokens": cached},
                }
                tail = {"choices": [], "usage": usage}
                self.wfile.write(f"data: {json.dumps(tail)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {args.port}", flush=True)
    if args.exit_after > 0:
        threading.Timer(args.exit_after, lambda: os._exit(3)).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
