"""With metered calls (a rate limit configured or learned from a 429), the requests of
the batch leased first go first (gapfill.rpc.slots)."""

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
    """Answers every call with its first param, in the order asked; the request asking
    for ``b0`` waits for ``gate``, so the others queue for the client's one slot meanwhile.
    It answers HTTP 429 once, to the request asking for ``refuse``."""

    def __init__(self, refuse: str | None = None) -> None:
        self.asked: list[str] = []
        self.gate = asyncio.Event()
        self.refuse = refuse

    async def post(self, url: str, body: bytes) -> HttpReply:
        decoded = orjson.loads(body)
        calls = decoded if isinstance(decoded, list) else [decoded]
        params = [c["params"][0] for c in calls]
        if self.refuse in params:
            self.refuse = None
            return HttpReply(429, {}, b"Too Many Requests")
        self.asked += params
        if "b0" in params:
            await self.gate.wait()
        answers = [{"jsonrpc": "2.0", "id": c["id"], "result": c["params"][0]} for c in calls]
        return HttpReply(200, {}, orjson.dumps(answers if isinstance(decoded, list) else answers[0]))

    async def aclose(self) -> None:
        return None


async def requests_of_two_batches(
    tmp_path: Path, rps: float | None, *, before: int = 0, refused: bool = False
) -> tuple[list[str], bool]:
    """Batch 2 (leased later) asks first; while its first request is out, batch 1 asks too.
    One call a request, one request at a time: the order the node is asked in after the
    ``before`` calls made first (their last one answered 429 once if ``refused``), and
    whether the client said batch 2's requests wait their turn (:meth:`RpcClient.queued`)."""
    node = GatedNode(f"w{before - 1}" if refused else None)
    client = RpcClient([EndpointConfig("http://node.invalid/", rps=rps, max_batch=1)],
                       RpcSettings(max_in_flight=1, budget_dir=str(tmp_path)), transport=node)  # fmt: skip

    async def batch(order: int, tag: str, calls: int = 3) -> None:
        PRIORITY.set(order)  # as the worker does in each batch's task
        await client.call_many([Call("eth_getTransactionByHash", [f"{tag}{i}"]) for i in range(calls)])

    async with client:
        if before:
            await batch(0, "w", before)
            node.asked.clear()
        later = asyncio.create_task(batch(2, "b"))
        while not node.asked:
            await asyncio.sleep(0)
        earlier = asyncio.create_task(batch(1, "a"))
        slots = client._slots
        while isinstance(slots, PrioritySlots) and slots.waiting() < 5:
            await asyncio.sleep(0)
        queued = client.queued(2)
        node.gate.set()
        await asyncio.gather(later, earlier)
    return node.asked, queued


async def test_with_a_rate_limit_the_earlier_batchs_requests_go_first(tmp_path: Path) -> None:
    # Served in arrival order, batch 2's requests went first, and with four batches in
    # flight on one budget all of them finished late together.
    asked = await requests_of_two_batches(tmp_path, rps=1_000_000)
    assert asked == (["b0", "a0", "a1", "a2", "b1", "b2"], True)


async def test_without_a_rate_limit_requests_go_in_arrival_order(tmp_path: Path) -> None:
    asked = await requests_of_two_batches(tmp_path, rps=None, before=400)
    assert asked == (["b0", "b1", "b2", "a0", "a1", "a2"], False)


async def test_with_a_rate_learned_from_a_429_the_earlier_batchs_requests_go_first(tmp_path: Path) -> None:
    # A free-tier provider without --rps: its first 429 teaches the endpoint a rate, and
    # from then on its calls are metered as under --rps. Served in arrival order, a
    # worker's batches in flight shared the learned budget evenly and all finished late.
    asked = await requests_of_two_batches(tmp_path, rps=None, before=400, refused=True)
    assert asked == (["b0", "a0", "a1", "a2", "b1", "b2"], True)


async def test_a_429_under_ten_calls_a_second_teaches_a_rate_too(tmp_path: Path) -> None:
    # A trickle refused (5 calls in 2 s) was not learned as a limit, so a free tier's
    # 5 calls/s was never respected; it is metered now, as any learned rate.
    asked = await requests_of_two_batches(tmp_path, rps=None, before=5, refused=True)
    assert asked == (["b0", "a0", "a1", "a2", "b1", "b2"], True)


def queue_for(slots: PrioritySlots, priorities: list[int], order: list[int]) -> list[asyncio.Task[None]]:
    """A task per priority that takes a slot, notes its priority in ``order`` and leaves."""

    async def take(priority: int) -> None:
        PRIORITY.set(priority)
        async with slots:
            order.append(priority)

    return [asyncio.create_task(take(p)) for p in priorities]


@pytest.mark.parametrize(("switch", "expected"), [(False, [3, 1, 2]), (True, [1, 2, 3])])
async def test_waiters_queued_in_arrival_order_are_reordered_when_the_priority_order_begins(
    switch: bool, expected: list[int]
) -> None:
    # The first learned 429 comes with a round of every batch's requests already waiting:
    # they are served by priority too, not that whole round first.
    slots = PrioritySlots(1)
    order: list[int] = []
    async with slots:
        waiting = queue_for(slots, [3, 1, 2], order)
        while slots.waiting() < 3:
            await asyncio.sleep(0)
        if switch:
            slots.by_priority()
    await asyncio.gather(*waiting)
    assert order == expected


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    slots = PrioritySlots(1, prioritized=True)
    order: list[int] = []
    async with slots:
        waiting = queue_for(slots, [3, 1, 2], order)
        while slots.waiting() < 3:
            await asyncio.sleep(0)
        waiting[1].cancel()  # priority 1 gives up before its turn
        while slots.waiting() > 2:
            await asyncio.sleep(0)
    await asyncio.gather(*waiting, return_exceptions=True)
    assert order == [2, 3]
    async with slots:  # every slot came back
        assert slots.waiting() == 0
