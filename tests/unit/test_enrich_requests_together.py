"""The requests an enrichment sends at once (``Enricher._many_each``, the free plan's pairs) end together.

An answer nothing expected (a block without a timestamp) raises in the job it settles,
midway through a batch: the batch is given back, and its other requests must not run on
behind it, asking the node (and spending a rate limit) for a batch no longer held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest

from gapfill.enrich.fetch import Enricher
from gapfill.rpc import RpcClient
from gapfill.rpc.config import Call

pytestmark = pytest.mark.timeout(20)


class HangingClient:
    """Answers a request whose first call asks for ``bad`` with ``answer`` at once; every
    other request waits for good, and records whether it was cancelled."""

    def __init__(self, bad: str, answer: list[Any]) -> None:
        self.bad, self.answer = bad, answer
        self.waiting = 0
        self.cancelled = 0

    async def call_many(self, calls: Sequence[Call]) -> list[Any]:
        if calls[0].params[0] == self.bad:
            return self.answer
        self.waiting += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return []  # pragma: no cover


async def test_a_job_that_raises_cancels_the_requests_still_asked() -> None:
    client = HangingClient("bad", [{"number": "0x1"}])  # a block without its timestamp
    enricher = Enricher(cast(RpcClient, client), 1, calls_per_request=1)

    def settle(answers: list[Any]) -> None:
        int(answers[0]["timestamp"], 16)

    jobs = [([Call("eth_getBlockByNumber", [p, True])], settle) for p in ("slow", "bad", "slow2")]
    with pytest.raises(KeyError):
        await enricher._many_each(jobs)
    assert client.waiting == 2
    assert client.cancelled == 2  # none left running behind the raised batch


BAD = "0x" + "bb" * 32


async def test_a_pair_that_raises_cancels_the_other_pairs_still_asked() -> None:
    # The free per-transaction plan (the dense path) sends its pairs at once too.
    from gapfill.enrich.fetch import Collector
    from gapfill.model import Ref

    client = HangingClient(BAD, [{"hash": BAD, "blockNumber": "0x1"},
                                 {"transactionHash": BAD, "blockNumber": "0xzz"}])  # a malformed receipt
    enricher = Enricher(cast(RpcClient, client), 1, calls_per_request=2)
    c = "0x" + "ab" * 20
    refs = [Ref(1, c, "0x" + "aa" * 32, 1), Ref(1, c, BAD, 1), Ref(1, c, "0x" + "cc" * 32, 1)]
    with pytest.raises(ValueError):
        await enricher._per_tx(refs, Collector())
    assert client.waiting == 2
    assert client.cancelled == 2  # none left running behind the raised batch
