"""The one table that decides what an RPC failure means (gapfill.rpc.classify)."""

from __future__ import annotations

import email.utils
import ssl

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from gapfill.rpc import parse_rpc_urls
from gapfill.rpc.classify import (
    Fault,
    classify_bad_body,
    classify_error,
    classify_exception,
    classify_http,
    parse_retry_after,
    retry_after_from_error,
)

ERRORS = [
    # (code, message, expected fault)
    (-32005, "query returned more than 10000 results", Fault.PERMANENT),
    (-32005, "query returned more than 10000 results. Try with this block range [0x1, 0x5].",
     Fault.PERMANENT),
    (-32600, "query exceeds max block range 100", Fault.PERMANENT),
    (-32602, "Log response size exceeded. You can make eth_getLogs requests with up to a 2K "
             "block range", Fault.PERMANENT),
    (-32000, "exceed maximum block range: 5000", Fault.PERMANENT),
    (-32005, "daily request count exceeded, request rate limited", Fault.RATE_LIMITED),
    (-32005, "project ID request rate exceeded", Fault.RATE_LIMITED),
    (429, "Your app has exceeded its compute units per second capacity", Fault.RATE_LIMITED),
    (-32000, "rate limit reached", Fault.RATE_LIMITED),
    (-32016, "Too Many Requests", Fault.RATE_LIMITED),
    # EIP-1474's own -32005 wording, QuickNode's -32007, a -32000 some providers send: read
    # as other faults, they were given up after 3 tries (or at once) with no rate learned
    (-32005, "limit exceeded", Fault.RATE_LIMITED),
    (-32005, "Limit exceeded: request exceeds defined limit", Fault.RATE_LIMITED),
    (-32007, "500/second request limit reached - reduce calls per second or upgrade your "
             "account at quicknode.com", Fault.RATE_LIMITED),
    (-32000, "request limit exceeded", Fault.RATE_LIMITED),
    (-32000, "request limit reached", Fault.RATE_LIMITED),
    (-32000, "exceeds block gas limit", Fault.PERMANENT),
    (-32600, "batch size exceeds the limit of 50 requests", Fault.BATCH_TOO_LARGE),
    (-32000, "Batch size too large", Fault.BATCH_TOO_LARGE),
    (-32600, "too many requests in batch", Fault.BATCH_TOO_LARGE),
    (-32601, "the method eth_getBlockReceipts does not exist/is not available",
     Fault.UNSUPPORTED),
    (-32000, "Unsupported method: eth_getBlockReceipts", Fault.UNSUPPORTED),
    (-32000, "eth_getBlockReceipts is not supported", Fault.UNSUPPORTED),
    (-32004, "method not supported", Fault.UNSUPPORTED),
    (-32602, "invalid argument 0: hex string has length 3, want 64", Fault.PERMANENT),
    (3, "execution reverted: ERC20: transfer amount exceeds balance", Fault.PERMANENT),
    (-32000, "execution reverted", Fault.PERMANENT),
    (-32000, "nonce too low", Fault.PERMANENT),
    (-32603, "internal error", Fault.TRANSIENT),
    (-32000, "header not found", Fault.TRANSIENT),
    (-32000, "request timed out", Fault.TRANSIENT),
    # geth answers these with the generic -32000, yet each passes: its transaction index
    # being built (after a sync), its own deadline, a backend cut mid-answer, a node going down
    (-32000, "transaction indexing is in progress", Fault.TRANSIENT),
    (-32000, "transaction indexer is still running", Fault.TRANSIENT),
    (-32000, "context deadline exceeded", Fault.TRANSIENT),
    (-32000, "context canceled", Fault.TRANSIENT),
    (-32000, "unexpected EOF", Fault.TRANSIENT),
    (-32000, "leveldb: closed", Fault.TRANSIENT),
    (-32000, "pebble: closed", Fault.TRANSIENT),
    (-32000, "server is shutting down", Fault.TRANSIENT),
    (-32000, "no suitable peers available", Fault.TRANSIENT),
    (-32050, "something implementation defined", Fault.TRANSIENT),
]


@pytest.mark.parametrize(("code", "message", "fault"), ERRORS)
def test_error_objects_are_classified(code: int, message: str, fault: Fault) -> None:
    assert classify_error({"code": code, "message": message}).fault is fault


def test_infura_log_limit_is_not_a_rate_limit() -> None:
    verdict = classify_error({"code": -32005, "message": "query returned more than 10000 results"})
    assert verdict.fault is Fault.PERMANENT
    assert verdict.code == -32005
    assert not verdict.fault.retryable


def test_message_in_data_is_read() -> None:
    verdict = classify_error({"code": -32000, "message": "error", "data": "rate limit hit"})
    assert verdict.fault is Fault.RATE_LIMITED


@pytest.mark.parametrize(
    ("status", "body", "fault"),
    [
        (429, b"", Fault.RATE_LIMITED),
        (413, b"Request Entity Too Large", Fault.BATCH_TOO_LARGE),
        (400, b'{"error":{"code":-32600,"message":"batch size exceeds 10"}}', Fault.BATCH_TOO_LARGE),
        (500, b"oops", Fault.TRANSIENT),
        (502, b"<html><body>Bad gateway</body></html>", Fault.TRANSIENT),
        (503, b"", Fault.TRANSIENT),
        (401, b"invalid project id", Fault.PERMANENT),
        (403, b"", Fault.PERMANENT),
        (400, b"too many requests, slow down", Fault.RATE_LIMITED),
        (404, b"not found", Fault.PERMANENT),
    ],
)
def test_http_statuses(status: int, body: bytes, fault: Fault) -> None:
    verdict = classify_http(status, {}, body)
    assert verdict is not None
    assert verdict.fault is fault


def test_a_401_or_403_is_a_refused_key_unless_its_body_says_otherwise() -> None:
    # Some providers answer a rate limit, or a method their plan does not include, with a 403.
    for status, body in ((401, b"invalid project id"), (403, b""), (403, b"Forbidden")):
        verdict = classify_http(status, {}, body)
        assert verdict is not None and verdict.auth_refused
    for body, fault in ((b"rate limit exceeded", Fault.RATE_LIMITED),
                        (b"method trace_filter is not whitelisted", Fault.UNSUPPORTED)):  # fmt: skip
        verdict = classify_http(403, {}, body)
        assert verdict is not None and (verdict.fault, verdict.auth_refused) == (fault, False)


def test_http_2xx_is_left_to_the_body() -> None:
    assert classify_http(200, {}, b"{}") is None


def test_bad_bodies_are_transient() -> None:
    for body in (b"", b"<!DOCTYPE html><html></html>", b'[{"jsonrpc":"2.0","id":1,"res'):
        assert classify_bad_body(body).fault is Fault.TRANSIENT


def test_retry_after_seconds_and_date() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") == 0.0
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(7.0, abs=1.0)
    past = email.utils.formatdate(now - 100, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("999999") == 999999.0  # whole: a quota spent, not a pause


def test_retry_after_header_is_taken_from_429() -> None:
    verdict = classify_http(429, {"Retry-After": "3"}, b"")
    assert verdict is not None and verdict.retry_after_s == 3.0


def test_retry_after_in_json_bodies() -> None:
    assert retry_after_from_error({"code": 429, "data": {"backoff_seconds": 2}}) == 2.0
    infura = {"code": -32005, "message": "request rate limited",
              "data": {"rate": {"allowed_rps": 1, "backoff_seconds": 30, "current_rps": 1.4}}}
    assert retry_after_from_error(infura) == 30.0
    assert retry_after_from_error({"message": "rate limited, try again in 2s"}) == 2.0
    assert retry_after_from_error({"message": "Too many requests, retry in 250ms"}) == 0.25
    assert retry_after_from_error({"data": {"retry_after_ms": 1500}}) == 1.5
    assert retry_after_from_error({"message": "rate limited"}) is None
    body = b'{"jsonrpc":"2.0","id":null,"error":{"code":429,"data":{"backoff_seconds":2}}}'
    verdict = classify_http(429, {}, body)
    assert verdict is not None and verdict.retry_after_s == 2.0


def test_parse_rpc_urls() -> None:
    assert parse_rpc_urls(["http://a, http://b", "http://c", "http://a", " "]) == [
        "http://a", "http://b", "http://c"]


def test_a_refused_certificate_names_the_reason() -> None:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    error.verify_message = "self-signed certificate"
    key = ConnectionKey("node.example", 443, True, True, None, None, None)
    verdict = classify_exception(aiohttp.ClientConnectorCertificateError(key, error))
    assert verdict.unreachable and verdict.message == (
        "the TLS certificate was refused (self-signed certificate): check the host name in the URL, "
        "or the machine's CA certificates"
    )
