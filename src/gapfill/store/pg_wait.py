"""Saying what a PostgreSQL transaction waits for, as SQLite's busy handler does.

PostgreSQL waits for a lock as long as it takes (a plan of a million refs holds its
contract rows for seconds, a removal longer), so a wait is never cut short: it is said.
A store with a ``notice`` tells its :class:`LockWatch` when each transaction begins and
ends (a counter and a notify: nothing on the statements themselves). One thread per
store sleeps until a transaction has run ``LOCK_NOTICE_S``; only then does it open a side
connection and ask ``pg_locks`` whether the transaction's backend waits for a lock, which
one, and (``pg_blocking_pids``) which sessions hold it, by their ``application_name``
(gapfill names its own: ``gapfill <command> (pid N)``). A wait of ``LOCK_NOTICE_S`` is
said once, and the thread looks again every ``LOCK_RECHECK_S`` until the transaction ends,
when the side connection is closed. Anything going wrong here only leaves the wait
unsaid: it never touches the transaction.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

Notice = Callable[[str], None]

#: How long a transaction runs before its lock waits are looked for, and how long it has
#: waited for a lock when that is said; and how often it is looked at again after.
LOCK_NOTICE_S = 2.0
LOCK_RECHECK_S = 1.0
#: After the side connection failed, how long before it is tried again.
RETRY_S = 10.0

#: The advisory locks gapfill takes (``pg_advisory_xact_lock``), as waits name them.
MIGRATION_LOCK = 7_263_451_001
PLAN_LOCK = 7_263_451_002
REMOVAL_LOCK = 7_263_451_003
_ADVISORY = {
    MIGRATION_LOCK: "the schema migration lock",
    PLAN_LOCK: "the planning lock",
    REMOVAL_LOCK: "the contract removal lock",
}


def application_name(app: str = "") -> str:
    """What gapfill's sessions call themselves, so that another's lock wait names them."""
    return f"gapfill {app} (pid {os.getpid()})" if app else f"gapfill (pid {os.getpid()})"


def _waiting_sql(server_version: int) -> str:
    # The one lock a backend waits for, if any: an advisory lock by its key (a bigint key is
    # classid << 32 | objid); a row by its table, which is that of the tuple lock the waiter
    # holds while it waits for the row's transaction; how long it has waited (waitstart:
    # PostgreSQL 14 on); and the sessions holding it.
    waited = "extract(epoch FROM clock_timestamp() - w.waitstart)::float8"
    if server_version < 140000:
        waited = "NULL"
    return (
        "SELECT w.locktype, (w.classid::int8 << 32) | w.objid::int8, "
        "coalesce(w.relation, (SELECT t.relation FROM pg_locks t WHERE t.pid = w.pid AND t.granted "
        "AND t.locktype = 'tuple' LIMIT 1))::regclass::text, "
        f"{waited}, "
        "(SELECT coalesce(json_agg(json_build_array(a.pid, a.application_name, a.state) ORDER BY a.pid), "
        "'[]'::json) FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids(w.pid))) "
        "FROM pg_locks w WHERE w.pid = %s AND NOT w.granted LIMIT 1"
    )


def _what(locktype: str, key: int | None, table: str | None) -> str:
    if locktype == "advisory" and key is not None:
        return _ADVISORY.get(key, f"advisory lock {key}")
    if locktype in ("transactionid", "tuple") and table:
        return f"a row of table {table}"
    if locktype == "transactionid":
        return "a row another transaction writes"
    if locktype == "relation" and table:
        return f"table {table}"
    return f"a {locktype} lock"


def _holder(pid: int, app: str | None, state: str | None) -> str:
    named = f"session {pid} of {app}" if app else f"session {pid}"
    return f"{named}, idle in transaction" if state and state.startswith("idle in transaction") else named


def describe(row: tuple[Any, ...], where: str, dbname: str) -> str:
    """The sentence saying what the transaction waits for, from a row of the query above."""
    locktype, key, table, _waited, holders = row
    held = " and ".join(_holder(int(p), a, s) for p, a, s in holders or [])
    by = f", held by {held}" if held else ""
    them = "they commit or end" if len(holders or []) > 1 else "it commits or ends"
    return (f"waiting for {_what(locktype, key, table)} in PostgreSQL database {dbname} at {where}{by}: "
            f"gapfill goes on once {them}")  # fmt: skip


class LockWatch:
    """Watches one store's transactions for lock waits; see the module's docstring.

    ``connect`` opens a side connection (autocommit); ``notice`` gives the store's current
    notice (None: say nothing); ``where`` and ``dbname`` name the database."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], notice: Callable[[], Notice | None],
                 where: str, dbname: str) -> None:  # fmt: skip
        self._connect = connect
        self._notice = notice
        self._where, self._dbname = where, dbname
        self._cond = threading.Condition()
        self._serial = 0
        self._pid: int | None = None
        self._since = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None

    def begin(self, pid: int) -> None:
        """A transaction began on the server process ``pid``."""
        with self._cond:
            self._serial += 1
            self._pid, self._since = pid, time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gapfill-lock-watch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def end(self) -> None:
        with self._cond:
            self._pid = None
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=1.0)  # a daemon: one still connecting ends on its own

    def _running(self, serial: int) -> bool:
        return not self._closed and self._serial == serial and self._pid is not None

    def _run(self) -> None:
        side: psycopg.Connection[Any] | None = None
        try:
            serial, due, said = -1, 0.0, set[str]()
            while True:
                with self._cond:
                    while not self._closed and self._pid is None and side is None:
                        self._cond.wait()
                    if self._closed:
                        return
                    pid = self._pid
                    if pid is not None and self._serial != serial:
                        serial, due, said = self._serial, self._since + LOCK_NOTICE_S, set()
                    while self._running(serial) and (left := due - time.monotonic()) > 0:
                        self._cond.wait(left)
                    running = self._running(serial)
                if not running:
                    if side is not None and self._pid is None:  # no transaction: let it go
                        side.close()
                        side = None
                    continue
                assert pid is not None
                try:
                    side = side or self._connect()
                    row = side.execute(_waiting_sql(side.info.server_version), (pid,)).fetchone()
                except Exception:
                    if side is not None:
                        side.close()
                        side = None
                    due = time.monotonic() + RETRY_S
                    continue
                due = time.monotonic() + LOCK_RECHECK_S
                if row is None:
                    continue
                waited = LOCK_NOTICE_S if row[3] is None else float(row[3])
                if waited < LOCK_NOTICE_S:
                    due = time.monotonic() + max(LOCK_NOTICE_S - waited, 0.05)
                    continue
                text = describe(row, self._where, self._dbname)
                notice = self._notice()
                with self._cond:
                    running = self._running(serial)
                if text in said or notice is None or not running:
                    continue
                said.add(text)
                with contextlib.suppress(Exception):  # a reader gone: the wait goes on unsaid
                    notice(text)
        except Exception:  # never a traceback from a thread: the wait goes on unsaid
            pass
        finally:
            if side is not None:
                with contextlib.suppress(Exception):
                    side.close()
