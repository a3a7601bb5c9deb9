"""Splitting refused eth_getLogs / trace_filter ranges and growing them back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

import pytest

from gapfill.discover.coverage import merge
from gapfill.discover.logs import scan_logs
from gapfill.discover.ranges import AdaptiveWindow, parse_cap, parse_hint, scan_ranges, split_refused
from gapfill.errors import RpcError, RpcKeyRefused
from gapfill.rpc import Call, CallError, RpcClient


def test_parse_hint() -> None:
    msg = "query returned more than 10000 results. Try with this block range [0x10, 0x1f]."
    assert parse_hint(msg, 16, 100) == (16, 31)
    assert parse_hint(msg, 15, 100) is None  # does not start where the window did
    assert parse_hint(msg, 16, 31) is None  # not a strict sub-range
    assert parse_hint("this block range should work: [100, 150]", 100, 400) == (100, 150)
    assert parse_hint("no hint here", 0, 10) is None


def test_parse_cap() -> None:
    assert parse_cap("query exceeds max block range 2000") == 2000
    assert parse_cap("You can make eth_getLogs requests with up to a 2K block range") == 2000
    assert parse_cap("block range is too large, maximum is 500") is not None
    assert parse_cap("query returned more than 10000 results") is None


def test_split_refused() -> None:
    assert split_refused(0, 99, "Try with this block range [0x0, 0x9]") == ([(0, 9), (10, 99)], 10)
    assert split_refused(0, 99, "exceeds max block range 30") == ([(0, 29), (30, 99)], 30)
    assert split_refused(0, 99, "response size exceeded") == ([(0, 49), (50, 99)], 50)
    assert split_refused(0, 2, "too many") == ([(0, 0), (1, 2)], 1)


def test_window_grows_back_after_successes() -> None:
    w = AdaptiveWindow(blocks=100, max_blocks=400, grow_after=2)
    w.refused(10)
    assert w.blocks == 10
    w.succeeded(5)  # a short tail does not count
    w.succeeded(10)
    w.succeeded(10)
    assert w.blocks == 20
    for _ in range(20):
        w.succeeded(w.blocks)
    assert w.blocks == 400


async def test_a_stated_span_cap_is_not_grown_past() -> None:
    # "query exceeds max block range 10" (with a hint, or not): the window grew back after 3
    # successes and was refused again, a third of the calls refused over a long scan.
    for hint in (True, False):
        node = FakeNode(10, None, hint, said="query exceeds max block range 10")
        window = AdaptiveWindow(blocks=64)
        await scan_ranges(cast(RpcClient, node), [(0, 9_999)], _logs_call, window)
        # The first round's 8 windows in flight are refused; none after.
        assert window.refusals <= 8 and len(node.calls) < 1_100, (hint, window.refusals)


class Node:
    """What the scan asks of a client beside its calls: each window's last block, answered
    in the same request as the window (subclasses answer the windows)."""

    check = "--rpc-url"

    async def call_many(self, calls: list[Call]) -> list[Any]:
        raise NotImplementedError

    async def call_many_via(self, calls: list[Call]) -> list[tuple[Any, tuple[int, int] | None]]:
        windows = await self.call_many([c for c in calls if c.method != "eth_getBlockByNumber"])
        answers = iter(windows)
        out = [self.block(c.params[0]) if c.method == "eth_getBlockByNumber" else next(answers)
               for c in calls]  # fmt: skip
        return [(a, None if isinstance(a, CallError) else self.via(c))
                for a, c in zip(out, calls, strict=True)]  # fmt: skip

    def block(self, number: str) -> Any:
        return {"number": number}

    def via(self, call: Call) -> tuple[int, int]:
        return (0, 0)


class FakeNode(Node):
    """call_many for eth_getLogs with a span cap and a result cap (one log per block)."""

    check = "--rpc-url"

    def __init__(self, max_span: int | None, max_results: int | None, hint: bool,
                 said: str = "range too large") -> None:  # fmt: skip
        self.max_span, self.max_results, self.hint, self.said = max_span, max_results, hint, said
        self.calls: list[tuple[int, int]] = []

    async def call_many(self, calls: list[Call]) -> list[Any]:
        out: list[Any] = []
        for call in calls:
            lo, hi = int(call.params[0]["fromBlock"], 16), int(call.params[0]["toBlock"], 16)
            self.calls.append((lo, hi))
            span = hi - lo + 1
            if self.max_span is not None and span > self.max_span:
                msg = self.said
                if self.hint:
                    msg += f". Try with this block range [{hex(lo)}, {hex(lo + self.max_span - 1)}]."
                out.append(CallError("permanent", msg, -32600))
            elif self.max_results is not None and span > self.max_results:
                msg = f"query returned more than {self.max_results} results"
                if self.hint:
                    msg += f". Try with this block range [{hex(lo)}, {hex(lo + self.max_results - 1)}]."
                out.append(CallError("permanent", msg, -32005))
            else:
                out.append([{"blockNumber": hex(b)} for b in range(lo, hi + 1)])
        return out


def _logs_call(lo: int, hi: int) -> Call:
    return Call("eth_getLogs", [{"fromBlock": hex(lo), "toBlock": hex(hi)}])


@pytest.mark.parametrize("hint", [True, False])
@pytest.mark.parametrize(("max_span", "max_results"), [(7, None), (None, 13), (50, 5)])
async def test_scan_ranges_covers_exactly_once(
    hint: bool, max_span: int | None, max_results: int | None
) -> None:
    node = FakeNode(max_span, max_results, hint)
    window = AdaptiveWindow(blocks=64)
    done = await scan_ranges(cast(RpcClient, node), [(0, 299), (400, 420)], _logs_call, window)
    spans = sorted(span for span, _ in done)
    assert merge(spans) == [(0, 299), (400, 420)]
    assert sum(hi - lo + 1 for lo, hi in spans) == 321  # no overlaps
    blocks = sorted(int(log["blockNumber"], 16) for _, logs in done for log in logs)
    assert blocks == [*range(300), *range(400, 421)]
    assert window.refusals > 0
    # Refusals stay a small share of the calls: the window remembers what passes.
    assert window.refusals < len(node.calls) / 2


async def test_scan_ranges_gives_up_on_a_single_refused_block() -> None:
    node = FakeNode(None, 0, False)
    with pytest.raises(RpcError, match="blocks 0-0"):
        await scan_ranges(cast(RpcClient, node), [(0, 3)], _logs_call, AdaptiveWindow(blocks=4))


@pytest.mark.parametrize("why", ["", ": connection timed out; check --rpc-url"])
async def test_scan_ranges_does_not_split_on_an_outage(why: str) -> None:
    # "connection timed out" (no node there) was taken for a range too slow to answer.
    class Down(Node):
        calls = 0
        check = "--rpc-url"

        async def call_many(self, calls: list[Call]) -> list[Any]:
            Down.calls += len(calls)
            return [CallError("transient", f"could not reach the RPC node{why}") for _ in calls]

    with pytest.raises(RpcError, match=f"blocks 0-999: could not reach the RPC node{why}"):
        await scan_ranges(cast(RpcClient, Down()), [(0, 999)], _logs_call, AdaptiveWindow(blocks=1000))
    assert Down.calls == 1


class Slow(Node):
    """A node that gets no reply out for a window wider than ``answers(lo)`` blocks (none,
    with 0), and answers the others."""

    check = "--rpc-url"
    silent = "the node does not answer: check that it is not stuck or overloaded, or raise --rpc-timeout"

    def __init__(self, answers: Callable[[int], int]) -> None:
        self.answers = answers
        self.calls: list[tuple[int, int]] = []

    async def call_many(self, calls: list[Call]) -> list[Any]:
        spans = [(int(c.params[0]["fromBlock"], 16), int(c.params[0]["toBlock"], 16)) for c in calls]
        self.calls += spans
        return [[] if hi - lo < self.answers(lo) else
                CallError("transient", "no response within 1 s (at http://n/, after 3 attempts)")
                for lo, hi in spans]  # fmt: skip


async def test_a_node_that_stopped_answering_is_said_so_after_one_split() -> None:
    # Each window that timed out was halved, down to one block, each half waiting out every
    # try: ~20 minutes at the default timeout, then "eth_getLogs failed for blocks 0-0".
    node = Slow(lambda lo: 0)
    with pytest.raises(RpcError) as info:
        await scan_ranges(cast(RpcClient, node), [(0, 999)], _logs_call, AdaptiveWindow(blocks=1000))
    assert str(info.value) == ("eth_getLogs got no answer for blocks 0-499: no response within 1 s (at "
                               f"http://n/, after 3 attempts); {Slow.silent}")  # fmt: skip
    assert node.calls == [(0, 999), (0, 499), (500, 999)]


async def test_a_node_too_slow_for_wide_windows_gets_them_split_while_it_answers() -> None:
    # 500-block windows pass below block 1,000, 250-block ones above (a busier stretch).
    node = Slow(lambda lo: 500 if lo < 1_000 else 250)
    done = await scan_ranges(cast(RpcClient, node), [(0, 1_999)], _logs_call, AdaptiveWindow(blocks=1_000),
                             parallel=2)  # fmt: skip
    assert merge(span for span, _ in done) == [(0, 1_999)]
    assert (1_000, 1_249) in node.calls  # split twice, an answer between the splits


async def test_a_window_is_kept_only_from_a_node_shown_to_have_its_last_block() -> None:
    # A node behind the head answered a window past it as if empty, and it was recorded.
    class Behind(Node):
        async def call_many(self, calls: list[Call]) -> list[Any]:
            return [[] for _ in calls]

        def block(self, number: str) -> Any:  # every try at it was null (the client's null_retry)
            return CallError("not_found", "still null after 3 answers") if int(number, 16) > 500 else {}

    with pytest.raises(RpcError) as info:
        await scan_ranges(cast(RpcClient, Behind()), [(0, 999)], _logs_call, AdaptiveWindow(blocks=400))
    assert str(info.value) == (
        "eth_getLogs for blocks 400-799 was answered by a node that could not show block 799 (it is behind "
        "the head, or a backend behind a load balancer is), so they were not recorded as scanned: run "
        "discover again later, or point --rpc-url at a node in sync")

    class Apart(Node):  # the proof came in another request (the batch was cut), now and then
        asked: ClassVar[list[tuple[int, int]]] = []

        async def call_many(self, calls: list[Call]) -> list[Any]:
            Apart.asked += [(int(c.params[0]["fromBlock"], 16), int(c.params[0]["toBlock"], 16))
                            for c in calls]  # fmt: skip
            return [[] for _ in calls]

        def via(self, call: Call) -> tuple[int, int]:
            late = call.method == "eth_getBlockByNumber" and len(Apart.asked) < 4
            return (0, 1 if late else 0)

    done = await scan_ranges(cast(RpcClient, Apart()), [(0, 999)], _logs_call, AdaptiveWindow(blocks=400))
    assert sorted(span for span, _ in done) == [(0, 399), (400, 799), (800, 999)]
    assert Apart.asked[:3] == [(0, 399), (400, 799), (800, 999)] and len(Apart.asked) == 6


async def test_a_refused_key_keeps_what_to_fix_apart() -> None:
    # The fix was only the middle of the message's text: discover's CLI could not put it last.
    class Refusing(Node):
        check = "--rpc-url"

        async def call_many(self, calls: list[Call]) -> list[Any]:
            what = "the RPC node at http://n/v3/*** refused the request (HTTP 401)"
            return [CallError.refused(what, "check the API key in ETH_RPC_URL", 401) for _ in calls]

    with pytest.raises(RpcKeyRefused) as info:
        await scan_ranges(cast(RpcClient, Refusing()), [(0, 9)], _logs_call, AdaptiveWindow(blocks=10))
    assert info.value.what == ("eth_getLogs failed for blocks 0-9: the RPC node at http://n/v3/*** refused "
                               "the request (HTTP 401)")  # fmt: skip
    assert info.value.fix == "check the API key in ETH_RPC_URL"
    assert str(info.value) == f"{info.value.what}: {info.value.fix}"  # no "pick another method" hint


async def test_a_node_without_the_method_says_what_to_do() -> None:
    class NoLogs(Node):
        check = "--rpc-url"

        async def call_many(self, calls: list[Call]) -> list[Any]:
            return [CallError("permanent", "no RPC endpoint serves eth_getLogs") for _ in calls]

    with pytest.raises(RpcError) as info:
        await scan_ranges(cast(RpcClient, NoLogs()), [(0, 9)], _logs_call, AdaptiveWindow(blocks=1))
    assert str(info.value).endswith("pick another discovery method with --method (logs, blocks, "
                                    "trace, explorer), or point --rpc-url at another node")


def test_a_refusal_survives_pickling_with_its_parts() -> None:
    # Errors may cross a process boundary (a worker's to its coordinator): the default
    # pickling passed str() alone to an __init__ that takes what and fix.
    import pickle

    from gapfill.discover.explorer import ExplorerRefused
    from gapfill.errors import RpcKeyRefused

    for cls in (RpcKeyRefused, ExplorerRefused):
        back = pickle.loads(pickle.dumps(cls("the node refused the request", "check the API key")))
        assert type(back) is cls and back.what == "the node refused the request"
        assert back.fix == "check the API key"
        assert str(back) == "the node refused the request: check the API key"


async def test_a_log_scan_keeps_only_the_contracts_logs_when_the_filter_is_ignored() -> None:
    """A provider that ignores eth_getLogs' address filter answers every log in the range:
    every transaction in it became a ref of the contract (trace and block scans check the
    address; the log scan did not)."""
    ours, other = "0x" + "a" * 40, "0x" + "b" * 40

    class NoFilter(Node):
        async def call_many(self, calls: list[Call]) -> list[Any]:
            return [[{"address": address, "transactionHash": "0x" + str(i) * 64, "blockNumber": hex(i)}
                     for i, address in ((1, "0x" + "A" * 40), (2, other))]  # checksummed, or not
                    for _ in calls]  # fmt: skip

    refs = await scan_logs(cast(RpcClient, NoFilter()), 1, ours, [(0, 9)], AdaptiveWindow(blocks=10))
    assert [(r.tx_hash, r.block_number) for r in refs] == [("0x" + "1" * 64, 1)]


@pytest.mark.parametrize(("given", "said"), [("10", "'10', not a 0x hex quantity"),
                                             ("0xzz", "'0xzz', not a 0x hex quantity"),
                                             (None, "missing")])  # fmt: skip
async def test_a_log_whose_block_number_is_not_0x_hex_is_said_so_not_read_as_another(
    given: Any, said: str
) -> None:
    """int(v, 16) read a decimal "10" as block 16 (a ref in the wrong block), and garbage
    ended discover with "internal error (ValueError: ...)": the sentence names the field."""
    ours = "0x" + "a" * 40
    tx = "0x" + "1" * 64

    class Decimal(Node):
        async def call_many(self, calls: list[Call]) -> list[Any]:
            return [[{"address": ours, "transactionHash": tx, "blockNumber": given}] for _ in calls]

    with pytest.raises(RpcError) as info:
        await scan_logs(cast(RpcClient, Decimal()), 1, ours, [(0, 9)], AdaptiveWindow(blocks=10))
    assert str(info.value) == (f"the blockNumber of a log of {tx} (eth_getLogs) is {said}: the node "
                               "answers in a form gapfill cannot read; use another node")  # fmt: skip
