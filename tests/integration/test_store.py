"""The storage seam on both backends: schema, refs, the gap, upserts, plans and leases."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import replace
from typing import Any
from unittest.mock import ANY

import pytest

from gapfill.errors import GapfillError, StoreDropped, StoreRefused, UnknownContractError
from gapfill.model import (
    PERMANENT_REASONS,
    UNKNOWN_BLOCK_KEY,
    Batch,
    Contract,
    ContractStatus,
    Enriched,
    Failure,
    LogRow,
    Ref,
    TxRow,
)
from gapfill.store import GivenBack, Leased, PlanInfo, RefsAdded, Store, open_store
from gapfill.store.base import DEAD_RUN_NOTE, MAX_ATTEMPTS

C = "0x" + "ab" * 20


def h(i: int) -> str:
    return "0x" + f"{i:064x}"


def tx_row(i: int, block: int, **over: Any) -> TxRow:
    base: dict[str, Any] = dict(
        chain_id=1, tx_hash=h(i), block_number=block, block_hash=h(10_000 + block), tx_index=i % 7,
        block_timestamp=1_700_000_000 + block, from_address="0x" + "11" * 20, to_address=C,
        value=2**70 + i, input="0xa9059cbb" + "00" * 64, nonce=i, gas=21_000, gas_price=None,
        max_fee_per_gas=2**65, max_priority_fee_per_gas=1, tx_type=2, status=1, root=None,
        gas_used=21_000, cumulative_gas_used=42_000, effective_gas_price=10**10,
        created_contract=None, access_list=[{"address": C, "storageKeys": [h(1)]}],
        method_id="0xa9059cbb", method_name="transfer", method_args={"to": C, "amount": "5"},
        log_count=1,
    )  # fmt: skip
    base.update(over)
    return TxRow(**base)


def log_row(i: int, block: int) -> LogRow:
    return LogRow(1, h(i), 0, block, C, h(99), h(98), None, None, "0x" + "00" * 32,
                  "Transfer", {"value": str(2**80)})  # fmt: skip


@pytest.fixture
def store(db_url: str) -> Any:
    s = open_store(db_url)
    s.add_contract(Contract(1, C, label="token", start_block=5))
    yield s
    s.close()


def test_migrate_is_idempotent(db_url: str) -> None:
    with open_store(db_url) as s:
        v = s.migrate()
        assert s.migrate() == v >= 1


def test_contract_roundtrip_and_unknown(store: Store) -> None:
    store.add_contract(Contract(1, C, abi=[{"type": "function", "name": "f", "inputs": []}]))
    (c,) = store.list_contracts()
    assert c.label == "token" and c.start_block == 5 and c.abi and c.abi[0]["name"] == "f"
    with pytest.raises(Exception, match="not tracked"):
        store.get_contract("0x" + "cd" * 20)
    store.add_contract(Contract(10, C))
    with pytest.raises(Exception, match="pass --chain-id"):
        store.get_contract(C)
    assert store.get_contract(C, 10).chain_id == 10


def test_the_same_abi_given_while_another_is_given_leaves_the_other_at_its_version(pg_url: str) -> None:
    # `contract add --abi X` (X current: nothing to decode) read the row, then `--abi Y`
    # committed Y at a new version, then X's upsert wrote X back at Y's version: the ABI
    # the version names was gone, and a run begun with Y never had its rows decoded again.
    x = [{"type": "function", "name": "f", "inputs": []}]
    y = [{"type": "function", "name": "g", "inputs": []}]
    with open_store(pg_url) as first, open_store(pg_url) as second:
        first.add_contract(Contract(1, C, abi=x))
        reading, go_on = threading.Event(), threading.Event()
        older = first._older_in_unsettled_runs

        def paused(cur: Any, contract: Contract, version: int, redone: int | None) -> list[int]:
            reading.set()
            go_on.wait(10)
            return older(cur, contract, version, redone)

        first._older_in_unsettled_runs = paused  # type: ignore[method-assign]
        same = threading.Thread(target=first.add_contract, args=(Contract(1, C, abi=x),))
        same.start()
        assert reading.wait(10)
        other = threading.Thread(target=second.add_contract, args=(Contract(1, C, abi=y),))
        other.start()
        other.join(1.0)  # it waits for the first's lock (before: it committed at once)
        go_on.set()
        same.join(10)
        other.join(10)
        (contract,) = second.list_contracts()
    assert contract.abi == y


def test_gap_order_puts_unknown_blocks_last_and_streams_by_key(store: Store) -> None:
    refs = [Ref(1, C, h(i), None if i % 5 == 0 else 100 - i) for i in range(1, 41)]
    assert store.add_refs(iter(refs)).new == 40
    assert store.add_refs(iter(refs)).new == 0  # duplicates are fine
    got = list(store.iter_gap(1, C, chunk=7))
    assert [r.key for r in got] == sorted(r.key for r in refs)
    assert all(r.block_number is None for r in got[-8:])
    assert got[-1].key[0] == UNKNOWN_BLOCK_KEY
    # keyset resume and an inclusive start
    mid = got[10].key
    assert [r.key for r in store.iter_gap(1, C, after=mid, chunk=3)] == [r.key for r in got[11:]]
    assert [r.key for r in store.iter_gap(1, C, start=mid, upto=got[20].key)] == [
        r.key for r in got[10:21]
    ]


def test_a_batch_mixing_new_and_stored_rows_stores_all_and_updates_the_old(store: Store) -> None:
    # PostgreSQL COPYs new rows straight into the tables; a row already there makes it
    # fall back to the staged upsert, which must leave nothing half-written.
    store.write(Enriched([tx_row(1, 51)], [log_row(1, 51)]))
    again = [tx_row(1, 51, method_name="changed"), tx_row(2, 52), tx_row(2, 52)]
    store.write(Enriched(again, [log_row(1, 51), log_row(2, 52)]))
    txs = {t["tx_hash"]: t for t in store.fetch_transactions(1)}
    assert sorted(txs) == [h(1), h(2)]
    assert txs[h(1)]["method_name"] == "changed"
    assert [(g["tx_hash"], g["log_index"]) for g in store.fetch_logs(1)] == [(h(1), 0), (h(2), 0)]


def test_a_batch_of_many_rows_upserts_each_in_order_whatever_statement_it_falls_in(store: Store) -> None:
    # SQLite inserts a batch's rows 20 a statement (ROWS_PER_INSERT), the rest one a
    # statement: a key stored before, or twice in one statement, or in two, is updated as
    # with a statement per row, and counted as new once.
    store.write(Enriched([tx_row(i, 50 + i) for i in range(0, 45, 2)],
                         [log_row(i, 50 + i) for i in range(0, 45, 2)]))  # fmt: skip
    again = [tx_row(i, 50 + i, method_name="again") for i in range(45)]
    txs = [*again[:10], again[3], *again[10:], again[7]]  # 3 twice in one statement, 7 in two
    assert store.write(Enriched(txs, [log_row(i, 50 + i) for i in range(45)])) == 22
    stored = store.fetch_transactions(1)
    assert [t["tx_hash"] for t in stored] == [h(i) for i in range(45)]
    assert {t["method_name"] for t in stored} == {"again"}
    assert [g["tx_hash"] for g in store.fetch_logs(1)] == [h(i) for i in range(45)]


def test_a_write_after_one_rolled_back_mid_upsert_still_upserts(store: Store) -> None:
    # A commit group whose transaction failed after a staged upsert (a deadlock between two
    # workers writing a shared transaction) took PostgreSQL's temporary staging tables with
    # it, and every later upsert on that connection said 'relation "stage_tx" does not
    # exist': the worker gave back batch after batch.
    store.write(Enriched([tx_row(1, 51)], [log_row(1, 51)]))
    with pytest.raises(RuntimeError), store._tx() as cur:
        store._upsert(cur, [tx_row(1, 51), tx_row(2, 52)], [log_row(1, 51)])  # stages: row 1 is there
        raise RuntimeError("the transaction fails after the staged upsert")
    store.write(Enriched([tx_row(1, 51, method_name="again"), tx_row(3, 53)], [log_row(1, 51)]))
    txs = {t["tx_hash"]: t for t in store.fetch_transactions(1)}
    assert sorted(txs) == [h(1), h(3)] and txs[h(1)]["method_name"] == "again"


def test_upsert_twice_is_the_same_database_and_exact(store: Store) -> None:
    store.add_refs([Ref(1, C, h(i), 50 + i) for i in range(10)])
    e = Enriched([tx_row(i, 50 + i) for i in range(5)], [log_row(i, 50 + i) for i in range(5)])
    store.write(e)
    first = store.fetch_transactions(1), store.fetch_logs(1)
    store.write(e)
    assert (store.fetch_transactions(1), store.fetch_logs(1)) == first
    row = first[0][0]
    assert row["value"] == 2**70 and row["max_fee_per_gas"] == 2**65
    assert row["access_list"] == [{"address": C, "storageKeys": [h(1)]}]
    assert row["method_args"] == {"to": C, "amount": "5"}
    assert first[1][0]["event_args"] == {"value": str(2**80)}
    assert store.count_gap(1, C) == 5
    (st,) = store.status()
    assert (st.refs, st.enriched, st.missing, st.failed, st.min_block, st.max_block) == (
        10, 5, 5, 0, 50, 59,
    )  # fmt: skip


def test_extreme_and_missing_values_are_stored_exactly(store: Store) -> None:
    # PostgreSQL copies rows in binary, each column as its type: the largest 256-bit
    # quantity, a type no fork of Ethereum defines, NULLs in every optional column, and a
    # decoded string holding NUL (which JSONB refuses: U+FFFD there) come back as given.
    big = 2**256 - 1
    odd = tx_row(1, 2**62, value=big, nonce=0, gas=big, gas_price=big, max_fee_per_gas=None,
                 max_priority_fee_per_gas=None, tx_type=0x7E, status=None, root=h(7),
                 block_timestamp=None, to_address=None, created_contract=C, access_list=None,
                 max_fee_per_blob_gas=big, blob_versioned_hashes=[h(3)], blob_gas_used=0,
                 blob_gas_price=big, authorization_list=[{"chainId": "0x1", "r": None}],
                 method_id=None, method_name=None, method_args={"s": "a\x00b", "n": [1, None]},
                 log_count=2**31 - 1)  # fmt: skip
    log = LogRow(1, h(1), 2**31 - 1, 2**62, C, None, None, None, None, "0x", None, None)
    store.write(Enriched([odd], [log]))
    (row,) = store.fetch_transactions(1)
    on_pg = type(store).__name__ == "PostgresStore"
    expected = odd._replace(method_args={"s": "a\ufffdb" if on_pg else "a\x00b", "n": [1, None]})
    assert {k: row[k] for k in TxRow._fields} == expected._asdict()
    (got,) = store.fetch_logs(1)
    assert {k: got[k] for k in LogRow._fields} == log._asdict()


def test_a_decoded_string_holding_a_literal_backslash_u0000_is_kept_exactly(store: Store) -> None:
    # A NUL becomes U+FFFD on PostgreSQL, replaced in the JSON text, where orjson writes it
    # "\u0000": a literal backslash then "u0000" is written "\\u0000", whose last six
    # characters matched too, and the string was stored with a literal "\ufffd".
    text = "C:\\u0000dir"  # backslash, then u0000: no NUL character anywhere
    both = "\\\x00"  # a backslash, then a NUL: U+FFFD on PostgreSQL, the backslash kept
    kept = "\\\ufffd" if type(store).__name__ == "PostgresStore" else both
    store.write(Enriched([tx_row(1, 51, method_args={"path": text, "both": both})],
                         [LogRow(1, h(1), 0, 51, C, h(99), None, None, None, "0x", "E", {"s": text})]))
    (tx,) = store.fetch_transactions(1)
    (log,) = store.fetch_logs(1)
    assert tx["method_args"] == {"path": text, "both": kept}
    assert log["event_args"] == {"s": text}


def test_postgres_copies_each_column_as_the_schema_types_it(pg_url: str) -> None:
    # Rows are copied in binary, which needs each column's exact type: the list must follow
    # the schema (a migration that changes a column's type changes it too).
    from gapfill.store.base import LOG_COLUMNS, TX_COLUMNS
    from gapfill.store.postgres import COPY_TYPES, PostgresStore

    with PostgresStore(pg_url) as s:
        for table, columns in (("transactions", TX_COLUMNS), ("logs", LOG_COLUMNS)):
            rows = s._live().execute(
                "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped", (table,)
            ).fetchall()
            assert {c: COPY_TYPES[c] for c in columns} == {c: ty for c, ty in rows if c in columns}
            s._live().rollback()


def test_permanent_failures_leave_the_gap_transient_ones_stay(store: Store) -> None:
    store.add_refs([Ref(1, C, h(i), 7) for i in range(4)])
    store.write(Enriched(failures=[Failure(1, h(0), C, "not_found", "null"),
                                   Failure(1, h(1), C, "rpc_error", "timeout")]))  # fmt: skip
    assert {r.tx_hash for r in store.iter_gap(1, C)} == {h(1), h(2), h(3)}
    assert store.has_gap(1, C) and not store.has_gap(2, C)
    assert store.status()[0].failed == 1
    listed = store.list_failures()
    assert len(listed) == 2
    # The same text on both backends: UTC, milliseconds, "Z".
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", at) for _, at in listed), listed
    first = dict((f.tx_hash, at) for f, at in listed)[h(1)]
    time.sleep(0.01)
    store.write(Enriched(failures=[Failure(1, h(1), C, "rpc_error", "timeout again")]))
    (again,) = [(f, at) for f, at in store.list_failures() if f.tx_hash == h(1)]
    assert again[0].attempts == 2 and again[1] > first  # "last recorded" is the last time
    assert store.clear_failures() == 1
    assert store.count_gap(1, C) == 4
    # enriching a failed tx clears its failure, a retried one's too
    store.write(Enriched([tx_row(0, 7), tx_row(1, 7)]))
    assert store.list_failures() == []


def test_a_retried_failure_that_fails_again_counts_its_attempts(store: Store) -> None:
    """`enrich --retry-failed` puts the ref back into the gap but keeps its record: failing
    again is its second attempt, not a first one."""
    store.add_refs([Ref(1, C, h(1), 7)])
    store.write(Enriched(failures=[Failure(1, h(1), C, "not_found", "null")]))
    assert store.clear_failures(1, C) == 1
    assert [r.tx_hash for r in store.iter_gap(1, C)] == [h(1)]  # back in the gap
    assert store.count_permanent_failures(1, C) == 0 and store.status()[0].failed == 0
    store.write(Enriched(failures=[Failure(1, h(1), C, "not_found", "null again")]))
    ((f, _),) = store.list_failures()
    assert (f.reason, f.attempts, f.last_error) == ("not_found", 2, "null again")
    assert store.count_gap(1, C) == 0


def test_plan_cuts_keyset_batches_and_a_second_plan_joins(store: Store) -> None:
    store.add_refs([Ref(1, C, h(i), i // 3) for i in range(1, 1001)])
    store.add_refs([Ref(1, C, h(5000 + i), None) for i in range(10)])
    run = store.create_run("concurrent", 2)
    info = store.plan(run, [(1, C)], batch_size=300)
    assert (info.batches, info.refs, info.joined) == (4, 1010, 0)
    again = store.plan(store.create_run("concurrent", 2), [(1, C)], batch_size=300)
    assert again.joined == 1 and again.batches == 0
    seen: list[str] = []
    while (b := store.lease("w1", 60.0)) is not None:
        refs = store.batch_refs(b)
        assert len(refs) == b.size
        seen += [r.tx_hash for r in refs]
        assert store.commit_batch(b, Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0)
                                               for r in refs]))  # fmt: skip
    assert len(seen) == len(set(seen)) == 1010
    assert store.count_gap(1, C) == 0 and not store.has_gap(1, C)
    counts = store.batch_counts(run)
    assert counts.done == counts.total == 4 and counts.succeeded == 1010


def test_a_batchs_succeeded_counts_its_own_refs_not_its_riders_rows(store: Store) -> None:
    # A batch writes its riders' rows (refs of another batch in the blocks it fetched whole)
    # with its own, by commit or give-back: batches.succeeded counted them as its own.
    other = "0x" + "ef" * 20
    for c in (C, other):
        store.add_contract(Contract(1, c))
    store.add_refs([Ref(1, C, h(i), 1) for i in range(1, 5)])
    store.add_refs([Ref(1, other, h(i), 1) for i in range(11, 17)])
    run = store.create_run("batch", 1)
    store.plan(run, [(1, C)], batch_size=2)
    a, b = store.lease("w1", 60.0), store.lease("w1", 60.0)
    assert a is not None and b is not None

    def rows(own: Sequence[Ref], riders: range) -> Enriched:
        return Enriched([*(tx_row(int(r.tx_hash, 16), 1) for r in own), *(tx_row(i, 1) for i in riders)],
                        rode={h(i) for i in riders})  # fmt: skip

    assert store.commit_batch(a, rows(store.batch_refs(a), range(11, 14)))
    assert store.abandon_keeping(b, "TransientFailures: 1 failed",
                                 rows(store.batch_refs(b)[:1], range(14, 17))) == GivenBack(4)  # fmt: skip
    assert store.batch_counts(run).succeeded == 3  # 2 + 1 of their own; 6 riders' rows stored too
    assert store.count_gap(1, other) == 0

def test_lost_lease_commits_nothing(store: Store) -> None:
    store.add_refs([Ref(1, C, h(i), 1) for i in range(1, 11)])
    store.plan(store.create_run("concurrent", 2), [(1, C)], batch_size=500)
    a = store.lease("a", 0.05)
    assert a is not None
    time.sleep(0.1)
    assert not store.renew(a, 60.0)
    b = store.lease("b", 60.0)
    assert b is not None and b.id == a.id and b.attempts == 2
    assert store.commit_batch(a, Enriched([tx_row(1, 1)])) is False
    assert store.fetch_transactions(1) == []
    assert store.renew(b, 60.0)
    assert store.commit_batch(b, Enriched([tx_row(1, 1)]))
    events = [(e.owner, e.event) for e in store.lease_events(a.id)]
    assert events == [("a", "leased"), ("a", "expired"), ("b", "leased"), ("b", "renewed"),
                      ("b", "committed")]  # fmt: skip


def test_a_commit_group_writes_only_the_batches_whose_lease_is_held(store: Store) -> None:
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 31)])
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=10)
    a, b, c = (store.lease("w", 60.0) for _ in range(3))
    assert a is not None and b is not None and c is not None
    store.abandon(b, "given back meanwhile")

    def rows(batch: Batch) -> Enriched:
        refs = store.batch_refs(batch)
        failures = [Failure(1, h(99), C, "not_found", "null")] if batch is c else []
        return Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in refs], failures=failures)

    group = [(a, rows(a)), (b, rows(b)), (c, rows(c))]
    assert store.commit_batches(group) == [10, None, 10]  # transactions newly stored; b not held
    assert len(store.fetch_transactions(1)) == 20
    assert {r.tx_hash for r in store.iter_gap(1, C)} == {r.tx_hash for r in store.batch_refs(b)}
    assert len(store.list_failures()) == 1
    assert [e.event for e in store.lease_events(c.id)] == ["leased", "committed"]
    assert [e.event for e in store.lease_events(b.id)] == ["leased", "abandoned"]
    counts = store.batch_counts()
    assert (counts.done, counts.pending, counts.succeeded) == (2, 1, 20)


def test_lease_outcomes_say_how_each_leases_attempt_ended(store: Store) -> None:
    # What a worker asks after a write whose answer was lost: whether that write landed.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 41)])
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=10)
    a, b, c, d = (store.lease("w", 60.0) for _ in range(4))
    assert a is not None and b is not None and c is not None and d is not None
    assert store.commit_batches([(a, Enriched())]) == [0]
    store.abandon(b, "given back")
    assert store.lease("x", 60.0) == replace(b, attempts=2, lease_owner="x", lease_expires_at=ANY)
    other_attempt = replace(d, attempts=d.attempts + 1)
    assert store.lease_outcomes([a, b, c, other_attempt]) == {a.id: "committed", b.id: "abandoned",
                                                             c.id: "leased"}  # fmt: skip


def test_lease_outcomes_leave_out_a_lease_that_expired(store: Store) -> None:
    # A write made after its lease expired wrote no rows but added its calls and committed:
    # "leased" would make the worker take it for one that did not land and add them again.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 11)])
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=10)
    a = store.lease("w", 0.05)
    assert a is not None
    assert store.lease_outcomes([a]) == {a.id: "leased"}
    time.sleep(0.2)
    assert store.commit_batches([(a, Enriched())], calls=5) == [None]
    assert store.lease_outcomes([a]) == {}


class CutAfterCommit:
    """A loopback TCP proxy to PostgreSQL that, once :attr:`armed`, passes the next COMMIT
    on, drops the server's answer and closes the client's connection: the commit lands, and
    the client never hears it did."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = False
        self.answer_dropped = threading.Event()
        self.cut = threading.Event()
        self._cutting = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> CutAfterCommit:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in [self.listener, *self._sockets]:
            s.close()

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
                self._sockets += [client, server]
                threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                if not up and self._cutting:  # the COMMIT's answer: never passed on
                    self.answer_dropped.set()
                    continue
                commit = up and self.armed and b"COMMIT\x00" in data
                if commit:
                    self.armed, self._cutting = False, True
                dst.sendall(data)
                if commit:
                    self.answer_dropped.wait(10)  # the server has committed
                    self.cut.set()
                    for s in (src, dst):
                        s.shutdown(socket.SHUT_RDWR)
                    self._cutting = False
                    return


def test_a_commit_whose_answer_is_cut_off_is_a_dropped_connection_the_lease_events_settle(
    pg_url: str,
) -> None:
    # The worker takes a StoreDropped as a write that may have landed, and asks
    # lease_outcomes, on the connection the store reopens, whether it did.
    with CutAfterCommit() as proxy:
        s = open_store(pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, h(i), i) for i in range(1, 11)])
        s.counts_for_run = s.create_run("batch", 1)
        s.plan(s.counts_for_run, [(1, C)], batch_size=10)
        a = s.lease("w", 60.0)
        assert a is not None
        rows = Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in s.batch_refs(a)])
        proxy.armed = True
        with pytest.raises(StoreDropped, match="lost the connection to PostgreSQL"):
            s.commit_batches([(a, rows)], calls=7)
        assert proxy.cut.is_set()
        assert s.lease_outcomes([a]) == {a.id: "committed"}
        [run] = s.list_runs()
        s.close()
    assert (run.processed, run.rpc_calls) == (10, 7)


def test_a_batch_given_back_keeps_what_its_attempt_got(store: Store) -> None:
    # An attempt in which some calls failed for a reason that may pass stores the rest as it
    # gives the batch back: the next attempt fetches only what is still in the gap.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 11)])
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=10)
    a = store.lease("a", 60.0)
    assert a is not None
    refs = store.batch_refs(a)
    got = Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in refs[:6]],
                   failures=[Failure(1, refs[6].tx_hash, C, "permanent", "rejected")])  # fmt: skip
    assert store.abandon(a, "TransientFailures: 3 failed", keep=got) is True
    assert len(store.fetch_transactions(1)) == 6
    b = store.lease("b", 60.0)
    assert b is not None and b.id == a.id and b.attempts == 2
    assert [r.tx_hash for r in store.batch_refs(b)] == [r.tx_hash for r in refs[7:]]
    # The first owner no longer holds the lease: what it brings now is not written.
    late = Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in refs[7:]])
    assert store.abandon(a, "late", keep=late) is False
    assert len(store.fetch_transactions(1)) == 6
    assert store.commit_batch(b, late)
    assert len(store.fetch_transactions(1)) == 9 and store.count_gap(1, C) == 0
    assert [(e.owner, e.event) for e in store.lease_events(a.id)] == [
        ("a", "leased"), ("a", "abandoned"), ("b", "leased"), ("b", "committed")]
    counts = store.batch_counts()
    assert (counts.done, counts.succeeded) == (1, 9)


def batch_states(store: Store) -> dict[int, tuple[str, int, int]]:
    """Each batch's state, succeeded and failed, by id."""
    with store._read() as cur:  # type: ignore[attr-defined]
        cur.execute("SELECT batch_id, state, succeeded, failed FROM batches")
        return {int(b): (st, int(s), int(f)) for b, st, s, f in cur.fetchall()}


def test_a_batch_given_back_with_all_its_refs_stored_is_done_not_pending(store: Store) -> None:
    # A Ctrl+C gives back a batch fetched and waiting for its group's commit, with its rows:
    # it stayed pending with nothing left to fetch, counted open by the next run and leased
    # for nothing; a batch given back with part of its refs stored stays pending.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 21)])
    run = store.create_run("batch", 1)
    store.plan(run, [(1, C)], batch_size=10)
    a, b = store.lease("w", 60.0), store.lease("w", 60.0)
    assert a is not None and b is not None
    refs_a, refs_b = store.batch_refs(a), store.batch_refs(b)
    every = Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in refs_a[:9]],
                     failures=[Failure(1, refs_a[9].tx_hash, C, "permanent", "rejected")])  # fmt: skip
    part = Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in refs_b[:4]])
    assert store.abandon_keeping(a, "worker stopped", every) == GivenBack(9, closed=True)
    assert store.abandon_keeping(b, "worker stopped", part) == GivenBack(4, closed=False)
    assert batch_states(store) == {a.id: ("done", 9, 1), b.id: ("pending", 4, 0)}
    assert [e.event for e in store.lease_events(a.id)] == ["leased", "committed"]
    assert [e.event for e in store.lease_events(b.id)] == ["leased", "abandoned"]
    counts = store.batch_counts()
    assert (counts.pending, counts.done, counts.succeeded, counts.failed) == (1, 1, 13, 1)
    again = store.lease("w2", 60.0)
    assert again is not None and again.id == b.id and store.lease("w2", 60.0) is None


def test_a_lease_closes_the_batches_emptied_meanwhile_instead_of_leasing_them(store: Store) -> None:
    # Batches whose refs left the gap some other way (another contract's batch stored their
    # transactions, or the start-up sample did with a batch size of 20 or less) were leased
    # once with 0 refs: a lease and a commit for nothing, and an "Assigned ... 0 refs" line.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 41)])
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=10)
    expired = store.lease("w0", 0.01)  # batch 1, its worker gone
    assert expired is not None and expired.id == 1
    time.sleep(0.05)
    store.write(Enriched([tx_row(i, i) for i in (*range(1, 11), *range(11, 21))]))  # batches 1, 2
    b = store.lease("w", 60.0)
    assert b is not None and b.id == 3 and len(store.batch_refs(b)) == 10
    assert [e.event for e in store.lease_events(1)] == ["leased", "expired", "emptied"]
    assert [e.event for e in store.lease_events(2)] == ["emptied"]
    assert {i: s for i, (s, _, _) in batch_states(store).items()} == {
        1: "done", 2: "done", 3: "leased", 4: "pending"}
    store.write(Enriched([tx_row(i, i) for i in range(31, 41)]))  # batch 4, the last
    assert store.lease_next("w", 60.0) == Leased(None, emptied=1)
    assert store.batch_counts().done == 3


def test_a_plan_joined_closes_its_batches_with_nothing_left_to_fetch(store: Store) -> None:
    # Batches left pending with their refs stored (given back before a give-back closed them,
    # or their transactions stored by another contract's batches) were counted as open
    # batches by the next run, which leased them for nothing.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 31)])
    first = store.create_run("batch", 1)
    store.plan(first, [(1, C)], batch_size=10)
    held = [store.lease("w", 60.0) for _ in range(3)]
    assert all(b is not None for b in held)
    batches = [b for b in held if b is not None]
    for b in batches:
        assert store.abandon(b, "worker stopped")
    # Batch 1's and batch 3's refs are stored meanwhile (as a give-back used to leave them).
    for b in (batches[0], batches[2]):
        store.write(Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in store.batch_refs(b)]))
    info = store.plan(store.create_run("batch", 1), [(1, C)], batch_size=10)
    assert (info.joined, info.batches) == (1, 0)
    states = {i: state for i, (state, _, _) in batch_states(store).items()}
    assert states == {batches[0].id: "done", batches[1].id: "pending", batches[2].id: "done"}
    assert [e.event for e in store.lease_events(batches[0].id)][-1] == "emptied"
    # Once the rest is stored too, the plan is closed whole, and nothing is left to join.
    store.write(Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0)
                          for r in store.batch_refs(batches[1])]))  # fmt: skip
    info = store.plan(store.create_run("batch", 1), [(1, C)], batch_size=10)
    assert (info.joined, info.batches) == (0, 0) and not store.has_open_batches()


def _drain(store: Store, owner: str) -> list[str]:
    """Lease and commit every open batch, each ref stored; the refs the batches held."""
    seen: list[str] = []
    while (b := store.lease(owner, 60.0)) is not None:
        refs = store.batch_refs(b)
        seen += [r.tx_hash for r in refs]
        assert store.commit_batch(b, Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0)
                                               for r in refs]))  # fmt: skip
    return seen


def _open_ranges(store: Store) -> list[tuple[tuple[int, str], tuple[int, str]]]:
    with store._read() as cur:  # type: ignore[attr-defined]
        cur.execute("SELECT lo_block, lo_tx, hi_block, hi_tx FROM batches "
                    "WHERE state IN ('pending', 'leased') ORDER BY lo_block, lo_tx")  # fmt: skip
        return [((int(a), b), (int(c), d)) for a, b, c, d in cur.fetchall()]


def test_a_plan_joined_plans_the_refs_outside_its_open_batches(store: Store) -> None:
    # Refs imported while a plan is open, after its last key, before its first and of unknown
    # block: a run started after the import joined the plan, which covers its batches' key
    # ranges alone, and ended with every batch done and those refs still in the gap.
    store.add_refs([Ref(1, C, h(i), 10 + i) for i in range(10)])
    run1 = store.create_run("concurrent", 2)
    assert store.plan(run1, [(1, C)], batch_size=5).batches == 2
    late = [Ref(1, C, h(100), 500), Ref(1, C, h(101), 1), Ref(1, C, h(102), None), Ref(1, C, h(103), 14)]
    assert store.add_refs(late).new == 4
    # h(103) sorts between the two batches' ranges (block 14: after h(4)'s key, before h(5)'s).
    info = store.plan(store.create_run("concurrent", 2), [(1, C)], batch_size=5)
    assert (info.joined, info.batches, info.refs) == (1, 3, 4)
    ranges = _open_ranges(store)
    assert all(hi < lo for (_, hi), (lo, _) in itertools.pairwise(ranges)), ranges  # none overlap
    # A second run joining now finds nothing outside the open batches: no batch twice.
    again = store.plan(store.create_run("concurrent", 2), [(1, C)], batch_size=5)
    assert (again.joined, again.batches) == (1, 0)
    assert sorted(_drain(store, "w1")) == sorted([h(i) for i in range(10)] + [r.tx_hash for r in late])
    assert store.count_gap(1, C) == 0


def _first_done_ref_3_failed(store: Store) -> None:
    """Refs 0-9 (blocks 10-19) planned in 2 batches of 5; the first committed with ref 3
    failed for good, the second (blocks 15-19) left pending, as a Ctrl+C leaves it."""
    store.add_refs([Ref(1, C, h(i), 10 + i) for i in range(10)])
    assert store.plan(store.create_run("batch", 1), [(1, C)], batch_size=5).batches == 2
    b1 = store.lease("w1", 60.0)
    assert b1 is not None
    ok = [r for r in store.batch_refs(b1) if r.tx_hash != h(3)]
    assert store.commit_batch(b1, Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in ok],
                                           failures=[Failure(1, h(3), C, "permanent", "boom")]))  # fmt: skip


def test_a_plan_joined_after_retry_failed_fetches_the_refs_put_back(store: Store) -> None:
    # Batch 1 commits with ref 3 failed for good; Ctrl+C leaves batch 2 pending. `enrich
    # --retry-failed` puts ref 3 back into the gap and its run joins the open plan: only
    # batch 2 was leased, ref 3 never tried, and the run ended `done`.
    _first_done_ref_3_failed(store)
    assert store.clear_failures(1, C) == 1  # --retry-failed
    assert store.count_gap(1, C) == 6
    info = store.plan(store.create_run("batch", 1), [(1, C)], batch_size=5)
    assert (info.joined, info.batches, info.refs) == (1, 1, 1)
    assert h(3) in _drain(store, "w2")
    assert store.count_gap(1, C) == 0


def test_a_dry_run_counts_the_batches_a_joined_plan_adds_as_the_plan_cuts_them(store: Store) -> None:
    # A plan joined cuts new batches for the gap outside its open batches (b66bec7); the dry
    # run said "joins the open plan" alone, its batches those of a plan that never happens.
    from gapfill.engine.dryrun import estimate
    from gapfill.enrich.fetch import PlanSettings

    _first_done_ref_3_failed(store)
    # Imported since: one before the open batch (blocks 15-19), two after it, one inside.
    assert store.add_refs([Ref(1, C, h(103), 14), Ref(1, C, h(120), 30), Ref(1, C, h(121), 31),
                           Ref(1, C, h(117), 17)]).new == 4  # fmt: skip
    plan = PlanSettings(shape="per_tx")
    [row] = estimate(store, [(1, C)], batch_size=5, plan=plan)
    assert (row.missing, row.joins, row.batches, row.outside) == (9, True, 2, 3)
    # --retry-failed puts h(3) (block 13) back first: it goes with h(103), before the open batch.
    [row] = estimate(store, [(1, C)], batch_size=5, plan=plan, retry_failed=True)
    assert (row.missing, row.joins, row.batches, row.outside) == (10, True, 2, 4)
    assert store.clear_failures(1, C) == 1
    info = store.plan(store.create_run("batch", 1), [(1, C)], batch_size=5)
    assert (info.joined, info.batches, info.refs) == (1, row.batches, row.outside)
    # Nothing is left outside the open batches now; without an open plan, the whole gap.
    [row] = estimate(store, [(1, C)], batch_size=5, plan=plan)
    assert (row.joins, row.batches, row.outside) == (True, 0, 0)
    [row] = estimate(store, [(1, "0x" + "ef" * 20)], batch_size=5, plan=plan)
    assert (row.joins, row.batches) == (False, 0)


def test_a_stops_give_back_is_no_failed_attempt_but_a_lease_of_its_own(store: Store) -> None:
    # Two Ctrl+C's while a batch was in flight made its third lease attempt 3, the last
    # (MAX_ATTEMPTS): its transient failures stored at once, though it never failed. A
    # stop's give-back leaves its tries; the lease number (a lease's identity with its
    # owner, for the writes' lease check and the audit) still counts every lease.
    store.add_refs([Ref(1, C, h(i), 10 + i) for i in range(5)])
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=5)
    first = store.lease("w", 60.0)
    assert first is not None and (first.attempts, first.tries) == (1, 1)
    assert store.abandon(first, "worker stopped", stop=True)
    second = store.lease("w", 60.0)
    assert second is not None and (second.attempts, second.tries) == (2, 1)
    assert store.release_owner("w", "run stopped", stop=True) == 1  # a stop's last try
    third = store.lease("w", 60.0)
    assert third is not None and (third.attempts, third.tries) == (3, 1) and third.tries < MAX_ATTEMPTS
    # The same owner's earlier leases are not this one: they write nothing.
    assert not store.commit_batch(first, Enriched()) and not store.renew(second, 60.0)
    assert [(e.attempt, e.event) for e in store.lease_events(third.id)] == [
        (1, "leased"), (1, "abandoned"), (2, "leased"), (2, "abandoned"), (3, "leased")]  # fmt: skip
    # A failed attempt's give-back, and a lease left to expire (a crash), still count.
    assert store.abandon(third, "HTTP 503")
    fourth = store.lease("w", 0.1)
    assert fourth is not None and (fourth.attempts, fourth.tries) == (4, 2)
    time.sleep(0.2)
    assert [b.id for b in store.expire_leases()] == [fourth.id]
    last = store.lease("w", 60.0)
    assert last is not None and (last.attempts, last.tries) == (5, MAX_ATTEMPTS)
    assert store.commit_batch(last, Enriched())


@pytest.mark.parametrize("taken_back", ["expired", "leased", "released"])
@pytest.mark.parametrize(("state", "note", "counted"), [
    ("interrupted", None, False), ("interrupted", DEAD_RUN_NOTE, True), ("failed", "node gone", True)])
def test_a_lease_a_stopped_runs_give_back_left_is_no_failed_attempt_when_taken_back(
    store: Store, taken_back: str, state: str, note: str | None, counted: bool,
) -> None:
    # A stop's give-back that met the database down left the lease to expire: taken back
    # by a coordinator, by another worker's lease or as a dead owner's, it counted as a
    # failed attempt, and a few such stops took a healthy batch to its last attempt. A run
    # found killed or crashed, or one that failed, is no stop: its leases still count.
    store.add_refs([Ref(1, C, h(i), 10 + i) for i in range(5)])
    run = store.create_run("concurrent", 1)
    store.plan(run, [(1, C)], batch_size=5)
    owner = f"host:1/run{run}/w1"
    left = store.lease(owner, 0.1)
    assert left is not None and left.tries == 1
    store.finish_run(run, state, note=note)
    time.sleep(0.2)
    if taken_back == "expired":
        assert [b.id for b in store.expire_leases()] == [left.id]
    elif taken_back == "released":
        assert store.release_owner(owner, "owner process is gone") == 1
    again = store.lease("w", 60.0)
    assert again is not None and again.id == left.id
    assert (again.attempts, again.tries) == (2, 2 if counted else 1)


def test_abandoned_batch_prefers_another_owner(store: Store) -> None:
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 21)])
    store.plan(store.create_run("concurrent", 2), [(1, C)], batch_size=10)
    first = store.lease("a", 60.0)
    assert first is not None
    store.abandon(first, "boom")
    again = store.lease("a", 60.0)
    assert again is not None and again.id != first.id
    other = store.lease("b", 60.0)
    assert other is not None and other.id == first.id and other.attempts == 2


def test_a_batch_given_back_after_a_failure_waits_out_its_pause(store: Store) -> None:
    # A node lagging by seconds failed a batch's three attempts back to back; the
    # attempts are now spaced out.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 11)])
    store.plan(store.create_run("concurrent", 2), [(1, C)], batch_size=10)
    first = store.lease("a", 60.0)
    assert first is not None
    assert store.abandon(first, "boom", retry_after_s=3600.0)
    assert store.lease("b", 60.0) is None  # held back ...
    assert store.has_open_batches()  # ... but still the plan's: workers wait for it
    assert store.batch_counts().pending == 1
    store.expire_leases()  # a supervisor's sweep leaves a pending batch alone
    assert store.lease("b", 60.0) is None
    assert store.abandon(first, "again") is False  # no longer a's to give back


def test_a_batch_given_back_after_a_failure_is_leased_again_after_its_pause(store: Store) -> None:
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 11)])
    store.plan(store.create_run("concurrent", 2), [(1, C)], batch_size=10)
    first = store.lease("a", 60.0)
    assert first is not None and store.abandon(first, "boom", retry_after_s=0.05)
    time.sleep(0.1)
    again = store.lease("b", 60.0)
    assert again is not None and again.id == first.id and again.attempts == 2


def test_release_owner_keeps_the_batches_still_worked_on(store: Store) -> None:
    # A worker whose lease answer was lost gives back what it may have been granted,
    # not the batches its tasks are working on.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 31)])
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=10)
    working, orphan = store.lease("w", 60.0), store.lease("w", 60.0)
    assert working is not None and orphan is not None
    assert store.release_owner("w", "its lease answer was lost", keep={working.id}) == 1
    assert store.renew(working, 60.0)
    assert not store.renew(orphan, 60.0)
    assert [e.event for e in store.lease_events(orphan.id)] == ["leased", "abandoned"]
    assert store.batch_counts().pending == 2


def test_expire_leases_returns_them(store: Store) -> None:
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 4)])
    store.plan(store.create_run("concurrent", 1), [(1, C)])
    b = store.lease("host:1/w", 0.01)
    assert b is not None
    time.sleep(0.05)
    assert [x.id for x in store.expire_leases("host:1")] == [b.id]
    assert store.batch_counts().pending == 1


def test_expired_after_lists_the_leases_taken_back_by_a_worker_or_a_coordinator(store: Store) -> None:
    # A coordinator watches them to kill its local worker whose lease another worker took.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 31)])
    store.plan(store.create_run("concurrent", 1), [(1, C)], batch_size=10)
    start, none = store.expired_after(2**62)
    assert none == []
    a, b = store.lease("host:1/w1", 0.3), store.lease("host:1/w2", 0.3)
    assert a is not None and b is not None and a.id != b.id
    time.sleep(0.4)
    assert store.expired_after(start)[1] == []
    taken = store.lease("host:2/w3", 60.0)  # a worker takes the oldest expired lease itself
    assert taken is not None and taken.id == a.id
    assert [x.id for x in store.expire_leases()] == [b.id]  # and a coordinator the other
    top, events = store.expired_after(start)
    assert [(batch, owner, attempt) for _, batch, owner, attempt in events] == [
        (a.id, "host:1/w1", 1), (b.id, "host:1/w2", 1)]  # fmt: skip
    assert top == events[-1][0] and store.expired_after(events[0][0])[1] == events[1:]


def test_checking_for_expired_leases_does_not_take_sqlites_write_lock(tmp_path: Any) -> None:
    # Coordinators check every second; a worker's commit must not queue behind a check
    # that finds nothing.
    import sqlite3

    from gapfill.store.sqlite import SqliteStore

    with SqliteStore(f"sqlite:///{tmp_path}/x.db") as s:
        s.migrate()
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, h(i), i) for i in range(1, 4)])
        s.plan(s.create_run("concurrent", 1), [(1, C)])
        assert s.lease("w", 60.0) is not None
        s._conn.execute("PRAGMA busy_timeout=50")
        writer = sqlite3.connect(f"{tmp_path}/x.db", isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # a worker in the middle of a commit
        try:
            assert s.expire_leases() == []
        finally:
            writer.execute("ROLLBACK")
            writer.close()


def test_a_write_says_it_waits_for_another_process_lock_and_then_what_to_do(tmp_path: Any) -> None:
    import sqlite3

    from gapfill.errors import StoreError
    from gapfill.store.sqlite import SqliteStore

    path = tmp_path / "x.db"
    open_store(f"sqlite:///{path}").close()
    heard: list[str] = []
    with SqliteStore(f"sqlite:///{path}", lock_wait_s=0.2) as s:
        s.notice = heard.append
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # a `sqlite3` shell in a transaction
        try:
            with pytest.raises(StoreError) as err:
                s.add_contract(Contract(1, C))
            assert s.list_contracts() == []  # reads go on beside it
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert heard == [f"the SQLite database {path} is locked by another process: waiting up to "
                         "0.2 s for it"]  # fmt: skip
        assert str(err.value) == (f"another process holds a write lock on {path}: stop it, or wait for "
                                  "it to finish, then rerun")  # fmt: skip
        s.add_contract(Contract(1, C))  # released: the same store writes again
        assert [c.address for c in s.list_contracts()] == [C]


def test_a_read_only_sqlite_store_reads_and_refuses_writes_in_one_sentence(tmp_path: Any) -> None:
    from gapfill.errors import StoreError

    url = f"sqlite:///{tmp_path / 'x.db'}"
    with open_store(url) as s:
        s.add_contract(Contract(1, C))
    with open_store(url, read_only=True) as s:
        assert [c.address for c in s.list_contracts()] == [C]
        with pytest.raises(StoreError) as err:
            s.add_contract(Contract(1, "0x" + "cd" * 20))
    assert str(err.value) == (f"the SQLite database {tmp_path / 'x.db'} is read-only (the file or its "
                              "folder): make it writable, or set --db / GAPFILL_DB to another "
                              "database")  # fmt: skip
    # Refused until fixed, as PostgreSQL's read-only database: a run stops at once with it
    # (it retried it for its database outage window, a concurrent run restarting workers).
    assert isinstance(err.value, StoreRefused)
    with open_store(url) as s:
        assert [c.address for c in s.list_contracts()] == [C]


def test_a_full_sqlite_database_is_refused_in_one_sentence(tmp_path: Any) -> None:
    # SQLITE_FULL was a plain StoreError, which a run retried for its database outage window
    # (a concurrent run restarting each worker that met it), where PostgreSQL's full disk ends
    # the run at once with what to do. A page limit makes SQLite fail as a full disk does.
    from gapfill.store.sqlite import SqliteStore

    path = tmp_path / "x.db"
    with SqliteStore(f"sqlite:///{path}") as s:
        s.migrate()
        s.add_contract(Contract(1, C))
        pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
        s._conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreRefused) as err:
            s.add_refs([Ref(1, C, h(i), i) for i in range(1, 5_001)])
        assert str(err.value) == (f"the SQLite database {path} has no space left to write (database or "
                                  "disk is full): free space on its disk (or move the database and set "
                                  "--db / GAPFILL_DB to it)")  # fmt: skip
        assert err.value.fix.startswith("free space")
        assert list(s.iter_gap(1, C)) == []  # the transaction that failed wrote nothing
        assert [c.address for c in s.list_contracts()] == [C]  # and it still reads


def test_runs_are_listed(store: Store) -> None:
    r = store.create_run("batch", 1, note="x")
    assert store.finish_run(r, "done", 25)[:3] == (0, 0, 25)
    (info,) = store.list_runs()
    assert (info.run_id, info.state, info.processed, info.failed, info.rpc_calls) == (r, "done", 0, 0, 25)


def test_a_runs_counts_are_kept_by_the_writes_they_count(store: Store) -> None:
    # Counted in the transaction that writes the rows: a run killed outright, or a worker
    # killed before it told its coordinator, leaves exactly what was written in `runs`; so
    # are the RPC calls a worker made since its previous write, whatever that write did.
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 31)])
    run = store.create_run("concurrent", 2)
    store.plan(run, [(1, C)], batch_size=10)
    store.counts_for_run = run
    a, b, c = (store.lease("w", 60.0) for _ in range(3))
    assert a is not None and b is not None and c is not None
    store.abandon(b, "given back meanwhile", calls=1)

    def rows(batch: Batch, n: int) -> Enriched:
        refs = store.batch_refs(batch)[:n]
        return Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in refs],
                        failures=[Failure(1, h(99), C, "permanent", "rejected")])  # fmt: skip

    assert store.commit_batches([(a, rows(a, 10)), (b, rows(b, 10))], calls=20) == [10, None]  # b: not held
    assert store.abandon(c, "TransientFailures: 4 failed", keep=rows(c, 6), calls=4) is True
    assert store.abandon(b, "no longer held", keep=rows(b, 3), calls=8) is False  # its calls count
    assert store.commit_batches([(b, rows(b, 10))], calls=16) == [None]  # as do these
    store.write(Enriched([tx_row(40, 40)]), calls=2)  # a start-up sample's row
    store.add_run_calls(32)  # a worker's last calls, as it ends
    store.counts_for_run = None
    store.write(Enriched([tx_row(41, 41)]), calls=64)  # no run's
    store.add_run_calls(128)
    (info,) = store.list_runs()
    assert (info.state, info.processed, info.failed, info.rpc_calls) == ("running", 17, 2, 83)
    assert store.finish_run(run, "done", 3)[:3] == (17, 2, 86)  # the coordinator's own calls
    store.counts_for_run = run
    store.add_run_calls(5)  # a killed coordinator's orphaned worker, ending after a rerun
    (info,) = store.list_runs()
    assert (info.state, info.processed, info.failed, info.rpc_calls) == ("done", 17, 2, 91)


def test_a_transaction_stored_again_from_another_block_keeps_only_its_new_logs(store: Store) -> None:
    # Two batches (two contracts sharing a tx, or a rider and its own batch) fetch the same
    # transaction on both sides of a reorg: block 51 gave it logs 3 and 4, block 52 logs 0, 1.
    # The second write updated the row but left logs 3 and 4 of the dead block.
    old = [log_row(1, 51)._replace(log_index=i) for i in (3, 4)]
    new = [log_row(1, 52)._replace(log_index=i) for i in (0, 1)]
    store.write(Enriched([tx_row(1, 51, log_count=2)], old))
    store.write(Enriched([tx_row(1, 52, block_hash=h(777), log_count=2)], new))
    (tx,) = store.fetch_transactions(1)
    assert (tx["block_number"], tx["block_hash"]) == (52, h(777))
    assert sorted((g["log_index"], g["block_number"]) for g in store.fetch_logs(1)) == [(0, 52), (1, 52)]
    store.write(Enriched([tx_row(1, 53, log_count=0)], []))  # a block where it logged nothing
    assert store.fetch_logs(1) == []


def test_a_commit_group_holding_two_versions_of_a_transaction_stores_one_whole(store: Store) -> None:
    # Two contracts' batches in one commit group fetched a transaction they share on either
    # side of a reorg: the row came from one (PostgreSQL: DISTINCT ON, any) and the logs
    # from both. Now the last batch's row and its logs, as one fetch made them.
    D = "0x" + "cd" * 20
    store.add_contract(Contract(1, D, label="other"))
    store.add_refs([Ref(1, c, h(1), None) for c in (C, D)])
    run = store.create_run("concurrent", 2)
    store.plan(run, [(1, C), (1, D)], batch_size=10)
    first, last = sorted((store.lease("w", 60.0) for _ in range(2)), key=lambda b: b.id if b else 0)
    assert first is not None and last is not None
    old = Enriched([tx_row(1, 51, log_count=2)], [log_row(1, 51)._replace(log_index=i) for i in (3, 4)])
    new = Enriched([tx_row(1, 52, block_hash=h(777), log_count=1)], [log_row(1, 52)])
    assert store.commit_batches([(last, new), (first, old)]) == [0, 1]  # counted for the first
    (tx,) = store.fetch_transactions(1)
    assert (tx["block_number"], tx["block_hash"], tx["log_count"]) == (52, h(777), 1)
    assert [(g["log_index"], g["block_number"]) for g in store.fetch_logs(1)] == [(0, 52)]


def test_a_transaction_two_contracts_share_counts_once_in_the_run(store: Store) -> None:
    # Two contracts' batches in flight at once both fetch a transaction they share: a run's
    # `processed` counts the transactions it newly stored, so each once, whichever batch
    # (in one commit group, in two commits, or a batch given back with what it got) wrote it.
    D = "0x" + "cd" * 20
    store.add_contract(Contract(1, D, label="other"))
    store.add_refs([Ref(1, c, h(i), i) for c in (C, D) for i in range(1, 31)])
    run = store.create_run("concurrent", 2)
    store.plan(run, [(1, C), (1, D)], batch_size=10)
    store.counts_for_run = run
    batches = [store.lease("w", 60.0) for _ in range(6)]
    assert all(b is not None for b in batches)
    by = {(b.contract, b.lo): b for b in batches if b is not None}
    c1, c2, c3 = (b for (c, _), b in sorted(by.items()) if c == C)
    d1, d2, d3 = (b for (c, _), b in sorted(by.items()) if c == D)

    def rows(batch: Batch, upto: int | None = None) -> Enriched:
        return Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0)
                         for r in store.batch_refs(batch)[:upto]])  # fmt: skip

    fetched = [rows(b) for b in (c1, c2, c3, d1, d2, d3)]  # all fetched before any commit
    # Per batch, the transactions it newly stored (the engine's totals and events count these).
    assert store.commit_batches([(c1, fetched[0]), (d1, fetched[3])]) == [10, 0]  # one group
    assert store.commit_batches([(c2, fetched[1])]) == [10]
    assert store.commit_batches([(d2, fetched[4])]) == [0]  # a later commit, rows already there
    assert store.abandon_keeping(d3, "TransientFailures: 5 failed", keep=rows(d3, 5)) == GivenBack(5)
    assert store.commit_batches([(c3, fetched[2])]) == [5]  # 5 new, 5 stored by d3
    assert len(store.fetch_transactions(1)) == 30
    (info,) = store.list_runs()
    assert info.processed == 30
    assert store.finish_run(run, "done", 0)[:3] == (30, 0, 0)


def test_a_new_sqlite_file_gets_big_pages_an_existing_one_keeps_its_own(tmp_path: Any) -> None:
    import sqlite3

    from gapfill.store.sqlite import PAGE_SIZE, WAL_CHECKPOINT_BYTES

    with open_store(f"sqlite:///{tmp_path}/new.db") as s:
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, h(1), 7)])
    conn = sqlite3.connect(tmp_path / "new.db")
    assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
    conn.close()

    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("CREATE TABLE t (a)")  # an existing file with SQLite's default 4 KiB pages
    old.close()
    with open_store(f"sqlite:///{tmp_path}/old.db") as s:
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, h(1), 7)])
        assert s.count_gap(1, C) == 1
        conn = s._conn  # type: ignore[attr-defined]
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_BYTES // 4096


def test_postgres_connections_detect_a_vanished_server_and_the_url_can_say_otherwise(
    pg_url: str,
) -> None:
    # Without keepalives a store call on a half-open connection waits for the kernel's
    # retransmission timeout (~15 min) while holding its worker's database lock.
    from gapfill.store.postgres import TCP_DEFAULTS, PostgresStore

    with PostgresStore(pg_url) as s:
        params = s._live().info.get_parameters()
        assert {k: params.get(k) for k in TCP_DEFAULTS} == {k: str(v) for k, v in TCP_DEFAULTS.items()}
    with PostgresStore(pg_url + "?keepalives_idle=7&tcp_user_timeout=5000") as s:
        params = s._live().info.get_parameters()
        assert params["keepalives_idle"] == "7" and params["tcp_user_timeout"] == "5000"
        assert params["keepalives_count"] == "3"


def test_postgres_sessions_ask_the_server_to_notice_a_vanished_client(pg_url: str) -> None:
    # A backend whose client vanished mid-transaction keeps its row locks until the
    # server's keepalive gives up (2 h by default): set per session, it is about a minute.
    from urllib.parse import quote

    from gapfill.store.postgres import SERVER_TCP_DEFAULTS, PostgresStore

    def shown(s: PostgresStore) -> dict[str, str]:
        conn = s._live()
        out = {k: str(conn.execute(f"SELECT current_setting('{k}')").fetchone()[0])  # type: ignore[index]
               for k in SERVER_TCP_DEFAULTS}  # fmt: skip
        conn.rollback()
        return out

    with PostgresStore(pg_url) as s:
        assert shown(s) == {k: str(v) for k, v in SERVER_TCP_DEFAULTS.items()}
        s._live().close()  # a reconnect sets them again
        assert shown(s)["tcp_keepalives_idle"] == "30"
    own = quote("-c tcp_keepalives_idle=7")
    with PostgresStore(f"{pg_url}?options={own}") as s:
        got = shown(s)
        assert got["tcp_keepalives_idle"] == "7" and got["tcp_keepalives_count"] == "3"
    with PostgresStore(f"{pg_url}?keepalives=0") as s:
        assert shown(s)["tcp_keepalives_idle"] != "30"  # left to the server (the kernel: 7200)


def test_postgres_sessions_run_without_jit_unless_the_url_or_pgoptions_ask_for_it(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # JIT compiling cost gapfill's large reads more than it won (status, dry-run at 1M refs).
    from urllib.parse import quote

    from gapfill.store.postgres import PostgresStore

    def jit(s: PostgresStore) -> str:
        conn = s._live()
        value = str(conn.execute("SELECT current_setting('jit')").fetchone()[0])  # type: ignore[index]
        conn.rollback()
        return value

    monkeypatch.delenv("PGOPTIONS", raising=False)
    with PostgresStore(pg_url) as s:
        assert jit(s) == "off"
        s._live().close()  # a reconnect sets it again
        assert jit(s) == "off"
    with PostgresStore(f"{pg_url}?options={quote('-c jit=on')}") as s:
        assert jit(s) == "on"
    with PostgresStore(f"{pg_url}?keepalives=0") as s:  # not one of the TCP settings
        assert jit(s) == "off"
    monkeypatch.setenv("PGOPTIONS", "-c jit=on")
    with PostgresStore(pg_url) as s:
        assert jit(s) == "on"


def test_postgres_sessions_keep_their_tcp_settings_on_a_server_without_jit(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL 10 has no 'jit' setting: set_config('jit', ...) failed the one statement
    # that also set the TCP ones, and a backend whose worker vanished kept its locks 2 h.
    from gapfill.store import postgres
    from gapfill.store.postgres import PostgresStore

    monkeypatch.delenv("PGOPTIONS", raising=False)
    monkeypatch.setattr(postgres, "SESSION_DEFAULTS", {"jit": "off", "no_such_setting": "off"})
    with PostgresStore(pg_url) as s:
        conn = s._live()
        got = conn.execute("SELECT current_setting('tcp_keepalives_idle'), current_setting('jit')").fetchone()
        conn.rollback()
    assert got == ("30", "off")


def test_a_new_run_marks_the_runs_of_dead_local_processes_interrupted(store: Store) -> None:
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = store.create_run("batch", 1)
    alive = store.create_run("batch", 1)  # this process: still running
    with store._tx() as cur:
        cur.execute(store._sql("UPDATE runs SET pid = ? WHERE run_id = ?"), (gone.pid, dead))
    store.create_run("concurrent", 2)
    states = {r.run_id: (r.state, r.note) for r in store.list_runs()}
    assert states[dead][0] == "interrupted" and "ended without finishing" in states[dead][1]
    assert states[alive][0] == "running"


def test_a_killed_runs_end_moves_to_the_rows_its_orphaned_workers_count_after_it_was_marked(
    store: Store,
) -> None:
    # Review: a coordinator killed outright leaves its workers finishing their batches (they
    # stop on the lifeline's EOF). A run started meanwhile marked it `interrupted`, ended at
    # its last event then; the workers' later commits grew its `processed` past that end,
    # and `gapfill runs` divided them by too short a time.
    import subprocess

    from gapfill.store import owner_name

    gone = subprocess.Popen(["true"])
    gone.wait()
    store.add_refs([Ref(1, C, h(i), 10 + i) for i in range(10)])
    killed = store.create_run("concurrent", 2)
    with store._tx() as cur:
        cur.execute(store._sql("UPDATE runs SET pid = ?, started_at = started_at - 10 WHERE run_id = ?"),
                    (gone.pid, killed))  # fmt: skip
    store.plan(killed, [(1, C)], batch_size=5)
    store.counts_for_run = killed  # its worker, this process: alive, its coordinator gone
    owner = owner_name("w1", killed)
    first, second = store.lease(owner, 60.0), store.lease(owner, 60.0)
    assert first is not None and second is not None
    for batch in (first, second):
        if batch is second:
            store.create_run("batch", 1)  # marks it, ended at the first commit
            time.sleep(0.01)
        rows = [tx_row(int(r.tx_hash, 16), r.block_number or 0) for r in store.batch_refs(batch)]
        assert store.commit_batch(batch, Enriched(rows))
    with store._read() as cur:
        cur.execute(store._sql("SELECT max(at) FROM lease_events WHERE owner = ? AND event = 'committed'"),
                    (owner,))  # fmt: skip
        last = float(cur.fetchone()[0])
    (info,) = (r for r in store.list_runs() if r.run_id == killed)
    assert (info.state, info.processed, info.finished_at) == ("interrupted", 10, last)


def test_only_processes_of_this_pid_namespace_or_an_earlier_boot_are_judged_dead(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: a container sharing the host's name (its own PID namespace) had its live
    # leases released and its running run marked interrupted by a run on the host, whose
    # kill(pid, 0) found no such process. An earlier boot of this machine is gone whatever
    # pid it names; an older gapfill's rows (no space) are judged by host name as before.
    import os
    import subprocess

    from gapfill.store import liveness, run_owner
    from gapfill.store.liveness import INIT_PID_NS, Space

    gone = subprocess.Popen(["true"])
    gone.wait()
    here = Space("0a0a0a0a0a0a", "b1b1b1b1b1b1", INIT_PID_NS)
    spaces = {"container": (Space(here.machine, here.boot, 4026532999), gone.pid),
              "earlier boot": (Space(here.machine, "b0b0b0b0b0b0", INIT_PID_NS), os.getpid()),
              "older gapfill": (None, gone.pid)}  # fmt: skip
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 31)])
    runs, owners = {}, {}
    for name, (space, pid) in spaces.items():
        monkeypatch.setattr(liveness, "here", lambda space=space: space)
        runs[name] = store.create_run("concurrent", 1)
        owners[name] = run_owner(liveness.owner_host(), pid, "w1", runs[name])
        with store._tx() as cur:
            cur.execute(store._sql("UPDATE runs SET pid = ? WHERE run_id = ?"), (pid, runs[name]))
        store.plan(runs[name], [(1, C)], batch_size=10)
        assert store.lease(owners[name], 60.0) is not None
    monkeypatch.setattr(liveness, "here", lambda: here)
    released = store.release_dead_local_owners()
    assert sorted(store.lease_owners()) == [owners["container"]]
    assert released == {os.getpid(): 1, gone.pid: 1}
    store.create_run("batch", 1)
    got = {r.run_id: (r.state, r.judged_here) for r in store.list_runs()}
    assert {name: got[run] for name, run in runs.items()} == {
        "container": ("running", False), "earlier boot": ("interrupted", True),
        "older gapfill": ("interrupted", True)}  # fmt: skip


def block_of(store: Store, i: int) -> int | None:
    with store._read() as cur:
        cur.execute(store._sql("SELECT block_number FROM refs WHERE tx_hash = ?"), (h(i),))
        return cur.fetchone()[0]  # type: ignore[no-any-return]


def test_refs_imported_without_a_block_get_it_from_a_later_import_discovery_or_enrichment(
    store: Store,
) -> None:
    # Hashes alone first (a plain list), then what later sources know about them.
    assert store.add_refs([Ref(1, C, h(i), None) for i in range(1, 7)]) == RefsAdded(6, 0)
    assert store.add_refs([Ref(1, C, h(1), 11), Ref(1, C, h(7), 17)]) == RefsAdded(1, 1)  # with blocks
    assert block_of(store, 1) == 11
    store.add_refs_and_coverage([Ref(1, C, h(2), 12, "logs")], [])  # discovery
    assert block_of(store, 2) == 12
    assert store.add_refs([Ref(1, C, h(1), 99)]) == RefsAdded(0, 0, 1)  # a known block stays
    assert block_of(store, 1) == 11
    # Enrichment learns the rest: a batch whose range holds unknown blocks records them.
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=500)
    batch = store.lease("w", 60.0)
    assert batch is not None and batch.hi[0] == UNKNOWN_BLOCK_KEY
    # While the plan is open a ref's key must not move under its batches (a run could end
    # with it left behind): an import that knows the block waits for the enrichment.
    store.add_refs([Ref(1, C, h(3), 3)])
    assert block_of(store, 3) is None
    refs = store.batch_refs(batch)
    truth = {1: 11, 2: 12, 7: 17}
    assert store.commit_batch(batch, enriched_as_fetched(refs, lambda i: truth.get(i, 30 + i)))
    assert [block_of(store, i) for i in range(1, 8)] == [11, 12, 33, 34, 35, 36, 17]


def enriched_as_fetched(refs: list[Ref], true_block: Callable[[int], int]) -> Enriched:
    """What the enricher returns for ``refs`` on a chain where ``h(i)`` is in block
    ``true_block(i)``: a row each, and the refs whose block number was not that one."""
    rows = [tx_row(int(r.tx_hash, 16), true_block(int(r.tx_hash, 16))) for r in refs]
    moved = [replace(r, block_number=t.block_number)
             for r, t in zip(refs, rows, strict=True) if r.block_number != t.block_number]
    return Enriched(rows, moved=moved)


def test_a_wrong_block_number_from_an_import_is_corrected_when_its_transaction_is_stored(
    store: Store,
) -> None:
    # The file said h(1) is in block 5 and h(4) in block 10**9 (past the chain's head),
    # and had no block for h(2). Their transactions say 7, 4 and 9.
    truth = {1: 7, 2: 9, 3: 8, 4: 4, 5: 12, 6: 14, 7: 6}
    store.add_refs([Ref(1, C, h(1), 5), Ref(1, C, h(2), None), Ref(1, C, h(3), 8),
                    Ref(1, C, h(4), 10**9), Ref(1, C, h(5), 11), Ref(1, C, h(6), 13),
                    Ref(1, C, h(7), 6)])  # fmt: skip
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=2)
    first = store.lease("w", 60.0)  # h(1) and h(7): blocks 5 and 6
    assert first is not None and [r.tx_hash for r in store.batch_refs(first)] == [h(1), h(7)]
    # h(1)'s key moves into the next batch's range: its row is stored with it, so no batch
    # can lose it. A moved ref whose row is not written here keeps its key, and so does
    # another contract's (no open plan keeps an import from filling it meanwhile).
    other = "0x" + "cd" * 20
    store.add_contract(Contract(1, other))
    store.add_refs([Ref(1, other, h(7), None)])
    got = enriched_as_fetched(store.batch_refs(first), truth.__getitem__)
    got.moved.extend([Ref(1, C, h(4), 4), Ref(1, other, h(7), 6)])
    assert store.commit_batch(first, got)
    assert [block_of(store, i) for i in (1, 4)] == [7, 10**9]
    with store._read() as cur:
        cur.execute(store._sql("SELECT contract, block_number FROM refs WHERE tx_hash = ?"), (h(7),))
        assert sorted(cur.fetchall()) == [(C, 6), (other, None)]
    # A batch given back keeps its rows and corrects their refs too.
    second = store.lease("w", 60.0)
    assert second is not None and [r.tx_hash for r in store.batch_refs(second)] == [h(3), h(5)]
    kept = enriched_as_fetched(store.batch_refs(second)[1:], truth.__getitem__)
    assert store.abandon(second, "TransientFailures: 1 failed", keep=kept)
    assert block_of(store, 5) == 12
    while (b := store.lease("w", 60.0)) is not None:
        assert store.commit_batch(b, enriched_as_fetched(store.batch_refs(b), truth.__getitem__))
    assert store.count_gap(1, C) == 0 and len(store.fetch_transactions(1)) == 7
    assert {i: block_of(store, i) for i in truth} == truth
    (s,) = store.status(1, C)
    assert (s.min_block, s.max_block, s.unknown_block_refs) == (4, 14, 0)


def test_a_ref_keeps_the_first_block_number_it_is_given_and_the_others_are_counted(
    store: Store,
) -> None:
    # One hash, two block numbers: SQLite kept the file's first, PostgreSQL the smallest, and
    # neither said so. Now both keep the first given (a row without one gives none), and
    # count the refs given another: each once, however many of its rows disagree.
    added = store.add_refs([Ref(1, C, h(1), 7), Ref(1, C, h(1), 5), Ref(1, C, h(2), 5),
                            Ref(1, C, h(2), 7), Ref(1, C, h(2), 9), Ref(1, C, h(3), None),
                            Ref(1, C, h(3), 8), Ref(1, C, h(4), 4), Ref(1, C, h(4), 4),
                            Ref(1, C, h(4), None)])  # fmt: skip
    assert [block_of(store, i) for i in (1, 2, 3, 4)] == [7, 5, 8, 4]
    # h(3) is new: none of it was filled; 6 of the 10 rows repeat a ref of an earlier row.
    assert added == RefsAdded(4, 0, 2, repeated=6)
    # Against refs stored before (by an import here, or discovery): the stored one stays.
    store.add_refs_and_coverage([Ref(1, C, h(5), 50, "logs")], [])
    assert store.add_refs([Ref(1, C, h(1), 99), Ref(1, C, h(2), 5), Ref(1, C, h(5), 51),
                           Ref(1, C, h(5), 52), Ref(1, C, h(6), None)]) == RefsAdded(1, 0, 2, 1)  # fmt: skip
    assert [block_of(store, i) for i in (1, 2, 5, 6)] == [7, 5, 50, None]
    # A ref given no block before gets the first one given, and disagrees with no other.
    assert store.add_refs([Ref(1, C, h(6), 60), Ref(1, C, h(6), 61)]) == RefsAdded(0, 1, 1, 1)
    assert block_of(store, 6) == 60
    # Rows of one ref far apart in a big import (SQLite writes it 10,000 rows at a time).
    many = [Ref(1, C, h(1_000 + i), 1_000 + i) for i in range(10_010)]
    many[10_005] = Ref(1, C, h(1_000), 3)
    many[10_007] = Ref(1, C, h(1_000), 4)
    assert store.add_refs(many) == RefsAdded(10_008, 0, 1, 2) and block_of(store, 1_000) == 1_000
    # Enrichment stores the transaction's own block number on the ref, whichever was kept.
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=20_000)
    batch = store.lease("w", 60.0)
    assert batch is not None
    # A new ref takes the first block number given even while a plan is open: no batch has
    # seen it (SQLite kept none until its enrichment, PostgreSQL the first).
    assert store.add_refs([Ref(1, C, h(20), None), Ref(1, C, h(20), 50),
                           Ref(1, C, h(20), 51)]) == RefsAdded(1, 0, 1, 2)  # fmt: skip
    assert block_of(store, 20) == 50
    truth = {1: 5, 2: 9}
    assert store.commit_batch(batch, enriched_as_fetched(store.batch_refs(batch), lambda i: truth.get(i, i)))
    assert [block_of(store, i) for i in (1, 2)] == [5, 9]


def test_a_ref_written_without_a_block_for_a_stored_transaction_gets_the_stored_one(
    store: Store,
) -> None:
    # C's transactions were enriched; then the same hashes are imported for another
    # contract without block numbers: no enrichment would ever fill them (not in its gap).
    other = "0x" + "cd" * 20
    store.add_contract(Contract(1, other))
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 4)])
    store.write(Enriched([tx_row(i, i) for i in range(1, 4)]))

    def blocks() -> dict[int, int | None]:
        with store._read() as cur:
            cur.execute(store._sql("SELECT tx_hash, block_number FROM refs WHERE contract = ?"), (other,))
            return {int(t, 16): b for t, b in cur.fetchall()}

    assert store.add_refs([Ref(1, other, h(i), None) for i in (1, 2, 3, 4)]) == RefsAdded(4, 0)
    assert blocks() == {1: 1, 2: 2, 3: 3, 4: None}  # h(4) is not stored: it stays unknown
    # A ref imported without a block before its transaction was stored (by another
    # contract's run) gets it from the next import or discovery that writes it.
    store.add_refs([Ref(1, other, h(i), None) for i in (8, 9)])
    store.write(Enriched([tx_row(8, 80), tx_row(9, 90)]))
    assert store.add_refs([Ref(1, other, h(8), None)]) == RefsAdded(0, 1) and blocks()[8] == 80
    store.add_refs_and_coverage([Ref(1, other, h(9), None, "logs"), Ref(1, other, h(4), 40, "logs")], [])
    assert (blocks()[9], blocks()[4]) == (90, 40)
    # While the contract's plan is open a ref already there keeps its key (as for every
    # fill by an import); a new one takes its stored transaction's block: it is not in the
    # gap, so no batch can lose it.
    store.add_refs([Ref(1, other, h(5), None)])
    store.plan(store.create_run("batch", 1), [(1, other)], batch_size=500)
    store.write(Enriched([tx_row(5, 50), tx_row(6, 60)]))
    store.add_refs([Ref(1, other, h(5), None), Ref(1, other, h(6), None)])
    assert (blocks()[5], blocks()[6]) == (None, 60)


def test_a_new_ref_of_a_stored_transaction_takes_the_transactions_block(store: Store) -> None:
    # The stored transaction's block is the node's; a row of a file may give a wrong one,
    # and the ref of a stored transaction is never enriched again to correct it. So it
    # wins, wherever the row giving another is, and that row counts as a conflict.
    other = "0x" + "cd" * 20
    store.add_contract(Contract(1, other))
    store.add_refs([Ref(1, C, h(i), i) for i in (1, 2, 3)])
    store.write(Enriched([tx_row(1, 1), tx_row(2, 2), tx_row(3, 3)]))
    rows = [Ref(1, other, h(1), b) for b in (None, 5)] + [Ref(1, other, h(2), None), Ref(1, other, h(3), 7)]
    assert store.add_refs(rows) == RefsAdded(3, 0, 2, repeated=1)
    with store._read() as cur:
        cur.execute(store._sql("SELECT tx_hash, block_number FROM refs WHERE contract = ?"), (other,))
        assert sorted(cur.fetchall()) == [(h(1), 1), (h(2), 2), (h(3), 3)]


def test_one_row_giving_a_stored_transaction_another_block_is_a_conflict(store: Store) -> None:
    # Every row a new ref, each hash once: the conflicts were counted only for a hash given
    # twice or a ref already there, so a row giving a stored transaction another block went
    # unsaid although the ref took the transaction's.
    other = "0x" + "cd" * 20
    store.add_contract(Contract(1, other))
    store.add_refs([Ref(1, C, h(1), 1)])
    store.write(Enriched([tx_row(1, 1)]))
    assert store.add_refs([Ref(1, other, h(1), 7), Ref(1, other, h(2), 2)]) == RefsAdded(2, 0, 1)
    assert store.add_refs([Ref(1, C, h(3), 3)]) == RefsAdded(1, 0, 0)  # agrees: none


def test_rows_stored_without_a_lease_correct_their_refs_too(store: Store) -> None:
    # The start-up sample of a concurrent run stores its rows with Store.write.
    store.add_refs([Ref(1, C, h(1), None), Ref(1, C, h(2), 99), Ref(1, C, h(3), 3)])
    store.write(enriched_as_fetched(list(store.iter_gap(1, C)), lambda i: i))
    assert [block_of(store, i) for i in (1, 2, 3)] == [1, 2, 3]


def test_refs_whose_transaction_another_contract_stored_get_its_block(store: Store) -> None:
    # QA: `status` kept "(+505 unknown)" for good: refs imported without a block number
    # whose transactions another contract's batches stored first.
    other = "0x" + "cd" * 20
    store.add_contract(Contract(1, other))
    store.add_refs([Ref(1, C, h(i), None) for i in (1, 2, 3)] + [Ref(1, other, h(i), i) for i in (1, 2)])
    store.plan(store.create_run("batch", 1), [(1, other)])
    b = store.lease("w", 60.0)
    assert b is not None and store.commit_batch(b, Enriched([tx_row(1, 1), tx_row(2, 2)]))
    assert [r.tx_hash for r in store.iter_gap(1, C)] == [h(3)]  # 1 and 2 left C's gap ...
    with store._read() as cur:
        cur.execute(store._sql("SELECT tx_hash, block_number FROM refs WHERE contract = ? ORDER BY 1"), (C,))
        assert cur.fetchall() == [(h(1), None), (h(2), None), (h(3), None)]  # ... unknown still
    assert store.fill_block_numbers(1, C) == 2
    with store._read() as cur:
        cur.execute(store._sql("SELECT tx_hash, block_number FROM refs WHERE contract = ? ORDER BY 1"), (C,))
        assert cur.fetchall() == [(h(1), 1), (h(2), 2), (h(3), None)]  # 3 is not stored: as it was
    assert store.fill_block_numbers(1, C) == 0


def test_removing_a_contract_keeps_the_chains_rows_and_other_contracts(store: Store) -> None:
    other = "0x" + "cd" * 20
    store.add_contract(Contract(1, other))
    store.add_refs([Ref(1, C, h(i), i) for i in range(1, 5)] + [Ref(1, other, h(i), i) for i in (1, 3)])
    store.plan(store.create_run("batch", 1), [(1, C)], batch_size=2)
    b = store.lease("w", 60.0)
    assert b is not None
    with pytest.raises(GapfillError, match="a run is enriching"):
        store.remove_contract(1, C)  # leased: refused, nothing deleted
    assert store.commit_batch(b, Enriched([tx_row(1, 1), tx_row(2, 2)]))
    assert store.lease("killed-run", 0.05) is not None  # the other batch
    store.write(Enriched(failures=[Failure(1, h(3), C, "not_found", "null"),
                                   Failure(1, h(4), C, "not_found", "null")]))  # fmt: skip
    time.sleep(0.1)  # that run died: its lease expired, it blocks nothing
    deleted = store.remove_contract(1, C)
    assert (deleted["refs"], deleted["batches"], deleted["contracts"]) == (4, 2, 1)
    assert deleted["failures"] == 1 and deleted["lease_events"] >= 3
    assert [c.address for c in store.list_contracts()] == [other]
    assert len(store.fetch_transactions(1)) == 2  # the chain's rows stay
    # h(3)'s failure is the transaction's, and `other` tracks it too: it stays failed there.
    assert [f.tx_hash for f, _ in store.list_failures()] == [h(3)]
    assert [r.tx_hash for r in store.iter_gap(1, other)] == []
    with pytest.raises(UnknownContractError):
        store.get_contract(C)
    # A discovery or an import that was running meanwhile writes nothing for it any more.
    from gapfill.model import CoverageRange

    with pytest.raises(UnknownContractError, match="no longer tracked"):
        store.add_refs_and_coverage([Ref(1, C, h(9), 9, "logs")], [CoverageRange(1, C, 0, 9, "logs")])
    with pytest.raises(UnknownContractError, match="no longer tracked"):
        store.add_refs([Ref(1, C, h(9), 9)])
    assert store.count_gap(1, C) == 0 and store.get_coverage(1, C) == []


def _bytes_read() -> int:
    """Bytes this process has read through system calls (SQLite reads pages with pread)."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def test_removing_a_big_contract_on_sqlite_reads_its_pages_a_few_times_not_once_per_ref(
    sqlite_url: str,
) -> None:
    # Deleting a ref removes an entry at a random place of each hash-keyed index. With the
    # usual 32 MiB page cache, refs bigger than that were read back from the file about once
    # per ref (500,000 refs: 10-20 s, and more on a slower disk); the removal now has the
    # import's cache, and deletes them in hash order.
    import hashlib
    import os
    import random

    n = 150_000  # ~70 MB of refs and their indexes: more than the usual cache
    order = list(range(n))
    random.Random(3).shuffle(order)
    with open_store(sqlite_url) as s:
        s.add_contract(Contract(1, C))
        s.add_refs(Ref(1, C, "0x" + hashlib.sha256(i.to_bytes(8, "big")).hexdigest(), 1_000 + i // 7)
                   for i in order)  # fmt: skip
        path = sqlite_url[len("sqlite:///"):]
        size = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
        before = _bytes_read()
        assert s.remove_contract(1, C)["refs"] == n
        read = _bytes_read() - before
        assert s.count_gap(1, C) == 0
    assert read <= 2 * size, (read, size)


def test_a_failed_sqlite_statement_is_a_store_error(tmp_path: Any) -> None:
    from gapfill.errors import StoreError

    with open_store(f"sqlite:///{tmp_path / 'x.db'}") as s:
        with pytest.raises(StoreError, match=r"writing to .* failed: no such table"), s._tx() as cur:
            cur.execute("INSERT INTO no_such_table VALUES (1)")
        with pytest.raises(StoreError, match=r"reading from .* failed"), s._read() as cur:
            cur.execute("SELECT * FROM no_such_table")


def test_a_failure_is_seen_and_retried_through_every_contract_tracking_its_transaction(
    store: Store,
) -> None:
    other = "0x" + "cd" * 20
    store.add_contract(Contract(1, other))
    store.add_refs([Ref(1, C, h(1), 1), Ref(1, other, h(1), 1)])
    store.write(Enriched(failures=[Failure(1, h(1), C, "not_found", "null")]))  # recorded under C
    assert [f.tx_hash for f, _ in store.list_failures(1, other)] == [h(1)]
    assert store.count_permanent_failures(1, other) == 1
    assert [r.tx_hash for r in store.iter_failed_refs(1, other)] == [h(1)]
    assert store.clear_failures(1, other) == 1  # retried through `other`
    assert [r.tx_hash for r in store.iter_gap(1, other)] == [h(1)]
    store.write(Enriched(failures=[Failure(1, h(1), C, "not_found", "null")]))
    store.remove_contract(1, C)  # the failure is the transaction's: it stays, for `other`
    assert [f.tx_hash for f, _ in store.list_failures()] == [h(1)]
    store.remove_contract(1, other)  # and goes with the last contract tracking it
    assert store.list_failures() == []


def _shared_batches(store: Store, shared: list[str], own: list[str]) -> tuple[Batch, Batch]:
    """C and D both track the transactions ``shared``, C alone ``own``: a batch of each,
    both leased (C's first) and counted for one run."""
    store.add_contract(Contract(1, D))
    store.add_refs([Ref(1, k, x, 5) for k in (C, D) for x in shared] + [Ref(1, C, x, 5) for x in own])
    run = store.create_run("concurrent", 2)
    store.plan(run, [(1, C), (1, D)], batch_size=10)
    store.counts_for_run = run
    bc, bd = store.lease("wc", 300, [(1, C)]), store.lease("wd", 300, [(1, D)])
    assert bc is not None and bd is not None
    return bc, bd


def _says_no_failure_of(store: Store, stored: list[str]) -> None:
    """Nothing that reads failure records names one of ``stored``, whose transactions are."""
    for contract in (C, D):
        assert not {f.tx_hash for f, _ in store.list_failures(1, contract)} & set(stored)
        assert store.count_beyond_head(1, contract) == (0, None)
    assert not {f.tx_hash for f, _ in store.list_failures()} & set(stored)
    assert {s.address: s.failed for s in store.status()} == {C: 1, D: 0}
    assert store.count_gap(1, C) == store.count_gap(1, D) == 0
    assert store.count_permanent_failures(1, D) == 0 and store.clear_failures(1, D) == 0


@pytest.mark.parametrize("reason", ["not_found", "beyond_head"])
def test_a_null_for_a_transaction_another_contracts_batch_stored_is_no_failure(
    store: Store, reason: str
) -> None:
    # D's batch stores the transaction both track; C's batch, leased before, got a null for
    # it (a load balancer's lagging backend) and commits after. It used to record the
    # failure all the same: `status` said 0 failed, but `enrich --contract C` exited 3 on
    # every rerun (a permanent failure on record), or said a ref was beyond the node's head.
    bc, bd = _shared_batches(store, [h(1)], [h(2)])
    assert store.commit_batches([(bd, Enriched([tx_row(1, 5)]))]) == [1]
    said = "block 5 is above the node's head 4" if reason == "beyond_head" else "null"
    failures = [Failure(1, h(1), C, reason, said), Failure(1, h(2), C, "not_found", "null")]
    assert store.commit_batches([(bc, Enriched(failures=failures))]) == [0]
    assert store.count_permanent_failures(1, C) == 1  # h(2)'s, which is a failure
    assert [f.tx_hash for f, _ in store.list_failures(1, C)] == [h(2)]
    _says_no_failure_of(store, [h(1)])
    (info,) = store.list_runs()
    assert (info.processed, info.failed) == (1, 1)  # the failure it recorded, not the null
    assert store.clear_failures(1, C) == 1


@pytest.mark.parametrize("reason", ["not_found", "beyond_head"])
def test_a_failure_record_beside_a_stored_transaction_is_no_failure(store: Store, reason: str) -> None:
    # On PostgreSQL the two commits can run at once: neither sees the other's row, so C's
    # record stays beside D's transaction (the next test makes them). Every reader skips it.
    store.add_contract(Contract(1, D))
    store.add_refs([Ref(1, k, h(1), 5) for k in (C, D)] + [Ref(1, C, h(2), 5)])
    store.write(Enriched([tx_row(1, 5)], failures=[Failure(1, h(2), C, "not_found", "null")]))
    with store._tx() as cur:  # type: ignore[attr-defined]
        cur.execute(store._sql("INSERT INTO failures (chain_id, tx_hash, contract, reason, last_error) "  # type: ignore[attr-defined]
                               "VALUES (?, ?, ?, ?, ?)"), (1, h(1), C, reason, "head 4"))  # fmt: skip
    assert store.count_permanent_failures(1, C) == 1
    assert [f.tx_hash for f, _ in store.list_failures(1, C)] == [h(2)]
    _says_no_failure_of(store, [h(1)])
    assert [r.tx_hash for r in store.iter_failed_refs(1, C)] == [h(2)]
    assert store.clear_failures(1, C) == 1  # h(2)'s: h(1) is not put back


def test_a_null_committed_beside_the_commit_storing_its_transaction_is_no_failure(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # C's commit has written its failure record (not yet committed) when D's commit stores
    # the transaction: D's clearing of failure records cannot see C's row, nor C's test of
    # stored transactions D's. The record stays; nothing counts it.
    c_store, d_store = open_store(pg_url), open_store(pg_url)
    c_store.add_contract(Contract(1, C))
    bc, bd = _shared_batches(c_store, [h(1)], [h(2)])
    count_for_run = c_store._count_for_run  # type: ignore[attr-defined]

    def d_commits_meanwhile(cur: Any, *args: Any) -> None:  # C's last statement, before COMMIT
        assert d_store.commit_batches([(bd, Enriched([tx_row(1, 5)]))]) == [1]
        count_for_run(cur, *args)

    monkeypatch.setattr(c_store, "_count_for_run", d_commits_meanwhile)
    failures = [Failure(1, h(1), C, "not_found", "null"), Failure(1, h(2), C, "not_found", "null")]
    assert c_store.commit_batches([(bc, Enriched(failures=failures))]) == [0]
    monkeypatch.undo()
    with c_store._read() as cur:  # type: ignore[attr-defined]
        cur.execute("SELECT tx_hash FROM failures ORDER BY tx_hash")
        assert [x for (x,) in cur.fetchall()] == [h(1), h(2)]  # the race took place
    assert c_store.count_permanent_failures(1, C) == 1
    assert [f.tx_hash for f, _ in c_store.list_failures(1, C)] == [h(2)]
    _says_no_failure_of(c_store, [h(1)])
    c_store.close()
    d_store.close()


def _commit_at_once(commits: list[tuple[Store, Batch | None, Enriched]]) -> list[Exception]:
    """Each ``(store, batch, enriched)`` committed on its own thread, all let go at once;
    the errors they raised."""
    import threading

    gate = threading.Barrier(len(commits))
    errors: list[Exception] = []

    def commit(store: Store, batch: Batch | None, enriched: Enriched) -> None:
        assert batch is not None
        gate.wait()
        try:
            store.commit_batches([(batch, enriched)])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=c) for c in commits]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.timeout(120)
def test_two_commits_recording_the_same_failures_in_opposite_orders_do_not_deadlock(pg_url: str) -> None:
    # Two contracts' batches met nulls for the same transactions, each in its own batch
    # order. Their records were upserted in that order, so two commits at once each waited
    # for a row the other held: "deadlock detected", and one was rolled back (every try of
    # 3, with 2,000 records). They are written in key order now, as rows are.
    hashes = [h(i) for i in range(1, 2001)]
    errors: list[Exception] = []
    with open_store(pg_url) as setup:
        for attempt in range(3):
            mine = ["0x" + f"{attempt:02x}" + k * 19 for k in ("ab", "cd")]
            for k in mine:
                setup.add_contract(Contract(1, k))
            setup.add_refs([Ref(1, k, h(10_000 + attempt), 1) for k in mine])
            setup.plan(setup.create_run("concurrent", 2), [(1, k) for k in mine], batch_size=10)
            stores = [open_store(pg_url), open_store(pg_url)]
            errors += _commit_at_once([
                (s, s.lease("w", 300, [(1, k)]), Enriched(failures=[Failure(1, x, k, "not_found", "null")
                                                                    for x in order]))
                for s, k, order in zip(stores, mine, [hashes, hashes[::-1]], strict=True)
            ])  # fmt: skip
            for s in stores:
                s.close()
            assert not errors, errors
            assert len(setup.list_failures(limit=10_000)) == len(hashes)  # both committed
            setup.clear_failures(permanent_only=False)


@pytest.mark.timeout(60)
def test_two_commits_recording_and_clearing_the_same_failures_crosswise_do_not_deadlock(pg_url: str) -> None:
    # Failure records are upserted in key order, then the records of the transactions a
    # commit stores are deleted, in key order too: but one after the other. A commit that
    # recorded X's failure and stored Y, beside one that recorded Y's and stored X (two
    # contracts' batches sharing both, each met a null for one), each held one record and
    # waited for the other's: "deadlock detected", one rolled back.
    import threading

    x, y = h(1), h(2)
    mine = ["0x" + "ab" * 20, "0x" + "cd" * 20]
    with open_store(pg_url) as setup:
        for k in mine:
            setup.add_contract(Contract(1, k))
        setup.add_refs([Ref(1, k, t, 1) for k in mine for t in (x, y)])
        # Records of an earlier attempt's nulls, which leave the refs in the gap.
        setup.write(Enriched(failures=[Failure(1, t, mine[0], "rpc_error", "null") for t in (x, y)]))
        setup.plan(setup.create_run("concurrent", 2), [(1, k) for k in mine], batch_size=10)
    between = threading.Barrier(2)  # both commits past their upserts, before their deletes
    stores = [open_store(pg_url), open_store(pg_url)]
    for s in stores:
        delete = s._delete_failed

        def paused(cur: Any, keys: Sequence[Any], delete: Any = delete) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):  # the other waits for this one
                between.wait(3)
            delete(cur, keys)

        s._delete_failed = paused  # type: ignore[method-assign]
    try:
        errors = _commit_at_once([
            (s, s.lease("w", 300, [(1, k)]),
             Enriched(txs=[tx_row(stored, 1)], failures=[Failure(1, h(failed), k, "rpc_error", "null")]))
            for s, k, failed, stored in zip(stores, mine, [1, 2], [2, 1], strict=True)
        ])  # fmt: skip
    finally:
        for s in stores:
            s.close()
    assert not errors, errors
    with open_store(pg_url) as s:
        assert {t["tx_hash"] for t in s.fetch_transactions(1)} == {x, y}


def test_the_failed_refs_a_retry_would_put_back_are_the_contracts_unstored_permanent_failures(
    store: Store,
) -> None:
    # `enrich --dry-run --retry-failed` counts these: found from the failure records, not by
    # walking every ref of the contract, with the same answer whatever recorded them.
    other, elsewhere = "0x" + "cd" * 20, "0x" + "ef" * 20
    store.add_contract(Contract(1, other))
    store.add_contract(Contract(2, elsewhere))
    store.add_refs([Ref(1, C, h(i), 100 + i, "explorer") for i in range(1, 9)]
                   + [Ref(1, C, h(9), None), Ref(1, C, h(11), 111), Ref(1, other, h(8), 108),
                      Ref(1, other, h(10), 110), Ref(2, elsewhere, h(11), 111)])  # fmt: skip
    store.write(Enriched(txs=[tx_row(1, 101), tx_row(4, 104)]))  # stored
    failures = [
        Failure(1, h(2), C, "not_found", "null"),  # permanent: put back
        Failure(1, h(3), C, "rpc_error", "timeout"),  # transient: in the gap already
        Failure(1, h(5), C, "retrying", "null"),  # retried already
        Failure(1, h(6), C, "permanent", "bad"),  # permanent: put back
        Failure(1, h(8), other, "not_found", "null"),  # recorded by the contract sharing it
        Failure(1, h(9), C, "not_found", "null"),  # a ref of unknown block
        Failure(1, h(10), other, "not_found", "null"),  # the other contract's alone
        Failure(2, h(11), elsewhere, "not_found", "null"),  # the same hash on another chain
    ]
    store.write(Enriched(failures=failures[::-1]))
    with store._tx() as cur:  # a record left beside a transaction stored since (an import's)
        cur.execute(store._sql("INSERT INTO failures (chain_id, tx_hash, contract, reason) "
                               "VALUES (?, ?, ?, ?)"), (1, h(4), C, "not_found"))  # fmt: skip
    assert list(store.iter_failed_refs(1, C)) == [
        Ref(1, C, h(2), 102, "explorer"), Ref(1, C, h(6), 106, "explorer"),
        Ref(1, C, h(8), 108, "explorer"), Ref(1, C, h(9), None),
    ]  # fmt: skip
    assert list(store.iter_failed_refs(1, other)) == [Ref(1, other, h(8), 108), Ref(1, other, h(10), 110)]
    assert list(store.iter_failed_refs(2, elsewhere)) == [Ref(2, elsewhere, h(11), 111)]
    assert list(store.iter_failed_refs(2, C)) == []
    # h(4)'s record is not a failure: its transaction is stored (nor is it put back).
    assert store.count_permanent_failures(1, C) == 4
    assert store.clear_failures(1, C) == 4
    assert list(store.iter_failed_refs(1, C)) == []


def _status_ref_by_ref(store: Store, chain_id: int | None, contract: str | None) -> list[ContractStatus]:
    """What ``status`` says, read ref by ref from the tables (its definition)."""
    with store._read() as cur:  # type: ignore[attr-defined]
        cur.execute("SELECT chain_id, tx_hash FROM transactions")
        stored = {(int(c), t) for c, t in cur.fetchall()}
        cur.execute("SELECT chain_id, tx_hash, reason FROM failures")
        failed = {(int(c), t) for c, t, reason in cur.fetchall() if reason in PERMANENT_REASONS}
        cur.execute("SELECT chain_id, contract, tx_hash, block_number FROM refs")
        refs = [(int(c), k, t, None if b is None else int(b)) for c, k, t, b in cur.fetchall()]
    out = []
    for c in sorted(store.list_contracts(), key=lambda c: (c.chain_id, c.address)):
        if chain_id not in (None, c.chain_id) or contract not in (None, c.address):
            continue
        mine = [(t, b) for ch, k, t, b in refs if (ch, k) == (c.chain_id, c.address)]
        enriched = sum((c.chain_id, t) in stored for t, _ in mine)
        lost = sum((c.chain_id, t) in failed and (c.chain_id, t) not in stored for t, _ in mine)
        blocks = [b for _, b in mine if b is not None]
        out.append(ContractStatus(c.chain_id, c.address, c.label, len(mine), enriched,
                                  len(mine) - enriched - lost, lost, min(blocks, default=None),
                                  max(blocks, default=None), sum(b is None for _, b in mine)))  # fmt: skip
    return out


def test_status_counts_what_a_ref_by_ref_reading_counts(store: Store) -> None:
    # status joins refs to transactions and counts failed refs from the failure records
    # (1M refs: 2.6 s instead of 7.7 on PostgreSQL); each count is still the ref-by-ref one.
    other, full, empty, elsewhere = ("0x" + x * 20 for x in ("cd", "ef", "12", "34"))
    for address, chain in ((other, 1), (full, 1), (empty, 1), (elsewhere, 2), (C, 2)):
        store.add_contract(Contract(chain, address))
    store.add_refs([Ref(1, C, h(i), 100 + i) for i in range(1, 9)]
                   + [Ref(1, C, h(9), None), Ref(1, C, h(12), None), Ref(1, other, h(8), 108),
                      Ref(1, other, h(10), 110), Ref(1, full, h(1), 101), Ref(1, full, h(4), 104),
                      Ref(2, elsewhere, h(2), 102), Ref(2, C, h(6), 106)])  # fmt: skip
    store.write(Enriched(txs=[tx_row(1, 101), tx_row(4, 104), tx_row(12, 112)]))
    store.write(Enriched(failures=[
        Failure(1, h(2), C, "not_found", "null"),  # permanent
        Failure(1, h(3), C, "rpc_error", "timeout"),  # transient: missing
        Failure(1, h(5), C, "retrying", "null"),  # retried: missing
        Failure(1, h(6), C, "permanent", "bad"),  # permanent, on chain 1 only
        Failure(1, h(8), other, "not_found", "null"),  # recorded by the contract sharing it
        Failure(1, h(9), C, "not_found", "null"),  # a ref of unknown block
        Failure(1, h(10), other, "permanent", "bad"),  # the other contract's alone
    ]))  # fmt: skip
    with store._tx() as cur:  # type: ignore[attr-defined]  # a record beside a stored transaction
        cur.execute(store._sql("INSERT INTO failures (chain_id, tx_hash, contract, reason) "  # type: ignore[attr-defined]
                               "VALUES (?, ?, ?, ?)"), (1, h(4), C, "not_found"))  # fmt: skip
    picks = [(None, None), (1, None), (2, None), (3, None), (None, C), (1, C), (2, C), (1, empty),
             (None, full), (None, "0x" + "99" * 20)]  # fmt: skip
    for chain_id, contract in picks:
        assert store.status(chain_id, contract) == _status_ref_by_ref(store, chain_id, contract)
    by = {(s.chain_id, s.address): (s.refs, s.enriched, s.missing, s.failed, s.unknown_block_refs)
          for s in store.status()}  # fmt: skip
    assert by == {(1, C): (10, 3, 3, 4, 2), (1, other): (2, 0, 0, 2, 0), (1, full): (2, 2, 0, 0, 0),
                  (1, empty): (0, 0, 0, 0, 0), (2, elsewhere): (1, 0, 1, 0, 0),
                  (2, C): (1, 0, 1, 0, 0)}  # fmt: skip


def test_a_dry_run_counts_the_gap_per_block_as_the_gap_streamed_would(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `enrich --dry-run` streamed every ref of the gap in key order (1M refs, 780,000 stored:
    # 19 s on PostgreSQL); it asks for per-block counts, with the same estimate.
    from gapfill.engine.dryrun import DryRunRow, estimate
    from gapfill.enrich.fetch import PlanSettings

    full, empty = "0x" + "ef" * 20, "0x" + "12" * 20
    store.add_contract(Contract(1, full))
    store.add_contract(Contract(1, empty))
    store.add_refs([Ref(1, C, h(i), 100 + i // 3) for i in range(1, 13)]
                   + [Ref(1, C, h(20), None), Ref(1, C, h(21), None), Ref(1, full, h(1), 100)])  # fmt: skip
    store.write(Enriched(txs=[tx_row(1, 100), tx_row(4, 101)], failures=[
        Failure(1, h(2), C, "not_found", "null"), Failure(1, h(3), C, "rpc_error", "timeout"),
        Failure(1, h(21), C, "permanent", "bad"),
    ]))  # fmt: skip
    targets = [(1, C), (1, full), (1, empty)]
    per_block = PlanSettings(shape="per_block")
    streamed = {k: Counter(r.block_number for r in store.iter_gap(*k)) for k in targets}
    assert {k: Counter({b: n for b, n, _ in store.gap_blocks(*k)}) for k in targets} == streamed
    assert streamed[(1, C)] == {101: 2, 102: 3, 103: 3, 104: 1, None: 1}
    monkeypatch.setattr(store, "iter_gap", lambda *a, **k: pytest.fail("the gap was streamed"))
    assert estimate(store, targets, batch_size=5, plan=per_block) == [
        DryRunRow(1, C, 10, 2, 9, 4, 10, None), DryRunRow(1, full, 0, 0, 0, 0, 0, None),
        DryRunRow(1, empty, 0, 0, 0, 0, 0, None),
    ]  # fmt: skip
    assert estimate(store, targets[:1], batch_size=5, plan=per_block, retry_failed=True) == [
        DryRunRow(1, C, 12, 3, 10, 5, 14, None)]  # h(2) in block 100, h(21) of unknown block


def test_a_dry_run_counts_the_calls_of_a_transaction_two_contracts_share_once(store: Store) -> None:
    # Summed per contract, a shared transaction was counted twice, though a run fetches it
    # once (the second contract's batch finds it stored, out of its gap).
    from gapfill.engine.dryrun import DryRunRow, estimate
    from gapfill.enrich.fetch import PlanSettings

    other = "0x" + "ef" * 20
    store.add_contract(Contract(1, other))
    store.add_refs([Ref(1, C, h(i), 100 + i) for i in range(1, 5)]
                   + [Ref(1, other, h(i), 100 + i) for i in (3, 4, 5)]
                   + [Ref(1, other, h(6), None)])  # fmt: skip
    store.write(Enriched(failures=[Failure(1, h(7), C, "permanent", "bad")]))
    store.add_refs([Ref(1, C, h(7), 107), Ref(1, other, h(7), 107)])
    targets = [(1, C), (1, other)]
    per_tx = PlanSettings(shape="per_tx")
    rows = estimate(store, targets, batch_size=5, plan=per_tx)
    assert [r.estimated_calls for r in rows] == [8, 4]  # h(3), h(4) were counted in both
    assert rows == [
        DryRunRow(1, C, 4, 1, 0, 0, 8, None), DryRunRow(1, other, 4, 1, 0, 0, 4, None, shared=2),
    ]  # fmt: skip
    assert estimate(store, targets, batch_size=5, plan=per_tx, retry_failed=True) == [
        DryRunRow(1, C, 5, 1, 0, 0, 10, None), DryRunRow(1, other, 5, 1, 0, 0, 4, None, shared=3),
    ]  # fmt: skip
    # Whole blocks: a block whose refs were all counted above costs nothing here.
    per_block = PlanSettings(shape="per_block")
    assert estimate(store, targets, batch_size=5, plan=per_block)[1] == DryRunRow(
        1, other, 4, 1, 1, 1, 4, None, shared=2)  # block 105's call, and h(6)'s (of no block)


def test_a_dry_run_counts_a_block_two_contracts_crowd_once(store: Store) -> None:
    # Under --rps the batch that fetches a block whole stores the refs of every contract of
    # the run in it: counted per contract, a block two contracts' refs crowd was counted for
    # each (QA: 370 + 370 estimated, 808 made, before the run fetched it once), and one ref
    # of each in a block was two per-transaction estimates where the run fetches it whole.
    from gapfill.engine.dryrun import DryRunRow, estimate
    from gapfill.enrich.fetch import PlanSettings

    other = "0x" + "ef" * 20
    store.add_contract(Contract(1, other))
    store.add_refs([Ref(1, C, h(1), 101), Ref(1, C, h(2), 102), Ref(1, C, h(3), 102), Ref(1, C, h(4), 104)]
                   + [Ref(1, other, h(i), 101 + (i > 7)) for i in (6, 7, 8)]
                   + [Ref(1, other, h(9), 109), Ref(1, other, h(4), 104)])  # fmt: skip
    targets = [(1, C), (1, other)]
    metered = PlanSettings(calls_metered=True)
    # Block 101: h(1) with h(6), h(7); 102: h(2), h(3) with h(8); 104: h(4), shared; 109: h(9).
    assert estimate(store, targets, batch_size=5, plan=metered) == [
        DryRunRow(1, C, 4, 1, 3, 2, 6, None),
        DryRunRow(1, other, 5, 1, 0, 0, 2, None, shared=1, riders=3),
    ]  # fmt: skip


def test_a_dry_run_with_free_calls_counts_each_contracts_refs_in_a_block_apart(
    store: Store, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With free calls (plan auto) a run looks up no riders (Enricher.may_fetch_blocks), so
    # each contract's batch judges a block by its own refs in it: under
    # --block-plan-min-refs 2, one ref of each of two contracts in a block is fetched one by
    # one by each, 4 calls, where the dry run, adding both contracts' refs up, said 2.
    from gapfill.engine.dryrun import DryRunRow, estimate
    from gapfill.enrich.fetch import Enricher, PlanSettings
    from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings

    other = "0x" + "ef" * 20
    store.add_contract(Contract(1, other))
    # Block 100: h(1) with h(4); block 101: h(2), h(3) with h(5).
    store.add_refs([Ref(1, C, h(1), 100), Ref(1, C, h(2), 101), Ref(1, C, h(3), 101),
                    Ref(1, other, h(4), 100), Ref(1, other, h(5), 101)])  # fmt: skip
    targets = [(1, C), (1, other)]
    free = PlanSettings(block_plan_min_refs=2, block_plan_min_refs_free=2, calls_metered=False)
    rows = estimate(store, targets, batch_size=500, plan=free)
    assert rows == [DryRunRow(1, C, 3, 1, 2, 1, 4, None), DryRunRow(1, other, 2, 1, 0, 0, 4, None)]
    client = RpcClient([EndpointConfig("http://node.invalid/")], RpcSettings(budget_dir=str(tmp_path)))
    monkeypatch.setattr(client, "supports_block_receipts", lambda: True)  # as the estimate assumes
    enricher = Enricher(client, 1, plan=free)
    assert not enricher.may_fetch_blocks()
    made = 0
    for target in targets:
        blocks, per_tx = enricher.split(list(store.iter_gap(*target)), riders=[])
        made += 2 * len(blocks) + 2 * len(per_tx)
    assert made == sum(r.estimated_calls for r in rows) == 8
    # Metered, a run looks riders up: each block is fetched once, by the first contract.
    assert estimate(store, targets, batch_size=500, plan=replace(free, calls_metered=True)) == [
        DryRunRow(1, C, 3, 1, 3, 2, 4, None), DryRunRow(1, other, 2, 1, 0, 0, 0, None, riders=2),
    ]  # fmt: skip


@pytest.mark.timeout(60)
def test_removing_a_contract_waits_for_a_discovery_writing_it_and_deletes_what_it_wrote(
    pg_url: str,
) -> None:
    # PostgreSQL, READ COMMITTED: a removal that did not wait would miss the refs a
    # concurrent writer has not committed yet, and leave them for a contract nobody tracks.
    import threading

    import psycopg

    with open_store(pg_url) as s:
        s.add_contract(Contract(1, C))
    writer = psycopg.connect(pg_url)
    try:
        # What a discovery does: the contract's row held shared, then its refs written.
        writer.execute("SELECT 1 FROM contracts WHERE chain_id = 1 AND address = %s FOR SHARE", (C,))
        writer.execute("INSERT INTO refs (chain_id, contract, tx_hash, block_number, source) "
                       "VALUES (1, %s, %s, 5, 'logs')", (C, h(5)))  # fmt: skip
        removed: list[dict[str, int]] = []

        def remove() -> None:
            with open_store(pg_url) as other:
                removed.append(other.remove_contract(1, C))

        remover = threading.Thread(target=remove)
        remover.start()
        time.sleep(0.5)
        assert remover.is_alive(), "the removal did not wait for the writer"
        writer.commit()
        remover.join(30)
    finally:
        writer.close()
    assert removed and removed[0]["refs"] == 1
    with open_store(pg_url) as s:
        assert s.count_gap(1, C) == 0 and s.list_contracts() == []


def _until(check: Callable[[], bool]) -> None:
    """Poll ``check`` until it holds (the test's timeout ends a wait that never does)."""
    while not check():
        time.sleep(0.02)


def _tracking_refs(url: str, n: int = 4) -> Store:
    """A store on ``url`` tracking C, with refs h(1) .. h(n) (in blocks 1 .. n)."""
    s = open_store(url)
    s.add_contract(Contract(1, C))
    s.add_refs([Ref(1, C, h(i), i) for i in range(1, n + 1)])
    return s


def _waits_for_a_lock(watcher: Any) -> bool:
    """Whether a session of this database waits for a lock (a row's, or an advisory one)."""
    return bool(watcher.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'").fetchone()[0] > 0)  # fmt: skip


class _Removal:
    """``remove_contract(1, address)`` on its own connection and thread, started at a point
    of another transaction; ``started_and_waiting`` returns once it waits for a lock, or has
    ended without waiting."""

    def __init__(self, pg_url: str, address: str = C) -> None:
        import threading

        import psycopg

        self.url = pg_url
        self.address = address
        self.watcher = psycopg.connect(pg_url, autocommit=True)  # sees the waits and the clock
        self.removed: list[dict[str, int]] = []
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            with open_store(self.url) as other:
                self.removed.append(other.remove_contract(1, self.address))
        except Exception as exc:
            self.errors.append(exc)

    def started_and_waiting(self) -> None:
        self.thread.start()
        _until(lambda: not self.thread.is_alive() or _waits_for_a_lock(self.watcher))

    def beside(self, call: Callable[[], Any], *closing: Any) -> Any:
        """``call()``, which starts the removal, its error kept with the removal's; then
        waits for the removal to end and closes ``closing`` and the watcher."""
        try:
            return call()
        except Exception as exc:
            self.errors.append(exc)
            return None
        finally:
            self.thread.join(30)
            for c in (*closing, self.watcher):
                c.close()

    def expired(self, batch: Batch) -> None:
        """Wait until the database's clock has passed ``batch``'s lease."""
        _until(lambda: self.watcher.execute("SELECT extract(epoch from clock_timestamp()) > %s",
                                            (batch.lease_expires_at,)).fetchone()[0])  # fmt: skip


@pytest.mark.timeout(60)
def test_a_removal_and_a_commit_whose_lease_just_expired_do_not_deadlock(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commit locks its batch's row while the lease is held, then writes failures and
    # refs. A removal starting as that lease expires is not refused; it used to delete the
    # contract's failure records before its batches, so each waited for the other:
    # "deadlock detected", and one of the two was rolled back.
    with open_store(pg_url) as s:
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, h(1), 1), Ref(1, C, h(2), 2)])
        s.write(Enriched(failures=[Failure(1, h(1), C, "rpc_error", "timeout")]))  # retried
        s.plan(s.create_run("batch", 1), [(1, C)], batch_size=10)
    worker = open_store(pg_url)
    removal = _Removal(pg_url)
    write_results = worker._write_results  # type: ignore[attr-defined]

    def late_commit(cur: Any, written: Any, calls: int = 0, now: float | None = None) -> list[int]:
        # The batch's row is locked, the lease was held: now it expires, and a removal runs.
        removal.expired(b)
        removal.started_and_waiting()
        return write_results(cur, written, calls, now)  # type: ignore[no-any-return]

    b = worker.lease("w", 2.0)
    assert b is not None
    monkeypatch.setattr(worker, "_write_results", late_commit)
    enriched = Enriched([tx_row(2, 2)], failures=[Failure(1, h(1), C, "not_found", "null")])
    committed = removal.beside(lambda: worker.commit_batch(b, enriched), worker)
    assert removal.errors == [] and committed
    deleted = removal.removed[0]
    assert (deleted["refs"], deleted["failures"], deleted["batches"]) == (2, 1, 1)
    with open_store(pg_url) as s:
        assert s.list_contracts() == [] and s.list_failures() == []
        assert len(s.fetch_transactions(1)) == 1  # the chain's row stays


@pytest.mark.timeout(60)
def test_a_removal_and_a_coordinator_expiring_its_batches_do_not_deadlock(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A removal locks the contract's batches in batch order; an expiry giving several of
    # them back must lock them in that order too, not in the order the table's rows lie in
    # (here the second batch first: the first was updated last).
    with _tracking_refs(pg_url) as s:
        s.plan(s.create_run("batch", 1), [(1, C)], batch_size=2)
        first, second = s.lease("killed", 60.0), s.lease("killed", 60.0)
        assert first is not None and second is not None
    removal = _Removal(pg_url)
    for b in (second, first):  # their run was killed a while ago
        removal.watcher.execute("UPDATE batches SET lease_expires_at = extract(epoch from clock_timestamp()) "
                        "- 10 WHERE batch_id = %s", (b.id,))  # fmt: skip
    assert [i for (i,) in removal.watcher.execute("SELECT batch_id FROM batches ORDER BY ctid")] == [
        second.id, first.id,
    ]  # fmt: skip
    coordinator = open_store(pg_url)
    # Its rows in the table's order, as a sequential scan reads them.
    coordinator._live().execute("SET enable_indexscan = off; SET enable_bitmapscan = off")  # type: ignore[attr-defined]
    coordinator._live().commit()  # type: ignore[attr-defined]
    give_back = coordinator._give_back  # type: ignore[attr-defined]

    def then_a_removal(*args: Any, **kwargs: Any) -> bool:
        ok: bool = give_back(*args, **kwargs)
        if removal.thread.ident is None:
            removal.started_and_waiting()  # after the first batch given back
        return ok

    monkeypatch.setattr(coordinator, "_give_back", then_a_removal)
    expired = removal.beside(coordinator.expire_leases, coordinator)
    assert removal.errors == [] and sorted(b.id for b in expired) == [first.id, second.id]
    assert removal.removed[0]["batches"] == 2


@pytest.mark.timeout(60)
def test_a_plan_started_during_a_removal_waits_for_it_and_plans_nothing(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plan read the gap from its own snapshot, where the refs a removal had deleted but
    # not committed were still there: it planned batches after the removal had deleted the
    # contract's, and left an open plan of a contract nobody tracks.
    import threading

    import psycopg

    with _tracking_refs(pg_url) as s:
        run_id = s.create_run("batch", 1)
    remover, planner = open_store(pg_url), open_store(pg_url)
    watcher = psycopg.connect(pg_url, autocommit=True)
    plans: list[PlanInfo] = []
    plan = threading.Thread(target=lambda: plans.append(planner.plan(run_id, [(1, C)], 2)))
    sql = remover._sql  # type: ignore[attr-defined]

    def then_a_plan(text: str) -> str:
        if text.startswith("DELETE FROM contracts"):  # its refs and batches deleted, uncommitted
            plan.start()
            _until(lambda: not plan.is_alive() or _waits_for_a_lock(watcher))
        return sql(text)  # type: ignore[no-any-return]

    monkeypatch.setattr(remover, "_sql", then_a_plan)
    try:
        assert remover.remove_contract(1, C)["refs"] == 4
        plan.join(30)
    finally:
        for c in (remover, planner, watcher):
            c.close()
    assert plans == [PlanInfo(0, 0, 0)]
    with open_store(pg_url) as s:
        assert s.list_contracts() == [] and not s.has_open_batches()


@pytest.mark.timeout(60)
def test_a_removal_started_during_a_plan_waits_for_it_and_deletes_its_batches(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other way round: a removal that did not wait for a plan under way deleted the refs
    # the plan had read, and the plan then committed batches of a contract nobody tracks.
    planner = _tracking_refs(pg_url)
    removal = _Removal(pg_url)
    gap_keys = planner._gap_keys  # type: ignore[attr-defined]

    def then_a_removal(cur: Any, chain_id: int, contract: str) -> Any:
        keys = gap_keys(cur, chain_id, contract)
        first = next(keys)  # the gap read
        removal.started_and_waiting()
        yield first
        yield from keys

    monkeypatch.setattr(planner, "_gap_keys", then_a_removal)
    info = removal.beside(lambda: planner.plan(planner.create_run("batch", 1), [(1, C)], 2), planner)
    assert removal.errors == [] and info == PlanInfo(2, 4, 0)
    assert removal.removed[0]["batches"] == 2 and removal.removed[0]["refs"] == 4
    with open_store(pg_url) as s:
        assert s.list_contracts() == [] and not s.has_open_batches()


@pytest.mark.timeout(60)
def test_two_removals_at_once_delete_the_failure_record_of_a_transaction_they_shared(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each removal kept the shared failure record because the other contract still had a
    # ref to its transaction, as each saw it before the other committed: it outlived both.
    other = "0x" + "cd" * 20
    with open_store(pg_url) as s:
        s.add_contract(Contract(1, C))
        s.add_contract(Contract(1, other))
        s.add_refs([Ref(1, C, h(1), 1), Ref(1, other, h(1), 1), Ref(1, other, h(2), 2)])
        s.write(Enriched(failures=[Failure(1, h(1), other, "not_found", "null"),
                                   Failure(1, h(2), other, "not_found", "null")]))  # fmt: skip
    first = open_store(pg_url)
    removal = _Removal(pg_url, C)
    sql = first._sql  # type: ignore[attr-defined]

    def then_the_other(text: str) -> str:
        if text.startswith("DELETE FROM contracts") and removal.thread.ident is None:
            removal.started_and_waiting()  # `other`'s refs deleted, not yet committed
        return sql(text)  # type: ignore[no-any-return]

    monkeypatch.setattr(first, "_sql", then_the_other)
    deleted = removal.beside(lambda: first.remove_contract(1, other), first)
    assert removal.errors == [] and deleted is not None
    assert deleted["failures"] == 1 and removal.removed[0]["failures"] == 1
    with open_store(pg_url) as s:
        assert s.list_contracts() == [] and s.list_failures() == []


@pytest.mark.parametrize("first", ["x", "y"])
def test_removing_contracts_deletes_exactly_the_failure_records_no_other_contract_tracks(
    db_url: str, first: str
) -> None:
    x, y = "0x" + "aa" * 20, "0x" + "bb" * 20
    refs = {1: (x,), 2: (x, y), 3: (y,), 6: (y,)}  # h(4), h(5): no contract has a ref to them
    recorded = {1: x, 2: x, 3: x, 4: x, 5: y, 6: y}  # the contract whose run recorded it
    with open_store(db_url) as s:
        s.add_contract(Contract(1, x))
        s.add_contract(Contract(1, y))
        s.add_refs([Ref(1, c, h(i), i) for i, cs in refs.items() for c in cs])
        s.write(Enriched(failures=[Failure(1, h(i), c, "not_found", "null") for i, c in recorded.items()]))
        # Its own transaction's (1), and one it recorded that no contract tracks (4); not
        # the ones y tracks (2, 3, 6), nor one y recorded that no contract tracks (5).
        stays = {"x": [2, 3, 5, 6], "y": [1, 2, 4]}[first]
        assert s.remove_contract(1, x if first == "x" else y)["failures"] == 6 - len(stays)
        assert [f.tx_hash for f, _ in s.list_failures()] == [h(i) for i in stays]
        s.remove_contract(1, y if first == "x" else x)  # the last contract: the rest goes
        assert s.list_failures() == []


SMALL, BIG = "0x" + "aa" * 20, "0x" + "bb" * 20


def _a_small_contract_beside_a_big_one(url: str, n: int) -> Store:
    """SMALL with 100 refs, BIG with the n - 50 refs from h(50) on (h(50) .. h(99) shared),
    and a failure record of each of SMALL's transactions and every 10th of the others."""
    s = open_store(url)
    s.add_contract(Contract(1, SMALL))
    s.add_contract(Contract(1, BIG))
    s.add_refs([Ref(1, SMALL, h(i), i) for i in range(100)])
    s.add_refs([Ref(1, BIG, h(i), i) for i in range(50, n)])
    s.write(Enriched(failures=[Failure(1, h(i), SMALL if i < 100 else BIG, "not_found", "null")
                               for i in range(n) if i < 100 or i % 10 == 0]))  # fmt: skip
    return s


def test_a_postgres_removal_reads_refs_only_through_their_indexes(pg_url: str) -> None:
    # Whether another contract tracks a failed transaction was a NOT EXISTS the planner made
    # an anti-join hashing every other contract's refs, read by a full scan of refs: a small
    # contract's removal read the whole table. Each failure record is now one index probe.
    n = 20_000
    with _a_small_contract_beside_a_big_one(pg_url, n) as s:
        conn = s._live()  # type: ignore[attr-defined]
        conn.execute("ANALYZE")
        conn.commit()

        def seq_read() -> int:
            conn.execute("SELECT pg_stat_force_next_flush()")
            conn.commit()
            (read,) = conn.execute("SELECT seq_tup_read FROM pg_stat_user_tables "
                                   "WHERE relname = 'refs'").fetchone()  # fmt: skip
            conn.rollback()
            return int(read)

        before = seq_read()
        deleted = s.remove_contract(1, SMALL)
        read = seq_read() - before
    assert (deleted["refs"], deleted["failures"]) == (100, 50)  # h(0) .. h(49): not BIG's
    assert read < n // 10, read


def test_a_sqlite_removal_looks_a_failed_transactions_refs_up_by_its_hash(sqlite_url: str) -> None:
    # Without statistics SQLite looked them up through the gap's key index, searched by
    # chain alone: every ref of the chain read per failure record (quadratic).
    n = 20_000
    with _a_small_contract_beside_a_big_one(sqlite_url, n) as s:
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        s._conn.set_progress_handler(count, 1000)  # type: ignore[attr-defined]
        deleted = s.remove_contract(1, SMALL)
        s._conn.set_progress_handler(None, 0)  # type: ignore[attr-defined]
    assert (deleted["refs"], deleted["failures"]) == (100, 50)
    # ~80,000 VM instructions (a few per record and ref), where a chain's refs read per
    # record of SMALL's made 5 million.
    assert steps[0] * 1000 < 20 * n, steps[0]


def test_a_postgres_import_reads_each_ref_a_few_times_not_once_per_ref(pg_url: str) -> None:
    # Refs just inserted have no statistics yet. Filling block numbers, the planner took
    # them for one row and rescanned the staged refs for each (40,000 hashes took 48 s, a
    # million would take hours), or looked each up by the contract's whole key range.
    n = 20_000
    with open_store(pg_url) as s:
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, h(i), None) for i in range(n)])  # hashes alone
        s.add_refs([Ref(1, C, h(i), None if i % 2 else i) for i in range(n)])  # then half with blocks
        conn = s._live()  # type: ignore[attr-defined]
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.commit()
        (staged,) = conn.execute(
            "SELECT seq_tup_read FROM pg_stat_all_tables WHERE relname = 'stage_refs' "
            "AND schemaname LIKE 'pg_temp%'"
        ).fetchone()
        (pages,) = conn.execute(
            "SELECT heap_blks_hit + heap_blks_read + idx_blks_hit + idx_blks_read "
            "FROM pg_statio_all_tables WHERE relname = 'refs' AND schemaname = 'public'"
        ).fetchone()
        conn.rollback()
        assert staged <= 10 * n and pages <= 100 * n, (staged, pages)
        assert s.count_gap(1, C) == n and block_of(s, 2) == 2 and block_of(s, 1) is None


def test_two_postgres_writers_of_shared_transactions_in_other_orders_do_not_deadlock(pg_url: str) -> None:
    # Two workers committing transactions two contracts share, each in its batch's key
    # order: one held y and waited for x, the other held x and waited for y, and PostgreSQL
    # ended one with "deadlock detected" after a second (every concurrent run over
    # overlapping contracts hit it; the loser's whole commit group was written again).
    import threading

    import psycopg

    x, y, z = (tx_row(i, 60 + i) for i in (1, 2, 3))  # hashes in the order x < y < z
    holder, a, b = open_store(pg_url), open_store(pg_url), open_store(pg_url)
    hold = holder._tx()
    cur = hold.__enter__()
    holder._upsert(cur, [z], [])  # z written, not committed: both writers will wait for it
    errors: list[BaseException] = []

    def write(store: Store, rows: list[TxRow]) -> None:
        try:
            store.write(Enriched(rows, []))
        except BaseException as exc:  # the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(a, [y, z, x])),
               threading.Thread(target=write, args=(b, [x, z, y]))]  # fmt: skip
    for t in threads:
        t.start()
    with psycopg.connect(pg_url, autocommit=True) as watch:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            (waiting,) = watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).fetchone()
            if waiting >= 2:
                break
            time.sleep(0.05)
    hold.__exit__(RuntimeError, RuntimeError("rolled back"), None)  # z goes: both go on
    for t in threads:
        t.join(timeout=30)
    for s in (holder, a, b):
        s.close()
    assert not errors, errors
    with open_store(pg_url) as s:
        assert sorted(t["tx_hash"] for t in s.fetch_transactions(1)) == [h(1), h(2), h(3)]


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


def _without_autovacuum(s: Store) -> Any:
    """The store's connection, with autovacuum kept away from the gap's tables."""
    conn = s._live()  # type: ignore[attr-defined]
    for table in ("refs", "transactions", "failures"):
        conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    conn.commit()
    return conn


def _mid_run(s: Store, analyzed: str, hashes: Callable[[int], str] = h) -> Any:
    """A contract's store in the middle of a run, ``analyzed`` (``refs``, ``all`` or
    ``neither``): 5,000 refs, the first 3,000 by key stored, 300 failure records (hash
    ``hashes(i)`` for ref i).
    Returns the connection, autovacuum kept away."""
    conn = _without_autovacuum(s)
    s.add_contract(Contract(1, C))
    s.add_refs([Ref(1, C, hashes(i), 100 + i // 50) for i in range(5_000)])
    failed = [Failure(1, hashes(i), C, "not_found") for i in range(3_000, 3_300)]
    s.write(Enriched([tx_row(i, 100 + i // 50, tx_hash=hashes(i)) for i in range(3_000)], failures=failed))
    if analyzed != "neither":
        conn.execute("ANALYZE" if analyzed == "all" else f"ANALYZE {analyzed}")
        conn.commit()
    return conn


@pytest.mark.parametrize("analyzed", ["refs", "neither"])
def test_a_postgres_gap_query_looks_each_ref_up_whatever_the_statistics(pg_url: str, analyzed: str) -> None:
    # With refs analyzed (autovacuum does, a minute after a large import) and transactions
    # not yet, the plan PostgreSQL keeps for a batch's gap query (a generic one, once a
    # statement is prepared) hashed every stored transaction: each batch read all the
    # others' rows, and a run of 80,000 transactions took 258 s instead of 14. With neither
    # analyzed it checked each ref against every failure record instead.
    from gapfill.store.base import KEY_SQL, _key_bound

    with open_store(pg_url) as s:
        conn = _mid_run(s, analyzed)
        gap = s._GAP_WHERE  # type: ignore[attr-defined]
        sql = s._sql(f"SELECT r.tx_hash FROM refs r WHERE {gap}{_key_bound('>=')}{_key_bound('<=')} "
                     f"ORDER BY {KEY_SQL}, r.tx_hash LIMIT ?")  # fmt: skip
        n = sql.count("%s")
        for i in range(1, n + 1):
            sql = sql.replace("%s", f"${i}", 1)
        conn.execute("SET plan_cache_mode = force_generic_plan")
        types = "bigint, text, bigint, text, bigint, bigint, text, bigint, bigint"
        conn.execute(f"PREPARE gap ({types}) AS {sql}")
        (plan,) = conn.execute(
            f"EXPLAIN (FORMAT JSON) EXECUTE gap(1, '{C}', 160, '{h(0)}', 160, 170, '{h(99_999)}', 170, 10000)"
        ).fetchone()
        conn.rollback()
    nodes = list(_plan_nodes(plan[0]["Plan"]))
    joins = [x["Node Type"] for x in nodes if "Join" in x["Node Type"]]
    scans = [(x["Node Type"], x.get("Relation Name")) for x in nodes if x.get("Relation Name")]
    assert not joins, plan  # no join at all: each ref is looked up by key
    probes = {t for t, rel in scans if rel in ("transactions", "failures")}
    assert probes <= {"Index Only Scan", "Index Scan"}, plan


def test_a_postgres_plan_gives_a_new_databases_stored_transactions_statistics(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never analyzed (a new database, where a concurrent run's start-up sample had stored
    # ~250 rows), the probe of a ref's stored transaction looked as cheap by (chain, block)
    # as by the primary key: PostgreSQL took the smaller index and filtered every stored row
    # of the chain by hash, per ref, in the plan and in each batch's gap query after it.
    with open_store(pg_url) as s:
        conn = _without_autovacuum(s)
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, h(i), 100 + i // 50) for i in range(2_000)])
        s.write(Enriched([tx_row(i, 100 + i // 50) for i in range(250)]))
        assert s.plan(s.create_run("concurrent", 2), [(1, C)], batch_size=500).refs == 1_750
        sent = _statements(monkeypatch, lambda: list(s.iter_gap(1, C, start=(105, h(0)), upto=(120, h(0)))))
        plans = [p for sql, params in sent for p in _both_plans(conn, sql, params)]
    _by_key_only(plans, 2)


@pytest.fixture(params=["refs", "neither"])
def mid_run(pg_url: str, request: pytest.FixtureRequest) -> Iterator[tuple[Store, Any]]:
    """A store in the middle of a run (:func:`_mid_run`), with refs analyzed or nothing, and
    its connection."""
    with open_store(pg_url) as s:
        yield s, _mid_run(s, request.param)


def _statements(monkeypatch: pytest.MonkeyPatch, call: Callable[[], object]) -> list[tuple[str, Any]]:
    """The statements (and parameters) the store sends while ``call`` runs."""
    import psycopg

    sent: list[tuple[str, Any]] = []
    execute = psycopg.Cursor.execute

    def record(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        sent.append((str(query), params))
        return execute(self, query, params, **kw)

    with monkeypatch.context() as m:
        m.setattr(psycopg.Cursor, "execute", record)
        call()
    return sent


def _plans_of(monkeypatch: pytest.MonkeyPatch, conn: Any, call: Callable[[], object],
              *words: str) -> list[dict[str, Any]]:  # fmt: skip
    """The plans (custom and generic) of the statements ``call`` sends that name one of ``words``."""
    sent = _statements(monkeypatch, call)
    return [p for sql, params in sent if any(w in sql for w in words) for p in _both_plans(conn, sql, params)]


def _both_plans(conn: Any, sql: str, params: Any) -> list[dict[str, Any]]:
    """The plans PostgreSQL runs a statement the store sent with: the custom one and the
    generic one a prepared statement may keep (psycopg prepares what runs five times)."""
    import psycopg

    n = sql.count("%s")
    for i in range(1, n + 1):
        sql = sql.replace("%s", f"${i}", 1)
    sql = sql.replace("%%", "%")
    plans = []
    for mode in ("custom", "generic"):
        conn.execute("DEALLOCATE ALL")
        conn.execute(f"SET plan_cache_mode = force_{mode}_plan")
        conn.execute(f"PREPARE probe AS {sql}")
        marks = f"({', '.join(['%s'] * n)})" if n else ""
        (plan,) = psycopg.ClientCursor(conn).execute(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE probe{marks}", params
        ).fetchone()
        conn.rollback()  # what the statement changed
        plans.append(plan[0]["Plan"])
    return plans


def _by_key_only(plans: list[dict[str, Any]], count: int) -> None:
    """``count`` plans or more, and in each every read of ``transactions`` and ``failures`` is
    a lookup of one row by its primary key (chain and hash): no scan of the table or of a
    chain's rows, no hash built of them, no array searched."""
    assert len(plans) >= count, plans
    for node in (n for plan in plans for n in _plan_nodes(plan)):
        if node.get("Relation Name") not in ("transactions", "failures") or "Operation" in node:
            continue
        cond = node.get("Index Cond") or node.get("Recheck Cond") or ""
        assert node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), plans
        assert "tx_hash =" in cond and "ANY" not in cond, plans


def _read_whole_once_or_by_key(plans: list[dict[str, Any]], count: int, refs: int) -> None:
    """``count`` plans or more, and in each ``transactions`` and ``failures`` are read by key,
    or whole once (a hash built of them): never rescanned, whole or a chain's rows, per row of
    another table, and ``failures`` never once per ref (``refs``: how many there are)."""
    assert len(plans) >= count, plans
    for node in (n for plan in plans for n in _plan_nodes(plan)):
        below = {x.get("Relation Name") for x in _plan_nodes(node)}
        assert node["Node Type"] != "Materialize" or not below & {"transactions", "failures"}, plans
        if node.get("Relation Name") not in ("transactions", "failures") or "Operation" in node:
            continue
        cond = node.get("Index Cond") or node.get("Recheck Cond") or ""
        by_key = node["Node Type"] in ("Index Scan", "Index Only Scan") and "tx_hash =" in cond
        assert by_key or node["Actual Loops"] == 1, plans
        assert node["Relation Name"] != "failures" or node["Actual Loops"] < refs, plans


def test_postgres_status_reads_failure_records_once_each_whatever_the_statistics(
    mid_run: tuple[Store, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As LEFT JOINs, PostgreSQL without statistics (or with only refs') checked each ref
    # against every failure record: 35 s for 200,000 refs and 2,200 records. As a subquery
    # per ref, it looked every ref up among them: 1M refs, 3,000 records, 2 s of 8.
    s, conn = mid_run
    plans = _plans_of(monkeypatch, conn, lambda: s.status(1, C), "FROM contracts c")
    (status,) = s.status(1, C)
    assert (status.refs, status.enriched, status.failed, status.missing) == (5_000, 3_000, 300, 1_700)
    _read_whole_once_or_by_key(plans, 2, 5_000)


def test_postgres_status_with_statistics_reads_the_transactions_once_not_once_per_ref(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With fresh statistics a whole contract's refs are better joined to its chain's
    # transactions in one pass than looked up one by one: 1M refs, 780,000 stored, 2.6-3.5 s
    # instead of 7.7 (two statements, each for a chain, a contract, or both).
    with open_store(pg_url) as s:
        conn = _mid_run(s, "all")
        plans = _plans_of(monkeypatch, conn, lambda: (s.status(), s.status(1, C)), "FROM contracts c")
        assert [(x.refs, x.enriched, x.failed, x.missing) for x in s.status()] == [(5_000, 3_000, 300, 1_700)]
    _read_whole_once_or_by_key(plans, 4, 5_000)
    for node in (n for plan in plans for n in _plan_nodes(plan)):
        assert node.get("Relation Name") != "transactions" or node["Actual Loops"] < 5_000, plans


@pytest.mark.parametrize("analyzed", ["refs", "neither", "all"])
def test_a_postgres_plan_walks_the_refs_in_hash_order_and_sorts_the_gap_by_key(
    pg_url: str, analyzed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Walked by key, each ref's transaction was probed in random hash order: once the
    # chain's transactions outgrew the shared buffers, most probes read a page again (1M
    # refs, 780,000 stored: planning took 20-28 s instead of 9-16).
    import psycopg

    sent: list[tuple[str, Any]] = []
    execute = psycopg.ServerCursor.execute

    def record(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        sent.append((str(query), params))
        return execute(self, query, params, **kw)

    with open_store(pg_url) as s:
        other = "0x" + "cd" * 20  # its refs are not walked: the chain's hash index does not do
        s.add_contract(Contract(1, other))
        s.add_refs([Ref(1, other, h(10_000 + i), 100 + i // 50) for i in range(20_000)])
        conn = _mid_run(s, analyzed)
        with monkeypatch.context() as m:
            m.setattr(psycopg.ServerCursor, "execute", record)
            info = s.plan(s.create_run("batch", 1), [(1, C)], batch_size=500)
        assert (info.refs, info.batches) == (1_700, 4)
        with s._read() as cur:  # type: ignore[attr-defined]
            cur.execute("SELECT lo_block, lo_tx, hi_block, hi_tx, size FROM batches ORDER BY batch_id")
            assert cur.fetchall() == [
                (166, h(3_300), 175, h(3_799), 500), (176, h(3_800), 185, h(4_299), 500),
                (186, h(4_300), 195, h(4_799), 500), (196, h(4_800), 199, h(4_999), 200),
            ]  # fmt: skip
        plans = [p for sql, params in sent for p in _both_plans(conn, sql, params)]
    _by_key_only(plans, 2)
    for plan in plans:
        refs = [n for n in _plan_nodes(plan) if n.get("Relation Name") == "refs"]
        assert [n.get("Index Name") for n in refs] == ["refs_pkey"], plan


def test_postgres_clears_failure_records_and_finds_stored_blocks_by_key(
    mid_run: tuple[Store, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `tx_hash = ANY(array)`, each commit read every failure record of the chain (and
    # checked each against the whole array), a lookup of blocks every transaction of it.
    s, conn = mid_run
    batch = [tx_row(i, 100 + i // 50) for i in range(2_990, 3_010)]  # 10 with a record

    def clear() -> None:
        with s._tx() as cur:  # type: ignore[attr-defined]
            keys = s._failed_of(cur, batch)  # type: ignore[attr-defined]
            assert len(keys) == 10
            s._delete_failed(cur, keys)  # type: ignore[attr-defined]

    def blocks() -> None:
        with s._tx() as cur:  # type: ignore[attr-defined]
            assert s._stored_blocks(cur, 1, [h(i) for i in range(2_900, 3_100)]) == {  # type: ignore[attr-defined]
                h(i): 100 + i // 50 for i in range(2_900, 3_000)
            }

    plans = _plans_of(monkeypatch, conn, clear, "failures")
    plans += _plans_of(monkeypatch, conn, blocks, "transactions")
    assert len(s.list_failures(1, C)) == 290
    _by_key_only(plans, 4)


def test_postgres_fills_block_numbers_by_looking_each_ref_up(
    mid_run: tuple[Store, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a join, PostgreSQL with refs analyzed and transactions not hashed every transaction
    # of the chain at each run's end, for the few refs of unknown block.
    s, conn = mid_run
    s.add_refs([Ref(1, C, h(i), None) for i in range(90_000, 90_040)])
    s.write(Enriched([tx_row(i, 900) for i in range(90_000, 90_020)]))
    if conn.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'refs'").fetchone()[0]:
        conn.execute("ANALYZE refs")  # again, with them
    conn.commit()
    plans = _plans_of(monkeypatch, conn, lambda: s.fill_block_numbers(1, C), "transactions")
    assert s.fill_block_numbers(1, C) == 0  # the first call gave them all theirs
    assert s.status(1, C)[0].unknown_block_refs == 20
    _by_key_only(plans, 2)


@pytest.mark.parametrize("analyzed", ["refs", "neither"])
def test_postgres_has_gap_walks_refs_by_hash_not_by_key(
    pg_url: str, analyzed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches commit in key order: walking refs by key looked every enriched one up before
    # the first missing one (99,000 of 200,000: 300 ms instead of 0.1).
    def scattered(i: int) -> str:  # hash order is not key order, as on a chain
        return h(i * 7_919 % 5_003)

    with open_store(pg_url) as s:
        conn = _mid_run(s, analyzed, scattered)
        plans = _plans_of(monkeypatch, conn, lambda: s.has_gap(1, C), "FROM refs r")
        assert s.has_gap(1, C)
    assert len(plans) == 2
    for plan in plans:
        probes = [x for x in _plan_nodes(plan) if x.get("Relation Name") == "transactions"]
        assert sum(x["Actual Loops"] for x in probes) < 100, plan


# -- the open plan, whatever the history ----------------------------------------------------

D = "0x" + "cd" * 20
HISTORY = 20_000  # done batches of earlier runs, per contract
OPEN = 20  # batches of the open plan


def _with_history(s: Store, analyzed: bool) -> int:
    """Contracts C and D, each with HISTORY done batches of earlier runs (never pruned), and
    C's open plan: OPEN pending batches of 2 refs. ``analyzed``: then the statistics are
    taken (else the table has none: autovacuum is kept away). Returns the open plan's run."""
    if s.backend == "postgres":
        conn = s._live()  # type: ignore[attr-defined]
        conn.execute("ALTER TABLE batches SET (autovacuum_enabled = false)")
        conn.commit()
    for c in (C, D):
        s.add_contract(Contract(1, c))
    old = s.create_run("batch", 1)
    with s._tx() as cur:  # type: ignore[attr-defined]
        cur.execute(s._sql(  # type: ignore[attr-defined]
            "WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n WHERE g < ?) "
            "INSERT INTO batches (run_id, chain_id, contract, lo_block, lo_tx, hi_block, hi_tx, size, "
            "state, attempts, succeeded, last_owner) SELECT ?, 1, c.a, n.g, ?, n.g, ?, 500, 'done', 1, "
            "500, 'old' FROM n, (SELECT ? AS a UNION ALL SELECT ?) c"
        ), (HISTORY, old, h(0), h(0), C, D))  # fmt: skip
    s.add_refs([Ref(1, C, h(i), 100 + i) for i in range(2 * OPEN)])
    run = s.create_run("concurrent", 2)
    assert s.plan(run, [(1, C)], batch_size=2).refs == 2 * OPEN
    if analyzed:
        if s.backend == "postgres":
            conn.execute("ANALYZE batches")
            conn.commit()
        else:
            s._conn.execute("ANALYZE")  # type: ignore[attr-defined]
    return run


def _progress(s: Store, done_batches: int = 0, plan_new: bool = True) -> tuple[int, int]:
    """What a concurrent run's coordinator (or `gapfill worker`'s, ``plan_new`` False, having
    done ``done_batches``) says each second of C's plan, opened with OPEN batches: done, total."""
    from gapfill.engine.events import Progress
    from gapfill.engine.run import Coordinator, EnrichJob

    seen: list[Any] = []
    job = EnrichJob(s.url, (), ((1, C),), 1, mode="concurrent", workers=2, plan_new=plan_new)
    coordinator = Coordinator(job, seen.append)
    try:
        coordinator.done_batches = done_batches
        coordinator._progress(s, OPEN, 0, time.perf_counter())
    finally:
        coordinator.lifeline.close()
        coordinator._lifeline_w.close()
    (event,) = seen
    assert isinstance(event, Progress)
    return event.done_batches, event.total_batches


def _per_lease_and_second(s: Store) -> list[Callable[[], object]]:
    """What runs per lease, per commit or per second over batches: leases (of two targets, one,
    any), the coordinator's progress, the expiry check (with a lease expired), the owners of
    leases, a release, the wait for an open plan."""
    return [
        lambda: s.lease_next("w1", 300.0, [(1, C), (1, D)]),
        lambda: s.lease_next("w2", 300.0, [(1, C)]),
        lambda: s.lease_next("w3", 0.0),  # expired at once
        lambda: _progress(s),
        lambda: s.expire_leases(),
        lambda: s.lease_owners(),
        lambda: s.release_owner("w2"),
        lambda: s.has_open_batches([(1, C)]),
    ]


@pytest.mark.parametrize("analyzed", [False, True])
def test_postgres_leases_and_progress_read_the_open_batches_alone(
    pg_url: str, analyzed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every run adds its batches (2,000 per million refs) and none is pruned. The coordinator's
    # progress counted every batch of its contracts each second, and without statistics a
    # lease of two contracts read all of theirs (200,000 done batches, 2,000 open: 93 ms a
    # count, 60 ms a lease, instead of 0.7 and 1.3).
    with open_store(pg_url) as s:
        _with_history(s, analyzed)
        conn = s._live()  # type: ignore[attr-defined]
        plans = [p for f in _per_lease_and_second(s) for p in _plans_of(monkeypatch, conn, f, "batches")]
        assert len(plans) >= 2 * 10, plans
        for plan in plans:
            for node in _plan_nodes(plan):
                if "batches" not in (node.get("Relation Name"), node.get("Index Name", "")[:7]):
                    continue
                read = node["Actual Rows"] + node.get("Rows Removed by Filter", 0) + node.get(
                    "Rows Removed by Index Recheck", 0)  # fmt: skip
                # The open batches, and the old versions of those a lease or a give-back
                # updated since the last vacuum: a few times OPEN, however long the history.
                assert read * node["Actual Loops"] <= 5 * OPEN, plan
        assert s.count_open_batches([(1, C)]) == OPEN and s.count_open_batches([(1, D)]) == 0


class _Recorded:
    """A SQLite connection whose cursors note each statement and its parameters in ``sent``."""

    def __init__(self, conn: Any, sent: list[tuple[str, Any]]) -> None:
        self._conn, self._sent = conn, sent

    def cursor(self) -> Any:
        return _RecordedCursor(self._conn.cursor(), self._sent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _RecordedCursor:
    def __init__(self, cur: Any, sent: list[tuple[str, Any]]) -> None:
        self._cur, self._sent = cur, sent

    def execute(self, sql: str, params: Any = ()) -> Any:
        self._sent.append((sql, params))
        return self._cur.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cur, name)


@pytest.mark.parametrize("analyzed", [False, True])
def test_sqlite_leases_and_progress_search_the_open_batches_index(tmp_path: Any, analyzed: bool) -> None:
    # SQLite uses the partial index of the open batches only for a query that has its WHERE
    # term word for word: a lease searched the contracts' index by contract alone (every
    # batch of the contract: 200,000 done batches, 15 ms a lease instead of 0.4), and the
    # expiry check each second, the owners of leases and a release scanned the table.
    sent: list[tuple[str, Any]] = []
    with open_store(f"sqlite:///{tmp_path / 'g.db'}") as s:
        _with_history(s, analyzed)
        raw = s._conn  # type: ignore[attr-defined]
        s._conn = _Recorded(raw, sent)  # type: ignore[attr-defined]
        try:
            for call in _per_lease_and_second(s):
                call()
        finally:
            s._conn = raw  # type: ignore[attr-defined]
        selects = [(sql, p) for sql, p in sent if re.match(r"\s*SELECT", sql) and "FROM batches" in sql]
        assert len(selects) >= 8, sent
        for sql, params in selects:
            plan = [row[3] for row in raw.execute("EXPLAIN QUERY PLAN " + sql, params)]
            reads = [x for x in plan if re.match(r"(SCAN|SEARCH) batches\b", x)]
            open_only = [re.search(r"INDEX batches_open(_contract)?\b", x) for x in reads]
            assert reads and all(open_only), (sql, plan)
        assert s.count_open_batches([(1, C)]) == OPEN and s.count_open_batches([(1, D)]) == 0


def test_a_workers_progress_ends_at_100_percent_when_another_run_did_the_rest(db_url: str) -> None:
    # `gapfill worker` beside a coordinator: the worker did 3 batches, the coordinator the
    # rest. Its total stayed the open batches it joined, so it ended on "3/OPEN (x%)", never
    # said the finished plan, and read as if the plan were left unfinished.
    with open_store(db_url) as s:
        run = _with_history(s, analyzed=False)
        with s._tx() as cur:  # type: ignore[attr-defined]
            cur.execute(s._sql("UPDATE batches SET state = 'done' WHERE run_id = ?"), (run,))  # type: ignore[attr-defined]
        assert _progress(s, done_batches=3, plan_new=False) == (3, 3)


def test_a_workers_progress_counts_what_it_did_and_what_is_open_not_the_history(db_url: str) -> None:
    # `gapfill worker` said "3/40,020 batches": its total counted every batch its contract
    # ever had. A run that planned (or joined) counts the batches open at its start.
    with open_store(db_url) as s:
        run = _with_history(s, analyzed=False)
        with s._tx() as cur:  # type: ignore[attr-defined]
            three = "SELECT batch_id FROM batches WHERE run_id = ? ORDER BY batch_id LIMIT 3"
            cur.execute(s._sql(f"UPDATE batches SET state = 'done' WHERE batch_id IN ({three})"),  # type: ignore[attr-defined]
                        (run,))  # fmt: skip
        assert _progress(s, done_batches=3, plan_new=False) == (3, OPEN)
        assert _progress(s) == (3, OPEN)


# -- coverage ------------------------------------------------------------------------


def _cover(store: Store, *spans: tuple[int, int], method: str = "blocks", contract: str = C) -> None:
    """Record ``spans`` as discovery does (one commit, no refs)."""
    from gapfill.model import CoverageRange

    store.add_refs_and_coverage([], [CoverageRange(1, contract, lo, hi, method) for lo, hi in spans])


def _coverage(store: Store, contract: str = C, chain_id: int = 1) -> list[tuple[str, int, int]]:
    """The contract's coverage rows, by method."""
    return sorted((r.method, r.from_block, r.to_block) for r in store.get_coverage(chain_id, contract))


def test_coverage_that_touches_or_overlaps_is_kept_as_one_row(store: Store) -> None:
    _cover(store, (0, 9))
    _cover(store, (10, 19))  # touches
    assert _coverage(store) == [("blocks", 0, 19)]
    _cover(store, (5, 25))  # overlaps
    _cover(store, (30, 39))  # a gap stays a gap
    _cover(store, (3, 4))  # inside: nothing to add
    assert _coverage(store) == [("blocks", 0, 25), ("blocks", 30, 39)]
    _cover(store, (26, 29))  # fills the gap: both neighbours and it become one row
    assert _coverage(store) == [("blocks", 0, 39)]
    # Several ranges of one commit, out of order and overlapping each other.
    _cover(store, (60, 69), (45, 52), (50, 59), (41, 44))
    assert _coverage(store) == [("blocks", 0, 39), ("blocks", 41, 69)]
    _cover(store, (0, 100))
    assert _coverage(store) == [("blocks", 0, 100)]


def test_coverage_of_other_methods_contracts_and_chains_stays_apart(store: Store) -> None:
    other = "0x" + "cd" * 20
    store.add_contract(Contract(1, other))
    store.add_contract(Contract(2, C))
    _cover(store, (0, 9))
    _cover(store, (10, 19), method="logs")
    _cover(store, (10, 19), contract=other)
    from gapfill.model import CoverageRange

    store.add_refs_and_coverage([], [CoverageRange(2, C, 10, 19, "blocks")])
    assert _coverage(store) == [("blocks", 0, 9), ("logs", 10, 19)]
    assert _coverage(store, other) == [("blocks", 10, 19)]
    assert _coverage(store, C, chain_id=2) == [("blocks", 10, 19)]


def _insert_coverage_rows(s: Store, rows: list[tuple[str, str, int, int]]) -> None:
    """Coverage rows written as gapfill did before it merged them: one per chunk."""
    with s._tx() as cur:
        cur.executemany(s._sql("INSERT INTO coverage (chain_id, contract, method, from_block, to_block) "
                               "VALUES (1, ?, ?, ?, ?)"), rows)  # fmt: skip


def test_coverage_written_unmerged_is_merged_on_the_next_write_of_its_key(store: Store) -> None:
    _insert_coverage_rows(store, [(C, "blocks", lo, lo + 4) for lo in range(0, 100, 5)]
                          + [(C, "logs", 0, 4), (C, "logs", 5, 9)])  # fmt: skip
    _cover(store, (200, 209))  # elsewhere in the key: the whole key is merged
    assert _coverage(store) == [("blocks", 0, 99), ("blocks", 200, 209), ("logs", 0, 4), ("logs", 5, 9)]


def schema_up_to(db_url: str, monkeypatch: pytest.MonkeyPatch, version: int) -> None:
    """Empty the database at ``db_url`` and have migrations stop at ``version`` until
    ``monkeypatch.undo()``: a database as an older gapfill left it."""
    import psycopg

    from gapfill.store import postgres as pg_backend
    from gapfill.store import sqlite as sqlite_backend
    from gapfill.store.base import migrations

    backend = sqlite_backend if db_url.startswith("sqlite") else pg_backend
    if backend is pg_backend:  # a database of its own, without the template's schema
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("DROP SCHEMA public CASCADE")
            admin.execute("CREATE SCHEMA public")
    monkeypatch.setattr(backend, "migrations", lambda name: [m for m in migrations(name) if m[0] <= version])


def store_at(db_url: str, monkeypatch: pytest.MonkeyPatch, version: int) -> Store:
    """The emptied database at ``db_url``, opened at schema ``version`` (:func:`schema_up_to`)
    for the rows an older gapfill wrote; opened after ``monkeypatch.undo()`` it upgrades."""
    schema_up_to(db_url, monkeypatch, version)
    s = open_store(db_url, migrate=False)
    assert s.migrate() == version
    return s


def test_runs_of_a_gapfill_too_old_to_record_their_pid_are_not_left_running_by_an_upgrade(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: runs recorded before migration 2 have no pid, so no later run could judge
    # them (Store._mark_dead_runs skips them) and `gapfill runs` said `running` for good.
    with store_at(db_url, monkeypatch, 7) as s, s._tx() as cur:
        for state, pid in (("running", None), ("done", None), ("running", os.getpid())):
            cur.execute(s._sql("INSERT INTO runs (started_at, finished_at, host, pid, mode, workers, "
                               "state) VALUES (1000, ?, 'h', ?, 'batch', 1, ?)"),
                        (None if state == "running" else 1010.0, pid, state))  # fmt: skip
    monkeypatch.undo()
    with open_store(db_url) as s:
        got = [(r.state, r.finished_at, r.note) for r in sorted(s.list_runs(), key=lambda r: r.run_id)]
    assert got == [
        ("interrupted", None, "recorded by a gapfill too old to record its process, which no run "
                              "can check: taken as ended, at a time not known"),
        ("done", 1010.0, ""), ("running", None, "")]  # fmt: skip


def test_a_database_of_schema_4_has_its_coverage_merged(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    other = "0x" + "cd" * 20
    with store_at(db_url, monkeypatch, 4) as s:
        _insert_coverage_rows(s, [
            *[(C, "blocks", lo, lo + 4) for lo in range(0, 50, 5)],  # touching chunks
            (C, "blocks", 20, 60), (C, "blocks", 61, 61), (C, "blocks", 3, 3),  # overlapping, inside
            (C, "blocks", 70, 79), (C, "blocks", 80, 80),  # after a gap
            (C, "logs", 0, 9), (C, "logs", 10, 19), (other, "blocks", 62, 69),  # other keys
        ])  # fmt: skip
    monkeypatch.undo()
    with open_store(db_url) as s:
        assert s.schema_version() == s.latest_version() >= 5
        assert _coverage(s) == [("blocks", 0, 61), ("blocks", 70, 80), ("logs", 0, 19)]
        assert _coverage(s, other) == [("blocks", 62, 69)]


def _indexes(s: Store, table: str) -> set[str]:
    sql = ("SELECT indexname FROM pg_indexes WHERE tablename = ?" if s.backend == "postgres"
           else "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?")  # fmt: skip
    with s._read() as cur:
        cur.execute(s._sql(sql), (table,))
        return {name for (name,) in cur.fetchall()}


def test_a_database_of_schema_9_loses_the_transactions_block_index_and_keeps_its_rows(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transactions_block served no query gapfill runs, and every written row paid an entry in
    # it; PostgreSQL also took it for the gap's probe before `transactions` had statistics.
    with store_at(db_url, monkeypatch, 9) as s:
        assert "transactions_block" in _indexes(s, "transactions")
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, h(1), 51, "import"), Ref(1, C, h(2), 52, "import")])
        s.write(Enriched([tx_row(1, 51)], [log_row(1, 51)]))
    monkeypatch.undo()
    with open_store(db_url) as s:
        assert s.schema_version() == s.latest_version() >= 10
        indexes = _indexes(s, "transactions")
        assert "transactions_block" not in indexes and "transactions_to" in indexes
        assert [t["tx_hash"] for t in s.fetch_transactions(1)] == [h(1)]
        assert [r.tx_hash for r in s.iter_gap(1, C)] == [h(2)]
        s.write(Enriched([tx_row(2, 52)], []))
        assert s.count_gap(1, C) == 0

@pytest.mark.timeout(60)
def test_two_discoveries_of_one_contract_record_coverage_one_after_the_other(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL, READ COMMITTED: two writers that each read the contract's rows before the
    # other committed would each write their own merge, and leave [0, 9] and [10, 19] apart
    # (or, deleting by range instead of by the rows they read, lose one's blocks).
    import threading

    import psycopg

    from gapfill.model import CoverageRange

    with open_store(pg_url) as s:
        s.add_contract(Contract(1, C))
    first, second = open_store(pg_url), open_store(pg_url)
    read, release = threading.Event(), threading.Event()
    real = first._coverage_rows

    def read_then_wait(*args: Any) -> Any:
        rows = real(*args)
        read.set()
        release.wait(30)
        return rows

    monkeypatch.setattr(first, "_coverage_rows", read_then_wait)
    errors: list[Exception] = []

    def commit(store: Store, lo: int, hi: int) -> None:
        try:
            store.add_refs_and_coverage([Ref(1, C, h(lo), lo, "blocks")],
                                        [CoverageRange(1, C, lo, hi, "blocks")])  # fmt: skip
        except Exception as exc:
            errors.append(exc)

    a = threading.Thread(target=commit, args=(first, 0, 9))
    b = threading.Thread(target=commit, args=(second, 10, 19))
    watcher = psycopg.connect(pg_url, autocommit=True)
    try:
        a.start()
        assert read.wait(30)
        b.start()
        _until(lambda: not b.is_alive() or _waits_for_a_lock(watcher))
        waited = b.is_alive()
        release.set()
        a.join(30)
        b.join(30)
    finally:
        release.set()
        watcher.close()
        first.close()
        second.close()
    assert errors == []
    with open_store(pg_url) as s:
        assert _coverage(s) == [("blocks", 0, 19)] and s.count_gap(1, C) == 2
    assert waited  # for the contract's row, which the first held until it committed


@pytest.mark.timeout(60)
def test_migration_5_merges_coverage_an_older_gapfill_commits_meanwhile(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A discovery of an older gapfill (another host, schema 4) commits a chunk's row while
    # migration 5 runs. The migration read the rows into its merge, then deleted every row:
    # one committed between the two was deleted without being merged (its blocks lost), and
    # one committed after it stayed a row of its own beside the merge. It locks the table's
    # writers out first, so such a row waits and is merged.
    import threading

    import psycopg

    with store_at(pg_url, monkeypatch, 4) as s:
        with s._tx() as cur:  # as a gapfill of schema 4 wrote it
            cur.execute(s._sql("INSERT INTO contracts (chain_id, address) VALUES (1, ?)"), (C,))
        _insert_coverage_rows(s, [(C, "blocks", 0, 9)])
    monkeypatch.undo()
    older = psycopg.connect(pg_url)  # its chunk's row, not yet committed
    older.execute("INSERT INTO coverage (chain_id, contract, method, from_block, to_block) "
                  "VALUES (1, %s, 'blocks', 10, 19)", (C,))  # fmt: skip
    errors: list[Exception] = []

    def migrate() -> None:
        try:
            with open_store(pg_url):
                pass
        except Exception as exc:
            errors.append(exc)

    migration = threading.Thread(target=migrate)
    watcher = psycopg.connect(pg_url, autocommit=True)
    try:
        migration.start()
        _until(lambda: not migration.is_alive() or _waits_for_a_lock(watcher))
        older.commit()
        migration.join(30)
    finally:
        older.close()
        watcher.close()
    assert errors == []
    with open_store(pg_url) as s:
        assert s.schema_version() == s.latest_version() >= 5
        assert _coverage(s) == [("blocks", 0, 19)]


def test_postgres_a_commit_waiting_past_lock_timeout_for_another_is_retried_not_refused(pg_url: str) -> None:
    # Every worker's commit updates the run's row: one that waited for another worker's
    # commit past the role's lock_timeout was a StoreRefused, and ended the whole run.
    import psycopg

    from gapfill.errors import StoreBusy
    from gapfill.store.postgres import PostgresStore

    with open_store(pg_url) as setup:
        setup.add_contract(Contract(1, C))
        setup.add_refs([Ref(1, C, h(1), 1)])
        run = setup.create_run("concurrent", 2)
        setup.plan(run, [(1, C)])
    with PostgresStore(pg_url + "?options=-c%20lock_timeout%3D200ms") as s, \
            psycopg.connect(pg_url) as other:  # fmt: skip
        s.counts_for_run = run
        batch = s.lease("w", 300, [(1, C)])
        assert batch is not None
        other.execute("UPDATE runs SET note = note WHERE run_id = %s", (run,))  # its commit, under way
        with pytest.raises(StoreBusy) as busy:
            s.commit_batches([(batch, Enriched(txs=[tx_row(1, 1)]))])
        assert not isinstance(busy.value, StoreRefused)
        assert busy.value.what.endswith("waited for a lock longer than its lock_timeout (canceling statement "
                                        "due to lock timeout)"), busy.value.what  # fmt: skip
        other.commit()
        assert s.commit_batches([(batch, Enriched(txs=[tx_row(1, 1)]))]) == [1]  # the retry passes


def test_postgres_a_dropped_connection_is_said_as_such_not_as_a_url_to_fix(pg_url: str) -> None:
    # A run's retry notice said "could not connect to PostgreSQL ...: check that the server
    # runs and fix GAPFILL_DB" after pg_terminate_backend: the connection had worked.
    import psycopg

    from gapfill.errors import StoreDropped
    from gapfill.store.postgres import PostgresStore

    with PostgresStore(pg_url) as s:
        pid = s._live().info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StoreDropped) as dropped:
            s.schema_version()
        assert str(dropped.value).startswith("lost the connection to PostgreSQL at 127.0.0.1:")
        assert "GAPFILL_DB" not in str(dropped.value)
        assert s.schema_version() is not None  # reopened on the next call
        # A server that stopped answering since: its port closed (1 has no server).
        s._live().close()
        s.url = re.sub(r":\d+/", ":1/", pg_url)
        with pytest.raises(StoreDropped) as down:
            s.schema_version()
        assert str(down.value).startswith("PostgreSQL at 127.0.0.1:1 is not answering now (")
        assert str(down.value).endswith(": check that the server runs, then run the command again")


def test_the_readmes_sqlite_query_compares_text_integers_by_value(sqlite_url: str) -> None:
    """The README's SQLite example (its ``sql`` block after "compare and sort those"), run
    on stored rows: a plain comparison reads ``value`` as text, and CAST AS INTEGER stops at
    2**63 - 1, so both get these rows wrong; the example does not."""
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    after = readme[readme.index("compare and sort those"):]
    start = after.index("```sql\n") + 7
    query = after[start : after.index("\n```", start)]
    assert query.startswith("SELECT tx_hash, value"), query
    wei = 10**18
    values = [2, 10 * wei - 1, 10 * wei, 2**63, 2**70, 9 * wei, 11 * wei]
    with open_store(sqlite_url) as s:
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, h(i), 7) for i in range(len(values))])
        run = s.create_run("batch", 1)
        s.plan(run, [(1, C)], batch_size=100)
        b = s.lease("w1", 60.0)
        assert b is not None
        assert s.commit_batch(b, Enriched([tx_row(i, 7, value=v) for i, v in enumerate(values)]))
    import sqlite3

    con = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        got = con.execute(query).fetchall()
        naive = con.execute("SELECT value FROM transactions WHERE value >= 10000000000000000000").fetchall()
        capped = con.execute("SELECT count(DISTINCT CAST(value AS INTEGER)) FROM transactions "
                             "WHERE value IN (?, ?)", (str(2**63), str(2**70))).fetchone()  # fmt: skip
    finally:
        con.close()
    big = sorted((v for v in values if v >= 10 * wei), reverse=True)
    assert [int(v) for _, v, _ in got] == big
    assert [h(values.index(v)) for v in big] == [t for t, _, _ in got]
    assert [eth for _, _, eth in got] == pytest.approx([v / wei for v in big])
    assert {int(v) for (v,) in naive} != set(big) and capped == (1,)  # what the README warns of
