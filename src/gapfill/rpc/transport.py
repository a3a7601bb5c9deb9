"""The one I/O seam of the RPC layer: POST bytes to a URL, get status, headers, body.

Everything above it speaks calls and results; tests that want no sockets plug a
:class:`Transport` of their own into :class:`gapfill.rpc.RpcClient`. Exceptions
from :meth:`Transport.post` are classified by :func:`gapfill.rpc.classify.classify_exception`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from gapfill.records import record
from gapfill.rpc.config import RpcSettings
from gapfill.rpc.tls import aiohttp, trust_for


@record
class HttpReply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    async def post(self, url: str, body: bytes) -> HttpReply: ...

    async def aclose(self) -> None: ...


_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


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
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self._settings.connect_timeout_s,
                    # A response that stops arriving (a stall) is cut after this.
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
            data = await response.read()
            return HttpReply(response.status, response.headers, data)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
