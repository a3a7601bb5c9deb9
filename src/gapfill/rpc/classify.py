"""Every decision about what a failed JSON-RPC exchange means, in one place.

A failure is one of five :class:`Fault` values:

=================  ==========================================================  =========
fault              examples                                                    retried?
=================  ==========================================================  =========
RATE_LIMITED       HTTP 429; "rate limit"/"too many requests"/"request limit   yes, with
                   reached"/"500/second"; -32005 but a log-range limit         backoff
BATCH_TOO_LARGE    HTTP 413; "batch size exceeds"/"batch too large"            re-split
TRANSIENT          timeouts, stalls, resets, refused connections, 5xx but 501, yes
                   HTML/truncated bodies, -32603, "header not found"; geth's
                   -32000 "transaction indexing is in progress", "context
                   deadline exceeded", "unexpected EOF"; a node shutting down
UNSUPPORTED        -32601 method not found, -32004, "... not supported"; HTTP  no (other
                   405, a 403 "method ... not allowed". The client believes    endpoint)
                   an item's only when a request sent after that answer
                   arrived says it too (see ``RpcClient._believed``)
PERMANENT          -32602 invalid params, -32600, execution reverted, other    no
                   -32000, Infura's -32005 "query returned more than 10000
                   results", "exceeds max block range"; HTTP 401 and any
                   other 403 (``auth_refused``: a refused API key)
=================  ==========================================================  =========

A failure of the HTTP request as a whole is about the endpoint, not the calls: the
client sends them again, to another endpoint where there is one (setting aside for good
one that refused the key, ``auth_refused``), and gives up on a refused key at once when
there is none.

Infura answers both a rate limit and an oversized ``eth_getLogs`` with ``-32005``;
only the message tells them apart, so log-limit messages are checked first and are
permanent: discovery reads them to split its block ranges.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import math
import os
import re
import ssl
import time
from collections.abc import Mapping
from typing import Any

from gapfill.importing import lazy_pattern
from gapfill.records import record
from gapfill.rpc.tls import aiohttp


class Fault(enum.Enum):
    RATE_LIMITED = "rate_limited"
    BATCH_TOO_LARGE = "batch_too_large"
    TRANSIENT = "transient"
    UNSUPPORTED = "unsupported"
    PERMANENT = "permanent"

    @property
    def retryable(self) -> bool:
        return self in (Fault.RATE_LIMITED, Fault.BATCH_TOO_LARGE, Fault.TRANSIENT)


@record
class Verdict:
    """A classified failure: what it is, a short message, and how long to wait if told."""

    fault: Fault
    message: str
    code: int | None = None
    retry_after_s: float | None = None
    #: The node could not be reached at all (refused, no route, unknown host).
    unreachable: bool = False
    #: The endpoint refused the request's credentials (HTTP 401, or a 403 that is neither a
    #: rate limit nor a refused method): trying it again cannot pass.
    auth_refused: bool = False


# Order matters: the first matching rule wins.
_BATCH_TOO_LARGE = lazy_pattern(
    r"batch (size )?(is )?too (large|big|long)"
    r"|batch (size |length )?(limit|exceed)"
    r"|batch.{0,40}(exceeds|limit of|max(imum)? (size|length|allowed))"
    r"|too many (requests|calls|items|entries) in (the |a )?batch"
    r"|(payload|request entity|content|body|request) too large",
    re.IGNORECASE,
)
_LOG_LIMIT = lazy_pattern(
    r"query returned more than \d+ results"
    r"|more than \d+ (results|logs)"
    r"|exceed(s|ed)? (the )?(max(imum)?|allowed) (block )?range"
    r"|block range.{0,40}(too (large|wide|big)|limit|exceed|max)"
    r"|(range|logs?) (is )?too (large|wide|big)"
    r"|log response size exceeded"
    r"|response size (exceeded|too large|should not exceed)",
    re.IGNORECASE,
)
_RATE_LIMIT = lazy_pattern(
    r"rate.?limit"
    r"|too many requests"
    r"|request rate"
    r"|requests? per second"
    r"|compute units? per second"
    r"|exceeded .{0,30}(capacity|throughput|quota)"
    r"|(capacity|quota|throughput) exceeded"
    r"|daily request count"
    # EIP-1474's -32005 "limit exceeded", "request limit exceeded" (-32000 at some
    # providers), QuickNode's -32007 "500/second request limit reached"
    r"|(^|requests? )limit (exceeded|reached)"
    r"|\d+ ?/ ?sec(ond)?\b|\d+ ?(req(uest)?s?|calls?) ?/ ?s\b"
    r"|slow down",
    re.IGNORECASE,
)
_UNSUPPORTED = lazy_pattern(
    r"method .{0,60}(not found|does not exist|not available|not supported|not whitelisted"
    r"|not allowed|disabled|unsupported)"
    r"|unsupported method"
    r"|unknown method"
    r"|not supported"
    r"|no such method",
    re.IGNORECASE,
)
_REVERTED = lazy_pattern(r"execution reverted|\brevert", re.IGNORECASE)
_TRANSIENT = lazy_pattern(
    r"time.?out|timed out|header not found|unknown block|missing trie node|try again"
    r"|temporar|busy|overload|unavailable|internal error|upstream|gateway|no backends?"
    r"|not synced|syncing|connection|reset"
    # geth (and its forks: bsc, op-geth) while it builds its transaction index after a
    # (snap) sync or a --history.transactions change: -32000, and the index does come
    r"|(transaction )?index(ing|er) (is )?(still )?(in progress|running|not ready)"
    # Go nodes (geth, erigon) answering a request their own deadline or a lost backend cut
    r"|context deadline exceeded|context canceled|unexpected EOF|broken pipe"
    # a node on its way down or not yet up (geth's leveldb/pebble, erigon's mdbx)
    r"|(database|db|leveldb|pebble|mdbx)(:| is)? closed|shutting down|not ready"
    r"|no suitable peers",
    re.IGNORECASE,
)
_TRY_AGAIN_IN = lazy_pattern(
    r"(?:try again|retry|back ?off|wait)\D{0,20}?(\d+(?:\.\d+)?)\s*"
    r"(ms|milliseconds?|s\b|secs?|seconds?|m\b|mins?|minutes?)?",
    re.IGNORECASE,
)
_BACKOFF_KEYS = (
    "backoff_seconds",
    "backoff_s",
    "backoff",
    "retry_after",
    "retryAfter",
    "retry_after_seconds",
    "retry_in",
    "wait_seconds",
    "backoff_ms",
    "retry_after_ms",
    "retryAfterMs",
)

#: Longest wait gapfill will honour from one hint; longer hints mean a quota is gone. The
#: hints are returned whole: the client tells the one from the other (see RpcClient).
MAX_HONOURED_WAIT_S = 600.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value: delta-seconds or an HTTP date."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        current = time.time() if now is None else now
        seconds = when.timestamp() - current
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(seconds, 0.0)


def _unit_seconds(amount: float, unit: str | None) -> float:
    unit = (unit or "s").lower()
    if unit.startswith("ms") or unit.startswith("milli"):
        return amount / 1000.0
    if unit.startswith("m"):
        return amount * 60.0
    return amount


def _find_backoff(data: Any, depth: int = 0) -> float | None:
    if depth > 4:
        return None
    if isinstance(data, Mapping):
        for key in _BACKOFF_KEYS:
            value = data.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value) / 1000.0 if key.lower().endswith("ms") else float(value)
            if isinstance(value, str):
                parsed = parse_retry_after(value)
                if parsed is not None:
                    return parsed
        for value in data.values():
            found = _find_backoff(value, depth + 1)
            if found is not None:
                return found
    elif isinstance(data, list):
        for value in data[:8]:
            found = _find_backoff(value, depth + 1)
            if found is not None:
                return found
    return None


def retry_after_from_error(error: Mapping[str, Any]) -> float | None:
    """A wait hint inside a JSON-RPC error object: ``data.backoff_seconds`` and kin, or
    "try again in 2s" in the message."""
    found = _find_backoff(error.get("data"))
    if found is None:
        match = _TRY_AGAIN_IN.search(str(error.get("message", "")))
        if match:
            found = _unit_seconds(float(match.group(1)), match.group(2))
    if found is None:
        return None
    return max(found, 0.0)


def _as_code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def classify_error(error: Any) -> Verdict:
    """Classify a JSON-RPC ``error`` member (of one batch item or of the whole reply)."""
    if not isinstance(error, Mapping):
        return Verdict(Fault.TRANSIENT, f"malformed error member: {str(error)[:200]}")
    code = _as_code(error.get("code"))
    message = str(error.get("message", "")).strip() or "no message"
    data = error.get("data")
    # Some nodes put the useful part of the message in ``data`` (a string).
    text = f"{message} {data}" if isinstance(data, str) else message
    shown = f"{message[:300]} (code {code})" if code is not None else message[:300]
    if _BATCH_TOO_LARGE.search(text):
        return Verdict(Fault.BATCH_TOO_LARGE, shown, code)
    if _LOG_LIMIT.search(text):
        return Verdict(Fault.PERMANENT, shown, code)
    if code in (429, -32005) or _RATE_LIMIT.search(text):
        # -32005 is EIP-1474's "limit exceeded"; Infura's log limits under it matched above
        return Verdict(Fault.RATE_LIMITED, shown, code, retry_after_from_error(error))
    if code in (-32601, -32004) or _UNSUPPORTED.search(text):
        return Verdict(Fault.UNSUPPORTED, shown, code)
    if code == 3 or _REVERTED.search(text):
        return Verdict(Fault.PERMANENT, shown, code)
    if code in (-32602, -32600):
        return Verdict(Fault.PERMANENT, shown, code)
    if code in (-32603, -32700) or _TRANSIENT.search(text):
        return Verdict(Fault.TRANSIENT, shown, code, retry_after_from_error(error))
    if code is not None and -32099 <= code <= -32001:
        # Implementation-defined server errors: most often overload of some kind.
        return Verdict(Fault.TRANSIENT, shown, code)
    # -32000 and anything unrecognised: geth's generic "this cannot be done".
    return Verdict(Fault.PERMANENT, shown, code)


def _body_text(body: bytes, limit: int = 300) -> str:
    text = body[:limit].decode("utf-8", errors="replace").strip()
    return " ".join(text.split())


def shown_body(body: bytes) -> str:
    """A reply body as a message may quote it: its first words, or 'an HTML page'."""
    return "an HTML page" if looks_like_html(body) else _body_text(body)


def looks_like_html(body: bytes) -> bool:
    head = body[:200].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<"))


def node_failing(status: int) -> bool:
    """Whether HTTP ``status`` says the node (or its gateway) is failing for now: a 5xx,
    but 501 Not Implemented, which a web server that takes no POST (Python's http.server,
    a static site) answers every request and every retry. Like a 404, that is the wrong
    URL, not a node to wait for."""
    return status >= 500 and status != 501


def classify_http(
    status: int, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> Verdict | None:
    """Classify a non-2xx HTTP reply; ``None`` for 2xx (the body is then read as JSON-RPC)."""
    if 200 <= status < 300:
        return None
    retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
    text = _body_text(body)
    shown = shown_body(body)  # what a message quotes
    if status == 429:
        if retry_after is None:
            retry_after = _retry_after_in_body(body)
        return Verdict(Fault.RATE_LIMITED, f"HTTP 429 {shown}".strip(), 429, retry_after)
    if status == 413 or _BATCH_TOO_LARGE.search(text):
        return Verdict(Fault.BATCH_TOO_LARGE, f"HTTP {status} {shown}".strip(), status)
    if _RATE_LIMIT.search(text):
        if retry_after is None:
            retry_after = _retry_after_in_body(body)
        return Verdict(Fault.RATE_LIMITED, f"HTTP {status} {shown}".strip(), status, retry_after)
    if node_failing(status) or status in (408, 425):
        return Verdict(Fault.TRANSIENT, f"HTTP {status} {shown}".strip(), status, retry_after)
    if status == 405 or (status == 403 and _UNSUPPORTED.search(text)):
        # Some providers refuse a method the plan does not include with a 403.
        return Verdict(Fault.UNSUPPORTED, f"HTTP {status} {shown}".strip(), status)
    if status in (401, 403):
        return Verdict(Fault.PERMANENT, f"HTTP {status}: the provider refused the request", status,
                       auth_refused=True)  # fmt: skip
    return Verdict(Fault.PERMANENT, f"HTTP {status} {shown}".strip(), status)


def _retry_after_in_body(body: bytes) -> float | None:
    import orjson

    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        match = _TRY_AGAIN_IN.search(_body_text(body))
        return _unit_seconds(float(match.group(1)), match.group(2)) if match else None
    if isinstance(decoded, Mapping):
        error = decoded.get("error")
        if isinstance(error, Mapping):
            return retry_after_from_error(error)
        return _find_backoff(decoded)
    return None


def classify_bad_body(body: bytes) -> Verdict:
    """A 2xx reply whose body is not JSON-RPC: an HTML error page, a cut-off body, empty."""
    if not body.strip():
        return Verdict(Fault.TRANSIENT, "empty response body")
    if looks_like_html(body):
        return Verdict(Fault.TRANSIENT, "HTML instead of JSON in the response body")
    return Verdict(Fault.TRANSIENT, f"invalid or truncated JSON in the response body ({len(body)} bytes)")


def _tls_failure(error: BaseException) -> str:
    """A failed TLS handshake, in words (its errno is OpenSSL's, not the OS's: strerror(1)
    would say "operation not permitted")."""
    if isinstance(error, ssl.SSLCertVerificationError):
        why = error.verify_message or error.reason or "not trusted"
        return (f"the TLS certificate was refused ({why}): check the host name in the URL, "
                "or the machine's CA certificates")  # fmt: skip
    reason = str(getattr(error, "reason", None) or error or "handshake failed")
    if reason == "WRONG_VERSION_NUMBER":  # the usual sign of plain HTTP on the other end
        return "TLS handshake failed (the server does not speak TLS): use http:// for this node"
    return f"TLS handshake failed ({reason.lower().replace('_', ' ')})"


def classify_exception(exc: BaseException, *, read_timeout_s: float | None = None) -> Verdict:
    """Classify an exception from the HTTP layer (all are transient: the node may come back)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Verdict(Fault.TRANSIENT, "connection timed out", unreachable=True)
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        if read_timeout_s is not None:
            return Verdict(Fault.TRANSIENT, f"no response within {read_timeout_s:g} s")
        return Verdict(Fault.TRANSIENT, "timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return Verdict(Fault.TRANSIENT, f"host {exc.host} not found", unreachable=True)
        if isinstance(exc, aiohttp.ClientSSLError) or isinstance(exc.os_error, ssl.SSLError):
            return Verdict(Fault.TRANSIENT, _tls_failure(exc.os_error), unreachable=True)
        number = exc.os_error.errno
        if number:
            reason = os.strerror(number)
        else:
            reason = exc.os_error.strerror or str(exc.os_error) or "connection failed"
        return Verdict(Fault.TRANSIENT, reason.lower(), unreachable=True)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Verdict(Fault.TRANSIENT, "server closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Verdict(Fault.TRANSIENT, "response body cut off")
    if isinstance(exc, ConnectionResetError):
        return Verdict(Fault.TRANSIENT, "connection reset")
    if isinstance(exc, aiohttp.ClientOSError):
        reason = exc.strerror or str(exc) or "connection error"
        return Verdict(Fault.TRANSIENT, reason.lower())
    if isinstance(exc, aiohttp.ClientResponseError):
        return Verdict(Fault.TRANSIENT, f"HTTP {exc.status} {exc.message}")
    return Verdict(Fault.TRANSIENT, f"{type(exc).__name__}: {exc}")


def is_retryable(verdict: Verdict) -> bool:
    return verdict.fault.retryable
