"""Loopback HTTP servers for tests: a handler class served on 127.0.0.1, and a JSON-RPC
"node" that answers each method with a fixed result."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextlib.contextmanager
def loopback(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port until the block ends; yields the base URL
    (``http://127.0.0.1:PORT``, no trailing slash)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def rpc_answers(answers: Mapping[str, Any]) -> type[BaseHTTPRequestHandler]:
    """A JSON-RPC handler answering each call (batched or not) with ``answers[method]``
    (``null`` for a method not in it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            asked = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            out = [{"jsonrpc": "2.0", "id": c["id"], "result": answers.get(c["method"])}
                   for c in (asked if isinstance(asked, list) else [asked])]  # fmt: skip
            body = json.dumps(out if isinstance(asked, list) else out[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler
