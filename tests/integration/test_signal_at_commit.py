"""A Ctrl+C or SIGTERM at a command's commit, or as its database closes, is said as what it is.

A commit is one step a signal cannot cut: on SQLite one C call, on PostgreSQL a ``COMMIT``
that psycopg cancels on the server when a ``KeyboardInterrupt`` lands in its wait, whether or
not it has committed. The signal used to raise as the commit returned, and a 1M-ref import
stored whole was said not to be ("nothing was imported", 130). These tests make the signal
land at the commit deterministically: the backend's commit is wrapped, and the wrapper
raises the signal once the real commit has returned (its handler runs there, as it runs
when a signal that came during the C call is handled), for the commit of one store call.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from gapfill.cli import cli
from gapfill.errors import StoreError
from gapfill.model import Contract, Ref
from gapfill.store import open_store
from gapfill.store.base import Store
from gapfill.store.postgres import PostgresStore
from gapfill.store.sqlite import SqliteStore

C = "0x" + "ab" * 20
N = 50
IMPORTED = f"imported {N} new refs for {C} on chain 1\n"
AFTER = "interrupted only after the {} was committed: it is complete, nothing to run again\n"
UNKNOWN = ("interrupted as the database committed: whether what this command wrote is stored is not "
           "known; `gapfill status` shows what is, and running the same command again is safe")  # fmt: skip


def h(i: int) -> str:
    return "0x" + f"{i:064x}"


@pytest.fixture(autouse=True)
def _ctrl_c_as_at_a_terminal() -> Iterator[None]:
    # Ctrl+C as a shell's foreground job has it (the test process may have SIGINT ignored),
    # and SIGTERM raising too outside gapfill's handling, so that one there ends the test,
    # not pytest.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
    signal.signal(signal.SIGTERM, previous_term)


class _Arm:
    """Raise ``signals`` at the commit of the one call of the store method armed."""

    def __init__(self, signals: list[int]) -> None:
        self.signals = signals
        self.armed = False
        self.fired = 0

    def commit_returned(self) -> bool:
        """Raise them if armed; whether it was."""
        if not self.armed:
            return False
        self.armed = False
        self.fired += 1
        for s in self.signals:
            signal.raise_signal(s)
        return True


#: A deferred trigger on refs that fails the COMMIT, as a serialization failure or a
#: deferred constraint would.
_FAIL_AT_COMMIT = """
CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON refs DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.tx_hash = '{first}') EXECUTE FUNCTION fail_at_commit();
"""


def signal_at_commit(monkeypatch: pytest.MonkeyPatch, db: str, method: str, *signals: int,
                     before: bool = False, fail: bool = False) -> _Arm:  # fmt: skip
    """Have the commit of ``Store.<method>``'s transaction followed at once by ``signals``: a
    SQLite cursor's ``COMMIT``, or psycopg's transaction end, returns, then they are raised.
    ``before``: they are raised as the commit is about to run (on SQLite a signal is handled
    before its one C call begins or after it ends). ``fail``: then the commit fails,
    as a full disk fails SQLite's (it raises without running) or a deferred constraint
    PostgreSQL's (a trigger on refs fails it on the server). Patch before the store opens."""
    before = before or fail
    arm = _Arm(list(signals))
    real = getattr(Store, method)

    def armed(self: Store, *args: Any, **kwargs: Any) -> Any:
        arm.armed = True
        try:
            return real(self, *args, **kwargs)
        finally:
            arm.armed = False

    monkeypatch.setattr(Store, method, armed)
    if db.startswith("sqlite"):
        class Cursor(sqlite3.Cursor):
            def execute(self, sql: str, *args: Any) -> Any:
                if before and sql == "COMMIT" and arm.commit_returned() and fail:
                    raise sqlite3.OperationalError("database or disk is full")
                out = super().execute(sql, *args)
                if sql == "COMMIT" and not before:
                    arm.commit_returned()
                return out

        class Connection(sqlite3.Connection):
            def cursor(self, factory: Any = Cursor) -> Any:
                return super().cursor(factory)

        connect = sqlite3.connect
        monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: connect(*a, **kw, factory=Connection))
    else:
        if fail:
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(_FAIL_AT_COMMIT.format(first=h(1)).encode())
        end = psycopg.Transaction.__exit__

        def exit_then_signal(self: psycopg.Transaction, kind: Any, exc: Any, tb: Any) -> Any:
            if before and kind is None and not self.savepoint_name:
                arm.commit_returned()
            out = end(self, kind, exc, tb)
            if not before and kind is None and not self.savepoint_name:
                arm.commit_returned()
            return out

        monkeypatch.setattr(psycopg.Transaction, "__exit__", exit_then_signal)
    return arm


def run(db: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--db", db, *args])


@pytest.fixture
def tracked(db_url: str, tmp_path: Path) -> tuple[str, Path]:
    """A database tracking C, and a file of N hashes to import."""
    with open_store(db_url) as store:
        store.add_contract(Contract(1, C))
    hashes = tmp_path / "hashes.txt"
    hashes.write_text("".join(f"{h(i)}\n" for i in range(1, N + 1)))
    return db_url, hashes


def stored_refs(db: str) -> int:
    with open_store(db) as store:
        return sum(s.refs for s in store.status() if s.address == C)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_an_imports_commit_is_said_after_the_import_it_did_not_stop(
    tracked: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, sig: int
) -> None:
    # It said "interrupted: nothing was imported (an import is one transaction); run it
    # again" and exited 130, with every ref stored.
    db, hashes = tracked
    arm = signal_at_commit(monkeypatch, db, "add_refs", sig)
    r = run(db, "import", str(hashes), "--contract", C)
    assert arm.fired == 1
    assert r.exit_code == 0, r.output
    assert r.stdout == IMPORTED
    assert r.stderr == AFTER.format("import")
    monkeypatch.undo()
    assert stored_refs(db) == N


def test_a_second_signal_at_an_imports_commit_stops_it_saying_what_is_known(
    tracked: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL: psycopg cancels the COMMIT, which may have completed. SQLite: its COMMIT is
    # one C call that both signals waited for, so it is done, and the import says so (it
    # said, as PostgreSQL's, that whether it was stored is not known).
    db, hashes = tracked
    arm = signal_at_commit(monkeypatch, db, "add_refs", signal.SIGINT, signal.SIGTERM)
    r = run(db, "import", str(hashes), "--contract", C)
    assert arm.fired == 1
    assert r.exit_code == 130, r.output
    if db.startswith("sqlite"):
        assert r.stdout == "", r.output
        assert r.stderr == "interrupted: the import had been committed: all its refs are stored\n", r.output
        monkeypatch.undo()
        assert stored_refs(db) == N
    else:
        assert r.stdout == "" and r.stderr == UNKNOWN + "\n", r.output


def test_a_second_signal_before_sqlites_commit_began_says_nothing_was_imported(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both handled before the COMMIT ran: the transaction is rolled back, and the import
    # said so (it said that whether it was stored is not known).
    with open_store(sqlite_url) as store:
        store.add_contract(Contract(1, C))
    hashes = tmp_path / "hashes.txt"
    hashes.write_text("".join(f"{h(i)}\n" for i in range(1, N + 1)))
    arm = signal_at_commit(monkeypatch, sqlite_url, "add_refs", signal.SIGINT, signal.SIGTERM, before=True)
    r = run(sqlite_url, "import", str(hashes), "--contract", C)
    assert arm.fired == 1
    assert r.exit_code == 130, r.output
    assert r.stderr == "interrupted: nothing was imported (an import is one transaction); run it again\n"
    monkeypatch.undo()
    assert stored_refs(sqlite_url) == 0


def test_a_second_signal_at_sqlites_commit_of_a_removal_says_it_was_removed(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(sqlite_url) as store:
        store.add_contract(Contract(1, C))
    arm = signal_at_commit(monkeypatch, sqlite_url, "remove_contract", signal.SIGTERM, signal.SIGINT)
    r = run(sqlite_url, "contract", "remove", C, "--yes")
    assert arm.fired == 1
    assert r.exit_code == 130, r.output
    assert r.stdout == "" and r.stderr == f"interrupted: {C} on chain 1 had been removed\n", r.output
    monkeypatch.undo()
    with open_store(sqlite_url) as store:
        assert store.list_contracts() == []


@pytest.mark.parametrize("when", ["at_commit", "two_after_commit"])
def test_a_signal_at_a_contracts_commit_stops_contract_add_saying_it_is_tracked(
    db_url: str, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # It said "interrupted: nothing was written; run the same command again" of a contract
    # that was tracked: of one signal at its commit, and (review) of two between its commit
    # and the line that set what Ctrl+C leaves.
    with open_store(db_url):
        pass
    if when == "at_commit":
        arm = signal_at_commit(monkeypatch, db_url, "add_contract", signal.SIGINT)
    else:
        real = Store.add_contract

        def add_then_two_signals(self: Store, contract: Contract) -> None:
            real(self, contract)
            signal.raise_signal(signal.SIGINT)  # held: the scope's commit is done
            signal.raise_signal(signal.SIGINT)  # stops the command at once

        monkeypatch.setattr(Store, "add_contract", add_then_two_signals)
    r = run(db_url, "contract", "add", C, "--chain-id", "1", "--label", "x")
    if when == "at_commit":
        assert arm.fired == 1
    assert r.exit_code == 130, r.output
    assert r.stderr == f"interrupted: {C} is tracked on chain 1\n", r.output
    monkeypatch.undo()
    with open_store(db_url) as store:
        assert store.get_contract(C, 1).label == "x"


def test_a_signal_at_a_removals_commit_is_said_after_the_removal_it_did_not_stop(
    tracked: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # It said "interrupted" (130) and not that the contract was removed.
    db, _ = tracked
    arm = signal_at_commit(monkeypatch, db, "remove_contract", signal.SIGTERM)
    r = run(db, "contract", "remove", C, "--yes")
    assert arm.fired == 1
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"removed {C} on chain 1: "), r.output
    assert r.stderr == AFTER.format("removal")
    monkeypatch.undo()
    with open_store(db) as store:
        assert store.list_contracts() == []


def test_a_second_signal_at_sqlites_commit_of_a_contract_says_it_is_tracked(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(sqlite_url):
        pass
    arm = signal_at_commit(monkeypatch, sqlite_url, "add_contract", signal.SIGINT, signal.SIGTERM)
    r = run(sqlite_url, "contract", "add", C, "--chain-id", "1", "--label", "x")
    assert arm.fired == 1
    assert r.exit_code == 130, r.output
    monkeypatch.undo()
    with open_store(sqlite_url) as store:
        assert store.get_contract(C, 1).label == "x"
    assert r.stderr == f"interrupted: {C} is tracked on chain 1\n", r.output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_a_commit_that_fails_still_interrupts_the_import(
    tracked: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, sig: int
) -> None:
    # The signal held through the commit was dropped as the commit failed: the command said
    # the store's error and exited 1, as if no Ctrl+C had come.
    db, hashes = tracked
    arm = signal_at_commit(monkeypatch, db, "add_refs", sig, fail=True)
    r = run(db, "import", str(hashes), "--contract", C)
    assert arm.fired == 1
    assert r.exit_code == 130, r.output
    assert r.stdout == "", r.output
    assert r.stderr == "interrupted: nothing was imported (an import is one transaction); run it again\n"
    monkeypatch.undo()
    assert stored_refs(db) == 0


def test_a_signal_at_a_commit_that_fails_reaches_a_caller_that_catches_the_stores_error(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller that catches StoreError lost the Ctrl+C. The store's error is the interrupt's
    # context, the transaction is rolled back, and the store goes on working.
    with open_store(db_url) as store:
        store.add_contract(Contract(1, C))
    arm = signal_at_commit(monkeypatch, db_url, "add_refs", signal.SIGINT, fail=True)
    with open_store(db_url) as store:
        refs = [Ref(1, C, h(i), None) for i in range(1, 4)]
        with pytest.raises(KeyboardInterrupt) as caught, contextlib.suppress(StoreError):
            store.add_refs(refs)
        assert arm.fired == 1
        assert isinstance(caught.value.__context__, (sqlite3.Error, psycopg.Error)), caught.value.__context__
        assert sum(s.refs for s in store.status() if s.address == C) == 0
        store.add_contract(Contract(1, C, "again"))
        assert store.get_contract(C, 1).label == "again"


def signal_at_close(monkeypatch: pytest.MonkeyPatch, *signals: int) -> list[str]:
    """Have each store's close followed at once by ``signals``; returns the closes made."""
    closed: list[str] = []

    for cls in (SqliteStore, PostgresStore):
        def close(self: Store, _real: Callable[[Store], None] = cls.close) -> None:
            _real(self)
            closed.append(type(self).__name__)
            for s in signals:
                signal.raise_signal(s)

        monkeypatch.setattr(cls, "close", close)
    return closed


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_as_the_database_closes_leaves_the_commands_outcome(
    tracked: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, sig: int
) -> None:
    # The close (SQLite's WAL checkpoint: ~0.2 s after a 1M-ref import) ran as click's
    # context ended, outside gapfill's handling: "Aborted!" and exit 1 after the import.
    db, hashes = tracked
    closed = signal_at_close(monkeypatch, sig)
    r = run(db, "import", str(hashes), "--contract", C)
    assert closed, "the store was not closed"
    assert r.exit_code == 0, r.output
    assert r.stdout == IMPORTED and r.stderr == "", r.output
    monkeypatch.undo()
    assert stored_refs(db) == N


def test_a_second_signal_as_the_database_closes_stops_the_command_with_one_line(
    tracked: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both signals come once the close has returned (on SQLite it is one C call, and two
    # Ctrl+C during it would be one): the database is closed, so the line is true.
    db, hashes = tracked
    signal_at_close(monkeypatch, signal.SIGINT, signal.SIGINT)
    r = run(db, "import", str(hashes), "--contract", C)
    assert r.exit_code == 130, r.output
    assert r.stdout == IMPORTED
    assert r.stderr == ("interrupted as the database closed, after the command ended: what it committed "
                        "is kept\n"), r.output  # fmt: skip


# -- PostgreSQL: the signal lands while the server runs the COMMIT --------------------------

#: A deferred trigger on refs that waits, at the commit, for an advisory lock the test holds:
#: the COMMIT is under way on the server until the test lets it go.
_WAIT_AT_COMMIT = """
CREATE FUNCTION wait_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_lock(4242); PERFORM pg_advisory_unlock(4242); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER wait_at_commit AFTER INSERT ON refs DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.tx_hash = '{first}') EXECUTE FUNCTION wait_at_commit();
"""


def _signal_while_the_commit_waits(url: str, signals: list[int]) -> tuple[threading.Thread, list[str]]:
    """A thread that holds the lock, sends ``signals`` once a COMMIT waits for it, then lets
    the COMMIT go on."""
    import os

    problems: list[str] = []
    ready = threading.Event()

    def main() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(4242)")
            ready.set()
            try:
                for _ in range(6000):  # polls the server's state; the test passes or fails on
                    # what the command says and stores, not on this wait
                    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                       "current_database() AND query = 'COMMIT' AND wait_event_type = "
                                       "'Lock'").fetchone()  # fmt: skip
                    if row and row[0]:
                        break
                    threading.Event().wait(0.01)
                else:
                    problems.append("the COMMIT never waited")
                for s in signals:
                    os.kill(os.getpid(), s)
            finally:
                conn.execute("SELECT pg_advisory_unlock(4242)")

    t = threading.Thread(target=main, daemon=True)
    t.start()
    ready.wait(10)
    return t, problems


@pytest.mark.timeout(120)
@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_a_signal_during_a_postgres_commit(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, twice: bool
) -> None:
    """Once: the signal is held, psycopg's wait goes on, the COMMIT completes, and the import
    is said whole, then that the signal came too late to stop it (exit 0). Before it was
    held, psycopg cancelled the COMMIT on the server: here that stopped its deferred trigger,
    nothing was stored, and the command said "interrupted: nothing was imported" (130), as
    it did where the cancel came too late and the import was stored. Twice: the command
    stops at once, saying the outcome is unknown (130)."""
    with open_store(pg_url) as store:
        store.add_contract(Contract(1, C))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(_WAIT_AT_COMMIT.format(first=h(1)).encode())
    hashes = tmp_path / "hashes.txt"
    hashes.write_text("".join(f"{h(i)}\n" for i in range(1, N + 1)))
    signals = [signal.SIGINT, signal.SIGTERM] if twice else [signal.SIGINT]
    t, problems = _signal_while_the_commit_waits(pg_url, signals)
    r = run(pg_url, "import", str(hashes), "--contract", C)
    t.join(30)
    assert not problems, problems
    if twice:
        # psycopg cancels the COMMIT as the lock is let go: whether the cancel or the commit
        # wins is a race, so nothing is asserted of what was stored. What is said is not
        # part of it: psycopg re-raises the interrupt however the COMMIT ended.
        assert r.exit_code == 130, r.output
        assert r.stderr == UNKNOWN + "\n", r.output
    else:
        assert r.exit_code == 0, r.output
        assert r.stdout == IMPORTED
        assert r.stderr == AFTER.format("import"), r.output
        assert stored_refs(pg_url) == N


def test_a_second_signal_as_a_failed_commands_database_closes_leaves_its_error(
    tracked: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: the close ran before the command's error was said, and two signals there put
    # "interrupted as the database closed, after the command ended" in its place (130).
    db, hashes = tracked
    hashes.write_text(f"{h(1)}\nnot-a-hash\n")
    signal_at_close(monkeypatch, signal.SIGINT, signal.SIGINT)
    r = run(db, "import", str(hashes), "--contract", C)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and "line 2" in r.stderr, r.output
    assert "closed" not in r.stderr


@pytest.mark.parametrize("reading", [False, True])
def test_a_signal_as_a_postgres_transaction_begins_leaves_none_open(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, reading: bool
) -> None:
    # Review: a KeyboardInterrupt whose handler ran once psycopg had begun the transaction,
    # before the store's `with` took it (as its enter returned), left it open with nothing to
    # end it: each later transaction of the connection was a savepoint inside it, released
    # and never committed, so no other session saw the command's writes.
    enter = psycopg.Transaction.__enter__
    armed = [False]

    def cut(self: psycopg.Transaction) -> psycopg.Transaction:
        entered = enter(self)
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt  # as the handler raises it once BEGIN has returned
        return entered

    monkeypatch.setattr(psycopg.Transaction, "__enter__", cut)
    with open_store(pg_url) as store:
        assert isinstance(store, PostgresStore)
        armed[0] = True
        with pytest.raises(KeyboardInterrupt):
            if reading:
                store.list_contracts()
            else:
                store.add_contract(Contract(1, C))
        assert not armed[0]
        assert store._conn is not None
        assert store._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        store.add_contract(Contract(1, C, label="again"))
    with psycopg.connect(pg_url) as other:  # committed: another session sees it
        assert other.execute("SELECT label FROM contracts").fetchall() == [("again",)]
