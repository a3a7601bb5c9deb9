"""RpcClient against a fake JSON-RPC server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from gapfill.errors import NodeUnavailable, RpcError
from gapfill.rpc import Call, CallError, EndpointConfig, RpcClient, RpcSettings
from gapfill.rpc.budget import LEARNED_CAP_TTL_S, budget_path, read_learned_cap, write_learned_cap
from gapfill.rpc.endpoint import GROW_AFTER_SUCCESSES, Endpoint
from gapfill.rpc.transport import HttpReply

pytestmark = pytest.mark.timeout(20)

KEY = "abcdefghijklmnopqrstuvwxyz123456"

def ok(call: dict[str, Any], result: Any = None) -> dict[str, Any]:
    """Echo the first param back as the result unless told otherwise."""
    if result is None and call.get("params"):
        result = call["params"][0]
    return {"jsonrpc": "2.0", "id": call["id"], "result": result}


def err(call: dict[str, Any] | None, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None if call is None else call["id"],
            "error": {"code": code, "message": message}}


def as_batch(body: Any) -> list[dict[str, Any]]:
    return body if isinstance(body, list) else [body]


def reply(body: Any, answers: list[dict[str, Any]], **kw: Any) -> web.Response:
    payload = answers[0] if isinstance(body, dict) and len(answers) == 1 else answers
    return web.Response(body=orjson.dumps(payload), content_type="application/json", **kw)


class FakeNode:
    """A loopback JSON-RPC server whose behaviour is a function of the decoded body."""

    def __init__(self, behaviour: Callable[[FakeNode, Any], web.Response]) -> None:
        self.behaviour = behaviour
        self.requests: list[Any] = []
        self.calls = 0
        self.stop = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.requests.append(body)
        self.calls += len(as_batch(body))
        response = self.behaviour(self, body)
        if inspect.isawaitable(response):
            response = await response
        return response

    async def start(self, path: str = "/") -> FakeNode:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}{path}"
        return self

    async def close(self) -> None:
        self.stop.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def make_node() -> AsyncIterator[Callable[..., Any]]:
    nodes: list[FakeNode] = []

    async def make(behaviour: Callable[[FakeNode, Any], web.Response], path: str = "/"):
        node = await FakeNode(behaviour).start(path)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.close()


def echo(node: FakeNode, body: Any) -> web.Response:
    return reply(body, [ok(c) for c in as_batch(body)])


def settings(tmp_path: Any, **kw: Any) -> RpcSettings:
    base = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "read_timeout_s": 2.0,
            "null_backoff_s": 0.01, "null_backoff_max_s": 0.05, "budget_dir": str(tmp_path)}
    base.update(kw)
    return RpcSettings(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def refused() -> Iterator[Callable[[], int]]:
    """Loopback ports that refuse connections: each is held bound, never listening, for
    the test. A port found free and let go (``free_port``) could meanwhile be taken by a
    server of a test in the other xdist process, which would then answer."""
    with contextlib.ExitStack() as held:

        def port() -> int:
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            bound: int = s.getsockname()[1]
            return bound

        yield port


# -- id matching ------------------------------------------------------------------------


async def test_reordered_missing_and_duplicate_ids(make_node: Any, tmp_path: Any) -> None:
    dropped: set[str] = set()

    def messy(node: FakeNode, body: Any) -> web.Response:
        answers = []
        for call in as_batch(body):
            tag = call["params"][0]
            if tag.endswith("7") and tag not in dropped:  # left out once
                dropped.add(tag)
                continue
            answers.append(ok(call))
        if answers:
            first = answers[0]
            answers.append({**first, "result": "WRONG"})  # a repeat: first answer wins
            answers.append({"jsonrpc": "2.0", "id": 999_999, "result": "stranger"})
        answers.reverse()
        answers.insert(0, {**first, "result": first["result"]})
        return reply(body, answers)

    node = await make_node(messy)
    calls = [Call("echo", [f"v{i}"]) for i in range(30)]
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        results = await client.call_many(calls)
    assert results == [f"v{i}" for i in range(30)]
    assert len(dropped) == 3
    assert len(node.requests) == 2  # one batch, then one for the three left out


async def test_one_item_error_is_its_own(make_node: Any, tmp_path: Any) -> None:
    def one_bad(node: FakeNode, body: Any) -> web.Response:
        return reply(body, [
            err(c, -32602, "invalid argument 0") if c["params"][0] == "bad" else ok(c)
            for c in as_batch(body)
        ])

    node = await make_node(one_bad)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        results = await client.call_many([Call("echo", ["a"]), Call("echo", ["bad"]),
                                          Call("echo", ["c"])])
        assert results[0] == "a" and results[2] == "c"
        assert isinstance(results[1], CallError)
        assert results[1].kind == "permanent" and results[1].code == -32602
        assert node.calls == 3  # never retried
        with pytest.raises(RpcError, match="execution reverted"):
            node.behaviour = lambda n, b: reply(b, [err(c, 3, "execution reverted")
                                                    for c in as_batch(b)])
            await client.call("eth_call", [{}])
        assert node.calls == 4
        node.behaviour = lambda n, b: reply(b, [err(c, -32601, "method not found")
                                                for c in as_batch(b)])
        with pytest.raises(RpcError, match=r"does not serve eth_nope \(asked twice, it answered: "
                                           r"method not found \(code -32601\)\)"):  # fmt: skip
            await client.call("eth_nope", [])
        assert node.calls == 6  # believed when a second request says it too (see below)


# -- a method an endpoint says it lacks ---------------------------------------------------

RECEIPT_CALL = Call("eth_getTransactionReceipt", ["0x" + "ab" * 32])


def lacks_once(lacking: set[str], times: int = 1) -> Callable[[FakeNode, Any], web.Response]:
    """A node (a load balancer's bad backend, now and then) that answers the first ``times``
    requests holding a method of ``lacking`` with -32601 for those calls."""
    refusals = iter(range(times))

    def behave(node: FakeNode, body: Any) -> web.Response:
        refuse = any(c["method"] in lacking for c in as_batch(body)) and next(refusals, None) is not None
        return reply(body, [err(c, -32601, f"the method {c['method']} does not exist/is not available")
                            if refuse and c["method"] in lacking else ok(c)
                            for c in as_batch(body)])  # fmt: skip

    return behave


async def test_one_method_not_found_answer_does_not_set_the_method_aside(
    make_node: Any, tmp_path: Any
) -> None:
    # It did, for the client's life: with one endpoint every later receipt failed unsent as
    # "no RPC endpoint serves eth_getTransactionReceipt", and each ref asking became a
    # permanent failure.
    node = await make_node(lacks_once({RECEIPT_CALL.method}))
    refused: list[str] = []
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        client.on_refused = refused.append
        first = await client.call_many([RECEIPT_CALL, Call("eth_blockNumber", ["0x1"])])
        assert first == [RECEIPT_CALL.params[0], "0x1"]  # asked again, and answered
        sent = len(node.requests)
        assert await client.call_many([RECEIPT_CALL]) == [RECEIPT_CALL.params[0]]
        assert len(node.requests) == sent + 1  # reached the node
    assert refused == []


async def test_method_not_found_from_an_endpoint_that_served_it_may_pass(
    make_node: Any, tmp_path: Any
) -> None:
    # Once it has answered the method, however often it says it lacks it, that is a failure
    # that may pass: the call ends transient (its ref stays in the gap), never permanent,
    # and the method is not set aside.
    node = await make_node(lacks_once({RECEIPT_CALL.method}, times=0))
    refused: list[str] = []
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        client.on_refused = refused.append
        assert await client.call_many([RECEIPT_CALL]) == [RECEIPT_CALL.params[0]]
        node.behaviour = lacks_once({RECEIPT_CALL.method}, times=100)
        [failed] = await client.call_many([RECEIPT_CALL])
        assert isinstance(failed, CallError) and failed.kind == "transient", failed
        assert "does not exist" in failed.message and "after 3 attempts" in failed.message
        node.behaviour = echo
        assert await client.call_many([RECEIPT_CALL]) == [RECEIPT_CALL.params[0]]
    assert refused == []


async def test_a_method_no_endpoint_serves_stops_the_caller_with_one_sentence(
    make_node: Any, tmp_path: Any
) -> None:
    # Said twice (two requests) by an endpoint that never answered it: believed. With no other
    # endpoint, the call fails (not permanent: the node is at fault, not the ref) with the
    # start-up check's sentence, and on_refused hears it (a worker stops the run on it).
    node = await make_node(lacks_once({"eth_getBlockByNumber"}, times=100), path=f"/v3/{KEY}")
    refused: list[str] = []
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        client.on_refused = refused.append
        [failed] = await client.call_many([Call("eth_getBlockByNumber", ["0x1", False])])
        assert len(node.requests) == 2
        shown = node.url.replace(KEY, "***")
        sentence = (f"the RPC node ({shown}) does not serve eth_getBlockByNumber (asked twice, it "
                    "answered: the method eth_getBlockByNumber does not exist/is not available (code "
                    "-32601)): point --rpc-url or ETH_RPC_URL at another node")  # fmt: skip
        fix = "point --rpc-url or ETH_RPC_URL at another node"
        assert failed == CallError("transient", sentence, None, fix)
        assert refused == [sentence]
        [again] = await client.call_many([Call("eth_getBlockByNumber", ["0x2", False])])
        assert len(node.requests) == 2  # not sent again
        assert isinstance(again, CallError) and again.kind == "transient" and again.fix is not None
    assert KEY not in " ".join(refused)


async def test_two_requests_in_flight_together_are_not_method_not_found_said_twice(
    make_node: Any, tmp_path: Any
) -> None:
    # Two requests for eth_getBlockByNumber sent at the same moment met the same bad backend:
    # the second answer counted as "said twice", so the method was set aside and on_refused
    # stopped the run ("does not serve eth_getBlockByNumber") for a node that serves it. Only
    # a request sent after the first such answer arrived is a second look.
    both_in = asyncio.Event()
    lacked: list[int] = []

    async def behave(node: FakeNode, body: Any) -> web.Response:
        if len(node.requests) <= 2:
            if len(node.requests) == 2:
                both_in.set()
            await both_in.wait()  # both in flight before either is answered
            lacked.append(len(node.requests))
            return reply(body, [err(c, -32601, "the method does not exist/is not available")
                                for c in as_batch(body)])  # fmt: skip
        return echo(node, body)

    node = await make_node(behave)
    refused: list[str] = []
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        client.on_refused = refused.append
        calls = [Call("eth_getBlockByNumber", [hex(block), False]) for block in (1, 2)]
        got = await asyncio.gather(*(client.call_many([call]) for call in calls))
        assert got == [["0x1"], ["0x2"]]
    assert len(lacked) == 2 and len(node.requests) == 4
    assert refused == []


async def test_a_method_one_endpoint_lacks_goes_to_another(make_node: Any, tmp_path: Any) -> None:
    lacking = await make_node(lacks_once({"eth_getBlockByNumber"}, times=100))
    serving = await make_node(echo)
    refused: list[str] = []
    endpoints = [EndpointConfig(lacking.url), EndpointConfig(serving.url)]
    async with RpcClient(endpoints, settings(tmp_path)) as client:
        client.on_refused = refused.append
        for block in range(6):
            calls = [Call("eth_getBlockByNumber", [hex(block * 10 + i), False]) for i in range(10)]
            assert await client.call_many(calls) == [c.params[0] for c in calls]
    assert refused == []
    # Believed on its second refusal: not asked the method again after that.
    assert 1 <= len(lacking.requests) <= 2, lacking.requests


# -- retries ----------------------------------------------------------------------------


async def test_transient_failures_are_retried(make_node: Any, tmp_path: Any) -> None:
    script = iter([
        web.Response(status=503, text="busy"),
        web.Response(status=200, body=b"<html><body>502 Bad Gateway</body></html>"),
        None,
    ])

    def flaky(node: FakeNode, body: Any) -> web.Response:
        return next(script) or echo(node, body)

    node = await make_node(flaky)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        assert await client.call("echo", ["x"]) == "x"
        stats = next(iter(client.stats().values()))
    assert len(node.requests) == 3
    assert stats.retries == 2 and stats.errors == 2 and stats.requests == 3


async def test_truncated_json_is_retried(make_node: Any, tmp_path: Any) -> None:
    state = {"n": 0}

    def truncating(node: FakeNode, body: Any) -> web.Response:
        state["n"] += 1
        response = echo(node, body)
        if state["n"] == 1:
            assert isinstance(response.body, bytes)
            return web.Response(body=response.body[:10], content_type="application/json")
        return response

    node = await make_node(truncating)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        assert await client.call_many([Call("echo", [1]), Call("echo", [2])]) == [1, 2]


async def test_stall_is_cut_after_read_timeout(make_node: Any, tmp_path: Any) -> None:
    state = {"n": 0}

    async def stalling(node: FakeNode, body: Any) -> web.Response:
        state["n"] += 1
        if state["n"] == 1:
            await node.stop.wait()  # a response that never comes
        return echo(node, body)

    node = await make_node(stalling)
    started = time.monotonic()
    async with RpcClient([EndpointConfig(node.url)],
                         settings(tmp_path, read_timeout_s=0.3)) as client:
        assert await client.call("echo", ["late"]) == "late"
    assert 0.3 <= time.monotonic() - started < 3
    assert state["n"] == 2


@contextlib.asynccontextmanager
async def paced_node(body_for: Callable[[Any], bytes], chunk: int, every_s: float) -> AsyncIterator[str]:
    """A loopback HTTP server that sends its headers at once, then the body
    ``body_for(request)`` ``chunk`` bytes every ``every_s`` seconds; yields its URL."""

    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))  # fmt: skip
        body = body_for(orjson.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
        try:
            with contextlib.suppress(ConnectionError):
                for at in range(0, len(body), chunk):
                    writer.write(body[at:at + chunk])
                    await writer.drain()
                    await asyncio.sleep(every_s)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()
        for task in handlers:  # a trickle still going
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_a_trickling_body_is_cut(tmp_path: Any) -> None:
    # Headers, then a byte every 0.2 s: under a read timeout of 0.5 s (sock_read, and no
    # total) the request ran as long as the body lasted, a stuck proxy's for ever.
    async with paced_node(lambda request: b" " * 300, 1, 0.2) as url, RpcClient(
            [EndpointConfig(url)], settings(tmp_path, read_timeout_s=0.5, attempts=1)) as client:
        out = await asyncio.wait_for(client.call_many([Call("eth_x", ["0x1"])]), 5.0)
    assert isinstance(out[0], CallError) and "no response within 0.5 s" in out[0].message, out


async def test_a_big_body_on_a_slow_link_gets_through(tmp_path: Any) -> None:
    # The body's deadline grows with what arrived: 96 KiB at 48 KiB/s, past the read
    # timeout (0.5 s) and within the rule (0.5 s + 16 KiB/s).
    def big(request: Any) -> bytes:
        return orjson.dumps(ok(request, "0x" + "ab" * 48 * 1024))

    async with paced_node(big, 4096, 4096 / (48 * 1024)) as url, RpcClient(
            [EndpointConfig(url)], settings(tmp_path, read_timeout_s=0.5, attempts=1)) as client:
        started = time.monotonic()
        assert (await client.call("eth_x", [])).startswith("0xabab")
    assert time.monotonic() - started > 1.0  # it did take longer than the read timeout


async def test_a_hung_name_lookup_is_cut_after_the_connect_timeout(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Name lookups are bounded by no aiohttp timeout set (sock_connect starts after them).
    import aiohttp.connector
    import aiohttp.resolver

    class Hung(aiohttp.resolver.ThreadedResolver):
        async def resolve(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.Event().wait()

    monkeypatch.setattr(aiohttp.resolver, "DefaultResolver", Hung)
    monkeypatch.setattr(aiohttp.connector, "DefaultResolver", Hung)
    async with RpcClient([EndpointConfig("http://node.invalid/")],
                         settings(tmp_path, connect_timeout_s=0.3, attempts=1)) as client:  # fmt: skip
        out = await asyncio.wait_for(client.call_many([Call("eth_x", [])]), 5.0)
    assert isinstance(out[0], CallError), out
    assert out[0].message.startswith(
        "could not reach the RPC node at http://node.invalid/: connection timed out"), out


async def test_exhausted_retries_raise_one_redacted_sentence(
    make_node: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def leaky(node: FakeNode, body: Any) -> web.Response:
        return web.Response(status=500, text=f"internal error at {node.url} key={KEY}")

    node = await make_node(leaky, path=f"/v2/{KEY}")
    caplog.set_level(logging.DEBUG, logger="gapfill")
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        with pytest.raises(RpcError) as info:
            await client.call("eth_blockNumber", [])
        keys = list(client.stats())
    message = str(info.value)
    assert KEY not in message and "/v2/***" in message
    assert "HTTP 500" in message and "after 3 attempts" in message
    assert len(node.requests) == 3
    assert all(KEY not in k for k in keys)
    assert KEY not in caplog.text


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_api_key_fails_at_once_and_says_to_check_it(
    make_node: Any, tmp_path: Any, status: int
) -> None:
    # Retrying a refused key cannot pass: one request, one sentence, the key not shown.
    def refuse(node: FakeNode, body: Any) -> web.Response:
        return web.Response(status=status, text=f"invalid API key {KEY}")

    node = await make_node(refuse, path=f"/v3/{KEY}")
    shown = node.url.replace(KEY, "***")
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        with pytest.raises(RpcError) as info:
            await client.probe()
        assert not isinstance(info.value, NodeUnavailable)  # a worker is not restarted for it
        assert str(info.value) == (
            f"eth_chainId failed: the RPC node at {shown} refused the request "
            f"(HTTP {status}): check the API key in --rpc-url or ETH_RPC_URL"
        )
        assert len(node.requests) == 1
        with pytest.raises(RpcError, match="check the API key"):
            await client.call("eth_blockNumber", [])
        assert len(node.requests) == 2


async def test_a_refused_api_key_leaves_the_calls_to_another_endpoint(make_node: Any, tmp_path: Any) -> None:
    # The refusing endpoint is set aside for good after its first refusal, said once (it was
    # asked again each time its breaker's pause ran out, and nothing said why it was).
    refusing = await make_node(lambda node, body: web.Response(status=401, text="bad key"),
                               path=f"/v3/{KEY}")  # fmt: skip
    good = await make_node(echo)
    endpoints = [EndpointConfig(refusing.url), EndpointConfig(good.url)]
    told: list[str] = []
    refused: list[str] = []
    async with RpcClient(endpoints, settings(tmp_path, max_in_flight=1)) as client:
        client.tell, client.on_refused = told.append, refused.append
        for _ in range(10):
            assert await client.call_many([Call("echo", [i]) for i in range(5)]) == list(range(5))
    assert len(refusing.requests) == 1
    shown = refusing.url.replace(KEY, "***")
    assert told == [
        f"set aside for this run: the RPC node at {shown} refused the request (HTTP 401): "
        "check the API key in --rpc-url or ETH_RPC_URL; the other endpoints take its calls"
    ]
    assert refused == []  # the calls went elsewhere: nothing to stop for


async def test_what_an_endpoint_lacks_or_refuses_is_warned_once_per_run(
    make_node: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Each worker process of a concurrent run has its own client, and each found out and
    # warned: "does not serve" and "set aside" were said once per worker. Logged with
    # ``once``, the coordinator writes them for its first worker only (engine.run.log_here).
    lacking = await make_node(lambda node, body: reply(body, [err(c, -32601, "method not found")
                                                              for c in as_batch(body)]))
    refusing = await make_node(lambda node, body: web.Response(status=401, text="bad key"))
    good = await make_node(echo)
    caplog.set_level(logging.WARNING, logger="gapfill")
    for worker in range(2):
        async with RpcClient([EndpointConfig(lacking.url)], settings(tmp_path / str(worker))) as client:
            with pytest.raises(RpcError, match="does not serve eth_nope"):
                await client.call("eth_nope", [])
        endpoints = [EndpointConfig(refusing.url), EndpointConfig(good.url)]
        async with RpcClient(endpoints, settings(tmp_path / str(worker), max_in_flight=1)) as client:
            assert await client.call_many([Call("echo", [1])]) == [1]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("gapfill.rpc")]
    said = {r.getMessage() for r in warned}
    assert len(warned) == 4 and len(said) == 2, [r.getMessage() for r in warned]
    from gapfill.engine.events import Logged
    from gapfill.engine.run import log_here

    caplog.clear()
    in_coordinator: set[str] = set()
    for r in warned:  # as gapfill.engine.run._LogToCoordinator sends them
        once = r.getMessage() if getattr(r, "once", False) else ""
        log_here(Logged(r.levelno, r.name, r.getMessage(), r.created, once), in_coordinator)
    assert sorted(r.getMessage() for r in caplog.records) == sorted(said)


async def test_a_key_the_last_endpoint_refuses_is_said_to_the_caller(make_node: Any, tmp_path: Any) -> None:
    # Every endpoint refuses: each endpoint but the last is set aside, and the call that the
    # last refuses tells the caller (a worker stops the run on it).
    nodes = [await make_node(lambda node, body: web.Response(status=401, text="bad key")) for _ in range(2)]
    told: list[str] = []
    refused: list[str] = []
    endpoints = [EndpointConfig(n.url) for n in nodes]
    async with RpcClient(endpoints, settings(tmp_path, max_in_flight=1)) as client:
        client.tell, client.on_refused = told.append, refused.append
        with pytest.raises(RpcError, match="check the API key"):
            await client.call("eth_blockNumber", [])
    assert [len(n.requests) for n in nodes] == [1, 1]
    assert len(told) == 1 and len(refused) == 1
    [last] = [n.url for n in nodes if n.url not in told[0]]
    assert refused == [f"the RPC node at {last} refused the request (HTTP 401): check the API key in "
                       "--rpc-url or ETH_RPC_URL"]  # fmt: skip


@pytest.mark.parametrize(("body", "said"), [
    (b"Too many requests, slow down", "HTTP 403 Too many requests"),  # a rate limit
    (b"method eth_getLogs is not allowed", "HTTP 403 method eth_getLogs is not allowed"),
])  # fmt: skip
async def test_a_403_that_is_no_key_refusal_is_not_called_one(
    make_node: Any, tmp_path: Any, body: bytes, said: str
) -> None:
    node = await make_node(lambda n, b: web.Response(status=403, body=body))
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path, rate_limit_attempts=3)) as client:
        with pytest.raises(RpcError) as info:
            await client.call("eth_getLogs", [])
    assert said in str(info.value) and "API key" not in str(info.value), str(info.value)
    assert len(node.requests) == 3  # retried, as before


async def test_one_attempt_is_said_in_the_singular(make_node: Any, tmp_path: Any) -> None:
    # `gapfill status` asks the node's head with one attempt: "after 1 attempts" it said.
    node = await make_node(lambda node, body: web.Response(status=500, text="down"))
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path, attempts=1)) as client:
        with pytest.raises(RpcError) as info:
            await client.call("eth_blockNumber", [])
    assert "after 1 attempt)" in str(info.value), str(info.value)


async def test_unreachable_node(tmp_path: Any, refused: Callable[[], int]) -> None:
    url = f"http://127.0.0.1:{refused()}/v2/{KEY}"
    async with RpcClient([EndpointConfig(url)], settings(tmp_path)) as client:
        with pytest.raises(RpcError) as info:
            await client.probe()
    port = url.split(":")[2].split("/")[0]
    assert str(info.value) == (
        f"could not reach the RPC node at http://127.0.0.1:{port}/v2/***: connection refused; "
        "check --rpc-url or ETH_RPC_URL"
    )
    # Nothing reached the node: the run's "calls" (and calls per transaction) count none.
    [stats] = client.stats().values()
    assert (stats.calls, stats.requests, stats.errors) == (0, 0, 3)


async def test_null_retry(make_node: Any, tmp_path: Any) -> None:
    seen: dict[str, int] = {}

    def lagging(node: FakeNode, body: Any) -> web.Response:
        answers = []
        for c in as_batch(body):
            tag = c["params"][0]
            seen[tag] = seen.get(tag, 0) + 1
            late = tag == "never" or seen[tag] <= 2
            answers.append({"jsonrpc": "2.0", "id": c["id"], "result": None if late else tag})
        return reply(body, answers)

    node = await make_node(lagging)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        results = await client.call_many([
            Call("eth_getTransactionReceipt", ["soon"], null_retry=True),
            Call("eth_getTransactionReceipt", ["never"], null_retry=True),
            Call("eth_getTransactionReceipt", ["plain"]),
        ])
    assert results[0] == "soon"
    assert results[1] == CallError("not_found", "still null after 3 answers")
    assert results[2] is None  # null without null_retry is an answer
    assert seen == {"soon": 3, "never": 3, "plain": 1}


@pytest.mark.parametrize(("script", "want"), [
    # A lagging node that also fails now and then: two 502s and one null are no "not found".
    (["502", "502", "null", "found"], "found"),
    (["null", "502", "null", "502", "found"], "found"),
    # Failures alone give up as failures (the ref stays in the gap), never as "not found".
    (["502", "null", "502", "null", "502"], "transient"),
    (["null", "502", "null", "null"], "not_found"),
])  # fmt: skip
async def test_not_found_takes_null_answers_not_failures(
    make_node: Any, tmp_path: Any, script: list[str], want: str
) -> None:
    turn = iter(script)

    def lagging_and_flaky(node: FakeNode, body: Any) -> web.Response:
        step = next(turn)
        if step == "502":
            return web.Response(status=502, text="bad gateway")
        result = None if step == "null" else "0xreceipt"
        return reply(body, [{"jsonrpc": "2.0", "id": c["id"], "result": result} for c in as_batch(body)])

    node = await make_node(lagging_and_flaky)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        [out] = await client.call_many([Call("eth_getTransactionReceipt", ["0xabc"], null_retry=True)])
    if want == "found":
        assert out == "0xreceipt"
    else:
        assert isinstance(out, CallError) and out.kind == want, out
    assert next(turn, "spent") == "spent"  # every scripted answer was asked for, no more


# -- rate limits ------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["seconds", "date", "body", "items"])
async def test_rate_limit_wait_is_honoured(make_node: Any, tmp_path: Any, style: str) -> None:
    import email.utils

    state = {"n": 0}

    def limited(node: FakeNode, body: Any) -> web.Response:
        state["n"] += 1
        if state["n"] > 1:
            return echo(node, body)
        if style == "seconds":
            return web.Response(status=429, headers={"Retry-After": "1"})
        if style == "date":
            date = email.utils.formatdate(time.time() + 2, usegmt=True)  # floored to 1-2 s
            return web.Response(status=429, headers={"Retry-After": date})
        error = {"code": -32005, "message": "request rate exceeded",
                 "data": {"backoff_seconds": 1}}
        if style == "body":
            return web.Response(status=429, body=orjson.dumps(
                {"jsonrpc": "2.0", "id": None, "error": error}))
        return reply(body, [{"jsonrpc": "2.0", "id": c["id"], "error": error}
                            for c in as_batch(body)])

    node = await make_node(limited)
    for rps in (None, 1000.0) if style in ("seconds", "items") else (None,):
        state["n"] = 0
        async with RpcClient([EndpointConfig(node.url, rps=rps)],
                             settings(tmp_path / str(rps))) as client:
            started = time.monotonic()
            assert await client.call_many([Call("echo", [1]), Call("echo", [2])]) == [1, 2]
            elapsed = time.monotonic() - started
            stats = next(iter(client.stats().values()))
        assert elapsed >= 0.9, (style, rps)
        assert stats.rate_limited >= 1
        if rps is not None:
            assert stats.rate_factor < 1.0  # AIMD cut


@pytest.mark.parametrize("rps", [None, 1000.0])
async def test_a_pause_holds_the_requests_back_off_the_outage_clock_and_silence_is_on_it(
    make_node: Any, tmp_path: Any, rps: float | None
) -> None:
    # A Retry-After pause is the client's choice: a worker must take it neither for a dead
    # node (its outage clock, silent_s) nor for a batch stuck in a call (held_back). A
    # request the node does not answer is on the clock, and any reply sets it back to 0.
    from gapfill.rpc.slots import PRIORITY

    answered = asyncio.Event()
    turn = iter(["429", "silent", "echo"])

    async def node_does(node: FakeNode, body: Any) -> web.Response:
        what = next(turn, "echo")
        if what == "429":
            return web.Response(status=429, headers={"Retry-After": "0.5"})
        if what == "silent":
            await asyncio.sleep(0.4)
        answered.set()
        return echo(node, body)

    node = await make_node(node_does)
    async with RpcClient([EndpointConfig(node.url, rps=rps)], settings(tmp_path)) as client:
        PRIORITY.set(7)  # as a batch's task sets it: the call's requests inherit it
        call = asyncio.create_task(client.call("echo", [1]))
        await asyncio.sleep(0.3)  # in the pause
        paused = (client.held_back(7), client.held_back(8), client.silent_s())
        await asyncio.sleep(0.5)  # the pause is over: the node is asked, and does not answer
        silent = (client.held_back(7), client.silent_s())
        assert await call == 1
    assert paused[:2] == (True, False) and paused[2] < 0.1, paused
    assert silent[0] is False and silent[1] >= 0.1, silent
    assert answered.is_set() and client.silent_s() < 0.05


class Scripted:
    """A Transport without sockets: ``answer(url, payload)`` gives the reply; it keeps
    what was sent, as (url, payload)."""

    def __init__(self, answer: Callable[[str, Any], HttpReply]) -> None:
        self.answer = answer
        self.sent: list[tuple[str, Any]] = []

    async def post(self, url: str, body: bytes) -> HttpReply:
        payload = orjson.loads(body)
        self.sent.append((url, payload))
        return self.answer(url, payload)

    async def aclose(self) -> None:
        pass


def echoed(payload: Any) -> HttpReply:
    return HttpReply(200, {}, orjson.dumps(payload if isinstance(payload, dict) and "result" in payload
                                           else [ok(c) for c in payload] if isinstance(payload, list)
                                           else ok(payload)))  # fmt: skip


async def test_a_paused_metered_endpoint_is_not_chosen_while_another_is_free(tmp_path: Any) -> None:
    # Two --rps endpoints; A answers 429 with Retry-After: 60 once. The pause was kept in
    # A's shared bucket only, unseen by the choice of endpoint: the next calls went to A
    # and slept 60 s in its budget while B was free.
    a, b = "http://127.0.0.1:1/a", "http://127.0.0.1:2/b"

    def answer(url: str, payload: Any) -> HttpReply:
        if url == a and not any(u == a for u, _ in transport.sent[:-1]):
            return HttpReply(429, {"Retry-After": "60"}, b"")
        return echoed(payload)

    transport = Scripted(answer)
    endpoints = [EndpointConfig(a, rps=1000.0), EndpointConfig(b, rps=10.0)]
    async with RpcClient(endpoints, settings(tmp_path), transport=transport) as client:
        await client.call_many([Call("eth_x", ["0x1"])])  # A: 429, then B
        assert await asyncio.wait_for(client.call_many([Call("eth_x", ["0x2"])]), 5.0) == ["0x2"]
    assert [u for u, _ in transport.sent] == [a, b, b]


@pytest.mark.parametrize(("left", "said"), [
    # A run stopped (Ctrl+C) during a Retry-After: 60 left the pause in the shared bucket.
    ("pause", "waiting for the RPC node (http://127.0.0.1:1/): paused by the provider's Retry-After "
              "for 60 s more (left by an earlier run or another gapfill process)"),
    # A second run sharing --rps 10 with a first that reserved 150 calls ahead: its check
    # waits ~15 s for the budget, while the node answers in 0.05 s.
    ("debt", "waiting for this host's rate budget, not for the RPC node (http://127.0.0.1:1/): its 10 "
             "calls/s are shared by every gapfill process of this host, and another process (or an "
             "earlier run) has spent them ahead of this one: the check goes in 1"),
])  # fmt: skip
async def test_the_start_up_check_held_by_the_shared_budget_says_so(
    tmp_path: Any, left: str, said: str
) -> None:
    # The next run's start-up check waits for what another left in the shared bucket before
    # sending anything, and the notice blamed the node: "no answer to eth_chainId ... 3
    # tries of 30 s each".
    from gapfill.rpc.budget import SharedBudget

    url = "http://127.0.0.1:1/"
    budget = SharedBudget(url, 10.0, budget_dir=str(tmp_path))
    if left == "pause":
        budget.on_rate_limited(60.0)
    else:
        budget.reserve(150)  # ~14.5 s at 10 calls/s: "goes in 14 s" (or 13, on a slow machine)
    budget.close()
    transport = Scripted(lambda u, p: HttpReply(200, {}, orjson.dumps(ok(p, "0x1"))))
    told: list[str] = []
    async with RpcClient([EndpointConfig(url, rps=10.0)], settings(tmp_path, slow_probe_notice_s=0.2),
                         transport=transport) as client:  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.probe(tell=told.append), 1.0)
    assert not transport.sent
    assert len(told) == 1 and "no answer" not in told[0], told
    assert told[0].startswith(said), told


async def test_an_exhausted_quota_is_said_not_waited_for_hours(monkeypatch: pytest.MonkeyPatch) -> None:
    # A provider whose daily quota is spent answers 429 with Retry-After: 86400. Capped at
    # 600 s and honoured for each of the 12 rate-limit tries, the call slept ~2 h before it
    # failed, the worker counted as waiting by choice all along (no outage, no message).
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, result: Any = None) -> Any:
        slept.append(delay)
        return await real_sleep(0, result)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    transport = Scripted(lambda u, p: HttpReply(429, {"Retry-After": "86400"}, b"daily quota exceeded"))
    refusals: list[str] = []
    async with RpcClient([EndpointConfig(f"http://127.0.0.1:1/{KEY}")], RpcSettings(),
                         transport=transport) as client:  # fmt: skip
        client.on_refused = refusals.append
        out = (await client.call_many([Call("eth_x", ["0x1"])]))[0]
    assert sum(slept) < 900, f"waited {sum(slept):.0f} s in all before: {out}"
    assert len(transport.sent) == 1
    assert isinstance(out, CallError) and refusals == [out.message]
    assert KEY not in out.message
    assert out.message.startswith("the provider at http://127.0.0.1:1/"), out.message
    assert "asks to wait 86400 s (Retry-After): its quota is spent: run again in about 24 h, or add " \
           "another endpoint to --rpc-url or ETH_RPC_URL" in out.message, out.message


async def test_an_exhausted_quota_at_start_up_is_said_and_not_tried_again(tmp_path: Any) -> None:
    # Not NodeUnavailable (a worker would be restarted into it), nor "check that ... is the
    # JSON-RPC endpoint of an Ethereum node".
    transport = Scripted(lambda u, p: HttpReply(429, {"Retry-After": "7200"}, b"monthly quota exceeded"))
    async with RpcClient([EndpointConfig("http://127.0.0.1:1/")], settings(tmp_path),
                         transport=transport) as client:  # fmt: skip
        with pytest.raises(RpcError) as raised:
            await asyncio.wait_for(client.probe(), 5.0)
    assert not isinstance(raised.value, NodeUnavailable)
    assert str(raised.value) == (
        "eth_chainId failed: the provider at http://127.0.0.1:1/ asks to wait 7200 s (Retry-After): "
        "its quota is spent: run again in about 2 h, or add another endpoint to --rpc-url or ETH_RPC_URL")
    assert len(transport.sent) == 1


async def test_an_exhausted_quota_sets_the_endpoint_aside_while_another_takes_the_calls(
    tmp_path: Any,
) -> None:
    a, b = "http://127.0.0.1:1/a", "http://127.0.0.1:2/b"

    def answer(url: str, payload: Any) -> HttpReply:
        if url == a:
            return HttpReply(429, {"Retry-After": "86400"}, b"daily quota exceeded")
        return echoed(payload)

    transport = Scripted(answer)
    async with RpcClient([EndpointConfig(a), EndpointConfig(b)], settings(tmp_path),
                         transport=transport) as client:  # fmt: skip
        out = [await asyncio.wait_for(client.call_many([Call("eth_x", [hex(n)])]), 5.0) for n in range(4)]
    assert out == [[hex(n)] for n in range(4)]
    assert [u for u, _ in transport.sent].count(a) == 1


def refuses_batches_over(limit: int) -> Callable[[FakeNode, Any], web.Response]:
    """A provider whose bucket holds about a second of calls: it answers 429 to every batch
    of more than ``limit`` calls, however long the client waits."""

    def bucket(node: FakeNode, body: Any) -> web.Response:
        if isinstance(body, list) and len(body) > limit:
            return web.Response(status=429, headers={"Retry-After": "1"}, text="Too Many Requests")
        return echo(node, body)

    return bucket


@pytest.mark.timeout(60)
async def test_a_rate_limit_smaller_than_a_batch_shrinks_the_batches(
    make_node: Any, tmp_path: Any
) -> None:
    # A provider whose bucket holds about a second of calls answers 429 to every batch
    # bigger than its rate, however long the client waits: the batches must come down to
    # the rate it learned, or the run never moves (it sent 100-call batches at 6 calls/s).
    # Batches already cut at the old size when the rate was learned wait out the
    # Retry-After and their tokens: they must be cut again, not sent as they were.
    node = await make_node(refuses_batches_over(30))
    async with RpcClient([EndpointConfig(node.url, max_batch=40)], settings(tmp_path)) as client:
        in_flight = [client.call_many([Call("echo", [i]) for i in range(k, k + 40)])
                     for k in range(0, 160, 40)]
        results = await asyncio.gather(*in_flight)
    assert [r for rs in results for r in rs] == list(range(160))
    sizes = [len(b) for b in node.requests if isinstance(b, list)]
    # Refused: the four batches sent before the first 429, and at most one cut at the
    # first rate learned (half the calls sent); the old code sent each waiting batch of 40
    # again at the old size (8 refusals, then 10-call batches at a few calls/s).
    assert sum(1 for n in sizes if n > 30) <= 5, sizes
    assert any(1 < n <= 30 for n in sizes)


@pytest.mark.timeout(60)
async def test_a_configured_rate_above_the_providers_shrinks_the_batches_too(
    make_node: Any, tmp_path: Any
) -> None:
    # With --rps set above what the provider takes, 429s cut the rate (rate_factor) but the
    # batch stayed at int(--rps): every 40-call batch of a provider that refuses batches over
    # 30 was refused, and the run never moved.
    node = await make_node(refuses_batches_over(30))
    config = EndpointConfig(node.url, max_batch=40, rps=40.0)
    async with RpcClient([config], settings(tmp_path)) as client:
        results = await client.call_many([Call("echo", [i]) for i in range(80)])
    assert results == list(range(80))
    sizes = [len(b) for b in node.requests if isinstance(b, list)]
    assert any(1 < n <= 30 for n in sizes), sizes


async def test_limit_exceeded_is_not_given_up_after_three_tries(make_node: Any, tmp_path: Any) -> None:
    # EIP-1474's -32005 "limit exceeded" is a rate limit: 12 tries (rate_limit_attempts),
    # not the 3 of a passing fault.
    state = {"n": 0}

    def limited(node: FakeNode, body: Any) -> web.Response:
        state["n"] += 1
        if state["n"] <= 3:
            return reply(body, [err(c, -32005, "limit exceeded") for c in as_batch(body)])
        return echo(node, body)

    node = await make_node(limited)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        assert await client.call_many([Call("echo", [1])]) == [1]


# -- batch size -------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["413", "json", "json-named", "geth"])
async def test_batch_too_large_halves_and_remembers(
    make_node: Any, tmp_path: Any, style: str
) -> None:
    def capped(node: FakeNode, body: Any) -> web.Response:
        if isinstance(body, list) and len(body) > 8:
            if style == "413":
                return web.Response(status=413, text="Request Entity Too Large")
            if style == "geth":  # a list of one error, carrying the first call's id
                return reply(body, [err(body[0], -32600, "batch too large")])
            message = "batch size exceeds the limit of 8" if style == "json-named" else (
                "batch too large")
            return web.Response(body=orjson.dumps(err(None, -32600, message)),
                                content_type="application/json")
        return echo(node, body)

    node = await make_node(capped)
    async with RpcClient([EndpointConfig(node.url, max_batch=50)], settings(tmp_path)) as client:
        results = await client.call_many([Call("echo", [i]) for i in range(40)])
        assert results == list(range(40))
        cap = next(iter(client.stats().values())).batch_cap
        refused = sum(1 for b in node.requests if isinstance(b, list) and len(b) > 8)
        assert cap == (8 if style == "json-named" else 5)
        before = len(node.requests)
        assert await client.call_many([Call("echo", [i]) for i in range(40)]) == list(range(40))
        assert len(node.requests) - before == -(-40 // cap)  # remembered: no new refusal
    # Halving: 40 -> 20 -> 10 -> 5; batches already in flight when the first refusal
    # came back are refused too, so at most 1 + 2 + 4.
    assert refused == 1 if style == "json-named" else 3 <= refused <= 7
    # The next process (a run's other workers, the next run) starts at the learned size.
    before = len(node.requests)
    async with RpcClient([EndpointConfig(node.url, max_batch=50)], settings(tmp_path)) as client:
        assert next(iter(client.stats().values())).batch_cap == cap
        assert await client.call_many([Call("echo", [i]) for i in range(40)]) == list(range(40))
    assert len(node.requests) - before == -(-40 // cap)  # not one refused


@pytest.mark.parametrize("refused", [1, 2])
async def test_geth_batch_too_large_reply_shrinks_to_the_limit(
    make_node: Any, tmp_path: Any, refused: int
) -> None:
    # geth past --rpc.batch-request-limit answers a list of ONE error, -32600 "batch too
    # large", with the first call's id. Read call by call, every other call was "no answer"
    # (a failure spending one of its 3 attempts) and the cap went down by one a round
    # (50, 49, 48): against a limit of 10, 47 of 50 calls failed. So with a reply that
    # refuses two calls as too large and leaves the rest out (the cap: 48, 46, ...).
    def geth(node: FakeNode, body: Any) -> web.Response:
        if isinstance(body, list) and len(body) > 10:
            return reply(body, [err(c, -32600, "batch too large") for c in body[:refused]])
        return echo(node, body)

    node = await make_node(geth)
    async with RpcClient([EndpointConfig(node.url, max_batch=50)], settings(tmp_path)) as client:
        assert await client.call_many([Call("echo", [i]) for i in range(50)]) == list(range(50))
        assert next(iter(client.stats().values())).batch_cap <= 10
    # Halving (50, 25, 12, 6): the halves of a refused batch go out together, so at most
    # 1 + 2 + 4 refused.
    assert sum(1 for b in node.requests if len(as_batch(b)) > 10) <= 7


async def test_a_batch_answered_by_one_id_less_rate_limit_is_a_rate_limit(
    make_node: Any, tmp_path: Any
) -> None:
    # A list holding one error without an id: the batch's rate limit. Read call by call,
    # each call was "no answer", failed after 3 such replies, and no rate limit was counted.
    state = {"n": 0}

    def limited(node: FakeNode, body: Any) -> web.Response:
        state["n"] += 1
        if state["n"] <= 3:
            return reply(body, [err(None, -32005, "rate limit exceeded")])
        return echo(node, body)

    node = await make_node(limited)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        assert await client.call_many([Call("echo", [1]), Call("echo", [2])]) == [1, 2]
        assert next(iter(client.stats().values())).rate_limited >= 1


def test_a_learned_batch_size_is_forgotten_when_old_or_unreadable(tmp_path: Any) -> None:
    url = "http://127.0.0.1:1/"
    write_learned_cap(url, 5, 10, str(tmp_path))
    assert read_learned_cap(url, str(tmp_path)) == (5, 10)
    assert read_learned_cap("http://127.0.0.1:2/", str(tmp_path)) is None  # per endpoint
    path = budget_path(url, str(tmp_path), "cap")
    old = time.time() - LEARNED_CAP_TTL_S - 1
    with open(path, "w") as f:
        f.write(f"5 10 {old}\n")
    assert read_learned_cap(url, str(tmp_path)) is None  # a provider may have raised its limit
    for garbage in ("", "five ten now", "10 5 0", "0 1 1e12"):
        with open(path, "w") as f:
            f.write(garbage)
        assert read_learned_cap(url, str(tmp_path)) is None


def test_batch_cap_grows_back_but_not_into_the_limit() -> None:
    endpoint = Endpoint(0, EndpointConfig("http://127.0.0.1:1/", max_batch=50), RpcSettings(), "k")
    endpoint.shrink_batch(50)
    assert endpoint.cap() == 25
    for _ in range(GROW_AFTER_SUCCESSES):
        endpoint.record_success(25)
    assert endpoint.cap() == 26
    for _ in range(GROW_AFTER_SUCCESSES * 30):
        endpoint.record_success(endpoint.cap())
    assert endpoint.cap() == 49  # never back to the refused 50
    endpoint.shrink_batch(40, message="batch limit is 30")
    assert endpoint.cap() == 30
    for _ in range(GROW_AFTER_SUCCESSES * 5):
        endpoint.record_success(endpoint.cap())
    assert endpoint.cap() == 30


async def test_tokens_of_a_learned_rate_go_back_when_the_wait_for_them_is_cancelled() -> None:
    # A request cancelled while it waited for the tokens of a rate learned from 429s (a
    # sibling request failed and took its group down, or a Ctrl+C) kept them taken: the
    # next requests waited for tokens nobody used. A configured rate's budget gave them back.
    from gapfill.rpc.budget import AcceptedCalls, LearnedBudget

    endpoint = Endpoint(0, EndpointConfig("http://127.0.0.1:1/"), RpcSettings(), "k")
    endpoint.learned = LearnedBudget(10.0, AcceptedCalls())
    waiting = asyncio.create_task(endpoint.acquire(10))
    await asyncio.sleep(0.05)  # it waits ~1 s for its 10 tokens at 10 calls/s
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert endpoint.in_flight == 0
    assert endpoint.learned.reserve(1) < 0.2  # not the ~1 s the cancelled request took


async def test_calls_held_by_a_pause_under_a_learned_rate_are_spread_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without --rps, a rate learned from 429s and a Retry-After: each request waited
    # max(pause, debt), so every request held by the pause went at its end together.
    from gapfill.rpc.budget import AcceptedCalls, LearnedBudget

    slept: list[float] = []

    async def fake_sleep(delay: float, result: Any = None) -> Any:
        slept.append(delay)

    endpoint = Endpoint(0, EndpointConfig("http://127.0.0.1:1/"), RpcSettings(), "k")
    endpoint.learned = LearnedBudget(10.0, AcceptedCalls())
    endpoint.record_rate_limited(5.0, refused_calls=10)
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    for _ in range(4):
        await endpoint.acquire(10)
        await endpoint.release()
    # At about 10 calls/s after the 5 s pause: 10 calls a second, one batch after another.
    assert slept[-1] >= 5.0 + 3 * 10 / 10.0, slept


def test_a_flaky_endpoint_is_not_set_aside_a_dead_one_is() -> None:
    # Half its requests fail: three in a row now and then, but most recent ones succeed.
    flaky = Endpoint(0, EndpointConfig("http://127.0.0.1:1/"), RpcSettings(), "k")
    for _ in range(50):
        for _ in range(3):
            flaky.record_success(10)
        for _ in range(3):
            flaky.record_failure("HTTP 502")
    assert flaky.down_until == 0.0
    # Its first requests all fail: not yet set aside at the third (a flaky endpoint's first
    # answers can all fail), but at the sixth.
    flaky_start = Endpoint(0, EndpointConfig("http://127.0.0.1:1/"), RpcSettings(), "k")
    for _ in range(3):
        flaky_start.record_failure("HTTP 502")
    assert flaky_start.down_until == 0.0
    # Every request fails: set aside at the sixth.
    dead = Endpoint(0, EndpointConfig("http://127.0.0.1:1/"), RpcSettings(), "k")
    for _ in range(5):
        dead.record_failure("HTTP 502")
    assert dead.down_until == 0.0
    dead.record_failure("HTTP 502")
    first = dead.down_until
    assert first > time.monotonic()
    # Requests already in flight that fail meanwhile do not stretch the pause.
    for _ in range(6):
        dead.record_failure("HTTP 502")
    assert dead.down_until == first


async def test_the_start_up_check_is_patient_with_a_node_that_answers_5xx(
    make_node: Any, tmp_path: Any
) -> None:
    # Four 502s in a row, then answers: three attempts would have refused this node for good.
    def behave(node: FakeNode, body: Any) -> web.Response:
        if len(node.requests) <= 4:
            return web.Response(status=502, text="bad gateway")
        return reply(body, [ok(c, "0x7a69") for c in as_batch(body)])

    node = await make_node(behave)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        assert await client.probe() == 31337
    assert len(node.requests) == 5
    # A call of the run itself still gives up after three attempts.
    failing = await make_node(lambda n, b: web.Response(status=502, text="bad gateway"))
    async with RpcClient([EndpointConfig(failing.url)], settings(tmp_path)) as client:
        [out] = await client.call_many([Call("eth_blockNumber", [])])
    assert isinstance(out, CallError) and "after 3 attempts" in out.message
    assert len(failing.requests) == 3


async def test_a_silent_node_at_start_up_is_called_silent(make_node: Any, tmp_path: Any) -> None:
    # It accepts the connection and never answers: not "check that it is a JSON-RPC node".
    async def silent(node: FakeNode, body: Any) -> web.Response:
        await node.stop.wait()
        return echo(node, body)

    node = await make_node(silent)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path, read_timeout_s=0.2)) as client:
        with pytest.raises(RpcError) as info:
            await client.probe()
    assert str(info.value).endswith("; the node does not answer: check that it is not stuck or "
                                    "overloaded, or raise --rpc-timeout")  # fmt: skip


async def test_a_slow_start_up_check_says_it_is_waiting_once(make_node: Any, tmp_path: Any) -> None:
    # A stuck node is given up only after every attempt timed out (90 s by default): the
    # user hears, once, that the tool is waiting for it, and the URL's key stays hidden.
    async def silent(node: FakeNode, body: Any) -> web.Response:
        await node.stop.wait()
        return echo(node, body)

    node = await make_node(silent, path=f"/v3/{KEY}")
    told: list[str] = []
    slow = settings(tmp_path, read_timeout_s=0.3, slow_probe_notice_s=0.1)
    async with RpcClient([EndpointConfig(node.url)], slow) as client:
        with pytest.raises(RpcError, match="does not answer"):
            await client.probe(told.append)
    assert told == [f"waiting for the RPC node (http://127.0.0.1:{node.url.split(':')[2].split('/')[0]}"
                    "/v3/***): no answer to eth_chainId after 0.1 s; it gets 3 tries of 0.3 s each "
                    "(--rpc-timeout)"]  # fmt: skip

    quick = await make_node(lambda n, b: reply(b, [ok(c, "0x7a69") for c in as_batch(b)]))
    async with RpcClient([EndpointConfig(quick.url)], slow) as client:
        assert await client.probe(told.append) == 31337
        await asyncio.sleep(0.2)  # past the notice's time: it was called off
    assert len(told) == 1


def test_rps_caps_the_batch() -> None:
    endpoint = Endpoint(0, EndpointConfig("http://127.0.0.1:1/", rps=10, max_batch=50),
                        RpcSettings(budget_dir="/tmp/gapfill-test-budgets"), "k")
    try:
        assert endpoint.cap() == 10
    finally:
        endpoint.close()


# -- endpoints --------------------------------------------------------------------------


async def test_failover_sets_a_failing_endpoint_aside(make_node: Any, tmp_path: Any) -> None:
    dead = await make_node(lambda n, b: web.Response(status=503, text="down"))
    good = await make_node(echo)
    endpoints = [EndpointConfig(dead.url, max_batch=10), EndpointConfig(good.url, max_batch=10)]
    async with RpcClient(endpoints, settings(tmp_path)) as client:
        for _ in range(5):
            results = await client.call_many([Call("echo", [i]) for i in range(50)])
            assert results == list(range(50))
        stats = client.stats()
    assert not stats[dead.url.rstrip("/") + "/"].healthy
    assert len(dead.requests) <= 6  # set aside after three failures in a row


def node_with_latency(latency_s: float) -> Callable[[FakeNode, Any], Any]:
    """An echoing node (chain 31337) that answers every request after ``latency_s``."""

    async def behaviour(node: FakeNode, body: Any) -> web.Response:
        await asyncio.sleep(latency_s)
        return reply(body, [ok(c, "0x7a69" if c["method"] == "eth_chainId" else None)
                            for c in as_batch(body)])

    return behaviour


async def test_a_slow_endpoint_beside_a_fast_one_gets_little_of_the_load(
    make_node: Any, tmp_path: Any
) -> None:
    # QA: a run took 4.4 s on the fast endpoint alone and 26.7 s with a 0.3 s-latency
    # one added, since requests were split 50/50 whatever each endpoint's latency. The slow
    # one takes 1 s here: the fast one's measured latency is this loop's (its answers share
    # it), tens of ms on a loaded machine, and beside 0.3 s that rightly made the slow one
    # worth 25-56 requests there (in 5 of 6 runs under load), more than asserted below.
    slow = await make_node(node_with_latency(1.0))
    fast = await make_node(node_with_latency(0.0))
    endpoints = [EndpointConfig(slow.url, max_batch=5), EndpointConfig(fast.url, max_batch=5)]
    async with RpcClient(endpoints, settings(tmp_path)) as client:
        assert await client.probe() == 31337  # measures each endpoint once
        for _ in range(3):
            results = await client.call_many([Call("echo", [i]) for i in range(400)])
            assert results == list(range(400))
    # 240 batches of 5: the slow endpoint is worth one only while the fast one has
    # dozens queued (a 1 s answer against a few ms), not every other one.
    assert len(fast.requests) + len(slow.requests) == 2 + 240
    assert len(slow.requests) - 1 <= 24


async def test_endpoints_alike_share_the_load(make_node: Any, tmp_path: Any) -> None:
    nodes = [await make_node(node_with_latency(0.01)) for _ in range(2)]
    endpoints = [EndpointConfig(n.url, max_batch=10) for n in nodes]
    async with RpcClient(endpoints, settings(tmp_path)) as client:
        for _ in range(3):
            assert await client.call_many([Call("echo", [i]) for i in range(200)]) == list(range(200))
    counts = sorted(len(n.requests) for n in nodes)
    assert sum(counts) == 60
    assert counts[0] >= 15  # neither endpoint idles


def test_an_endpoint_measured_slow_once_is_tried_again_later() -> None:
    endpoint = Endpoint(0, EndpointConfig("http://127.0.0.1:1/"), RpcSettings(), "k")
    assert endpoint.latency_estimate(time.monotonic()) is None
    endpoint.observe_latency(0.002, start_up=True)  # stands in until a request is measured
    assert endpoint.latency_estimate(time.monotonic()) == 0.002
    endpoint.observe_latency(30.0)  # a request that timed out
    now = time.monotonic()
    assert endpoint.latency_estimate(now) == pytest.approx(30.0, rel=0.01)
    assert endpoint.latency_estimate(now + 60.0) == pytest.approx(7.5, rel=0.01)  # two half-lives
    endpoint.observe_latency(0.1)
    assert endpoint.latency_estimate(time.monotonic()) == pytest.approx(30 + 0.3 * (0.1 - 30), rel=0.01)


def test_endpoints_with_a_rate_limit_share_the_load_by_it(tmp_path: Any) -> None:
    rpcs = [EndpointConfig(f"http://127.0.0.1:{free_port()}/", rps=rps, max_batch=10)
            for rps in (20.0, 200.0)]  # fmt: skip
    client = RpcClient(rpcs, settings(tmp_path))
    handed = [0, 0]
    for _ in range(110):  # batches of 10 handed out before any is answered
        choice = client._pick(None, frozenset(), None, 10)
        assert choice is not None
        endpoint, _wait = choice
        endpoint.assigned_calls += 10
        endpoint.assigned_requests += 1
        handed[endpoint.index] += 1
    assert 8 <= handed[0] <= 12 and handed[0] + handed[1] == 110  # about 1 in 11
    for endpoint in client._endpoints:
        endpoint.close()


async def test_all_endpoints_down(tmp_path: Any, refused: Callable[[], int]) -> None:
    urls = [f"http://127.0.0.1:{refused()}/", f"http://127.0.0.1:{refused()}/"]
    async with RpcClient([EndpointConfig(u) for u in urls], settings(tmp_path)) as client:
        with pytest.raises(RpcError, match="could not reach the RPC node"):
            await client.call("eth_blockNumber", [])


async def test_probe_chain_and_capabilities(make_node: Any, tmp_path: Any) -> None:
    def node_for(chain_id: int, receipts: bool) -> Callable[[FakeNode, Any], web.Response]:
        def behave(node: FakeNode, body: Any) -> web.Response:
            answers = []
            for c in as_batch(body):
                if c["method"] == "eth_chainId":
                    answers.append(ok(c, hex(chain_id)))
                elif c["method"] == "eth_getBlockReceipts" and not receipts:
                    answers.append(err(c, -32601, "the method eth_getBlockReceipts does not "
                                                  "exist/is not available"))
                else:
                    answers.append(ok(c, ["receipt"]))
            return reply(body, answers)
        return behave

    mainnet = await make_node(node_for(1, True), path=f"/v3/{KEY}")
    async with RpcClient([EndpointConfig(mainnet.url)], settings(tmp_path),
                         expected_chain_id=31337) as client:
        with pytest.raises(RpcError) as info:
            await client.probe()
    assert str(info.value) == (f"the RPC node at {mainnet.url.replace(KEY, '***')} serves "
                               "chain 1, expected 31337: check --rpc-url or ETH_RPC_URL")

    plain = await make_node(node_for(31337, False))
    rich = await make_node(node_for(31337, True))
    async with RpcClient([EndpointConfig(plain.url), EndpointConfig(rich.url)],
                         settings(tmp_path), expected_chain_id=31337) as client:
        assert await client.probe() == 31337
        assert await client.probe() == 31337  # once
        assert not any(c["method"] == "eth_getBlockReceipts" for n in (plain, rich)
                       for r in n.requests for c in as_batch(r))  # asked only when a plan needs it
        assert await client.probe_block_receipts(7)
        assert client.supports_block_receipts()
        assert await client.supports("eth_getBlockReceipts", ["latest"])
        probes = len(plain.requests)
        results = await client.call_many([Call("eth_getBlockReceipts", [hex(i)])
                                          for i in range(20)])
        assert results == [["receipt"]] * 20
        assert len(plain.requests) == probes  # routed to the endpoint that has it
        assert client.stats()[plain.url].supports_block_receipts is False


@pytest.mark.parametrize("status", [200, 404, 501, 502])  # 501: a web server that takes no POST
async def test_probe_of_a_web_page_says_what_to_check(make_node: Any, tmp_path: Any, status: int) -> None:
    def web_page(node: FakeNode, body: Any) -> web.Response:
        return web.Response(status=status, text=f"<html><body>Welcome {KEY}</body></html>",
                            content_type="text/html")

    page = await make_node(web_page, path=f"/v3/{KEY}")
    async with RpcClient([EndpointConfig(page.url)], settings(tmp_path)) as client:
        with pytest.raises(RpcError) as info:
            await client.probe()
    message = str(info.value)
    assert "HTML" in message and "Welcome" not in message and KEY not in message
    if status == 502:  # a gateway in front of a failing node
        assert message.endswith("the node is failing: try again later, or point --rpc-url or ETH_RPC_URL "
                                "at another node")
    else:
        assert message.endswith("check that --rpc-url or ETH_RPC_URL is the JSON-RPC endpoint of "
                                "an Ethereum node")


@pytest.mark.parametrize(("answer", "refused"), [("missing", True), ("failing", False)])
async def test_require_refuses_only_a_node_that_says_it_lacks_the_method(
    make_node: Any, tmp_path: Any, answer: str, refused: bool
) -> None:
    # A flaky provider (its answers fail) is not taken for a node without the method.
    def behave(node: FakeNode, body: Any) -> web.Response:
        if any(c["method"] == "eth_getTransactionReceipt" for c in as_batch(body)):
            if answer == "failing":
                return web.Response(status=502, text="<html>Bad gateway</html>", content_type="text/html")
            return reply(body, [err(c, -32601, "the method eth_getTransactionReceipt does not exist")
                                for c in as_batch(body)])  # fmt: skip
        return reply(body, [ok(c, "0x7a69") for c in as_batch(body)])

    node = await make_node(behave)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        await client.probe()
        if refused:
            with pytest.raises(RpcError, match="does not serve eth_getTransactionReceipt"):
                await client.require(["eth_getTransactionReceipt"], ["0x" + "00" * 32], "enriching needs")
        else:
            await client.require(["eth_getTransactionReceipt"], ["0x" + "00" * 32], "enriching needs")


async def test_a_start_up_check_believes_method_not_found_only_when_said_twice(
    make_node: Any, tmp_path: Any
) -> None:
    # A load balancer's bad backend answering the start-up check's one call with -32601 ended
    # the run with "does not serve eth_getTransactionReceipt" for a node that serves it (the
    # calls of a run believe it only when a second request says it: the check now does too).
    node = await make_node(lacks_once({RECEIPT_CALL.method}))
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        await client.require([RECEIPT_CALL.method], RECEIPT_CALL.params, "enriching needs")
        assert await client.call_many([RECEIPT_CALL]) == [RECEIPT_CALL.params[0]]
    node = await make_node(lacks_once({RECEIPT_CALL.method}, times=2))
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        with pytest.raises(RpcError, match="does not serve eth_getTransactionReceipt"):
            await client.require([RECEIPT_CALL.method], RECEIPT_CALL.params, "enriching needs")


@pytest.mark.parametrize(("answer", "may_pass"), [
    ("http503", True), ("truncated", True), ("http404", False), ("chain1", False), ("garbage", False),
    ("http501", False),  # a web server that takes no POST: the wrong URL, not a node failing
])  # fmt: skip
async def test_a_failed_start_up_check_says_whether_trying_again_may_pass(
    make_node: Any, tmp_path: Any, answer: str, may_pass: bool
) -> None:
    # A worker whose check fails for a reason that may pass is restarted; any other
    # failure (a web page, a wrong chain, not a chain id) ends the run.
    def behave(node: FakeNode, body: Any) -> web.Response:
        if answer == "http503":
            return web.Response(status=503, text="upstream error")
        if answer == "http404":
            return web.Response(status=404, text="not found")
        if answer == "http501":
            return web.Response(status=501, text="<html><body>Unsupported method ('POST')</body></html>",
                                content_type="text/html")
        if answer == "truncated":
            return web.Response(body=b'{"jsonrpc": "2.0", "id"', content_type="application/json")
        return reply(body, [ok(c, "0x1" if answer == "chain1" else "zebra") for c in as_batch(body)])

    node = await make_node(behave)
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path),
                         expected_chain_id=31337) as client:  # fmt: skip
        with pytest.raises(RpcError) as info:
            await client.probe()
    assert isinstance(info.value, NodeUnavailable) is may_pass, info.value


async def test_https_to_a_plain_http_node_says_so(make_node: Any, tmp_path: Any) -> None:
    # OpenSSL's errno 1 once read as the OS's: "operation not permitted".
    node = await make_node(echo, path=f"/v3/{KEY}")
    url = node.url.replace("http://", "https://")
    async with RpcClient([EndpointConfig(url)], settings(tmp_path)) as client:
        with pytest.raises(RpcError) as info:
            await client.probe()
    assert str(info.value) == (
        f"could not reach the RPC node at {url.replace(KEY, '***')}: TLS handshake failed (the server "
        "does not speak TLS): use http:// for this node; check --rpc-url or ETH_RPC_URL"
    )


@pytest.mark.parametrize("one_in_flight", [False, True])
async def test_a_hung_endpoint_is_left_out_once_another_answers(
    make_node: Any, tmp_path: Any, one_in_flight: bool
) -> None:
    # Waiting out its three 30 s timeouts held the whole run for 90 s although the other
    # endpoint had answered at once (a hang here would trip the test's 20 s timeout). With
    # one request in flight (the start-up sample's client, --mode sequential), the hung
    # endpoint's check held that one slot until it timed out, the other's waiting behind it.
    async def silent(node: FakeNode, body: Any) -> web.Response:
        await node.stop.wait()
        return echo(node, body)

    hung = await make_node(silent, path=f"/v3/{KEY}")
    good = await make_node(lambda n, b: reply(b, [ok(c, "0x7a69") for c in as_batch(b)]))
    told: list[str] = []
    kw: dict[str, Any] = ({"max_in_flight": 1, "attempts": 1, "read_timeout_s": 3.0} if one_in_flight
                          else {"read_timeout_s": 30.0})  # fmt: skip
    patient = settings(tmp_path, probe_grace_s=0.2, **kw)
    async with RpcClient([EndpointConfig(hung.url), EndpointConfig(good.url)], patient) as client:
        assert await client.probe(told.append) == 31337
        assert await client.call_many([Call("eth_blockNumber", [])] * 3) == ["0x7a69"] * 3
    shown = hung.url.replace(KEY, "***")
    assert told == [f"left out for this run: the RPC node at {shown} did not answer eth_chainId "
                    "within 0.2 s of another endpoint's answer"]  # fmt: skip
    assert len(hung.requests) == 1  # asked once, never used again


@pytest.mark.parametrize("case", ["missing method", "web page", "failing gateway", "another chain"])
async def test_hints_name_the_config_file_key_the_endpoint_came_from(
    make_node: Any, tmp_path: Any, case: str
) -> None:
    # An endpoint of the config file: the user never typed --rpc-url, so no hint names it.
    def behave(node: FakeNode, body: Any) -> web.Response:
        if case == "web page":
            return web.Response(status=404, text="<html>Not found</html>", content_type="text/html")
        if case == "failing gateway":
            return web.Response(status=502, text="<html>Bad gateway</html>", content_type="text/html")
        if any(c["method"] == "eth_getTransactionReceipt" for c in as_batch(body)):
            return reply(body, [err(c, -32601, "the method eth_getTransactionReceipt does not exist")
                                for c in as_batch(body)])  # fmt: skip
        return reply(body, [ok(c, "0x7a69") for c in as_batch(body)])

    node = await make_node(behave, path=f"/v3/{KEY}")
    check = "[[endpoints]] url in /etc/gapfill.toml"
    expected = 1 if case == "another chain" else None
    async with RpcClient([EndpointConfig(node.url, check=check)], settings(tmp_path),
                         expected_chain_id=expected) as client:  # fmt: skip
        assert client.check == check
        with pytest.raises(RpcError) as info:
            await client.probe()
            await client.require(["eth_getTransactionReceipt"], ["0x" + "00" * 32], "enriching needs it")
    message = str(info.value)
    assert message.endswith({
        "missing method": "point [[endpoints]] url in /etc/gapfill.toml at another node",
        "web page": "check that [[endpoints]] url in /etc/gapfill.toml is the JSON-RPC endpoint of "
                    "an Ethereum node",
        "failing gateway": "try again later, or point [[endpoints]] url in /etc/gapfill.toml at "
                           "another node",
        "another chain": "serves chain 31337, expected 1: check [[endpoints]] url in /etc/gapfill.toml",
    }[case]), message
    assert "--rpc-url" not in message and KEY not in message


def test_the_endpoints_together_name_each_place_once() -> None:
    from gapfill.rpc.config import FLAG_CHECK, checks, file_check

    a, b = (EndpointConfig(f"http://127.0.0.1:{p}/", check=file_check("g.toml")) for p in (1, 2))
    assert checks([a, b]) == "[[endpoints]] url in g.toml"
    assert checks([EndpointConfig("http://x/", check="--rpc-url"), a]) == f"--rpc-url or {a.check}"
    assert checks([]) == FLAG_CHECK


# -- what -v and -vv show ------------------------------------------------------------------


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name.startswith("gapfill.rpc")]


async def test_debug_logs_one_record_per_http_request_with_its_size_and_status(
    make_node: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    node = await make_node(echo, path=f"/v3/{KEY}")
    caplog.set_level(logging.DEBUG, logger="gapfill")
    keyed = EndpointConfig(f"{node.url}?apikey={KEY}", max_batch=10)
    async with RpcClient([keyed], settings(tmp_path)) as client:
        await client.call_many([Call("echo", [f"v{i}"]) for i in range(25)])
    posts = [m for m in _messages(caplog, logging.DEBUG) if m.startswith("POST ")]
    assert len(posts) == len(node.requests) == 3, posts  # per request, not per call
    assert sorted(m.split(": ")[1].split(" call(s)")[0] for m in posts) == ["10", "10", "5"]
    assert all("/v3/***?apikey=***" in m and "HTTP 200" in m and " B sent" in m for m in posts), posts
    assert KEY not in caplog.text


async def test_info_logs_the_chain_id_and_whether_block_receipts_are_served(
    make_node: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def node_without_block_receipts(node: FakeNode, body: Any) -> web.Response:
        return reply(body, [err(c, -32601, "the method does not exist")
                            if c["method"] == "eth_getBlockReceipts" else ok(c, "0x1")
                            for c in as_batch(body)])  # fmt: skip

    node = await make_node(node_without_block_receipts)
    caplog.set_level(logging.INFO, logger="gapfill")
    async with RpcClient([EndpointConfig(node.url)], settings(tmp_path)) as client:
        await client.probe()
        assert not await client.probe_block_receipts(5)
    said = _messages(caplog, logging.INFO)
    assert f"chain id 1: RPC endpoint(s) {node.url} kept for the run" in said, said
    assert "eth_getBlockReceipts not served: every transaction is fetched on its own" in said, said


def test_info_logs_batch_size_growth_and_rate_limits_with_the_wait(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gapfill")
    url = f"http://127.0.0.1:1/v3/{KEY}?apikey={KEY}"
    endpoint = Endpoint(0, EndpointConfig(url, max_batch=50), settings(tmp_path), "k")
    endpoint.shrink_batch(50)
    for _ in range(GROW_AFTER_SUCCESSES):
        endpoint.record_success(25)
    endpoint.record_rate_limited(2.0)
    metered = Endpoint(1, EndpointConfig(url, rps=100), settings(tmp_path), "m")
    metered.record_rate_limited(None)
    metered.close()
    said = _messages(caplog, logging.INFO)
    shown = "http://127.0.0.1:1/v3/***?apikey=***"
    assert said[:2] == [f"RPC endpoint {shown} refused a batch of 50 calls; batches now hold 25",
                        f"RPC endpoint {shown} took {GROW_AFTER_SUCCESSES} batches of 25 calls; batches now "
                        "hold 26"], said  # fmt: skip
    # It had answered 25 calls a request: a rate is learned (even under 10 calls/s now).
    assert said[2].startswith(f"RPC endpoint {shown} rate limits: it accepted "), said
    assert said[3].startswith(f"RPC endpoint {shown} rate limited 1 call(s): pausing 2.0 s (Retry-After); "
                              ), said  # fmt: skip
    assert said[4].startswith(f"RPC endpoint {shown} rate limited 1 call(s); now sending "), said
    assert KEY not in caplog.text


def test_the_first_learned_rate_counts_calls_accepted_not_calls_refused(tmp_path: Any) -> None:
    # A first round of eight 100-call batches, all refused by a 50 calls/s provider: the
    # old estimate took half the calls *sent* ("about 402 calls/s", then 151 calls/s and a
    # storm of halvings); none were accepted, so the refused request's half is the guess.
    endpoint = Endpoint(0, EndpointConfig("http://127.0.0.1:1/"), settings(tmp_path), "e0")
    for _ in range(8):
        endpoint.record_rate_limited(None, count=1, refused_calls=100)
    assert endpoint.rate_rps() == 50.0
    assert endpoint.cap() == 25  # half a second of it: a batch passes with the bucket not full


@pytest.mark.parametrize("limit", [1, 3, 5, 9])
def test_a_small_rate_limit_is_learned_and_the_batches_follow_it(tmp_path: Any, limit: int) -> None:
    # Refusals under 10 calls/s were never learned: a batch above a free tier's per-second
    # bucket (5 calls/s) was sent again as it was, refused each time.
    endpoint = Endpoint(0, EndpointConfig("http://127.0.0.1:1/", max_batch=20), settings(tmp_path), "e0")
    endpoint.record_accepted(limit)  # what it took in the last second
    endpoint.record_rate_limited(None, count=1, refused_calls=2 * limit)
    rate = endpoint.rate_rps()
    assert rate is not None and 1.0 <= rate <= limit
    assert endpoint.cap() <= max(1, limit // 2)


async def test_the_head_is_the_lowest_endpoints_and_each_answer_says_its_request(
    make_node: Any, tmp_path: Any
) -> None:
    # Discovery took the head from whichever endpoint answered eth_blockNumber, and scanned
    # past the head of another, which answered those blocks as if empty.
    def at(head: int) -> Callable[[FakeNode, Any], web.Response]:
        def answer(node: FakeNode, body: Any) -> web.Response:
            return reply(body, [ok(c, hex(head)) if c["method"] == "eth_blockNumber" else ok(c)
                                for c in as_batch(body)])  # fmt: skip
        return answer

    ahead, behind = await make_node(at(1_000)), await make_node(at(900))
    endpoints = [EndpointConfig(ahead.url), EndpointConfig(behind.url)]
    async with RpcClient(endpoints, settings(tmp_path)) as client:
        assert await client.lowest_head() == 900
        calls = [Call("eth_getBlockByNumber", [hex(n), False]) for n in range(4)]
        outs = await client.call_many_via(calls)
    assert [out for out, _ in outs] == [c.params[0] for c in calls]
    # One request: one endpoint, one number.
    assert len({via for _, via in outs}) == 1 and outs[0][1] is not None


async def test_a_head_that_is_not_0x_hex_is_left_out_not_read_as_another(
    make_node: Any, tmp_path: Any
) -> None:
    # int(str(v), 16) read a decimal "900" as 0x900 (2304): a head no endpoint had, taken as
    # the lowest; it is left out as a malformed answer is (and alone, said so).
    def at(head: str) -> Callable[[FakeNode, Any], web.Response]:
        def answer(node: FakeNode, body: Any) -> web.Response:
            return reply(body, [ok(c, head) if c["method"] == "eth_blockNumber" else ok(c)
                                for c in as_batch(body)])  # fmt: skip
        return answer

    good, decimal = await make_node(at(hex(5_000))), await make_node(at("900"))
    both = [EndpointConfig(good.url), EndpointConfig(decimal.url)]
    async with RpcClient(both, settings(tmp_path)) as client:
        assert await client.lowest_head() == 5_000
    async with RpcClient([EndpointConfig(decimal.url)], settings(tmp_path)) as client:
        with pytest.raises(RpcError, match="answered eth_blockNumber with '900'"):
            await client.lowest_head()
