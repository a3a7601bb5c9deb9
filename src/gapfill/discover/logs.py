"""Log scan: ``eth_getLogs`` filtered by the contract's address.

Finds the transactions in which the contract emitted at least one event, and
nothing else: a call that emitted nothing (a silent or reverted call) is
invisible to it, so its coverage is *partial* unless ``blocks`` or ``explorer``
scanned the same blocks (see :mod:`gapfill.discover.coverage`). Ranges the node refuses are
split (see :mod:`gapfill.discover.ranges`).
"""

from __future__ import annotations

from typing import Any

from gapfill.discover.ranges import AdaptiveWindow, Interval, OnRefs, block_number, scan_for_refs
from gapfill.model import Ref
from gapfill.rpc import Call, RpcClient

METHOD = "logs"


async def scan_logs(
    client: RpcClient,
    chain_id: int,
    contract: str,
    ranges: list[Interval],
    window: AdaptiveWindow,
    *,
    counter: list[int] | None = None,
    on_refs: OnRefs | None = None,
) -> list[Ref]:
    """Refs of the transactions in ``ranges`` in which ``contract`` emitted a log; with
    ``on_refs``, given to it round by round with the windows they cover (none returned)."""

    def call(lo: int, hi: int) -> Call:
        return Call("eth_getLogs", [{"address": contract, "fromBlock": hex(lo), "toBlock": hex(hi)}])

    def refs(answers: list[tuple[Interval, Any]]) -> list[Ref]:
        found: dict[str, Ref] = {}
        for _, logs in answers:
            for log in logs or ():
                # A provider that ignores the address filter answers every log of the range:
                # its other contracts' transactions are not this one's (trace and block scans
                # check the address the same way).
                if log.get("removed") or str(log.get("address") or "").lower() != contract:
                    continue
                key = str(log["transactionHash"]).lower()
                if key not in found:
                    block = block_number(log.get("blockNumber"), f"a log of {key} (eth_getLogs)")
                    found[key] = Ref(chain_id, contract, key, block, METHOD)
        return list(found.values())

    return await scan_for_refs(client, ranges, call, window, refs, counter=counter, on_refs=on_refs)
