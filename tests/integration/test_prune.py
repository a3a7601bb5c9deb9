"""`gapfill prune`: finished plans older than --older-than go with their lease events, on both
backends; open plans, recent ones and those runs still running worked on stay, and so do the
runs, which `gapfill runs` shows as before."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from gapfill.cli import cli
from gapfill.engine.prune import chunks, prune
from gapfill.model import Contract, Enriched, Failure, Ref, TxRow
from gapfill.store import FinishedPlan, Pruned, Store, open_store, owner_name
from gapfill.wording import counted

DAY = 86_400.0
OLD, RECENT, OPEN, RUNNING, JOINED, LATE = ("0x" + f"{i:02x}" * 20 for i in range(0xA1, 0xA7))


def h(i: int) -> str:
    return "0x" + f"{i:064x}"


def tx(i: int, block: int) -> TxRow:
    return TxRow(chain_id=1, tx_hash=h(i), block_number=block, block_hash=h(10_000 + block), tx_index=0,
                 block_timestamp=1_700_000_000 + block, from_address="0x" + "11" * 20, to_address=OLD,
                 value=1, input="0x", nonce=i, gas=21_000, gas_price=1, max_fee_per_gas=None,
                 max_priority_fee_per_gas=None, tx_type=0, status=1, root=None, gas_used=21_000,
                 cumulative_gas_used=21_000, effective_gas_price=1, created_contract=None,
                 access_list=None, max_fee_per_blob_gas=None, blob_versioned_hashes=None,
                 blob_gas_used=None, blob_gas_price=None, authorization_list=None, method_id=None,
                 method_name=None, method_args=None, log_count=0)  # fmt: skip


@pytest.fixture
def store(db_url: str) -> Any:
    s = open_store(db_url)
    yield s
    s.close()


def track(store: Store, contract: str, first: int, n: int = 25) -> None:
    store.add_contract(Contract(1, contract))
    store.add_refs([Ref(1, contract, h(i), i) for i in range(first, first + n)])


def work(store: Store, run: int, contract: str, batches: int | None = None) -> None:
    """Lease and commit ``batches`` (None: all) of ``contract``'s open plan as run ``run``'s worker,
    its rows counted for the run."""
    store.counts_for_run = run
    try:
        while batches is None or batches > 0:
            b = store.lease(owner_name("w1", run), 60.0, [(1, contract)])
            if b is None:
                break
            assert store.commit_batch(b, Enriched([tx(int(r.tx_hash, 16), r.block_number or 0)
                                                   for r in store.batch_refs(b)]))  # fmt: skip
            batches = None if batches is None else batches - 1
    finally:
        store.counts_for_run = None


def finished_plan(store: Store, contract: str, first: int) -> int:
    """A run that planned ``contract``'s 25 refs into 3 batches, stored them all and ended."""
    track(store, contract, first)
    run = store.create_run("batch", 1)
    store.plan(run, [(1, contract)], batch_size=10)
    work(store, run, contract)
    store.finish_run(run, "done")
    return run


def age(store: Store, days: float, run: int | None = None) -> None:
    """Move run ``run`` (None: every run) and the lease events of the batches it planned (of
    every batch) ``days`` into the past."""
    with store._tx() as cur:
        cur.execute(store._sql("UPDATE runs SET started_at = started_at - ?, finished_at = finished_at - ? "
                               "WHERE CAST(? AS BIGINT) IS NULL OR run_id = ?"),
                    (days * DAY, days * DAY, run, run))  # fmt: skip
        cur.execute(store._sql("UPDATE lease_events SET at = at - ? WHERE batch_id IN (SELECT batch_id "
                               "FROM batches WHERE CAST(? AS BIGINT) IS NULL OR run_id = ?)"),
                    (days * DAY, run, run))  # fmt: skip


def table(store: Store, name: str) -> int:
    with store._read() as cur:
        cur.execute(f"SELECT count(*) FROM {name}")
        return int(cur.fetchone()[0])


def plan_of(store: Store, contract: str) -> tuple[int, int]:
    """``contract``'s batches and their lease events."""
    ids = {b for b, in _rows(store, "SELECT batch_id FROM batches WHERE contract = ?", contract)}
    return len(ids), sum(1 for e in store.lease_events() if e.batch_id in ids)


def _rows(store: Store, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with store._read() as cur:
        cur.execute(store._sql(sql), params)
        return [tuple(r) for r in cur.fetchall()]


def test_only_old_finished_plans_go_with_their_events_and_the_runs_stay(store: Store) -> None:
    old = finished_plan(store, OLD, 1)
    # Done 40 days ago by a run that ended just now (it went on with others): its run is recent.
    track(store, RECENT, 100)
    recent = store.create_run("batch", 1)
    store.plan(recent, [(1, RECENT)], batch_size=10)
    work(store, recent, RECENT)
    age(store, 40, recent)
    store.finish_run(recent, "done")
    # Planned long ago and stopped with a batch still pending: an open plan a rerun joins.
    track(store, OPEN, 200)
    stopped = store.create_run("batch", 1)
    store.plan(stopped, [(1, OPEN)], batch_size=10)
    work(store, stopped, OPEN, batches=2)
    store.finish_run(stopped, "interrupted")
    # Planned by a run that is still running (this process's), all done by a `gapfill worker`
    # that ended long ago.
    track(store, RUNNING, 300)
    running = store.create_run("batch", 1)
    store.plan(running, [(1, RUNNING)], batch_size=10)
    helper = store.create_run("concurrent", 1)
    work(store, helper, RUNNING)
    store.finish_run(helper, "done")
    # Planned by a run that ended long ago, finished by one still running: its events are that
    # run's evidence of being alive, which dates its end if it was killed (Store._last_seen).
    track(store, JOINED, 400)
    first = store.create_run("batch", 1)
    store.plan(first, [(1, JOINED)], batch_size=10)
    store.finish_run(first, "interrupted")
    joining = store.create_run("concurrent", 1)
    work(store, joining, JOINED)
    # Planned long ago, finished by a run that ended a moment ago: worked on recently.
    track(store, LATE, 500)
    early = store.create_run("batch", 1)
    store.plan(early, [(1, LATE)], batch_size=10)
    store.finish_run(early, "interrupted")
    age(store, 40, early)
    late = store.create_run("concurrent", 1)
    work(store, late, LATE)
    store.finish_run(late, "done")
    for run in (old, stopped, running, helper, first, joining):
        age(store, 40, run)
    store.add_refs([Ref(1, OLD, h(i), i) for i in range(1_000, 1_005)])  # new refs since
    store.write(Enriched(failures=[Failure(1, h(1_004), OLD, "not_found", "null")]))
    kept = {c: plan_of(store, c) for c in (RECENT, OPEN, RUNNING, JOINED, LATE)}
    runs_before = store.list_runs()
    status_before = store.status()
    assert plan_of(store, OLD) == (3, 6)  # each batch leased and committed

    # A dry run counts, and deletes nothing.
    assert prune(store, 30 * DAY, dry_run=True) == Pruned(1, 3, 6)
    assert plan_of(store, OLD) == (3, 6)
    # Younger than 45 days: nothing goes.
    assert prune(store, 45 * DAY) == Pruned()
    assert prune(store, 30 * DAY) == Pruned(1, 3, 6)
    assert plan_of(store, OLD) == (0, 0)
    assert {c: plan_of(store, c) for c in kept} == kept
    assert prune(store, 30 * DAY) == Pruned()  # nothing left to prune
    # What the commands read is as before: the runs with their counts, status, failures.
    assert store.list_runs() == runs_before
    assert [r.processed for r in store.list_runs() if r.run_id == old] == [25]
    assert store.status() == status_before
    assert [f.tx_hash for f, _ in store.list_failures(1, OLD, 10)] == [h(1_004)]
    # A rerun plans anew for the refs new since, and joins the open plan.
    rerun = store.create_run("batch", 1)
    info = store.plan(rerun, [(1, OLD), (1, OPEN)], batch_size=10)
    assert (info.batches, info.refs, info.joined) == (1, 4, 1)
    work(store, rerun, OLD)
    work(store, rerun, OPEN)
    assert not store.has_gap(1, OLD) and not store.has_gap(1, OPEN)


def test_a_killed_run_still_marked_running_keeps_the_plans_it_worked_on(store: Store) -> None:
    # Its process is gone, but no later run has marked it yet: when one does, it dates the
    # run's end from its last lease event, which a prune must not have taken.
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    track(store, OLD, 1)
    killed = store.create_run("batch", 1)
    with store._tx() as cur:
        cur.execute(store._sql("UPDATE runs SET pid = ? WHERE run_id = ?"), (gone.pid, killed))
    store.plan(killed, [(1, OLD)], batch_size=10)
    work(store, killed, OLD)
    age(store, 40)
    assert prune(store, 30 * DAY) == Pruned()
    store.create_run("batch", 1)  # marks it interrupted, ended at its last event
    [(state, finished)] = _rows(store, "SELECT state, finished_at FROM runs WHERE run_id = ?", killed)
    [(last,)] = _rows(store, "SELECT max(at) FROM lease_events")
    assert state == "interrupted" and finished == pytest.approx(last)
    assert prune(store, 30 * DAY) == Pruned(1, 3, 6)


def test_plans_go_whole_in_chunks_and_a_prune_cut_short_keeps_the_rest_whole(store: Store) -> None:
    runs = [finished_plan(store, c, 100 * i) for i, c in enumerate((OLD, RECENT, OPEN), 1)]
    age(store, 40)
    totals: list[Pruned] = []

    def cut(total: Pruned) -> None:
        totals.append(total)
        if len(totals) == 2:
            raise KeyboardInterrupt

    # One plan (3 batches) a chunk: the second chunk commits, then the prune stops.
    with pytest.raises(KeyboardInterrupt):
        prune(store, 30 * DAY, done=cut, chunk_batches=3)
    assert totals == [Pruned(1, 3, 6), Pruned(2, 6, 12)]
    assert [plan_of(store, c) for c in (OLD, RECENT, OPEN)] == [(0, 0), (0, 0), (3, 6)]
    assert prune(store, 30 * DAY, chunk_batches=3) == Pruned(1, 3, 6)
    assert table(store, "batches") == table(store, "lease_events") == 0
    assert [r.run_id for r in store.list_runs()] == runs[::-1]


def test_chunks_hold_whole_plans_and_span_few_batch_ids() -> None:
    def plan(lo: int, n: int) -> FinishedPlan:
        return FinishedPlan(lo, 1, OLD, n, 2 * n, lo, lo + n - 1)

    plans = [plan(1, 4), plan(5, 4), plan(9, 30), plan(100, 2), plan(102, 1)]
    assert [[p.lo for p in c] for c in chunks(plans, 10)] == [[1, 5], [9], [100, 102]]
    # A plan far from the last one starts a chunk, however few batches it has: the chunk's
    # ids are read as a range.
    assert [[p.lo for p in c] for c in chunks([plan(1, 1), plan(50, 1)], 10)] == [[1], [50]]


def run(db: str, *args: str, input: str | None = None) -> Result:
    r = CliRunner().invoke(cli, ["--db", db, *args], input=input, catch_exceptions=False)
    assert "Traceback" not in r.output + r.stderr
    return r


@pytest.mark.timeout(120)
def test_prune_through_the_cli_after_runs_of_enrich(small_chain: Any, db_url: str) -> None:
    db, chain = db_url, small_chain.chain
    silent = chain.silent
    mine = sorted(chain.direct[silent])
    assert run(db, "contract", "add", silent, "--chain-id", str(chain.chain_id)).exit_code == 0
    assert run(db, "import", "-", "--contract", silent, input="\n".join(mine[:6])).exit_code == 0
    enrich = ["--rpc-url", small_chain.url, "enrich", "--mode", "batch", "--batch-size", "2", "-q"]
    assert run(db, *enrich).exit_code == 0
    with open_store(db) as s:
        age(s, 40)
        batches, events = table(s, "batches"), table(s, "lease_events")
    assert batches >= 2  # (the start-up sample may store a few refs before the plan)
    runs = orjson.loads(run(db, "runs", "--json").output)
    status = run(db, "status", "--json").output

    r = run(db, "prune", "--dry-run")
    said = f"{batches} batches and {events} lease events of 1 finished plan older than 30 days"
    assert (r.exit_code, r.stdout) == (0, f"would prune {said} (dry run: nothing was deleted)\n"), r.output
    r = run(db, "prune", "--older-than", "41")
    assert (r.exit_code, r.stdout) == (0, "nothing to prune: no finished plan older than 41 days\n")
    r = run(db, "prune")
    assert (r.exit_code, r.stdout) == (0, f"pruned {said}; the runs stay (`gapfill runs`)\n"), r.output
    with open_store(db) as s:
        assert table(s, "batches") == table(s, "lease_events") == 0
    assert orjson.loads(run(db, "runs", "--json").output) == runs
    assert runs[0]["processed"] == 6 and run(db, "runs").output.startswith(f"#{runs[0]['run_id']} ")
    assert run(db, "status", "--json").output == status
    assert run(db, "failures").output == "no failures\n"
    # A rerun finds nothing to do; with new refs it plans anew, and that plan is recent.
    r = run(db, *enrich)
    assert (r.exit_code, r.stderr) == (0, f"nothing to enrich: every ref of {silent} on chain "
                                          f"{chain.chain_id} is stored\n"), r.output + r.stderr  # fmt: skip
    assert run(db, "import", "-", "--contract", silent, input="\n".join(mine[6:9])).exit_code == 0
    assert run(db, *enrich).exit_code == 0
    assert len(orjson.loads(run(db, "runs", "--json").output)) == 2
    assert "nothing to prune" in run(db, "prune", "--older-than", "12h").stdout
    with open_store(db) as s:
        batches = table(s, "batches")
    r = run(db, "prune", "--older-than", "0")
    assert r.stdout.startswith(f"pruned {counted(batches, 'batch', 'batches')} and "), r.output


@pytest.mark.parametrize("value", ["3x", "-1", "", "d", "1e3", "nan", "7 days"])
def test_a_bad_older_than_is_wrong_usage_in_one_sentence(sqlite_url: str, value: str) -> None:
    assert run(sqlite_url, "contract", "add", OLD, "--chain-id", "1").exit_code == 0
    r = run(sqlite_url, "prune", "--older-than", value)
    assert r.exit_code == 2, r.output
    assert (f"Error: Invalid value for '--older-than': {value!r} is not an age: give days (30), or hours "
            "or days with h or d (12h, 7d)\n") in r.stderr, r.stderr  # fmt: skip


@pytest.mark.parametrize(("value", "said"), [("7", "7 days"), ("7d", "7 days"), ("1", "1 day"),
                                             ("12h", "12 hours"), ("1h", "1 hour"), ("0.5", "12 hours"),
                                             (" 2D ", "2 days"), ("0", "0 days")])  # fmt: skip
def test_older_than_takes_days_or_hours(sqlite_url: str, value: str, said: str) -> None:
    assert run(sqlite_url, "contract", "add", OLD, "--chain-id", "1").exit_code == 0
    r = run(sqlite_url, "prune", "--older-than", value)
    assert (r.exit_code, r.stdout) == (0, f"nothing to prune: no finished plan older than {said}\n")


def test_ctrl_c_during_a_prune_says_what_it_pruned(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import gapfill.engine.prune as pruning

    with open_store(sqlite_url) as s:
        for i, c in enumerate((OLD, RECENT), 1):
            finished_plan(s, c, 100 * i)
        age(s, 40)
    deleted = []
    delete = Store.delete_plans

    def then_ctrl_c(self: Store, plans: Any) -> Pruned:
        if deleted:
            raise KeyboardInterrupt
        deleted.append(plans)
        return delete(self, plans)

    monkeypatch.setattr(pruning, "chunks", lambda plans, size: ([p] for p in plans))
    monkeypatch.setattr(Store, "delete_plans", then_ctrl_c)
    r = run(sqlite_url, "prune")
    assert (r.exit_code, r.stdout, r.stderr) == (130, "", (
        "interrupted: pruned 3 batches and 6 lease events of 1 finished plan older than 30 days, each "
        "plan whole; run the same command again to prune the rest\n")), r.output  # fmt: skip
    monkeypatch.undo()
    assert run(sqlite_url, "prune").stdout.startswith("pruned 3 batches and 6 lease events of 1 finished")
