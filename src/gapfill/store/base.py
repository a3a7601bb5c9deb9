"""The storage seam: one narrow interface, two backends.

Everything above ``store`` talks to :class:`Store`. The SQL that both backends
share lives here with ``?`` placeholders; each backend supplies connection
handling, the bulk upsert and the planning lock. Driver exceptions never leave
this package: they become :class:`gapfill.errors.StoreError`.

Rules this module enforces (see docs/architecture.md):

* a batch's rows and its ``done`` state commit in one transaction, and only
  while the committing worker still holds the lease (owner and attempt);
* every write is an upsert on the primary key, so writing twice changes nothing;
* the gap is computed from data, paged by key ``(block_key, tx_hash)``, never by
  offset.
"""

from __future__ import annotations

import abc
import bisect
import datetime as dt
import functools
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from operator import attrgetter
from typing import Any, NamedTuple

import orjson

from gapfill.errors import GapfillError, UnknownContractError
from gapfill.importing import lazy_pattern
from gapfill.model import (
    PERMANENT_REASONS,
    UNKNOWN_BLOCK_KEY,
    Batch,
    Contract,
    ContractStatus,
    CoverageRange,
    Enriched,
    Failure,
    Interval,
    LogRow,
    Ref,
    RefKey,
    TxRow,
    merge,
)
from gapfill.records import record
from gapfill.store import liveness

TX_COLUMNS: tuple[str, ...] = (
    "chain_id", "tx_hash", "block_number", "block_hash", "tx_index", "block_timestamp",
    "from_address", "to_address", "value", "input", "nonce", "gas", "gas_price",
    "max_fee_per_gas", "max_priority_fee_per_gas", "tx_type", "status", "root", "gas_used",
    "cumulative_gas_used", "effective_gas_price", "created_contract", "access_list",
    "max_fee_per_blob_gas", "blob_versioned_hashes", "blob_gas_used", "blob_gas_price",
    "authorization_list", "method_id", "method_name", "method_args", "log_count",
)  # fmt: skip
LOG_COLUMNS: tuple[str, ...] = (
    "chain_id", "tx_hash", "log_index", "block_number", "address", "topic0", "topic1",
    "topic2", "topic3", "data", "event_name", "event_args",
)  # fmt: skip
#: Integer columns that may pass 64 bits: NUMERIC(78,0) on PostgreSQL, decimal TEXT on SQLite.
log = logging.getLogger(__name__)

BIG_INT_COLUMNS = frozenset({
    "value", "nonce", "gas", "gas_price", "max_fee_per_gas", "max_priority_fee_per_gas",
    "gas_used", "cumulative_gas_used", "effective_gas_price", "max_fee_per_blob_gas",
    "blob_gas_used", "blob_gas_price",
})  # fmt: skip
JSON_COLUMNS = frozenset({
    "access_list", "blob_versioned_hashes", "authorization_list", "method_args", "event_args",
})  # fmt: skip

KEY_SQL = f"COALESCE(r.block_number, {UNKNOWN_BLOCK_KEY})"
_PERMANENT_IN = ", ".join(f"'{r}'" for r in sorted(PERMANENT_REASONS))


def gap_where(probe: str = "") -> str:
    """Refs of one contract that are neither enriched nor permanently failed; ``probe`` ends
    each ``NOT EXISTS`` subquery (a backend's way to keep them per-ref lookups)."""
    return f"""
    r.chain_id = ? AND r.contract = ?
    AND NOT EXISTS (SELECT 1 FROM transactions t
                    WHERE t.chain_id = r.chain_id AND t.tx_hash = r.tx_hash{probe})
    AND NOT EXISTS (SELECT 1 FROM failures f
                    WHERE f.chain_id = r.chain_id AND f.tx_hash = r.tx_hash
                      AND f.reason IN ({_PERMANENT_IN}){probe})
"""


#: Refs of one contract that are neither enriched nor permanently failed (as SQLite runs it;
#: each backend's is ``Store._GAP_WHERE``).
GAP_WHERE = gap_where()

#: A failure concerns a contract that recorded it or tracks its transaction: a failure row
#: is the transaction's (keyed by hash), with the contract of the run that recorded it.
_OF_CONTRACT = (
    "(f.contract = ? OR EXISTS (SELECT 1 FROM refs r WHERE r.chain_id = f.chain_id "
    "AND r.tx_hash = f.tx_hash AND r.contract = ?))"
)

#: A failure record only ``contract`` (the parameter, given thrice) tracks: its transaction's
#: refs are all that contract's, or, with none, the contract recorded it. One scalar subquery
#: per record, so one probe of the refs' (chain_id, tx_hash) index each (``{refs}`` names it
#: where the planner would not): as a NOT EXISTS, PostgreSQL made it an anti-join hashing
#: every other contract's refs, read by a full scan.
_ONLY_OF_CONTRACT = (
    "COALESCE((SELECT min(r.contract) = ? AND max(r.contract) = ? FROM {refs} "
    "WHERE r.chain_id = f.chain_id AND r.tx_hash = f.tx_hash), f.contract = ?)"
)

#: A chain and a contract, either None for all (parameters: chain twice, contract twice).
_OPTIONAL_CHAIN = "(CAST(? AS BIGINT) IS NULL OR {0}.chain_id = ?)"
_OPTIONAL_CONTRACT = "(CAST(? AS TEXT) IS NULL OR {0} = ?)"


def status_sql(failed_counts: str) -> str:
    """Per contract: refs, enriched, permanently failed, lowest and highest block, refs of
    unknown block (parameters: chain twice, contract twice, given thrice); ``failed_counts``
    is the backend's :func:`failed_refs_sql` with ``counts``. One statement, so one snapshot
    on PostgreSQL: the three counts of a run in progress add up.

    Each ref's transaction is found by a join the planner chooses: with statistics, one hash
    of the chain's transactions (PostgreSQL, 1M refs, 780,000 stored: 2.6-3.5 s instead of 7.7,
    where a probe per ref took 4 µs each), without
    them (after an import) or with refs alone analyzed, a probe of its key per ref, as scalar
    subqueries always did. The failure records stay out of that join: as a LEFT JOIN,
    PostgreSQL without statistics checked each ref against every record (200,000 refs, 2,200
    records: 35 s instead of 1), and as a subquery per ref it probed them once per ref (1M
    refs, 3,000 records: 2 s); they are counted from the records' side instead."""
    return f"""
    SELECT c.chain_id, c.address, c.label, COALESCE(a.refs, 0), COALESCE(a.enriched, 0),
           COALESCE(fc.failed, 0), a.lo, a.hi, COALESCE(a.unknown, 0)
    FROM contracts c
    LEFT JOIN (
        SELECT r.chain_id, r.contract, count(*) AS refs, count(t.tx_hash) AS enriched,
               min(r.block_number) AS lo, max(r.block_number) AS hi,
               count(CASE WHEN r.block_number IS NULL THEN 1 END) AS unknown
        FROM refs r
        LEFT JOIN transactions t ON t.chain_id = r.chain_id AND t.tx_hash = r.tx_hash
        WHERE {_OPTIONAL_CHAIN.format("r")} AND {_OPTIONAL_CONTRACT.format("r.contract")}
        GROUP BY r.chain_id, r.contract
    ) a ON a.chain_id = c.chain_id AND a.contract = c.address
    LEFT JOIN ({failed_counts}) fc ON fc.chain_id = c.chain_id AND fc.contract = c.address
    WHERE {_OPTIONAL_CHAIN.format("c")} AND {_OPTIONAL_CONTRACT.format("c.address")}
    ORDER BY c.chain_id, c.address
"""

#: Of an import's staged rows of one ref (``stage_refs s``, each with its place ``seq``), the
#: one that writes it comes first in this order: its first that gives a block number, else
#: its first. So a ref keeps the first block number given, wherever its rows are in the file.
FIRST_GIVEN = "s.block_number IS NULL, s.seq"
#: A staged ref's block number: that of its transaction if it is stored (the node's word,
#: which a row of a file may get wrong: the ref of a stored transaction is never enriched
#: again to correct it), else the one given (a scalar subquery: one lookup by key, whatever
#: a planner thinks of the staged rows).
STAGED_BLOCK = "s.block_number"
STAGED_OR_STORED_BLOCK = (
    "COALESCE((SELECT t.block_number FROM transactions t "
    "WHERE t.chain_id = s.chain_id AND t.tx_hash = s.tx_hash), s.block_number)"
)
#: The refs of an import that one of its rows gave another block number than the one kept
#: (that of the ref stored before, else of its stored transaction, else its first row's
#: that gives one): each counted once.
#: Per contract, named as constants: joined on all three columns, PostgreSQL read every
#: contract's refs to hash them (or probed each staged ref's).
_CONFLICTS = (
    "SELECT count(*) FROM (SELECT DISTINCT s.tx_hash FROM stage_refs s JOIN refs r ON r.tx_hash = s.tx_hash "
    "WHERE r.chain_id = ? AND r.contract = ? AND s.chain_id = ? AND s.contract = ? "
    "AND s.block_number <> r.block_number) x"
)

#: How many refs an import's staged rows give, each counted once (a hash on two lines, once).
_STAGED_REFS = "SELECT count(*) FROM (SELECT DISTINCT chain_id, contract, tx_hash FROM stage_refs) x"

#: A ref's stored transaction's block number, looked up by key.
_STORED_BLOCK = ("(SELECT t.block_number FROM transactions t "
                 "WHERE t.chain_id = r.chain_id AND t.tx_hash = r.tx_hash)")

#: Whether a contract has a ref in the gap (``{gap}``: the backend's test), walking its refs
#: in hash order (the primary key's). Batches commit in key order, so a walk in key order (the
#: gap's index, which SQLite always took, and PostgreSQL without statistics) looked up every
#: enriched ref before the first missing one (99,000 of 200,000: 300 ms instead of 0.1); hashes
#: are random, so the first refs by hash are a sample of the contract's.
_ANY_GAP = "SELECT 1 FROM refs r WHERE {gap} ORDER BY r.tx_hash LIMIT 1"


#: A failure record (``f``) whose transaction is not stored: one probe of the transactions'
#: primary key per record (``{probe}`` as in :func:`gap_where`). A stored transaction is not a
#: failure, whatever record its hash has: one contract's batch can record a null for a
#: transaction another contract's batch stored (a lagging backend answered the first), and
#: on PostgreSQL both commits may run at once, neither seeing the other's row, so a record
#: can be left beside the stored transaction. Every reader of failure records tests this, as
#: the gap and ``status`` do.
NOT_STORED = ("NOT EXISTS (SELECT 1 FROM transactions t "
              "WHERE t.chain_id = f.chain_id AND t.tx_hash = f.tx_hash{probe})")


def failed_refs_sql(refs: str = "refs r", probe: str = "", *, counts: bool = False) -> str:
    """The refs of one contract (parameters: chain, contract) that are not stored and whose
    transaction permanently failed, in hash order: found from the chain's permanent failure
    records, which are few where refs are many, each looked up by key in ``refs`` and in
    ``transactions``. Walking the contract's refs instead, to look up both for each, took
    500 ms for 200,000 refs and 50 records. ``refs`` is how a backend looks a record's refs
    up (``r``), ``probe`` ends the ``NOT EXISTS`` subquery (as in :func:`gap_where`).
    ``CROSS JOIN`` keeps SQLite from walking the refs first: it takes the refs' two-column
    key for the more selective one.

    With ``counts``, how many there are per contract instead (:func:`status_sql`), of every
    chain and contract or of those given (parameters: chain twice, contract twice, either
    None)."""
    if counts:
        select = "r.chain_id, r.contract, count(*) AS failed"
        chain, contract = _OPTIONAL_CHAIN.format("f"), _OPTIONAL_CONTRACT.format("r.contract")
        order = "GROUP BY r.chain_id, r.contract"
    else:
        select, chain, contract = "r.tx_hash, r.block_number, r.source", "f.chain_id = ?", "r.contract = ?"
        order = "ORDER BY r.tx_hash"
    return f"""
    SELECT {select} FROM failures f CROSS JOIN {refs}
    WHERE {chain} AND f.reason IN ({_PERMANENT_IN})
      AND r.chain_id = f.chain_id AND r.tx_hash = f.tx_hash AND {contract}
      AND {NOT_STORED.format(probe=probe)}
    {order}
"""


MAX_ATTEMPTS = 3
#: A batch's lease is still this owner's at this attempt, and unexpired: the condition of
#: every write that needs the lease (renew, commit, give back with rows). Parameters:
#: batch id, owner, attempt, now.


def _key_bound(op: str) -> str:
    """`` AND`` a ref's key ``op`` (``>``, ``>=``, ``<``, ``<=``) a key given as three parameters
    (block, hash, block). Row-value comparisons, with a plain bound on the key's first half
    that lets SQLite seek (see :meth:`Store.iter_gap`)."""
    return f" AND ({KEY_SQL}, r.tx_hash) {op} (?, ?) AND {KEY_SQL} {op[0]}= ?"


def _key_bounds(bounds: Iterable[tuple[str, RefKey | None]], params: list[Any]) -> str:
    """:func:`_key_bound` for each ``(op, key)`` whose key is not None, adding its parameters
    to ``params``."""
    sql = ""
    for op, key in bounds:
        if key is not None:
            sql += _key_bound(op)
            params += [key[0], key[1], key[0]]
    return sql


_LEASE_HELD = (
    "batch_id = ? AND state = 'leased' AND lease_owner = ? AND attempts = ? AND lease_expires_at >= ?"
)

#: The open batches (pending or leased), as the partial indexes ``batches_open`` and
#: ``batches_open_contract`` name them, word for word: every query over batches that runs
#: per lease or per second says it (a leased-only one as well as its ``state = 'leased'``),
#: so that it reads the open plan and never the done batches, which every run adds (2,000
#: per million refs) and only ``gapfill prune`` deletes, if anyone runs it. SQLite uses a
#: partial index only for a query whose WHERE has the index's term itself (``state =
#: 'leased'`` alone did not count), and PostgreSQL without statistics took the contracts'
#: index for a lease of two contracts and filtered the state. With 200,000 done batches and
#: 2,000 open: a lease 15 ms on SQLite (0.4 now), 62 ms on PostgreSQL (1.2), the expiry
#: check each second 13 ms on SQLite (0.01).
_OPEN = "state IN ('pending', 'leased')"


def _cut(spans: Iterable[Iterable[RefKey]], size: int) -> Iterator[tuple[RefKey, RefKey, int]]:
    """Cut streams of keys, each in key order, into batches ``(lo, hi, refs)`` of up to
    ``size`` refs; no batch takes keys of two streams."""
    for keys in spans:
        lo: RefKey | None = None
        last: RefKey | None = None
        n = 0
        for key in keys:
            if lo is None:
                lo = key
            last = key
            n += 1
            if n == size:
                yield lo, key, n
                lo, n = None, 0
        if lo is not None and last is not None:
            yield lo, last, n


def _of_targets(targets: Sequence[tuple[int, str]] | None, params: list[Any]) -> str:
    """`` AND`` the row is of one of ``targets`` (none: of any contract), adding their
    parameters to ``params``."""
    if not targets:
        return ""
    for c, a in targets:
        params += [c, a]
    return " AND (" + " OR ".join("(chain_id = ? AND contract = ?)" for _ in targets) + ")"


def _fill_order(fill: tuple[Any, ...]) -> tuple[int, str, str]:
    """(block, chain, contract, hash, ...) fills, ordered by the refs' primary key."""
    return fill[1], fill[2], fill[3]


def _own_moves(batch: Batch, enriched: Enriched) -> Enriched:
    """``enriched`` with only the moved refs of ``batch``'s contract: its plan is open, so no
    import or discovery fills them meanwhile. Another contract may have no open plan, and an
    import filling its refs in another order would deadlock with this commit."""
    own = [r for r in enriched.moved if (r.chain_id, r.contract) == (batch.chain_id, batch.contract)]
    return enriched if len(own) == len(enriched.moved) else replace(enriched, moved=own)


_TX_HASH = attrgetter("tx_hash")


def _merged(written: Sequence[Enriched]) -> tuple[Enriched, bool]:
    """``written`` as one write, and whether some rows were left out: a transaction two
    batches hold (two contracts', or a rider and its own batch) has its row and its logs
    from the last of them, as one fetch made them. Fetched on either side of a reorg, the
    two are of two blocks: the row was one and the logs both's."""
    merged = Enriched()
    for enriched in written:
        merged.extend(enriched)
    # Each hash once (the common case) costs ~0.1 us a row; by (chain, hash) only then.
    if len(written) < 2 or len(set(map(_TX_HASH, merged.txs))) == len(merged.txs):
        return merged, False
    last = {(t.chain_id, t.tx_hash): i for i, e in enumerate(written) for t in e.txs}
    if len(last) == len(merged.txs):
        return merged, False
    txs = [t for i, e in enumerate(written) for t in e.txs if last[t.chain_id, t.tx_hash] == i]
    logs = [g for i, e in enumerate(written) for g in e.logs if last.get((g.chain_id, g.tx_hash), i) == i]
    return replace(merged, txs=txs, logs=logs), True


def _newly_stored(written: Sequence[Enriched], inserted: set[tuple[int, str]] | None) -> list[int]:
    """Per batch of ``written``, its transactions among the rows ``inserted`` (None: all
    were), each counted for the first batch that holds it."""
    if inserted is None:
        return [len(e.txs) for e in written]
    out = []
    for e in written:
        n = 0
        for t in e.txs:
            key = (t.chain_id, t.tx_hash)
            if key in inserted:
                inserted.discard(key)
                n += 1
        out.append(n)
    return out


@functools.cache
def migrations(backend: str) -> tuple[tuple[int, str], ...]:
    """The schema migrations of ``backend``: (version, SQL), in order. Read once per process;
    importlib.resources is imported here, not with the module: it pulls in tempfile and
    shutil (~9 ms of every start-up)."""
    from importlib import resources

    folder = resources.files("gapfill.store") / "sql" / backend
    out = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql"):
            out.append((int(name.split("_", 1)[0]), entry.read_text()))
    return tuple(sorted(out))


@functools.cache
def latest_migration(backend: str) -> int:
    """The version of ``backend``'s last migration, read from the files' names: a command
    that opens a database already at it (nearly every one) reads no SQL and imports no
    importlib.resources, which :func:`migrations` needs (it, zipfile and the readers were
    ~4% of the instructions before `enrich`'s first RPC call)."""
    try:
        names = os.listdir(os.path.join(os.path.dirname(__file__), "sql", backend))
    except OSError:  # not a folder on disk (a zipped package): as migrate reads them
        return migrations(backend)[-1][0]
    return max(int(name.split("_", 1)[0]) for name in names if name.endswith(".sql"))


def migrated(where: str, version: int, started: float) -> None:
    """Log that migration ``version`` was applied to the database ``where`` (redacted)."""
    log.info("database %s: schema migration %d applied (%.2f s)", where, version,
             time.perf_counter() - started)  # fmt: skip


def json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def check_row_tuples(
    tx_tuple: Callable[[TxRow], tuple[Any, ...]],
    log_tuple: Callable[[LogRow], tuple[Any, ...]],
    *,
    big: Collection[str],
    json: Collection[str],
) -> None:
    """Fail at import if a backend's hand-written row tuple drifts from the column lists.

    The tuples are written out field by field (the fastest way to build them); this
    compares them once with the obvious column-by-column construction on a row whose
    every field holds a distinct value.
    """
    for cls, columns, build in ((TxRow, TX_COLUMNS, tx_tuple), (LogRow, LOG_COLUMNS, log_tuple)):
        values: dict[str, Any] = {c: ({"k": i} if c in json else i) for i, c in enumerate(columns)}
        row = cls(**values)
        expected = tuple(
            orjson.dumps(values[c]).decode() if c in json else str(values[c]) if c in big else values[c]
            for c in columns
        )
        if build(row) != expected:  # type: ignore[arg-type]
            raise AssertionError(f"{build.__module__}.{build.__name__} does not follow the column list")


def json_value(value: Any) -> Any:
    """A JSON column as read back: text on SQLite, already parsed on PostgreSQL."""
    if value is None or not isinstance(value, str | bytes):
        return value
    return orjson.loads(value)


def owner_name(worker: str = "", run_id: int | None = None) -> str:
    """A lease owner id unique across hosts and processes: ``host@space:pid[/runN][/worker]``
    (``host:pid...`` where no space is known, as older versions wrote): the space says
    which processes may judge the pid (:mod:`gapfill.store.liveness`).

    ``run_id`` names the run the owner works for: the lease events it writes are then the
    run's evidence of being alive, which dates the end of a run killed outright
    (:meth:`Store._mark_dead_runs`)."""
    return run_owner(liveness.owner_host(), os.getpid(), worker, run_id)


#: The run a lease owner (:func:`owner_name`) works for, if it names one.
_OWNER_RUN = lazy_pattern(r"/run(\d+)(?:/|$)")

#: The note of a run whose process was found gone (:meth:`Store._mark_dead_runs`): killed
#: or crashed, not stopped.
DEAD_RUN_NOTE = "its process ended without finishing the run"


def run_owner(host: str, pid: int | None, worker: str = "", run_id: int | None = None) -> str:
    """:func:`owner_name` of process ``pid`` of ``host`` (an :func:`liveness.owner_host`)."""
    run = "" if run_id is None else f"/run{run_id}"
    return f"{host}:{pid}{run}" + (f"/{worker}" if worker else "")


@record
class RunInfo:
    run_id: int
    started_at: float
    finished_at: float | None
    host: str
    mode: str
    workers: int
    state: str
    processed: int
    failed: int
    rpc_calls: int
    note: str
    #: Whether this process can tell if the run's process still runs (its host and PID
    #: namespace, :mod:`gapfill.store.liveness`): a ``running`` row it cannot judge may
    #: be stale, left by a process killed where no later run has looked.
    judged_here: bool = True
    #: False where the row still says ``running`` but its process is known to be gone (this
    #: host could tell): ``state``, ``finished_at`` and ``note`` are then what the next run
    #: on its host records when it marks it (:meth:`Store.list_runs`).
    recorded: bool = True

    @property
    def rate(self) -> float | None:
        """Transactions processed per second from its start to its end, None where that is
        not known: the run is not over, or was killed leaving nothing that dates its end
        (a killed run ends when it was last seen working, :meth:`Store._mark_dead_runs`)."""
        if self.finished_at is None or self.finished_at <= self.started_at:
            return None
        return self.processed / (self.finished_at - self.started_at)


class RunTotals(NamedTuple):
    """What :meth:`Store.finish_run` recorded of a run: its counts, and its duration from
    its row's start to the end just written, the one ``gapfill runs`` divides by
    (:attr:`RunInfo.rate`), so that the run's summary says the same rate."""

    processed: int
    failed: int
    calls: int
    seconds: float


@record
class RefsAdded:
    """What writing refs did: refs new to the database, refs already there that got the
    block number they lacked, and refs given a block number other than the one they kept
    (``conflicts``: each counted once, however many lines disagreed).

    A ref keeps the first block number it was given: the one stored before (by an import,
    discovery or enrichment), else that of its transaction if that is stored, else the
    first an import's lines give it (a line without one gives none). A wrong one only
    orders the work: enrichment fetches by hash, and stores the transaction's own block
    number on the ref (``Enriched.moved``).

    ``repeated``: the rows that gave a ref an earlier row of the same import gave (a hash on
    two lines of a file), which are not refs known already."""

    new: int
    filled: int
    conflicts: int = 0
    repeated: int = 0

    def __add__(self, other: RefsAdded) -> RefsAdded:
        return RefsAdded(self.new + other.new, self.filled + other.filled,
                         self.conflicts + other.conflicts, self.repeated + other.repeated)  # fmt: skip


@record
class PlanInfo:
    """What planning found: per contract, whether it joined an open plan."""

    batches: int
    refs: int
    joined: int  # contracts whose open plan was joined instead of planning again


@record
class GivenBack:
    """What giving a batch back with rows stored (:meth:`Store.abandon_keeping`)."""

    stored: int  # the transactions of the rows that no other batch had stored
    #: Nothing the batch was planned for is left in the gap: it is done, not pending.
    closed: bool = False


@record
class Leased:
    """What a lease call found (:meth:`Store.lease_next`)."""

    batch: Batch | None  # the batch claimed; None: none is left
    #: The batches it closed instead (``done``, an ``emptied`` event): nothing of their key
    #: range was left in the gap, so a lease would have fetched nothing.
    emptied: int = 0


@record
class BatchCounts:
    pending: int
    leased: int
    done: int
    total: int
    succeeded: int
    failed: int


@record
class LeaseEvent:
    batch_id: int
    owner: str
    attempt: int
    event: str
    at: float


@record
class FinishedPlan:
    """A plan that is over: the batches one run planned for one contract, none of them open,
    with the lease events written for them (:meth:`Store.finished_plans`). Its batch ids lie
    between ``lo`` and ``hi`` (a plan is written in one statement, so they are close)."""

    run_id: int
    chain_id: int
    contract: str
    batches: int
    events: int
    lo: int
    hi: int


@record
class Pruned:
    """What a prune deleted (or, in a dry run, would delete)."""

    plans: int = 0
    batches: int = 0
    events: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(self.plans + other.plans, self.batches + other.batches, self.events + other.events)


#: Of a plan's events (``e``), one written by run ``{run}``'s processes (their lease owners
#: name it, :func:`owner_name`) or by its planning (``run N`` closed a batch, ``emptied``).
_BY_RUN = "(e.owner LIKE '%/run{run}/%' OR e.owner LIKE '%/run{run}' OR e.owner = 'run {run}')"


def _utc_text(at: Any) -> str:
    """A stored time as SQLite keeps it (``2026-11-29T06:00:00.123Z``): PostgreSQL's
    ``timestamptz`` comes back as a datetime."""
    if isinstance(at, dt.datetime):
        utc = at.astimezone(dt.UTC)
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return str(at)


#: Where the database URL came from, as a message's "fix ..." names it when its caller
#: does not say (the CLI passes ``--db``, ``GAPFILL_DB`` or the config file's ``db``).
DB_CHECK = "--db / GAPFILL_DB"


class Store(abc.ABC):
    """The narrow storage interface shared by both backends."""

    backend: str = ""
    #: The database URL with its password masked, for messages.
    display_url: str = ""
    #: Where the URL came from, as the store's messages name it (see :data:`DB_CHECK`).
    check: str = DB_CHECK
    #: The run whose ``processed``, ``failed`` and ``rpc_calls`` this connection's writes of
    #: enrichment results (and the calls they are given) add to, in the transaction that
    #: writes them (None: no run's).
    counts_for_run: int | None = None
    #: Where a store says what it is waiting for (another process's lock), as it waits.
    notice: Callable[[str], None] | None = None
    #: The schema version :func:`gapfill.store.open_store` found as it opened the database,
    #: before bringing it up to date (None: no gapfill schema, so it created one; -1: not
    #: read, opened with ``migrate=False``), for `gapfill init` to say what it did.
    schema_found: int | None = -1
    #: The gap's test, as this backend runs it (see :func:`gap_where`).
    _GAP_WHERE: str = GAP_WHERE
    #: What ends a subquery this backend must keep a lookup by its own keys (PostgreSQL's
    #: ``OFFSET 0``: see :data:`gap_where`); SQLite takes none.
    _FENCE: str = ""
    #: A failure record's transaction is not stored, as this backend tests it (see
    #: :data:`NOT_STORED`).
    _NOT_STORED: str = NOT_STORED.format(probe="")
    #: The refs :meth:`iter_failed_refs` gives, as this backend finds them (see
    #: :func:`failed_refs_sql`).
    _FAILED_REFS: str = failed_refs_sql()
    #: What :meth:`status` asks, as this backend asks it (see :func:`status_sql`).
    _STATUS: str = status_sql(failed_refs_sql(counts=True))
    #: A query counting the tables named ``schema_migrations`` this connection sees.
    _HAS_SCHEMA_TABLE: str = ""

    # -- lifecycle ---------------------------------------------------------------

    def schema_version(self) -> int | None:
        """The schema version of the database, read without writing; None: no gapfill schema."""
        with self._read() as cur:
            cur.execute(self._HAS_SCHEMA_TABLE)
            if not int(cur.fetchone()[0]):
                return None
            cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            return int(cur.fetchone()[0])

    def latest_version(self) -> int:
        """The schema version this gapfill writes."""
        return latest_migration(self.backend)

    @abc.abstractmethod
    def migrate(self) -> int:
        """Apply pending migrations idempotently; return the schema version."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def _tx(self) -> AbstractContextManager[Any]:
        """A context manager: one database transaction, yielding a cursor."""

    def _read(self) -> AbstractContextManager[Any]:
        """A read-only transaction (SQLite: deferred, so readers never queue behind writers)."""
        return self._tx()

    @abc.abstractmethod
    def _sql(self, sql: str) -> str:
        """Translate ``?`` placeholders for the driver."""

    @abc.abstractmethod
    def _now(self, cur: Any) -> float:
        """The clock leases are measured against (the database's, where it has one)."""

    # -- contracts ---------------------------------------------------------------

    def add_contract(self, contract: Contract) -> None:
        """Track ``contract`` (or update a tracked one's label, start block and ABI). An ABI
        given asks, in the same transaction, for its stored rows to be decoded again with it
        (:meth:`pending_redecodes`): a process killed before it did so leaves that asked.
        The ABI the contract has already asks nothing (every row was decoded again for
        nothing), unless a run not settled yet began with another version of it (see
        :meth:`settle_runs`): its rows may be decoded the old way, and giving the ABI again
        is how one that is never settled (another host's, a container gone) has them redone.
        That asks once per such run (``abi_redone_through``), and bumps no version: bumped,
        the run's version never matched again, and every later identical add asked again."""
        with self._tx() as cur:
            changed = asked = 0
            redone: int | None = None
            if contract.abi is not None:
                # Locked (PostgreSQL) until the upsert: a `contract add --abi Y` committing between
                # this read and the upsert of the same ABI X left X at Y's version, and a run that
                # began with Y was never asked to decode its rows again.
                cur.execute(self._sql("SELECT abi, abi_version, abi_redone_through FROM contracts "
                                      f"WHERE chain_id = ? AND address = ?{self._ROW_LOCK}"),
                            (contract.chain_id, contract.address))  # fmt: skip
                row = cur.fetchone()
                if row is None or json_value(row[0]) != contract.abi:
                    changed = asked = 1  # a new ABI: no run has been asked for with it yet
                else:
                    redone = None if row[2] is None else int(row[2])
                    runs = self._older_in_unsettled_runs(cur, contract, int(row[1]), redone)
                    if runs:
                        asked, redone = 1, max(runs)
            cur.execute(
                self._sql(
                    "INSERT INTO contracts (chain_id, address, label, start_block, abi, abi_version, "
                    "redecode_asked, abi_redone_through) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (chain_id, address) "
                    "DO UPDATE SET label = COALESCE(EXCLUDED.label, contracts.label), "
                    "start_block = COALESCE(EXCLUDED.start_block, contracts.start_block), "
                    "abi = COALESCE(EXCLUDED.abi, contracts.abi), "
                    "abi_version = contracts.abi_version + EXCLUDED.abi_version, "
                    "redecode_asked = contracts.redecode_asked + EXCLUDED.redecode_asked, "
                    "abi_redone_through = CASE WHEN EXCLUDED.abi IS NULL "
                    "THEN contracts.abi_redone_through ELSE EXCLUDED.abi_redone_through END"
                ),
                (contract.chain_id, contract.address, contract.label, contract.start_block,
                 json_text(contract.abi), changed, asked, redone),
            )  # fmt: skip

    def _older_in_unsettled_runs(
        self, cur: Any, contract: Contract, version: int, redone: int | None
    ) -> list[int]:
        """The runs not settled yet that began with another ABI ``version`` of ``contract``
        (or before it was tracked), after run ``redone`` (the last one the same ABI given
        again asked for)."""
        cur.execute(self._sql("SELECT run_id, abi_versions FROM runs WHERE abi_versions IS NOT NULL "
                              "AND run_id > ?"), (-1 if redone is None else redone,))  # fmt: skip
        older = []
        for run_id, text in cur.fetchall():
            started = json_value(text)
            if int(started["chain_id"]) == contract.chain_id and \
                    int(started["versions"].get(contract.address, 0)) != version:
                older.append(int(run_id))
        return older

    def list_contracts(self) -> list[Contract]:
        with self._read() as cur:
            cur.execute(
                "SELECT chain_id, address, label, start_block, abi FROM contracts "
                "ORDER BY chain_id, address"
            )
            return [
                Contract(int(c), a, label, None if s is None else int(s), json_value(abi))
                for c, a, label, s, abi in cur.fetchall()
            ]

    def get_contract(self, address: str, chain_id: int | None = None) -> Contract:
        """The tracked contract at ``address``; ``chain_id`` is needed only if it is ambiguous."""
        found = [
            c for c in self.list_contracts()
            if c.address == address and (chain_id is None or c.chain_id == chain_id)
        ]  # fmt: skip
        if not found:
            where = f" on chain {chain_id}" if chain_id is not None else ""
            raise UnknownContractError(
                f"contract {address} is not tracked{where}: "
                f"add it first with `gapfill contract add {address}"
                + (f" --chain-id {chain_id}`" if chain_id is not None else "`")
            )
        if len(found) > 1:
            chains = ", ".join(str(c.chain_id) for c in found)
            raise UnknownContractError(
                f"contract {address} is tracked on chains {chains}: pass --chain-id to pick one"
            )
        return found[0]

    def remove_contract(self, chain_id: int, address: str) -> dict[str, int]:
        """Stop tracking a contract: its refs, plan, lease history, coverage and failure
        records go, in one transaction; the transactions and logs stay (they are the
        chain's, and other contracts may share them). Refused while a batch of it is
        leased. Returns the rows deleted per table."""
        with self._tx() as cur:
            # One removal at a time: whether another contract still tracks a failed
            # transaction is read from refs, and two removals at once each saw the other's
            # refs (not yet deleted) and kept a failure record neither contract tracks.
            self._removal_lock(cur)
            # The contract's row next: a discovery, an import or a plan of it holds it
            # shared, so this waits for them to commit, and then deletes what they wrote;
            # one starting after this waits, then finds the contract gone and writes nothing.
            cur.execute(
                self._sql(f"SELECT 1 FROM contracts WHERE chain_id = ? AND address = ?{self._ROW_LOCK}"),
                (chain_id, address),
            )
            # Then its batches, in batch order, before any other row: a worker's commit or
            # give-back locks its batches (in that order) before the refs and failures it
            # writes, and an expiry locks only batches, so none can hold a row this removal
            # still needs while waiting for one it holds. Read once locked, they are as
            # the last of those left them.
            cur.execute(
                self._sql("SELECT state, lease_expires_at FROM batches WHERE chain_id = ? "
                          f"AND contract = ? ORDER BY batch_id{self._ROW_LOCK}"),
                (chain_id, address),
            )  # fmt: skip
            plan = cur.fetchall()
            now = self._now(cur)
            # A lease past its expiry belongs to nobody (a killed run's): it does not block.
            if any(state == "leased" and float(expires) >= now for state, expires in plan):
                raise GapfillError(
                    f"a run is enriching {address} right now (a batch of it is leased): stop it, "
                    "or wait for it to end, then remove the contract"
                )
            deleted: dict[str, int] = {}
            cur.execute(
                self._sql("DELETE FROM lease_events WHERE batch_id IN (SELECT batch_id FROM batches "
                          "WHERE chain_id = ? AND contract = ?)"),
                (chain_id, address),
            )  # fmt: skip
            deleted["lease_events"] = int(cur.rowcount)
            # A failure record is the transaction's: it stays while another contract tracks it.
            only_of = _ONLY_OF_CONTRACT.format(refs=self._REFS_BY_TX)
            cur.execute(self._sql(f"DELETE FROM failures AS f WHERE chain_id = ? AND {only_of}"),
                        (chain_id, address, address, address))  # fmt: skip
            deleted["failures"] = int(cur.rowcount)
            for table, source, column in (
                ("batches", "batches", "contract"), ("refs", self._REMOVE_REFS_FROM, "contract"),
                ("coverage", "coverage", "contract"), ("contracts", "contracts", "address"),
            ):  # fmt: skip
                cur.execute(
                    self._sql(f"DELETE FROM {source} WHERE chain_id = ? AND {column} = ?"),
                    (chain_id, address),
                )
                deleted[table] = int(cur.rowcount)
            return deleted

    #: The table a removal deletes a contract's refs from (SQLite names the index to walk).
    _REMOVE_REFS_FROM = "refs"
    #: Refs, as ``r``, looked up by transaction (SQLite names the index: see its backend).
    _REFS_BY_TX = "refs r"

    def _removal_lock(self, cur: Any) -> None:
        """Serialise removals across processes and hosts (inside the transaction); SQLite's
        ``BEGIN IMMEDIATE`` already serialises every writer."""
        return None

    # -- refs and the gap ----------------------------------------------------------

    def add_refs(self, refs: Iterable[Ref]) -> RefsAdded:
        """Insert refs idempotently in one transaction; return how many were new, how many
        refs already there got a block number, and how many were given one other than the
        block number they kept (see :class:`RefsAdded`: the first given wins).

        ``refs`` is consumed as a stream, so a million hashes never sit in memory: its rows
        are staged (``stage_refs``, a temporary table) with their place in it, ``seq``. Then
        one statement inserts each new ref from its first row that gives a block number,
        else its first (:data:`FIRST_GIVEN`); refs already there without one get it, as any
        fill does; and one query per contract counts the conflicts. If iterating raises,
        nothing is imported.
        """
        with self._import_tx() as cur:
            staged, contracts = self._stage_refs(cur, refs)
            for chain_id, contract in sorted(contracts):  # locked in key order, as discovery does
                self._require_tracked(cur, chain_id, contract)
            # Refs without a block number take their transaction's if it is stored (as in
            # _with_stored_blocks); a new database has none to look up.
            stored = any(self._has_transactions(cur, c) for c in {c for c, _ in contracts})
            block = STAGED_OR_STORED_BLOCK if stored else STAGED_BLOCK
            cur.execute(self._sql(self._INSERT_STAGED.format(block=block)))
            n = int(cur.rowcount)
            # Refs already there without a block number get the one this import knows. Last,
            # as in discovery (contract row, refs, then the planning lock): the same order
            # everywhere, and the planning lock held only briefly. None is there if every
            # staged row inserted a ref.
            analyzed = False
            filled = 0
            for chain_id, contract in sorted(contracts) if n < staged else ():
                if self._has_unknown_blocks(cur, chain_id, contract):
                    if not analyzed:
                        self._analyze_stage(cur)
                        analyzed = True
                    cur.execute(self._sql(self._FILL_FROM_STAGE.format(block=block)), (chain_id, contract))
                    filled += int(cur.rowcount)
            conflicts = 0
            # Only a hash given twice, a ref already there, or a new ref of a stored
            # transaction (which takes its block) may disagree, and only if a row gives a
            # block number (a list of hashes gives none): an import of new hashes into a
            # new database pays nothing.
            if (n < staged or stored) and self._gives_blocks(cur):
                if not analyzed:
                    self._analyze_stage(cur)
                for chain_id, contract in sorted(contracts):
                    cur.execute(self._sql(_CONFLICTS), (chain_id, contract, chain_id, contract))
                    (count,) = cur.fetchone() or (0,)
                    conflicts += int(count)
            # Rows that repeat a ref of an earlier row: only when some row inserted nothing.
            repeated = 0
            if n < staged:
                cur.execute(_STAGED_REFS)
                (distinct,) = cur.fetchone() or (staged,)
                repeated = staged - int(distinct)
            self._unstage(cur)
            return RefsAdded(n, filled, conflicts, repeated)

    def _import_tx(self) -> AbstractContextManager[Any]:
        """The transaction of an import (SQLite's takes a bigger page cache)."""
        return self._tx()

    @abc.abstractmethod
    def _stage_refs(self, cur: Any, refs: Iterable[Ref]) -> tuple[int, set[tuple[int, str]]]:
        """Write ``refs`` to ``stage_refs``, empty before, each row with its place (``seq``,
        from 0); return how many were staged, and their contracts."""

    #: The staged refs' rows that write them (:data:`FIRST_GIVEN`), inserted (``{block}``:
    #: :data:`STAGED_BLOCK` or :data:`STAGED_OR_STORED_BLOCK`), refs already there left as
    #: they are; and, for one contract's refs already there without a block number, the
    #: block they get (parameters: chain, contract). Each backend's.
    _INSERT_STAGED: str
    _FILL_FROM_STAGE: str

    def _analyze_stage(self, cur: Any) -> None:
        """Give the planner the staged refs' statistics before a join with refs (PostgreSQL)."""
        return None

    @abc.abstractmethod
    def _unstage(self, cur: Any) -> None:
        """Empty ``stage_refs`` (in the transaction), or leave it to the next import's
        ``_stage_refs``."""

    def _gives_blocks(self, cur: Any) -> bool:
        """Whether a staged row gives a block number (the first does, in a CSV that has them)."""
        cur.execute("SELECT 1 FROM stage_refs WHERE block_number IS NOT NULL LIMIT 1")
        return cur.fetchone() is not None

    def iter_gap(
        self,
        chain_id: int,
        contract: str,
        *,
        after: RefKey | None = None,
        start: RefKey | None = None,
        upto: RefKey | None = None,
        chunk: int = 5000,
    ) -> Iterator[Ref]:
        """Stream a contract's gap in key order by keyset pages.

        Keys run from ``start`` (inclusive) or ``after`` (exclusive) up to ``upto``
        (inclusive); each page resumes after the last key of the one before.
        """
        # Row-value comparisons, not `a > x OR (a = x AND b > y)`: PostgreSQL turns the
        # latter into a bitmap OR over every remaining row, while a row value walks the
        # (chain_id, contract, key, tx_hash) index and stops at the LIMIT (2 ms a page
        # instead of 150 ms at 1M refs). SQLite does not seek on a row value over an
        # expression index, so a plain bound on the key's first half is added: it lets
        # SQLite seek too (otherwise every page rescans from the contract's first ref).
        cursor_key = after
        first_inclusive = start
        while True:
            sql = f"SELECT r.tx_hash, r.block_number, r.source FROM refs r WHERE {self._GAP_WHERE}"
            params: list[Any] = [chain_id, contract]
            lower = (">=", first_inclusive) if first_inclusive is not None else (">", cursor_key)
            first_inclusive = None
            sql += _key_bounds([lower, ("<=", upto)], params)
            sql += f" ORDER BY {KEY_SQL}, r.tx_hash LIMIT ?"
            params.append(chunk)
            with self._read() as cur:
                cur.execute(self._sql(sql), params)
                rows = cur.fetchall()
            for tx_hash, block_number, source in rows:
                yield Ref(chain_id, contract, tx_hash,
                          None if block_number is None else int(block_number), source)  # fmt: skip
            if len(rows) < chunk:
                return
            last = rows[-1]
            cursor_key = (UNKNOWN_BLOCK_KEY if last[1] is None else int(last[1]), last[0])

    def has_gap(self, chain_id: int, contract: str) -> bool:
        """Whether a ref of the contract is missing: one probe of the index, not a count."""
        with self._read() as cur:
            return self._gap_in(cur, chain_id, contract)

    def _gap_in(self, cur: Any, chain_id: int, contract: str) -> bool:
        """Whether a ref of the contract is missing, as ``cur`` sees it."""
        cur.execute(self._sql(_ANY_GAP.format(gap=self._GAP_WHERE)), (chain_id, contract))
        return cur.fetchone() is not None

    def has_refs(self, chain_id: int, contract: str) -> bool:
        """Whether the contract has any ref at all (one probe of its primary key)."""
        with self._read() as cur:
            cur.execute(self._sql("SELECT 1 FROM refs WHERE chain_id = ? AND contract = ? LIMIT 1"),
                        (chain_id, contract))  # fmt: skip
            return cur.fetchone() is not None

    def count_gap(self, chain_id: int, contract: str) -> int:
        """How many refs of the contract are missing."""
        with self._read() as cur:
            cur.execute(self._sql(f"SELECT count(*) FROM refs r WHERE {self._GAP_WHERE}"),
                        (chain_id, contract))  # fmt: skip
            return int(cur.fetchone()[0])

    def count_refs(self, targets: Sequence[tuple[int, str]]) -> int:
        """The refs of ``targets``, missing or not: one count of the primary key's index per
        target, no lookup of their transactions (a run's trigger for :meth:`count_untried`)."""
        with self._read() as cur:
            n = 0
            for chain_id, contract in targets:
                cur.execute(self._sql("SELECT count(*) FROM refs WHERE chain_id = ? AND contract = ?"),
                            (chain_id, contract))  # fmt: skip
                n += int(cur.fetchone()[0])
            return n

    def count_untried(self, chain_id: int, contract: str) -> int:
        """The contract's refs in the gap with no failure record at all: no batch tried them.
        After a complete run, the refs imported or discovered while it ran, outside its plan
        (its batches stored every ref they held, or recorded its failure)."""
        sql = (f"SELECT count(*) FROM refs r WHERE {self._GAP_WHERE} AND NOT EXISTS (SELECT 1 FROM "
               f"failures f WHERE f.chain_id = r.chain_id AND f.tx_hash = r.tx_hash{self._FENCE})")
        with self._read() as cur:
            cur.execute(self._sql(sql), (chain_id, contract))
            return int(cur.fetchone()[0])

    #: A contract's refs in the gap (parameters: chain, contract) whose block is one of a list
    #: (``{marks}``: a parameter per block), by one seek of the gap's key index per block:
    #: SQLite does that with ``IN`` on the index's own expression (see :meth:`gap_in_blocks`).
    _IN_BLOCKS = ("SELECT r.tx_hash, r.block_number, r.source FROM refs r "
                  "WHERE {gap} AND " + KEY_SQL + " IN ({marks})")  # fmt: skip
    #: Whether :data:`_IN_BLOCKS` takes the blocks as one array parameter, first.
    _BLOCKS_AS_ARRAY = False

    def gap_in_blocks(self, chain_id: int, contracts: Sequence[str], blocks: Sequence[int]) -> list[Ref]:
        """The refs in the gap of ``contracts`` whose block is one of ``blocks`` (a batch's
        riders: see ``Enricher.split``): per contract, one seek of the gap's key index per
        block, never a walk of the refs between them (another contract's may crowd them)."""
        out: list[Ref] = []
        with self._read() as cur:
            for contract in contracts:
                for i in range(0, len(blocks), 500):
                    part = list(blocks[i : i + 500])
                    sql = self._IN_BLOCKS.format(gap=self._GAP_WHERE, marks=", ".join("?" * len(part)))
                    params: list[Any] = [chain_id, contract, *part]
                    if self._BLOCKS_AS_ARRAY:
                        params = [part, chain_id, contract]
                    cur.execute(self._sql(sql), params)
                    out += [Ref(chain_id, contract, h, int(b), src) for h, b, src in cur.fetchall()]
        return out

    def gap_blocks(self, chain_id: int, contract: str, besides: Sequence[str] = ()
                   ) -> list[tuple[int | None, int, int]]:  # fmt: skip
        """The contract's gap per block: (block number, None for refs of unknown block; how
        many of its refs are in the gap; how many of those are of a transaction one of the
        contracts ``besides`` tracks too, which a run fetches once, for whichever contract's
        batch comes first), in no order (``enrich --dry-run``). One aggregate over the refs
        in the order the database likes, instead of streaming every ref of the gap in key
        order: the key's order probes ``transactions`` in random hash order and reads each
        ref's row apart (1M refs, 4 contracts, 780,000 stored: the dry run took 19-25 s on
        PostgreSQL instead of 7-9; SQLite's lookups cost the same in either order)."""
        shared = "0"
        if besides:
            # One probe of the refs' (chain_id, tx_hash) index per ref (100,000 refs: 0.25 s
            # on PostgreSQL, 0.07 on SQLite). Fenced: PostgreSQL without statistics looked
            # the contract's refs up in refs_key, where the hash is no prefix, and read all
            # of them per ref (100,000 refs: minutes).
            shared = ("sum(CASE WHEN EXISTS (SELECT 1 FROM (SELECT o.contract FROM refs o "
                      f"WHERE o.chain_id = r.chain_id AND o.tx_hash = r.tx_hash{self._FENCE}) o "
                      f"WHERE o.contract IN ({', '.join('?' * len(besides))})) THEN 1 ELSE 0 END)")
        with self._read() as cur:
            cur.execute(self._sql(f"SELECT r.block_number, count(*), {shared} FROM refs r "
                                  f"WHERE {self._GAP_WHERE} GROUP BY r.block_number"),
                        (*besides, chain_id, contract))  # fmt: skip
            return [(None if b is None else int(b), int(n), int(o)) for b, n, o in cur.fetchall()]

    def status(
        self, chain_id: int | None = None, contract: str | None = None
    ) -> list[ContractStatus]:
        with self._read() as cur:
            cur.execute(self._sql(self._STATUS), (chain_id, chain_id, contract, contract) * 3)
            out = []
            for cid, addr, label, refs, enriched, failed, lo, hi, unknown in cur.fetchall():
                refs, enriched, failed = int(refs), int(enriched), int(failed)
                out.append(ContractStatus(
                    int(cid), addr, label, refs, enriched, refs - enriched - failed, failed,
                    None if lo is None else int(lo), None if hi is None else int(hi), int(unknown),
                ))  # fmt: skip
            return out

    # -- writing rows ----------------------------------------------------------------

    @abc.abstractmethod
    def _upsert(
        self, cur: Any, txs: Sequence[TxRow], logs: Sequence[LogRow]
    ) -> set[tuple[int, str]] | None:
        """Bulk upsert inside the caller's transaction. Returns the keys of the transaction
        rows it inserted, or None when it inserted every one of ``txs`` (the usual case, told
        at no cost). A row already stored (by another contract's batch, of this run or
        another, or earlier in ``txs``) is updated, not inserted: a run counts each
        transaction it stored once."""

    def _record_failures(self, cur: Any, enriched: Enriched) -> int:
        """Record ``enriched``'s failures, except those of transactions stored (by this
        transaction's rows, or another contract's batch before), and clear the records of
        the transactions it stores; returns how many it recorded."""
        failures = self._of_unstored(cur, enriched.failures)
        # A transaction that is now stored no longer failed: the records to delete.
        cleared = self._failed_of(cur, enriched.txs) if enriched.txs and self._any_failure(cur) else []
        # One pass in key order, as rows are written (whatever the batches' order), over the
        # records it writes and those it deletes (none is both: a failure of a transaction
        # stored is dropped above). Two commits recording failures of the transactions two
        # contracts share, each in its batch's order, deadlocked; so did, with the upserts and
        # the deletes each in key order but one after the other, a commit recording X's
        # failure and storing Y beside one recording Y's and storing X.
        writes: list[tuple[tuple[int, str], Failure | None]] = sorted(
            [((f.chain_id, f.tx_hash), f) for f in failures] + [(k, None) for k in cleared],
            key=lambda w: w[0])  # fmt: skip
        for upsert, run in itertools.groupby(writes, key=lambda w: w[1] is not None):
            keyed = list(run)
            if upsert:
                self._upsert_failures(cur, [f for _, f in keyed if f is not None])
            else:
                self._delete_failed(cur, [k for k, _ in keyed])
        return len(failures)

    def _upsert_failures(self, cur: Any, failures: Sequence[Failure]) -> None:
        """Record ``failures``, in the order given."""
        cur.executemany(
            self._sql(
                "INSERT INTO failures (chain_id, tx_hash, contract, reason, attempts, last_error) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (chain_id, tx_hash) DO UPDATE SET "
                "reason = EXCLUDED.reason, last_error = EXCLUDED.last_error, "
                "attempts = failures.attempts + EXCLUDED.attempts, at = EXCLUDED.at"
            ),
            [(f.chain_id, f.tx_hash, f.contract, f.reason, f.attempts, f.last_error[:2000])
             for f in failures],
        )

    def _of_unstored(self, cur: Any, failures: Sequence[Failure]) -> Sequence[Failure]:
        """Those of ``failures`` whose transaction is not stored, as ``cur`` sees it: one
        lookup per chain (usually none: most commits record no failure). A commit running
        beside the one that stores it does not see it; the readers of failure records skip
        such a record (:data:`NOT_STORED`)."""
        hashes: dict[int, list[str]] = {}
        for f in failures:
            hashes.setdefault(f.chain_id, []).append(f.tx_hash)
        stored = {(chain_id, h) for chain_id, hs in hashes.items()
                  for h in self._stored_blocks(cur, chain_id, hs)}  # fmt: skip
        return [f for f in failures if (f.chain_id, f.tx_hash) not in stored] if stored else failures

    def _any_failure(self, cur: Any) -> bool:
        # Usually there is no failure at all: one probe instead of a DELETE per transaction.
        cur.execute("SELECT 1 FROM failures LIMIT 1")
        return cur.fetchone() is not None

    def _failed_of(self, cur: Any, txs: Sequence[TxRow]) -> list[tuple[int, str]]:
        """The keys of ``txs`` that may have a failure record, in key order (SQLite: all of
        them, each deleted by its key)."""
        return sorted({(t.chain_id, t.tx_hash) for t in txs})

    def _delete_failed(self, cur: Any, keys: Sequence[tuple[int, str]]) -> None:
        """Delete the failure records of ``keys``, in the order given."""
        cur.executemany(self._sql("DELETE FROM failures WHERE chain_id = ? AND tx_hash = ?"), keys)

    def write(self, enriched: Enriched, calls: int = 0) -> int:
        """Store rows, failures and moved keys in one transaction, with no lease (the start-up
        sample of a concurrent run), adding ``calls`` to the run's; returns the transactions
        it newly stored. No lease covers these refs, so their keys move as an import's or a
        discovery's block fills do: after the contracts' rows and under the planning lock."""
        with self._tx() as cur:
            if enriched.moved:
                for chain_id, contract in sorted({(r.chain_id, r.contract) for r in enriched.moved}):
                    self._lock_contract(cur, chain_id, contract)  # one removed meanwhile: no refs
                self._plan_lock(cur)
            (new,) = self._write_results(cur, [enriched], calls)
            return new

    def list_failures(
        self, chain_id: int | None = None, contract: str | None = None, limit: int = 1000
    ) -> list[tuple[Failure, str]]:
        """Failures with the time they were last recorded (ISO text)."""
        sql = (
            "SELECT chain_id, tx_hash, contract, reason, last_error, attempts, at FROM failures f "
            "WHERE (CAST(? AS BIGINT) IS NULL OR chain_id = ?) "
            f"AND (CAST(? AS TEXT) IS NULL OR {_OF_CONTRACT}) AND {self._NOT_STORED} "
            "ORDER BY chain_id, contract, tx_hash LIMIT ?"
        )
        with self._read() as cur:
            cur.execute(self._sql(sql), (chain_id, chain_id, contract, contract, contract, limit))
            return [(Failure(int(c), h, k, r, e, int(a)), _utc_text(at))
                    for c, h, k, r, e, a, at in cur.fetchall()]  # fmt: skip

    def count_permanent_failures(self, chain_id: int, contract: str) -> int:
        with self._read() as cur:
            cur.execute(
                self._sql(f"SELECT count(*) FROM failures f WHERE chain_id = ? AND {_OF_CONTRACT} "
                          f"AND reason IN ({_PERMANENT_IN}) AND {self._NOT_STORED}"),
                (chain_id, contract, contract),
            )  # fmt: skip
            return int(cur.fetchone()[0])

    def count_beyond_head(self, chain_id: int, contract: str) -> tuple[int, str | None]:
        """Refs of ``contract`` left in the gap as ``beyond_head`` (in blocks the node had
        not reached), and the ``last_error`` of the latest such failure (its head)."""
        where = f"WHERE chain_id = ? AND {_OF_CONTRACT} AND reason = 'beyond_head' AND {self._NOT_STORED}"
        with self._read() as cur:
            cur.execute(self._sql(f"SELECT count(*) FROM failures f {where}"), (chain_id, contract, contract))
            n = int(cur.fetchone()[0])
            if not n:
                return 0, None
            cur.execute(self._sql(f"SELECT last_error FROM failures f {where} ORDER BY at DESC LIMIT 1"),
                        (chain_id, contract, contract))  # fmt: skip
            return n, str(cur.fetchone()[0])

    def clear_failures(
        self, chain_id: int | None = None, contract: str | None = None, permanent_only: bool = True
    ) -> int:
        """Put failed refs back into the gap (``enrich --retry-failed``). A permanent failure's
        record stays, as ``retrying`` (transient): failing again adds to its ``attempts``.
        With ``permanent_only=False`` every record matched is deleted instead."""
        where = (
            "WHERE (CAST(? AS BIGINT) IS NULL OR chain_id = ?) "
            f"AND (CAST(? AS TEXT) IS NULL OR {_OF_CONTRACT})"
        )
        if permanent_only:
            sql = (f"UPDATE failures AS f SET reason = 'retrying' {where} AND reason IN ({_PERMANENT_IN}) "
                   f"AND {self._NOT_STORED}")  # a stored transaction's record puts nothing back
        else:
            sql = f"DELETE FROM failures AS f {where}"
        with self._tx() as cur:
            cur.execute(self._sql(sql), (chain_id, chain_id, contract, contract, contract))
            return int(cur.rowcount)

    def iter_failed_refs(self, chain_id: int, contract: str) -> Iterator[Ref]:
        """The refs :meth:`clear_failures` would put back into the gap (``enrich --dry-run
        --retry-failed``): without a row, their transaction permanently failed. In hash order."""
        with self._read() as cur:
            cur.execute(self._sql(self._FAILED_REFS), (chain_id, contract))
            rows = cur.fetchall()
        for tx_hash, block, source in rows:
            yield Ref(chain_id, contract, tx_hash, None if block is None else int(block), source)

    # -- coverage --------------------------------------------------------------------

    def add_refs_and_coverage(self, refs: Sequence[Ref], ranges: Sequence[CoverageRange]) -> int:
        """Discovery's commit: found refs and the ranges they cover, atomically.

        Coverage is kept merged: per ``(chain_id, contract, method)``, the rows are disjoint
        and never touch (``[0, 9]`` and ``[10, 19]`` are one row, ``[0, 19]``), so a long
        scan leaves one row per contiguous range, however many chunks it committed. The
        ranges' contracts are locked first, exclusively (``FOR NO KEY UPDATE`` on
        PostgreSQL): two discoveries of one contract record coverage one after the other,
        each merging with what the other committed."""
        with self._tx() as cur:
            checked: set[tuple[int, str]] = set()
            # A chunk with no refs still writes coverage. In key order: two writers of
            # several contracts' coverage take the exclusive locks in one order.
            for key in sorted({(c.chain_id, c.contract) for c in ranges}):
                self._require_tracked(cur, *key, checked, lock=self._COVERAGE_LOCK)
            new = self._write_refs(cur, refs, checked, {}).new
            self._merge_coverage(cur, ranges)
            return new

    _COVERAGE_ROWS = (
        "SELECT from_block, to_block FROM coverage WHERE chain_id = ? AND contract = ? AND method = ?"
    )

    def _coverage_rows(self, cur: Any, chain_id: int, contract: str, method: str) -> set[Interval]:
        """The stored ranges of one key (a few once merged: one per contiguous range)."""
        cur.execute(self._sql(self._COVERAGE_ROWS), (chain_id, contract, method))
        return {(int(lo), int(hi)) for lo, hi in cur.fetchall()}

    def _merge_coverage(self, cur: Any, ranges: Sequence[CoverageRange]) -> None:
        """Record ``ranges``, each key's rows and new ranges replaced by their merge. Every
        row of the key is read, not only those the new ranges touch, so a database written
        before coverage was merged (one row per chunk) is merged on its next write for that
        key. Only rows read are deleted, and only for a merge that holds their blocks: no
        covered block is lost, even by a writer that did not hold the contract's row."""
        spans: dict[tuple[int, str, str], list[Interval]] = {}
        for r in ranges:
            spans.setdefault((r.chain_id, r.contract, r.method), []).append((r.from_block, r.to_block))
        gone: list[tuple[int, str, str, int, int]] = []
        added: list[tuple[int, str, str, int, int]] = []
        for key, new in sorted(spans.items()):
            stored = self._coverage_rows(cur, *key)
            merged = merge([*stored, *new])
            gone += [(*key, lo, hi) for lo, hi in sorted(stored.difference(merged))]
            added += [(*key, lo, hi) for lo, hi in merged if (lo, hi) not in stored]
        if gone:
            cur.executemany(
                self._sql("DELETE FROM coverage WHERE chain_id = ? AND contract = ? AND method = ? "
                          "AND from_block = ? AND to_block = ?"),
                gone,
            )  # fmt: skip
        if added:
            cur.executemany(
                self._sql("INSERT INTO coverage (chain_id, contract, method, from_block, to_block) "
                          "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                added,
            )  # fmt: skip

    _SHARE_LOCK = ""  # PostgreSQL: " FOR SHARE" (SQLite's write transaction excludes all)
    _COVERAGE_LOCK = ""  # PostgreSQL: " FOR NO KEY UPDATE" (one coverage writer per contract)
    _ROW_LOCK = ""  # PostgreSQL: " FOR UPDATE"

    def _write_refs(
        self, cur: Any, refs: Sequence[Ref], checked: set[tuple[int, str]],
        unknown: dict[tuple[int, str], bool],
    ) -> RefsAdded:
        """Insert refs of tracked contracts, then fill block numbers refs already there
        lacked: the lock order every writer of refs keeps (the contract's row, the refs,
        the planning lock). A ref given without a block number whose transaction is stored
        is written with that transaction's. ``checked`` and ``unknown`` carry what one
        transaction has learned about each contract across calls."""
        for chain_id, contract in sorted({(r.chain_id, r.contract) for r in refs}):  # in key order
            self._require_tracked(cur, chain_id, contract, checked)
        refs = self._with_stored_blocks(cur, refs)
        new = self._insert_refs(cur, refs)
        return RefsAdded(new, self._fill_unknown_blocks(cur, refs, unknown))

    def _with_stored_blocks(self, cur: Any, refs: Sequence[Ref]) -> Sequence[Ref]:
        """``refs``, those without a block number given their stored transaction's, if any.

        A new ref of a stored transaction is not in the gap: it may take any key, even
        while its contract's plan is open, and no enrichment would ever give it one. A ref
        already there without one gets it only as every fill does (no open plan)."""
        hashes: dict[int, list[str]] = {}
        for r in refs:
            if r.block_number is None:
                hashes.setdefault(r.chain_id, []).append(r.tx_hash)
        stored = {(chain_id, h): b for chain_id, hs in hashes.items() if self._has_transactions(cur, chain_id)
                  for h, b in self._stored_blocks(cur, chain_id, hs).items()}  # fmt: skip
        if not stored:
            return refs
        return [replace(r, block_number=stored[r.chain_id, r.tx_hash])
                if r.block_number is None and (r.chain_id, r.tx_hash) in stored else r
                for r in refs]  # fmt: skip

    def _has_transactions(self, cur: Any, chain_id: int) -> bool:
        """Whether any transaction of the chain is stored (none in a new database)."""
        cur.execute(self._sql("SELECT 1 FROM transactions WHERE chain_id = ? LIMIT 1"), (chain_id,))
        return cur.fetchone() is not None

    @abc.abstractmethod
    def _stored_blocks(self, cur: Any, chain_id: int, hashes: Sequence[str]) -> dict[str, int]:
        """The block numbers of those of ``hashes`` whose transaction is stored."""

    def _require_tracked(
        self, cur: Any, chain_id: int, contract: str, checked: set[tuple[int, str]] | None = None,
        lock: str | None = None,
    ) -> None:
        """Refs are only written for a tracked contract: one removed while a discovery or an
        import ran must not come back as rows nobody can see or remove. The row stays locked
        (``lock``, shared by default) until the writer commits, so a removal waits for it.
        ``checked`` skips contracts this transaction has already checked (and locked)."""
        if checked is not None:
            if (chain_id, contract) in checked:
                return
            checked.add((chain_id, contract))
        if not self._lock_contract(cur, chain_id, contract, lock):
            raise UnknownContractError(
                f"contract {contract} on chain {chain_id} is no longer tracked (removed meanwhile): "
                "nothing was written; add it again with `gapfill contract add` if it was a mistake"
            )

    def _lock_contract(self, cur: Any, chain_id: int, contract: str, lock: str | None = None) -> bool:
        """Hold a contract's row until commit, shared unless ``lock`` says otherwise (a
        removal waits); False if untracked."""
        clause = self._SHARE_LOCK if lock is None else lock
        cur.execute(
            self._sql(f"SELECT 1 FROM contracts WHERE chain_id = ? AND address = ?{clause}"),
            (chain_id, contract),
        )
        return cur.fetchone() is not None

    def _insert_refs(self, cur: Any, refs: Sequence[Ref]) -> int:
        cur.executemany(
            self._sql("INSERT INTO refs (chain_id, contract, tx_hash, block_number, source) "
                      "VALUES (?, ?, ?, ?, ?) ON CONFLICT (chain_id, contract, tx_hash) DO NOTHING"),
            [(r.chain_id, r.contract, r.tx_hash, r.block_number, r.source) for r in refs],
        )  # fmt: skip
        return int(cur.rowcount) if cur.rowcount >= 0 else len(refs)  # summed over the rows

    _FILL_BLOCK_SQL = (
        "UPDATE refs SET block_number = ? WHERE chain_id = ? AND contract = ? AND tx_hash = ? "
        "AND block_number IS NULL"
    )

    def _has_unknown_blocks(self, cur: Any, chain_id: int, contract: str) -> bool:
        """Whether a contract has refs without a block number that may be given one now:
        one probe of the key index, and none while a plan of the contract is open (a ref's
        key would move under its batches, and a run could end with it left behind; the
        ref then gets its block from its own enrichment). Holds the planning lock, so a
        plan cannot start in between."""
        cur.execute(
            self._sql(f"SELECT 1 FROM refs r WHERE r.chain_id = ? AND r.contract = ? "
                      f"AND {KEY_SQL} = ? LIMIT 1"),
            (chain_id, contract, UNKNOWN_BLOCK_KEY),
        )  # fmt: skip
        if cur.fetchone() is None:
            return False
        self._plan_lock(cur)
        cur.execute(
            self._sql("SELECT 1 FROM batches WHERE chain_id = ? AND contract = ? "
                      "AND state IN ('pending', 'leased') LIMIT 1"),
            (chain_id, contract),
        )  # fmt: skip
        return cur.fetchone() is None

    def _fill_unknown_blocks(
        self, cur: Any, refs: Sequence[Ref], unknown: dict[tuple[int, str], bool]
    ) -> int:
        """Give refs imported without a block number the one a later import or discovery
        knows; return how many got one. ``unknown`` caches, per contract, whether it has such
        refs at all: the usual answer (no) costs one index probe per contract and call."""
        fills = []
        for r in refs:
            if r.block_number is None:
                continue
            key = (r.chain_id, r.contract)
            has = unknown.get(key)
            if has is None:
                has = unknown[key] = self._has_unknown_blocks(cur, *key)
            if has:
                fills.append((r.block_number, r.chain_id, r.contract, r.tx_hash))
        if not fills:
            return 0
        # In key order, as every writer of refs: no two can deadlock on them.
        cur.executemany(self._sql(self._FILL_BLOCK_SQL), sorted(fills, key=_fill_order))
        return max(int(cur.rowcount), 0)  # summed over the statements

    def get_coverage(self, chain_id: int, contract: str) -> list[CoverageRange]:
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT method, from_block, to_block FROM coverage "
                    "WHERE chain_id = ? AND contract = ? ORDER BY from_block, to_block"
                ),
                (chain_id, contract),
            )
            return [CoverageRange(chain_id, contract, int(lo), int(hi), m)
                    for m, lo, hi in cur.fetchall()]  # fmt: skip

    # -- runs ------------------------------------------------------------------------

    def create_run(self, mode: str, workers: int, note: str = "", chain_id: int | None = None) -> int:
        """Record a new run of this process. Runs of this host still marked ``running``
        whose process is gone (killed, crashed) are marked ``interrupted`` first, ended
        when they were last seen working (:meth:`_mark_dead_runs`).

        ``chain_id``: the run decodes that chain's rows. The ABI version of each of its
        contracts is kept with the run (its processes build their decoders after this, so
        from ABIs at least as new): :meth:`settle_runs` compares them with the versions
        then current once the run is over, even if it was killed."""
        host, space = liveness.host(), liveness.here()
        with self._tx() as cur:
            now = self._now(cur)
            self._mark_dead_runs(cur, host, now)
            versions = None
            if chain_id is not None:
                cur.execute(self._sql("SELECT address, abi_version FROM contracts WHERE chain_id = ?"),
                            (chain_id,))  # fmt: skip
                versions = json_text({"chain_id": chain_id,
                                      "versions": {a: int(v) for a, v in cur.fetchall()}})  # fmt: skip
            cur.execute(
                self._sql(
                    "INSERT INTO runs (started_at, host, space, pid, mode, workers, note, abi_versions) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING run_id"
                ),
                (now, host, None if space is None else str(space), os.getpid(), mode, workers, note,
                 versions),
            )
            return int(cur.fetchone()[0])

    def _mark_dead_runs(self, cur: Any, host: str, now: float) -> None:
        """Runs of ``host`` still marked ``running`` whose process is known to be gone
        (:func:`liveness.verdict`: never one of another PID namespace or machine):
        ``interrupted``, finished when they were last seen working (:meth:`_last_seen`),
        not now."""
        cur.execute(
            self._sql("SELECT run_id, pid, started_at, processed, failed, space FROM runs "
                      "WHERE state = 'running' AND host = ? AND pid IS NOT NULL"),
            (host,),
        )  # fmt: skip
        for run_id, pid, started, processed, failed, space in cur.fetchall():
            if liveness.verdict(host, liveness.Space.parse(space), int(pid)) is not False:
                continue
            finished, note = self._dead_run_end(cur, host, int(run_id), float(started),
                                                bool(processed or failed), now)  # fmt: skip
            cur.execute(
                self._sql("UPDATE runs SET state = 'interrupted', finished_at = ?, "
                          "note = ? WHERE run_id = ? AND state = 'running'"),
                (finished, note, run_id),
            )  # fmt: skip

    def _dead_run_end(
        self, cur: Any, host: str, run_id: int, started: float, counted: bool, now: float
    ) -> tuple[float | None, str]:
        """When run ``run_id`` of ``host``, whose process is gone, ended (None: not known), and
        the note that says so: what :meth:`_mark_dead_runs` records, and :meth:`list_runs`
        shows until then. ``counted``: the run's row counts rows it wrote."""
        note = DEAD_RUN_NOTE
        finished = self._last_seen(cur, host, run_id)
        if finished is not None:
            return min(max(finished, started), now), note
        if counted:
            # Rows were counted (a start-up sample's, or a run of an older gapfill whose
            # leases name no run) but nothing dates them: its end and rate stay unknown.
            return None, note + ", at a time not known"
        return started, note  # nothing it did is recorded: it ended as it began

    def _last_seen(self, cur: Any, host: str, run_id: int) -> float | None:
        """When a process of run ``run_id`` of ``host`` last wrote a lease event of its own
        (leased, renewed, committed, emptied; not the give-backs and expiries others write for it,
        dated when they noticed), if any: the owners of its leases name it (:func:`owner_name`,
        with its space or, an older gapfill's, without)."""
        name = re.sub(r"([!%_])", r"!\1", host)
        cur.execute(
            self._sql("SELECT max(at) FROM lease_events WHERE (owner LIKE ? ESCAPE '!' OR owner LIKE ? "
                      "ESCAPE '!') AND event IN ('leased', 'renewed', 'committed', 'emptied')"),
            (f"{name}:%/run{run_id}/%", f"{name}@%:%/run{run_id}/%"),
        )  # fmt: skip
        row = cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def settle_runs(self, run_id: int | None = None) -> list[tuple[int, str]]:
        """Ask for the stored rows of every contract whose ABI changed since a finished run
        started to be decoded again: its processes may have stored some decoded with the
        ABIs they started with. Settles run ``run_id`` (this process's, whose workers have
        exited) and every run that is over (finished, failed, or its process gone), each
        once; returns the contracts asked, by ``(chain_id, address)``.

        While another live process of this host holds a lease, runs other than ``run_id``
        wait for a later call: a run killed outright may have left workers finishing their
        batches, still to commit rows decoded the old way.
        """
        host = liveness.host()
        busy = any(pid != os.getpid() and alive for _, pid, alive in self._local_owners())
        asked: set[tuple[int, str]] = set()
        with self._tx() as cur:
            now = self._now(cur)
            self._mark_dead_runs(cur, host, now)
            over = "" if busy else " OR state <> 'running'"
            cur.execute(self._sql(f"SELECT run_id, abi_versions FROM runs WHERE abi_versions IS NOT NULL "
                                  f"AND (run_id = ?{over}) ORDER BY run_id"),
                        (-1 if run_id is None else run_id,))  # fmt: skip
            for settled, text in cur.fetchall():
                # Two processes settling at once settle each run once: the one that clears it.
                cur.execute(self._sql("UPDATE runs SET abi_versions = NULL WHERE run_id = ? "
                                      "AND abi_versions IS NOT NULL"), (settled,))  # fmt: skip
                if cur.rowcount != 1:
                    continue
                started = json_value(text)
                chain_id, versions = int(started["chain_id"]), started["versions"]
                cur.execute(self._sql("SELECT address, abi_version FROM contracts WHERE chain_id = ? "
                                      "AND abi_version > 0"), (chain_id,))  # fmt: skip
                asked.update((chain_id, a) for a, v in cur.fetchall() if int(v) != versions.get(a, 0))
            for chain_id, address in sorted(asked):
                cur.execute(self._sql("UPDATE contracts SET redecode_asked = redecode_asked + 1 "
                                      "WHERE chain_id = ? AND address = ?"), (chain_id, address))  # fmt: skip
        return sorted(asked)

    def pending_redecodes(self) -> list[tuple[int, str, Any, int]]:
        """``(chain_id, address, abi, asked)`` of each contract whose stored rows may not all
        be decoded with its current ABI yet (given, or changed while a run stored them),
        read together: decoding with that ABI, then :meth:`redecoded` with ``asked``,
        settles it unless it was asked again meanwhile."""
        with self._read() as cur:
            cur.execute(
                "SELECT chain_id, address, abi, redecode_asked FROM contracts WHERE "
                "redecode_asked > redecode_done AND abi IS NOT NULL ORDER BY chain_id, address"
            )
            return [(int(c), a, json_value(abi), int(n)) for c, a, abi, n in cur.fetchall()]

    def redecoded(self, chain_id: int, address: str, asked: int) -> None:
        """Every stored row of the contract is decoded with the ABI read with ``asked``."""
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "UPDATE contracts SET redecode_done = ? WHERE chain_id = ? AND address = ? "
                    "AND redecode_done < ?"
                ),
                (asked, chain_id, address, asked),
            )

    def finish_run(
        self, run_id: int, state: str, more_calls: int = 0, note: str | None = None
    ) -> RunTotals:
        """Record how a run ended, adding ``more_calls`` (those no write of the run counted
        yet) to its calls; ``note`` (why it failed, say) replaces the run's note. Returns its
        processed, failed and calls, which its writes kept (``counts_for_run``), and its
        recorded duration."""
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                self._sql(
                    "UPDATE runs SET finished_at = ?, state = ?, rpc_calls = rpc_calls + ?, "
                    "note = COALESCE(?, note) WHERE run_id = ? "
                    "RETURNING processed, failed, rpc_calls, started_at"
                ),
                (now, state, more_calls, note, run_id),
            )
            row = cur.fetchone()
            if row is None:
                return RunTotals(0, 0, 0, 0.0)
            return RunTotals(int(row[0]), int(row[1]), int(row[2]), now - float(row[3]))

    def add_run_calls(self, calls: int) -> None:
        """Add ``calls`` to the calls of the run of ``counts_for_run`` (a worker's calls since
        its last write, as it ends)."""
        if calls and self.counts_for_run is not None:
            with self._tx() as cur:
                self._count_for_run(cur, 0, 0, calls)

    def _count_for_run(
        self, cur: Any, processed: int, failed: int, calls: int, now: float | None = None
    ) -> None:
        """Add to the counts of the run of ``counts_for_run``, in the caller's transaction.

        Rows counted at ``now`` (a lease's commit or give-back) after the run's recorded end
        move that end to ``now``: a coordinator killed outright leaves its workers finishing
        their batches, and a run started meanwhile marked it ended at its last event then
        (:meth:`_mark_dead_runs`); ``processed`` over too short a time overstated its rate."""
        if self.counts_for_run is None or not (processed or failed or calls):
            return
        ends = () if now is None or not (processed or failed) else (now, now)
        cur.execute(self._sql("UPDATE runs SET processed = processed + ?, failed = failed + ?, "
                              "rpc_calls = rpc_calls + ?"
                              + (", finished_at = CASE WHEN finished_at < ? THEN ? ELSE finished_at END"
                                 if ends else "") + " WHERE run_id = ?"),
                    (processed, failed, calls, *ends, self.counts_for_run))  # fmt: skip

    def list_runs(self, limit: int = 50) -> list[RunInfo]:
        """The latest ``limit`` runs, the latest first.

        A ``running`` row of this host whose process is known to be gone (killed outright:
        ``kill -9``, the OOM killer), which no later run of the host has marked yet, is
        shown as marking it would record it (:meth:`_mark_dead_runs`): ``interrupted``,
        ended when it was last seen working, ``recorded`` False. Nothing is written: a
        listing only reads (a read-only file or role, a replica), and the next run on the
        host records it."""
        host = liveness.host()
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT run_id, started_at, finished_at, host, mode, workers, state, processed,"
                    " failed, rpc_calls, note, pid, space FROM runs ORDER BY run_id DESC LIMIT ?"
                ),
                (limit,),
            )
            listed: list[RunInfo] = []
            now: float | None = None
            for r in cur.fetchall():
                space = liveness.Space.parse(r[12])
                info = RunInfo(int(r[0]), float(r[1]), None if r[2] is None else float(r[2]), r[3],
                               r[4], int(r[5]), r[6], int(r[7]), int(r[8]), int(r[9]), r[10],
                               r[11] is not None and liveness.judged_here(r[3], space))  # fmt: skip
                if (info.state == "running" and r[11] is not None and info.host == host
                        and liveness.verdict(host, space, int(r[11])) is False):  # fmt: skip
                    now = self._now(cur) if now is None else now
                    finished, note = self._dead_run_end(cur, host, info.run_id, info.started_at,
                                                        bool(info.processed or info.failed), now)  # fmt: skip
                    info = replace(info, state="interrupted", finished_at=finished,
                                   note=note, recorded=False)  # fmt: skip
                listed.append(info)
            return listed

    # -- planning and leases ---------------------------------------------------------

    @abc.abstractmethod
    def _plan_lock(self, cur: Any) -> None:
        """Serialise planning across processes and hosts (inside the transaction)."""

    def _fresh_stats(self) -> None:
        """Give the gap's probes of stored transactions statistics to plan by, where the
        database has none yet (a backend's hook; SQLite's probe needs none)."""
        return None

    def plan(
        self, run_id: int, targets: Sequence[tuple[int, str]], batch_size: int = 500
    ) -> PlanInfo:
        """Cut each target's gap into keyset batches, or join its open plan: then only the
        gap keys outside every open batch's key range are cut into new batches, none
        spanning an open one (refs put back into the gap, or new since it was planned).

        Runs under a lock so two coordinators never plan the same contract twice.
        The gap is streamed by key: a million refs never sit in memory.
        """
        batches = refs = joined = 0
        self._fresh_stats()
        with self._tx() as cur:
            # The targets' rows first, shared (the lock order of every writer of refs: the
            # contract's row, then the planning lock). A removal locks its contract's row for
            # update: it waits for this plan to commit, then deletes its batches; a plan
            # starting during a removal waits for it, then finds the contract gone and plans
            # nothing for it (no open plan of a contract nobody tracks).
            tracked = {t for t in sorted(set(targets)) if self._lock_contract(cur, *t)}
            self._plan_lock(cur)
            for chain_id, contract in targets:
                if (chain_id, contract) not in tracked:
                    continue
                cur.execute(
                    self._sql(
                        "SELECT count(*) FROM batches WHERE chain_id = ? AND contract = ? "
                        "AND state IN ('pending', 'leased')"
                    ),
                    (chain_id, contract),
                )
                open_ = int(cur.fetchone()[0])
                if open_ and open_ > self._close_emptied(cur, chain_id, contract, run_id):
                    # Its open batches cover their key ranges alone: what else is in the gap
                    # (transient failures of its done batches, refs put back by --retry-failed
                    # or imported since) gets batches of its own between them.
                    joined += 1
                    spans = self._uncovered_keys(cur, chain_id, contract)
                else:
                    spans = iter([self._gap_keys(cur, chain_id, contract)])
                rows = [(run_id, chain_id, contract, lo[0], lo[1], hi[0], hi[1], n)
                        for lo, hi, n in _cut(spans, batch_size)]  # fmt: skip
                if rows:
                    cur.executemany(
                        self._sql(
                            "INSERT INTO batches (run_id, chain_id, contract, lo_block, lo_tx, "
                            "hi_block, hi_tx, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                        ),
                        rows,
                    )
                batches += len(rows)
                refs += sum(r[7] for r in rows)
        return PlanInfo(batches, refs, joined)

    def _uncovered_keys(self, cur: Any, chain_id: int, contract: str) -> Iterator[Iterator[RefKey]]:
        """The contract's gap keys that no open batch's key range holds, as one stream per
        stretch between two open batches (and before the first, after the last): a batch
        cut from them spans no open batch, so batches never overlap. Each stretch is sought
        in the gap's key index and paged by key, in the planning transaction."""
        for a, b in self._stretches(cur, chain_id, contract):
            yield self._gap_keys_between(cur, chain_id, contract, a, b)

    def _stretches(self, cur: Any, chain_id: int, contract: str) -> list[tuple[RefKey | None, RefKey | None]]:
        """The key ranges between the contract's open batches, before the first and after
        the last, as (after, before) exclusive bounds (None: unbounded); none if it has no
        open batch."""
        cur.execute(
            self._sql(f"SELECT lo_block, lo_tx, hi_block, hi_tx FROM batches WHERE {_OPEN} "
                      "AND chain_id = ? AND contract = ? ORDER BY lo_block, lo_tx"),
            (chain_id, contract),
        )  # fmt: skip
        ranges = [((int(a), b), (int(c), d)) for a, b, c, d in cur.fetchall()]
        if not ranges:
            return []
        after: list[RefKey | None] = [None] + [hi for _, hi in ranges]
        before: list[RefKey | None] = [lo for lo, _ in ranges] + [None]
        return list(zip(after, before, strict=True))

    def gap_outside_open_batches(
        self, chain_id: int, contract: str, more: Iterable[RefKey] = ()
    ) -> list[int] | None:
        """For ``enrich --dry-run``: the contract's gap refs that no open batch's key range
        holds, counted per stretch between its open batches as :meth:`plan` cuts new batches
        from them when a run joins the plan, with the keys ``more`` (refs a ``--retry-failed``
        run puts back into the gap first) counted in their stretches; None if the contract
        has no open plan (a run plans its whole gap). Read only: one count per stretch."""
        with self._read() as cur:
            stretches = self._stretches(cur, chain_id, contract)
            if not stretches:
                return None
            counts = []
            for after, before in stretches:
                params: list[Any] = [chain_id, contract]
                sql = f"SELECT count(*) FROM refs r WHERE {self._GAP_WHERE}"
                sql += _key_bounds([(">", after), ("<", before)], params)
                cur.execute(self._sql(sql), params)
                counts.append(int(cur.fetchone()[0]))
        los = [b for _, b in stretches if b is not None]  # the open batches' low keys, in order
        for key in more:  # in the stretch whose bounds hold it, if any (else in an open batch)
            i = bisect.bisect_left(los, key)
            after, before = stretches[i]
            if (after is None or key > after) and (before is None or key < before):
                counts[i] += 1
        return counts

    def _gap_keys_between(
        self, cur: Any, chain_id: int, contract: str, after: RefKey | None, before: RefKey | None,
        chunk: int = 10_000,
    ) -> Iterator[RefKey]:
        """The gap's keys strictly between ``after`` and ``before`` (None: unbounded), in key
        order, by keyset pages read with ``cur``."""
        while True:
            sql = f"SELECT {KEY_SQL}, r.tx_hash FROM refs r WHERE {self._GAP_WHERE}"
            params: list[Any] = [chain_id, contract]
            sql += _key_bounds([(">", after), ("<", before)], params)
            cur.execute(self._sql(sql + f" ORDER BY {KEY_SQL}, r.tx_hash LIMIT ?"), (*params, chunk))
            rows = [(int(k), h) for k, h in cur.fetchall()]
            yield from rows
            if len(rows) < chunk:
                return
            after = rows[-1]

    def _close_emptied(self, cur: Any, chain_id: int, contract: str, run_id: int) -> int:
        """Mark done the pending batches of the contract's open plan that have nothing left
        to fetch, for the plan that joins it; returns how many. A batch given back (Ctrl+C)
        with the rows it had fetched, or whose refs left the gap otherwise (another contract
        stored their transactions), would be counted open. Only the batches given back
        before are looked at one by one (a probe of the gap's index each), unless the
        contract has no gap at all; :meth:`lease_next` closes any other emptied one as it
        comes to it, rather than lease it for nothing."""
        no_gap = not self._gap_in(cur, chain_id, contract)
        cur.execute(
            self._sql(f"SELECT {self._BATCH_COLS} FROM batches WHERE chain_id = ? AND contract = ? "
                      "AND state = 'pending' AND (attempts > 0 OR ?) ORDER BY batch_id"),
            (chain_id, contract, no_gap),
        )  # fmt: skip
        pending = [self._batch(row) for row in cur.fetchall()]
        now = self._now(cur)
        closed = 0
        for batch in pending:
            if not no_gap and self._range_in_gap(cur, batch):
                continue
            closed += self._mark_emptied(cur, batch, f"run {run_id}", now)
        return closed

    def _mark_emptied(self, cur: Any, batch: Batch, who: str, now: float) -> bool:
        """Mark done a batch that has nothing of its key range left in the gap, if it is still
        in ``batch.state`` (pending, or leased with its lease expired); ``who`` closed it."""
        cur.execute(
            self._sql("UPDATE batches SET state = 'done', last_owner = coalesce(lease_owner, last_owner), "
                      "lease_owner = NULL, lease_expires_at = NULL WHERE batch_id = ? AND state = ?"),
            (batch.id, batch.state),
        )  # fmt: skip
        if cur.rowcount != 1:
            return False
        self._event(cur, batch.id, who, batch.attempts, "emptied", now)
        return True

    @abc.abstractmethod
    def _gap_keys(self, cur: Any, chain_id: int, contract: str) -> Iterator[RefKey]:
        """Stream the gap's keys in order inside the planning transaction."""

    def batch_counts(
        self, run_id: int | None = None, targets: Sequence[tuple[int, str]] | None = None
    ) -> BatchCounts:
        """Counts over all batches, one run's, or the batches of some contracts: it reads every
        batch they have, done ones included (what runs per second is :meth:`count_open_batches`)."""
        sql = (
            "SELECT state, count(*), coalesce(sum(succeeded), 0), coalesce(sum(failed), 0) "
            "FROM batches WHERE (CAST(? AS BIGINT) IS NULL OR run_id = ?)"
        )
        params: list[Any] = [run_id, run_id]
        sql += _of_targets(targets, params) + " GROUP BY state"
        with self._read() as cur:
            cur.execute(self._sql(sql), params)
            by: dict[str, tuple[int, int, int]] = {
                s: (int(n), int(a), int(b)) for s, n, a, b in cur.fetchall()
            }
        total = sum(v[0] for v in by.values())
        return BatchCounts(
            by.get("pending", (0, 0, 0))[0], by.get("leased", (0, 0, 0))[0],
            by.get("done", (0, 0, 0))[0], total,
            sum(v[1] for v in by.values()), sum(v[2] for v in by.values()),
        )  # fmt: skip

    def count_open_batches(self, targets: Sequence[tuple[int, str]] | None = None) -> int:
        """The pending and leased batches, of all contracts or of ``targets``: what a run's
        progress asks every second. It reads the open batches alone, however many done ones
        earlier runs left (:data:`_OPEN`)."""
        params: list[Any] = []
        sql = f"SELECT count(*) FROM batches WHERE {_OPEN}{_of_targets(targets, params)}"
        with self._read() as cur:
            cur.execute(self._sql(sql), params)
            return int(cur.fetchone()[0])

    def has_open_batches(self, targets: Sequence[tuple[int, str]] | None = None) -> bool:
        with self._read() as cur:
            cur.execute(f"SELECT chain_id, contract FROM batches WHERE {_OPEN}")
            open_ = {(int(c), k) for c, k in cur.fetchall()}
        if targets is None:
            return bool(open_)
        return bool(open_ & set(targets))

    def _event(
        self, cur: Any, batch_id: int, owner: str, attempt: int, event: str, at: float
    ) -> None:
        cur.execute(
            self._sql(
                "INSERT INTO lease_events (batch_id, owner, attempt, event, at) VALUES (?, ?, ?, ?, ?)"
            ),
            (batch_id, owner, attempt, event, at),
        )

    #: Appended to the leasing SELECT: row locks that skip what another worker holds.
    _LEASE_LOCK = ""

    def _select_leasable(
        self, cur: Any, now: float, owner: str, targets: Sequence[tuple[int, str]] | None
    ) -> tuple[Any, ...] | None:
        """Lock and return one leasable batch row (pending and not held back for a pause
        before its retry, or leased and expired).

        Batches another owner failed last come first for this owner, so a retry goes
        to a different worker where one exists.
        """
        sql = (
            f"SELECT {self._BATCH_COLS} FROM batches WHERE {_OPEN} AND "
            "((state = 'pending' AND (lease_expires_at IS NULL OR lease_expires_at <= ?)) "
            "OR (state = 'leased' AND lease_expires_at < ?))"
        )
        params: list[Any] = [now, now]
        sql += _of_targets(targets, params)
        sql += " ORDER BY (coalesce(last_owner, '') = ?), batch_id LIMIT 1" + self._LEASE_LOCK
        params.append(owner)
        cur.execute(self._sql(sql), params)
        row = cur.fetchone()
        return None if row is None else tuple(row)

    _BATCH_COLS = (
        "batch_id, run_id, chain_id, contract, lo_block, lo_tx, hi_block, hi_tx, size, state, "
        "attempts, lease_owner, lease_expires_at, stops"
    )

    @staticmethod
    def _batch(row: Sequence[Any]) -> Batch:
        return Batch(
            int(row[0]), int(row[1]), int(row[2]), row[3], (int(row[4]), row[5]),
            (int(row[6]), row[7]), int(row[8]), row[9], int(row[10]), row[11],
            None if row[12] is None else float(row[12]), int(row[13]),
        )  # fmt: skip

    def lease(
        self,
        owner: str,
        lease_timeout_s: float,
        targets: Sequence[tuple[int, str]] | None = None,
    ) -> Batch | None:
        """Claim one batch: a pending one, or one whose lease expired (see :meth:`lease_next`)."""
        return self.lease_next(owner, lease_timeout_s, targets).batch

    def lease_next(
        self,
        owner: str,
        lease_timeout_s: float,
        targets: Sequence[tuple[int, str]] | None = None,
    ) -> Leased:
        """Claim one batch: a pending one, or one whose lease expired.

        Batches another owner failed are preferred by other owners, so a retry
        goes to a different worker where one exists. A batch with nothing of its key range
        left in the gap (another contract's batch or the start-up sample stored its
        transactions) is closed instead, and the next one taken: a lease of it would cost
        a lease and a commit for nothing.
        """
        emptied = 0
        with self._tx() as cur:
            now = self._now(cur)
            while True:
                row = self._select_leasable(cur, now, owner, targets)
                if row is None:
                    return Leased(None, emptied)
                b = self._batch(row)
                if b.state == "leased" and b.lease_owner is not None:
                    self._event(cur, b.id, b.lease_owner, b.attempts, "expired", now)
                    if self._stopped_owner(cur, b.lease_owner):  # see _stopped_owner
                        b = replace(b, stops=b.stops + 1)
                # (A batch it could not close, none should be, is leased as before.)
                if self._range_in_gap(cur, b) or not self._mark_emptied(cur, b, owner, now):
                    break
                emptied += 1
            attempt = b.attempts + 1
            cur.execute(
                self._sql(
                    "UPDATE batches SET state = 'leased', attempts = ?, lease_owner = ?, "
                    "lease_expires_at = ?, stops = ? WHERE batch_id = ?"
                ),
                (attempt, owner, now + lease_timeout_s, b.stops, b.id),
            )
            self._event(cur, b.id, owner, attempt, "leased", now)
            return Leased(Batch(b.id, b.run_id, b.chain_id, b.contract, b.lo, b.hi, b.size, "leased",
                                attempt, owner, now + lease_timeout_s, b.stops), emptied)  # fmt: skip

    def renew(self, batch: Batch, lease_timeout_s: float) -> bool:
        """Extend a lease this owner still holds; False if it was lost."""
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                self._sql(
                    f"UPDATE batches SET lease_expires_at = ? WHERE {_LEASE_HELD}"
                ),
                (now + lease_timeout_s, batch.id, batch.lease_owner, batch.attempts, now),
            )
            ok = cur.rowcount == 1
            if ok:
                self._event(cur, batch.id, batch.lease_owner or "", batch.attempts, "renewed", now)
            return bool(ok)

    def batch_refs(self, batch: Batch) -> list[Ref]:
        """The refs of a batch's key range that are still in the gap, right now."""
        return list(self.iter_gap(batch.chain_id, batch.contract,
                                  start=batch.lo, upto=batch.hi, chunk=10_000))  # fmt: skip

    def commit_batch(self, batch: Batch, enriched: Enriched) -> bool:
        """Rows, failures and ``done`` in one transaction, only if the lease is still held."""
        return self.commit_batches([(batch, enriched)])[0] is not None

    def commit_batches(self, items: Sequence[tuple[Batch, Enriched]], calls: int = 0) -> list[int | None]:
        """Several batches in one transaction; each is written only if its lease is still held.
        ``calls`` (the RPC calls made since the worker's previous write) are added to the
        run's in the same transaction, whether or not the leases were still held.

        Returns, per batch, the transactions it newly stored (not those another batch, of
        this group or an earlier commit, stored), or None where it was not written (its
        lease was gone). A batch whose lease is gone (expired
        and taken, or abandoned) writes nothing, the others are unaffected; if the
        transaction fails, none is written. One transaction for several batches writes
        each touched index page once instead of once per batch: the hash-keyed indexes
        take inserts all over, so a batch of 500 dirties most of their leaf pages.
        """
        held = [False] * len(items)
        written: list[Enriched] = []
        stored: list[int | None] = [None] * len(items)
        with self._tx() as cur:
            now = self._now(cur)
            # Rows locked in batch order: two workers' groups cannot deadlock on them.
            for i, (batch, enriched) in sorted(enumerate(items), key=lambda x: x[1][0].id):
                cur.execute(
                    self._sql(
                        "UPDATE batches SET state = 'done', succeeded = succeeded + ?, failed = failed + ?, "
                        f"lease_expires_at = NULL WHERE {_LEASE_HELD}"
                    ),
                    (enriched.own, len(enriched.failures), batch.id, batch.lease_owner,
                     batch.attempts, now),
                )  # fmt: skip
                held[i] = cur.rowcount == 1
                if not held[i]:
                    continue
                self._event(cur, batch.id, batch.lease_owner or "", batch.attempts, "committed", now)
                written.append(_own_moves(batch, enriched))
            new = iter(self._write_results(cur, written, calls, now))
            # written is in batch order too
            for i, _ in sorted(enumerate(items), key=lambda x: x[1][0].id):
                if held[i]:
                    stored[i] = next(new)
        return stored

    def _write_results(
        self, cur: Any, written: Sequence[Enriched], calls: int = 0, now: float | None = None
    ) -> list[int]:
        """Rows, failures and moved keys of batches whose lease was just checked, in one
        write each, and ``calls`` added to the run's (written at ``now``, the leases' clock:
        :meth:`_count_for_run`). Returns, per batch, the transactions it newly stored (a
        transaction two of them hold counts for the first)."""
        merged, dropped = _merged(written)
        inserted = self._upsert(cur, merged.txs, merged.logs) if merged.txs or merged.logs else None
        if inserted is None and dropped:  # all new, each once: _newly_stored counts it once
            inserted = {(t.chain_id, t.tx_hash) for t in merged.txs}
        stored = _newly_stored(written, inserted)
        new = sum(stored)
        self._move_keys(cur, merged)
        failed = self._record_failures(cur, merged)
        # Counted with the rows they count, last (the run's row is locked the shortest): a run
        # killed outright, or a worker killed before it told its coordinator, still has
        # exactly what it wrote in `runs`, and the calls that fetched it.
        self._count_for_run(cur, new, failed, calls, now)
        return stored

    _MOVE_KEY_SQL = (
        "UPDATE refs SET block_number = ? WHERE chain_id = ? AND contract = ? AND tx_hash = ? "
        "AND (block_number IS NULL OR block_number <> ?)"
    )

    def _move_keys(self, cur: Any, enriched: Enriched) -> None:
        """Give the refs in ``enriched.moved`` their transaction's block number (they had
        none, or a wrong one from an import), but only where that transaction is among the
        rows written in this database transaction: a ref whose transaction is stored has
        left the gap, so its key may move even while its contract's plan is open (no batch
        can lose it), and only then."""
        if not enriched.moved:
            return
        blocks = {(t.chain_id, t.tx_hash): t.block_number for t in enriched.txs}
        moves = {(r.block_number, r.chain_id, r.contract, r.tx_hash, r.block_number)
                 for r in enriched.moved
                 if blocks.get((r.chain_id, r.tx_hash)) == r.block_number}  # fmt: skip
        if moves:  # in key order, as every writer of refs: no two can deadlock on them
            cur.executemany(self._sql(self._MOVE_KEY_SQL), sorted(moves, key=_fill_order))

    def fill_block_numbers(self, chain_id: int, contract: str) -> int:
        """Give the contract's refs without a block number the block of their transaction
        where it is stored; returns how many. A batch moves only its own contract's refs
        (see :func:`_own_moves`), so a ref whose transaction another contract's batch
        stored first kept no block number for good. Its transaction is stored, so the ref
        has left the gap and its key may move. Only refs of unknown block are looked at,
        through the gap's key index (their key sorts last), not the contract's every ref."""
        with self._tx() as cur:
            # Each one's transaction looked up by key (a scalar subquery: as a join, PostgreSQL
            # with refs analyzed and transactions not yet hashed every transaction of the chain
            # at every run's end: 130,000 of them for 2,000 refs, 78 ms instead of 9).
            cur.execute(
                self._sql(
                    f"SELECT r.chain_id, r.contract, r.tx_hash, {_STORED_BLOCK} FROM refs r "
                    f"WHERE r.chain_id = ? AND r.contract = ? AND {KEY_SQL} = ?"
                ),
                (chain_id, contract, UNKNOWN_BLOCK_KEY),
            )
            moves = [(b, c, k, h, b) for c, k, h, b in cur.fetchall() if b is not None]
            if moves:  # in key order, as every writer of refs
                cur.executemany(self._sql(self._MOVE_KEY_SQL), sorted(moves, key=_fill_order))
            return len(moves)

    def _give_back(
        self, cur: Any, batch_id: int, owner: str, attempt: int, error: str, event: str, now: float,
        *, only_if_expired: bool = False, not_before: float | None = None, stop: bool = False,
    ) -> bool:
        """Return one lease to the plan if ``owner`` still holds it at ``attempt``; log ``event``.
        A pending batch's ``lease_expires_at`` is ``not_before``: no lease takes it earlier.
        A ``stop``'s give-back (Ctrl+C) is no failed attempt: counted in ``stops``, it leaves
        the batch its retries (:attr:`Batch.tries`)."""
        sql = (
            "UPDATE batches SET state = 'pending', lease_owner = NULL, lease_expires_at = ?, "
            "last_owner = ?, last_error = ?, stops = stops + ? WHERE batch_id = ? "
            "AND state = 'leased' AND lease_owner = ? AND attempts = ?"
        )
        params: list[Any] = [not_before, owner, error[:2000], int(stop), batch_id, owner, attempt]
        if only_if_expired:  # not renewed in the meantime
            sql += " AND lease_expires_at < ?"
            params.append(now)
        cur.execute(self._sql(sql), params)
        if cur.rowcount != 1:
            return False
        self._event(cur, batch_id, owner, attempt, event, now)
        return True

    def abandon(
        self, batch: Batch, error: str, keep: Enriched | None = None, retry_after_s: float = 0.0,
        calls: int = 0, *, stop: bool = False,
    ) -> bool:
        """Give a batch back (failure or shutdown); it is retried by a later lease, taken no
        sooner than ``retry_after_s`` from now.

        ``keep`` is what this attempt got before it failed (rows, and failures that will
        not pass): stored in the same transaction, so the next attempt fetches only the
        refs still in the gap. Nothing is written, and False returned, if the lease is
        no longer this owner's (or, with ``keep``, has expired). ``calls`` are added to the
        run's as by :meth:`commit_batches`, in any case. A ``stop``'s give-back (Ctrl+C,
        SIGTERM) is no failed attempt: the batch keeps its retries (:attr:`Batch.tries`).
        """
        return self.abandon_keeping(batch, error, keep, retry_after_s, calls, stop=stop) is not None

    def abandon_keeping(
        self, batch: Batch, error: str, keep: Enriched | None = None, retry_after_s: float = 0.0,
        calls: int = 0, *, stop: bool = False,
    ) -> GivenBack | None:
        """:meth:`abandon`, saying what of ``keep`` it newly stored and whether that closed
        the batch (None: the batch was not given back, nothing of ``keep`` written)."""
        with self._tx() as cur:
            now = self._now(cur)
            new = 0
            if keep is not None and (keep.txs or keep.failures):
                # The same check as a commit: rows only from a lease still held.
                cur.execute(
                    self._sql(f"UPDATE batches SET succeeded = succeeded + ?, failed = failed + ? "
                              f"WHERE {_LEASE_HELD}"),
                    (keep.own, len(keep.failures), batch.id, batch.lease_owner, batch.attempts, now),
                )  # fmt: skip
                if cur.rowcount != 1:
                    self._count_for_run(cur, 0, 0, calls)
                    return None
                (new,) = self._write_results(cur, [_own_moves(batch, keep)], calls, now)
                if not self._range_in_gap(cur, batch):
                    # All it was planned for is stored (or failed for good): the batch is done,
                    # not a pending one that a plan would count and a lease would take for nothing.
                    cur.execute(
                        self._sql("UPDATE batches SET state = 'done', lease_owner = NULL, "
                                  "lease_expires_at = NULL, last_owner = ? WHERE batch_id = ?"),
                        (batch.lease_owner, batch.id),
                    )  # fmt: skip
                    self._event(cur, batch.id, batch.lease_owner or "", batch.attempts, "committed", now)
                    return GivenBack(new, closed=True)
                calls = 0
            not_before = now + retry_after_s if retry_after_s > 0 else None
            given = self._give_back(cur, batch.id, batch.lease_owner or "", batch.attempts, error,
                                    "abandoned", now, not_before=not_before, stop=stop)  # fmt: skip
            self._count_for_run(cur, 0, 0, calls)  # the run's row last, as in a commit
            return GivenBack(new) if given else None

    def _range_in_gap(self, cur: Any, batch: Batch) -> bool:
        """Whether a ref of ``batch``'s key range is still in the gap, as ``cur`` sees it."""
        sql = f"SELECT 1 FROM refs r WHERE {self._GAP_WHERE}{_key_bound('>=')}{_key_bound('<=')} LIMIT 1"
        cur.execute(self._sql(sql), (batch.chain_id, batch.contract, *batch.lo, batch.lo[0],
                                               *batch.hi, batch.hi[0]))  # fmt: skip
        return cur.fetchone() is not None

    def release_owner(
        self, owner: str, error: str = "worker stopped", keep: Collection[int] = frozenset(),
        *, stop: bool = False,
    ) -> int:
        """Give back every lease ``owner`` holds but the batches in ``keep`` (a worker that
        crashed or was stopped, or one that lost the answer to a lease call); ``stop``: no
        failed attempt, as a stop gives them back (:meth:`abandon`), or a lease whose answer
        was lost (nobody tried the batch)."""
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                self._sql(  # given back, so locked, in batch order
                    f"SELECT batch_id, attempts FROM batches WHERE {_OPEN} AND "
                    "state = 'leased' AND lease_owner = ? ORDER BY batch_id"
                ),
                (owner,),
            )
            held = [(int(b), int(a)) for b, a in cur.fetchall() if int(b) not in keep]
            stop = stop or (bool(held) and self._stopped_owner(cur, owner))
            # Another coordinator may have expired one meanwhile: _give_back re-checks each.
            return sum(self._give_back(cur, b, owner, a, error, "abandoned", now, stop=stop) for b, a in held)

    def _stopped_owner(self, cur: Any, owner: str) -> bool:
        """Whether ``owner`` works for a run that recorded itself stopped (``interrupted``:
        a Ctrl+C, SIGTERM, the grace period's end; not one found killed or crashed,
        :data:`DEAD_RUN_NOTE`). Its worker gave its leases back as it stopped, no failed
        attempt, unless that give-back met the database down (a dropped connection): a lease
        it left is no failed attempt either when it expires or a later run releases it, else
        a few such stops took a healthy batch to its last attempt, split and isolated."""
        m = _OWNER_RUN.search(owner)
        if m is None:
            return False
        cur.execute(self._sql("SELECT 1 FROM runs WHERE run_id = ? AND state = 'interrupted' "
                              "AND (note IS NULL OR note NOT LIKE ?)"),
                    (int(m[1]), DEAD_RUN_NOTE + "%"))  # fmt: skip
        return cur.fetchone() is not None

    def release_dead_local_owners(self) -> dict[int, int]:
        """Give back the leases of this host's processes that are known to be gone (killed,
        crashed, or of an earlier boot): a rerun need not wait for them to expire. Owners
        this process cannot judge (another PID namespace or machine with this host name,
        :func:`liveness.verdict`) are left to expire. Returns the leases given back, per pid."""
        out: dict[int, int] = {}
        for owner, pid, alive in self._local_owners():
            if alive is False:
                n = self.release_owner(owner, "owner process is gone")
                if n:
                    out[pid] = out.get(pid, 0) + n
        return out

    def _local_owners(self) -> Iterator[tuple[str, int, bool | None]]:
        """The lease owners of this host's processes, with the process id each names and
        whether it runs (None: not known from here, :func:`liveness.verdict`)."""
        host = liveness.host()
        for owner in self.lease_owners():
            where, colon, rest = owner.partition(":")
            name, space = liveness.split_owner_host(where)
            if not colon or name != host:
                continue
            try:
                pid = int(rest.split("/", 1)[0])
            except ValueError:
                continue
            yield owner, pid, liveness.verdict(name, space, pid)

    def lease_owners(self) -> list[str]:
        """Owners holding leases now (to find dead local workers)."""
        with self._read() as cur:
            cur.execute(f"SELECT DISTINCT lease_owner FROM batches WHERE {_OPEN} "
                        "AND state = 'leased'")
            return [o for (o,) in cur.fetchall() if o]

    def expired_after(self, after: int) -> tuple[int, list[tuple[int, int, str, int]]]:
        """The newest lease event's id, and the ``expired`` events after event ``after``, as
        (event id, batch id, owner, attempt), oldest first: the leases taken back, by a
        coordinator or by a worker that leased a batch whose lease had expired
        (:meth:`lease_next`). A coordinator watches them to kill a local worker whose lease
        another process took."""
        with self._read() as cur:
            cur.execute("SELECT max(event_id) FROM lease_events")
            row = cur.fetchone()
            top = int(row[0]) if row is not None and row[0] is not None else 0
            cur.execute(
                self._sql("SELECT event_id, batch_id, owner, attempt FROM lease_events "
                          "WHERE event_id > ? AND event = 'expired' ORDER BY event_id"),
                (after,),
            )  # fmt: skip
            return top, [(int(e), int(b), str(o), int(a)) for e, b, o, a in cur.fetchall()]

    def expire_leases(self, owner_prefix: str | None = None) -> list[Batch]:
        """Take back leases past their expiry (optionally only local owners').

        Coordinators call this every second, and almost always nothing has expired: a
        read looks first, so that on SQLite the write lock (which a worker's commit would
        wait for) is taken only when there is something to take back.
        """
        with self._read() as cur:
            cur.execute(
                self._sql(f"SELECT 1 FROM batches WHERE {_OPEN} AND state = 'leased' "
                          "AND lease_expires_at < ? LIMIT 1"),
                (self._now(cur),),
            )
            if cur.fetchone() is None:
                return []
        with self._tx() as cur:
            now = self._now(cur)
            cur.execute(
                self._sql(
                    f"SELECT {self._BATCH_COLS} FROM batches WHERE {_OPEN} "
                    "AND state = 'leased' AND lease_expires_at < ? ORDER BY batch_id"  # locked in batch order
                ),
                (now,),
            )
            rows = [self._batch(r) for r in cur.fetchall()]
            out = []
            for b in rows:
                if owner_prefix is not None and not (b.lease_owner or "").startswith(owner_prefix):
                    continue
                owner = b.lease_owner or ""
                if self._give_back(cur, b.id, owner, b.attempts, "lease expired", "expired", now,
                                   only_if_expired=True, stop=self._stopped_owner(cur, owner)):  # fmt: skip
                    out.append(b)
            return out

    def lease_events(self, batch_id: int | None = None) -> list[LeaseEvent]:
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT batch_id, owner, attempt, event, at FROM lease_events "
                    "WHERE (CAST(? AS BIGINT) IS NULL OR batch_id = ?) ORDER BY event_id"
                ),
                (batch_id, batch_id),
            )
            return [LeaseEvent(int(b), o, int(a), e, float(t)) for b, o, a, e, t in cur.fetchall()]

    # -- pruning finished plans ----------------------------------------------------------

    def finished_plans(self, older_than_s: float) -> list[FinishedPlan]:
        """The plans that are over and were last worked on more than ``older_than_s`` ago, by
        the lowest batch id: none of their batches is open (pending or leased: a done batch
        never reopens), the run that planned them is not ``running`` and ended before then,
        their last lease event is older, and no run still marked ``running`` wrote any of
        their events (a run killed outright is dated by its last one when a later run marks
        it, :meth:`_last_seen`). It reads every batch and lease event, once: a command's
        housekeeping, not something a run does."""
        with self._read() as cur:
            cutoff = self._now(cur) - older_than_s
            cur.execute("SELECT run_id FROM runs WHERE state = 'running'")
            running = [int(r) for (r,) in cur.fetchall()]
            # Run ids are integers: nothing in the patterns needs escaping.
            busy = " OR ".join(_BY_RUN.format(run=r) for r in running) or "1 = 0"
            cur.execute(
                self._sql(f"""
                SELECT p.run_id, p.chain_id, p.contract, p.batches, p.events, p.lo, p.hi FROM (
                    SELECT b.run_id, b.chain_id, b.contract, count(DISTINCT b.batch_id) AS batches,
                           count(e.event_id) AS events, min(b.batch_id) AS lo, max(b.batch_id) AS hi,
                           max(e.at) AS last_at,
                           max(CASE WHEN b.state IN ('pending', 'leased') THEN 1 ELSE 0 END) AS open_,
                           max(CASE WHEN {busy} THEN 1 ELSE 0 END) AS busy
                    FROM batches b LEFT JOIN lease_events e ON e.batch_id = b.batch_id
                    GROUP BY b.run_id, b.chain_id, b.contract
                ) p LEFT JOIN runs r ON r.run_id = p.run_id
                WHERE p.open_ = 0 AND p.busy = 0 AND (p.last_at IS NULL OR p.last_at < ?)
                  AND (r.run_id IS NULL OR (r.state <> 'running'
                                            AND COALESCE(r.finished_at, r.started_at) < ?))
                ORDER BY p.lo"""),
                (cutoff, cutoff),
            )  # fmt: skip
            return [FinishedPlan(int(r), int(c), a, int(b), int(e), int(lo), int(hi))
                    for r, c, a, b, e, lo, hi in cur.fetchall()]  # fmt: skip

    def delete_plans(self, plans: Sequence[FinishedPlan]) -> Pruned:
        """Delete the batches of ``plans`` (from :meth:`finished_plans`) and their lease
        events, in one transaction: a plan goes whole or not at all. Removals and other prunes
        wait (the removal lock: a removal locks a contract's batches, then deletes their
        events, and a prune deleting events first deadlocked with it); nothing else writes a
        done batch. A plan one of whose batches is open again is left (none can be)."""
        if not plans:
            return Pruned()
        with self._tx() as cur:
            self._removal_lock(cur)
            wanted = {(p.run_id, p.chain_id, p.contract) for p in plans}
            # One read of the batch ids the plans span (by primary key), kept to theirs.
            cur.execute(
                self._sql("SELECT batch_id, run_id, chain_id, contract, state FROM batches "
                          "WHERE batch_id >= ? AND batch_id <= ?"),
                (min(p.lo for p in plans), max(p.hi for p in plans)),
            )  # fmt: skip
            ids: dict[tuple[int, int, str], list[int]] = {}
            reopened = set()
            for b, r, c, a, state in cur.fetchall():
                key = (int(r), int(c), a)
                if key in wanted:
                    ids.setdefault(key, []).append(int(b))
                    if state in ("pending", "leased"):
                        reopened.add(key)
            doomed = sorted(b for key, batch_ids in ids.items() if key not in reopened for b in batch_ids)
            events = batches = 0
            for i in range(0, len(doomed), 500):  # within any SQLite's limit of parameters
                some = doomed[i:i + 500]
                # The range of ids too, which the indexes answer whatever the statistics say:
                # with none (a table never analyzed), PostgreSQL read all of each table for
                # every list (100,000 batches, 400,000 events: 17-19 s a prune, now 4-6).
                where = f"batch_id >= ? AND batch_id <= ? AND batch_id IN ({', '.join('?' for _ in some)})"
                for table in ("lease_events", "batches"):
                    cur.execute(self._sql(f"DELETE FROM {table} WHERE {where}"), [some[0], some[-1], *some])
                    if table == "batches":
                        batches += int(cur.rowcount)
                    else:
                        events += int(cur.rowcount)
            return Pruned(len(ids) - len(reopened), batches, events)

    def lease_outcomes(self, batches: Sequence[Batch]) -> dict[int, str]:
        """How the lease each of ``batches`` names (its owner and attempt) stands, by batch id:
        ``committed`` or ``abandoned`` if it ended so (its event), ``leased`` if it is still
        held and has not expired; batches of neither are left out. A worker whose write lost
        its answer (the connection dropped as it committed) asks this to learn whether that
        write landed. An expired lease is neither: a write made after it expired wrote no rows
        (the writes' lease check, :data:`_LEASE_HELD`, tests expiry) yet added its calls, so
        it cannot tell; and a lease that has expired is never renewed."""
        out: dict[int, str] = {}
        with self._read() as cur:
            now = self._now(cur)
            for b in batches:
                cur.execute(
                    self._sql("SELECT event FROM lease_events WHERE batch_id = ? AND owner = ? "
                              "AND attempt = ? AND event IN ('committed', 'abandoned') "
                              "ORDER BY event_id DESC LIMIT 1"),
                    (b.id, b.lease_owner, b.attempts),
                )  # fmt: skip
                row = cur.fetchone()
                if row is None:
                    cur.execute(
                        self._sql(f"SELECT 'leased' FROM batches WHERE {_LEASE_HELD}"),
                        (b.id, b.lease_owner, b.attempts, now),
                    )  # fmt: skip
                    row = cur.fetchone()
                if row is not None:
                    out[b.id] = str(row[0])
        return out

    # -- reading rows back (tests, demo, status) -------------------------------------

    def fetch_transactions(self, chain_id: int, hashes: Sequence[str] | None = None,
                           limit: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Rows of ``transactions`` as dicts with ints and parsed JSON (for display and checks)."""
        cols = ", ".join(TX_COLUMNS)
        sql = f"SELECT {cols} FROM transactions WHERE chain_id = ?"
        params: list[Any] = [chain_id]
        if hashes is not None:
            sql += f" AND tx_hash IN ({', '.join('?' for _ in hashes)})"
            params += list(hashes)
        sql += " ORDER BY block_number, tx_index"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._read() as cur:
            cur.execute(self._sql(sql), params)
            return [_row_dict(TX_COLUMNS, r) for r in cur.fetchall()]

    def fetch_logs(self, chain_id: int, tx_hash: str | None = None,
                   limit: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
        cols = ", ".join(LOG_COLUMNS)
        sql = f"SELECT {cols} FROM logs WHERE chain_id = ? AND (CAST(? AS TEXT) IS NULL OR tx_hash = ?)"
        sql += " ORDER BY block_number, tx_hash, log_index"
        params: list[Any] = [chain_id, tx_hash, tx_hash]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._read() as cur:
            cur.execute(self._sql(sql), params)
            return [_row_dict(LOG_COLUMNS, r) for r in cur.fetchall()]

    # -- decoding stored rows again (a contract's ABI given or changed) ----------

    def _rows_of(
        self, table: str, columns: str, where: str, chain_id: int, address: str, chunk: int
    ) -> Iterator[list[tuple[Any, ...]]]:
        """``columns`` of ``table``'s rows where ``where`` (a column) is ``address``, in chunks
        of transactions, each read in its own transaction (the caller writes between them)."""
        with self._read() as cur:
            cur.execute(self._sql(f"SELECT DISTINCT tx_hash FROM {table} WHERE chain_id = ? "
                                  f"AND {where} = ?"), (chain_id, address))  # fmt: skip
            hashes = sorted(h for (h,) in cur.fetchall())
        for i in range(0, len(hashes), chunk):
            part = hashes[i : i + chunk]
            with self._read() as cur:
                marks = ", ".join("?" for _ in part)
                cur.execute(self._sql(f"SELECT {columns} FROM {table} WHERE chain_id = ? AND "
                                      f"{where} = ? AND tx_hash IN ({marks})"),
                            [chain_id, address, *part])  # fmt: skip
                rows = [tuple(r) for r in cur.fetchall()]
            yield rows

    def stored_calls(
        self, chain_id: int, address: str, chunk: int = 2_000
    ) -> Iterator[list[tuple[str, str]]]:
        """``(tx_hash, input)`` of the stored transactions sent to ``address``, in chunks."""
        for rows in self._rows_of("transactions", "tx_hash, input", "to_address", chain_id, address, chunk):
            yield [(h, data) for h, data in rows]

    def stored_logs(
        self, chain_id: int, address: str, chunk: int = 2_000
    ) -> Iterator[list[tuple[str, int, list[str], str]]]:
        """``(tx_hash, log_index, topics, data)`` of the stored logs ``address`` emitted, in
        chunks of transactions."""
        columns = "tx_hash, log_index, topic0, topic1, topic2, topic3, data"
        for rows in self._rows_of("logs", columns, "address", chain_id, address, chunk):
            yield [(h, int(i), [t for t in (t0, t1, t2, t3) if t is not None], data)
                   for h, i, t0, t1, t2, t3, data in rows]  # fmt: skip

    def set_decoded_calls(
        self,
        chain_id: int,
        rows: Sequence[tuple[str, str | None, dict[str, Any] | None]],
        asked: tuple[str, int] | None = None,
    ) -> bool:
        """``(tx_hash, method_name, method_args)``: the call data as decoded now. ``asked``:
        see :meth:`_still_asked`; False (nothing written) when it is not."""
        with self._tx() as cur:
            if not self._still_asked(cur, chain_id, asked):
                return False
            cur.executemany(
                self._sql("UPDATE transactions SET method_name = ?, method_args = ? "
                          "WHERE chain_id = ? AND tx_hash = ?"),
                [(name, json_text(args), chain_id, h) for h, name, args in rows],
            )  # fmt: skip
        return True

    def set_decoded_logs(
        self,
        chain_id: int,
        rows: Sequence[tuple[str, int, str | None, dict[str, Any] | None]],
        asked: tuple[str, int] | None = None,
    ) -> bool:
        """``(tx_hash, log_index, event_name, event_args)``: the logs as decoded now.
        ``asked``: see :meth:`_still_asked`; False (nothing written) when it is not."""
        with self._tx() as cur:
            if not self._still_asked(cur, chain_id, asked):
                return False
            cur.executemany(
                self._sql("UPDATE logs SET event_name = ?, event_args = ? "
                          "WHERE chain_id = ? AND tx_hash = ? AND log_index = ?"),
                [(name, json_text(args), chain_id, h, i) for h, i, name, args in rows],
            )  # fmt: skip
        return True

    def _still_asked(self, cur: Any, chain_id: int, asked: tuple[str, int] | None) -> bool:
        """Whether contract ``asked[0]`` is still at the ``redecode_asked`` (``asked[1]``) a
        re-decode read with its ABI: if not, a newer ABI (or a later ask) is being done by
        another re-decode, which rows decoded with this one must not overwrite. The no-op
        update locks the contract's row until the caller's transaction ends, so the ABI
        cannot change between this check and the write."""
        if asked is None:
            return True
        cur.execute(self._sql("UPDATE contracts SET redecode_asked = redecode_asked WHERE chain_id = ? "
                              "AND address = ? AND redecode_asked = ?"), (chain_id, *asked))  # fmt: skip
        return bool(cur.rowcount == 1)


def _row_dict(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col, v in zip(columns, row, strict=True):
        if v is not None and col in BIG_INT_COLUMNS:
            v = int(v)
        elif col in JSON_COLUMNS:
            v = json_value(v)
        out[col] = v
    return out

