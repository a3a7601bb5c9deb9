"""Log scan: ``eth_getLogs`` filtered by the contract's address.

Finds the transactions in which the contract emitted at least one event, and
nothing else: a call that emitted nothing (a silent or reverted call) is
invisible to it, so its coverage is *partial*. Ranges the node refuses are
split (see :mod:`gapfill.discover.ranges`).
"""

from __future__ import annotations

from gapfill.discover.ranges import AdaptiveWindow, Interval, block_number, scan_ranges
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
) -> list[Ref]:
    """Refs of the transactions in ``ranges`` in which ``contract`` emitted a log."""

    def call(lo: int, hi: int) -> Call:
        return Call("eth_getLogs", [{"address": contract, "fromBlock": hex(lo), "toBlock": hex(hi)}])

    found: dict[str, Ref] = {}
    for _, logs in await scan_ranges(client, ranges, call, window, counter=counter):
        for log in logs or ():
            if log.get("removed"):
                continue
            tx_hash = str(log["transactionHash"]).lower()
            if tx_hash not in found:
                found[tx_hash] = Ref(chain_id, contract, tx_hash, block_number(log["blockNumber"]), METHOD)
    return list(found.values())
