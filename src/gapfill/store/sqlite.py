"""SQLite backend: the embedded default, for one machine.

WAL mode lets readers (``status``) run beside the writer; every write is one
``BEGIN IMMEDIATE`` transaction, which is also how leases are claimed: SQLite
has one writer at a time, so an immediate transaction is a table lock.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from gapfill.errors import StoreError
from gapfill.model import LogRow, Ref, RefKey, TxRow
from gapfill.store.base import (
    BIG_INT_COLUMNS,
    DB_CHECK,
    JSON_COLUMNS,
    KEY_SQL,
    LOG_COLUMNS,
    TX_COLUMNS,
    RefsAdded,
    Store,
    check_row_tuples,
    migrated,
    migrations,
)

_UPDATE_TX = ", ".join(f"{c} = excluded.{c}" for c in TX_COLUMNS[2:])
_UPDATE_LOG = ", ".join(f"{c} = excluded.{c}" for c in LOG_COLUMNS[3:])
_INSERT_TX = (
    f"INSERT INTO transactions ({', '.join(TX_COLUMNS)}) VALUES "
    f"({', '.join('?' for _ in TX_COLUMNS)}) ON CONFLICT (chain_id, tx_hash) DO UPDATE SET {_UPDATE_TX}"
)
_INSERT_LOG = (
    f"INSERT INTO logs ({', '.join(LOG_COLUMNS)}) VALUES ({', '.join('?' for _ in LOG_COLUMNS)}) "
    f"ON CONFLICT (chain_id, tx_hash, log_index) DO UPDATE SET {_UPDATE_LOG}"
)
_LAST_TX_ROWID = "SELECT COALESCE(MAX(rowid), 0) FROM transactions"
#: A ref's first row inserts it; a later one giving another block number updates the ref to
#: itself, a change SQLite counts: an import learns that some row disagreed with the block
#: number kept without looking a ref up (a row that agrees, or gives none, changes nothing).
#: The column set is one no index holds, so only the row is written again, not an index.
_INSERT_REF = (
    "INSERT INTO refs (chain_id, contract, tx_hash, block_number, source) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (chain_id, contract, tx_hash) DO UPDATE SET source = refs.source "
    "WHERE refs.block_number <> excluded.block_number"
)
_LAST_REF_ROWID = "SELECT COALESCE(MAX(rowid), 0) FROM refs"


def _big(v: int | None) -> str | None:
    return None if v is None else str(v)


def _json(v: Any) -> str | None:
    return None if v is None else orjson.dumps(v).decode()


def _tx_tuple(t: TxRow) -> tuple[Any, ...]:
    """A row in TX_COLUMNS order: big integers as decimal text, JSON columns as text."""
    return (
        t.chain_id, t.tx_hash, t.block_number, t.block_hash, t.tx_index, t.block_timestamp,
        t.from_address, t.to_address, _big(t.value), t.input, _big(t.nonce), _big(t.gas),
        _big(t.gas_price), _big(t.max_fee_per_gas), _big(t.max_priority_fee_per_gas), t.tx_type,
        t.status, t.root, _big(t.gas_used), _big(t.cumulative_gas_used), _big(t.effective_gas_price),
        t.created_contract, _json(t.access_list), _big(t.max_fee_per_blob_gas),
        _json(t.blob_versioned_hashes), _big(t.blob_gas_used), _big(t.blob_gas_price),
        _json(t.authorization_list), t.method_id, t.method_name, _json(t.method_args), t.log_count,
    )  # fmt: skip


def _log_tuple(g: LogRow) -> tuple[Any, ...]:
    return (g.chain_id, g.tx_hash, g.log_index, g.block_number, g.address, g.topic0, g.topic1,
            g.topic2, g.topic3, g.data, g.event_name, _json(g.event_args))  # fmt: skip


check_row_tuples(_tx_tuple, _log_tuple, big=BIG_INT_COLUMNS, json=JSON_COLUMNS)


#: The page cache, in KiB: a connection's usual, and an import's (see ``add_refs``).
CACHE_KIB = 32_768
IMPORT_CACHE_KIB = 131_072
#: Page size of a new database file, and the WAL size that triggers a checkpoint.
PAGE_SIZE = 16_384
WAL_CHECKPOINT_BYTES = 40 * 1024 * 1024


def sqlite_path(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs.db`` -> ``/abs.db``."""
    rest = url[len("sqlite://") :]
    if not rest.startswith("/"):
        raise StoreError(
            f"cannot read the SQLite URL {url!r}: write it as sqlite:///path/to/file.db"
        )
    path = rest[1:]
    if not path:
        raise StoreError("the SQLite URL names no file: write it as sqlite:///path/to/file.db")
    cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        # It would otherwise name a file "x.db?mode=ro", silently.
        raise StoreError(
            f"the SQLite URL has parameters ({url[cut:]!r}), which gapfill does not take: "
            "write it as sqlite:///path/to/file.db"
        )
    return path


#: How long a transaction waits for another process's write lock before saying so, and
#: how long it waits in all before it gives up.
LOCK_NOTICE_S = 2.0
LOCK_WAIT_S = 60.0


def _code(exc: sqlite3.Error) -> int:
    """The primary result code of a failed call."""
    return int(getattr(exc, "sqlite_errorcode", 0)) & 0xFF


def _busy(exc: sqlite3.Error) -> bool:
    return _code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _read_only(exc: sqlite3.Error) -> bool:
    return _code(exc) == sqlite3.SQLITE_READONLY


def _locked(path: str) -> str:
    return f"another process holds a write lock on {path}: stop it, or wait for it to finish, then rerun"


def _unwritable(path: str) -> str | None:
    """The first of the database file and the ``-wal`` and ``-shm`` files beside it that
    exists and that this process may not write."""
    for p in (path, path + "-wal", path + "-shm"):
        if os.path.exists(p) and not os.access(p, os.W_OK):
            return p
    return None


def _read_only_file(path: str, check: str = DB_CHECK) -> str:
    side = _unwritable(path)
    if side is not None and side != path:  # left by a reader as read-only as the file was
        return (f"the file {side} beside the SQLite database {path} is read-only: make it "
                f"writable, or set {check} to another database")  # fmt: skip
    return (f"the SQLite database {path} is read-only (the file or its folder): make it writable, "
            f"or set {check} to another database")


def _hint(exc: sqlite3.Error, check: str = DB_CHECK) -> str:
    """What to do about a failed write, for the errors a user can fix (``check``: where the
    database URL came from)."""
    text = str(exc).lower()
    if "disk is full" in text:
        return (f"; free space on that disk (or move the database and set {check} to it), then rerun "
                "the same command: what was committed is kept")  # fmt: skip
    if "readonly" in text or "read-only" in text:
        return f"; the file or its folder is read-only: make it writable, or set {check} to another database"
    if "locked" in text or "busy" in text:
        return "; another program holds the database: wait for it, or stop it, then rerun"
    return ""


class SqliteStore(Store):
    backend = "sqlite"
    _HAS_SCHEMA_TABLE = (
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    )

    def __init__(self, url: str, *, read_only: bool = False, lock_wait_s: float = LOCK_WAIT_S,
                 check: str = DB_CHECK) -> None:  # fmt: skip
        """``read_only``: open the file for reading only (it, or its folder, may be read-only);
        ``lock_wait_s``: how long a write waits for another process's lock; ``check``: where
        ``url`` came from, as messages name it."""
        self.url = url
        self.check = check
        self.display_url = url
        self.path = sqlite_path(url)
        self.lock_wait_s = lock_wait_s
        if self.path != ":memory:":
            parent = Path(self.path).resolve().parent
            if not parent.is_dir():
                raise StoreError(
                    f"cannot open the SQLite database {self.path}: folder {parent} does not "
                    f"exist; create it, or check {check}"
                )
        if not read_only and os.path.exists(self.path) and _unwritable(self.path):
            # Said before SQLite opens it: it would leave a -wal and a -shm file beside it.
            raise StoreError(_read_only_file(self.path, self.check))
        try:
            if read_only and self.path != ":memory:":
                self._conn = self._open_read_only()
            else:
                self._conn = self._connect(self.path)
                self._writable_settings()
        except sqlite3.Error as exc:
            if _busy(exc):
                raise StoreError(_locked(self.path)) from exc
            if _read_only(exc):
                raise StoreError(_read_only_file(self.path, self.check)) from exc
            raise StoreError(
                f"cannot open the SQLite database {self.path}: {exc}; check {check}: "
                "it must name a SQLite file, or a new one, in a folder you can write to"
            ) from exc
        self._depth = 0

    def _connect(self, target: str, uri: bool = False) -> sqlite3.Connection:
        # A lock another process holds is waited for in short steps (see _begin), so that the
        # wait is said after LOCK_NOTICE_S instead of ending, silent, after LOCK_WAIT_S.
        notice_s = min(LOCK_NOTICE_S, self.lock_wait_s)
        conn = sqlite3.connect(
            target, timeout=notice_s, isolation_level=None, check_same_thread=False, uri=uri
        )
        conn.execute(f"PRAGMA busy_timeout={int(notice_s * 1000)}")
        return conn

    def _open_read_only(self) -> sqlite3.Connection:
        """A read-only connection. SQLite reads a WAL-mode file through its ``-shm`` index,
        which it creates beside the file with a ``-wal`` (as read-only as the file), and
        only a writer removes them: the last connection to close checkpoints the ``-wal``
        and deletes both, unless it was opened read-only (``mode=ro``), which leaves them.
        So a file this process may write, in a folder it may write, is opened for writing,
        with ``query_only`` (no statement can write): as the last to close it leaves what a
        writer leaves, nothing, and while another connection is open (a run) it leaves
        both to it. A file this process may not write, with no transaction pending beside
        it, is opened as immutable: it leaves nothing behind. So is one in a read-only
        folder without an index (nothing can be writing it)."""
        if self._writable_here():
            conn = self._connect(self.path)
            try:
                conn.execute("PRAGMA query_only=ON")
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # is it SQLite?
                return conn
            except sqlite3.Error:
                conn.close()
                raise
        target = "file:" + urllib.parse.quote(str(Path(self.path).resolve()))
        if not os.access(self.path, os.W_OK) and not self._pending():
            return self._connect(target + "?mode=ro&immutable=1", uri=True)
        conn = self._connect(target + "?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.Error as exc:
            conn.close()
            no_index = _read_only(exc) or _code(exc) == sqlite3.SQLITE_CANTOPEN  # cannot create it
            if not no_index or self._pending():
                raise
        return self._connect(target + "?mode=ro&immutable=1", uri=True)

    def _writable_here(self) -> bool:
        """Whether the file exists (a reader must not create one) and this process may write
        it, the ``-wal`` and ``-shm`` beside it, and its folder (to create and delete them)."""
        path = Path(self.path)
        return (path.is_file() and os.access(path.resolve().parent, os.W_OK | os.X_OK)
                and _unwritable(self.path) is None)  # fmt: skip

    def _pending(self) -> bool:
        """Whether committed pages may wait beside the file, in a ``-wal`` (or a crashed
        writer's ``-journal``) with content: the file alone is then not the database."""
        for suffix in ("-wal", "-journal"):
            side = Path(self.path + suffix)
            if side.exists() and side.stat().st_size > 0:
                return True
        return False

    def _writable_settings(self) -> None:
        conn = self._conn
        # A new file gets 16 KiB pages (SQLite's default is 4 KiB; an existing file
        # keeps its own). Measured on batch commits of ~700-byte rows into
        # hash-keyed indexes, the committing thread spends ~10% less CPU (80,000
        # transactions from anvil, three runs each: 1.95 s against 1.76 s); 8 KiB
        # gave less, 1-2 KiB cost more. Only an empty file takes it, and only before
        # WAL mode is set.
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # CPU per stored row (bench/hotpath.py, ~100k rows): a 32 MiB page cache instead
        # of 2 MiB keeps the indexes' hot pages in memory, and checkpointing every
        # ~40 MB of WAL instead of every 1,000 pages copies a page rewritten by several
        # batches once: together -22%. Consistency is unchanged (a batch's rows and its
        # `done` still commit together); with synchronous=NORMAL, what a power cut may
        # roll back is what was committed since the last checkpoint.
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_BYTES // page}")

    def close(self) -> None:
        self._conn.close()

    def _sql(self, sql: str) -> str:
        return sql

    def _now(self, cur: Any) -> float:
        return time.time()

    def _read(self) -> Any:
        return self._tx(immediate=False)

    def _begin(self, cur: sqlite3.Cursor, immediate: bool) -> None:
        """Begin a transaction; a write waits for another process's write lock up to
        ``lock_wait_s``, and says so (``notice``) once it has waited LOCK_NOTICE_S."""
        waiting_since: float | None = None
        while True:
            try:
                cur.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                return
            except sqlite3.Error as exc:
                if _read_only(exc):
                    raise StoreError(_read_only_file(self.path, self.check)) from exc
                if not _busy(exc):
                    raise StoreError(f"the SQLite database {self.path} is not usable: {exc}") from exc
                now = time.monotonic()
                if waiting_since is None:
                    waiting_since = now - min(LOCK_NOTICE_S, self.lock_wait_s)  # SQLite waited that
                    if self.notice is not None:
                        self.notice(f"the SQLite database {self.path} is locked by another process: "
                                    f"waiting up to {self.lock_wait_s:g} s for it")  # fmt: skip
                if now - waiting_since >= self.lock_wait_s:
                    raise StoreError(_locked(self.path)) from exc

    @contextmanager
    def _tx(self, immediate: bool = True) -> Iterator[sqlite3.Cursor]:
        cur = self._conn.cursor()
        try:
            self._begin(cur, immediate)
        except BaseException:
            cur.close()
            raise
        try:
            yield cur
        except sqlite3.Error as exc:
            self._conn.rollback()
            if _read_only(exc):
                raise StoreError(_read_only_file(self.path, self.check)) from exc
            doing = "writing to" if immediate else "reading from"
            raise StoreError(f"{doing} {self.path} failed: {exc}{_hint(exc, self.check)}") from exc
        except BaseException:
            self._conn.rollback()
            raise
        else:
            try:
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                self._conn.rollback()
                raise StoreError(f"writing to {self.path} failed: {exc}{_hint(exc, self.check)}") from exc
        finally:
            cur.close()

    def migrate(self) -> int:
        with self._tx() as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            current = int(cur.fetchone()[0])
            for version, sql in migrations("sqlite"):
                if version <= current:
                    continue
                started = time.perf_counter()
                for statement in _split(sql):
                    cur.execute(statement)
                cur.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
                migrated(self.path, version, started)
                current = version
            return current

    @contextmanager
    def _big_cache(self) -> Iterator[None]:
        """The import's page cache (IMPORT_CACHE_KIB) for one transaction that touches refs
        all over their hash-keyed indexes; the usual one again after it."""
        self._conn.execute(f"PRAGMA cache_size=-{IMPORT_CACHE_KIB}")
        try:
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")

    def add_refs(self, refs: Iterable[Ref]) -> RefsAdded:
        # Hashes are random: each new ref lands on a random page of the two hash-keyed
        # indexes, and with the usual 32 MiB cache a big import rereads most of them (1M
        # refs: 24 s). 128 MiB for the import's one transaction: 16 s, ~170 MB peak RSS.
        with self._big_cache(), self._tx() as cur:
            added = RefsAdded(0, 0)
            checked: set[tuple[int, str]] = set()
            unknown: dict[tuple[int, str], bool] = {}
            conflicts = _Conflicts(cur)
            cur.execute(_LAST_REF_ROWID)
            (self._import_after,) = cur.fetchone()
            self._unknown_given = False
            try:
                chunk: list[Ref] = []
                for r in refs:
                    chunk.append(r)
                    if len(chunk) >= 10_000:
                        added += self._write_chunk(cur, chunk, checked, unknown, conflicts)
                        chunk = []
                if chunk:
                    added += self._write_chunk(cur, chunk, checked, unknown, conflicts)
            finally:
                self._import_after = None
            return replace(added, conflicts=conflicts.count())

    def _write_chunk(
        self, cur: Any, chunk: Sequence[Ref], checked: set[tuple[int, str]],
        unknown: dict[tuple[int, str], bool], conflicts: _Conflicts,
    ) -> RefsAdded:
        """Write one chunk of an import in file order: a ref's first row inserts it, later
        ones leave its block number as it is. Only when a row disagreed with it (counted by
        :data:`_INSERT_REF`), or a fill took the first of two rows giving one, are the
        chunk's refs looked up to count those that disagreed: none in an import of new
        hashes, or of hashes known already with the same block numbers."""
        disagreed, late = self._disagreed, self._late
        added = self._write_refs(cur, chunk, checked, unknown)
        if self._disagreed > disagreed or ((added.filled or self._late > late) and _repeats(chunk)):
            conflicts.note(chunk)  # the rare case: which refs, each counted once
        return added

    #: A removal deletes refs in primary-key order (contract, then hash), which is also the
    #: order of the (chain_id, tx_hash) index: two of the refs' four b-trees are swept in
    #: order instead of the one SQLite's own choice (the key index) would sweep.
    _REMOVE_REFS_FROM = "refs INDEXED BY sqlite_autoindex_refs_1"
    #: Without statistics, SQLite looks a transaction's refs up through refs_key, which
    #: covers the columns asked but is searched by chain alone: every ref of the chain read
    #: per lookup, instead of one probe of refs_tx_hash.
    _REFS_BY_TX = "refs r INDEXED BY refs_tx_hash"

    def remove_contract(self, chain_id: int, address: str) -> dict[str, int]:
        # Deleting a contract's refs removes an entry at a random place of the hash-keyed
        # indexes per ref, as an import adds one: with the usual cache, 500,000 refs (shuffled
        # on disk) took 20 s; with the import's cache and in primary-key order, 6 s.
        with self._big_cache():
            return super().remove_contract(chain_id, address)

    #: Rows of refs written so far that gave a ref already there another block number
    #: (:data:`_INSERT_REF`); an import compares it before and after each chunk.
    _disagreed = 0
    #: During an import, the last rowid of refs before it: the refs it inserted come after.
    _import_after: int | None = None
    #: Whether the import inserted a row without a block number so far.
    _unknown_given = False
    #: Refs this import inserted without a block number that a later row of it gave one.
    _late = 0

    def _insert_refs(self, cur: Any, refs: Sequence[Ref]) -> int:
        # An update counts as a change too; rowids tell the inserted rows, as in _upsert:
        # SQLite gives each the largest rowid + 1, and this writer deletes none meanwhile.
        before = self._conn.total_changes
        cur.execute(_LAST_REF_ROWID)
        (last,) = cur.fetchone()
        cur.executemany(
            _INSERT_REF,
            [(r.chain_id, r.contract, r.tx_hash, r.block_number, r.source) for r in refs],
        )
        cur.execute(_LAST_REF_ROWID)
        new = int(cur.fetchone()[0]) - int(last)
        self._disagreed += self._conn.total_changes - before - new
        if self._import_after is not None:
            self._give_first_blocks(cur, refs)
        return new

    def _give_first_blocks(self, cur: Any, refs: Sequence[Ref]) -> None:
        """A ref this import inserted from a row without a block number takes the first a
        later row of it gives, as PostgreSQL's staged import does, even while its contract
        has an open plan: no batch has seen it (the fill of refs stored before waits for the
        plan's end). Only in an import with such rows: one probe per row giving a block."""
        if not self._unknown_given:
            self._unknown_given = any(r.block_number is None for r in refs)
            if not self._unknown_given:
                return
        before = self._conn.total_changes
        cur.executemany(  # in file order: the first row giving one wins
            "UPDATE refs SET block_number = ? WHERE chain_id = ? AND contract = ? AND tx_hash = ? "
            "AND block_number IS NULL AND rowid > ?",
            [(r.block_number, r.chain_id, r.contract, r.tx_hash, self._import_after)
             for r in refs if r.block_number is not None],
        )  # fmt: skip
        self._late += self._conn.total_changes - before

    def _stored_blocks(self, cur: Any, chain_id: int, hashes: Sequence[str]) -> dict[str, int]:
        cur.execute(
            "SELECT tx_hash, block_number FROM transactions WHERE chain_id = ? "
            "AND tx_hash IN (SELECT value FROM json_each(?))",
            (chain_id, orjson.dumps(hashes).decode()),
        )
        return {h: int(b) for h, b in cur.fetchall()}

    def _upsert(
        self, cur: Any, txs: Sequence[TxRow], logs: Sequence[LogRow]
    ) -> set[tuple[int, str]] | None:
        inserted: set[tuple[int, str]] | None = None
        if txs:
            # An upsert's update counts as a change too, so changes() cannot tell inserted rows
            # from updated ones; rowids do: SQLite gives an inserted row the largest rowid + 1,
            # an update keeps its row's, and nothing deletes transactions meanwhile (this is
            # the one writer). Two lookups of the rowid b-tree's last entry per write; the
            # inserted rows are listed only when some row was not new.
            cur.execute(_LAST_TX_ROWID)
            (before,) = cur.fetchone()
            cur.executemany(_INSERT_TX, [_tx_tuple(t) for t in txs])
            cur.execute(_LAST_TX_ROWID)
            if cur.fetchone()[0] - before != len(txs):
                cur.execute("SELECT chain_id, tx_hash FROM transactions WHERE rowid > ?", (before,))
                inserted = {(int(c), h) for c, h in cur.fetchall()}
        if logs:
            cur.executemany(_INSERT_LOG, [_log_tuple(g) for g in logs])
        return inserted

    def _plan_lock(self, cur: Any) -> None:
        # BEGIN IMMEDIATE already holds SQLite's single write lock.
        return None

    def _gap_keys(self, cur: Any, chain_id: int, contract: str) -> Iterator[RefKey]:
        read = self._conn.cursor()
        try:
            read.execute(
                f"SELECT {KEY_SQL}, r.tx_hash FROM refs r WHERE {self._GAP_WHERE} "
                f"ORDER BY {KEY_SQL}, r.tx_hash",
                (chain_id, contract),
            )
            while rows := read.fetchmany(10_000):
                for k, h in rows:
                    yield (int(k), h)
        finally:
            read.close()


def _repeats(chunk: Sequence[Ref]) -> bool:
    """Whether two of ``chunk``'s rows give a block number for one ref (which one a fill
    kept is then the first: the others may disagree with it)."""
    given = [(r.chain_id, r.contract, r.tx_hash) for r in chunk if r.block_number is not None]
    return len(set(given)) < len(given)


class _Conflicts:
    """The refs of one import given a block number other than the one they kept, each
    counted once however many of its rows disagree: the keys go to a temporary table (in
    the import's transaction), since a corrected file imported again may disagree on every
    one of a million refs, too many to hold in memory."""

    def __init__(self, cur: sqlite3.Cursor) -> None:
        self._cur = cur
        self._table = False

    def note(self, chunk: Sequence[Ref]) -> None:
        """Note those of ``chunk``'s refs whose block number differs from the one stored."""
        given: dict[tuple[int, str], list[Ref]] = {}
        for r in chunk:
            if r.block_number is not None:
                given.setdefault((r.chain_id, r.contract), []).append(r)
        differ: set[tuple[int, str, str]] = set()
        for (chain_id, contract), rs in given.items():
            # By primary key: one probe of a page the insert just read.
            self._cur.execute(
                "SELECT tx_hash, block_number FROM refs INDEXED BY sqlite_autoindex_refs_1 "
                "WHERE chain_id = ? AND contract = ? AND tx_hash IN (SELECT value FROM json_each(?))",
                (chain_id, contract, orjson.dumps([r.tx_hash for r in rs]).decode()),
            )
            kept = {h: int(b) for h, b in self._cur.fetchall() if b is not None}
            differ.update((chain_id, contract, r.tx_hash) for r in rs
                          if kept.get(r.tx_hash, r.block_number) != r.block_number)  # fmt: skip
        if not differ:
            return
        if not self._table:
            self._cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS import_conflicts (chain_id INTEGER, contract TEXT, "
                "tx_hash TEXT, PRIMARY KEY (chain_id, contract, tx_hash)) WITHOUT ROWID"
            )
            self._cur.execute("DELETE FROM temp.import_conflicts")
            self._table = True
        self._cur.executemany("INSERT OR IGNORE INTO temp.import_conflicts VALUES (?, ?, ?)", sorted(differ))

    def count(self) -> int:
        """How many refs disagreed; the table is dropped (in the transaction)."""
        if not self._table:
            return 0
        self._cur.execute("SELECT count(*) FROM temp.import_conflicts")
        (n,) = self._cur.fetchone()
        self._cur.execute("DROP TABLE temp.import_conflicts")
        return int(n)


def _split(sql: str) -> list[str]:
    """Split a migration into statements (no semicolons inside literals in our SQL)."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
