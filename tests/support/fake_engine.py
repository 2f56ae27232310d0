"""A stand-in OpenAI-compatible engine for the node's launch and supervision tests, run as a
script by a ``launch`` template: stdlib only, starts in a blink.

    python tests/support/fake_engine.py --port PORT [--model M] [--ready-after S] [--child]
        [--tokens N] [--token-s S] [--exit-after S]

``GET /v1/models`` lists ``--model`` (503 until ``--ready-after`` seconds have passed);
``POST /v1/chat/completions`` streams ``--tokens`` chunks ``--token-s`` apart. ``--child``
forks a sleeping child first (as engines fork workers) and prints its pid; ``--exit-after``
exits by itself (an engine that crashes). It prints its environment's ``FAKE_ENGINE_*``
variables, so tests can read what the template's ``env`` gave it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="fake")
    ap.add_argument("--ready-after", type=float, default=0.0)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--tokens", type=int, default=3)
    ap.add_argument("--token-s", type=float, default=0.01)
    ap.add_argument("--exit-after", type=float, default=0.0)
    args = ap.parse_args()
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
            self.rfile.read(length)
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
            self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {args.port}", flush=True)
    if args.exit_after > 0:
        threading.Timer(args.exit_after, lambda: os._exit(3)).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
