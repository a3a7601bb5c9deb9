"""A receipt that lags behind its transaction is "not yet", never "not found".

The enricher and the RPC client together, over a scripted transport (no sockets):
each call's answers are scripted per method, ``null`` until the node "catches up".
The client's waits between tries (``asyncio.sleep``) are recorded instead of slept,
so the spacing of null retries is checked without reading a clock.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any
from unittest.mock import patch

import orjson
import pytest
from fixtures_io import result

from gapfill.enrich.fetch import Enricher, PlanSettings
from gapfill.model import Ref
from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings
from gapfill.rpc.transport import HttpReply

pytestmark = pytest.mark.timeout(20)

_real_sleep = asyncio.sleep

CHAIN = 0xC72DD9D5E883E  # the execution-apis test chain
TX = result("eth_getTransactionByHash/get-legacy-tx")
RECEIPT = result("eth_getTransactionReceipt/get-legacy-receipt")
HASH = TX["hash"].lower()
TX_METHOD, RECEIPT_METHOD = "eth_getTransactionByHash", "eth_getTransactionReceipt"
BLOCK_METHOD = "eth_getBlockByNumber"  # the metered plan's full block, for the timestamp
HEAD_METHOD, BLOCK_RECEIPTS_METHOD = "eth_blockNumber", "eth_getBlockReceipts"
BLOCK = int(TX["blockNumber"], 16)


class ScriptedNode:
    """A transport whose answers follow a script per method: ``"null"``, ``"502"`` (the whole
    request fails), ``"lacks"`` (-32601, as a load balancer's bad backend may say), ``"found"``;
    the last step repeats. Every request and every wait the
    client asks for goes into ``events``, in order."""

    def __init__(self, script: dict[str, list[str]], tx: dict[str, Any] = TX, head: int = BLOCK,
                 receipt: dict[str, Any] = RECEIPT) -> None:  # fmt: skip
        self.tx = tx
        self.receipt = receipt
        self.head = head  # the node's head: by default it has reached the transaction's block
        script = {BLOCK_METHOD: ["found"], HEAD_METHOD: ["found"], BLOCK_RECEIPTS_METHOD: ["found"], **script}
        self.script = {m: iter(steps) for m, steps in script.items()}
        self.last = {m: steps[-1] for m, steps in script.items()}
        self.events: list[tuple[str, Any]] = []
        self.asked: dict[str, int] = {}

    def _step(self, method: str) -> str:
        self.asked[method] = self.asked.get(method, 0) + 1
        return next(self.script[method], self.last[method])

    async def post(self, url: str, body: bytes) -> HttpReply:
        decoded = orjson.loads(body)
        calls = decoded if isinstance(decoded, list) else [decoded]
        self.events.append(("post", tuple(c["method"] for c in calls)))
        steps = [self._step(c["method"]) for c in calls]
        if "502" in steps:
            return HttpReply(502, {}, b"bad gateway")
        found = {TX_METHOD: self.tx, RECEIPT_METHOD: self.receipt, HEAD_METHOD: hex(self.head),
                 BLOCK_RECEIPTS_METHOD: [self.receipt],
                 BLOCK_METHOD: {"number": TX["blockNumber"], "hash": self.receipt["blockHash"],
                                "timestamp": "0x1e", "transactions": [self.tx]}}
        lacks = {"code": -32601, "message": "the method does not exist/is not available"}
        answers = [{"jsonrpc": "2.0", "id": c["id"], "error": lacks} if step == "lacks" else
                   {"jsonrpc": "2.0", "id": c["id"], "result": None if step == "null" else found[c["method"]]}
                   for c, step in zip(calls, steps, strict=True)]  # fmt: skip
        return HttpReply(200, {}, orjson.dumps(answers if isinstance(decoded, list) else answers[0]))

    async def aclose(self) -> None:
        return None

    async def sleep(self, delay: float) -> None:
        self.events.append(("sleep", delay))
        await _real_sleep(0)

    def sleeps(self) -> list[float]:
        return [d for kind, d in self.events if kind == "sleep"]


@pytest.fixture
def settings(tmp_path: Any) -> Iterator[RpcSettings]:
    # A failure's backoff (full jitter) stays under 0.02 s here, below the null spacing.
    yield RpcSettings(backoff_base_s=0.01, backoff_max_s=0.02, budget_dir=str(tmp_path))


async def enrich(node: ScriptedNode, settings: RpcSettings, plan: str, block: int | None = BLOCK,
                 hashes: tuple[str, ...] = (HASH,)) -> Any:  # fmt: skip
    client = RpcClient([EndpointConfig("http://node.invalid/")], settings, transport=node)
    shape = "per_block" if plan == "per_block" else "auto"
    enricher = Enricher(client, CHAIN, plan=PlanSettings(calls_metered=plan == "metered", shape=shape))
    refs = [Ref(CHAIN, "0x" + "cc" * 20, h, block, "test") for h in hashes]
    # The client's waits are recorded in ``node.events``, not slept.
    with patch("gapfill.rpc.client.asyncio.sleep", node.sleep):
        async with client:
            if plan == "sequential":
                return await enricher.enrich_sequential(refs)
            return await enricher.enrich(refs)


PLANS = ["pairs", "metered", "sequential"]


@pytest.mark.parametrize("plan", PLANS)
async def test_null_receipt_of_a_mined_transaction_is_transient(settings: RpcSettings, plan: str) -> None:
    node = ScriptedNode({TX_METHOD: ["found"], RECEIPT_METHOD: ["null"]})
    got = await enrich(node, settings, plan)
    assert got.txs == []
    [failure] = got.failures
    assert failure.reason == "rpc_error" and not failure.permanent, failure
    assert f"mined in block {BLOCK}:" in failure.last_error  # decimal, as every block number said
    assert node.asked[RECEIPT_METHOD] == settings.attempts  # three nulls in this attempt, spaced


@pytest.mark.parametrize("plan", PLANS)
async def test_null_receipt_of_a_pending_transaction_is_transient(settings: RpcSettings, plan: str) -> None:
    pending = {**TX, "blockNumber": None, "blockHash": None, "transactionIndex": None}
    node = ScriptedNode({TX_METHOD: ["found"], RECEIPT_METHOD: ["null"]}, tx=pending)
    got = await enrich(node, settings, plan)
    [failure] = got.failures
    assert failure.reason == "rpc_error" and "pending" in failure.last_error, failure


@pytest.mark.parametrize("plan", PLANS)
async def test_unknown_transaction_is_not_found(settings: RpcSettings, plan: str) -> None:
    node = ScriptedNode({TX_METHOD: ["null"], RECEIPT_METHOD: ["null"]})
    got = await enrich(node, settings, plan)
    [failure] = got.failures
    assert (failure.reason, failure.permanent) == ("not_found", True), failure
    assert failure.last_error == "still null after 3 answers"
    assert node.asked[TX_METHOD] == settings.attempts
    assert node.asked[HEAD_METHOD] == 1  # the node has reached its block: no excuse


@pytest.mark.parametrize("plan", PLANS)
async def test_null_transaction_above_the_node_head_is_not_yet_not_not_found(
    settings: RpcSettings, plan: str
) -> None:
    # Five refs in a block the node (a lagging one) has not reached: one head for all of them.
    hashes = tuple(HASH[:-2] + f"{i:02x}" for i in range(5))
    node = ScriptedNode({TX_METHOD: ["null"], RECEIPT_METHOD: ["null"]}, head=BLOCK - 1)
    got = await enrich(node, settings, plan, hashes=hashes)
    assert got.txs == [] and sorted(f.tx_hash for f in got.failures) == sorted(hashes)
    for failure in got.failures:
        assert (failure.reason, failure.permanent) == ("beyond_head", False), failure
        assert failure.last_error == f"block {BLOCK} is above the node's head {BLOCK - 1}: not reached yet"
    assert node.asked[HEAD_METHOD] == 1


@pytest.mark.parametrize("plan", PLANS)
async def test_null_transaction_without_a_block_number_is_not_found(settings: RpcSettings, plan: str) -> None:
    node = ScriptedNode({TX_METHOD: ["null"], RECEIPT_METHOD: ["null"]}, head=BLOCK - 1)
    got = await enrich(node, settings, plan, block=None)
    [failure] = got.failures
    assert (failure.reason, failure.permanent) == ("not_found", True), failure
    assert HEAD_METHOD not in node.asked  # nothing to compare the head with


@pytest.mark.parametrize("plan", PLANS)
async def test_null_with_the_head_unknown_is_transient(settings: RpcSettings, plan: str) -> None:
    node = ScriptedNode({TX_METHOD: ["null"], RECEIPT_METHOD: ["null"], HEAD_METHOD: ["502"]})
    got = await enrich(node, settings, plan)
    [failure] = got.failures
    assert (failure.reason, failure.permanent) == ("rpc_error", False), failure
    assert "the node's head could not be asked" in failure.last_error and "502" in failure.last_error


@pytest.mark.parametrize("plan", PLANS)
async def test_null_block_above_the_node_head_is_not_yet(settings: RpcSettings, plan: str) -> None:
    # Transaction and receipt found (neither with the block's timestamp), the block (header
    # or full) for the timestamp null: a load balancer's backends at different heights.
    # Above the head that null says "not yet".
    untimed = {k: v for k, v in TX.items() if k != "blockTimestamp"}
    node = ScriptedNode({TX_METHOD: ["found"], RECEIPT_METHOD: ["found"], BLOCK_METHOD: ["null"]},
                        tx=untimed, head=BLOCK - 1)  # fmt: skip
    got = await enrich(node, settings, plan, block=None)  # the block asked is the receipt's
    [failure] = got.failures
    assert (failure.reason, failure.permanent) == ("beyond_head", False), failure


@pytest.mark.parametrize("plan", PLANS)
async def test_null_transaction_despite_its_receipt_is_transient(settings: RpcSettings, plan: str) -> None:
    # A load balancer: one backend answers the receipt, a lagging one the transaction lookup.
    # The node knows the transaction (as with a receipt null beside a returned transaction).
    # The receipt tells the block's timestamp, so the metered plan looks the transaction up
    # (rather than fetching the full block).
    timed = {**RECEIPT, "blockTimestamp": "0x1e"}
    node = ScriptedNode({TX_METHOD: ["null"], RECEIPT_METHOD: ["found"]}, head=BLOCK + 10, receipt=timed)
    got = await enrich(node, settings, plan)
    assert got.txs == []
    [failure] = got.failures
    assert (failure.reason, failure.permanent) == ("rpc_error", False), failure
    assert failure.last_error == (f"transaction lookup still null after 3 answers, but the node "
                                  f"returned its receipt (block {BLOCK}); tried again later")  # fmt: skip


@pytest.mark.parametrize("plan", PLANS)
async def test_one_method_not_found_answer_fails_no_ref(settings: RpcSettings, plan: str) -> None:
    # It set eth_getTransactionReceipt aside for the client's life: this ref and every later
    # one became a permanent failure without its receipt being asked again.
    node = ScriptedNode({TX_METHOD: ["found"], RECEIPT_METHOD: ["lacks", "found"]})
    got = await enrich(node, settings, plan)
    assert got.failures == [] and [t.tx_hash for t in got.txs] == [HASH]


@pytest.mark.parametrize("plan", PLANS)
async def test_null_block_despite_a_receipt_in_it_is_transient(settings: RpcSettings, plan: str) -> None:
    # The block (header or full) for the timestamp null at or below the head, although a
    # receipt in it came: a lagging backend again, not a transaction the node does not know.
    untimed = {k: v for k, v in TX.items() if k != "blockTimestamp"}
    node = ScriptedNode({TX_METHOD: ["found"], RECEIPT_METHOD: ["found"], BLOCK_METHOD: ["null"]},
                        tx=untimed, head=BLOCK + 10)  # fmt: skip
    got = await enrich(node, settings, plan)
    [failure] = got.failures
    assert (failure.reason, failure.permanent) == ("rpc_error", False), failure
    assert f"the node returned a receipt in block {BLOCK}; tried again later" in failure.last_error


async def test_per_block_plan_null_block_above_the_node_head_is_not_yet(settings: RpcSettings) -> None:
    node = ScriptedNode({BLOCK_METHOD: ["null"], BLOCK_RECEIPTS_METHOD: ["null"], TX_METHOD: ["null"],
                         RECEIPT_METHOD: ["null"]}, head=BLOCK - 1)  # fmt: skip
    got = await enrich(node, settings, "per_block")
    [failure] = got.failures
    assert (failure.reason, failure.permanent) == ("beyond_head", False), failure
    # The ref's block number may be wrong: its transaction is looked up before anything is said.
    assert node.asked[TX_METHOD] == settings.attempts
    assert node.asked[HEAD_METHOD] == 1


async def test_per_block_plan_null_block_at_or_below_the_head_falls_back_to_lookups(
    settings: RpcSettings,
) -> None:
    node = ScriptedNode({BLOCK_METHOD: ["null"], BLOCK_RECEIPTS_METHOD: ["null"], TX_METHOD: ["null"],
                         RECEIPT_METHOD: ["null"]})  # fmt: skip
    got = await enrich(node, settings, "per_block")
    [failure] = got.failures
    assert (failure.reason, failure.permanent) == ("not_found", True), failure
    assert node.asked[TX_METHOD] == settings.attempts


# Not the pairs plan: there one request holds both calls, so a 502 fails the receipt's too.
@pytest.mark.parametrize("plan", ["metered", "sequential"])
async def test_receipt_null_and_transaction_lookup_failing_is_transient(
    settings: RpcSettings, plan: str
) -> None:
    node = ScriptedNode({TX_METHOD: ["502"], RECEIPT_METHOD: ["null"]})
    got = await enrich(node, settings, plan)
    [failure] = got.failures
    assert failure.reason == "rpc_error" and "502" in failure.last_error, failure


@pytest.mark.parametrize("plan", PLANS)
async def test_null_retries_are_spaced_so_a_lagging_node_catches_up(
    settings: RpcSettings, plan: str
) -> None:
    node = ScriptedNode({TX_METHOD: ["found"], RECEIPT_METHOD: ["null", "null", "found"]})
    got = await enrich(node, settings, plan)
    assert got.failures == [] and [t.tx_hash for t in got.txs] == [HASH]
    # Each null is asked again after the null spacing (0.25 s, then doubled), not back to back.
    assert node.sleeps() == [0.25, 0.5]
    receipt_posts = [i for i, (kind, what) in enumerate(node.events)
                     if kind == "post" and RECEIPT_METHOD in what]  # fmt: skip
    assert len(receipt_posts) == 3
    for before, after in itertools.pairwise(receipt_posts):
        assert any(kind == "sleep" for kind, _ in node.events[before:after]), node.events


async def test_failures_between_nulls_neither_count_nor_take_the_null_spacing(
    settings: RpcSettings,
) -> None:
    node = ScriptedNode({TX_METHOD: ["found"], RECEIPT_METHOD: ["null", "502", "null", "502", "found"]})
    got = await enrich(node, settings, "metered")
    assert got.failures == [] and [t.tx_hash for t in got.txs] == [HASH]
    # The nulls' waits are the spacing; the failures' are their own (short) backoff: a
    # failure after a null neither counts as a null nor waits as if it were one.
    assert [d for d in node.sleeps() if d >= 0.25] == [
        0.25, 0.5]
    assert len(node.sleeps()) <= 4
    assert node.asked[RECEIPT_METHOD] == 5


def test_null_spacing_is_bounded(tmp_path: Any) -> None:
    s = RpcSettings(attempts=12, backoff_base_s=0.001, backoff_max_s=0.001, budget_dir=str(tmp_path))
    client = RpcClient([EndpointConfig("http://node.invalid/")], s, transport=ScriptedNode({}))
    from gapfill.rpc.client import _Item
    from gapfill.rpc.config import Call

    items = [_Item(Call(RECEIPT_METHOD, [HASH], null_retry=True), nulls=n) for n in range(1, 12)]
    delays = [client._retry_delay([i], items, items[i].nulls) for i in range(len(items))]
    assert delays[:3] == [0.25, 0.5, 1.0]
    assert max(delays) == 2.0  # null_backoff_max_s


OTHER_BLOCK = "0x" + "ee" * 32  # the block now at the receipt's height (another fork)


class OtherForkHeaders(ScriptedNode):
    """Headers come from the other fork: same number, another hash and timestamp."""

    async def post(self, url: str, body: bytes) -> HttpReply:
        reply = await super().post(url, body)
        decoded, answers = orjson.loads(body), orjson.loads(reply.body)
        many = isinstance(answers, list)
        for call, answer in zip(decoded if many else [decoded], answers if many else [answers], strict=True):
            if call["method"] == BLOCK_METHOD and answer.get("result"):
                answer["result"] = {**answer["result"], "hash": OTHER_BLOCK, "timestamp": "0x99"}
        return HttpReply(reply.status, reply.headers, orjson.dumps(answers))


@pytest.mark.parametrize("plan", ["pairs", "sequential"])
async def test_a_header_of_another_block_at_the_receipts_height_fails_the_ref_not_its_timestamp(
    settings: RpcSettings, plan: str
) -> None:
    # Neither transaction nor receipt carries blockTimestamp: the header is asked by number,
    # and after a reorg (or behind backends on two forks) it is another block's. The row
    # took that block's timestamp with the receipt's block hash, silently.
    tx = {k: v for k, v in TX.items() if k != "blockTimestamp"}
    node = OtherForkHeaders({TX_METHOD: ["found"], RECEIPT_METHOD: ["found"]}, tx=tx)
    got = await enrich(node, settings, plan)
    assert node.asked.get(BLOCK_METHOD), "the header path was not taken"
    assert got.txs == []
    [failure] = got.failures
    assert failure.reason == "rpc_error" and f"block {BLOCK} changed under the node" in failure.last_error


@pytest.mark.parametrize("plan", ["pairs", "sequential"])
async def test_a_header_of_the_receipts_block_gives_the_row_its_timestamp(
    settings: RpcSettings, plan: str
) -> None:
    tx = {k: v for k, v in TX.items() if k != "blockTimestamp"}
    got = await enrich(ScriptedNode({TX_METHOD: ["found"], RECEIPT_METHOD: ["found"]}, tx=tx), settings, plan)
    [row] = got.txs
    assert (row.block_hash, row.block_timestamp) == (RECEIPT["blockHash"].lower(), 0x1E)
