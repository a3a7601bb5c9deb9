"""An optional Prometheus endpoint (``--metrics-port``), served from a thread.

The text exposition format is simple enough that a dependency would cost more
than these few lines.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gapfill.errors import ConfigError


def _cannot_serve(host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): "
                       "choose another --metrics-port (or metrics_port in the config file)")  # fmt: skip


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Raise the sentence :class:`MetricsServer` would, before a run writes anything (the
    server itself starts once the run has its worker)."""
    probe = ThreadingHTTPServer.address_family
    with socket.socket(probe, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _cannot_serve(host, port, exc) from None


class MetricsServer:
    """Serves ``snapshot()`` as Prometheus counters/gauges on 127.0.0.1:``port``."""

    def __init__(self, port: int, snapshot: Callable[[], dict[str, float]], host: str = "127.0.0.1") -> None:
        get = snapshot

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/") not in ("/metrics", ""):
                    self.send_error(404)
                    return
                lines = []
                for name, value in sorted(get().items()):
                    kind = "counter" if name.endswith("_total") else "gauge"
                    lines.append(f"# TYPE {name} {kind}")
                    lines.append(f"{name} {value}")
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise _cannot_serve(host, port, exc) from None
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="gapfill-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
