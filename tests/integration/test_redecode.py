"""Decoding stored rows again is kept in the database until done, on both backends: a
``contract add --abi`` cut short, or a run killed after its contract's ABI changed, leaves
rows decoded the old way that a later step decodes again (``enrich/redecode.py``)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from test_store import C, h, store_at, tx_row

from gapfill.cli import cli
from gapfill.enrich.redecode import Redecoded, finish_redecodes
from gapfill.model import Contract, Enriched, Ref
from gapfill.store import Store, open_store

ABI = [{"type": "function", "name": "transfer",
        "inputs": [{"name": "to", "type": "address"}, {"name": "amount", "type": "uint256"}]}]  # fmt: skip


#: Another ABI of the same function (an event added).
ABI_TOO = [*ABI, {"type": "event", "name": "Ping", "inputs": []}]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    s.add_contract(Contract(1, C, label="token"))
    yield s
    s.close()


def store_undecoded(store: Store, *numbers: int) -> None:
    """Transactions to C stored as a decoder without its ABI leaves them."""
    rows = [tx_row(i, 10 + i, method_name=None, method_args=None) for i in numbers]
    store.write(Enriched(txs=rows))


def method_names(store: Store) -> set[str | None]:
    return {t["method_name"] for t in store.fetch_transactions(1)}


def dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_an_abi_given_stays_asked_for_until_its_rows_are_decoded_with_it(store: Store) -> None:
    store_undecoded(store, 1, 2)
    # `contract add --abi` killed right after it wrote the ABI: its rows were never decoded.
    store.add_contract(Contract(1, C, abi=ABI))
    ((chain_id, address, abi, asked),) = store.pending_redecodes()
    assert (chain_id, address, abi) == (1, C, ABI)
    store.add_contract(Contract(1, C, abi=ABI))  # the same ABI again asks nothing more
    assert [p[3] for p in store.pending_redecodes()] == [asked]
    # The ABI changes while a re-decode runs with the one before: it does not settle it.
    store.add_contract(Contract(1, C, abi=ABI_TOO))
    store.redecoded(1, C, asked)
    assert [p[3] for p in store.pending_redecodes()] == [asked + 1]
    assert method_names(store) == {None}
    ((_, address, done),) = finish_redecodes(store)  # what the next enrich or contract add does
    assert address == C and done.txs == done.decoded_txs == 2
    assert method_names(store) == {"transfer"}
    assert store.pending_redecodes() == [] and finish_redecodes(store) == []


def test_a_run_killed_after_an_abi_change_has_its_rows_decoded_again_by_a_later_step(store: Store) -> None:
    killed = store.create_run("concurrent", 2, chain_id=1)
    live = store.create_run("concurrent", 2, chain_id=1)  # this process's: it settles itself
    # `contract add --abi` while both run: it decodes what is stored, then is done.
    store.add_contract(Contract(1, C, abi=ABI))
    assert finish_redecodes(store) and store.pending_redecodes() == []
    # A worker of each run, its decoder built before the change, commits rows the old way;
    # then the first run is killed outright: it never reaches its end.
    store_undecoded(store, 1, 2)
    with store._tx() as cur:
        cur.execute(store._sql("UPDATE runs SET pid = ? WHERE run_id = ?"), (dead_pid(), killed))
    ((_, _, done),) = finish_redecodes(store)
    assert done.txs == done.decoded_txs == 2 and method_names(store) == {"transfer"}
    states = {r.run_id: r.state for r in store.list_runs()}
    assert states == {killed: "interrupted", live: "running"}
    # The live run is not settled by another process's step (its workers may still write
    # the old way), only by its own end.
    store_undecoded(store, 3)
    assert finish_redecodes(store) == []
    ((_, _, done),) = finish_redecodes(store, live)
    assert done.txs == 3 and method_names(store) == {"transfer"}
    assert finish_redecodes(store, live) == []


def test_a_run_started_after_the_change_asks_for_nothing(store: Store) -> None:
    store.add_contract(Contract(1, C, abi=ABI))
    assert finish_redecodes(store)
    run = store.create_run("batch", 1, chain_id=1)
    store.write(Enriched(txs=[tx_row(1, 11)]))
    store.finish_run(run, "done")
    assert finish_redecodes(store, run) == [] and store.pending_redecodes() == []


def test_a_database_of_schema_3_upgrades_with_nothing_asked(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store_at(db_url, monkeypatch, 3) as s, s._tx() as cur:  # as gapfill before this change wrote them
        cur.execute(s._sql("INSERT INTO contracts (chain_id, address, abi) VALUES (?, ?, ?)"),
                    (1, C, '[{"type": "event", "name": "E", "inputs": []}]'))  # fmt: skip
        cur.execute("INSERT INTO runs (started_at, host, mode, workers) VALUES (0, 'h', 'batch', 1)")
        # (list_runs reads columns of later schemas: a store reads runs once migrated)
        cur.execute("SELECT run_id, started_at, host, mode, workers FROM runs")
        (old_run,) = [(int(r[0]), float(r[1]), *r[2:]) for r in cur.fetchall()]
    monkeypatch.undo()
    with open_store(db_url) as s:
        assert s.schema_version() == s.migrate() == s.latest_version() >= 4
        assert finish_redecodes(s) == [] and s.pending_redecodes() == []
        # Running still, it has no pid (schema 1): migration 8 takes it as ended.
        assert [(r.run_id, r.started_at, r.host, r.mode, r.workers, r.state)
                for r in s.list_runs()] == [(*old_run, "interrupted")]  # fmt: skip
        s.add_contract(Contract(1, C, abi=ABI))
        assert [p[:3] for p in s.pending_redecodes()] == [(1, C, ABI)]


def test_contract_add_finishes_what_one_cut_short_left(store: Store, db_url: str) -> None:
    store_undecoded(store, 1, 2)
    store.add_contract(Contract(1, C, abi=ABI))  # as `contract add --abi` killed before decoding leaves it
    other = "0x" + "cd" * 20
    r = CliRunner().invoke(cli, ["--db", db_url, "contract", "add", other, "--chain-id", "1"])
    assert r.exit_code == 0, r.output
    assert (f"decoded the stored rows of {C} on chain 1 again with its ABI, which a run or `contract add` "
            "cut short had left to do: 2 transactions sent to it, 0 logs it emitted") in r.output  # fmt: skip
    assert method_names(store) == {"transfer"} and store.pending_redecodes() == []


def test_the_same_abi_given_again_decodes_nothing_again(store: Store, db_url: str, tmp_path: Path) -> None:
    # `contract add X --abi same.json` (a provisioning script rerun) said "nothing changed",
    # then decoded every stored row of X again: "decoded the stored rows with this ABI".
    store_undecoded(store, 1, 2)
    abi = tmp_path / "abi.json"
    abi.write_bytes(orjson.dumps(ABI))
    add = ["--db", db_url, "contract", "add", C, "--chain-id", "1", "--abi", str(abi)]
    r = CliRunner().invoke(cli, add)
    assert r.exit_code == 0, r.output
    assert "decoded the stored rows with this ABI: 2 of 2 transactions" in r.output, r.output
    r = CliRunner().invoke(cli, add)
    assert r.exit_code == 0, r.output
    assert r.output == f"{C} on chain 1 (token) was tracked already: nothing changed\n"
    assert store.pending_redecodes() == []
    # A run not settled (another host's, never judged from here) began before the ABI: the
    # rows it stored may be decoded the old way, and the same ABI again is how they are
    # redone (README), so then it still asks.
    store.create_run("concurrent", 2, chain_id=1)
    store.add_contract(Contract(1, C, abi=ABI_TOO))  # changed as it runs
    assert finish_redecodes(store) and store.pending_redecodes() == []
    store.add_contract(Contract(1, C, abi=ABI_TOO))
    assert [p[:3] for p in store.pending_redecodes()] == [(1, C, ABI_TOO)]


def versions(store: Store) -> tuple[int, int]:
    """C's ``(abi_version, redecode_asked)``."""
    with store._tx() as cur:
        cur.execute(store._sql("SELECT abi_version, redecode_asked FROM contracts WHERE address = ?"), (C,))
        version, asked = cur.fetchone()
    return int(version), int(asked)


def test_the_same_abi_given_again_asks_once_for_a_run_never_settled(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    # The same ABI given again while a run of another host (never settled from here) that
    # began with the ABI before ran bumped the version with the ask: the run's version never
    # matched again, and every later identical `contract add --abi` said "nothing changed",
    # then decoded every stored row again.
    store_undecoded(store, 1, 2)
    store.add_contract(Contract(1, C, abi=ABI))
    assert finish_redecodes(store)
    run = store.create_run("concurrent", 2, chain_id=1)
    with store._tx() as cur:
        cur.execute(store._sql("UPDATE runs SET host = 'otherhost' WHERE run_id = ?"), (run,))
    abi = tmp_path / "abi.json"
    abi.write_bytes(orjson.dumps(ABI_TOO))
    add = ["--db", db_url, "contract", "add", C, "--chain-id", "1", "--abi", str(abi)]
    r = CliRunner().invoke(cli, add)
    assert r.exit_code == 0 and "ABI replaced" in r.output, r.output
    assert versions(store) == (2, 2) and store.pending_redecodes() == []
    # Given again, once: the run's rows are asked for (a version bump would be a change).
    r = CliRunner().invoke(cli, add)
    assert r.exit_code == 0 and "decoded the stored rows of" in r.output, r.output
    assert versions(store) == (2, 3) and store.pending_redecodes() == []
    for _ in range(3):  # then nothing more, for that run
        r = CliRunner().invoke(cli, add)
        assert r.exit_code == 0, r.output
        assert r.output == f"{C} on chain 1 (token) was tracked already: nothing changed\n"
        assert versions(store) == (2, 3) and store.pending_redecodes() == []
    # Once the ABI changed again, the same ABI given again asks for the run once more.
    store.add_contract(Contract(1, C, abi=ABI))
    assert versions(store) == (3, 4)
    for _ in range(3):
        store.add_contract(Contract(1, C, abi=ABI))
    assert versions(store) == (3, 5)
    # The run's own end still settles it against the version it began with.
    assert store.settle_runs(run) == [(1, C)] and versions(store) == (3, 6)


def test_a_killed_run_waits_while_a_live_local_process_may_still_commit_for_it(store: Store) -> None:
    # kill -9 of a coordinator leaves its workers finishing their batches: rows they commit
    # after a re-decode would stay decoded the old way, so the killed run is settled once
    # no other live process of this host holds a lease.
    killed = store.create_run("concurrent", 2, chain_id=1)
    store.add_contract(Contract(1, C, abi=ABI))
    with store._tx() as cur:
        cur.execute(store._sql("UPDATE runs SET pid = ? WHERE run_id = ?"), (dead_pid(), killed))
    store.add_refs([Ref(1, C, h(9), 9)])
    store.plan(store.create_run("batch", 1), [(1, C)])
    with subprocess.Popen(["sleep", "60"]) as worker:
        try:
            assert store.lease(f"{socket.gethostname()}:{worker.pid}/w1", 60.0) is not None
            assert finish_redecodes(store) == [(1, C, Redecoded())]  # the add's own ask, nothing stored
            store_undecoded(store, 1)  # the worker's commit
        finally:
            worker.kill()
    ((_, _, done),) = finish_redecodes(store)
    assert done.txs == 1 and method_names(store) == {"transfer"}


def test_a_redecode_overtaken_by_a_newer_abi_stops_instead_of_writing_the_old_one(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two re-decodes of one contract at once (an enrich's start and a `contract add --abi`
    # giving a newer ABI): the one with the older ABI must not write after the newer one
    # finished, which would leave rows decoded the old way with nothing left asked.
    store_undecoded(store, 1, 2)
    old = [{**ABI[0], "name": "oldName"}]
    store.add_contract(Contract(1, C, abi=old))
    write = store.set_decoded_calls

    def overtaken(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(store, "set_decoded_calls", write)
        store.add_contract(Contract(1, C, abi=ABI))  # the other process, start to end
        assert finish_redecodes(store)
        return write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "set_decoded_calls", overtaken)
    finish_redecodes(store)
    assert method_names(store) == {"transfer"} and store.pending_redecodes() == []
