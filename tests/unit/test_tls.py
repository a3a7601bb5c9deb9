"""aiohttp is imported without its CA certificates loaded (gapfill.rpc.tls), and TLS stays checked.

Each check runs in a fresh interpreter: what is measured is what importing gapfill does to
aiohttp, and this test process may have imported aiohttp already (the emulator does).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gapfill.rpc.tls import may_use_tls

_CHECK_IMPORT = """
import ssl
import gapfill.engine.run  # what `gapfill enrich` imports
import aiohttp.connector as c

def cas():
    return c._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"]

verified = c._SSL_CONTEXT_VERIFIED
assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname
assert "set_default_verify_paths" not in vars(ssl.SSLContext)  # put back as it was
assert ssl.create_default_context.__module__ == "ssl"
from gapfill.rpc.tls import trust_for
at_import = cas()
trust_for("http://127.0.0.1:8545/")  # a local node: no TLS possible
after_loopback = cas()
trust_for("https://rpc.example/")
print(at_import, after_loopback, cas(), ssl.create_default_context().cert_store_stats()["x509_ca"])
"""


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                         env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_gapfill_loads_no_ca_certificates_until_a_url_may_use_tls() -> None:
    # Loading them twice at import (aiohttp's two default contexts) was ~85 ms of every start.
    at_import, after_loopback, after_https, system = map(int, _python(_CHECK_IMPORT).split())
    assert (at_import, after_loopback) == (0, 0)
    assert after_https == system  # what aiohttp would have loaded at import


@pytest.mark.parametrize(("url", "may"), [
    ("http://127.0.0.1:8545", False),
    ("http://127.9.0.1:8545/", False),
    ("http://localhost:8545", False),
    ("http://node.localhost:8545", False),
    ("http://[::1]:8545", False),
    ("https://127.0.0.1:8545", True),
    ("HTTPS://localhost", True),
    ("http://10.0.0.5:8545", True),  # another host: it may redirect to https
    ("http://rpc.example/v2/key", True),
    ("http://localhost.example", True),
])  # fmt: skip
def test_which_urls_may_use_tls(url: str, may: bool) -> None:
    assert may_use_tls(url) is may


# -- a JSON-RPC node behind TLS --------------------------------------------------------------

_CALL = """
import asyncio, sys
from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings
from gapfill.errors import RpcError

async def main():
    settings = RpcSettings(attempts=1, budget_dir=sys.argv[2])
    async with RpcClient([EndpointConfig(sys.argv[1])], settings) as client:
        try:
            print(await client.call("eth_chainId", []))
        except RpcError as exc:
            print(exc)

asyncio.run(main())
"""


_EXPLORE = """
import asyncio, sys
from gapfill.discover.explorer import ExplorerClient, ExplorerConfig
from gapfill.errors import GapfillError

async def main():
    async with ExplorerClient(ExplorerConfig(sys.argv[1] + "/api", attempts=1), 1) as client:
        try:
            print(await client.request({"module": "proxy", "action": "eth_blockNumber"}))
        except GapfillError as exc:
            print(exc)

asyncio.run(main())
"""


class _Node(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answers = [{"jsonrpc": "2.0", "id": c["id"], "result": "0x7a69"}
                   for c in (body if isinstance(body, list) else [body])]  # fmt: skip
        data = json.dumps(answers if isinstance(body, list) else answers[0]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # an explorer's answer
        data = b'{"status": "1", "message": "OK", "result": "0x7a69"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tls_node(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(https URL, its self-signed certificate) of a node on loopback."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Node)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize("client", ["rpc", "explorer"])
def test_an_https_server_is_checked_against_the_ca_certificates(
    tls_node: tuple[str, Path], tmp_path: Path, client: str
) -> None:
    url, cert = tls_node
    code = _CALL if client == "rpc" else _EXPLORE
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    # Its certificate is no CA's the machine trusts: refused, never used unchecked.
    refused = _python(code, url, str(tmp_path), env=env)
    assert "the TLS certificate was refused" in refused, refused
    # Trusted (SSL_CERT_FILE, as OpenSSL reads it): the request goes through. Had gapfill
    # not loaded the CA certificates before it, aiohttp's context would have refused it.
    assert _python(code, url, str(tmp_path), env={**env, "SSL_CERT_FILE": str(cert)}) == "0x7a69"
