"""SQLite backend: the embedded default, for one machine.

WAL mode lets readers (``status``) run beside the writer; every write is one
``BEGIN IMMEDIATE`` transaction, which is also how leases are claimed: SQLite
has one writer at a time, so an immediate transaction is a table lock.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, cast

import orjson

from gapfill.errors import StoreError, StoreRefused
from gapfill.model import LogRow, Ref, RefKey, TxRow
from gapfill.signals import CommitUnknown, committing, mark_committed
from gapfill.store.base import (
    BIG_INT_COLUMNS,
    DB_CHECK,
    JSON_COLUMNS,
    KEY_SQL,
    LOG_COLUMNS,
    TX_COLUMNS,
    Store,
    check_row_tuples,
    migrated,
    migrations,
)

#: Rows per INSERT statement of a write (the rest of a batch goes one row per statement):
#: each statement run costs SQLite a reset, a halt and a re-bind of its program besides
#: the row's own work. 20 rows of 32 columns: -10k instructions (~8%) per written
#: transaction against one row per statement (callgrind, Store.write of 500-tx batches);
#: 50 gave no more. 640 parameters, under the 999 of the oldest SQLite.
ROWS_PER_INSERT = 20


def _upsert_sql(table: str, columns: Sequence[str], key: int, rows: int) -> str:
    """``INSERT`` of ``rows`` rows into ``table``, each updating the stored row of its key
    (the first ``key`` columns) if there is one. Rows of one statement are inserted in
    order, each seeing those before it, as one statement per row would (a key repeated in
    a statement updates the row the first inserted)."""
    row = "(" + ", ".join("?" for _ in columns) + ")"
    update = ", ".join(f"{c} = excluded.{c}" for c in columns[key:])
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([row] * rows)} "
            f"ON CONFLICT ({', '.join(columns[:key])}) DO UPDATE SET {update}")  # fmt: skip


_INSERT_TX = _upsert_sql("transactions", TX_COLUMNS, 2, 1)
_INSERT_TXS = _upsert_sql("transactions", TX_COLUMNS, 2, ROWS_PER_INSERT)
_INSERT_LOG = _upsert_sql("logs", LOG_COLUMNS, 3, 1)
_INSERT_LOGS = _upsert_sql("logs", LOG_COLUMNS, 3, ROWS_PER_INSERT)
_flat = itertools.chain.from_iterable


def _insert_rows(cur: sqlite3.Cursor, many: str, one: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """``rows`` in order: ROWS_PER_INSERT a statement (``many``), the rest one a statement (``one``)."""
    whole = len(rows) - len(rows) % ROWS_PER_INSERT
    for i in range(0, whole, ROWS_PER_INSERT):
        cur.execute(many, list(_flat(rows[i : i + ROWS_PER_INSERT])))
    if whole < len(rows):
        cur.executemany(one, rows[whole:])


_LAST_TX_ROWID = "SELECT COALESCE(MAX(rowid), 0) FROM transactions"
#: An import's staged rows (``Store.add_refs``), one per ref: its first in FIRST_GIVEN order.
#: SQLite has no ``DISTINCT ON``: grouped by ref, the row of the smallest rank, its place
#: plus 2^62 if it gives no block number (so it ranks after every row that gives one); a
#: group's other columns are those of the row whose rank ``min()`` took (SQLite's rule for
#: bare columns). The groups come in the order of the staged rows' index (see
#: ``_stage_refs``), by ref: the refs' two hash-keyed indexes are written in order.
_FIRST_STAGED = (
    "SELECT chain_id, contract, tx_hash, block_number, source, "
    "min((block_number IS NULL) * 4611686018427387904 + seq) FROM temp.stage_refs{where} "
    "GROUP BY chain_id, contract, tx_hash"
)
#: ``WHERE true``: SQLite reads ``SELECT ... ON CONFLICT`` without a WHERE as a join's ON.
_INSERT_STAGED = (
    "INSERT INTO refs (chain_id, contract, tx_hash, block_number, source) "
    "SELECT s.chain_id, s.contract, s.tx_hash, {block}, s.source "
    f"FROM ({_FIRST_STAGED.format(where='')}) s WHERE true "
    "ON CONFLICT (chain_id, contract, tx_hash) DO NOTHING"
)
_FILL_FROM_STAGE = (
    "UPDATE refs SET block_number = x.block_number FROM (SELECT s.chain_id, s.contract, s.tx_hash, "
    "{block} AS block_number FROM ("
    + _FIRST_STAGED.format(where=" WHERE chain_id = ? AND contract = ?")
    + ") s) x WHERE refs.chain_id = x.chain_id AND refs.contract = x.contract "
    "AND refs.tx_hash = x.tx_hash AND refs.block_number IS NULL AND x.block_number IS NOT NULL"
)


# The sqlite3 module adapts every parameter that is not exactly an int, float, str or
# bytearray: None too. With no adapter registered for it, it asks the prepare protocol
# for ``__adapt__``, which raises an AttributeError (its message formatted, then thrown
# away) and then None for ``__conform__``: ~1,900 instructions per NULL, and a dense
# transaction's row and logs bind about a dozen (callgrind). An adapter found in the
# registry is just called, and binds the same NULL: its lookup costs ~1,000 instructions,
# and the call of a Python function ~400 more (a frame), that of an empty dict's ``get`` (a
# C method that answers None for any key) ~190 (callgrind).
sqlite3.register_adapter(type(None), cast("Callable[[None], None]", {}.get))

_dumps = orjson.dumps


def _tx_tuple(t: TxRow) -> tuple[Any, ...]:
    """A row in TX_COLUMNS order: big integers as decimal text, JSON columns as text.

    The row is unpacked into locals and each conversion written inline: a helper's call
    per big integer or JSON column (a dozen per row) cost more than the conversions."""
    (chain_id, tx_hash, block_number, block_hash, tx_index, block_timestamp, from_address,
     to_address, value, input_, nonce, gas, gas_price, max_fee, max_priority_fee, tx_type, status,
     root, gas_used, cumulative_gas_used, effective_gas_price, created_contract, access_list,
     max_fee_per_blob_gas, blob_versioned_hashes, blob_gas_used, blob_gas_price,
     authorization_list, method_id, method_name, method_args, log_count) = t  # fmt: skip
    return (
        chain_id, tx_hash, block_number, block_hash, tx_index, block_timestamp, from_address,
        to_address, None if value is None else str(value), input_,
        None if nonce is None else str(nonce), None if gas is None else str(gas),
        None if gas_price is None else str(gas_price), None if max_fee is None else str(max_fee),
        None if max_priority_fee is None else str(max_priority_fee), tx_type, status, root,
        None if gas_used is None else str(gas_used),
        None if cumulative_gas_used is None else str(cumulative_gas_used),
        None if effective_gas_price is None else str(effective_gas_price), created_contract,
        None if access_list is None else _dumps(access_list).decode(),
        None if max_fee_per_blob_gas is None else str(max_fee_per_blob_gas),
        None if blob_versioned_hashes is None else _dumps(blob_versioned_hashes).decode(),
        None if blob_gas_used is None else str(blob_gas_used),
        None if blob_gas_price is None else str(blob_gas_price),
        None if authorization_list is None else _dumps(authorization_list).decode(),
        method_id, method_name, None if method_args is None else _dumps(method_args).decode(), log_count,
    )  # fmt: skip


def _log_tuple(g: LogRow) -> tuple[Any, ...]:
    args = g.event_args
    return (g.chain_id, g.tx_hash, g.log_index, g.block_number, g.address, g.topic0, g.topic1,
            g.topic2, g.topic3, g.data, g.event_name,
            None if args is None else _dumps(args).decode())  # fmt: skip


check_row_tuples(_tx_tuple, _log_tuple, big=BIG_INT_COLUMNS, json=JSON_COLUMNS)


#: The page cache, in KiB: a connection's usual, and an import's (see ``add_refs``).
CACHE_KIB = 32_768
IMPORT_CACHE_KIB = 131_072
#: The page cache while an import sorts its staged rows (see ``_stage_refs``).
SORT_CACHE_KIB = 8_192
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


def _read_only_file(path: str, check: str = DB_CHECK) -> StoreRefused:
    """A write to a read-only file: refused until the user fixes it, as PostgreSQL's read-only
    database is (a run stops at once with it rather than retry it for its outage window)."""
    side = _unwritable(path)
    fix = f"make it writable, or set {check} to another database"
    if side is not None and side != path:  # left by a reader as read-only as the file was
        return StoreRefused(f"the file {side} beside the SQLite database {path} is read-only", fix)
    return StoreRefused(f"the SQLite database {path} is read-only (the file or its folder)", fix)


def _full(exc: sqlite3.Error) -> bool:
    return _code(exc) == sqlite3.SQLITE_FULL


def _disk_full(path: str, exc: sqlite3.Error, check: str = DB_CHECK) -> StoreRefused:
    """A write SQLite could not make for want of space (SQLITE_FULL): refused until the user
    frees some, as PostgreSQL's full disk is (a run stops at once with it rather than retry it
    for its outage window, a concurrent run restarting each worker that met it)."""
    return StoreRefused(f"the SQLite database {path} has no space left to write ({exc})",
                        f"free space on its disk (or move the database and set {check} to it)")  # fmt: skip


#: How many steps of SQLite's virtual machine a statement run by the main thread takes
#: between two calls of ``_run_signal_handlers`` (~0.3 ms of a 1M-ref import's insert).
SIGNAL_CHECK_STEPS = 10_000


def _run_signal_handlers() -> int:
    """The progress handler of statements run by the main thread: that Python code runs
    lets the signal handlers pending run, which would otherwise wait for the statement's end
    (an import's insert of 1M refs: ~6 s after a Ctrl+C). A handler that raises (Ctrl+C's
    KeyboardInterrupt, the CLI's SIGTERM) aborts the statement: sqlite3 drops the exception,
    the handler's call failed, and the statement fails with SQLITE_INTERRUPT, which ``_tx``
    turns back into KeyboardInterrupt. One that holds the signal (a run's end) raises
    nothing, and the statement goes on."""
    return 0


def _interrupted(exc: sqlite3.Error) -> bool:
    """Whether a statement was aborted by a signal handler that raised (nothing else calls
    ``interrupt()``)."""
    return _code(exc) == sqlite3.SQLITE_INTERRUPT


def _hint(exc: sqlite3.Error, check: str = DB_CHECK) -> str:
    """What to do about a failed write, for the errors a user can fix (``check``: where the
    database URL came from)."""
    text = str(exc).lower()
    then = (f"(or move the database and set {check} to it), then rerun the same command: what was "
            "committed is kept")  # fmt: skip
    if "disk is full" in text:
        return f"; free space on that disk {then}"
    if getattr(exc, "sqlite_errorcode", 0) == sqlite3.SQLITE_IOERR_WRITE:  # the extended code
        # A write the system refused: no space, or a file-size limit (EFBIG), which SQLite
        # does not tell apart from a failing disk.
        return ("; the disk may be full, or the file may have reached a file-size limit (ulimit -f): "
                f"free space or raise the limit {then}")  # fmt: skip
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
            raise _read_only_file(self.path, self.check)
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
                raise _read_only_file(self.path, self.check) from exc
            if _full(exc):
                raise _disk_full(self.path, exc, self.check) from exc
            raise StoreError(
                f"cannot open the SQLite database {self.path}: {exc}; check {check}: "
                "it must name a SQLite file, or a new one, in a folder you can write to"
            ) from exc
        self._depth = 0
        #: Whether the connection has ``_run_signal_handlers`` as its progress handler.
        self._watching = False

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
                if _interrupted(exc):  # the progress handler may run in BEGIN too
                    self._conn.rollback()
                    raise KeyboardInterrupt from None
                if _read_only(exc):
                    raise _read_only_file(self.path, self.check) from exc
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

    def _watch_signals(self) -> None:
        """Let the signal handlers run during this thread's statements if it is the main
        thread, the only one that runs them. Another thread's statements (a run's worker
        writes from one) go without: each call would wait for the GIL that the event loop
        holds, up to 5 ms, for nothing."""
        main = threading.current_thread() is threading.main_thread()
        if main is not self._watching:
            self._conn.set_progress_handler(_run_signal_handlers if main else None, SIGNAL_CHECK_STEPS)
            self._watching = main

    @contextmanager
    def _tx(self, immediate: bool = True) -> Iterator[sqlite3.Cursor]:
        self._watch_signals()
        cur = self._conn.cursor()
        try:
            # In the same try as the body: a Ctrl+C whose handler runs as BEGIN returns (a
            # BEGIN IMMEDIATE that waited for another process's lock) raises with the
            # transaction begun, and it must not stay open with the write lock: the next
            # transaction failed ("cannot start a transaction within a transaction").
            self._begin(cur, immediate)
            yield cur
        except sqlite3.Error as exc:
            self._failed(exc, immediate)
        except BaseException:
            self._conn.rollback()  # nothing to do where BEGIN failed
            raise
        else:
            try:
                if immediate:  # a write: see gapfill.signals
                    self._commit(cur)
                else:
                    cur.execute("COMMIT")  # a read's, which runs the progress handler
            except sqlite3.Error as exc:
                self._failed(exc, immediate)
        finally:
            cur.close()

    def _failed(self, exc: sqlite3.Error, immediate: bool) -> NoReturn:
        """Roll back a transaction whose statement or commit failed, and say why: a Ctrl+C
        or SIGTERM that the progress handler took (:func:`_run_signal_handlers`) as itself."""
        self._conn.rollback()
        if _interrupted(exc):
            raise KeyboardInterrupt from None
        if _read_only(exc):
            raise _read_only_file(self.path, self.check) from exc
        if _full(exc):
            raise _disk_full(self.path, exc, self.check) from exc
        doing = "writing to" if immediate else "reading from"
        raise StoreError(f"{doing} {self.path} failed: {exc}{_hint(exc, self.check)}") from exc

    def _commit(self, cur: sqlite3.Cursor) -> None:
        """Commit a write. A Ctrl+C or SIGTERM waits for the commit's end (``committing``):
        it raised as the ``COMMIT`` returned, and a stored import was said not to be. No
        progress handler runs in it: a ``COMMIT`` is one step that no handler can cut, and one
        called as it ends (SQLite calls it there too) could fail a commit that was done."""
        if self._watching:
            self._conn.set_progress_handler(None, 0)
            self._watching = False  # the next transaction puts it back
        failed = False
        try:
            with committing():
                try:
                    cur.execute("COMMIT")
                except sqlite3.Error:
                    failed = True  # set before any handler runs: none runs as it raises
                    raise
        except KeyboardInterrupt as exc:
            # The signals were handled before the COMMIT began or after it returned, never
            # in it, so what it did is known: a second one (CommitUnknown) said "not known"
            # of an import stored whole, or of one that never was. A first one raised here
            # as the commit failed, and the transaction is still open if it did not end it.
            if self._conn.in_transaction:
                self._conn.rollback()
            elif not failed:
                mark_committed()
            if isinstance(exc, CommitUnknown):
                raise KeyboardInterrupt from None
            raise

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

    @contextmanager
    def _import_tx(self) -> Iterator[sqlite3.Cursor]:
        # The refs are inserted by hash, and hashes are random: each new ref lands on a
        # random page of the key index, and with the usual 32 MiB cache a big import
        # rereads most of them (1M refs: ~28 CPU s). 128 MiB for the import's one
        # transaction: ~20 CPU s, ~175 MB peak RSS.
        with self._big_cache(), self._tx() as cur:
            yield cur

    _INSERT_STAGED = _INSERT_STAGED
    _FILL_FROM_STAGE = _FILL_FROM_STAGE

    def _stage_refs(self, cur: Any, refs: Iterable[Ref]) -> tuple[int, set[tuple[int, str]]]:
        # In the import's transaction: a rollback takes it away with the rest.
        cur.execute("DROP TABLE IF EXISTS temp.stage_refs")
        cur.execute(
            "CREATE TEMP TABLE stage_refs (seq INTEGER PRIMARY KEY, chain_id INTEGER, "
            "contract TEXT, tx_hash TEXT, block_number INTEGER, source TEXT)"
        )
        contracts: set[tuple[int, str]] = set()
        staged = 0
        chunk: list[tuple[Any, ...]] = []
        for r in refs:
            contracts.add((r.chain_id, r.contract))
            chunk.append((staged, r.chain_id, r.contract, r.tx_hash, r.block_number, r.source))
            staged += 1
            if len(chunk) >= 10_000:  # memory bounded, whatever the file's size
                cur.executemany("INSERT INTO temp.stage_refs VALUES (?, ?, ?, ?, ?, ?)", chunk)
                chunk = []
        if chunk:
            cur.executemany("INSERT INTO temp.stage_refs VALUES (?, ?, ?, ?, ?, ?)", chunk)
        # By ref, holding every column read (_FIRST_STAGED): sorted by this statement, whose
        # sorter takes as much memory as the page cache and frees it at its end, before the
        # insert fills the page cache (sorted by the insert, ~140 MB more at the peak). It
        # sorts in runs of that size, each in one step of SQLite's virtual machine, which
        # no signal handler can cut (see _watch_signals): under an 8 MiB cache a run takes
        # ~0.1 s, under 128 MiB 2-3 s (1M refs), and merging the many runs costs less CPU
        # than sorting the few big ones (1M refs: 2.4 s instead of 3.0; 4M: 11 instead of 18).
        (cache,) = cur.execute("PRAGMA cache_size").fetchone()
        cur.execute(f"PRAGMA cache_size=-{SORT_CACHE_KIB}")
        cur.execute("CREATE INDEX temp.stage_refs_by_ref ON stage_refs "
                    "(chain_id, contract, tx_hash, seq, block_number, source)")  # fmt: skip
        cur.execute(f"PRAGMA cache_size={int(cache)}")
        return staged, contracts

    def _unstage(self, cur: Any) -> None:
        # Left to the next import's DROP TABLE IF EXISTS, or the connection's close, which
        # drops it for nothing: a DROP here freed its pages one by one (1M refs: ~0.6 s), in
        # one step of SQLite's virtual machine, which a Ctrl+C could not cut (_watch_signals).
        return None

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
            _insert_rows(cur, _INSERT_TXS, _INSERT_TX, [_tx_tuple(t) for t in txs])
            cur.execute(_LAST_TX_ROWID)
            if cur.fetchone()[0] - before != len(txs):
                cur.execute("SELECT chain_id, tx_hash FROM transactions WHERE rowid > ?", (before,))
                inserted = {(int(c), h) for c, h in cur.fetchall()}
                _delete_stale_logs(cur, txs, logs, inserted)
        if logs:
            _insert_rows(cur, _INSERT_LOGS, _INSERT_LOG, [_log_tuple(g) for g in logs])
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


def _delete_stale_logs(
    cur: Any, txs: Sequence[TxRow], logs: Sequence[LogRow], inserted: set[tuple[int, str]]
) -> None:
    """Delete the logs the transactions stored again (not ``inserted``) no longer have: of
    another block, where one was before a reorg (its row now says the new one)."""
    kept: dict[tuple[int, str], list[int]] = {}
    for g in logs:
        kept.setdefault((g.chain_id, g.tx_hash), []).append(g.log_index)
    cur.executemany(
        "DELETE FROM logs WHERE chain_id = ? AND tx_hash = ? "
        "AND log_index NOT IN (SELECT value FROM json_each(?))",
        [(t.chain_id, t.tx_hash, orjson.dumps(kept.get((t.chain_id, t.tx_hash), [])).decode())
         for t in txs if (t.chain_id, t.tx_hash) not in inserted],
    )  # fmt: skip


def _split(sql: str) -> list[str]:
    """Split a migration into statements (no semicolons inside literals in our SQL)."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
