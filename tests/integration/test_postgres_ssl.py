"""What libpq's certificate checks say, from a server that answers SSL with a certificate.

The test PostgreSQL has no SSL, so it refuses before any certificate is checked: a small
server here says yes to libpq's SSL request and shows a self-signed certificate.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gapfill.errors import StoreError
from gapfill.store import open_store

_SSL_REQUEST, _GSS_REQUEST = 80877103, 80877104


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """(port, the server's certificate, another CA's) of a server that speaks SSL, then hangs up."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make certificates")
    cert, key = _self_signed(tmp_path, "db.internal")
    other, _ = _self_signed(tmp_path, "other-ca")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                try:
                    while True:
                        _, code = struct.unpack("!ii", conn.recv(8))
                        if code != _GSS_REQUEST:
                            break
                        conn.sendall(b"N")
                    if code == _SSL_REQUEST:
                        conn.sendall(b"S")
                        context.wrap_socket(conn, server_side=True).close()
                except (OSError, struct.error):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], cert, other
    listener.close()
    thread.join(5)


def _said(port: int, query: str) -> str:
    with pytest.raises(StoreError) as err:
        open_store(f"postgresql://u:hunter2secret@127.0.0.1:{port}/db?{query}")
    text = str(err.value)
    assert "hunter2secret" not in text and "check that the server runs" not in text
    return text


def test_a_certificate_that_cannot_be_checked_is_named_with_what_to_do(
    tls_server: tuple[int, Path, Path]
) -> None:
    # Each said "could not connect to PostgreSQL ...: check that the server runs".
    port, cert, other = tls_server
    assert _said(port, "sslmode=verify-full&sslrootcert=/nonexistent") == (
        f"cannot check the certificate of PostgreSQL at 127.0.0.1:{port}: the root certificate file "
        '"/nonexistent" (sslrootcert in --db / GAPFILL_DB) cannot be read (root certificate file '
        '"/nonexistent" does not exist); point sslrootcert in --db / GAPFILL_DB at the server\'s CA '
        "certificate, or use sslmode=require to encrypt without checking it"
    )
    assert _said(port, f"sslmode=verify-ca&sslrootcert={other}").startswith(
        f"PostgreSQL at 127.0.0.1:{port} presented a certificate that no CA in the root certificate "
        f'file "{other}" (sslrootcert in --db / GAPFILL_DB) signed (SSL error: certificate verify failed)'
    )
    assert _said(port, f"sslmode=verify-full&sslrootcert={cert}") == (
        f'PostgreSQL at 127.0.0.1:{port} presented a certificate for "db.internal", not for the host '
        'name "127.0.0.1" that sslmode=verify-full checks: connect to the name in its certificate, or '
        "use sslmode=verify-ca to check the certificate but not its name"
    )
