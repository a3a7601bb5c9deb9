"""A block fetched whole for one batch also settles its riders (the refs of the run's other
contracts in it), and batches of one process in flight together ask a block once.

Each contract's batches fetched the blocks two contracts shared again: QA's run made 808
calls where the dry run said 370 + 370.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from typing import Any

import orjson
import pytest
from test_enrich_request_sizes import CountingNode

from gapfill.enrich.fetch import Enricher, PlanSettings
from gapfill.model import Ref
from gapfill.rpc import Call, EndpointConfig, RpcClient, RpcSettings

pytestmark = pytest.mark.timeout(20)

OTHER = "0x" + "dd" * 20


def _enricher(node: CountingNode, tmp_path: Any) -> tuple[RpcClient, Enricher]:
    client = RpcClient([EndpointConfig("http://node.invalid/", max_batch=100)],
                       RpcSettings(budget_dir=str(tmp_path)), transport=node)  # fmt: skip
    return client, Enricher(client, 1, plan=PlanSettings(calls_metered=True))


def _blocks_asked(node: CountingNode) -> list[str]:
    return [b for r in node.requests for m, b in r if m == "eth_getBlockByNumber"]


class _SlowNode(CountingNode):
    """Answers each request ``delay_s`` after it came."""

    def __init__(self, refs: int, delay_s: float) -> None:
        super().__init__(refs)
        self.delay_s = delay_s

    async def post(self, url: str, body: bytes) -> Any:
        await asyncio.sleep(self.delay_s)
        return await CountingNode.post(self, url, body)


async def test_two_contracts_batches_in_flight_together_ask_each_block_once(tmp_path: Any) -> None:
    node = CountingNode(20)  # two refs a block, blocks 10-19: one of each contract
    refs = node.refs()
    mine = refs[::2]
    theirs = [replace(r, contract=OTHER) for r in refs[1::2]]
    client, enricher = _enricher(node, tmp_path)
    async with client:
        a, b = await asyncio.gather(enricher.enrich(mine, riders=theirs),
                                    enricher.enrich(theirs, riders=mine))  # fmt: skip
    assert a.failures == b.failures == []
    assert {t.tx_hash for t in a.txs} == {t.tx_hash for t in b.txs} == {r.tx_hash for r in refs}
    # The riders' rows, whether its fetch made them or the other's, are told apart (Enriched.own).
    assert a.rode == {r.tx_hash for r in theirs} and b.rode == {r.tx_hash for r in mine}
    assert sorted(_blocks_asked(node)) == sorted({hex(r.block_number or 0) for r in refs})  # each once
    # Alone, one ref a block is below the break-even: each batch asked its refs one by one.
    assert not [m for r in node.requests for m, _ in r if m == "eth_getTransactionReceipt"]


async def test_a_later_batch_takes_the_rows_a_block_made_for_its_refs(tmp_path: Any) -> None:
    node = CountingNode(20)
    refs = node.refs()
    mine, theirs = refs[::2], [replace(r, contract=OTHER) for r in refs[1::2]]
    client, enricher = _enricher(node, tmp_path)
    async with client:
        await enricher.enrich(mine, riders=theirs)
        asked = len(node.requests)
        later = await enricher.enrich(theirs, riders=[])  # leased before the first one's commit
    assert later.failures == [] and {t.tx_hash for t in later.txs} == {r.tx_hash for r in theirs}
    assert len(node.requests) == asked  # nothing asked again


async def test_a_rider_the_block_lacks_fails_nothing_and_is_not_asked(tmp_path: Any) -> None:
    node = CountingNode(4)
    refs = node.refs()
    lost = Ref(1, OTHER, "0x" + "ee" * 32, refs[0].block_number, "test")  # a wrong block number
    client, enricher = _enricher(node, tmp_path)
    async with client:
        got = await enricher.enrich(refs, riders=[lost])
    assert got.failures == [] and len(got.txs) == 4
    assert all(h != lost.tx_hash for r in node.requests for _, h in r)


async def test_a_batch_waiting_for_another_batchs_blocks_counts_their_answers_as_progress(
    tmp_path: Any,
) -> None:
    # B's refs are in the last of the blocks A fetches whole, one request per block: B asks
    # nothing, and its lease was renewed only once A's last block came (at --rps 1, 500 s
    # for 250 blocks, past the 300 s lease: B's worker was killed as stuck).
    from gapfill.rpc.client import ANSWERED

    node = _SlowNode(40, 0.01)  # blocks 10-29, two refs each
    refs = node.refs()
    client = RpcClient([EndpointConfig("http://node.invalid/", max_batch=2)],
                       RpcSettings(budget_dir=str(tmp_path)), transport=node)  # fmt: skip
    enricher = Enricher(client, 1, plan=PlanSettings(shape="per_block"))
    credits: list[int] = []
    a_done: list[int] = []
    theirs = replace(refs[-1], contract=OTHER)

    async def a() -> Any:
        got = await enricher.enrich(refs[:-1], riders=[theirs])
        a_done.append(len(credits))
        return got

    async def b() -> Any:
        while refs[-1].block_number not in enricher._blocks_asked:  # once A asked its blocks
            await asyncio.sleep(0.001)
        ANSWERED.set(lambda: credits.append(1))
        return await enricher.enrich([theirs], riders=refs[-2:-1])

    async with client:
        got_a, got_b = await asyncio.gather(a(), b())
    assert got_a.failures == got_b.failures == [] and theirs.tx_hash in {t.tx_hash for t in got_b.txs}
    assert sorted(_blocks_asked(node)) == sorted({hex(r.block_number or 0) for r in refs})  # each once
    assert a_done and a_done[0] >= 10, (a_done, len(credits))  # credited as A's blocks came


class _GatedNode(CountingNode):
    """Holds every request asking about a block (hex) in :attr:`gates` until its gate is set."""

    def __init__(self, refs: int) -> None:
        super().__init__(refs)
        self.gates: dict[str, asyncio.Event] = {}

    async def post(self, url: str, body: bytes) -> Any:
        decoded = orjson.loads(body)
        for call in decoded if isinstance(decoded, list) else [decoded]:
            gate = self.gates.get(call["params"][0])
            if gate is not None:
                await gate.wait()
        return await CountingNode.post(self, url, body)


async def test_a_batch_that_ends_leaves_another_batchs_later_fetch_of_its_block_alone(
    tmp_path: Any,
) -> None:
    # A's block 10 is answered while its block 11 is held; C, whose ref A's rows of block 10
    # lack, asks block 10 again, and D waits for C's fetch. As A ended, it cancelled C's fetch
    # (the one then in A's place for block 10), and D asked block 10 a third time.
    node = _GatedNode(4)  # blocks 10 (refs 0, 1) and 11 (refs 2, 3)
    r = node.refs()
    client = RpcClient([EndpointConfig("http://node.invalid/", max_batch=2)],
                       RpcSettings(budget_dir=str(tmp_path)), transport=node)  # fmt: skip
    enricher = Enricher(client, 1, plan=PlanSettings(shape="per_block"), calls_per_request=2)
    node.gates["0xb"] = asyncio.Event()
    async with client:
        a = asyncio.create_task(enricher.enrich([r[0], r[2]]))
        while 10 not in enricher._block_rows:
            await asyncio.sleep(0.001)
        node.gates["0xa"] = asyncio.Event()  # C's fetch of block 10 is held
        c = asyncio.create_task(enricher.enrich([r[1]]))
        while 10 not in enricher._blocks_asked:
            await asyncio.sleep(0.001)
        d = asyncio.create_task(enricher.enrich([replace(r[1], contract=OTHER)]))
        await asyncio.sleep(0.05)  # D waits for C's fetch
        node.gates["0xb"].set()
        await a
        await asyncio.sleep(0.05)
        node.gates["0xa"].set()
        got_c, got_d = await c, await d
    assert got_c.failures == got_d.failures == []
    assert _blocks_asked(node).count("0xa") == 2, _blocks_asked(node)  # A's, and C's for D too


def _lease_keeper(client: RpcClient, renewed: list[str], name: str, priority: int) -> Any:
    """Run :meth:`Worker._keep_lease` (a 1.5 s lease) for a batch ``name`` enriched in this
    context, as the worker does; each renewal appends ``name`` to ``renewed``."""
    from types import SimpleNamespace

    from gapfill.engine.worker import Worker
    from gapfill.enrich.fetch import AWAITED
    from gapfill.rpc.client import ANSWERED
    from gapfill.rpc.slots import PRIORITY

    async def db(fn: Any, *args: Any) -> bool:
        renewed.append(name)
        return True

    answered = [0]
    awaited: Counter[int] = Counter()
    ANSWERED.set(lambda: answered.__setitem__(0, answered[0] + 1))
    PRIORITY.set(priority)
    AWAITED.set(awaited)
    worker = SimpleNamespace(settings=SimpleNamespace(lease_timeout_s=1.5), client=client, db=db,
                             store=SimpleNamespace(renew=None))  # fmt: skip
    keep = Worker._keep_lease(worker, SimpleNamespace(id=name), asyncio.Event(), answered,  # type: ignore[arg-type]
                              priority, awaited)  # fmt: skip
    return asyncio.create_task(keep)


async def test_a_batch_waiting_for_a_block_fetch_the_rate_limit_holds_back_keeps_its_lease(
    tmp_path: Any,
) -> None:
    # A asks its 40 blocks whole in one request of 80 calls, held back ~4 s at 20 calls/s; B's
    # refs are all in A's blocks, so B asks nothing meanwhile. Its lease was not renewed (held
    # back was A's request, not B's) and expired: its worker was killed as stuck. At a low
    # --rps, a request of --rpc-batch-size calls waits longer than the 300 s lease.
    node = CountingNode(80)  # blocks 10-49, two refs each
    refs = node.refs()
    client = RpcClient([EndpointConfig("http://node.invalid/", rps=20, max_batch=80)],
                       RpcSettings(budget_dir=str(tmp_path)), transport=node)  # fmt: skip
    enricher = Enricher(client, 1, plan=PlanSettings(calls_metered=True), calls_per_request=80)
    mine, theirs = refs[::2], [replace(r, contract=OTHER) for r in refs[1::2]]
    renewed: list[str] = []

    async def batch(name: str, priority: int, own: list[Ref], riders: list[Ref]) -> Any:
        keeper = _lease_keeper(client, renewed, name, priority)
        try:
            return await enricher.enrich(own, riders=riders)
        finally:
            keeper.cancel()

    async def b() -> Any:
        while not enricher._blocks_asked:  # once A asked its blocks
            await asyncio.sleep(0.001)
        return await batch("B", 2, theirs, mine)

    async with client:
        got_a, got_b = await asyncio.gather(batch("A", 1, mine, theirs), b())
    assert got_a.failures == got_b.failures == [] and len(got_b.txs) == 80
    assert renewed.count("A") >= 3, renewed  # held back by the rate limit: waiting, not stuck
    assert renewed.count("B") >= 3, renewed  # and so is B, waiting for A's request


async def test_a_batch_waiting_for_a_block_fetch_queued_behind_an_earlier_batch_keeps_its_lease(
    tmp_path: Any,
) -> None:
    # A's block request waits for the client's one slot while an earlier batch E's requests
    # are answered one after another (~3 s); B waits for A's blocks. A is renewed (its turn
    # comes while the node answers), and B was not.
    from gapfill.rpc.slots import PRIORITY

    node = _SlowNode(40, 0.15)
    refs = node.refs()
    client = RpcClient([EndpointConfig("http://node.invalid/", rps=10_000, max_batch=100)],
                       RpcSettings(budget_dir=str(tmp_path), max_in_flight=1), transport=node)  # fmt: skip
    enricher = Enricher(client, 1, plan=PlanSettings(calls_metered=True))
    mine, theirs = refs[::2], [replace(r, contract=OTHER) for r in refs[1::2]]
    renewed: list[str] = []

    async def earlier() -> None:  # a per-transaction batch leased first: 20 requests of 1 call
        PRIORITY.set(1)
        await asyncio.gather(*(client.call_many([Call("eth_getTransactionReceipt", [r.tx_hash])])
                               for r in refs[:20]))  # fmt: skip

    async def batch(name: str, priority: int, own: list[Ref], riders: list[Ref]) -> Any:
        if name == "B":
            while not enricher._blocks_asked:  # once A asked its blocks
                await asyncio.sleep(0.001)
        else:
            await asyncio.sleep(0.05)  # once E's requests are queued
        keeper = _lease_keeper(client, renewed, name, priority)
        try:
            return await enricher.enrich(own, riders=riders)
        finally:
            keeper.cancel()

    async with client:
        *_, got_b = await asyncio.gather(earlier(), batch("A", 2, mine, theirs),
                                         batch("B", 3, theirs, mine))  # fmt: skip
    assert got_b.failures == [] and len(got_b.txs) == 40
    assert renewed.count("A") >= 3, renewed  # its turn waited while the node answered
    assert renewed.count("B") >= 3, renewed  # and B waited for A's request
