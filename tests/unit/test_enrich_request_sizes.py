"""How many calls each JSON-RPC request of an enrichment holds (``--rpc-batch-size``).

The enricher and the RPC client together over an in-memory node that records every
request it is sent: the calls the enricher groups itself (the free plan's pairs, the
metered plan's second round, the per-block plan) and the endpoint's own cap, which
cuts any request larger than it.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from fixtures_io import result

from gapfill.enrich.fetch import Enricher, PlanSettings, PlanShape
from gapfill.model import Ref
from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings
from gapfill.rpc.transport import HttpReply

pytestmark = pytest.mark.timeout(20)

TX = result("eth_getTransactionByHash/get-legacy-tx")
RECEIPT = result("eth_getTransactionReceipt/get-legacy-receipt")
CONTRACT = "0x" + "cc" * 20


class CountingNode:
    """Serves ``refs`` transactions, two to a block (the receipts carry the timestamp); each
    request's methods go into ``requests``. ``refuse_above`` makes it refuse larger batches
    ("batch too large"), as a provider with a cap does."""

    def __init__(self, refs: int, refuse_above: int | None = None) -> None:
        self.refuse_above = refuse_above
        self.requests: list[list[tuple[str, Any]]] = []
        self.txs: dict[str, dict[str, Any]] = {}
        self.receipts: dict[str, dict[str, Any]] = {}
        for i in range(refs):
            h, block = f"0x{i + 1:064x}", hex(10 + i // 2)
            self.txs[h] = {**TX, "hash": h, "blockNumber": block}
            self.receipts[h] = {**RECEIPT, "transactionHash": h, "blockNumber": block,
                                "blockTimestamp": "0x1e"}  # fmt: skip

    def refs(self) -> list[Ref]:
        return [Ref(1, CONTRACT, h, int(tx["blockNumber"], 16), "test") for h, tx in self.txs.items()]

    def _answer(self, method: str, params: list[Any]) -> Any:
        if method == "eth_getTransactionByHash":
            return self.txs[params[0]]
        if method == "eth_getTransactionReceipt":
            return self.receipts[params[0]]
        in_block = [h for h, tx in self.txs.items() if tx["blockNumber"] == params[0]]
        if method == "eth_getBlockReceipts":
            return [self.receipts[h] for h in in_block]
        assert method == "eth_getBlockByNumber", method
        return {"number": params[0], "timestamp": "0x1e", "transactions": [self.txs[h] for h in in_block]}

    async def post(self, url: str, body: bytes) -> HttpReply:
        decoded = orjson.loads(body)
        calls = decoded if isinstance(decoded, list) else [decoded]
        if self.refuse_above is not None and len(calls) > self.refuse_above:
            return HttpReply(413, {}, b"Request Entity Too Large")
        self.requests.append([(c["method"], c["params"][0]) for c in calls])
        answers = [{"jsonrpc": "2.0", "id": c["id"], "result": self._answer(c["method"], c["params"])}
                   for c in calls]  # fmt: skip
        return HttpReply(200, {}, orjson.dumps(answers if isinstance(decoded, list) else answers[0]))

    async def aclose(self) -> None:
        return None

    def sizes(self, *methods: str) -> list[int]:
        """The sizes of the requests made only of ``methods``, in the order sent."""
        return [len(r) for r in self.requests if {m for m, _ in r} <= set(methods)]


async def enrich(node: CountingNode, tmp_path: Any, calls_per_request: int, *, metered: bool = False,
                 shape: PlanShape = "per_tx", max_batch: int | None = None) -> int:  # fmt: skip
    """Enrich every ref of ``node`` as a run with ``--rpc-batch-size calls_per_request`` does
    (its endpoint capped at the same size, unless ``max_batch``); the rows stored."""
    endpoint = EndpointConfig("http://node.invalid/", max_batch=max_batch or calls_per_request)
    client = RpcClient([endpoint], RpcSettings(budget_dir=str(tmp_path)), transport=node)
    plan = PlanSettings(shape=shape, calls_metered=metered)
    async with client:
        got = await Enricher(client, 1, plan=plan, calls_per_request=calls_per_request).enrich(node.refs())
    assert got.failures == []
    return len(got.txs)


async def test_the_free_plan_sends_whole_pairs_and_rounds_an_odd_size_down(tmp_path: Any) -> None:
    node = CountingNode(10)
    assert await enrich(node, tmp_path, 5) == 10
    assert [len(r) for r in node.requests] == [4] * 5  # 2 pairs each: a pair is never split
    for request in node.requests:
        asked = [h for _, h in request]
        assert asked[::2] == asked[1::2]  # each ref's transaction and receipt side by side


async def test_the_free_plan_with_one_call_a_request_still_sends_pairs_the_cap_splits(
    tmp_path: Any,
) -> None:
    node = CountingNode(3)
    assert await enrich(node, tmp_path, 1) == 3
    assert [len(r) for r in node.requests] == [1] * 6


async def test_the_metered_plan_fills_requests_to_an_odd_size(tmp_path: Any) -> None:
    # The second round went in requests of 4 calls for a size of 5 (25% more requests).
    node = CountingNode(10)
    assert await enrich(node, tmp_path, 5, metered=True) == 10
    assert node.sizes("eth_getTransactionReceipt") == [5, 5]
    assert node.sizes("eth_getTransactionByHash") == [5, 5]


async def test_the_metered_plan_asks_transactions_before_the_last_receipts(tmp_path: Any) -> None:
    # It asked every receipt of the batch before any transaction: with a rate limit a stop
    # before the last receipt kept nothing. A request's refs at a time, the first
    # transactions are asked (and their rows complete) while later receipts still wait: the
    # receipts of at most RECEIPTS_AHEAD (2) requests are asked ahead of the transactions.
    node = CountingNode(25)
    assert await enrich(node, tmp_path, 5, metered=True) == 25
    assert node.sizes("eth_getTransactionReceipt") == [5] * 5
    assert node.sizes("eth_getTransactionByHash") == [5] * 5
    methods = [r[0][0] for r in node.requests]
    first_tx = methods.index("eth_getTransactionByHash")
    last_receipts = len(methods) - 1 - methods[::-1].index("eth_getTransactionReceipt")
    assert first_tx < last_receipts, methods


async def test_under_rps_a_part_is_one_request_and_its_transactions_go_before_the_next_receipts(
    tmp_path: Any,
) -> None:
    # `--rps 20` caps a request at 20 calls (a second of the rate) while a part held
    # --rpc-batch-size (100) refs: the receipts of the 2 parts asked ahead were 10 requests,
    # and the next part's were queued before the first part's transactions. A Ctrl+C after
    # 15 s had asked only receipts and kept nothing (QA). Here: rps 10, parts of 30 refs.
    R, T = "eth_getTransactionReceipt", "eth_getTransactionByHash"
    node = CountingNode(30)
    endpoint = EndpointConfig("http://node.invalid/", rps=10)
    client = RpcClient([endpoint], RpcSettings(budget_dir=str(tmp_path)), transport=node)
    async with client:
        got = await Enricher(client, 1, plan=PlanSettings(shape="per_tx", calls_metered=True),
                             calls_per_request=30).enrich(node.refs())  # fmt: skip
    assert len(got.txs) == 30
    assert node.sizes(R, T) == [10] * 6
    # Each part's transactions before the receipts of the parts after those asked ahead.
    assert [r[0][0] for r in node.requests] == [R, R, T, R, T, T]


async def test_a_full_block_the_metered_plan_asks_serves_the_later_requests_refs_too(tmp_path: Any) -> None:
    # Receipts without a timestamp: one full block per block gives transactions and
    # timestamp. Asked a request's refs at a time, a block whose refs straddle two requests
    # is still asked once, and its later refs ask nothing more: 1 receipt per ref and 1
    # block per block, as when every receipt came first.
    node = CountingNode(10)
    for h in node.txs:
        node.txs[h].pop("blockTimestamp", None)
        node.receipts[h].pop("blockTimestamp")
    assert await enrich(node, tmp_path, 5, metered=True) == 10  # blocks 10-14; block 12 straddles
    asked = [c for r in node.requests for c in r]
    assert sum(1 for m, _ in asked if m == "eth_getTransactionReceipt") == 10
    assert sorted(b for m, b in asked if m == "eth_getBlockByNumber") == [hex(b) for b in range(10, 15)]
    assert not [c for c in asked if c[0] == "eth_getTransactionByHash"]


async def test_the_per_block_plan_fills_requests_to_an_odd_size(tmp_path: Any) -> None:
    # Block and block receipts, two calls a block: they went in requests of 4 for a size of
    # 5; a block's two calls may now be in two requests (its refs wait for both).
    node = CountingNode(10)
    assert await enrich(node, tmp_path, 5, metered=True, shape="per_block") == 10
    assert node.sizes("eth_getBlockByNumber", "eth_getBlockReceipts") == [1, 5, 5]  # the probe, the blocks


@pytest.mark.parametrize("metered", [False, True])
async def test_the_endpoints_cap_cuts_requests_larger_than_it(tmp_path: Any, metered: bool) -> None:
    # A provider's max_batch below --rpc-batch-size, and a cap the endpoint learns from
    # refusals: every request holds at most that, and every row is stored.
    node = CountingNode(10)
    assert await enrich(node, tmp_path, 5, metered=metered, max_batch=3) == 10
    assert max(len(r) for r in node.requests) == 3
    refusing = CountingNode(10, refuse_above=2)
    assert await enrich(refusing, tmp_path / "learned", 5, metered=metered) == 10
    assert max(len(r) for r in refusing.requests) <= 2
