"""Frozen records shared by every layer.

Conventions (they are the public schema's, see README "Schema"):

* hashes, addresses and byte strings are lowercase ``0x`` hex ``str``;
* integers are Python ``int`` whatever their size (the store writes the ones that
  may pass 64 bits as ``NUMERIC(78,0)`` / decimal text, never as floats);
* JSON columns hold plain Python values (``list`` / ``dict``) that the store
  serialises; decoded arguments are ``dict[str, Any]`` whose integers are decimal
  strings, bytes ``0x`` hex and addresses lowercase.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field, replace
from typing import Any, NamedTuple

from gapfill.records import record

#: The largest value a BIGINT column holds (chain ids, block numbers).
BIGINT_MAX = 2**63 - 1
#: Sort key of a ref whose block number is unknown: after every known block, on
#: both backends (PostgreSQL and SQLite order NULLs differently, so neither is
#: relied upon).
UNKNOWN_BLOCK_KEY = BIGINT_MAX

#: A ref's position in a contract's gap: ``(block_key, tx_hash)``.
RefKey = tuple[int, str]


def block_key(block_number: int | None) -> int:
    """The first half of a :data:`RefKey`."""
    return UNKNOWN_BLOCK_KEY if block_number is None else block_number


@record
class Contract:
    """A tracked ``(chain_id, address)``."""

    chain_id: int
    address: str
    label: str | None = None
    start_block: int | None = None
    abi: list[dict[str, Any]] | None = None


@record
class Ref:
    """A transaction known to belong to a contract."""

    chain_id: int
    contract: str
    tx_hash: str
    block_number: int | None = None
    source: str = "import"

    def __init__(
        self, chain_id: int, contract: str, tx_hash: str, block_number: int | None = None,
        source: str = "import",
    ) -> None:
        # One is read per transaction enriched (`Store.batch_refs`). The frozen dataclass's
        # own __init__ sets each field through object.__setattr__: 1.44 µs a ref against
        # 0.47 through the slots' own setters (as `rpc.config.Call`). Still frozen.
        _set_ref_chain_id(self, chain_id)
        _set_ref_contract(self, contract)
        _set_ref_tx_hash(self, tx_hash)
        _set_ref_block_number(self, block_number)
        _set_ref_source(self, source)

    @property
    def key(self) -> RefKey:
        return (block_key(self.block_number), self.tx_hash)


# The setters of :class:`Ref`'s slots (see its ``__init__``).
_set_ref_chain_id: Any = vars(Ref)["chain_id"].__set__
_set_ref_contract: Any = vars(Ref)["contract"].__set__
_set_ref_tx_hash: Any = vars(Ref)["tx_hash"].__set__
_set_ref_block_number: Any = vars(Ref)["block_number"].__set__
_set_ref_source: Any = vars(Ref)["source"].__set__


class TxRow(NamedTuple):
    """One row of ``transactions``: the transaction, its receipt and its block time.

    A named tuple rather than a frozen dataclass: one is built per transaction, and a
    frozen dataclass's ``__init__`` sets its 32 fields one ``object.__setattr__`` at a
    time (about 3 µs against 0.7).
    """

    chain_id: int
    tx_hash: str
    block_number: int
    block_hash: str
    tx_index: int
    block_timestamp: int | None
    from_address: str
    to_address: str | None
    value: int
    input: str
    nonce: int
    gas: int
    gas_price: int | None
    max_fee_per_gas: int | None
    max_priority_fee_per_gas: int | None
    tx_type: int
    status: int | None
    root: str | None
    gas_used: int
    cumulative_gas_used: int
    effective_gas_price: int | None
    created_contract: str | None
    access_list: list[Any] | None = None
    max_fee_per_blob_gas: int | None = None
    blob_versioned_hashes: list[str] | None = None
    blob_gas_used: int | None = None
    blob_gas_price: int | None = None
    authorization_list: list[Any] | None = None
    method_id: str | None = None
    method_name: str | None = None
    method_args: dict[str, Any] | None = None
    log_count: int = 0


class LogRow(NamedTuple):
    """One row of ``logs`` (a named tuple, like :class:`TxRow`)."""

    chain_id: int
    tx_hash: str
    log_index: int
    block_number: int
    address: str
    topic0: str | None
    topic1: str | None
    topic2: str | None
    topic3: str | None
    data: str
    event_name: str | None = None
    event_args: dict[str, Any] | None = None


#: Failure reasons. ``not_found`` and ``permanent`` take the ref out of the gap
#: until ``enrich --retry-failed``; ``rpc_error`` and ``beyond_head`` (the node answered
#: ``null`` for a block above its head: it has not reached it yet) leave it in the gap;
#: so does ``retrying``, a permanent failure that ``--retry-failed`` put back into the gap
#: (its record, and so its ``attempts``, kept until it is stored or fails again).
PERMANENT_REASONS = frozenset({"not_found", "permanent"})
FAILURE_REASONS = frozenset({"not_found", "permanent", "rpc_error", "beyond_head", "retrying"})

_HEAD_SAID = "the node's head "


def beyond_head_error(block: int, head: int) -> str:
    """A ``beyond_head`` failure's ``last_error``; :func:`head_in_error` reads ``head`` back."""
    return f"block {block} is above {_HEAD_SAID}{head}: not reached yet"


def head_in_error(last_error: str) -> int | None:
    """The node's head a ``beyond_head`` failure's ``last_error`` names, if it names one."""
    _, said, rest = last_error.partition(_HEAD_SAID)
    digits = rest.split(":", 1)[0]
    return int(digits) if said and digits.isdigit() else None


@record
class Failure:
    """A transaction that could not be enriched, and why."""

    chain_id: int
    tx_hash: str
    contract: str
    reason: str
    last_error: str = ""
    attempts: int = 1

    @property
    def permanent(self) -> bool:
        return self.reason in PERMANENT_REASONS


@record
class Enriched:
    """What enriching some refs produced: rows to store and failures to record."""

    txs: list[TxRow] = field(default_factory=list)
    logs: list[LogRow] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    #: The refs whose block number (none, or a wrong one from an import) is not their
    #: row's, each with its row's: the transaction that stores the rows corrects them.
    moved: list[Ref] = field(default_factory=list)
    #: Of ``txs``, the transactions (hashes) made for riders: refs in the gap that are not the
    #: batch's, in the blocks it fetched whole (``Enricher.split``). Stored with the batch's
    #: rows, they are not counted as the batch's: its own refs are :attr:`own`.
    rode: set[str] = field(default_factory=set)

    @property
    def own(self) -> int:
        """The transactions of the batch's own refs: ``txs`` but the riders'."""
        return len(self.txs) - len(self.rode)

    def extend(self, other: Enriched) -> None:
        """Add what ``other`` produced to this."""
        self.txs.extend(other.txs)
        self.logs.extend(other.logs)
        self.failures.extend(other.failures)
        self.moved.extend(other.moved)
        self.rode.update(other.rode)

    def settled(self) -> Enriched:
        """This with only the failures that will not pass: what to store when the refs that
        failed for a passing reason stay in the gap for another attempt."""
        return replace(self, failures=[f for f in self.failures if f.permanent])


@record
class Batch:
    """A keyset slice ``[lo, hi]`` (inclusive) of one contract's gap."""

    id: int
    run_id: int
    chain_id: int
    contract: str
    lo: RefKey
    hi: RefKey
    size: int
    state: str = "pending"
    attempts: int = 0  # its leases so far: with the owner, a lease's identity
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    stops: int = 0  # of its leases, those a stop gave back (Ctrl+C): no failed attempt

    @property
    def tries(self) -> int:
        """The attempts that count toward the last one (``MAX_ATTEMPTS``): the leases but
        those a stop gave back."""
        return self.attempts - self.stops


@record
class CoverageRange:
    """Blocks ``[from_block, to_block]`` that a discovery method has scanned."""

    chain_id: int
    contract: str
    from_block: int
    to_block: int
    method: str


#: An inclusive block range ``(from_block, to_block)``.
Interval = tuple[int, int]


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint, non-touching intervals covering the same blocks (``[1, 5]`` and
    ``[6, 9]`` touch and become ``[1, 9]``); empty ones (``lo > hi``) are dropped."""
    out: list[Interval] = []
    for lo, hi in sorted(i for i in intervals if i[0] <= i[1]):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


@record
class ContractStatus:
    """The counts ``gapfill status`` shows for one contract."""

    chain_id: int
    address: str
    label: str | None
    refs: int
    enriched: int
    missing: int
    failed: int
    min_block: int | None
    max_block: int | None
    unknown_block_refs: int = 0
