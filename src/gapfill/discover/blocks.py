"""Block scan: full blocks (``eth_getBlockByNumber(n, true)``) in JSON-RPC batches.

Finds every transaction whose ``to`` is the contract, reverted and silent ones
included; it cannot see calls that reach the contract from another contract
(internal calls), so its coverage is *partial* unless ``logs`` scanned the same
blocks (see :mod:`gapfill.discover.coverage`). It costs one call per block,
whatever the contract's traffic.
"""

from __future__ import annotations

from gapfill.discover.ranges import Interval
from gapfill.model import Ref
from gapfill.rpc import Call, CallError, RpcClient

METHOD = "blocks"


async def scan_blocks(
    client: RpcClient,
    chain_id: int,
    contract: str,
    ranges: list[Interval],
    *,
    counter: list[int] | None = None,
) -> list[Ref]:
    """Refs of the transactions sent straight to ``contract`` in ``ranges``."""
    numbers = [n for lo, hi in ranges for n in range(lo, hi + 1)]
    # A block below the safe head that comes back null is a lagging node behind a
    # load balancer: ask again rather than take it for empty.
    calls = [Call("eth_getBlockByNumber", [hex(n), True], null_retry=True) for n in numbers]
    if counter is not None:
        counter[0] += len(calls)
    out: list[Ref] = []
    for number, block in zip(numbers, await client.call_many(calls), strict=True):
        if isinstance(block, CallError):
            raise block.failed(f"eth_getBlockByNumber failed for block {number}")
        for tx in block.get("transactions") or ():
            if isinstance(tx, dict) and str(tx.get("to") or "").lower() == contract:
                out.append(Ref(chain_id, contract, str(tx["hash"]).lower(), number, METHOD))
    return out
