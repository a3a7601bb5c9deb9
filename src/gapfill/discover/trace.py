"""Trace scan: ``trace_filter`` (Parity/Erigon/Reth/anvil) or Otterscan's
``ots_searchTransactionsAfter`` (Erigon/anvil), whichever the node serves.

Both see every call frame, so they find transactions sent straight to the
contract *and* those that reached it through another contract (internal calls),
reverted ones included, and the transaction that created the contract (a ``create``
frame whose result is the contract, directly or from a factory), as explorers list
it. Their coverage is *complete*.

* ``trace_filter`` takes a block range with ``toAddress``; refused ranges are split
  like ``eth_getLogs`` ranges.
* ``ots_searchTransactionsAfter(address, block, page_size)`` walks forward from a
  block; pages hold whole blocks (the page size is a soft limit), so every block up
  to the last one on a page is done, and the next page starts after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from gapfill.discover.ranges import (
    PROOF_TRIES,
    AdaptiveWindow,
    Interval,
    OnRefs,
    behind,
    block_number,
    call_reaching,
    scan_for_refs,
)
from gapfill.errors import RpcError
from gapfill.model import Ref
from gapfill.rpc import Call, CallError, RpcClient

METHOD = "trace"
TRACE_FILTER = "trace_filter"
OTS_SEARCH = "ots_searchTransactionsAfter"


BACKENDS = (TRACE_FILTER, OTS_SEARCH)


async def trace_backend(
    client: RpcClient, contract: str, backends: tuple[str, ...] = BACKENDS
) -> str | None:
    """The first of ``backends`` the node serves, or None (each probed once per client)."""
    probes: dict[str, list[Any]] = {
        TRACE_FILTER: [{"fromBlock": "0x0", "toBlock": "0x0", "toAddress": [contract]}],
        OTS_SEARCH: [contract, 0, 1],
    }
    for name in backends:
        if await client.supports(name, probes[name]):
            return name
    return None


def _reaches(trace: dict[str, Any], contract: str) -> bool:
    """A call frame into ``contract``, or the frame that created it."""
    kind = trace.get("type")
    if kind == "call":
        action = trace.get("action") or {}
        return str(action.get("to") or "").lower() == contract
    if kind == "create":
        result = trace.get("result") or {}
        return str(result.get("address") or "").lower() == contract
    return False


async def scan_trace_filter(
    client: RpcClient,
    chain_id: int,
    contract: str,
    ranges: list[Interval],
    window: AdaptiveWindow,
    *,
    counter: list[int] | None = None,
    on_refs: OnRefs | None = None,
) -> list[Ref]:
    """Refs of the transactions in ``ranges`` with a call frame into ``contract``; with
    ``on_refs``, given to it round by round with the windows they cover (none returned)."""

    def call(lo: int, hi: int) -> Call:
        return Call(TRACE_FILTER, [{"fromBlock": hex(lo), "toBlock": hex(hi), "toAddress": [contract]}])

    def refs(answers: list[tuple[Interval, Any]]) -> list[Ref]:
        found: dict[str, Ref] = {}
        for _, traces in answers:
            for trace in traces or ():
                if not _reaches(trace, contract):
                    continue
                tx_hash = trace.get("transactionHash")
                if tx_hash is None:  # block rewards and the like
                    continue
                key = str(tx_hash).lower()
                if key not in found:
                    block = block_number(trace.get("blockNumber"), f"a trace of {key} ({TRACE_FILTER})")
                    found[key] = Ref(chain_id, contract, key, block, METHOD)
        return list(found.values())

    return await scan_for_refs(client, ranges, call, window, refs, counter=counter, on_refs=on_refs)


async def walk_ots(
    client: RpcClient,
    chain_id: int,
    contract: str,
    lo: int,
    hi: int,
    *,
    page_size: int = 500,
    counter: list[int] | None = None,
) -> AsyncIterator[tuple[list[Ref], int]]:
    """Pages of ``[lo, hi]`` as ``(refs, done_through_block)``, in block order.

    The last pair has ``done_through_block == hi``.
    """
    after = max(lo - 1, 0)
    doubts = 0  # pages in a row claiming ``hi`` from a node not shown to have it
    while True:
        # A node behind the head says firstPage at its own head: the page claims ``hi`` only
        # from a node that had block ``hi`` (see ranges.call_reaching).
        [(page, reached)] = await call_reaching(client, [Call(OTS_SEARCH, [contract, after, page_size])],
                                                [hi], counter)  # fmt: skip
        if isinstance(page, CallError):
            raise page.to_exception(OTS_SEARCH)
        if not isinstance(page, dict):
            raise RpcError(f"{OTS_SEARCH} answered with {str(page)[:80]!r}, not a page")
        txs = page.get("txs") or []
        refs: list[Ref] = []
        top = after
        for tx in txs:
            block = block_number(tx.get("blockNumber"), f"transaction {str(tx.get('hash'))[:66]} "
                                                        f"({OTS_SEARCH})")  # fmt: skip
            top = max(top, block)
            if lo <= block <= hi:  # without a "to": the transaction that created it
                refs.append(Ref(chain_id, contract, str(tx["hash"]).lower(), block, METHOD))
        # "After" pages come newest-first; the one holding the newest transactions
        # is flagged firstPage.
        if not txs or page.get("firstPage") or top >= hi:
            if not reached:
                doubts += 1
                if reached is None or doubts >= PROOF_TRIES:
                    raise behind(client, OTS_SEARCH, after + 1, hi)
                continue
            yield refs, hi
            return
        if top <= after:
            raise RpcError(f"{OTS_SEARCH} did not move past block {after}; cannot walk it")
        yield refs, top
        after = top
