"""A misbehaving JSON-RPC provider in front of a real node, for tests and benchmarks.

:class:`ProviderEmulator` is a loopback aiohttp proxy: every call is answered by
the upstream node (anvil) unless one of the switchable faults of
:class:`EmulatorConfig` gets in first. Faults are drawn from one seeded
``random.Random``, so a run with the same seed and the same request order injects
the same faults. Use it in-process::

    async with ProviderEmulator(anvil_url, EmulatorConfig(rps=200, max_batch=50)) as emu:
        client = RpcClient([EndpointConfig(emu.url, rps=200)])
        ...
        emu.stats.calls_answered

or as a process shared by several workers (the URL is the first line on stdout;
``GET /_emulator/stats`` returns the counters as JSON)::

    python -m gapfill.testing.emulator --upstream http://127.0.0.1:8545 --port 0 --rps 200

``POST /_emulator/hold`` makes every request from then on wait, unanswered, until
``POST /_emulator/release`` (or the emulator's close): a test can then act on a run
that cannot finish meanwhile, its workers all waiting on calls (see :meth:`hold`).
``hold_at`` (``--hold-at METHOD:K``) holds so on cue, once K calls of METHOD (``*``: of
any method) were received: a run frozen just past a chosen call, however fast the
machine; ``held`` in the stats counts the requests waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.utils
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import web

from gapfill.records import record

_TAGS_AT_HEAD = ("latest", "pending", "safe", "finalized")


@record
class EmulatorConfig:
    """Which faults the emulator injects; every one is off by default."""

    seed: int = 0
    #: Calls per second (each item of a batch counts); over budget -> HTTP 429.
    rps: float | None = None
    #: Bucket size in seconds of ``rps`` (real providers: at most one second).
    burst_s: float = 1.0
    #: "http": the whole request gets 429; "items": HTTP 200 with -32005 per call.
    rate_limit_style: Literal["http", "items"] = "http"
    #: Wait hint sent with a rate-limit answer, and how: Retry-After seconds, an
    #: HTTP-date Retry-After, or ``error.data.backoff_seconds`` in the JSON body.
    retry_after_s: float | None = None
    retry_after_style: Literal["seconds", "date", "body"] = "seconds"
    #: Batches of more calls than this are refused, with a JSON error or HTTP 413.
    max_batch: int | None = None
    batch_error: Literal["json", "413"] = "json"
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    #: Per-request probabilities of each fault.
    p_5xx: float = 0.0
    p_html: float = 0.0
    p_truncated: float = 0.0
    p_reset: float = 0.0
    p_stall: float = 0.0
    #: Per-call probabilities of leaving an answer out of a batch / repeating it.
    p_drop_item: float = 0.0
    p_duplicate_item: float = 0.0
    #: Each transaction's receipt is ``null`` for its first K requests (a lagging node).
    null_receipts: int = 0
    #: Each transaction's receipt is ``null`` until this long after it was first asked
    #: (a node whose receipts lag its transactions by seconds, not by requests).
    receipt_lag_s: float = 0.0
    #: A node this many blocks behind its upstream (still syncing, or a load balancer's
    #: lagging backend): ``eth_blockNumber`` says head - N, and transaction, receipt and
    #: block lookups of the blocks above that answer ``null``.
    lag_blocks: int = 0
    shuffle: bool = False
    #: Answer every request with this HTTP status (a dead endpoint) ...
    fail_status: int | None = None
    #: ... after answering this many as usual (401: an API key revoked mid-run).
    fail_status_after: int = 0
    #: eth_getLogs limits: block span and number of logs; ``log_hint`` adds a
    #: geth/Alchemy-style "Try with this block range [0x.., 0x..]." suggestion.
    max_log_range: int | None = None
    max_log_results: int | None = None
    log_hint: bool = True
    #: Comma-separated methods this node does not serve (answered -32601).
    missing_methods: str = ""
    #: Per-request probability that a batch (two calls or more: never a start-up check)
    #: meets a load balancer's bad backend, which answers each of its calls -32601 although
    #: the node serves the method.
    p_lacking: float = 0.0
    #: ``eth_chainId`` requests number ``chain_id_503_from`` (counted from 1) and the
    #: ``chain_id_503_count - 1`` after it are answered HTTP 503: a start-up check that
    #: fails all its tries on cue, where ``p_5xx`` would need luck.
    chain_id_503_from: int = 0
    chain_id_503_count: int = 0
    #: "METHOD:K": once K calls of METHOD ("*": of any method) were received, every later
    #: request waits unanswered until released (``POST /_emulator/release``).
    hold_at: str = ""


@dataclass(slots=True)
class EmulatorStats:
    """What the emulator saw and did; per call unless the name says request."""

    requests: int = 0
    calls: int = 0  # calls received
    calls_answered: int = 0  # calls answered with a result or an upstream error
    calls_rate_limited: int = 0  # calls refused for the rate limit
    responses_429: int = 0  # requests answered 429 (or -32005 per item)
    batches_refused: int = 0
    held: int = 0  # requests waiting, unanswered, while the emulator is held
    faults: Counter[str] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "calls": self.calls,
            "calls_answered": self.calls_answered,
            "calls_rate_limited": self.calls_rate_limited,
            "responses_429": self.responses_429,
            "batches_refused": self.batches_refused,
            "held": self.held,
            "faults": dict(self.faults),
            "methods": dict(self.methods),
        }


class _Bucket:
    def __init__(self, rps: float, burst_s: float) -> None:
        self.rps = rps
        self.capacity = max(1.0, rps * min(max(burst_s, 0.0), 1.0))
        self.tokens = self.capacity
        self.at = time.monotonic()

    def take(self, calls: int) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rps)
        self.at = now
        if self.tokens >= calls:
            self.tokens -= calls
            return True
        return False


def _error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


_HTML = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"
)


class ProviderEmulator:
    """Loopback JSON-RPC proxy with switchable provider faults (see module docstring)."""

    def __init__(
        self,
        upstream_url: str,
        config: EmulatorConfig = EmulatorConfig(),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/",
    ) -> None:
        self.upstream_url = upstream_url
        self.config = config
        self.stats = EmulatorStats()
        self._host = host
        self._port = port
        self._path = path if path.startswith("/") else "/" + path
        self._rng = random.Random(config.seed)
        self._bucket = _Bucket(config.rps, config.burst_s) if config.rps else None
        self._receipt_seen: Counter[str] = Counter()
        self._receipt_first_asked: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = asyncio.Event()
        self._open = asyncio.Event()  # cleared while held
        self._open.set()
        method, _, nth = config.hold_at.rpartition(":")
        self._hold_at = (method, int(nth)) if config.hold_at else None
        self._hold_seen = 0  # calls of hold_at's method received so far
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> ProviderEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> str:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60),
            connector=aiohttp.TCPConnector(limit=64),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/_emulator/stats", self._handle_stats)
        app.router.add_post("/_emulator/hold", self._handle_hold)
        app.router.add_post("/_emulator/release", self._handle_release)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self._port
        self.url = f"http://{self._host}:{port}{self._path}"
        return self.url

    async def close(self) -> None:
        self._closing.set()
        self._open.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def reset_stats(self) -> None:
        self.stats = EmulatorStats()

    def hold(self) -> None:
        """Keep every request from now on waiting, unanswered, until :meth:`release`."""
        self._open.clear()

    def release(self) -> None:
        """Let the held requests, and the ones after them, through."""
        self._open.set()

    # -- handlers ----------------------------------------------------------------------

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.as_dict()),
                            content_type="application/json")

    async def _handle_hold(self, request: web.Request) -> web.Response:
        self.hold()
        return web.Response(text="held")

    async def _handle_release(self, request: web.Request) -> web.Response:
        self.release()
        return web.Response(text="released")

    def _hold_on_cue(self, body: bytes) -> None:
        """Hold once ``hold_at``'s K calls were received (see EmulatorConfig): the request
        that brings them to K is answered, the ones after it wait."""
        assert self._hold_at is not None
        method, nth = self._hold_at
        if self._hold_seen >= nth:
            self._hold_at = None  # once: a release lets everything through
            self.hold()
            return
        with contextlib.suppress(orjson.JSONDecodeError):
            decoded = orjson.loads(body)
            calls = decoded if isinstance(decoded, list) else [decoded]
            self._hold_seen += sum(isinstance(c, dict) and method in ("*", c.get("method")) for c in calls)

    def _json(self, payload: Any, status: int = 200,
              headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(body=orjson.dumps(payload), status=status,
                            content_type="application/json", headers=headers)

    def _draw_fault(self) -> str | None:
        c = self.config
        roll = self._rng.random()
        for name, p in (("reset", c.p_reset), ("stall", c.p_stall), ("5xx", c.p_5xx),
                        ("html", c.p_html), ("truncated", c.p_truncated)):
            if roll < p:
                return name
            roll -= p
        return None

    def _wait_hint(self) -> tuple[dict[str, str], Any]:
        c = self.config
        if c.retry_after_s is None:
            return {}, None
        if c.retry_after_style == "date":
            # HTTP dates have one-second resolution: round up so the wait is not shorter.
            when = time.time() + c.retry_after_s + 1
            return {"Retry-After": email.utils.formatdate(when, usegmt=True)}, None
        if c.retry_after_style == "body":
            return {}, {"backoff_seconds": c.retry_after_s}
        return {"Retry-After": f"{c.retry_after_s:g}"}, None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        c = self.config
        body = await request.read()
        if self._hold_at is not None:
            self._hold_on_cue(body)
        if not self._open.is_set():
            self.stats.held += 1
            try:
                await self._open.wait()
            finally:
                self.stats.held -= 1
        self.stats.requests += 1
        if c.fail_status is not None and self.stats.requests > c.fail_status_after:
            self.stats.faults["fail_status"] += 1
            refused = c.fail_status in (401, 403)
            return web.Response(status=c.fail_status,
                                text="invalid API key" if refused else "service unavailable")  # fmt: skip
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._json(_error(None, -32700, "parse error"))
        single = isinstance(decoded, dict)
        calls: list[Any] = [decoded] if single else decoded if isinstance(decoded, list) else []
        if not calls:
            return self._json(_error(None, -32600, "invalid request"))
        self.stats.calls += len(calls)
        for call in calls:
            if isinstance(call, dict):
                self.stats.methods[str(call.get("method"))] += 1
        if c.chain_id_503_count and single and decoded.get("method") == "eth_chainId":
            nth = self.stats.methods["eth_chainId"]
            if c.chain_id_503_from <= nth < c.chain_id_503_from + c.chain_id_503_count:
                self.stats.faults["chain_id_503"] += 1
                return web.Response(status=503, text="service unavailable")
        if c.max_batch is not None and not single and len(calls) > c.max_batch:
            self.stats.batches_refused += 1
            if c.batch_error == "413":
                return web.Response(status=413, text="Request Entity Too Large")
            return self._json(_error(
                None, -32600, f"batch size exceeds the limit of {c.max_batch} requests"))
        if self._bucket is not None and not self._bucket.take(len(calls)):
            self.stats.responses_429 += 1
            self.stats.calls_rate_limited += len(calls)
            headers, data = self._wait_hint()
            if c.rate_limit_style == "items":
                answers = [
                    _error(call.get("id") if isinstance(call, dict) else None, -32005,
                           "request rate exceeded, too many requests", data
                           or {"see": "https://example.invalid/rate-limits"})
                    for call in calls
                ]
                return self._json(answers[0] if single else answers, headers=headers)
            return self._json(
                _error(None, 429, "Too Many Requests: your app has exceeded its compute "
                       "units per second capacity", data),
                status=429, headers=headers,
            )
        fault = self._draw_fault()
        delay = c.latency_s + (self._rng.uniform(0, c.latency_jitter_s)
                               if c.latency_jitter_s else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        if fault is not None:
            self.stats.faults[fault] += 1
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault == "stall":
            with contextlib.suppress(asyncio.CancelledError):
                await self._closing.wait()
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault == "5xx":
            return web.Response(status=self._rng.choice((500, 502, 503, 504)),
                                text="upstream error")
        if fault == "html":
            return web.Response(status=self._rng.choice((200, 502)), body=_HTML,
                                content_type="text/html")
        try:
            answers = await self._answer(calls)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.stats.faults["upstream_down"] += 1
            return web.Response(status=502, text=f"upstream unreachable: {type(exc).__name__}")
        self.stats.calls_answered += len(answers)
        answers = self._mangle(answers)
        payload = orjson.dumps(answers[0] if single and answers else answers)
        if fault == "truncated":
            payload = payload[: max(1, len(payload) // 2)]
        return web.Response(body=payload, content_type="application/json")

    def _mangle(self, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        c = self.config
        if c.p_drop_item or c.p_duplicate_item:
            out: list[dict[str, Any]] = []
            for answer in answers:
                roll = self._rng.random()
                if roll < c.p_drop_item:
                    self.stats.faults["drop_item"] += 1
                    continue
                out.append(answer)
                if roll < c.p_drop_item + c.p_duplicate_item:
                    self.stats.faults["duplicate_item"] += 1
                    out.append(answer)
            answers = out
        if c.shuffle:
            self._rng.shuffle(answers)
        return answers

    # -- answering ---------------------------------------------------------------------

    async def _upstream(self, payload: Any) -> Any:
        assert self._session is not None
        async with self._session.post(self.upstream_url, data=orjson.dumps(payload),
                                      headers={"Content-Type": "application/json"}) as resp:
            return orjson.loads(await resp.read())

    async def _head(self) -> int:
        reply = await self._upstream({"jsonrpc": "2.0", "id": 0, "method": "eth_blockNumber",
                                      "params": []})
        return int(reply["result"], 16)

    async def _block_of(self, tag: Any, head: int | None) -> tuple[int, int | None]:
        if tag is None or tag in _TAGS_AT_HEAD:
            head = head if head is not None else await self._head()
            return head, head
        if tag == "earliest":
            return 0, head
        return int(str(tag), 16), head

    async def _answer(self, calls: list[Any]) -> list[dict[str, Any]]:
        c = self.config
        local: dict[int, dict[str, Any]] = {}
        forward: list[tuple[int, Any]] = []
        log_spans: dict[int, tuple[int, int]] = {}
        head: int | None = None
        lagged: int | None = None  # the head this node admits to, with ``lag_blocks``
        if c.lag_blocks:
            head = await self._head()
            lagged = max(0, head - c.lag_blocks)
        lacking = c.p_lacking > 0 and len(calls) > 1 and self._rng.random() < c.p_lacking
        for position, call in enumerate(calls):
            if not isinstance(call, dict):
                local[position] = _error(None, -32600, "invalid request")
                continue
            method = call.get("method")
            params = call.get("params") or []
            if lacking or (c.missing_methods and method in c.missing_methods.split(",")):
                self.stats.faults["lacking" if lacking else "missing_method"] += 1
                local[position] = _error(call.get("id"), -32601,
                                         f"the method {method} does not exist/is not available")
                continue
            if method == "eth_getTransactionReceipt" and (c.null_receipts or c.receipt_lag_s) and params:
                key = str(params[0]).lower()
                self._receipt_seen[key] += 1
                first = self._receipt_first_asked.setdefault(key, time.monotonic())
                if (self._receipt_seen[key] <= c.null_receipts
                        or time.monotonic() - first < c.receipt_lag_s):  # fmt: skip
                    self.stats.faults["null_receipt"] += 1
                    local[position] = {"jsonrpc": "2.0", "id": call.get("id"), "result": None}
                    continue
            if method == "eth_getLogs" and params and isinstance(params[0], dict) and (
                c.max_log_range is not None or c.max_log_results is not None
            ) and "blockHash" not in params[0]:
                lo, head = await self._block_of(params[0].get("fromBlock"), head)
                hi, head = await self._block_of(params[0].get("toBlock"), head)
                log_spans[position] = (lo, hi)
                if c.max_log_range is not None and hi - lo + 1 > c.max_log_range:
                    self.stats.faults["log_range"] += 1
                    message = f"query exceeds max block range {c.max_log_range}"
                    if c.log_hint:
                        message += (f". Try with this block range "
                                    f"[{hex(lo)}, {hex(lo + c.max_log_range - 1)}].")
                    local[position] = _error(call.get("id"), -32600, message)
                    continue
            if lagged is not None:
                answer = self._lagging(call, lagged)
                if answer is not None:
                    local[position] = answer
                    continue
            forward.append((position, call))
        answers: dict[int, dict[str, Any]] = dict(local)
        if forward:
            reply = await self._upstream([call for _, call in forward])
            by_id: dict[Any, dict[str, Any]] = {}
            if isinstance(reply, list):
                for entry in reply:
                    if isinstance(entry, dict):
                        by_id.setdefault(_id_key(entry.get("id")), entry)
            elif isinstance(reply, dict):  # upstream refused the batch as a whole
                for _, call in forward:
                    by_id[_id_key(call.get("id"))] = {**reply, "id": call.get("id")}
            for position, call in forward:
                entry = by_id.get(_id_key(call.get("id")))
                if entry is None:
                    entry = _error(call.get("id"), -32603, "upstream gave no answer")
                if lagged is not None:
                    entry = self._unmined_above(call, entry, lagged)
                answers[position] = self._limit_logs(call, entry, log_spans.get(position))
        return [answers[p] for p in range(len(calls))]

    def _lagging(self, call: dict[str, Any], lagged: int) -> dict[str, Any] | None:
        """The answer of a node whose head is ``lagged`` to what it can answer alone: its
        head, and ``null`` for a block above it; None to ask upstream."""
        method, params = call.get("method"), call.get("params") or []
        if method == "eth_blockNumber":
            return {"jsonrpc": "2.0", "id": call.get("id"), "result": hex(lagged)}
        if method in ("eth_getBlockByNumber", "eth_getBlockReceipts") and params:
            tag = params[0]
            if tag in _TAGS_AT_HEAD:
                params[0] = hex(lagged)  # "latest" is this node's head
            elif isinstance(tag, str) and tag.startswith("0x") and int(tag, 16) > lagged:
                self.stats.faults["beyond_head"] += 1
                return {"jsonrpc": "2.0", "id": call.get("id"), "result": None}
        return None

    def _unmined_above(self, call: dict[str, Any], entry: dict[str, Any], lagged: int) -> dict[str, Any]:
        """``null`` for a transaction or receipt in a block above ``lagged``."""
        result = entry.get("result")
        if call.get("method") not in ("eth_getTransactionByHash", "eth_getTransactionReceipt") or not (
            isinstance(result, dict) and isinstance(result.get("blockNumber"), str)
        ):
            return entry
        if int(result["blockNumber"], 16) <= lagged:
            return entry
        self.stats.faults["beyond_head"] += 1
        return {**entry, "result": None}

    def _limit_logs(
        self, call: dict[str, Any], entry: dict[str, Any], span: tuple[int, int] | None
    ) -> dict[str, Any]:
        limit = self.config.max_log_results
        result = entry.get("result")
        if limit is None or span is None or not isinstance(result, list) or len(result) <= limit:
            return entry
        self.stats.faults["log_results"] += 1
        message = f"query returned more than {limit} results"
        if self.config.log_hint:
            lo, _ = span
            blocks = sorted(int(log["blockNumber"], 16) for log in result)
            # The widest range from ``lo`` whose logs still fit: up to the block before the
            # first one that overflows (at least ``lo`` itself).
            overflow_block = blocks[limit]
            hi = max(lo, overflow_block - 1)
            message += f". Try with this block range [{hex(lo)}, {hex(hi)}]."
        return _error(call.get("id"), -32005, message)


def _id_key(value: Any) -> Any:
    return value if isinstance(value, int | str) or value is None else str(value)


# -- command line ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gapfill.testing.emulator",
        description="JSON-RPC provider emulator: a faulty proxy in front of a real node. "
        "Prints its URL on the first line of stdout; GET /_emulator/stats for counters.",
    )
    parser.add_argument("--upstream", required=True, help="URL of the real node (anvil)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--path", default="/", help="URL path to report, e.g. /v2/<fake key>")
    for f in dataclasses.fields(EmulatorConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.type in ("int", "int | None"):
            parser.add_argument(flag, type=int, default=default)
        elif f.type in ("float", "float | None"):
            parser.add_argument(flag, type=float, default=default)
        else:
            parser.add_argument(flag, default=default)
    return parser


async def _serve(args: argparse.Namespace) -> None:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EmulatorConfig)}
    config = EmulatorConfig(**values)
    emulator = ProviderEmulator(args.upstream, config, host=args.host, port=args.port,
                                path=args.path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with emulator:
        sys.stdout.write(emulator.url + "\n")
        sys.stdout.flush()
        await stop.wait()
    sys.stderr.write(orjson.dumps(emulator.stats.as_dict()).decode() + "\n")


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
