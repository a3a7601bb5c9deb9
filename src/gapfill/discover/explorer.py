"""Explorer scan: an Etherscan-compatible API (Etherscan v2, Blockscout, Routescan).

Reads ``module=account&action=txlist`` (transactions sent to the contract,
reverted ones flagged ``isError``) and ``action=txlistinternal`` (calls that
reached it from another contract) for the contract. Etherscan's
``txlistinternal`` lists only internal calls that carry ETH; Blockscout's does the
same by default since 2025 and lists the others with ``include_zero_value=true``,
which is sent (Etherscan ignores it). As an explorer may so miss a token called by
a router, its coverage stands for direct calls and value-carrying internal ones
only: *partial* unless ``logs`` scanned the same blocks (see
:mod:`gapfill.discover.coverage`). Etherscan names a row's transaction ``hash``,
Blockscout's ``txlistinternal`` ``transactionHash``: both are read. The documented
limits are handled here:

* ``page × offset`` may not pass 10,000 ("Result window is too large"): after the
  last page of a window the walk starts again at the last block seen
  (``startblock``), and the rows of that block already read are dropped;
* the free key allows 5 calls per second: requests are spaced by ``rps``, and a
  "Max rate limit reached" answer (or HTTP 429) means wait and ask again, not fail;
* a list too costly to compute (a busy contract's ``txlistinternal`` over many
  blocks) is answered "Query Timeout occured. Please select a smaller result
  dataset": the walk asks again over half the blocks (down to one), then widens
  again, doubling, once a narrower range is read;
* a page with fewer rows than ``offset`` asks ends the list only once a page of
  ``offset`` rows has come (the explorer gives as many) or the next page brings none:
  an explorer may cap ``offset`` lower without a word, and the blocks past its first
  page were recorded as scanned unread; one that does is paged by its cap;
* the envelope ``{"status": "0", "message": "NOTOK", "result": "..."}`` is an
  error, except ``"No transactions found"`` (status 0 with an empty result), which
  is an empty page.

The API key travels as the ``apikey`` query parameter and is never printed: every
message goes through :func:`gapfill.redact.redact_text`. It is the one given apart
(``key``), else one written in the URL's query (``?apikey=...``); a refusal names where
it came from, or, with none at all, says that one is needed and how to give it. The URL
is an :class:`~gapfill.redact.ExplorerUrl`: messages show its path, where a typo is.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import field
from types import TracebackType
from typing import Any
from urllib.parse import unquote_plus

import orjson

from gapfill.errors import ConfigError, FixFirst, GapfillError
from gapfill.model import Ref
from gapfill.quantity import QuantityError, quantity
from gapfill.records import record
from gapfill.redact import (
    MASK,
    ExplorerUrl,
    misplaced_problem,
    not_http_problem,
    redact_text,
    redact_url,
)
from gapfill.rpc.classify import classify_exception, shown_body
from gapfill.rpc.tls import aiohttp, trust_for

logger = logging.getLogger(__name__)

METHOD = "explorer"
ENV_URL = "GAPFILL_EXPLORER_URL"
ENV_KEY = "GAPFILL_EXPLORER_KEY"
ACTIONS = ("txlist", "txlistinternal")
#: What to check about an explorer URL or key whose source its caller does not say.
URL_CHECK = f"--explorer-url or {ENV_URL}"
KEY_CHECK = f"--explorer-key or {ENV_KEY}"
#: What ``--method explorer`` without an explorer says; the CLI names its config file.
NO_EXPLORER = "--method explorer needs an explorer"


def url_hint(config_path: str = "a config file") -> str:
    """How to give the explorer URL: the option, its variable or the config file's key."""
    return f"pass --explorer-url, set {ENV_URL} or set [explorer] url in {config_path}"


def key_hint(config_path: str = "a config file") -> str:
    """How to give the explorer's API key: the option, its variable or the config file's key."""
    return f"pass --explorer-key, set {ENV_KEY} or set [explorer] key in {config_path}"


#: The query parameter an Etherscan-compatible API reads its key from.
KEY_PARAM = "apikey"

_RATE_LIMIT = re.compile(r"rate limit|max calls per sec|too many requests|slow down", re.IGNORECASE)
_WINDOW = re.compile(r"result window is too large|page\s*no?\s*x\s*offset", re.IGNORECASE)
_BAD_KEY = re.compile(r"api.?key", re.IGNORECASE)
_TOO_COSTLY = re.compile(r"query timeout|smaller result dataset", re.IGNORECASE)


class ExplorerError(GapfillError):
    """The explorer API refused or failed a request that waiting would not fix."""


class ExplorerRefused(ExplorerError, FixFirst):
    """The explorer refused the API key, answered an HTTP error (a wrong URL or key), or
    could not list even one block (a query timeout): asking again cannot pass until the
    user fixes it. ``what`` says what happened and ``fix`` what to check, for a caller that
    words the sentence with more in it (what was kept) and the fix last."""


def _scan_otherwise(block: int) -> str:
    """What to do about a block the explorer cannot list: a rerun would meet it again."""
    return (f"scan block {block} with --method trace --from-block {block} --to-block {block} "
            "first (the explorer then skips it), or discover without the explorer "
            "(--method logs,blocks)")  # fmt: skip


class _RateLimited(Exception):
    pass


class _WindowTooLarge(Exception):
    pass


class _Transient(Exception):
    pass


class _TooCostly(Exception):
    pass


@record
class ExplorerConfig:
    """Where the explorer API is and what it allows (defaults: Etherscan's free tier)."""

    url: str
    key: str | None = None
    rps: float = 5.0
    #: Rows per page (``offset``); at most ``max_window``.
    page_size: int = 1_000
    #: ``page × offset`` may not pass this (Etherscan: 10,000).
    max_window: int = 10_000
    #: First wait after "Max rate limit reached" (doubling up to 10 s); the limit is per second.
    rate_limit_backoff_s: float = 1.0
    #: Give up after being rate limited for this long in a row.
    max_rate_limit_wait_s: float = 300.0
    timeout_s: float = 30.0
    attempts: int = 3
    #: Where ``url`` and ``key`` came from, as messages name them: the option, the
    #: environment variable, or the config file's [explorer] key.
    url_check: str = field(default=URL_CHECK, compare=False)
    key_check: str = field(default=KEY_CHECK, compare=False)
    #: How to give a key, said when the explorer needs one and none was given.
    key_hint: str = field(default_factory=key_hint, compare=False)

    def __post_init__(self) -> None:
        # Its path shows in messages (a typo in it is what a 404 is about); keys are in the query.
        object.__setattr__(self, "url", ExplorerUrl(self.url))
        if not self.url.lower().startswith(("http://", "https://")):
            raise ConfigError(f"explorer URL {not_http_problem(self.url)}; check {self.url_check}")
        misplaced = misplaced_problem(self.url, "explorer URL", self.url_check)
        if misplaced:  # aiohttp refuses it as an "InvalidUrlClientError", with no word of why
            raise ConfigError(misplaced)
        if self.rps <= 0 or self.page_size < 1 or self.max_window < self.page_size:
            raise ConfigError("explorer rps must be positive and page_size between 1 and max_window")

    def __repr__(self) -> str:  # the key must not leak through a repr in a log line
        return f"ExplorerConfig(url={redact_url(self.url)!r}, key={'***' if self.key else None})"


def _query_names(url: str) -> set[str]:
    """The names in ``url``'s query, lowercase."""
    query = url.partition("?")[2].partition("#")[0]
    return {unquote_plus(p.partition("=")[0]).strip().lower() for p in query.split("&") if p}


def _without(url: str, *names: str) -> str:
    """``url`` without the parameters ``names`` in its query, each request giving its own:
    ``chainid``, the contract's chain (Etherscan's V2 API serves every chain at one URL), as
    a second one from the URL (``...?chainid=1``) came first, so such APIs answered for that
    chain instead; ``apikey`` when a key is given apart, which wins. The rest of the URL is
    kept as written (a key in it is not re-encoded)."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    query, hash_, fragment = query.partition("#")
    kept = [p for p in query.split("&") if unquote_plus(p.partition("=")[0]).strip().lower() not in names]
    return base + (("?" + "&".join(kept)) if any(kept) else "") + hash_ + fragment


class ExplorerClient:
    """One aiohttp session against one explorer API; use as ``async with``."""

    def __init__(self, config: ExplorerConfig, chain_id: int) -> None:
        self.config = config
        self.chain_id = chain_id
        self._url = _without(config.url, "chainid", *([KEY_PARAM] if config.key else []))
        self.requests = 0
        self.rate_limited = 0
        self._session: aiohttp.ClientSession | None = None
        self._gate = asyncio.Lock()
        self._next_at = 0.0

    async def __aenter__(self) -> ExplorerClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers={"Accept": "application/json"},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def shown(self) -> str:
        return redact_url(self.config.url)

    def _scrub(self, text: str) -> str:
        text = redact_text(text, self.config.url)
        if self.config.key:
            text = text.replace(self.config.key, MASK)
        return text

    def _key_source(self) -> tuple[str, str]:
        """What the explorer did with the key, by where it came from, and what to do: the
        key given apart (``--explorer-key``, its variable, the config file), else the one in
        the URL's query, else none (a key is needed)."""
        if self.config.key:
            return "refused the API key", f"check {self.config.key_check}"
        if KEY_PARAM in _query_names(self.config.url):
            return "refused the API key in its URL", f"check the {KEY_PARAM} in {self.config.url_check}"
        return "needs an API key and none was given", self.config.key_hint

    # -- one request -------------------------------------------------------------------

    async def _throttle(self) -> None:
        async with self._gate:
            now = time.monotonic()
            wait = self._next_at - now
            self._next_at = max(now, self._next_at) + 1.0 / self.config.rps
        if wait > 0:
            await asyncio.sleep(wait)

    async def _once(self, params: dict[str, str]) -> Any:
        assert self._session is not None, "use ExplorerClient as an async context manager"
        await self._throttle()
        self.requests += 1
        trust_for(self.config.url)  # the CA certificates, before the first https request
        try:
            async with self._session.get(self._url, params=params) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # In words, as for an RPC node ("connection refused"), not aiohttp's class and text.
            raise _Transient(classify_exception(exc).message) from None
        text = body[:300].decode("utf-8", errors="replace")
        if status == 429 or (status != 200 and _RATE_LIMIT.search(text)):
            raise _RateLimited(text)
        if status >= 500:
            raise _Transient(f"HTTP {status}")
        if status != 200:
            shown = shown_body(body) or "no body"
            # A 404 is about the URL's path alone; another refusal (401, 403) may be the key's.
            path = "the path in " if status == 404 else ""
            key = "" if status == 404 else f" and {self._key_source()[1]}"
            raise ExplorerRefused(
                self._scrub(f"the explorer at {self.shown} answered HTTP {status} ({shown})"),
                f"check {path}{self.config.url_check} (an Etherscan-compatible API such as "
                f"https://api.etherscan.io/v2/api){key}",
            )
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _Transient("the reply is not JSON") from None
        if not isinstance(data, dict):
            raise _Transient("the reply is not an explorer envelope")
        return self._unwrap(data)

    def _unwrap(self, data: dict[str, Any]) -> Any:
        if "jsonrpc" in data:  # module=proxy answers in JSON-RPC form
            if data.get("error") is not None or "result" not in data:
                raise ExplorerError(self._scrub(f"the explorer at {self.shown} answered {data.get('error')}"))
            return data["result"]
        status = str(data.get("status", ""))
        message = str(data.get("message", ""))
        result = data.get("result")
        if status == "1":
            return result
        if isinstance(result, list) and not result and message.lower().startswith("no "):
            return []  # "No transactions found": an empty page, not an error
        detail = result if isinstance(result, str) else message
        if _RATE_LIMIT.search(detail) or _RATE_LIMIT.search(message):
            raise _RateLimited(detail)
        if _WINDOW.search(detail):
            raise _WindowTooLarge(detail)
        if _TOO_COSTLY.search(detail):
            raise _TooCostly(detail)
        if _BAD_KEY.search(detail):
            refused, fix = self._key_source()
            raise ExplorerRefused(self._scrub(f"the explorer at {self.shown} {refused} ({detail})"), fix)
        raise ExplorerError(self._scrub(f"the explorer at {self.shown} answered {message}: {detail}"))

    async def request(self, params: dict[str, str]) -> Any:
        """The ``result`` of one API call; waits out rate limits, retries transient failures."""
        full = {**params, "chainid": str(self.chain_id)}
        if self.config.key:
            full["apikey"] = self.config.key
        waited = 0.0
        backoff = self.config.rate_limit_backoff_s
        failures = 0
        while True:
            try:
                return await self._once(full)
            except _RateLimited as exc:
                self.rate_limited += 1
                if waited >= self.config.max_rate_limit_wait_s:
                    raise ExplorerError(self._scrub(
                        f"the explorer at {self.shown} kept rate limiting for {waited:.0f} s "
                        f"({exc}); lower the rate or use a paid key"
                    )) from None  # fmt: skip
                logger.debug("explorer rate limited; waiting %.1f s", backoff)
                await asyncio.sleep(backoff)
                waited += backoff
                backoff = min(backoff * 2, 10.0)
            except _Transient as exc:
                failures += 1
                if failures >= self.config.attempts:
                    raise ExplorerError(self._scrub(
                        f"the explorer at {self.shown} failed "
                        f"{'once' if failures == 1 else f'{failures} times'}: {exc}; "
                        f"check {self.config.url_check}"
                    )) from None  # fmt: skip
                await asyncio.sleep(0.5 * 2 ** (failures - 1))

    async def head(self) -> int | None:
        """The explorer's head, if it tells (``module=proxy``, which Etherscan serves and
        Blockscout does not); else None. It is the head of the explorer's node, not how far
        its indexer has got: only ``confirmations`` keep blocks not yet indexed out."""
        try:
            result = await self.request({"module": "proxy", "action": "eth_blockNumber"})
            return quantity(result, "its answer to eth_blockNumber")  # a decimal "10" is not 16
        except (ExplorerError, QuantityError) as exc:
            logger.debug("explorer head unknown: %s", exc)
            return None

    # -- walking a list ----------------------------------------------------------------

    def _row(self, action: str, row: Any) -> tuple[int, str]:
        """A row's block and transaction hash; Blockscout's ``txlistinternal`` names the
        hash ``transactionHash``, Etherscan's ``hash``."""
        if isinstance(row, dict):
            tx_hash = row.get("hash") or row.get("transactionHash")
            try:
                block = int(row.get("blockNumber"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                block = -1
            if isinstance(tx_hash, str) and tx_hash and block >= 0:
                return block, tx_hash.lower()
        raise ExplorerError(self._scrub(
            f"the explorer at {self.shown} answered {action} with a row without a block number "
            f"or a transaction hash ({str(row)[:80]!r}); check {self.config.url_check} (an "
            "Etherscan-compatible API)"
        ))  # fmt: skip

    async def walk(
        self, action: str, address: str, lo: int, hi: int
    ) -> AsyncIterator[tuple[list[tuple[str, int]], int]]:
        """Pages of ``action`` over ``[lo, hi]`` as ``([(tx_hash, block)], done_through_block)``.

        Pages go forward by ``page`` until the next would pass the result window,
        then start again at the last block seen. A query the explorer times out on is
        asked again from there over half its blocks (``stop``), which then widen again.
        """
        offset = self.config.page_size
        window = self.config.max_window
        start, page = lo, 1
        stop, width = hi, hi - lo + 1  # the query's endblock; the blocks a query last spanned
        last: int | None = None  # highest block read so far
        seen: set[str] = set()  # hashes of block ``last`` already yielded
        # An explorer may cap ``offset`` below what was asked without saying so, and its full
        # page would look like the last: until a page of ``offset`` rows shows that it gives
        # as many, a short page with rows is last only if the next one brings none new.
        honoured = False
        short: int | None = None  # the rows of the short page the next one checks
        while True:
            if page > 1 and page * offset > window:
                if last is None or last <= start:
                    # Not "run the same command again", which the CLI says after a plain
                    # ExplorerError: the rerun starts at this block and meets it again.
                    raise ExplorerRefused(
                        f"{address} has more than {window} {action} rows in block {start}, "
                        "which the explorer cannot page past",
                        _scan_otherwise(start),
                    )
                start, page = last, 1
            params = {"module": "account", "action": action, "address": address,
                      "startblock": str(start), "endblock": str(stop), "page": str(page),
                      "offset": str(offset), "sort": "asc"}  # fmt: skip
            if action == "txlistinternal":
                params["include_zero_value"] = "true"  # Blockscout: value > 0 only without it
            try:
                rows = await self.request(params)
            except _WindowTooLarge:
                if page == 1:
                    if offset == 1:
                        raise ExplorerError("the explorer refuses even one row per page") from None
                    offset = max(1, offset // 2)
                else:
                    window = (page - 1) * offset  # smaller than documented: start again at `last`
                    page = window // offset + 1
                continue
            except _TooCostly as exc:
                if stop <= start:
                    raise ExplorerRefused(
                        self._scrub(f"the explorer at {self.shown} cannot list {action} of {address} "
                                    f"even for block {start} alone ({exc})"),
                        _scan_otherwise(start),
                    ) from None
                # What was read stays read: from the last block seen, over half the blocks.
                if last is not None and last > start:
                    start = last
                page = 1
                width = max(1, (stop - start + 1) // 2)
                stop = start + width - 1
                continue
            if not isinstance(rows, list):
                raise ExplorerError(f"the explorer answered {action} with {str(rows)[:80]!r}")
            if short is not None:
                assert last is not None
                read = [self._row(action, r) for r in rows]
                if any(b > last or (b == last and h not in seen) for b, h in read):
                    # Capped at the short page's rows: page by that from the last block read
                    # (this page's rows may lie past rows it skipped).
                    offset, short, start, page = short, None, last, 1
                    continue
                short, rows = None, []
            out: list[tuple[str, int]] = []
            for row in rows:
                block, tx_hash = self._row(action, row)
                if last is None or block > last:
                    last, seen = block, set()
                if tx_hash in seen:
                    continue
                seen.add(tx_hash)
                if lo <= block <= hi:
                    out.append((tx_hash, block))
            honoured = honoured or len(rows) == offset
            if 0 < len(rows) < offset and not honoured:
                assert last is not None
                short = len(rows)
                yield out, max(lo - 1, last - 1)
                page += 1
                continue
            if len(rows) < offset:
                if stop >= hi:
                    yield out, hi
                    return
                yield out, stop  # a narrower query read: the next one spans twice its blocks
                width *= 2
                start, page, stop = stop + 1, 1, min(hi, stop + width)
                continue
            assert last is not None
            yield out, max(lo - 1, last - 1)
            page += 1


async def walk_explorer(
    explorer: ExplorerClient, chain_id: int, contract: str, lo: int, hi: int
) -> AsyncIterator[tuple[list[Ref], int]]:
    """Both lists of ``contract`` over ``[lo, hi]`` in lockstep, as ``(refs, done_through_block)``.

    A block is done once both ``txlist`` and ``txlistinternal`` have passed it; the
    last pair has ``done_through_block == hi``. A ref is given with the pair whose
    block range holds it, once both lists have passed its block: a transaction both
    list (a call to the contract that sends ETH back out, as Etherscan lists internal
    calls from the address too) is then given once, not once per list when the list
    ahead read it before the other (which counted it twice as found). What is held
    meanwhile is at most the pages the list ahead has read past the other.
    """
    walkers = {a: explorer.walk(a, contract, lo, hi) for a in ACTIONS}
    through = dict.fromkeys(ACTIONS, lo - 1)
    active = set(ACTIONS)
    done_to = lo - 1
    refs: dict[str, Ref] = {}
    while active:
        action = min(active, key=lambda a: (through[a], a))
        try:
            rows, reached = await anext(walkers[action])
        except StopAsyncIteration:
            active.discard(action)
            through[action] = hi
            continue
        through[action] = reached
        for tx_hash, block in rows:
            refs.setdefault(tx_hash, Ref(chain_id, contract, tx_hash, block, METHOD))
        now = min(through.values())
        if now > done_to:
            # Rows come in block order past a list's ``through``: none of a block both
            # have passed is still to come, from either list.
            done = [r for r in refs.values() if r.block_number is not None and r.block_number <= now]
            for r in done:
                del refs[r.tx_hash]
            yield done, now
            done_to = now
    if refs or done_to < hi:
        yield list(refs.values()), hi
