"""A local stand-in for an Etherscan-compatible explorer API, for tests.

It serves ``module=account`` ``action=txlist`` / ``txlistinternal`` and
``module=proxy&action=eth_blockNumber`` from a :class:`GeneratedChain`, and
behaves as the Etherscan docs say:

* ``txlist`` of an address: the transactions sent to it (reverted ones with
  ``isError=1``); ``txlistinternal``: one row per call that reached it from
  another contract (the router) *carrying ETH* (``valued``: the chain's router
  calls carry none), as Etherscan lists no others;
* ``flavour="blockscout"``: ``txlistinternal`` rows name the transaction
  ``transactionHash`` (not ``hash``), and ``include_zero_value=true`` lists the
  internal calls that carry no ETH too;
* ``startblock``/``endblock``, ``page``/``offset``, ``sort=asc|desc``;
  ``page × offset`` above ``max_window`` (10,000) is refused with "Result window
  is too large";
* more than ``rps`` requests per second: ``{"status": "0", "message": "NOTOK",
  "result": "Max rate limit reached"}``;
* no rows: ``{"status": "0", "message": "No transactions found", "result": []}``;
* a list over more than ``costly_blocks`` blocks (when set): "Query Timeout occured.
  Please select a smaller result dataset", as Etherscan answers one too costly to compute
  (a busy contract's ``txlistinternal`` over a wide range);
* ``max_offset`` (when set): at most that many rows a page whatever ``offset`` asks, paged
  by it, without a word, as an explorer with a lower cap than Etherscan's may;
* a wrong ``apikey`` (when ``key`` is set): "Invalid API Key"; none: "Missing/Invalid
  API Key", as Etherscan's V2 API answers a request without one.

Usage::

    async with ExplorerStandIn(chain, key="k", rps=5) as api:
        ExplorerConfig(api.url, key="k")
        api.stats.requests
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from gapfill.testing.chain import GeneratedChain

_MAX_BLOCK = 999_999_999


@dataclass(slots=True)
class StandInStats:
    requests: int = 0
    rate_limited: int = 0
    window_refused: int = 0
    timed_out: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    #: Every account query's (action, startblock, endblock, page, offset).
    queries: list[tuple[str, int, int, int, int]] = field(default_factory=list)


def _rows(
    chain: GeneratedChain, valued: frozenset[str], hash_key: str
) -> tuple[dict[str, list[dict[str, str]]], dict[str, list[dict[str, str]]]]:
    position = {h: i for i, h in enumerate(chain.all_txs)}
    by_block = chain.block_txs()
    index = {h: i for txs in by_block.values() for i, h in enumerate(txs)}
    normal: dict[str, list[dict[str, str]]] = {}
    internal: dict[str, list[dict[str, str]]] = {}
    for address in (chain.token, chain.silent, chain.router):
        rows = []
        for h in sorted(chain.direct[address], key=lambda x: position[x]):
            failed = h in chain.reverted
            rows.append({
                "blockNumber": str(chain.tx_block[h]), "timeStamp": "0", "hash": h,
                "transactionIndex": str(index[h]), "from": "", "to": address, "value": "0",
                "isError": "1" if failed else "0", "txreceipt_status": "0" if failed else "1",
                "contractAddress": "", "input": "0x",
            })  # fmt: skip
        normal[address] = rows
        internal[address] = [
            {"blockNumber": str(chain.tx_block[h]), "timeStamp": "0", hash_key: h,
             "from": chain.router, "to": address, "value": "1" if h in valued else "0", "type": "call",
             "traceId": "0", "isError": "0", "errCode": ""}
            for h in sorted(chain.internal[address], key=lambda x: position[x])
        ]  # fmt: skip
    return normal, internal


class ExplorerStandIn:
    """An aiohttp server on 127.0.0.1 (port 0) answering like an Etherscan-compatible API."""

    def __init__(
        self,
        chain: GeneratedChain,
        *,
        key: str | None = None,
        rps: float | None = 5.0,
        max_window: int = 10_000,
        head: int | None = None,
        path: str = "/v2/api",
        flavour: str = "etherscan",
        valued: frozenset[str] = frozenset(),
        costly_blocks: int | None = None,
        max_offset: int | None = None,
    ) -> None:
        """``valued``: the txs whose internal calls carry ETH (those ``txlistinternal`` lists
        unless a Blockscout is asked for zero-value ones too)."""
        if flavour not in ("etherscan", "blockscout"):
            raise ValueError(f"unknown explorer flavour {flavour!r}")
        self.chain = chain
        self.key = key
        self.rps = rps
        self.max_window = max_window
        self.head = chain.head if head is None else head
        self.path = path
        self.flavour = flavour
        self.costly_blocks = costly_blocks
        self.max_offset = max_offset
        self.stats = StandInStats()
        self.url = ""
        self._normal, self._internal = _rows(
            chain, valued, "transactionHash" if flavour == "blockscout" else "hash")
        self._tokens = float(rps or 0)
        self._at = time.monotonic()
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> ExplorerStandIn:
        app = web.Application()
        app.router.add_get(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = getattr(server, "sockets", [])[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}{self.path}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _take(self) -> bool:
        if not self.rps:
            return True
        now = time.monotonic()
        self._tokens = min(self.rps, self._tokens + (now - self._at) * self.rps)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @staticmethod
    def _reply(status: str, message: str, result: Any) -> web.Response:
        return web.Response(body=orjson.dumps({"status": status, "message": message, "result": result}),
                            content_type="application/json")  # fmt: skip

    async def _handle(self, request: web.Request) -> web.Response:
        q = request.query
        self.stats.requests += 1
        if not self._take():
            self.stats.rate_limited += 1
            return self._reply("0", "NOTOK", "Max rate limit reached")
        if self.key is not None and q.get("apikey") != self.key:
            said = "Invalid API Key" if q.get("apikey") else "Missing/Invalid API Key"
            return self._reply("0", "NOTOK", said)
        chain_id = q.get("chainid")
        if chain_id is not None and chain_id != str(self.chain.chain_id):
            return self._reply("0", "NOTOK", f"Missing or unsupported chainid {chain_id}")
        module, action = q.get("module"), q.get("action", "")
        self.stats.actions[action] += 1
        if module == "proxy" and action == "eth_blockNumber":
            return web.Response(body=orjson.dumps({"jsonrpc": "2.0", "id": 83, "result": hex(self.head)}),
                                content_type="application/json")  # fmt: skip
        if module != "account" or action not in ("txlist", "txlistinternal"):
            return self._reply("0", "NOTOK", "Error! Missing Or invalid Module name")
        address = (q.get("address") or "").lower()
        try:
            start = int(q.get("startblock", "0"))
            end = int(q.get("endblock", str(_MAX_BLOCK)))
            page = int(q.get("page", "1"))
            offset = int(q.get("offset", "10000"))
        except ValueError:
            return self._reply("0", "NOTOK", "Error! Invalid parameter")
        self.stats.queries.append((action, start, end, page, offset))
        if page < 1 or offset < 1 or page * offset > self.max_window:
            self.stats.window_refused += 1
            return self._reply(
                "0", "NOTOK",
                f"Result window is too large, PageNo x Offset size must be less than or equal "
                f"to {self.max_window}",
            )  # fmt: skip
        if self.costly_blocks is not None and end - start + 1 > self.costly_blocks:
            self.stats.timed_out += 1
            return self._reply("0", "NOTOK", "Query Timeout occured. Please select a smaller result dataset")
        source = self._normal if action == "txlist" else self._internal
        rows = [r for r in source.get(address, []) if start <= int(r["blockNumber"]) <= end]
        zero_too = self.flavour == "blockscout" and q.get("include_zero_value", "").lower() == "true"
        if action == "txlistinternal" and not zero_too:
            rows = [r for r in rows if r["value"] != "0"]
        if q.get("sort") == "desc":
            rows.reverse()
        if self.max_offset is not None:
            offset = min(offset, self.max_offset)
        rows = rows[(page - 1) * offset : page * offset]
        if not rows:
            return self._reply("0", "No transactions found", [])
        return self._reply("1", "OK", rows)
