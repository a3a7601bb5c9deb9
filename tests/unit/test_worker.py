"""The worker's lease loop, group commit and database-call discipline, against a fake store.

The fake store is a blocking object as the real ones are (the worker calls it from a
thread); it records calls that overlap on its one "connection" and can fail on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gapfill.engine.events import BatchAbandoned, BatchAssigned, BatchDone, BatchesEmptied, WorkerStats
from gapfill.engine.worker import Worker, WorkerSettings, WorkerTotals
from gapfill.errors import StoreBusy, StoreDropped, StoreError, StoreRefused
from gapfill.model import Batch, Contract, Enriched, Failure, Ref, TxRow
from gapfill.store import GivenBack, Leased, open_store


class FakeStore:
    def __init__(self, batches: int = 8, refs: int = 10) -> None:
        self.batches, self.refs = batches, refs
        self.next_id = 1
        self.state: dict[int, str] = {}
        self.committed: list[list[int]] = []  # one list of batch ids per transaction
        self.overlaps: list[str] = []
        self.calls: list[str] = []
        self._busy = threading.Lock()
        self.fail: Callable[[str, Sequence[Any]], bool] = lambda name, args: False
        self.kept: dict[int, int] = {}  # batch id -> transactions stored as it was given back
        self.pauses: dict[int, float] = {}  # batch id -> seconds before it may be leased again
        self.moved: dict[int, int] = {}  # batch id -> refs whose block those rows correct
        self.slow_s = 0.0
        self.already = 0  # transactions of each batch another batch stored first
        self.run_calls = 0  # the RPC calls the writes added to the run's
        self.emptied = 0  # batches the next lease call closes, as if emptied meanwhile
        self.refusal: StoreError | None = None  # what a failing call raises, if not a lost connection
        #: A write for which this says True is done, but its answer is lost (StoreDropped).
        self.lose: Callable[[str, Sequence[Any]], bool] = lambda name, args: False
        self.ended: dict[int, str] = {}  # batch id -> the lease event that ended its attempt
        self.stops: dict[int, bool] = {}  # batch id -> whether its last give-back was a stop's
        self.released_as_stop: list[bool] = []  # per release_owner call: whether a stop's

    def _call(self, name: str, args: Sequence[Any]) -> None:
        if not self._busy.acquire(blocking=False):
            self.overlaps.append(name)
            self._busy.acquire()
        try:
            self.calls.append(name)
            time.sleep(self.slow_s)
            if self.fail(name, args):
                raise self.refusal or StoreError(f"{name}: the server closed the connection")
        finally:
            self._busy.release()

    def lease(self, owner: str, timeout_s: float, targets: Any) -> Batch | None:
        self._call("lease", ())
        if self.next_id > self.batches:
            return None
        b = Batch(self.next_id, 1, 1, "c", (0, "a"), (0, "b"), self.refs, "leased", 1, owner,
                  time.time() + timeout_s)  # fmt: skip
        self.state[b.id] = "leased"
        self.next_id += 1
        return b

    def lease_next(self, owner: str, timeout_s: float, targets: Any) -> Leased:
        emptied, self.emptied = self.emptied, 0
        return Leased(self.lease(owner, timeout_s, targets), emptied)

    def batch_refs(self, batch: Batch) -> list[Ref]:
        self._call("batch_refs", (batch,))
        return [Ref(1, "c", f"0x{batch.id:04x}{i:060x}", 1) for i in range(self.refs)]

    def _answer(self, name: str, args: Sequence[Any]) -> None:
        if self.lose(name, args):
            raise StoreDropped("lost the connection to PostgreSQL at db:5432 (server closed the connection "
                               "unexpectedly)", "check that the server runs, then run the command again")

    def lease_outcomes(self, batches: Sequence[Batch]) -> dict[int, str]:
        self._call("lease_outcomes", batches)
        out = {b.id: self.ended[b.id] for b in batches if b.id in self.ended}
        return out | {b.id: "leased" for b in batches if self.state.get(b.id) == "leased"}

    def renew(self, batch: Batch, timeout_s: float) -> bool:
        self._call("renew", (batch,))
        return self.state.get(batch.id) == "leased"

    def commit_batches(self, items: Sequence[tuple[Batch, Enriched]], calls: int = 0) -> list[int | None]:
        self._call("commit_batches", items)
        self.run_calls += calls
        out = [self.state.get(b.id) == "leased" for b, _ in items]
        for (b, _), ok in zip(items, out, strict=True):
            if ok:
                self.state[b.id] = "done"
                self.ended[b.id] = "committed"
        self.committed.append([b.id for (b, _), ok in zip(items, out, strict=True) if ok])
        self._answer("commit_batches", items)
        return [len(e.txs) - self.already if ok else None for (_, e), ok in zip(items, out, strict=True)]

    def abandon_keeping(
        self, batch: Batch, error: str, keep: Enriched | None = None, retry_after_s: float = 0.0,
        calls: int = 0, *, stop: bool = False,
    ) -> GivenBack | None:
        self._call("abandon", (batch,))
        self.stops[batch.id] = stop
        self.run_calls += calls
        if self.state.get(batch.id) != "leased":
            self._answer("abandon", (batch,))  # it wrote its calls, so its answer can be lost too
            return None
        # As the real stores: a batch whose every ref the give-back stored is done.
        closed = keep is not None and keep.own + len(keep.failures) >= self.refs
        self.state[batch.id] = "done" if closed else "pending"
        self.ended[batch.id] = "committed" if closed else "abandoned"
        self.pauses[batch.id] = retry_after_s
        if keep is not None:
            self.kept[batch.id] = len(keep.txs)
            self.moved[batch.id] = len(keep.moved)
        self._answer("abandon", (batch,))
        return GivenBack(0 if keep is None else len(keep.txs) - self.already, closed)

    def add_run_calls(self, calls: int) -> None:
        self._call("add_run_calls", ())
        self.run_calls += calls

    def release_owner(self, owner: str, error: str, keep: Any = frozenset(), *, stop: bool = False) -> int:
        self._call("release_owner", ())
        self.released_as_stop.append(stop)
        given = [b for b, state in self.state.items() if state == "leased" and b not in keep]
        for b in given:
            self.state[b] = "pending"
        return len(given)

    def has_open_batches(self, targets: Any) -> bool:
        self._call("has_open_batches", ())
        return False


class _Stats:
    calls = requests = retries = rate_limited = 0


class FakeClient:
    def __init__(self) -> None:
        self.node = _Stats()
        self.last_reply_at = time.monotonic()
        self.waiting: set[int] = set()  # priorities whose requests wait for their turn

    def queued(self, priority: int) -> bool:
        return priority in self.waiting

    def held_back(self, priority: int) -> bool:
        return False

    def silent_s(self) -> float:
        return 0.0

    def stats(self) -> dict[str, _Stats]:
        return {"node": self.node}


class FakeEnricher:
    def __init__(self, delay_s: float = 0.01) -> None:
        self.delay_s = delay_s
        self.client: FakeClient | None = None  # set by worker(): 2 calls per ref, as per-tx

    def may_fetch_blocks(self) -> bool:  # per-tx: no riders to look up
        return False

    async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
        if self.client is not None:
            self.client.node.calls += len(refs)
        await asyncio.sleep(self.delay_s)
        if self.client is not None:
            self.client.node.calls += len(refs)
        return Enriched(txs=[object() for _ in refs])  # type: ignore[misc]


def worker(store: FakeStore, enricher: FakeEnricher | None = None, emit: Any = None,
           **settings: Any) -> Worker:  # fmt: skip
    s = WorkerSettings(**{"commit_wait_s": 0.05, "db_retry_s": 0.01, **settings})
    enricher = enricher or FakeEnricher()
    enricher.client = FakeClient()
    return Worker(0, "w", store, enricher.client, {1: enricher},  # type: ignore[arg-type]
                  s, emit or (lambda event: None))  # fmt: skip


def run_with_events(store: FakeStore) -> tuple[WorkerTotals, list[Any]]:
    """Run a worker on ``store`` to the end; its totals and the events it sent."""
    events: list[Any] = []
    return asyncio.run(worker(store, emit=events.append).run()), events


async def stop_while_a_batch_waits(w: Worker) -> None:
    """Run ``w`` and cancel it (a stop's SIGTERM) once a fetched batch waits for its group."""
    run = asyncio.create_task(w.run())
    while not w._waiting:
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert not w._waiting


async def stop_once(w: Worker, started: threading.Event) -> None:
    """Run ``w`` and cancel it (a stop's SIGTERM) once ``started`` is set."""
    run = asyncio.create_task(w.run())
    while not started.is_set():
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run


def slow_call(name: str, started: threading.Event) -> Callable[[str, Sequence[Any]], bool]:
    """A :attr:`FakeStore.fail` that fails nothing but holds each ``name`` call for 0.3 s,
    setting ``started`` as it begins: a stop can come while that call runs."""

    def slow(n: str, args: Sequence[Any]) -> bool:
        if n == name:
            started.set()
            time.sleep(0.3)
        return False

    return slow


def batch_lines(events: Sequence[Any], kind: type = BatchAbandoned) -> list[str]:
    """The progress lines of the ``kind`` events (batches given back, or done), as the CLI
    prints them."""
    import io

    from gapfill.cli_progress import LineRenderer

    out = io.StringIO()
    render = LineRenderer(out)
    for e in events:
        if isinstance(e, kind):
            render(e)
    return out.getvalue().splitlines()


def given_back_lines(events: Sequence[Any]) -> list[str]:
    """The progress lines of the batches given back, as the CLI prints them."""
    return batch_lines(events, BatchAbandoned)


@pytest.mark.timeout(30)
def test_batches_commit_in_groups_each_once() -> None:
    store = FakeStore(batches=12, refs=10)
    totals = asyncio.run(worker(store, commit_group_txs=40).run())
    done = [b for group in store.committed for b in group]
    assert sorted(done) == list(range(1, 13)) and totals.processed == 120
    assert max(len(g) for g in store.committed) >= 2, store.committed
    assert not store.overlaps


@pytest.mark.timeout(30)
def test_batches_a_lease_closed_as_emptied_count_as_done_without_a_line() -> None:
    # The store closes batches emptied meanwhile instead of leasing them: the worker counts
    # them done (the progress of `enrich` and `worker` comes from its totals and events),
    # and no "Assigned batch ..., 0 refs" line is said for them.
    store = FakeStore(batches=3, refs=10)
    store.emptied = 2
    totals, events = run_with_events(store)
    assert totals.batches == 5 and totals.processed == 30
    assert [e for e in events if isinstance(e, BatchesEmptied)] == [BatchesEmptied(0, 2)]
    assert sum(isinstance(e, BatchAssigned) for e in events) == 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize("refs_read", ["fails", "is_stopped"])
def test_a_lease_whose_refs_were_not_read_is_said_assigned_before_it_is_given_back(refs_read: str) -> None:
    # Review h5: a worker said a lease taken (BatchAssigned) only once batch_refs had answered;
    # a lease whose batch_refs failed (a dropped connection), or that a stop cut short, was
    # given back, and counted as given back, but never as taken (gapfill_leases_taken_total <
    # committed + given back + lost), and its "given back" line came with no "Assigned" line.
    from gapfill.engine.metrics import LeaseTally

    store = FakeStore(batches=4)
    reading, go_on = threading.Event(), threading.Event()
    failed: list[int] = []

    def fail_once(name: str, args: object) -> bool:
        if name == "batch_refs" and not failed:
            failed.append(1)
            if refs_read == "is_stopped":
                reading.set()
                go_on.wait(10)
                return False
            return True
        return False

    store.fail = fail_once  # type: ignore[assignment]
    tally = LeaseTally()
    events: list[Any] = []

    def emit(ev: Any) -> None:
        events.append(ev)
        tally.take(ev)

    async def stopped_while_reading() -> None:
        run = asyncio.create_task(worker(store, emit=emit).run())
        while not reading.is_set():
            await asyncio.sleep(0.01)
        run.cancel()  # the stop's SIGTERM
        go_on.set()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    if refs_read == "fails":
        asyncio.run(worker(store, emit=emit).run())
        assert (tally.committed, tally.given_back) == (3, 1)
    else:
        asyncio.run(stopped_while_reading())
        assert tally.given_back >= 1  # (and any other batch whose refs were being read)
    assert tally.taken == tally.committed + tally.given_back + tally.lost
    said = [(type(e).__name__, e.batch_id) for e in events if isinstance(e, (BatchAssigned, BatchAbandoned))]
    assert said.index(("BatchAssigned", 1)) < said.index(("BatchAbandoned", 1)), said


@pytest.mark.timeout(30)
def test_the_totals_count_what_the_batches_newly_stored_not_what_they_fetched() -> None:
    # Two contracts' batches in flight at once both fetch a transaction they share; it is
    # stored once, and the run's count in the database counts it once: so do the totals
    # (the coordinator's, the live progress) and the events they come from.
    store = FakeStore(batches=4, refs=10)
    store.already = 3
    totals, events = run_with_events(store)
    done = [e for e in events if isinstance(e, BatchDone)]
    assert [(e.succeeded, e.stored) for e in done] == [(10, 7)] * 4  # the line says what it fetched
    assert totals.processed == 28
    store = FakeStore(batches=3, refs=10)
    store.already = 2
    events = []
    w = Worker(0, "w", store, FakeClient(), {1: HalfFailingEnricher()},  # type: ignore[arg-type]
               WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01), events.append)  # fmt: skip
    totals = asyncio.run(w.run())
    given_back = [e for e in events if isinstance(e, BatchAbandoned)]
    assert [(e.kept, e.kept_new) for e in given_back] == [(5, 3)] * 3 and totals.processed == 9


@pytest.mark.timeout(30)
def test_a_failed_group_commits_its_batches_one_by_one() -> None:
    # The group's transaction fails (say, a dropped connection): nothing of it was written,
    # and each batch is then committed on its own instead of all being fetched again.
    store = FakeStore(batches=8, refs=10)
    failed = []

    def fail(name: str, args: Sequence[Any]) -> bool:
        if name == "commit_batches" and len(args) > 1 and not failed:
            failed.append(len(args))
            return True
        return False

    store.fail = fail
    totals = asyncio.run(worker(store, commit_group_txs=40).run())
    assert failed, "no group was failed: the test proved nothing"
    assert totals.processed == 80 and totals.lost == 0
    assert "abandon" not in store.calls
    assert sorted(b for g in store.committed for b in g) == list(range(1, 9))


@pytest.mark.timeout(30)
def test_each_write_adds_the_calls_made_since_the_previous_one_never_twice() -> None:
    # The run's row takes a worker's RPC calls with its writes (a commit, a give-back, in
    # the same transaction), so a kill -9 of its coordinator cannot lose a committed batch's
    # calls. A write that fails adds none (the next one takes them), a commit whose lease
    # was lost adds them all the same (they were made), and the rest is saved at the end.
    store = FakeStore(batches=8, refs=10)
    failed: list[str] = []

    def fail(name: str, args: Sequence[Any]) -> bool:
        if name == "commit_batches" and len(failed) < 2:
            failed.append(name)
            if len(failed) == 2:  # the second: its leases were lost meanwhile
                for b, _ in args:
                    store.state[b.id] = "expired"
                return False
            return True
        return False

    store.fail = fail
    w = worker(store, commit_group_txs=40)
    totals = asyncio.run(w.run())
    assert len(failed) == 2 and totals.lost > 0
    assert store.run_calls == w.client.stats()["node"].calls == 160 and w.unsaved_calls() == 0
    assert not store.overlaps
    # Calls after the last write (here a probe's, with nothing to lease) are saved as it ends.
    store = FakeStore(batches=0)
    w = worker(store)
    w.client.stats()["node"].calls = 3
    asyncio.run(w.run())
    assert store.run_calls == 3 and store.calls[-1] == "add_run_calls"


def lose_once(store: FakeStore, name: str, batch_id: int | None = None) -> list[int]:
    """Make the first ``name`` write of ``store`` (of batch ``batch_id``, if given) lose its
    answer; returns the batches it wrote."""
    lost: list[int] = []

    def lose(n: str, args: Sequence[Any]) -> bool:
        ids = [b.id for b, *_ in (args if n == "commit_batches" else [(args[0],)])]
        if n != name or lost or batch_id not in (None, *ids):
            return False
        lost.extend(ids)
        return True

    store.lose = lose
    return lost


@pytest.mark.timeout(30)
@pytest.mark.parametrize("in_flight", [1, 4])
def test_a_commit_whose_answer_was_lost_counts_its_batches_and_calls_once(in_flight: int) -> None:
    # The commit lands on the server, then the connection drops before its answer: the
    # worker's retry (the give-back of a group of one, or each batch's own commit) finds the
    # leases gone. It added those calls to the run's again, said "given back" or "lease
    # lost" for batches that were committed, and left them out of its totals.
    store = FakeStore(batches=6, refs=10)
    lost = lose_once(store, "commit_batches")
    events: list[Any] = []
    w = worker(store, emit=events.append, batches_in_flight=in_flight, commit_group_txs=1000)
    totals = asyncio.run(w.run())
    assert lost and (in_flight == 1 or len(lost) > 1), "no commit lost its answer: the test proved nothing"
    assert store.run_calls == w.client.stats()["node"].calls == 120 and w.unsaved_calls() == 0
    assert (totals.batches, totals.processed, totals.lost) == (6, 60, 0)
    assert not [e for e in events if isinstance(e, BatchAbandoned)]
    assert sorted(e.batch_id for e in events if isinstance(e, BatchDone) and e.committed) == list(range(1, 7))
    assert not store.overlaps


@pytest.mark.timeout(30)
def test_a_give_back_whose_answer_was_lost_counts_its_calls_once_and_says_what_it_stored() -> None:
    store = FakeStore(batches=2, refs=10)
    lost = lose_once(store, "abandon")
    events: list[Any] = []
    w = Worker(0, "w", store, FakeClient(), {1: HalfFailingEnricher()},  # type: ignore[arg-type]
               WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01), events.append)  # fmt: skip
    w.client.node.calls = 7  # type: ignore[attr-defined]
    totals = asyncio.run(w.run())
    assert lost == [1] and store.kept == {1: 5, 2: 5}
    assert store.run_calls == 7 and totals.processed == 10
    assert sorted((e.batch_id, e.kept) for e in events if isinstance(e, BatchAbandoned)) == [(1, 5), (2, 5)]


@pytest.mark.timeout(30)
def test_a_commit_and_then_its_give_back_both_losing_their_answer_leave_the_batch_committed() -> None:
    # The commit lands and its answer is lost; its give-back (the retry of a group of one)
    # finds the batch done, and loses its answer too. The next look-up found the commit's
    # event again and took it for the give-back's: the batch said "closed" with nothing
    # stored, and the totals left the committed batch out.
    store = FakeStore(batches=1, refs=10)
    lost: list[str] = []

    def lose_the_first_of_each(name: str, args: Sequence[Any]) -> bool:
        if name in lost:
            return False
        lost.append(name)
        return True

    store.lose = lose_the_first_of_each
    events: list[Any] = []
    w = worker(store, emit=events.append, batches_in_flight=1)
    totals = asyncio.run(w.run())
    assert lost == ["commit_batches", "abandon"], "not two lost answers in a row: the test proved nothing"
    assert (totals.batches, totals.processed, totals.lost) == (1, 10, 0)
    assert not [e for e in events if isinstance(e, BatchAbandoned)]
    assert [e.batch_id for e in events if isinstance(e, BatchDone) and e.committed] == [1]
    assert store.run_calls == w.client.stats()["node"].calls == 20 and w.unsaved_calls() == 0


@pytest.mark.timeout(30)
def test_a_stop_during_the_give_back_after_a_lost_commit_answer_reports_the_batch_committed() -> None:
    # The commit lands and its answer is lost; the stop comes while the give-back that
    # follows runs on, shielded, and has found the commit landed. The batch's task, cancelled,
    # let the batch go at once, dropping that note: the give-back then found the batch done
    # and reported it given back with nothing, and the totals left the committed batch out.
    store = FakeStore(batches=1, refs=10)
    lost = lose_once(store, "commit_batches")
    giving_back = threading.Event()
    store.fail = slow_call("abandon", giving_back)
    events: list[Any] = []
    w = worker(store, emit=events.append, batches_in_flight=1)
    asyncio.run(stop_once(w, giving_back))
    assert lost == [1], "no commit lost its answer: the test proved nothing"
    assert (w.totals.batches, w.totals.processed, w.totals.lost) == (1, 10, 0)
    assert not [e for e in events if isinstance(e, BatchAbandoned)]
    assert [e.batch_id for e in events if isinstance(e, BatchDone) and e.committed] == [1]
    assert store.run_calls == w.client.stats()["node"].calls == 20 and not w._held


@pytest.mark.timeout(30)
def test_a_stops_give_back_whose_answer_was_lost_is_not_counted_again_as_the_worker_ends() -> None:
    # One try only as it stops, then the worker's last write (the calls not saved yet): it
    # added the give-back's calls again, and the line said nothing was stored.
    store = FakeStore(batches=2, refs=10)
    lost = lose_once(store, "abandon", batch_id=1)
    events: list[Any] = []
    w = worker(store, emit=events.append, commit_group_txs=1000, commit_wait_s=600.0,
               batches_in_flight=2)  # fmt: skip

    class Stuck(FakeEnricher):  # batch 2 is leased and stays fetching: batch 1 waits for it
        async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
            if refs[0].tx_hash.startswith("0x0002"):
                await asyncio.sleep(3600)
            return await super().enrich(refs, out)

    w.enrichers = {1: Stuck()}
    w.enrichers[1].client = w.client  # type: ignore[attr-defined]
    asyncio.run(stop_while_a_batch_waits(w))
    assert lost == [1] and store.kept == {1: 10}
    assert store.run_calls == w.client.stats()["node"].calls == 20 and w.unsaved_calls() == 0
    assert "[Worker-1] Batch 1 complete as it was given back (worker stopped): +10 success, 0 failed" \
        in given_back_lines(events)  # fmt: skip


@pytest.mark.timeout(30)
def test_a_stop_during_a_group_commit_reports_what_the_commit_did() -> None:
    # The stop cancels the group's task while its commit runs in the store's thread; the
    # commit ends all the same (the worker waits for the thread). Its batches are done, but
    # their lines said "given back: worker stopped" and the totals counted none of them.
    store = FakeStore(batches=2, refs=10)
    started = threading.Event()
    store.fail = slow_call("commit_batches", started)
    events: list[Any] = []
    w = worker(store, emit=events.append, commit_group_txs=1000, batches_in_flight=2)
    asyncio.run(stop_once(w, started))
    assert store.committed == [[1, 2]] and store.state == {1: "done", 2: "done"}
    assert not [e for e in events if isinstance(e, BatchAbandoned)]
    assert [(e.batch_id, e.committed, e.stored) for e in events if isinstance(e, BatchDone)] == \
        [(1, True, 10), (2, True, 10)]  # fmt: skip
    assert (w.totals.batches, w.totals.processed) == (2, 20)
    assert store.run_calls == w.client.stats()["node"].calls == 40


@pytest.mark.timeout(60)
@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_lost_commit_answer_on_a_real_store_keeps_the_counts_exact(db_url: str, in_flight: int) -> None:
    # The same on both backends, whose lease events tell the worker what the commit did.
    store = planned_store(db_url)
    real = store.commit_batches
    lost: list[int] = []

    def commit_then_lose_the_answer(items: Any, calls: int = 0) -> Any:
        out = real(items, calls=calls)
        if not lost:
            lost.append(len(items))
            raise StoreDropped("lost the connection to PostgreSQL at db:5432 (server closed the connection "
                               "unexpectedly)", "check that the server runs, then run the command again")
        return out

    store.commit_batches = commit_then_lose_the_answer
    events: list[Any] = []
    w = worker(store, RowsEnricher(), events.append, commit_group_txs=1000, batches_in_flight=in_flight)  # type: ignore[arg-type]
    totals = asyncio.run(w.run())
    [run] = store.list_runs()
    counts = store.batch_counts()
    store.close()
    assert lost == [in_flight], "no commit lost its answer as planned: the test proved nothing"
    assert (counts.done, run.processed, run.rpc_calls) == (2, 20, w.client.stats()["node"].calls)
    assert (totals.batches, totals.processed, totals.lost) == (2, 20, 0)
    assert not [e for e in events if isinstance(e, BatchAbandoned)]


@pytest.mark.timeout(60)
def test_a_lost_commit_answer_on_an_expired_lease_counts_its_calls_once(db_url: str) -> None:
    # The first batch's fetch makes no RPC progress for longer than its lease, which expires
    # unrenewed: its commit writes no rows but adds its calls, and its answer is lost. Until
    # the worker looks, nobody takes the batch back. Its expired lease was taken for one
    # still held (a write that did not land), and the give-back added the same calls again.
    store = planned_store(db_url)
    real_commit, real_lease, real_outcomes = store.commit_batches, store.lease_next, store.lease_outcomes
    lost: list[Any] = []
    looked: list[dict[int, str]] = []
    leased: list[Any] = []

    def commit_then_lose_the_answer(items: Any, calls: int = 0) -> Any:
        out = real_commit(items, calls=calls)
        if not lost:
            lost.append(out)
            raise StoreDropped("lost the connection to PostgreSQL at db:5432 (server closed the connection "
                               "unexpectedly)", "check that the server runs, then run the command again")
        return out

    def lease_once_until_looked_up(*args: Any) -> Leased:  # the expired lease stays as it was
        if leased and not looked:
            return Leased(None, 0)
        leased.append(real_lease(*args))
        return leased[-1]

    def outcomes(batches: Any) -> dict[int, str]:
        looked.append(real_outcomes(batches))
        return looked[-1]

    class SlowFirst(RowsEnricher):
        async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
            if len(leased) == 1:
                await asyncio.sleep(0.6)  # no answer: the lease is not renewed
            return await super().enrich(refs, out)

    store.commit_batches, store.lease_next, store.lease_outcomes = (commit_then_lose_the_answer,
                                                                    lease_once_until_looked_up, outcomes)
    w = worker(store, SlowFirst(), lease_timeout_s=0.2, batches_in_flight=1, retry_pause_s=0.01)
    totals = asyncio.run(w.run())
    [run] = store.list_runs()
    counts = store.batch_counts()
    store.close()
    assert lost == [[None]], "no commit on an expired lease lost its answer: the test proved nothing"
    assert (counts.done, run.processed, run.rpc_calls) == (2, 20, w.client.stats()["node"].calls)
    assert (totals.batches, totals.processed) == (2, 20)
    assert looked[0] == {}  # nothing tells whether it landed: its calls count as saved


@pytest.mark.timeout(60)
def test_a_stop_during_a_group_commit_on_a_real_store_reports_it_committed(db_url: str) -> None:
    store = planned_store(db_url)
    real = store.commit_batches
    started = threading.Event()

    def slow_commit(items: Any, calls: int = 0) -> Any:
        started.set()
        time.sleep(0.3)
        return real(items, calls=calls)

    store.commit_batches = slow_commit
    events: list[Any] = []
    w = worker(store, RowsEnricher(), events.append, commit_group_txs=1000, batches_in_flight=2)  # type: ignore[arg-type]
    asyncio.run(stop_once(w, started))
    counts = store.batch_counts()
    store.close()
    assert counts.done == 2
    assert sorted((e.batch_id, e.committed, e.stored) for e in events if isinstance(e, BatchDone)) == \
        [(1, True, 10), (2, True, 10)]  # fmt: skip
    assert not [e for e in events if isinstance(e, BatchAbandoned)] and w.totals.processed == 20


@pytest.mark.timeout(30)
def test_a_cancelled_store_call_keeps_the_connection_until_its_thread_is_done() -> None:
    # Cancelling a task while its store call runs in a thread must not let the next call
    # start on the same connection before that thread has finished.
    store = FakeStore()
    store.slow_s = 0.2
    w = worker(store)

    async def go() -> None:
        first = asyncio.create_task(w.db(store.release_owner, "w", "stop"))
        await asyncio.sleep(0.05)  # the thread is inside release_owner now
        first.cancel()
        await w.db(store.has_open_batches, None)
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(go())
    assert store.calls == ["release_owner", "has_open_batches"]
    assert not store.overlaps


@pytest.mark.timeout(30)
def test_a_stopping_worker_does_not_wait_for_a_database_that_is_down() -> None:
    # The outage window is far longer than this test's timeout: a worker that kept
    # retrying after a stop would be cut by it.
    store = FakeStore(batches=100)
    w = worker(store, db_outage_s=600.0)
    store.fail = lambda name, args: name == "lease" and store.next_id > 3

    async def go() -> None:
        run = asyncio.create_task(w.run())
        while "lease" not in store.calls[-1:] or store.next_id <= 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # retrying the lease now
        w.stopping = True
        await run

    asyncio.run(go())
    assert sorted(b for g in store.committed for b in g) == [1, 2, 3]


@pytest.mark.timeout(30)
def test_a_graceful_stop_gives_its_last_try_to_the_batches_whose_give_back_failed() -> None:
    # On a graceful stop (the coordinator's), a batch whose commit and give-back failed was
    # said as "its lease had ended already" (it was still held) and left to expire: only a
    # stop by cancellation tried release_owner once more.
    def stop_while_the_database_fails(release: bool) -> tuple[FakeStore, list[str]]:
        store = FakeStore(batches=100)
        events: list[Any] = []
        w = worker(store, FakeEnricher(delay_s=0.3), emit=events.append, db_outage_s=0.1,
                   lease_timeout_s=90.0)  # fmt: skip

        async def go() -> None:
            run = asyncio.create_task(w.run())
            while store.next_id <= 3:
                await asyncio.sleep(0.01)
            failing = {"commit_batches", "abandon"} | (set() if release else {"release_owner"})
            store.fail = lambda name, args: name in failing
            w.stopping = True
            with contextlib.suppress(StoreError):
                await run

        asyncio.run(go())
        return store, given_back_lines(events)

    store, lines = stop_while_the_database_fails(release=True)
    assert set(store.state.values()) == {"pending"}, store.state  # given back by the last try
    assert lines and all(" given back: StoreError: commit_batches" in line for line in lines), lines
    store, lines = stop_while_the_database_fails(release=False)
    assert set(store.state.values()) == {"leased"}, store.state
    assert lines and all("could not be given back (abandon: the server closed the connection)" in line
                         and "expires 90 s after" in line for line in lines), lines  # fmt: skip


@pytest.mark.timeout(30)
def test_a_worker_that_gives_up_on_the_database_stops_its_batch_tasks() -> None:
    store = FakeStore(batches=100)
    w = worker(store, FakeEnricher(delay_s=0.5), db_outage_s=0.1)
    store.fail = lambda name, args: name == "lease" and store.next_id > 3

    async def go() -> set[asyncio.Task[Any]]:
        with pytest.raises(StoreError):
            await w.run()
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    left = asyncio.run(go())
    assert not left, f"batch tasks outlived the worker: {left}"
    # The three batches it held were given back, not left leased until they expire.
    assert store.state == {1: "pending", 2: "pending", 3: "pending"}


@pytest.mark.timeout(30)
def test_a_batch_whose_give_back_fails_is_not_said_given_back() -> None:
    # QA: with the database gone, a stop said every batch in flight was "given back": their
    # leases stay until they expire, and the line must say so.
    store = FakeStore(batches=100)
    events: list[Any] = []
    w = worker(store, FakeEnricher(delay_s=0.5), emit=events.append, db_outage_s=0.1,
               lease_timeout_s=90.0)  # fmt: skip
    gone = {"abandon", "release_owner"}  # the stop's last try fails too
    store.fail = lambda name, args: (name == "lease" and store.next_id > 3) or name in gone

    async def go() -> None:
        with pytest.raises(StoreError):
            await w.run()

    asyncio.run(go())
    assert store.state == {1: "leased", 2: "leased", 3: "leased"}  # left to expire
    abandoned = [e for e in events if isinstance(e, BatchAbandoned)]
    assert sorted(e.batch_id for e in abandoned) == [1, 2, 3]
    assert all(e.not_given == "abandon: the server closed the connection" for e in abandoned), abandoned
    lines = given_back_lines(events)
    assert lines and all(
        line.endswith("attempt 1 (worker stopped) could not be given back (abandon: the server closed the "
                      "connection): nothing of it written; its lease expires 90 s after it was last renewed "
                      "(--lease-timeout), and the batch is taken back then")
        for line in lines), lines  # fmt: skip
    assert not any("given back:" in line for line in lines), lines
    # A give-back whose answer was lost, and whose lease a look finds still held, failed too:
    # not "its lease had ended already".
    store, events = FakeStore(batches=100), []
    w = worker(store, FakeEnricher(delay_s=0.5), emit=events.append, db_outage_s=0.1)
    store.refusal = StoreDropped("lost the connection to PostgreSQL at db:5432", "check it")  # type: ignore[assignment]
    store.fail = lambda name, args: (name == "lease" and store.next_id > 3) or name in gone
    asyncio.run(go())
    assert store.state == {1: "leased", 2: "leased", 3: "leased"}
    assert [e.not_given for e in events if isinstance(e, BatchAbandoned)] == [
        "lost the connection to PostgreSQL at db:5432: check it"] * 3, events
    # The stop's last try gives them back after all (without what they fetched): said so.
    store, events = FakeStore(batches=100), []
    w = worker(store, FakeEnricher(delay_s=0.5), emit=events.append, db_outage_s=0.1)
    store.fail = lambda name, args: (name == "lease" and store.next_id > 3) or name == "abandon"
    asyncio.run(go())
    assert store.state == {1: "pending", 2: "pending", 3: "pending"}
    lines = given_back_lines(events)
    assert len(lines) == 3, lines
    assert all(line.endswith("attempt 1 given back: worker stopped") for line in lines), lines


@pytest.mark.timeout(30)
def test_a_database_that_refuses_the_work_stops_the_worker_at_once() -> None:
    # A read-only database, a full disk or a missing grant refuses every try alike: the
    # worker retried the lease for the whole outage window before saying what to fix.
    store = FakeStore(batches=100)
    w = worker(store, FakeEnricher(delay_s=0.2), db_outage_s=0.5)
    store.refusal = StoreRefused('PostgreSQL database "x" takes no writes', "point --db at the primary")
    store.fail = lambda name, args: name == "lease" and store.next_id > 3
    with pytest.raises(StoreRefused, match="takes no writes"):
        asyncio.run(w.run())
    assert store.calls.count("lease") == 4, store.calls  # three leased, then one refused


@pytest.mark.timeout(30)
def test_a_commit_the_database_refuses_stops_the_worker_with_its_batches_given_back() -> None:
    # A statement_timeout its commits meet, a full disk, a grant revoked on one table: the
    # leases still pass, so the worker leased, fetched and had refused batch after batch,
    # the node's work for each thrown away, and ended as if done, saying nothing.
    store = FakeStore(batches=100)
    w = worker(store, FakeEnricher(delay_s=0.2))
    store.refusal = StoreRefused("PostgreSQL at x cancelled a statement at its statement_timeout",
                                 'raise or unset statement_timeout for role "u"')  # fmt: skip
    store.fail = lambda name, args: name == "commit_batches"
    with pytest.raises(StoreRefused, match="statement_timeout"):
        asyncio.run(w.run())
    # The batches in flight at the refusal (4, and those leased as their places freed) are
    # given back, those of the refused group too (a stop cut their give-backs short), none
    # left leased until it expires; no other one is leased.
    assert store.next_id - 1 <= 8, store.calls
    assert set(store.state.values()) == {"pending"}, store.state
    assert store.committed == []


def _lock_timeout() -> StoreError:
    """A commit cancelled at the session's lock_timeout, as the store says it."""
    import psycopg

    from gapfill.store.postgres import translate

    return translate(psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
                     "postgresql://u@db:5432/app")  # fmt: skip


@pytest.mark.timeout(30)
def test_a_commit_that_met_a_lock_timeout_gives_its_batch_back_and_the_worker_goes_on() -> None:
    # Every worker's commit updates the run's row: waiting past lock_timeout for another's
    # commit is contention, not a refusal. It stopped the worker (exit 6), and the run.
    store = FakeStore(batches=8)
    w = worker(store, FakeEnricher(delay_s=0.05), batches_in_flight=1)
    store.refusal = _lock_timeout()
    failed = iter([True, True])
    store.fail = lambda name, args: name == "commit_batches" and next(failed, False)
    totals = asyncio.run(w.run())
    assert sorted(b for g in store.committed for b in g) == [3, 4, 5, 6, 7, 8]
    assert store.state[1] == store.state[2] == "pending" and store.pauses[1] > 0  # to be retried
    assert totals.batches == 6


@pytest.mark.timeout(30)
def test_a_worker_whose_commits_keep_meeting_a_lock_timeout_stops_saying_to_raise_it() -> None:
    store = FakeStore(batches=1000)
    w = worker(store, FakeEnricher(delay_s=0.02), db_outage_s=0.3)
    store.refusal = said = _lock_timeout()
    store.fail = lambda name, args: name == "commit_batches"
    with pytest.raises(StoreRefused) as stopped:
        asyncio.run(w.run())
    assert str(stopped.value) == str(said) and "raise or unset lock_timeout" in str(said)
    assert store.committed == [] and "leased" not in store.state.values()  # all given back


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seldom", [False, True])
def test_a_worker_whose_commits_the_database_drops_every_time_stops_with_one_sentence(seldom: bool) -> None:
    # A connection dropped at every commit (a pooler's or a proxy's limit, say) reopens each
    # time, so no other call gives up: its batches were given back and fetched again, their
    # pauses doubling, without end. Seldom: commits further apart than db_outage_s.
    store = FakeStore(batches=200)
    w = worker(store, FakeEnricher(delay_s=0.05 if seldom else 0.02), db_outage_s=0.02 if seldom else 0.3,
               batches_in_flight=1, retry_pause_s=0.0)  # fmt: skip
    store.refusal = StoreDropped("lost the connection to PostgreSQL at db:5432 (server closed the connection "
                                 "unexpectedly)", "check that the server runs, then run the command again")
    store.fail = lambda name, args: name == "commit_batches"
    with pytest.raises(StoreRefused) as stopped:
        asyncio.run(w.run())
    assert str(stopped.value) == (
        "lost the connection to PostgreSQL at db:5432 (server closed the connection unexpectedly), and "
        "again at every commit since, none passing: nothing of them was written; find why the server (or "
        "a pooler or proxy in between) ends the connection, then run the command again")  # fmt: skip
    assert store.committed == [] and "leased" not in store.state.values()  # all given back
    assert len(store.state) < 100


def test_two_lock_timeouts_far_apart_are_no_run_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker that commits seldom (a low --rps, big batches) met a second lock_timeout
    # minutes after the first, no commit between them, and ended the run at once.
    from gapfill.engine import worker as worker_module

    clock = [1000.0]
    monkeypatch.setattr(worker_module.time, "monotonic", lambda: clock[0])
    w = worker(FakeStore(batches=1), db_outage_s=60)
    busy = _lock_timeout()
    assert isinstance(busy, StoreBusy)
    for step in (0, 61, 30, 20):  # one 61 s after the last starts again, then 30 + 20
        clock[0] += step
        assert w._still_busy(busy) is None
    clock[0] += 20  # 70 s of them, none more than 60 s apart
    assert isinstance(w._still_busy(busy), StoreRefused)


def test_commits_that_always_fail_end_the_run_however_seldom(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each lock_timeout (or statement_timeout its group commit exceeds) more than 60 s after
    # the last started a new run of them: a worker committing seldom never stopped, each of
    # its batches given back without its rows and fetched again, the node's work thrown away.
    # Its third spell of them in a row, no commit passing between, ends it.
    from gapfill.engine import worker as worker_module

    clock = [1000.0]
    monkeypatch.setattr(worker_module.time, "monotonic", lambda: clock[0])
    w = worker(FakeStore(batches=1), db_outage_s=60)
    busy = _lock_timeout()
    for step in (0, 61, 10):  # two spells (the third failure is of the second)
        clock[0] += step
        assert w._still_busy(busy) is None
    clock[0] += 600
    refused = w._still_busy(busy)
    assert isinstance(refused, StoreRefused) and str(refused) == str(busy)


@pytest.mark.timeout(30)
def test_a_worker_that_commits_seldom_and_always_meets_a_lock_timeout_stops_saying_to_raise_it() -> None:
    # Its commits further apart than db_outage_s (here 20 ms), as at a low --rps.
    store = FakeStore(batches=20)
    w = worker(store, FakeEnricher(delay_s=0.05), db_outage_s=0.02, batches_in_flight=1)
    store.refusal = said = _lock_timeout()
    store.fail = lambda name, args: name == "commit_batches"
    with pytest.raises(StoreRefused) as stopped:
        asyncio.run(w.run())
    assert str(stopped.value) == str(said)
    assert store.calls.count("commit_batches") == 3 and store.committed == []
    # A commit passing between starts the count again: one that fails now and then goes on.
    store = FakeStore(batches=12)
    w = worker(store, FakeEnricher(delay_s=0.05), db_outage_s=0.02, batches_in_flight=1)
    store.refusal = _lock_timeout()
    commits = itertools.count(1)
    store.fail = lambda name, args: name == "commit_batches" and next(commits) % 3 != 0
    totals = asyncio.run(w.run())
    assert totals.batches == 4 and len([g for g in store.committed if g]) == 4


@pytest.mark.timeout(30)
def test_a_lease_that_keeps_meeting_a_lock_timeout_ends_with_its_sentence() -> None:
    store = FakeStore(batches=100)
    events: list[Any] = []
    w = worker(store, emit=events.append, db_outage_s=0.2)
    store.refusal = said = _lock_timeout()
    store.fail = lambda name, args: name == "lease" and store.next_id > 2
    with pytest.raises(StoreRefused) as stopped:
        asyncio.run(w.run())
    assert str(stopped.value) == str(said)
    assert store.calls.count("lease") > 3  # retried, not refused at once
    (notice,) = [e.text for e in events if "retrying" in getattr(e, "text", "")]
    assert notice.endswith("lock_timeout (canceling statement due to lock timeout) while leasing a batch; "
                           "retrying"), notice


@pytest.mark.timeout(30)
def test_a_stop_during_a_lease_call_gives_back_the_batch_it_leased() -> None:
    # The stop cancelled the worker while its lease call ran in its thread: the call went
    # on and leased a batch that no task took, left leased until its lease expired.
    store = FakeStore(batches=100)
    in_lease, go_on = threading.Event(), threading.Event()
    lease = store.lease

    def slow_second_lease(owner: str, timeout_s: float, targets: Any) -> Batch | None:
        if store.next_id == 2:
            in_lease.set()
            go_on.wait(10)
        return lease(owner, timeout_s, targets)

    store.lease = slow_second_lease  # type: ignore[method-assign]
    w = worker(store, FakeEnricher(delay_s=5.0))

    async def go() -> None:
        run = asyncio.create_task(w.run())
        while not in_lease.is_set():
            await asyncio.sleep(0.01)
        run.cancel()
        await asyncio.sleep(0.05)
        go_on.set()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    asyncio.run(go())
    assert store.next_id == 3 and store.state == {1: "pending", 2: "pending"}, store.state
    assert store.released_as_stop == [True]  # the stop's last try gives back the one leased


@pytest.mark.timeout(30)
def test_a_batch_cancelled_while_waiting_for_its_group_is_given_back_not_committed() -> None:
    # Batch 1 is fetched and waits for its group; batch 2 is stuck in its RPC. A stop
    # cancels both: batch 1 leaves the group and is given back with its rows (a Ctrl+C
    # used to throw them away), which stores all it had left and closes it; batch 2 with
    # nothing; no group commit runs. Batch 1's line said "(10 stored, the rest retried)",
    # then "given back (10 stored)", though nothing of it was left for a retry: it is complete.
    store = FakeStore(batches=2)
    events: list[Any] = []

    class OneStuck(FakeEnricher):
        async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
            if refs[0].tx_hash.startswith("0x0002"):
                await asyncio.sleep(3600)
            return await super().enrich(refs, out)

    w = worker(store, OneStuck(), events.append, commit_group_txs=1000, commit_wait_s=600.0)
    asyncio.run(stop_while_a_batch_waits(w))
    assert store.committed == [] and "commit_batches" not in store.calls
    assert store.state == {1: "done", 2: "pending"}
    assert store.stops == {1: True, 2: True}  # a stop's give-backs: no failed attempt
    assert store.kept == {1: 10} and w.totals.batches == 1
    assert sorted(given_back_lines(events)) == [
        "[Worker-1] Batch 1 complete as it was given back (worker stopped): +10 success, 0 failed",
        "[Worker-1] Batch 2 attempt 1 given back: worker stopped",
    ]


C = "0x" + "ab" * 20
HASHES = [f"0x{i:064x}" for i in range(1, 21)]


def planned_store(url: str) -> Any:
    """A real store whose run planned the 20 refs of :data:`HASHES` in 2 batches, its writes
    adding to that run's counts (as a run's worker's do)."""
    store = open_store(url)
    store.add_contract(Contract(1, C))
    store.add_refs([Ref(1, C, x, i) for i, x in enumerate(HASHES, 1)])
    store.counts_for_run = store.create_run("batch", 1)
    store.plan(store.counts_for_run, [(1, C)], batch_size=10)
    return store


class RowsEnricher(FakeEnricher):
    """Rows a real store takes, one per ref (2 calls each); a batch holding ``stuck`` hangs."""

    def __init__(self, stuck: str = "") -> None:
        super().__init__()
        self.stuck = stuck

    async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
        if refs[0].tx_hash == self.stuck:
            await asyncio.sleep(3600)
        await super().enrich(refs, out)
        return Enriched([TxRow(1, r.tx_hash, r.block_number or 0, "0x" + "00" * 32, 0, None,
                               "0x" + "11" * 20, C, 0, "0x", 0, 21_000, None, None, None, 2, 1, None,
                               21_000, 21_000, None, None) for r in refs])  # fmt: skip


@pytest.mark.timeout(30)
def test_a_stop_that_stores_all_a_batch_had_left_says_the_batch_is_complete(tmp_path: Path) -> None:
    # The same stop on a real store: batch 1, given back with all its rows, is closed (done,
    # not pending), but its line said "given back (10 stored)" as if left for a retry.
    store = planned_store(f"sqlite:///{tmp_path / 'g.db'}")
    events: list[Any] = []
    w = worker(store, RowsEnricher(stuck=HASHES[10]), events.append, commit_group_txs=1000,  # type: ignore[arg-type]
               commit_wait_s=600.0)  # fmt: skip
    asyncio.run(stop_while_a_batch_waits(w))
    counts = store.batch_counts()
    store.close()
    assert (counts.done, counts.pending, counts.succeeded) == (1, 1, 10)
    assert sorted(given_back_lines(events)) == [
        "[Worker-1] Batch 1 complete as it was given back (worker stopped): +10 success, 0 failed",
        "[Worker-1] Batch 2 attempt 1 given back: worker stopped",
    ]


@pytest.mark.timeout(30)
def test_a_failed_renewal_does_not_stop_the_lease_keeper() -> None:
    # One renewal meets a dropped connection; the next period renews again, so the batch
    # keeps its lease through a long fetch and is committed.
    from gapfill.rpc.client import ANSWERED

    store = FakeStore(batches=1)
    fails = [0]

    def fail(name: str, args: Sequence[Any]) -> bool:
        if name == "renew" and not fails[0]:
            fails[0] += 1
            return True
        return False

    store.fail = fail

    class Slow(FakeEnricher):
        async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
            for _ in range(40):  # 0.8 s of answers, over many renewal periods
                await asyncio.sleep(0.02)
                hook = ANSWERED.get()
                if hook is not None:
                    hook()
            return await super().enrich(refs, out)

    totals = asyncio.run(worker(store, Slow(), lease_timeout_s=0.3).run())
    assert fails[0] == 1 and store.calls.count("renew") >= 3, store.calls
    assert totals.processed == 10 and totals.lost == 0


@pytest.mark.timeout(30)
def test_a_worker_waiting_for_others_polls_soon_then_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every batch is leased by another worker, which commits the last one after a while.
    # The idle worker polls after 50 ms, then doubling up to idle_poll_s: it notices the
    # end soon after (a flat 0.5 s poll kept concurrent runs waiting ~0.45 s past it), and
    # a long wait (a stuck worker's lease) still costs few queries.
    store = FakeStore(batches=0)
    polls = iter([True] * 7 + [False])
    store.has_open_batches = lambda targets: next(polls)  # type: ignore[method-assign]
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    asyncio.run(worker(store, idle_poll_s=0.5, idle_first_poll_s=0.05).run())
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert store.calls.count("lease") == 8


def test_progress_key_ranges_name_refs_without_a_block() -> None:
    from gapfill.engine.events import key_range
    from gapfill.model import UNKNOWN_BLOCK_KEY

    a, z = "0x" + "a" * 64, "0x" + "f" * 64
    assert key_range((1200, a), (1288, z)) == "blocks 1200-1288"
    assert key_range((1200, a), (UNKNOWN_BLOCK_KEY, z)) == (
        "blocks 1200 and up, then refs with no block number yet")
    assert key_range((UNKNOWN_BLOCK_KEY, a), (UNKNOWN_BLOCK_KEY, z)) == "refs with no block number yet"


class HalfFailingEnricher(FakeEnricher):
    """Every other ref fails for a reason that may pass (a 5xx after the retries)."""

    async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
        await asyncio.sleep(self.delay_s)
        return Enriched(txs=[object() for r in refs[::2]],  # type: ignore[misc]
                        failures=[Failure(r.chain_id, r.tx_hash, r.contract, "rpc_error", "HTTP 502")
                                  for r in refs[1::2]],
                        moved=[Ref(r.chain_id, r.contract, r.tx_hash, 2) for r in refs[::4]])  # fmt: skip


class HalfThenWaitEnricher(FakeEnricher):
    """Settles half the batch's refs, then waits for ``go`` before the rest: a batch in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
        from types import SimpleNamespace

        assert out is not None
        for r in refs[: len(refs) // 2]:
            out.row(r, SimpleNamespace(block_number=r.block_number), [])
        await self.go.wait()
        for r in refs[len(refs) // 2 :]:
            out.row(r, SimpleNamespace(block_number=r.block_number), [])
        return out.result()  # type: ignore[no-any-return]


@pytest.mark.timeout(30)
def test_a_worker_says_what_its_batch_in_flight_has_fetched() -> None:
    # A run of one batch said "0/1 batches, 0 tx/s" until its end: its stats now say what the
    # batch in flight has fetched and not stored yet, and nothing once it is stored.
    store = FakeStore(batches=1, refs=10)
    enricher = HalfThenWaitEnricher()
    events: list[Any] = []
    w = worker(store, enricher, emit=events.append, stats_every_s=0.01)
    seen: list[int] = []

    async def go() -> None:
        run = asyncio.create_task(w.run())
        while w.fetched_unstored() < 5:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # a stats report or more
        seen.append(w.fetched_unstored())
        enricher.go.set()
        await run

    asyncio.run(go())
    assert seen == [5]
    stats = [e for e in events if isinstance(e, WorkerStats)]
    assert any(e.fetched == 5 and e.processed == 0 for e in stats), stats
    assert stats[-1].fetched == 0 and stats[-1].processed == 10, stats[-1]
    assert w.fetched_unstored() == 0


@pytest.mark.timeout(30)
def test_a_batch_with_transient_failures_is_given_back_with_what_it_got() -> None:
    store = FakeStore(batches=3, refs=10)
    events: list[Any] = []
    w = Worker(0, "w", store, FakeClient(), {1: HalfFailingEnricher()},  # type: ignore[arg-type]
               WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01), events.append)  # fmt: skip
    totals = asyncio.run(w.run())
    assert store.state == {1: "pending", 2: "pending", 3: "pending"}
    assert store.stops == {1: False, 2: False, 3: False}  # failed attempts: they count
    assert store.pauses == {1: 1.0, 2: 1.0, 3: 1.0}  # a first attempt's retry waits 1 s
    assert store.kept == {1: 5, 2: 5, 3: 5} and "commit_batches" not in store.calls
    assert store.moved == {1: 3, 2: 3, 3: 3}  # the rows' block numbers are stored with them
    assert totals.processed == 15 and totals.failed == 0
    given_back = [e for e in events if isinstance(e, BatchAbandoned)]
    assert sorted((e.batch_id, e.kept) for e in given_back) == [(1, 5), (2, 5), (3, 5)]
    # An expected failure, said without the exception's class name.
    assert all(e.error.startswith("5 transactions failed, e.g. 0x") for e in given_back)
    assert all(" given back (5 stored, the rest retried): 5 transactions failed, e.g. " in line
               for line in given_back_lines(events)), given_back_lines(events)


class CrashingEnricher(FakeEnricher):
    """Settles a batch's first refs (3 rows, a ref not found, a 502), then raises: a bug, or
    an answer nothing expected. ``at_commit``: raise later, with every ref settled, from
    the commit instead."""

    async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
        from types import SimpleNamespace

        assert out is not None  # the worker hands its collector to every fetch
        for r in refs[:3]:
            out.row(r, SimpleNamespace(block_number=r.block_number), [])
        out.fail(Failure(1, refs[3].tx_hash, "c", "not_found", "the node does not know it"))
        out.fail(Failure(1, refs[4].tx_hash, "c", "rpc_error", "HTTP 502"))
        await asyncio.sleep(self.delay_s)
        raise RuntimeError("an answer nothing expected")


@pytest.mark.timeout(30)
def test_a_batch_failing_unexpectedly_midway_is_given_back_with_what_it_fetched() -> None:
    # It was given back with nothing kept: every call already answered was asked again.
    store = FakeStore(batches=2, refs=10)
    events: list[Any] = []
    totals = asyncio.run(worker(store, CrashingEnricher(), emit=events.append).run())
    assert store.state == {1: "pending", 2: "pending"}
    assert store.kept == {1: 3, 2: 3} and "commit_batches" not in store.calls
    given_back = [e for e in events if isinstance(e, BatchAbandoned)]
    # The rows and the permanent failure are kept; the 502's ref stays in the gap.
    assert sorted((e.batch_id, e.kept, e.kept_failed, e.rest) for e in given_back) == [
        (1, 3, 1, 6), (2, 3, 1, 6)]  # fmt: skip
    assert all(e.error == "RuntimeError: an answer nothing expected" for e in given_back)
    assert totals.processed == 6 and totals.permanent == 2


@pytest.mark.timeout(30)
def test_a_batch_whose_commit_fails_is_given_back_without_its_rows() -> None:
    # The rows a failed commit held may fail again: the give-back must not depend on them.
    store = FakeStore(batches=1, refs=10)
    store.fail = lambda name, args: name == "commit_batches"
    events: list[Any] = []
    asyncio.run(worker(store, emit=events.append).run())
    [given_back] = [e for e in events if isinstance(e, BatchAbandoned)]
    assert "commit_batches" in store.calls, "the commit was not tried: the test proved nothing"
    assert given_back.kept == 0 and store.kept == {} and store.state == {1: "pending"}


class RaisingEnricher(FakeEnricher):
    """Raises for any part that holds the batch's first ref."""

    async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
        await asyncio.sleep(0)
        if refs[0].tx_hash.endswith(f"{0:060x}"):
            raise ValueError("the node choked on it")
        return Enriched(txs=[object() for _ in refs])  # type: ignore[misc]


class RecordingStore(FakeStore):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.failures: list[Failure] = []

    def commit_batches(self, items: Sequence[tuple[Batch, Enriched]], calls: int = 0) -> list[int | None]:
        self.failures += [f for _, e in items for f in e.failures]
        return super().commit_batches(items, calls)


@pytest.mark.timeout(30)
def test_a_ref_isolated_after_one_attempt_says_one_attempt() -> None:
    # With one attempt allowed, the first is the last: the ref that raises is isolated.
    store = RecordingStore(batches=1, refs=4)
    settings = WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01, max_attempts=1)
    w = Worker(0, "w", store, FakeClient(), {1: RaisingEnricher()}, settings, lambda e: None)  # type: ignore[arg-type]
    asyncio.run(w.run())
    assert [(f.reason, f.last_error) for f in store.failures] == [
        ("permanent", "isolated after 1 attempt: ValueError: the node choked on it")
    ], store.failures


def sent_through_a_pipe(who: str, send: Callable[[Any], None]) -> list[Any]:
    """What a worker's event sender (named ``who``) delivers when ``send(sender)`` uses it."""
    import multiprocessing

    from gapfill.engine.run import _EventSender

    events, sent = multiprocessing.Pipe(duplex=False)
    sender = _EventSender(sent, who)
    send(sender)
    sender.close()
    got = []
    with contextlib.suppress(EOFError):  # the sender closed its end: every event is read
        while True:
            got.append(events.recv())
    events.close()
    return got


@pytest.mark.timeout(30)
def test_an_event_that_does_not_pickle_becomes_a_notice_and_the_later_ones_still_arrive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It ended the sender thread: every later event of the worker stayed queued, and the
    # coordinator heard nothing more from it.
    from gapfill.engine.events import Notice

    def send(sender: Any) -> None:
        sender.put(Notice("before"))
        sender.put(Notice(lambda: "a bug: an event that holds a function"))  # type: ignore[arg-type]
        sender.put(Notice("after"))

    got = sent_through_a_pipe("Worker-2", send)
    dropped = "[Worker-2] a Notice event could not be sent to the coordinator and was dropped: the run's"
    assert got == [Notice("before"), Notice(f"{dropped} progress and counts may miss it"), Notice("after")]
    [logged] = caplog.records
    assert logged.getMessage() == "[Worker-2] could not send a Notice event to the coordinator"
    assert logged.exc_info is not None  # the traceback names what did not pickle


class StallingNode:
    """A transport serving six transactions: 1-5 in block 3 (timestamp on the receipt), 6 in
    block 4 (no timestamp but the block's). Requests that ask for one of ``stall`` (transaction
    hashes, block numbers) never answer; ``calls`` counts the calls asked."""

    def __init__(self, hashes: Sequence[str], stall: set[str | int]) -> None:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from fixtures_io import result

        self.stall = stall
        self.calls = 0
        self.stalled = 0
        tx = result("eth_getTransactionByHash/get-legacy-tx")
        rec = result("eth_getTransactionReceipt/get-legacy-receipt")
        self.txs, self.recs = {}, {}
        for i, h in enumerate(hashes, 1):
            block = 4 if i == 6 else 3
            block_hash = rec["blockHash"] if block == 3 else "0x" + "44" * 32  # one hash a block
            t = {**tx, "hash": h, "blockNumber": hex(block), "blockHash": block_hash}
            t.pop("blockTimestamp")
            r = {**rec, "transactionHash": h, "blockNumber": hex(block), "blockHash": block_hash}
            if block == 3:
                r["blockTimestamp"] = "0x1e"
            self.txs[h], self.recs[h] = t, r

    def _answer(self, method: str, params: list[Any]) -> tuple[Any, str | int]:
        if method == "eth_getTransactionByHash":
            return self.txs[params[0]], params[0]
        if method == "eth_getTransactionReceipt":
            return self.recs[params[0]], "receipt"
        assert method == "eth_getBlockByNumber", method
        n = int(params[0], 16)
        full = [t for t in self.txs.values() if t["blockNumber"] == params[0]] if params[1] else []
        block_hash = next(r["blockHash"] for r in self.recs.values() if r["blockNumber"] == params[0])
        return {"number": params[0], "hash": block_hash, "timestamp": hex(10 * n), "transactions": full}, n

    async def post(self, url: str, body: bytes) -> Any:
        import orjson

        from gapfill.rpc.transport import HttpReply

        decoded = orjson.loads(body)
        calls = decoded if isinstance(decoded, list) else [decoded]
        self.calls += len(calls)
        answers = []
        for c in calls:
            answer, about = self._answer(c["method"], c["params"])
            if about in self.stall:
                self.stalled += 1
                await asyncio.sleep(3600)
            answers.append({"jsonrpc": "2.0", "id": c["id"], "result": answer})
        return HttpReply(200, {}, orjson.dumps(answers if isinstance(decoded, list) else answers[0]))

    async def aclose(self) -> None:
        return None


def six_refs_planned(tmp_path: Path, c: str) -> tuple[Any, list[str]]:
    """A SQLite store with contract ``c``'s six refs of :class:`StallingNode` in one open
    batch, and their hashes."""
    hashes = [f"0x{i:064x}" for i in range(1, 7)]
    store = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    store.add_contract(Contract(1, c))
    store.add_refs([Ref(1, c, h, 4 if i == 6 else 3) for i, h in enumerate(hashes, 1)])
    store.plan(store.create_run("batch", 1), [(1, c)], batch_size=10)
    return store, hashes


@pytest.mark.timeout(30)
@pytest.mark.parametrize("plan", ["pairs", "metered", "sequential"])
def test_a_stop_mid_fetch_stores_the_rows_already_fetched_and_a_rerun_fetches_the_rest(
    tmp_path: Path, plan: str
) -> None:
    # A stop while a batch waits on RPC threw away every answer it had: with a tight rate
    # limit, all the calls of the batches in flight. Here the node answers refs 1-4, holds
    # back ref 5 and block 4, which ref 6's timestamp needs (in the free plan its transaction
    # and receipt are in: its row is not complete). The stop stores 1-4 with the batch given
    # back; a rerun asks only for 5 and 6.
    from gapfill.enrich.fetch import Collector, Enricher, PlanSettings
    from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings

    c = "0x" + "ab" * 20
    store, hashes = six_refs_planned(tmp_path, c)

    class Watched(Enricher):
        out: Collector | None = None

        async def enrich(self, refs: Sequence[Ref], out: Collector | None = None) -> Enriched:
            self.out = out
            return await super().enrich(refs, out)

        async def enrich_sequential(self, refs: Sequence[Ref], out: Collector | None = None) -> Enriched:
            self.out = out
            return await super().enrich_sequential(refs, out)

    def worker_on(node: StallingNode, events: list[Any]) -> tuple[Worker, Watched]:
        # One call a request: what is answered does not depend on how calls are grouped.
        client = RpcClient([EndpointConfig("http://node.invalid/", max_batch=1)],
                           RpcSettings(budget_dir=str(tmp_path)), transport=node)  # fmt: skip
        plan_settings = PlanSettings(shape="per_tx", calls_metered=plan == "metered")
        enricher = Watched(client, 1, plan=plan_settings, calls_per_request=1)
        s = WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01, sequential=plan == "sequential")
        return Worker(0, "w", store, client, {1: enricher}, s, events.append), enricher

    async def stopped_mid_fetch(events: list[Any]) -> None:
        node = StallingNode(hashes, {hashes[4], 4})
        w, enricher = worker_on(node, events)
        run = asyncio.create_task(w.run())
        while not (enricher.out is not None and len(enricher.out.txs) == 4 and node.stalled):
            await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    events: list[Any] = []
    asyncio.run(stopped_mid_fetch(events))
    counts = store.batch_counts()
    assert (counts.pending, counts.succeeded) == (1, 4)
    assert store.count_gap(1, c) == 2
    assert given_back_lines(events) == [
        "[Worker-1] Batch 1 attempt 1 given back (4 stored, the rest retried): worker stopped"
    ]

    rerun = StallingNode(hashes, set())
    asyncio.run(worker_on(rerun, [])[0].run())
    counts = store.batch_counts()
    store.close()
    assert (counts.done, counts.succeeded) == (1, 6)
    # Refs 5 and 6 only: two calls each, and block 4 once (its header, or the full block).
    assert rerun.calls == (4 if plan == "metered" else 5)


class HangingEnricher(FakeEnricher):
    """Never answers: a batch it fetches is in flight until the worker stops."""

    async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class FlakyEnricher(FakeEnricher):
    """Every ref fails for a reason that may pass (the calls' retries ran out)."""

    def __init__(self) -> None:
        super().__init__()
        self.fetches = 0

    async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
        self.fetches += 1
        await asyncio.sleep(0)
        return Enriched(failures=[Failure(r.chain_id, r.tx_hash, r.contract, "rpc_error", "HTTP 503")
                                  for r in refs])  # fmt: skip


@pytest.mark.timeout(30)
def test_a_batch_given_back_on_ctrl_c_keeps_its_retries(tmp_path: Path) -> None:
    # A batch in flight through two Ctrl+C's (a big batch under a low --rps takes minutes):
    # each stop's give-back counted as a failed attempt, so the third run's lease was its
    # last: the worker stored its transient failures at once, no retry, and closed the batch.
    # And its lines numbered the attempts as the leases: the first real one read "attempt 3".
    c = "0x" + "ab" * 20
    store, _ = six_refs_planned(tmp_path, c)
    settings = WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01, retry_pause_s=0.01)

    async def stopped_mid_fetch(owner: str) -> None:
        events: list[Any] = []
        w = Worker(0, owner, store, FakeClient(), {1: HangingEnricher()}, settings,  # type: ignore[arg-type]
                   events.append)  # fmt: skip
        run = asyncio.create_task(w.run())
        while not any(isinstance(e, BatchAssigned) for e in events):
            await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    for owner in ("run1/w0", "run2/w0"):
        asyncio.run(stopped_mid_fetch(owner))
    assert store.batch_counts().pending == 1
    flaky = FlakyEnricher()
    events: list[Any] = []
    asyncio.run(Worker(0, "run3/w0", store, FakeClient(), {1: flaky}, settings,  # type: ignore[arg-type]
                       events.append).run())  # fmt: skip
    store.close()
    # Two attempts given back for a retry, then the last one stores the failures.
    assert flaky.fetches == 3
    # Said as the batch's first to third attempt: the lines showed the lease's number, and the
    # first real try read "attempt 3". Its leases keep their numbers, for the lease check.
    assert batch_lines(events, BatchAssigned) == [
        "[Worker-1] Assigned batch 1: blocks 3-4, 6 refs",
        "[Worker-1] Assigned batch 1: blocks 3-4, 6 refs (attempt 2)",
        "[Worker-1] Assigned batch 1: blocks 3-4, 6 refs (attempt 3)",
    ]
    assert [ln.split(" given back")[0] for ln in given_back_lines(events)] == [
        "[Worker-1] Batch 1 attempt 1", "[Worker-1] Batch 1 attempt 2"]  # fmt: skip
    assert [(e.attempt, e.lease) for e in events if isinstance(e, BatchAssigned)] == [(1, 3), (2, 4), (3, 5)]


@pytest.mark.timeout(30)
def test_a_lease_whose_answer_was_lost_keeps_the_batch_its_retries(tmp_path: Path) -> None:
    # A lease granted on the server whose answer the worker never got is given back before it
    # leases again; nobody tried the batch, yet that give-back counted as a failed attempt:
    # the batch had two tries left, its transient failures stored after one retry.
    c = "0x" + "ab" * 20
    store, _ = six_refs_planned(tmp_path, c)
    real_lease = store.lease_next
    lost: list[int] = []

    def lease_then_lose_the_answer(*args: Any) -> Leased:
        got = real_lease(*args)
        if not lost and got.batch is not None:
            lost.append(got.batch.id)
            raise StoreDropped("lost the connection to PostgreSQL at db:5432 (server closed the connection "
                               "unexpectedly)", "check that the server runs, then run the command again")
        return got

    store.lease_next = lease_then_lose_the_answer
    settings = WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01, retry_pause_s=0.01)
    flaky = FlakyEnricher()
    events: list[Any] = []
    asyncio.run(Worker(0, "run1/w0", store, FakeClient(), {1: flaky}, settings,  # type: ignore[arg-type]
                       events.append).run())  # fmt: skip
    given = [e.event for e in store.lease_events(1)]
    store.close()
    assert lost == [1], "no lease answer was lost as planned: the test proved nothing"
    assert given[:2] == ["leased", "abandoned"]  # the lease without an answer, given back
    assert flaky.fetches == 3  # three tries, the last storing the failures
    assert [(e.attempt, e.lease) for e in events if isinstance(e, BatchAssigned)] == [(1, 2), (2, 3), (3, 4)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("error", "a_failed_attempt"), [
    (StoreDropped("lost the connection to PostgreSQL at db:5432 (server closed the connection unexpectedly)",
                  "check that the server runs, then run the command again"), False),
    (StoreError("PostgreSQL error on db:5432: numeric field overflow"), True),
])  # fmt: skip
def test_a_commit_the_database_dropped_gives_its_batch_back_without_a_failed_attempt(
    error: StoreError, a_failed_attempt: bool
) -> None:
    # The batch's fetch went well; the database dropped the connection of its commit (a
    # restart, or the answer lost, which a look finds did not land). Its give-back spent one
    # of its 3 attempts, and two such drops made its next lease its last.
    store = FakeStore(batches=1)
    store.refusal = error
    failed: list[str] = []
    store.fail = lambda name, args: name == "commit_batches" and not failed and not failed.append(name)
    asyncio.run(worker(store).run())
    assert failed and store.state == {1: "pending"}
    assert store.stops == {1: not a_failed_attempt}


@pytest.mark.timeout(30)
def test_each_batchs_rpc_requests_carry_its_lease_order() -> None:
    # The client serves metered requests lowest priority first (gapfill.rpc.slots): the
    # batch leased first must have the lowest.
    from gapfill.rpc.slots import PRIORITY

    seen: dict[int, int] = {}

    class Recording(FakeEnricher):
        async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
            seen[int(refs[0].tx_hash[2:6], 16)] = PRIORITY.get()
            return await super().enrich(refs, out)

    asyncio.run(worker(FakeStore(batches=6), Recording()).run())
    assert seen == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}


@pytest.mark.timeout(30)
def test_a_batch_waiting_for_its_turn_at_the_rate_limit_keeps_its_lease() -> None:
    # Its requests wait while an earlier batch's go first, so none of its own is answered
    # for a while; the node answers the others': it is waiting, not stuck, and was let go.
    store = FakeStore(batches=1)

    class Waiting(FakeEnricher):
        async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
            assert self.client is not None
            self.client.waiting.add(1)
            for _ in range(40):  # 0.8 s of the others' answers, over many renewal periods
                await asyncio.sleep(0.02)
                self.client.last_reply_at = time.monotonic()
            self.client.waiting.clear()
            return await super().enrich(refs, out)

    totals = asyncio.run(worker(store, Waiting(), lease_timeout_s=0.3).run())
    assert store.calls.count("renew") >= 3, store.calls
    assert totals.processed == 10 and totals.lost == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("refused", [False, True])
def test_under_a_rate_learned_from_a_429_the_batch_leased_first_is_fetched_first(
    tmp_path: Path, refused: bool
) -> None:
    # A free-tier provider without --rps: its 429 (here at the 300th call, in batch 1's
    # first round) teaches the endpoint a rate. Batch 1's second round (block 4, for ref 6)
    # then went behind all of batch 2's requests, queued meanwhile: the two shared the
    # budget and finished late together. Now it goes first; before any 429, arrival order.
    from gapfill.enrich.fetch import Enricher, PlanSettings
    from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings
    from gapfill.rpc.slots import PRIORITY
    from gapfill.rpc.transport import HttpReply

    c = "0x" + "ab" * 20
    hashes = [f"0x{i:064x}" for i in range(1, 401)]
    store = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    store.add_contract(Contract(1, c))
    # The node puts ref 6 (batch 1's) in block 4, whose timestamp takes a second round.
    store.add_refs([Ref(1, c, h, 3) for h in hashes])
    store.plan(store.create_run("batch", 1), [(1, c)], batch_size=200)

    asked: list[int] = []  # each request's batch, by its lease order (the worker's)

    class Refusing(StallingNode):
        """Answers 429 once, at the 300th call if ``refused``."""

        async def post(self, url: str, body: bytes) -> Any:
            if refused and self.calls == 299:
                self.calls += 1
                return HttpReply(429, {}, b"Too Many Requests")
            asked.append(PRIORITY.get())
            await asyncio.sleep(0.001)  # a node's latency: the worker leases batch 2 meanwhile
            return await super().post(url, body)

    node = Refusing(hashes, set())
    client = RpcClient([EndpointConfig("http://node.invalid/", max_batch=1)],
                       RpcSettings(max_in_flight=1, budget_dir=str(tmp_path)), transport=node)  # fmt: skip
    enricher = Enricher(client, 1, plan=PlanSettings(shape="per_tx"), calls_per_request=1)
    s = WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01, batches_in_flight=2)
    totals = asyncio.run(Worker(0, "w", store, client, {1: enricher}, s, lambda event: None).run())
    store.close()
    assert totals.processed == 400
    last_of_batch_1 = len(asked) - asked[::-1].index(1)
    behind = asked[:last_of_batch_1].count(2)  # batch 2's requests before batch 1's last
    assert (behind < 10) if refused else (behind >= 400), behind


@pytest.mark.timeout(30)
def test_a_worker_processs_records_reach_the_coordinators_handlers_naming_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gapfill.engine.events import Logged
    from gapfill.engine.run import _LogToCoordinator, log_here

    record = logging.makeLogRecord({"name": "gapfill.engine.worker", "levelno": logging.INFO,
                                    "levelname": "INFO", "msg": "batch %d leased", "args": (7,)})  # fmt: skip
    [ev] = sent_through_a_pipe("Worker-3", lambda s: _LogToCoordinator(s, "Worker-3").handle(record))
    assert ev == Logged(logging.INFO, "gapfill.engine.worker", "[Worker-3] batch 7 leased", record.created)
    caplog.set_level(logging.INFO, logger="gapfill")
    log_here(ev)  # in the coordinator: to its handlers, as its own records
    [here] = [r for r in caplog.records if r.name == "gapfill.engine.worker"]
    assert (here.levelno, here.getMessage(), here.created) == (logging.INFO, "[Worker-3] batch 7 leased",
                                                               record.created)  # fmt: skip


@pytest.mark.timeout(30)
def test_info_logs_each_batch_leased_committed_and_given_back_with_timings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gapfill")
    asyncio.run(worker(FakeStore(batches=2, refs=10)).run())
    w = Worker(0, "w", FakeStore(batches=1, refs=10), FakeClient(), {1: HalfFailingEnricher()},  # type: ignore[arg-type]
               WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01), lambda event: None)  # fmt: skip
    asyncio.run(w.run())
    said = [r.getMessage() for r in caplog.records if r.name == "gapfill.engine.worker"]
    leased = [m for m in said if " leased: " in m]
    assert len(leased) == 3, said
    assert leased[0].startswith("batch 1 leased: blocks 0-0 of c, 10 refs still in the gap"), said
    committed = [m for m in said if " committed: " in m]
    assert len(committed) == 2, said
    assert all(m.startswith("batch ") and " commit " in m
               and "10 fetched (10 newly stored), 0 failed; fetch " in m
               for m in committed), committed  # fmt: skip
    [given] = [m for m in said if " given back " in m]
    assert given.startswith("batch 1 attempt 1 given back (5 transactions failed, e.g. 0x"), given
    assert given.endswith("5 stored, 0 failed for good, 5 left in the gap; leased again no sooner than "
                          "in 1.0 s"), given  # fmt: skip


class RevokingNode(StallingNode):
    """A :class:`StallingNode` whose API key is revoked after ``answered`` calls: every
    request after them is refused with HTTP 401."""

    def __init__(self, hashes: Sequence[str], answered: int) -> None:
        super().__init__(hashes, set())
        self.answered = answered
        self.refused = 0

    async def post(self, url: str, body: bytes) -> Any:
        import orjson

        from gapfill.rpc.transport import HttpReply

        decoded = orjson.loads(body)
        if self.calls + (len(decoded) if isinstance(decoded, list) else 1) > self.answered:
            self.refused += 1
            return HttpReply(401, {}, b"invalid API key")
        return await super().post(url, body)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("plan", ["pairs", "sequential"])
def test_a_key_refused_mid_run_stops_the_worker_with_its_batch_given_back_and_no_failure(
    tmp_path: Path, plan: str
) -> None:
    # A key revoked mid-run made every call fail at once: each batch was tried 3 times and
    # its refs recorded as rpc_error failures. Now the worker stops at the first refused
    # call with the sentence, gives its batch back with the rows it has, records no failure,
    # and a rerun with a working key fetches the rest.
    from gapfill.enrich.fetch import Enricher, PlanSettings
    from gapfill.errors import RpcError
    from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings

    store, hashes = six_refs_planned(tmp_path, "0x" + "ab" * 20)

    def worker_on(node: StallingNode, events: list[Any]) -> Worker:
        client = RpcClient([EndpointConfig("http://node.invalid/v3/SECRET", max_batch=1)],
                           RpcSettings(budget_dir=str(tmp_path)), transport=node)  # fmt: skip
        enricher = Enricher(client, 1, plan=PlanSettings(shape="per_tx"), calls_per_request=1)
        s = WorkerSettings(commit_wait_s=0.05, db_retry_s=0.01, retry_pause_s=0.01,
                           sequential=plan == "sequential")  # fmt: skip
        return Worker(0, "w", store, client, {1: enricher}, s, events.append)

    events: list[Any] = []
    node = RevokingNode(hashes, answered=8)  # refs 1-4 one call at a time: receipt, transaction
    with pytest.raises(RpcError) as info:
        asyncio.run(worker_on(node, events).run())
    assert str(info.value) == (
        "the RPC node at http://node.invalid/v3/*** refused the request (HTTP 401): "
        "check the API key in --rpc-url or ETH_RPC_URL, then rerun to continue"
    )
    assert store.list_failures() == []
    counts = store.batch_counts()
    assert counts.pending == 1, counts
    if plan == "sequential":
        assert counts.succeeded == 4 and node.refused == 1  # nothing asked after the refusal
        assert given_back_lines(events) == [
            "[Worker-1] Batch 1 attempt 1 given back (4 stored, the rest retried): worker stopped"
        ]
    assert [e.attempt for e in events if isinstance(e, BatchAssigned)] == [1]  # not tried again

    asyncio.run(worker_on(StallingNode(hashes, set()), []).run())
    counts = store.batch_counts()
    failures = store.list_failures()
    store.close()
    assert (counts.done, counts.succeeded, failures) == (1, 6, [])



@pytest.mark.timeout(30)
def test_a_batch_cancelled_twice_while_its_give_back_waits_still_reports_and_counts_it() -> None:
    # A refused key cancelled each batch task, then the worker's main task, whose own stop
    # path cancelled them again. The main task, in a store call (here the next lease,
    # slow), took its cancel only once that call was over: by then the batch task waited
    # for its give-back (for the connection the lease held), and the second cancel let the
    # give-back run on unwatched: the worker ended before it, its event and totals lost.
    from gapfill.errors import RpcError

    class SlowSecondLease(FakeStore):
        def __init__(self) -> None:
            super().__init__(batches=1, refs=4)
            self.leases = 0
            self.leasing, self.gate = threading.Event(), threading.Event()

        def lease(self, owner: str, timeout_s: float, targets: Any) -> Batch | None:
            self.leases += 1
            if self.leases == 2:  # the batch task gets the connection while it is retried
                raise StoreError("lease: the server closed the connection")
            if self.leases == 3:
                self.leasing.set()
                self.gate.wait(20)
            return super().lease(owner, timeout_s, targets)

    store = SlowSecondLease()

    class Refusing(FakeEnricher):
        async def enrich(self, refs: Sequence[Ref], out: Any = None) -> Enriched:
            while not store.leasing.is_set():
                await asyncio.sleep(0.01)
            r = refs[0]
            out.fail(Failure(r.chain_id, r.tx_hash, r.contract, "not_found", "no such transaction"))
            self.client.on_refused("the key was refused")  # type: ignore[union-attr]
            refused.set()
            await asyncio.sleep(3600)
            raise AssertionError("not cancelled")

    events: list[Any] = []
    w = worker(store, Refusing(), events.append)

    async def go() -> None:
        run = asyncio.create_task(w.run())
        await refused.wait()
        for _ in range(100):  # the batch task takes its cancel and waits for its give-back
            await asyncio.sleep(0)
        store.gate.set()
        with pytest.raises(RpcError, match="the key was refused, then rerun to continue"):
            await run

    refused = asyncio.Event()
    asyncio.run(go())
    [given_back] = [e for e in events if isinstance(e, BatchAbandoned)]
    assert (given_back.batch_id, given_back.kept_failed) == (1, 1)
    assert (w.totals.failed, w.totals.permanent) == (1, 1) and store.state == {1: "pending"}


class PausingNode(StallingNode):
    """A :class:`StallingNode` whose first reply is HTTP 429 with ``Retry-After: 1``."""

    def __init__(self, hashes: Sequence[str]) -> None:
        super().__init__(hashes, set())
        self.paused = False

    async def post(self, url: str, body: bytes) -> Any:
        from gapfill.rpc.transport import HttpReply

        if not self.paused:
            self.paused = True
            return HttpReply(429, {"Retry-After": "1"}, b"")
        return await super().post(url, body)


class DeadNode(StallingNode):
    """A node that is gone: it refuses every connection, or (``silent``) takes every
    request and never answers."""

    def __init__(self, hashes: Sequence[str], silent: bool) -> None:
        super().__init__(hashes, set())
        self.silent = silent

    async def post(self, url: str, body: bytes) -> Any:
        if self.silent:
            await asyncio.sleep(3600)
        raise ConnectionRefusedError(111, "Connection refused")


class FreezingNode(StallingNode):
    """A :class:`StallingNode` whose first request finds the process frozen (as by SIGSTOP)
    for ``freeze_s`` while its reply is on its way: the loop is blocked, then wakes with
    the reply ready and the worker's outage check due."""

    def __init__(self, hashes: Sequence[str], freeze_s: float) -> None:
        super().__init__(hashes, set())
        self.freeze_s = freeze_s
        self.frozen = False

    async def post(self, url: str, body: bytes) -> Any:
        if not self.frozen:
            self.frozen = True
            asyncio.get_running_loop().call_soon(time.sleep, self.freeze_s)
            await asyncio.sleep(0.001)
        return await super().post(url, body)


def worker_on_node(store: Any, node: StallingNode, tmp_path: Path, rps: float | None = None,
                   events: list[Any] | None = None, **settings: Any) -> Worker:  # fmt: skip
    """A worker fetching through a real client from ``node`` (one call a request, per
    transaction), with ``settings`` as its :class:`WorkerSettings`."""
    from gapfill.enrich.fetch import Enricher, PlanSettings
    from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings

    rpc = settings.pop("rpc", RpcSettings())
    client = RpcClient([EndpointConfig("http://node.invalid/", rps=rps, max_batch=1)],
                       replace(rpc, budget_dir=str(tmp_path)), transport=node)  # fmt: skip
    enricher = Enricher(client, 1, plan=PlanSettings(shape="per_tx", calls_metered=rps is not None),
                        calls_per_request=1)  # fmt: skip
    s = WorkerSettings(**{"commit_wait_s": 0.05, "db_retry_s": 0.01, "retry_pause_s": 0.01, **settings})
    return Worker(0, "w", store, enricher.client, {1: enricher}, s,
                  events.append if events is not None else lambda event: None)  # fmt: skip


def renewals_counted(store: Any) -> list[float]:
    """When each renewal of ``store``'s leases was asked (``time.monotonic()``)."""
    at: list[float] = []
    renew = store.renew

    def counted_renew(batch: Batch, timeout_s: float) -> bool:
        at.append(time.monotonic())
        return bool(renew(batch, timeout_s))

    store.renew = counted_renew
    return at


@pytest.mark.timeout(30)
def test_a_retry_after_pause_is_not_taken_for_a_dead_node(tmp_path: Path) -> None:
    # The node answered 429 with Retry-After: the client paused, as asked, and sent nothing.
    # The outage clock only looked at the time since the last reply, so a pause longer than
    # --rpc-outage stopped the worker: "no RPC node has replied for ..." (in a concurrent
    # run, EXIT_LOST_NODE: the run failed). The node did reply; the wait was the client's.
    store, hashes = six_refs_planned(tmp_path, "0x" + "ab" * 20)
    node = PausingNode(hashes)
    totals = asyncio.run(worker_on_node(store, node, tmp_path, rpc_outage_s=0.3).run())
    counts = store.batch_counts()
    store.close()
    assert node.paused and totals.processed == 6 and (counts.done, counts.succeeded) == (1, 6)


@pytest.mark.timeout(30)
def test_a_worker_woken_from_a_pause_reads_its_replies_before_judging_the_node(tmp_path: Path) -> None:
    # The process was frozen longer than --rpc-outage with a request in flight (SIGSTOP, a
    # frozen VM). On waking, the loop ran the due outage check before the request read its
    # reply: "no RPC node has replied for 1 s", although the node had answered.
    store, hashes = six_refs_planned(tmp_path, "0x" + "ab" * 20)
    node = FreezingNode(hashes, freeze_s=1.0)
    totals = asyncio.run(worker_on_node(store, node, tmp_path, rpc_outage_s=0.2).run())
    counts = store.batch_counts()
    store.close()
    assert node.frozen and totals.processed == 6 and (counts.done, counts.succeeded) == (1, 6)


@pytest.mark.timeout(30)
def test_a_slow_rate_limit_is_not_taken_for_a_dead_node(tmp_path: Path) -> None:
    # Under --rps the requests wait for their tokens: here a reply comes every 0.1 s (with
    # four workers at 2 rps, one every ~200 s), more than --rpc-outage apart.
    store, hashes = six_refs_planned(tmp_path, "0x" + "ab" * 20)
    node = StallingNode(hashes, set())
    totals = asyncio.run(worker_on_node(store, node, tmp_path, rps=10, rpc_outage_s=0.05).run())
    counts = store.batch_counts()
    store.close()
    assert node.calls >= 12 and totals.processed == 6 and (counts.done, counts.succeeded) == (1, 6)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wait", ["retry_after", "rps"])
def test_a_batch_waiting_on_a_pause_or_the_rate_budget_keeps_its_lease(tmp_path: Path, wait: str) -> None:
    # Its requests wait, by the client's choice, longer than a lease: for a Retry-After
    # pause (1 s), or for their tokens (one every 0.2 s). No call of it is answered
    # meanwhile, and it waits for no slot, so its lease was not renewed: it lapsed, the
    # fetch was thrown away and the batch fetched again (by a coordinator, the worker
    # killed as stuck).
    store, hashes = six_refs_planned(tmp_path, "0x" + "ab" * 20)
    renewed = renewals_counted(store)
    node = PausingNode(hashes) if wait == "retry_after" else StallingNode(hashes, set())
    events: list[Any] = []
    w = worker_on_node(store, node, tmp_path, rps=5 if wait == "rps" else None, events=events,
                       lease_timeout_s=0.15)  # fmt: skip
    totals = asyncio.run(w.run())
    counts = store.batch_counts()
    store.close()
    assert totals.lost == 0 and [e.attempt for e in events if isinstance(e, BatchAssigned)] == [1]
    assert (counts.done, counts.succeeded) == (1, 6) and len(renewed) >= 5, renewed


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rps", [None, 10.0])
@pytest.mark.parametrize("silent", [False, True], ids=["refused", "silent"])
def test_a_node_that_does_not_answer_still_stops_the_worker(
    tmp_path: Path, silent: bool, rps: float | None
) -> None:
    # Waits of the client's own choosing are off the outage clock; trying to reach a node
    # that refuses connections (with the backoff and the breaker's pauses between tries) or
    # never answers is not. Under a rate limit too. The batch is given back, no failure.
    from gapfill.errors import RpcError
    from gapfill.rpc import RpcSettings

    store, hashes = six_refs_planned(tmp_path, "0x" + "ab" * 20)
    # Enough tries that no call fails for good before the clock runs out.
    rpc = RpcSettings(attempts=50, backoff_base_s=0.01, backoff_max_s=0.02)
    w = worker_on_node(store, DeadNode(hashes, silent), tmp_path, rps=rps, rpc=rpc, rpc_outage_s=0.3)
    with pytest.raises(RpcError, match=r"^no RPC node has replied for 0 s \(last: "):
        asyncio.run(w.run())
    counts = store.batch_counts()
    failures = store.list_failures()
    store.close()
    assert (counts.pending, counts.succeeded, failures) == (1, 0, [])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rps", [None, 10.0])
def test_a_batch_stuck_in_one_call_stops_renewing_its_lease(tmp_path: Path, rps: float | None) -> None:
    # Waits by choice keep a lease; a call that never returns does not, under a rate limit
    # too: once the batch's other calls are answered (and their waits for tokens over), its
    # renewals stop, and the lease lapses for another worker to take the batch.
    store, hashes = six_refs_planned(tmp_path, "0x" + "ab" * 20)
    renewed = renewals_counted(store)
    node = StallingNode(hashes, {hashes[4]})
    w = worker_on_node(store, node, tmp_path, rps=rps, lease_timeout_s=0.15)

    async def stuck() -> float:
        run = asyncio.create_task(w.run())
        while node.calls < 12:  # every call but the stalled one answered (its block's too)
            await asyncio.sleep(0.01)
        settled = time.monotonic() + 0.1  # a renewal check already under way may still renew
        await asyncio.sleep(0.6)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        return settled

    settled = asyncio.run(stuck())
    counts = store.batch_counts()
    store.close()
    assert node.stalled == 1 and [at for at in renewed if at > settled] == []
    # The stop's give-back found the lease lapsed: nothing written; the worker's last word,
    # giving back what its owner still holds, hands the batch back (no one else had it).
    assert (counts.pending, counts.leased, counts.succeeded) == (1, 0, 0), counts


class _RiderStore(FakeStore):
    """Each batch's block 1 holds 10 refs of another contract in the gap: its riders."""

    def gap_in_blocks(self, chain_id: int, contracts: Sequence[str], blocks: Sequence[int]) -> list[Ref]:
        self._call("gap_in_blocks", ())
        return [Ref(1, "other", f"0x{0xbeef:04x}{i:060x}", 1) for i in range(10)]


class _RidingEnricher(FakeEnricher):
    """Fetches block 1 whole: every rider's row, and its own refs' but for ``failing`` of them
    (an HTTP 502: they stay in the gap)."""

    def __init__(self, failing: int = 0) -> None:
        super().__init__()
        self.failing = failing

    def may_fetch_blocks(self) -> bool:
        return True

    async def enrich(self, refs: Sequence[Ref], out: Any = None, riders: Sequence[Ref] = ()) -> Enriched:
        await asyncio.sleep(self.delay_s)
        ok, failed = refs[self.failing :], refs[: self.failing]
        return Enriched(txs=[object() for _ in [*riders, *ok]],  # type: ignore[misc]
                        failures=[Failure(r.chain_id, r.tx_hash, r.contract, "rpc_error", "HTTP 502")
                                  for r in failed],
                        rode={r.tx_hash for r in riders})  # fmt: skip


def _riding_run(failing: int) -> list[Any]:
    """The events of a run of one batch of 10 refs, 10 riders, ``failing`` refs failing."""
    events: list[Any] = []
    asyncio.run(worker(_RiderStore(batches=1, refs=10), _RidingEnricher(failing), emit=events.append,
                       max_attempts=2).run())  # fmt: skip
    return events


@pytest.mark.timeout(30)
def test_a_batch_given_back_with_its_riders_rows_counts_only_its_own_refs_as_stored() -> None:
    # 5 of its 10 refs failed; its 5 others and the 10 riders were stored with the give-back.
    # It said "given back (15 stored)", nothing retried, and its log "0 left in the gap".
    events = _riding_run(failing=5)
    first = next(e for e in events if isinstance(e, BatchAbandoned))
    assert (first.kept, first.rest) == (5, 5), first
    assert first.kept_rode == 10 and first.kept_new == 15, first
    assert given_back_lines(events)[0] == (
        "[Worker-1] Batch 1 attempt 1 given back (5 stored, with 10 refs of other batches in the "
        "same blocks, the rest retried): 5 transactions failed, e.g. "
        f"{first.error.split('e.g. ')[1]}")  # fmt: skip


@pytest.mark.timeout(30)
def test_a_batch_committed_with_its_riders_rows_says_its_own_refs_as_success() -> None:
    # Its line said "+20 success" for a batch of 10 refs.
    events = _riding_run(failing=0)
    (done,) = [e for e in events if isinstance(e, BatchDone)]
    assert (done.succeeded, done.stored) == (10, 20), done
    assert done.rode == 10, done
    assert batch_lines(events, BatchDone)[0].startswith(
        "[Worker-1] Batch 1 complete: +10 success, 0 failed, with 10 refs of other batches in the "
        "same blocks (")  # fmt: skip


@pytest.mark.timeout(30)
def test_the_transactions_fetched_not_stored_yet_are_the_batches_own() -> None:
    # A batch still fetching holds 3 of its own rows and 10 riders' ("312 transactions
    # fetched, not stored yet" counted the riders', which the batch fetching them whole for
    # themselves, in flight beside it, counts again).
    from types import SimpleNamespace

    class Fetching(_RidingEnricher):
        async def enrich(self, refs: Sequence[Ref], out: Any = None, riders: Sequence[Ref] = ()) -> Enriched:
            for r in riders:
                out.row(r, SimpleNamespace(block_number=r.block_number), [], rider=True)
            for r in refs[:3]:
                out.row(r, SimpleNamespace(block_number=r.block_number), [])
            await asyncio.sleep(3600)
            raise AssertionError("stopped before")

    w = worker(_RiderStore(batches=1, refs=10), Fetching())

    async def go() -> int:
        run = asyncio.create_task(w.run())
        while not any(c.txs for c in w._in_flight.values()):
            await asyncio.sleep(0.01)
        fetched = w.fetched_unstored()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        return fetched

    assert asyncio.run(go()) == 3
