"""Decode stored rows again when a contract's ABI is given or changed.

Enrichment decodes call data and logs with the ABIs tracked at the time. A contract
added (or re-added) with ``--abi`` after some of its transactions were stored, or one
whose ABI is replaced, would otherwise keep rows decoded with no ABI or the old one.
:func:`redecode_contract` decodes, with the new ABI, every stored transaction sent to
the contract and every stored log it emitted, and writes the result in chunks (each
chunk one transaction: an interruption leaves every row decoded either the old way or
the new, and running it again finishes the job).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gapfill.enrich.decode import Decoder
from gapfill.store import Store


@dataclass(frozen=True, slots=True)
class Redecoded:
    """Rows looked at and rows the new ABI decodes, per table."""

    txs: int = 0
    decoded_txs: int = 0
    logs: int = 0
    decoded_logs: int = 0


def redecode_contract(
    store: Store, chain_id: int, address: str, abi: Sequence[Mapping[str, Any]]
) -> Redecoded:
    """Decode the stored transactions to ``address`` and its stored logs with ``abi``."""
    address = address.lower()
    decoder = Decoder({address: abi})
    txs = decoded_txs = logs = decoded_logs = 0
    for chunk in store.stored_calls(chain_id, address):
        calls: list[tuple[str, str | None, dict[str, Any] | None]] = []
        for tx_hash, input_hex in chunk:
            _, name, args = decoder.decode_input(address, input_hex)
            calls.append((tx_hash, name, args))
            decoded_txs += name is not None
        store.set_decoded_calls(chain_id, calls)
        txs += len(calls)
    for log_chunk in store.stored_logs(chain_id, address):
        events: list[tuple[str, int, str | None, dict[str, Any] | None]] = []
        for tx_hash, log_index, topics, data in log_chunk:
            event, args = decoder.decode_log(address, topics, data)
            events.append((tx_hash, log_index, event, args))
            decoded_logs += event is not None
        store.set_decoded_logs(chain_id, events)
        logs += len(events)
    return Redecoded(txs, decoded_txs, logs, decoded_logs)
