"""A Ctrl+C (or SIGTERM) during a long SQLite statement stops it there, not at its end.

Python runs a signal's handler between two bytecodes of the main thread, and a statement
runs none: an import's insert of 1M refs held a Ctrl+C ~6 s, to roll it all back then.
These tests make the signal arrive in the middle of an import's insert, deterministically:
a trigger on ``refs`` calls ``_thread.interrupt_main`` (a C function: it marks the signal
pending, as its arrival does, and runs no bytecode that would take it there) when the
insert reaches one ref, and calls ``list.append`` when it reaches the last: that one must
never be reached.
"""

from __future__ import annotations

import _thread
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gapfill.cli import cli
from gapfill.model import Contract, Ref
from gapfill.store import open_store
from gapfill.store.sqlite import SqliteStore

C = "0x" + "ab" * 20
#: Enough refs that the insert runs many progress-handler intervals after the signal.
N = 5_000


def h(i: int) -> str:
    return "0x" + f"{i:064x}"


def refs() -> Iterator[Ref]:
    return (Ref(1, C, h(i), None) for i in range(1, N + 1))


def signal_midway(conn: sqlite3.Connection, signum: int) -> list[str]:
    """Have the refs' insert mark ``signum`` pending at the 100th ref (in hash order, the
    insert's), and say in the list returned whether it went on to the last."""
    reached: list[str] = []
    conn.create_function("interrupt_main", 1, _thread.interrupt_main)
    conn.create_function("reached", 1, reached.append)
    conn.execute(f"CREATE TEMP TRIGGER signal_midway AFTER INSERT ON main.refs WHEN NEW.tx_hash = '{h(100)}' "
                 f"BEGIN SELECT interrupt_main({int(signum)}); END")  # fmt: skip
    conn.execute(f"CREATE TEMP TRIGGER reached_last AFTER INSERT ON main.refs WHEN NEW.tx_hash = '{h(N)}' "
                 "BEGIN SELECT reached(NEW.tx_hash); END")  # fmt: skip
    return reached


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Ctrl+C's handler as a command line program has it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_stops_an_import_in_the_middle_of_its_insert(tmp_path: Path, sigint_raises: None) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'gapfill.db'}")
    assert isinstance(store, SqliteStore)
    try:
        store.add_contract(Contract(1, C))
        reached = signal_midway(store._conn, signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            store.add_refs(refs())
        assert reached == []  # stopped there, not at the end of the insert
        assert not store.has_refs(1, C)  # all rolled back
        store._conn.execute("DROP TRIGGER temp.signal_midway")
        assert store.add_refs(refs()).new == N  # and the store is usable
        assert reached == [h(N)]
    finally:
        store.close()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_import_stopped_in_its_insert_ends_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigint_raises: None, sig: str
) -> None:
    """As a Ctrl+C anywhere else in an import: exit 130, the sentence, nothing imported."""
    db = f"sqlite:///{tmp_path / 'gapfill.db'}"
    assert CliRunner().invoke(cli, ["--db", db, "contract", "add", C, "--chain-id", "1"]).exit_code == 0
    (tmp_path / "hashes.txt").write_text("".join(f"{r.tx_hash}\n" for r in refs()))
    reached: list[list[str]] = []
    connect = SqliteStore._connect

    def connect_signalling(self: SqliteStore, target: str, uri: bool = False) -> sqlite3.Connection:
        conn = connect(self, target, uri)
        reached.append(signal_midway(conn, getattr(signal, sig)))
        return conn

    monkeypatch.setattr(SqliteStore, "_connect", connect_signalling)
    r = CliRunner().invoke(cli, ["--db", db, "import", str(tmp_path / "hashes.txt"), "--contract", C])
    assert r.exit_code == 130, r.output + r.stderr
    said = "interrupted: nothing was imported (an import is one transaction); run it again"
    assert r.stderr.strip() == said
    assert reached == [[]]
    monkeypatch.undo()
    with open_store(db) as store:
        assert not store.has_refs(1, C)


@pytest.mark.parametrize("at", ["BEGIN", "BEGIN IMMEDIATE", "COMMIT"])
def test_a_signal_in_begin_or_a_reads_commit_is_an_interrupt_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    # Review: the progress handler also runs in BEGIN and in a read's COMMIT (SQLite counts
    # its steps over a cached statement's life, so any statement may be the one it runs in):
    # a Ctrl+C there was said as "the SQLite database ... is not usable: interrupted" or
    # "writing to ... failed: interrupted", exit 1, instead of an interrupt.
    from gapfill.store import sqlite as backend

    statement: list[str] = []
    armed = [False]

    def on_step() -> int:
        if armed[0] and statement and statement[-1] == at:
            armed[0] = False
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(backend, "_run_signal_handlers", on_step)
    monkeypatch.setattr(backend, "SIGNAL_CHECK_STEPS", 1)
    with open_store(f"sqlite:///{tmp_path / 'g.db'}") as store:
        assert isinstance(store, SqliteStore)
        store.add_contract(Contract(1, C))
        store._conn.set_trace_callback(statement.append)
        armed[0] = True
        with pytest.raises(KeyboardInterrupt):
            if at == "BEGIN IMMEDIATE":
                store.add_contract(Contract(1, C, label="again"))
            else:
                store.list_contracts()
        assert not armed[0]  # it was the statement named that the handler cut
        assert not store._conn.in_transaction
        assert [c.address for c in store.list_contracts()] == [C]  # still usable


@pytest.mark.parametrize("immediate", [True, False])
def test_a_signal_as_begin_returns_leaves_no_transaction_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, immediate: bool
) -> None:
    # Review: a BEGIN IMMEDIATE that waited for another process's lock succeeds as the Ctrl+C
    # that came meanwhile is handled, and its KeyboardInterrupt raised as `execute` returned.
    # `_tx` only closed the cursor: the connection kept the transaction (and SQLite's write
    # lock), and the next write failed with "cannot start a transaction within a transaction".
    begin = SqliteStore._begin
    armed = [False]

    def cut(self: SqliteStore, cur: sqlite3.Cursor, immediate: bool) -> None:
        begin(self, cur, immediate)
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt  # as the handler raises it once BEGIN has returned

    monkeypatch.setattr(SqliteStore, "_begin", cut)
    with open_store(f"sqlite:///{tmp_path / 'g.db'}") as store:
        assert isinstance(store, SqliteStore)
        armed[0] = True
        with pytest.raises(KeyboardInterrupt):
            if immediate:
                store.add_contract(Contract(1, C))
            else:
                store.list_contracts()
        assert not armed[0]
        assert not store._conn.in_transaction
        store.add_contract(Contract(1, C, label="again"))  # the next write works
        assert [c.label for c in store.list_contracts()] == ["again"]


def test_a_signal_as_a_batch_runs_begin_returns_ends_it_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigint_raises: None
) -> None:
    # The same in a batch-mode run, before its loop (its first write after the run's row):
    # the run's end found the transaction open, and failed to record itself ("cannot start a
    # transaction within a transaction"): exit 1, and the row stayed `running`.
    from gapfill.store.base import Store

    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = ["--db", db, "--rpc-url", "http://127.0.0.1:9/"]
    assert CliRunner().invoke(cli, [*base, "contract", "add", C, "--chain-id", "1"]).exit_code == 0
    hashes = "\n".join(h(i) for i in range(1, 11))
    assert CliRunner().invoke(cli, [*base, "import", "-", "--contract", C], input=hashes).exit_code == 0
    begin, create_run = SqliteStore._begin, Store.create_run
    armed = [False]

    def cut(self: SqliteStore, cur: sqlite3.Cursor, immediate: bool) -> None:
        begin(self, cur, immediate)
        if armed[0] and immediate:
            armed[0] = False
            raise KeyboardInterrupt

    def arm(self: Store, *args: object, **kwargs: object) -> int:
        run_id = create_run(self, *args, **kwargs)  # type: ignore[arg-type]
        armed[0] = True
        return run_id

    monkeypatch.setattr(SqliteStore, "_begin", cut)
    monkeypatch.setattr(Store, "create_run", arm)
    r = CliRunner().invoke(cli, [*base, "enrich", "--mode", "batch"])
    assert not armed[0]  # a write came
    assert r.exit_code == 130, r.output
    assert "Traceback" not in r.output and "within a transaction" not in r.output, r.output
    monkeypatch.undo()
    with open_store(db) as store:
        assert [run.state for run in store.list_runs()] == ["interrupted"]
