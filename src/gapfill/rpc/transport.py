"""The one I/O seam of the RPC layer: POST bytes to a URL, get status, headers, body.

Everything above it speaks calls and results; tests that want no sockets plug a
:class:`Transport` of their own into :class:`gapfill.rpc.RpcClient`. Exceptions
from :meth:`Transport.post` are classified by :func:`gapfill.rpc.classify.classify_exception`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import Any, Protocol

from gapfill.records import record
from gapfill.rpc.config import RpcSettings
from gapfill.rpc.tls import aiohttp, trust_for

#: A reply's body must arrive at least this fast on average, counted from when its
#: headers did, after a grace of the read timeout: ``read_timeout_s + bytes / rate``.
#: A trickle (a stuck proxy's byte every few tenths of a second) is cut; an honest big
#: answer on a slow link (10 MB at 100 KB/s) gets the time its size needs.
MIN_BODY_BYTES_PER_S = 16 * 1024


@record
class HttpReply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    async def post(self, url: str, body: bytes) -> HttpReply: ...

    async def aclose(self) -> None: ...


_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


class _BoundedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver with a deadline: its name lookups are bounded by no timeout of
    its own (``sock_connect`` starts after them) and a hung resolver held a request for
    as long as the system's lookup took."""

    def __init__(self, seconds: float) -> None:
        self._inner = aiohttp.resolver.DefaultResolver()
        self._seconds = seconds

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> Any:
        try:
            async with asyncio.timeout(self._seconds):
                return await self._inner.resolve(host, port, family)
        except TimeoutError:  # said as a connection that timed out: the node was not reached
            raise aiohttp.ConnectionTimeoutError(f"no address for {host} in {self._seconds:g} s") from None

    async def close(self) -> None:
        await self._inner.close()


class AiohttpTransport:
    """One keep-alive :class:`aiohttp.ClientSession`, created on first use inside the loop."""

    def __init__(self, settings: RpcSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=max(2 * self._settings.max_in_flight, 4),
                ttl_dns_cache=300,
                keepalive_timeout=30,
                resolver=_BoundedResolver(self._settings.connect_timeout_s),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self._settings.connect_timeout_s,
                    # A response that stops arriving (a stall) is cut after this; one that
                    # trickles in, by the body's deadline (see MIN_BODY_BYTES_PER_S).
                    sock_read=self._settings.read_timeout_s,
                ),
                headers=_HEADERS,
                auto_decompress=True,
                raise_for_status=False,
            )
        return self._session

    async def post(self, url: str, body: bytes) -> HttpReply:
        trust_for(url)  # the CA certificates, on the first URL that may use TLS (see tls)
        session = self._ensure_session()
        async with session.post(url, data=body) as response:
            loop = asyncio.get_running_loop()
            grace = loop.time() + self._settings.read_timeout_s
            chunks: list[bytes] = []
            received = 0
            async with asyncio.timeout_at(grace) as deadline:
                async for chunk in response.content.iter_any():
                    chunks.append(chunk)
                    received += len(chunk)
                    deadline.reschedule(grace + received / MIN_BODY_BYTES_PER_S)
            return HttpReply(response.status, response.headers, b"".join(chunks))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
