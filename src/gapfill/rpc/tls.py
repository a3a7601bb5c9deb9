"""aiohttp, imported without loading the system's CA certificates, which it does at import.

Importing aiohttp builds two TLS contexts (``aiohttp.connector``: a verifying one and a
non-verifying one), and each loads the system's CA bundle: ~85 ms of every start-up on
the 2-core bench machine, an eighth of a sparse run of 3,000 transactions, and spent
even when every endpoint is plain http on loopback (a local node, the tests, the demo).

Every module of gapfill imports aiohttp from here (``from gapfill.rpc.tls import
aiohttp``). If aiohttp is not imported yet, it is imported with those two contexts built
empty: a plain ``SSLContext(PROTOCOL_TLS_CLIENT)``, which checks certificates and host
names but trusts no CA yet, so a connection made with it before :func:`trust` fails its
certificate check; it never skips one. :func:`trust` loads the default CA paths into the
verifying one (the other checks nothing): what ``ssl.create_default_context`` would have
loaded (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured), once per process, and
every client calls it before its first request to a URL that may use TLS: https, or http
to a host that is not loopback (it may redirect to https). So aiohttp's verifying context
is the one it would have built, by the time any connection could use it.

If aiohttp was imported before gapfill (a program using gapfill as a library), its
contexts were built the usual way and nothing here changes them. A program that imports
gapfill first and then makes https requests of its own with aiohttp calls :func:`trust`
before them. Concurrent mode's fork server loads them itself when an endpoint may use TLS
(:mod:`gapfill.rpc.trusted`), so that its workers inherit them rather than each loading
them again.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
import sys
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

_EMPTY: list[ssl.SSLContext] = []  # aiohttp's verifying context, CAs not loaded yet
_lock = threading.Lock()


def _import_aiohttp() -> None:
    if "aiohttp" in sys.modules:
        return
    create, load = ssl.create_default_context, ssl.SSLContext.set_default_verify_paths

    def create_empty(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        if args or kwargs:  # not aiohttp's plain call: build it as asked
            return create(*args, **kwargs)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        # What create_default_context adds from Python 3.13 (stricter chain checks).
        for flag in ("VERIFY_X509_PARTIAL_CHAIN", "VERIFY_X509_STRICT"):
            if sys.version_info >= (3, 13) and hasattr(ssl, flag):
                ctx.verify_flags |= getattr(ssl, flag)
        _EMPTY.append(ctx)
        return ctx

    def load_later(self: ssl.SSLContext) -> None:
        """The non-verifying context's: it checks nothing, so it needs no CA."""

    own = "set_default_verify_paths" in vars(ssl.SSLContext)  # else inherited from _ssl's class
    ssl.create_default_context = create_empty
    ssl.SSLContext.set_default_verify_paths = load_later  # type: ignore[method-assign]
    try:
        import aiohttp.connector  # noqa: F401
    finally:
        ssl.create_default_context = create
        if own:
            ssl.SSLContext.set_default_verify_paths = load  # type: ignore[method-assign]
        else:
            del ssl.SSLContext.set_default_verify_paths


_import_aiohttp()

import aiohttp as aiohttp  # noqa: E402  (after the import above, which it reuses)


def trust() -> None:
    """Load the default CA certificates into aiohttp's contexts, if that is not done yet."""
    with _lock:
        while _EMPTY:
            _EMPTY.pop().load_default_certs(ssl.Purpose.SERVER_AUTH)


@functools.lru_cache(maxsize=64)
def may_use_tls(url: str) -> bool:
    """Whether a request to ``url`` can end on a TLS connection: https, or http to a host that
    is not loopback, which can redirect to https. Plain http to loopback (a local node) cannot
    in practice, and spares the process loading the CA certificates."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "http":
        return True
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def any_may_use_tls(urls: Iterable[str]) -> bool:
    """Whether a request to any of ``urls`` may use TLS (:func:`may_use_tls`)."""
    return any(may_use_tls(url) for url in urls)


def trust_for(url: str) -> None:
    """:func:`trust`, if a request to ``url`` may use TLS (cheap once done)."""
    if _EMPTY and may_use_tls(url):
        trust()
