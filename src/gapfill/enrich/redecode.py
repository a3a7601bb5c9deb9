"""Decode stored rows again when a contract's ABI is given or changed.

Enrichment decodes call data and logs with the ABIs tracked at the time. A contract
added (or re-added) with ``--abi`` after some of its transactions were stored, or one
whose ABI is replaced, would otherwise keep rows decoded with no ABI or the old one.
:func:`redecode_contract` decodes, with the new ABI, every stored transaction sent to
the contract and every stored log it emitted, and writes the result in chunks (each
chunk one transaction: an interruption leaves every row decoded either the old way or
the new, and running it again finishes the job).

What is left to do is kept in the database, so that no interruption leaves rows decoded
the old way for good: giving an ABI asks for the contract's rows to be decoded again in
the same transaction, and a run keeps the ABI versions it started with, which are
compared with the current ones once it is over (at its end, or, if it was killed, by the
next run or ``contract add``): each contract whose ABI changed meanwhile is asked too.
:func:`finish_redecodes` settles the runs that are over and does what was asked; each
enrichment run calls it at its start and its end, and ``contract add`` after it writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gapfill.enrich.decode import Decoder
from gapfill.records import record
from gapfill.store import Store

log = logging.getLogger(__name__)


@record
class Redecoded:
    """Rows looked at and rows the new ABI decodes, per table."""

    txs: int = 0
    decoded_txs: int = 0
    logs: int = 0
    decoded_logs: int = 0


def redecode_contract(
    store: Store, chain_id: int, address: str, abi: Sequence[Mapping[str, Any]], asked: int | None = None
) -> Redecoded | None:
    """Decode the stored transactions to ``address`` and its stored logs with ``abi``.
    ``asked``: the contract's ``redecode_asked`` read with ``abi`` (``pending_redecodes``);
    once it changes (a newer ABI given meanwhile, done by another re-decode) this one stops
    before its next chunk and returns None: its rows must not overwrite the newer ones."""
    address = address.lower()
    t0 = time.perf_counter()
    decoder = Decoder({address: abi})
    txs = decoded_txs = logs = decoded_logs = 0
    guard = None if asked is None else (address, asked)
    for chunk in store.stored_calls(chain_id, address):
        calls: list[tuple[str, str | None, dict[str, Any] | None]] = []
        for tx_hash, input_hex in chunk:
            _, name, args = decoder.decode_input(address, input_hex)
            calls.append((tx_hash, name, args))
            decoded_txs += name is not None
        if not store.set_decoded_calls(chain_id, calls, guard):
            return None
        txs += len(calls)
    for log_chunk in store.stored_logs(chain_id, address):
        events: list[tuple[str, int, str | None, dict[str, Any] | None]] = []
        for tx_hash, log_index, topics, data in log_chunk:
            event, args = decoder.decode_log(address, topics, data)
            events.append((tx_hash, log_index, event, args))
            decoded_logs += event is not None
        if not store.set_decoded_logs(chain_id, events, guard):
            return None
        logs += len(events)
    log.info("decoded again the stored rows of %s on chain %d with its new ABI: %d transaction(s) sent to "
             "it (%d decoded), %d log(s) (%d decoded) in %.2f s", address, chain_id, txs, decoded_txs, logs,
             decoded_logs, time.perf_counter() - t0)  # fmt: skip
    return Redecoded(txs, decoded_txs, logs, decoded_logs)


def finish_redecodes(store: Store, run_id: int | None = None) -> list[tuple[int, str, Redecoded]]:
    """Settle run ``run_id`` (this process's, its workers gone) and every run that is over,
    then decode again the stored rows of each contract asked for; returns, per contract
    done, ``(chain_id, address, counts)``. A contract whose ABI changes meanwhile stays
    asked for, to be done with the new one."""
    store.settle_runs(run_id)
    done = []
    for chain_id, address, abi, asked in store.pending_redecodes():
        counts = redecode_contract(store, chain_id, address, abi, asked)
        if counts is None:  # overtaken by a newer ABI: the re-decode doing that settles it
            continue
        done.append((chain_id, address, counts))
        store.redecoded(chain_id, address, asked)
    return done
