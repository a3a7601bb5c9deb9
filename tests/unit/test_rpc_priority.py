"""With a rate limit, the requests of the batch leased first go first (gapfill.rpc.slots)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from gapfill.rpc import Call, EndpointConfig, RpcClient, RpcSettings
from gapfill.rpc.slots import PRIORITY, PrioritySlots
from gapfill.rpc.transport import HttpReply

pytestmark = pytest.mark.timeout(20)


class GatedNode:
    """Answers every call with its first param, in the order asked; the first request waits
    for ``gate``, so the others queue for the client's one slot meanwhile."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.gate = asyncio.Event()

    async def post(self, url: str, body: bytes) -> HttpReply:
        decoded = orjson.loads(body)
        calls = decoded if isinstance(decoded, list) else [decoded]
        self.asked += [c["params"][0] for c in calls]
        if len(self.asked) == 1:
            await self.gate.wait()
        answers = [{"jsonrpc": "2.0", "id": c["id"], "result": c["params"][0]} for c in calls]
        return HttpReply(200, {}, orjson.dumps(answers if isinstance(decoded, list) else answers[0]))

    async def aclose(self) -> None:
        return None


async def requests_of_two_batches(tmp_path: Path, rps: float | None) -> list[str]:
    """Batch 2 (leased later) asks first; while its first request is out, batch 1 asks too.
    One call a request, one request at a time: the order the node is asked in."""
    node = GatedNode()
    client = RpcClient([EndpointConfig("http://node.invalid/", rps=rps, max_batch=1)],
                       RpcSettings(max_in_flight=1, budget_dir=str(tmp_path)), transport=node)  # fmt: skip

    async def batch(order: int, tag: str) -> None:
        PRIORITY.set(order)  # as the worker does in each batch's task
        await client.call_many([Call("eth_getTransactionByHash", [f"{tag}{i}"]) for i in range(3)])

    async with client:
        later = asyncio.create_task(batch(2, "b"))
        while not node.asked:
            await asyncio.sleep(0)
        earlier = asyncio.create_task(batch(1, "a"))
        slots = client._slots
        while isinstance(slots, PrioritySlots) and slots.waiting() < 5:
            await asyncio.sleep(0)
        node.gate.set()
        await asyncio.gather(later, earlier)
    return node.asked


async def test_with_a_rate_limit_the_earlier_batchs_requests_go_first(tmp_path: Path) -> None:
    # Served in arrival order, batch 2's requests went first, and with four batches in
    # flight on one budget all of them finished late together.
    asked = await requests_of_two_batches(tmp_path, rps=1_000_000)
    assert asked == ["b0", "a0", "a1", "a2", "b1", "b2"]


async def test_without_a_rate_limit_requests_go_in_arrival_order(tmp_path: Path) -> None:
    asked = await requests_of_two_batches(tmp_path, rps=None)
    assert asked == ["b0", "b1", "b2", "a0", "a1", "a2"]


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    slots = PrioritySlots(1)
    order: list[int] = []

    async def take(priority: int) -> None:
        PRIORITY.set(priority)
        async with slots:
            order.append(priority)

    async with slots:
        waiting = [asyncio.create_task(take(p)) for p in (3, 1, 2)]
        while slots.waiting() < 3:
            await asyncio.sleep(0)
        waiting[1].cancel()  # priority 1 gives up before its turn
        while slots.waiting() > 2:
            await asyncio.sleep(0)
    await asyncio.gather(*waiting, return_exceptions=True)
    assert order == [2, 3]
    async with slots:  # every slot came back
        assert slots.waiting() == 0
