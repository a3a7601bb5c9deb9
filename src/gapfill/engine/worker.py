"""A worker: lease a batch, enrich it, commit rows and ``done`` together, repeat.

One worker is one asyncio loop with one RPC client (one keep-alive HTTP session)
and one database connection. It keeps ``batches_in_flight`` batches going at
once, so the node is never idle while the database writes. Store calls are
blocking and run in a thread, one at a time (a connection is not shared
between threads).

A lease is renewed only while the worker makes RPC progress (or its client holds the
batch's requests back by its own choice: a rate limit, a ``Retry-After`` pause): a worker
stuck in one call stops renewing, its lease expires, and another worker takes the batch.
A batch that keeps failing is retried (by another worker where one exists) and,
on its last attempt, split until the failing transactions are isolated and
recorded in ``failures``; the rest is stored.

Each write of a worker (a commit, a give-back, and a last one as it ends) adds the RPC calls
it made since its previous write to the run's row, in the same transaction: whatever kills
whom, ``runs.rpc_calls`` holds the calls of every batch committed and never more than were made.
A write whose answer was lost (the connection dropped as it committed) may have landed: the
worker's next write first asks the store how the leases it wrote ended (:meth:`Worker._check_lost`)
and counts its calls as saved if it landed, so they are not added again, and the batches it
committed report as committed.

A dropped database connection does not end a worker: a batch whose store call
fails is given back, and the calls the worker cannot go on without (the next
lease, "is work left?") are retried for up to ``db_outage_s`` while the store
reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gapfill.engine.events import (
    LEASE_GONE,
    BatchAbandoned,
    BatchAssigned,
    BatchDone,
    BatchesEmptied,
    Emit,
    Notice,
    WorkerStats,
    db_retrying,
    key_range,
)
from gapfill.enrich.fetch import AWAITED, Collector, Enricher
from gapfill.enrich.normalise import MalformedAnswer
from gapfill.errors import GapfillError, RpcError, StoreBusy, StoreDropped, StoreError, StoreRefused
from gapfill.model import Batch, Enriched, Failure, Ref
from gapfill.records import record
from gapfill.rpc import RpcClient
from gapfill.rpc.client import ANSWERED
from gapfill.rpc.slots import PRIORITY
from gapfill.store import GivenBack, Store
from gapfill.store.base import MAX_ATTEMPTS
from gapfill.wording import counted

log = logging.getLogger(__name__)
T = TypeVar("T")


#: Collector thresholds while workers run. Each batch parses a few thousand JSON containers
#: that all stay alive until the batch is stored, so with Python's defaults (700, 10, 10)
#: the collector keeps rescanning them, and the whole heap now and then, for no garbage:
#: ~4 µs of CPU per transaction (bench/hotpath.py, ~20% of enriching). Almost everything a
#: worker frees goes by reference counting; cycles are still collected, just less often.
#: 10,000 still ran a young pass every few batches (13 in a 24,000-transaction dense run,
#: 4-6 ms each: the batches in flight hold more young containers than that), ~55 ms that
#: freed 9 objects; 50,000 ran none, as a batch's containers are freed again before that
#: many have accumulated. Cyclic garbage still starts a pass once 50,000 containers of it
#: have built up (a few MB at most).
GC_THRESHOLDS = (50_000, 50, 100)
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


@contextmanager
def gc_tuned() -> Iterator[None]:
    """Run the block with :data:`GC_THRESHOLDS`; nests (several workers in one process)."""
    global _gc_users, _gc_saved
    if _gc_users == 0:
        _gc_saved = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
    _gc_users += 1
    try:
        yield
    finally:
        _gc_users -= 1
        if _gc_users == 0 and _gc_saved is not None:
            gc.set_threshold(*_gc_saved)


def cancel_once(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` unless it is being cancelled already. A batch task takes one cancel:
    it then waits, shielded, for its batch's give-back, and a second cancel would end it
    there, the give-back running on unwatched (its event and totals lost, racing the
    store's close)."""
    if not task.cancelling():
        task.cancel()


def _given_up(exc: StoreBusy | StoreDropped) -> StoreRefused:
    """What a worker whose commits keep failing with ``exc`` stops with (:meth:`Worker._still_busy`)."""
    if isinstance(exc, StoreDropped):  # its fix says to check that the server runs: it does
        return StoreRefused(f"{exc.what}, and again at every commit since, none passing",
                            "nothing of them was written; find why the server (or a pooler or proxy in "
                            "between) ends the connection, then run the command again")  # fmt: skip
    return StoreRefused(exc.what, exc.fix)


def _and_riders(rode: int) -> str:
    """`` and 12 riders'``: the rows a batch wrote of its riders, beside its own, if any."""
    return f" and {rode} riders'" if rode else ""


def _settle(f: asyncio.Future[int | None], stored: int | None = None,
            error: BaseException | None = None) -> None:  # fmt: skip
    """Resolve a batch's commit future (the transactions it newly stored, None if its lease
    was lost), unless its task was cancelled meanwhile."""
    if f.done():
        return
    if error is not None:
        f.set_exception(error)
    else:
        f.set_result(stored)


#: A batch waiting for its group's commit: its rows, and the future its commit settles.
_Waiting = tuple[Batch, Enriched, "asyncio.Future[int | None]"]


@record
class _Lost:
    """A write whose answer was lost (:class:`StoreDropped`): it may have committed."""

    made: int  # the client's calls it was to save up to
    batches: tuple[Batch, ...]  # the batches it wrote, whose lease events tell whether it did
    commit: bool  # a commit (else a give-back)


class TransientFailures(Exception):
    """Some refs of a batch failed for a reason that may pass; the batch is retried.

    ``kept`` is what the attempt got anyway (rows, and failures that will not pass):
    stored as the batch is given back, so the retry fetches only the refs that failed.
    """

    def __init__(self, message: str, kept: Enriched) -> None:
        super().__init__(message)
        self.kept = kept


@record
class WorkerSettings:
    lease_timeout_s: float = 300.0
    batches_in_flight: int = 4
    sequential: bool = False  # the seed's one-call-at-a-time baseline
    max_attempts: int = MAX_ATTEMPTS
    #: A batch given back after a failed attempt is leased again no sooner than this,
    #: doubling per attempt (1 s, then 2 s): a node lagging by a few seconds (receipts
    #: not yet there) or failing for a moment gets that time before the next attempt.
    retry_pause_s: float = 1.0
    #: While the batches left are leased by other workers, poll for one coming back (or
    #: for the last to be committed) after ``idle_first_poll_s``, doubling up to
    #: ``idle_poll_s``: a run's last batches finish a fraction of a second apart, and a
    #: flat 0.5 s poll kept an idle worker, and so the run, waiting ~0.45 s past the end.
    idle_poll_s: float = 0.5
    idle_first_poll_s: float = 0.05
    stats_every_s: float = 1.0
    #: Keep polling while other workers hold leases that may still expire and come back.
    wait_for_others: bool = True
    #: How long the database may stay unreachable before the worker gives up, and the
    #: pause between tries (the store reconnects on its next call).
    db_outage_s: float = 60.0
    db_retry_s: float = 0.5
    #: A worker whose commits meet a lock_timeout or statement_timeout (:class:`StoreBusy`)
    #: stops once they have for ``db_outage_s`` with none passing, or in this many spells in
    #: a row (failures less than ``db_outage_s`` apart are one): one that commits seldom (a
    #: low --rps, big batches) met each as a new spell, and had its batches given back
    #: without their rows and fetched again, the node's work thrown away, without end.
    db_busy_spells: int = 3
    #: Batches whose RPC is done wait to be committed together, up to this many
    #: transactions per database transaction (see :meth:`Worker._commit`) ...
    commit_group_txs: int = 2000
    #: ... and at most this long (capped at a quarter of the lease timeout).
    commit_wait_s: float = 1.0
    #: With batches waiting on RPC and this long spent trying to reach a node without an HTTP
    #: reply from any endpoint (it is down or unreachable; waits of the client's own choosing,
    #: for a Retry-After pause or the rate budget, do not count), the worker gives its batches
    #: back and stops with one sentence, instead of retrying until every transaction is an
    #: `rpc_error` failure.
    rpc_outage_s: float = 120.0
    #: How long a worker process whose first connection finds no connection slot free on the
    #: server waits for one before it ends the run with what to do (close other clients, fewer
    #: --workers, raise the limit): a slot a client about to end holds frees within seconds; a
    #: limit lower than the run's connections frees none, and restarting the worker (as a
    #: crash) only spent the restart budget before "workers keep crashing".
    no_slot_wait_s: float = 10.0


@dataclass
class WorkerTotals:
    processed: int = 0
    failed: int = 0
    permanent: int = 0
    batches: int = 0
    lost: int = 0
    started: float = field(default_factory=time.perf_counter)


class Worker:
    def __init__(
        self,
        index: int,
        owner: str,
        store: Store,
        client: RpcClient,
        enrichers: dict[int, Enricher],
        settings: WorkerSettings,
        emit: Emit,
        targets: Sequence[tuple[int, str]] | None = None,
    ) -> None:
        self.index = index
        self.owner = owner
        self.store = store
        self.client = client
        self.enrichers = enrichers
        self.settings = settings
        self.emit = emit
        self.targets = list(targets) if targets else None
        self.totals = WorkerTotals()
        self.stopping = False
        self._db_lock = asyncio.Lock()
        self._last_stats = 0.0
        self._held: set[int] = set()  # batches this worker's tasks are working on
        self._fetching = 0  # batches whose RPC is not done yet: at most batches_in_flight
        self._changes = 0  # counts batches that finished their RPC, finished, or were committed
        self._changed = asyncio.Event()
        self._waiting: list[_Waiting] = []
        self._flusher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_fired = False
        # Why the worker stops: no node replies, none takes the key, or the database refuses its work.
        self._outage: GapfillError | None = None
        self._stop_for: Callable[[GapfillError], None] | None = None  # while it runs: see run()
        self._silent_seen = False  # the previous outage check found no reply for rpc_outage_s
        self._tasks: set[asyncio.Task[None]] = set()  # the batch tasks
        self._giving_back: set[asyncio.Future[None]] = set()  # give-backs of failed attempts under way
        #: The batches whose give-back failed as the worker stopped, said once the stop's last
        #: try (its ``release_owner``) has given them back or failed too.
        self._not_given: list[BatchAbandoned] = []
        #: What each batch still fetching has settled so far (:meth:`fetched_unstored`).
        self._in_flight: dict[int, Collector] = {}
        self._calls_saved = 0  # of the client's calls, those a write added to the run's
        self._lost: _Lost | None = None  # the last write whose answer was lost, until checked
        #: Batches a write whose answer was lost turned out to have ended: "committed" by a
        #: commit, "closed" or "given back" by a give-back. Read by the batch's next write.
        self._landed: dict[int, str] = {}
        self._lease_order = itertools.count(1)  # the batches' RPC priority: earlier first
        #: Since when this worker's commits have failed for a reason that may pass (a
        #: lock_timeout: :class:`StoreBusy`) with none passing since: see :meth:`_still_busy`.
        self._busy_since: float | None = None
        self._busy_last: float | None = None  # when a commit last met a StoreBusy
        self._busy_spells = 0  # the spells of them since a commit last passed

    async def db(
        self, fn: Callable[..., T], *args: Any, calls: bool = False, writes: Sequence[Batch] = (),
        commit: bool = False,
    ) -> T:
        """Run a blocking store call in a thread, one at a time; with ``calls``, a write that
        takes the RPC calls made since this worker's previous such write (``calls=``). It
        writes the batches ``writes``, as a ``commit`` or else a give-back: what tells, if its
        answer is lost, whether it landed (:meth:`_check_lost`).

        A call whose caller is cancelled still holds the lock until its thread is done:
        the connection must never run two calls at once (on PostgreSQL that would nest
        transactions and leave the connection inside one that never commits).
        """
        async with self._db_lock:
            run: Callable[[], T] = functools.partial(fn, *args)
            if calls:  # counted under the lock: no two writes take the same calls
                made = self._rpc_counters()[0]

                def run() -> T:
                    self._check_lost()  # first: whether its calls are still to be added
                    try:
                        out = fn(*args, calls=made - self._calls_saved)
                    except StoreDropped:  # its answer, not only the write, may be what was lost
                        self._lost = _Lost(made, tuple(writes), commit)
                        raise
                    self._calls_saved = made  # committed: even if the caller was cancelled
                    return out

            call = asyncio.ensure_future(asyncio.to_thread(run))
            try:
                return await asyncio.shield(call)
            except asyncio.CancelledError:
                while not call.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait({call})
                if not call.cancelled():
                    call.exception()  # retrieved: the cancellation is what the caller gets
                raise

    def _check_lost(self) -> None:
        """Settle the last write whose answer was lost (in the store's thread, before the
        next write): ask the store how the leases it wrote ended.

        The rule: it landed if one of its batches has this lease's (owner and attempt)
        ``committed`` or ``abandoned`` event; it did not if one is still leased to it (a
        landed write would have ended that lease); if neither (no batch, or every lease lost
        to another before it), nothing tells, and it counts as landed. A write that landed
        saved its calls (it added them in its transaction), so no later write adds them
        again, and each batch it ended is noted in :attr:`_landed` for that batch's next
        write: a commit's retry or give-back then finds its lease gone and reports the batch
        as that write ended it, not as lost or given back. Never more calls than were made:
        only a write that landed with every lease lost is not told from one that did not.
        Raises :class:`StoreError` (still unsettled) while the database is unreachable.
        """
        lost = self._lost
        if lost is None:
            return
        found = self.store.lease_outcomes(lost.batches) if lost.batches else {}
        ended = {b: e for b, e in found.items() if e in ("committed", "abandoned")}
        if ended or "leased" not in found.values():
            self._calls_saved = max(self._calls_saved, lost.made)
        for b, e in ended.items():
            # A lease ends once: a batch noted already was ended by an earlier write whose
            # answer was lost too (a commit, then its give-back that found the batch done), and
            # this is that write's event again, not this one's.
            self._landed.setdefault(b, "given back" if e == "abandoned" else "committed" if lost.commit
                                    else "closed")  # fmt: skip
        self._lost = None

    def _rpc_counters(self) -> tuple[int, int, int, int]:
        calls = requests = retries = limited = 0
        for s in self.client.stats().values():
            calls += s.calls
            requests += s.requests
            retries += s.retries
            limited += s.rate_limited
        return calls, requests, retries, limited

    def unsaved_calls(self) -> int:
        """The RPC calls this worker made that no write of it added to the run's yet."""
        return self._rpc_counters()[0] - self._calls_saved

    async def _save_calls(self) -> None:
        """As the worker ends: its calls since its last write, one try (a stopping worker
        does not wait for the database; what is not saved is left out, never counted twice)."""
        if self.unsaved_calls():
            try:
                await self.db(self.store.add_run_calls, calls=True)
            except Exception as exc:  # it must not hide why the worker stops
                log.warning("could not save the run's calls: %s", exc)

    def send_stats(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_stats < self.settings.stats_every_s:
            return
        self._last_stats = now
        calls, _, retries, limited = self._rpc_counters()
        t = self.totals
        self.emit(WorkerStats(self.index, os.getpid(), t.processed, t.failed, calls, retries, limited,
                              now - t.started, self.fetched_unstored()))  # fmt: skip

    async def run(self) -> WorkerTotals:
        """Lease and process batches until none is left or :attr:`stopping` is set.

        Raises :class:`RpcError` when no endpoint has replied for ``rpc_outage_s`` while
        batches wait on RPC, or as soon as a call fails because the endpoint refused the API
        key and no other could take it (a key revoked mid-run): every call would fail so.
        Raises :class:`StoreRefused` as soon as the database refuses a batch's commit so (a
        read-only database, a full disk, a missing grant; the lease and the other calls it
        cannot go on without raise it at once too: see :meth:`_retrying`): the next commit
        would be refused too, after the node's work for it. So it does once its commits
        have met a lock_timeout or statement_timeout for ``db_outage_s``, or in
        ``db_busy_spells`` spells in a row (:meth:`_still_busy`).
        The batches in flight are given back first, with what they fetched, and no failure
        is recorded for their refs."""
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        period = max(0.05, min(5.0, self.settings.rpc_outage_s / 4))
        watch: asyncio.TimerHandle | None = None
        stats: asyncio.TimerHandle | None = None

        def check() -> None:  # a timer, not a task: nothing to outlive the worker
            nonlocal watch
            if self._rpc_outage():
                main.cancel()
            else:
                watch = loop.call_later(period, check)

        def stop_for(error: GapfillError) -> None:
            """Stop the worker with ``error``: its batch tasks give their batches back."""
            if self._outage is not None:
                return
            self._outage = error
            for t in self._tasks:
                cancel_once(t)
            main.cancel()

        def refused(sentence: str) -> None:
            # Called inside the refused call: the batch tasks are cancelled before any of
            # them sees the failed call, so none records it or gives its batch back as failed.
            stop_for(RpcError(f"{sentence}, then rerun to continue"))

        def report() -> None:  # a timer too: the stats of a batch still fetching
            nonlocal stats
            self.send_stats()
            stats = loop.call_later(self.settings.stats_every_s, report)

        watch = loop.call_later(period, check)
        # Its running counts every ``stats_every_s``, not only as batches end: with a rate
        # limit a batch takes minutes, and the coordinator's gapfill_rpc_calls_total (a
        # counter, live) lagged by its calls.
        stats = loop.call_later(self.settings.stats_every_s, report)
        self.client.on_refused = refused
        self.client.tell = lambda text: self.emit(Notice(text, once=True, quiet_too=True))
        self._stop_for = stop_for
        try:
            with gc_tuned():
                return await self._run()
        except asyncio.CancelledError:
            if self._outage is None:
                raise
            main.uncancel()
            raise self._outage from None
        finally:
            watch.cancel()
            stats.cancel()
            self.client.on_refused = self.client.tell = None
            self._stop_for = None

    def _rpc_outage(self) -> bool:
        """True (and :attr:`_outage` set) once the client has spent ``rpc_outage_s`` trying to
        reach a node since any endpoint last replied, while batches wait on RPC. Its waits of
        its own choosing (a ``Retry-After`` pause, the rate budget's tokens, the backoff after
        a rate-limited answer) do not count: the node did reply (:mod:`gapfill.rpc.waits`).

        Two checks in a row must find it so. A process that was paused (SIGSTOP, a frozen
        container or VM, a laptop asleep) finds, on waking, its requests' replies waiting in
        its sockets, and this check due: the loop runs it before the requests read them, so
        one check alone stopped a worker whose node had answered everything."""
        if not self._fetching or self._outage is not None:
            self._silent_seen = False
            return False
        quiet = self.client.silent_s()
        if quiet <= self.settings.rpc_outage_s or not self._silent_seen:
            self._silent_seen = quiet > self.settings.rpc_outage_s
            return False
        why = self.client.last_transport_error or "no reply"
        self._outage = RpcError(f"no RPC node has replied for {quiet:.0f} s (last: {why}): "
                                "check the node, then rerun to continue")  # fmt: skip
        return True

    async def _run(self) -> WorkerTotals:
        tasks = self._tasks
        idle_polls = 0
        try:
            while not self.stopping:
                tasks.difference_update([t for t in tasks if t.done()])
                seen = self._changes
                if (self._fetching >= self.settings.batches_in_flight
                        or self._waiting_txs() >= 2 * self.settings.commit_group_txs):  # fmt: skip
                    await self._next_change(seen)
                    continue
                batch = await self._lease()
                if batch is None:
                    if any(not t.done() for t in tasks):
                        await self._next_change(seen)  # returns at once if one came meanwhile
                        continue
                    if self.settings.wait_for_others and await self._retrying(
                        "asking for open batches",
                        functools.partial(self.db, self.store.has_open_batches, self.targets),
                        stopping=False,
                    ):
                        self.send_stats()
                        await asyncio.sleep(self._idle_pause(idle_polls))
                        idle_polls += 1
                        continue
                    break
                idle_polls = 0
                self._held.add(batch.id)
                self._fetching += 1
                tasks.add(asyncio.create_task(self._handle(batch)))
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if self._flusher is not None:
                await self._flusher
            if self._not_given:  # a graceful stop's give-backs that failed: one last try, as below
                await self._last_try()
        except BaseException:  # cancelled, or the database stayed down: stop every batch task
            self.stopping = True  # a give-back under way tries the database once more, no longer
            for t in tasks:
                cancel_once(t)  # a refused key may have cancelled it already
            if self._flusher is not None:
                self._flusher.cancel()
                tasks.add(self._flusher)
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*self._giving_back, return_exceptions=True)
            await self._last_try()
            raise
        finally:
            self._say_not_given(False)
            await self._save_calls()
            self.send_stats(force=True)
        return self.totals

    async def _last_try(self) -> None:
        """A lease call the stop cut (its thread went on, and leased a batch no task took), or
        a give-back that failed: given back, one try, or it stays leased until it expires."""
        released = False
        with contextlib.suppress(Exception):
            release = functools.partial(self.store.release_owner, stop=True)  # no failed attempt
            await self.db(release, self.owner, "worker stopped", frozenset(self._held))
            released = True
        self._say_not_given(released)

    def _say_not_given(self, released: bool) -> None:
        """Say the batches whose give-back failed as the worker stopped: given back after all
        (``released``: the stop's last try gave back every lease the worker still held, without
        what they fetched), else left to expire."""
        said, self._not_given = self._not_given, []
        for ev in said:
            self.emit(dataclasses.replace(ev, not_given="") if released else ev)

    def _idle_pause(self, polls: int) -> float:
        """The pause before idle poll number ``polls`` (0, 1, ...): doubling, capped."""
        first, cap = self.settings.idle_first_poll_s, self.settings.idle_poll_s
        return min(cap, first * (1 << min(polls, 30)))

    def _note_change(self) -> None:
        self._changes += 1
        self._changed.set()

    async def _next_change(self, seen: int) -> None:
        """Wait for a change after the ``seen``-th (a batch finished its RPC, finished, or
        was committed); returns at once if there was one since."""
        while self._changes == seen:
            self._changed.clear()
            await self._changed.wait()

    # -- group commit ---------------------------------------------------------------------

    async def _commit(self, batch: Batch, enriched: Enriched) -> int | None:
        """Commit a batch, together with the others that are ready by then; returns the
        transactions it newly stored, None if its lease was lost.

        The batches wait until they hold ``commit_group_txs`` transactions, or no other
        batch is still fetching, or the first has waited ``commit_wait_s``; then one
        database transaction commits them all, each under its own lease check. Most of
        a commit's cost is the leaf pages of the hash-keyed indexes, which a batch's
        inserts touch all over: four batches in one transaction write those pages once
        instead of four times (dense chain: -5% of gapfill's CPU on SQLite, -3% on PostgreSQL).
        A crash loses nothing but the work of the waiting batches, which are redone.
        """
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        entry = (batch, enriched, done)
        self._waiting.append(entry)
        self._kick()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if any(e is entry for e in self._waiting):
                # Stopping: a batch that is still waiting leaves the group, so no later commit
                # writes what its task is giving back.
                self._waiting = [e for e in self._waiting if e is not entry]
                raise
            # Its group's commit is in flight: it ends anyway (the connection is busy until
            # its thread returns), and its outcome is the batch's. A batch it committed
            # reports as committed, not as given back (its give-back would find it done).
            while not done.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({done})
            if done.cancelled() or done.exception() is not None:
                raise  # nothing written: the task gives the batch back
            task = asyncio.current_task()
            assert task is not None
            while task.uncancel():
                pass
            return done.result()

    def _waiting_txs(self) -> int:
        return sum(len(e.txs) for _, e, _ in self._waiting)

    def fetched_unstored(self) -> int:
        """Transactions fetched and not stored yet: those of the batches still fetching, and
        of those waiting for their group's commit; of their own refs, as ``+N success`` says
        (a block two batches in flight share holds each one's refs as the other's riders)."""
        return (sum(len(c.txs) - len(c.rode) for c in self._in_flight.values())
                + sum(e.own for _, e, _ in self._waiting))  # fmt: skip

    def _group_ready(self) -> bool:
        return bool(self._waiting) and (
            self._waiting_txs() >= self.settings.commit_group_txs
            or self._fetching == 0
            or self._timer_fired
        )

    def _kick(self) -> None:
        """Start a commit if the waiting group is ready, else make sure a timer will."""
        if self._flusher is not None or not self._waiting:
            return
        if self._group_ready():
            self._flusher = asyncio.create_task(self._flush())
        elif self._timer is None:
            wait = min(self.settings.commit_wait_s, self.settings.lease_timeout_s / 4)
            self._timer = asyncio.get_running_loop().call_later(wait, self._time_is_up)

    def _time_is_up(self) -> None:
        self._timer = None
        self._timer_fired = bool(self._waiting)
        self._kick()

    async def _flush(self) -> None:
        group: list[_Waiting] = []
        try:
            while self._group_ready():
                group, self._waiting = self._waiting, []
                self._timer_fired = False
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                t0 = time.perf_counter()
                try:
                    await self._commit_group(group)
                except Exception as exc:
                    log.info("a commit of %d batch(es) failed (%s)%s", len(group), exc,
                             "" if len(group) == 1 else "; committing them one by one")  # fmt: skip
                    if len(group) == 1:  # its task gives the batch back
                        _settle(group[0][2], error=exc)
                    else:
                        await self._commit_each(group)
                else:
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("committed %d batch(es), %d transactions, in one database transaction "
                                  "(%.3f s)", len(group), sum(len(e.txs) for _, e, _ in group),
                                  time.perf_counter() - t0)  # fmt: skip
                group = []
                self._note_change()
        finally:
            for _, _, f in group:  # cancelled mid-commit: the tasks give their batches back
                f.cancel()
            self._flusher = None
        self._kick()  # batches that arrived during the last commit

    async def _commit_each(self, group: Sequence[_Waiting]) -> None:
        """After a group's transaction failed (nothing of it was written): each batch on its own.

        One batch's failure, or a dropped connection (which the store reopens), must not
        send the others' work back to be fetched again. Two failures in a row mean the
        database is down: the rest fail at once instead of each waiting to time out.
        """
        streak, last = 0, None
        for b, e, f in group:
            if f.done():  # settled already
                continue
            if streak >= 2:
                _settle(f, error=last)
                continue
            try:
                await self._commit_group([(b, e, f)])
            except Exception as exc:
                streak, last = streak + 1, exc
                _settle(f, error=exc)
            else:
                streak = 0

    async def _commit_group(self, group: Sequence[_Waiting]) -> None:
        """Commit ``group`` in one database transaction, and settle each batch's future with
        what it stored (None: its lease was lost); raises, settling none, if it failed.

        Cancelled (a stop) while the commit is in flight, it still settles them once the
        commit ends: the connection is busy until then anyway, and a batch it committed must
        report as committed, not as given back (its give-back would find it done).
        """
        items = [(b, e) for b, e, _ in group]
        commit = self.db(self.store.commit_batches, items, calls=True, writes=[b for b, _ in items],
                         commit=True)  # fmt: skip
        call = asyncio.ensure_future(commit)
        try:
            held = await asyncio.shield(call)
            self._busy_since, self._busy_spells = None, 0
        except asyncio.CancelledError:
            while not call.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({call})
            if not call.cancelled() and call.exception() is None:
                self._settle_group(group, call.result())
            raise
        self._settle_group(group, held)

    def _settle_group(self, group: Sequence[_Waiting], held: Sequence[int | None]) -> None:
        for (b, e, f), ok in zip(group, held, strict=True):
            _settle(f, self._landed_commit(b, e, ok))

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]], stopping: T,
                        why: list[str] | None = None) -> T:  # fmt: skip
        """A store call the worker cannot go on without: retried while the database is down.

        A dropped connection (a server restart, ``pg_terminate_backend``) raises once; the
        store reconnects on its next call. The worker gives up after ``db_outage_s``, and at
        once on a :class:`StoreRefused` (a read-only database, a full disk, a missing
        grant): no wait lets it pass, and the user waited a minute for what to fix. Once
        the worker is :attr:`stopping` it does not wait for the database: ``stopping`` is
        returned (the leases left behind expire, or the coordinator gives them back), and the
        error that made it so appended to ``why``.
        """
        down_since: float | None = None
        while True:
            try:
                return await call()
            except StoreError as exc:
                if self.stopping:
                    log.warning("database error while %s, stopping: %s", what, exc)
                    if why is not None:
                        why.append(str(exc) or type(exc).__name__)
                    return stopping
                if isinstance(exc, StoreRefused):  # no wait lets it pass: say what to fix now
                    raise
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    said = db_retrying(exc, what)
                    self.emit(Notice(f"[Worker-{self.index + 1}] {said.text}"))
                elif now - down_since > self.settings.db_outage_s:
                    if isinstance(exc, StoreBusy):  # the run ends with what to change
                        raise StoreRefused(exc.what, exc.fix) from exc
                    raise
                await asyncio.sleep(self.settings.db_retry_s)

    async def _lease(self) -> Batch | None:
        """The next batch, or None. A lease call whose answer was lost may still have been
        granted on the server: before trying again, give back every lease of this owner that
        none of its tasks holds, or it would sit unused until it expires."""
        unsure = False

        async def attempt() -> Batch | None:
            nonlocal unsure
            if unsure:
                # No failed attempt either (as a stop's give-back): no worker tried the batch.
                # Counted, a batch leased so twice had its next lease taken as its last.
                release = functools.partial(self.store.release_owner, stop=True)
                await self.db(release, self.owner, "its lease answer was lost", frozenset(self._held))
            unsure = True
            leased = await self.db(self.store.lease_next, self.owner, self.settings.lease_timeout_s,
                                   self.targets)  # fmt: skip
            unsure = False
            if leased.emptied:  # closed as done, with nothing to fetch: done batches all the same
                self.totals.batches += leased.emptied
                self.emit(BatchesEmptied(self.index, leased.emptied))
            return leased.batch

        return await self._retrying("leasing a batch", attempt, stopping=None)

    async def _enrich(self, enricher: Enricher, refs: Sequence[Ref], out: Collector,
                      riders: Sequence[Ref] = ()) -> Enriched:  # fmt: skip
        if self.settings.sequential:
            return await enricher.enrich_sequential(refs, out)
        return await (enricher.enrich(refs, out, riders) if riders else enricher.enrich(refs, out))

    async def _riders(self, enricher: Enricher, batch: Batch, refs: Sequence[Ref]) -> list[Ref]:
        """The refs in the gap, of the run's contracts on the batch's chain, in the blocks of
        the batch's refs (but not the batch's own): a block the batch fetches whole stores
        them too (:meth:`Enricher.split`), so no other batch fetches it again. Without them
        each contract's batches fetched the blocks two contracts share, and a contract's two
        batches the block cut between them. Looked up only where a batch may fetch whole
        blocks (under a rate limit, or ``--plan per_block``)."""
        if self.settings.sequential or not enricher.may_fetch_blocks():
            return []
        blocks = sorted({r.block_number for r in refs if r.block_number is not None})
        if not blocks:
            return []
        contracts = sorted({c for chain_id, c in self.targets or () if chain_id == batch.chain_id}
                           | {batch.contract})  # fmt: skip
        own = {r.tx_hash for r in refs}
        found = await self.db(self.store.gap_in_blocks, batch.chain_id, contracts, blocks)
        return [r for r in found if r.tx_hash not in own]

    async def _keep_lease(
        self, batch: Batch, lost: asyncio.Event, answered: list[int], priority: int,
        awaited: Counter[int] | None = None,
    ) -> None:
        """Renew while this batch's RPC calls get answers; stop renewing when they stall.

        ``answered[0]`` counts the HTTP exchanges of this batch that answered at least
        one call (set through :data:`gapfill.rpc.client.ANSWERED`), so one batch stuck
        in a call loses its lease even while the worker's other batches progress. With
        metered calls a batch's requests wait while those of the batches leased before it
        go first (its ``priority``): it is renewed too while it waits so and the node answers.
        So it is while the client holds its requests back by its own choice (its rate
        budget's tokens, a ``Retry-After`` pause, the backoff after a rate-limited answer:
        :meth:`RpcClient.held_back`), however long: that is not being stuck in a call.
        ``awaited`` (:data:`gapfill.enrich.fetch.AWAITED`): the priorities of the batches
        whose whole-block fetches this one waits for: their requests waiting so count as
        this batch's own would.
        """
        period = max(self.settings.lease_timeout_s / 3, 0.05)
        seen = answered[0]
        replied = self.client.last_reply_at
        client = self.client
        while True:
            await asyncio.sleep(period)
            now_answered = answered[0]
            priorities = [priority, *(awaited or ())]
            waits_turn = client.last_reply_at > replied and any(client.queued(p) for p in priorities)
            replied = client.last_reply_at
            held_back = any(client.held_back(p) for p in priorities)
            if now_answered == seen and not waits_turn and not held_back:
                log.warning("batch %s made no RPC progress for %.0fs; not renewing its lease",
                            batch.id, period)  # fmt: skip
                continue
            seen = now_answered
            try:
                held = await self.db(self.store.renew, batch, self.settings.lease_timeout_s)
            except StoreError as exc:  # the next period tries again (the store reconnects)
                log.warning("could not renew batch %s: %s", batch.id, exc)
                continue
            if not held:
                log.info("batch %s: its lease was lost (expired and taken back); what it fetches "
                         "will not be written", batch.id)  # fmt: skip
                lost.set()
                return
            log.debug("batch %s: lease renewed for %.0f s", batch.id, self.settings.lease_timeout_s)

    async def _handle(self, batch: Batch) -> None:
        t0 = time.perf_counter()
        lost = asyncio.Event()
        keeper: asyncio.Task[None] | None = None
        answered = [0]
        fetching = True

        def fetched() -> None:
            nonlocal fetching
            if fetching:
                fetching = False
                self._in_flight.pop(batch.id, None)
                self._fetching -= 1
                self._note_change()
                self._kick()  # with nothing left fetching, the waiting group is ready

        def on_answer() -> None:
            answered[0] += 1

        def fetched_so_far() -> Enriched | None:
            """While the lease is held, the rows (and permanent failures) the fetch in
            progress has settled, if any: what a batch stopped or failed midway keeps."""
            if lost.is_set():
                return None
            so_far = fetching_now.so_far().settled()
            return so_far if so_far.txs or so_far.failures else None

        # This task's context (and the RPC tasks it creates) reports answers to this batch,
        # and, when calls are metered, has its requests served before those of the batches
        # leased after it: they complete one after another instead of all late together.
        ANSWERED.set(on_answer)
        priority = next(self._lease_order)
        PRIORITY.set(priority)
        awaited: Counter[int] = Counter()  # the batches whose block fetches this one waits for
        AWAITED.set(awaited)
        got: Enriched | None = None  # once fetched: what a stop gives back with the batch
        give_back: asyncio.Future[None] | None = None  # a failed attempt's, once under way
        fetching_now = Collector()  # while fetching: the rows in so far, given back on a stop
        self._in_flight[batch.id] = fetching_now
        n_refs = 0
        said_assigned = False

        def assigned(refs: int) -> None:
            # The lease is taken: said (and counted, gapfill_leases_taken_total) once, before
            # anything of it ends. A lease whose refs could not be read (batch_refs failed, or a
            # stop came first) is said with its planned size as it is given back: its
            # "given back" line came with no "Assigned" line, and the lease went uncounted.
            nonlocal said_assigned
            if not said_assigned:
                said_assigned = True
                self.emit(BatchAssigned(self.index, batch.id, batch.lo, batch.hi, refs, batch.tries,
                                        batch.attempts))  # fmt: skip

        try:
            refs = await self.db(self.store.batch_refs, batch)
            n_refs = len(refs)
            t_refs = time.perf_counter()
            if log.isEnabledFor(logging.INFO):
                log.info("batch %s leased: %s of %s, %s still in the gap (query %.3f s), attempt %d "
                         "(lease %d)", batch.id, key_range(batch.lo, batch.hi), batch.contract,
                         counted(n_refs, "ref"), t_refs - t0, batch.tries, batch.attempts)  # fmt: skip
            assigned(n_refs)
            enricher = self.enrichers[batch.chain_id]
            keeper = asyncio.create_task(self._keep_lease(batch, lost, answered, priority, awaited))
            try:
                # Its leases a stop gave back were no failed attempts: they do not count.
                if batch.tries >= self.settings.max_attempts:
                    enriched = await self._isolate(enricher, refs, fetching_now)
                else:
                    riders = await self._riders(enricher, batch, refs)
                    enriched = await self._enrich(enricher, refs, fetching_now, riders)
                    transient = [f for f in enriched.failures if not f.permanent]
                    if transient:
                        # Failures that may pass (timeouts, inconsistent answers) must not mark
                        # the batch done: give it back for another attempt; the last one stores them.
                        first = transient[0]
                        kept = enriched.settled()
                        raise TransientFailures(f"{counted(len(transient), 'transaction')} failed, e.g. "
                                                f"{first.tx_hash}: {first.last_error}", kept)  # fmt: skip
            finally:
                keeper.cancel()
                fetched()
            t_fetched = time.perf_counter()
            stored = None
            if not lost.is_set():
                got = enriched
                stored = await self._commit(batch, enriched)
            self._done(batch, enriched, stored, t0, t_fetched - t_refs)
        except asyncio.CancelledError:
            # One try only: a stop must not wait for a database that is down. A batch is
            # given back with the rows (and permanent failures) it has: all of them once
            # fetched and waiting for its group's commit, else those whose answers are in:
            # a Ctrl+C must not throw away calls already paid for.
            assigned(batch.size)
            keep = got.settled() if got is not None else fetched_so_far()
            await asyncio.shield(self._abandon(batch, "worker stopped", retry=False, keep=keep,
                                               refs=n_refs, fetched=got, t0=t0))  # fmt: skip
            raise
        except Exception as exc:  # a batch-level failure: give it back for a retry
            log.warning("batch %s attempt %s failed: %s", batch.id, batch.tries, exc)
            assigned(batch.size)
            # What the attempt fetched before the failure is kept as a stop keeps it, unless
            # the fetch was over: then the failure was the commit's, which those rows may
            # well fail again, and the give-back must not.
            if isinstance(exc, TransientFailures):
                keep = exc.kept if not lost.is_set() else None
            else:
                keep = fetched_so_far() if got is None else None
            # A connection the database dropped (a restart; a write whose answer was lost, which
            # a look found did not land) is no failure of the batch: given back as a stop's,
            # it keeps its tries. Counted, every batch in flight or waiting for its group's
            # commit spent one per drop, and after two drops stored its transient failures at
            # once (a commit the database keeps refusing is not split off by the last attempt,
            # which isolates refs the node fails). Its pause still doubles per lease: a commit
            # dropped every time (a pooler's size limit, say) backs off as it did, and ends
            # the worker as commits that keep meeting a lock_timeout do (_still_busy).
            failed_attempt = not isinstance(exc, StoreDropped)
            done_before = batch.tries if failed_attempt else batch.attempts
            pause = self.settings.retry_pause_s * 2 ** max(0, done_before - 1)
            # Refs failing for a reason that may pass is expected: said plainly. Anything
            # else is unexpected, and its class helps to tell what it was.
            said = str(exc) if isinstance(exc, TransientFailures) else f"{type(exc).__name__}: {exc}"
            # Not cut short by a stop that cancels this task (a refusal seen by another batch
            # of the same commit group stops the worker): the worker waits for it as it stops.
            give_back = asyncio.ensure_future(self._abandon(batch, said, keep=keep, refs=n_refs,
                                                            retry_after_s=pause, fetched=got, t0=t0,
                                                            failed_attempt=failed_attempt))  # fmt: skip
            self._giving_back.add(give_back)
            give_back.add_done_callback(self._giving_back.discard)
            await asyncio.shield(give_back)
            refusal = self._still_busy(exc) if isinstance(exc, StoreBusy | StoreDropped) else exc
            if isinstance(refusal, StoreRefused) and self._stop_for is not None:
                # Its commit was refused for a reason no wait lets pass (a full disk, a grant
                # revoked on one table, a lock_timeout met for the whole outage window): the
                # next batch's would be too, after the node's work for it, so the worker stops
                # and says what to fix, its other batches given back with what they fetched.
                self._stop_for(refusal)
        finally:
            fetched()
            if give_back is not None and not give_back.done():
                # Stopped while the give-back runs on: the batch is its until it ends (a
                # write whose answer was lost may yet turn out to have committed it).
                give_back.add_done_callback(lambda _: self._let_go(batch.id))
            else:
                self._let_go(batch.id)

    def _still_busy(self, exc: StoreBusy | StoreDropped) -> StoreRefused | None:
        """A commit failed for a reason that may pass (a lock_timeout or statement_timeout
        met waiting for another worker's commit, the server out of memory, a connection
        dropped by a restart): its batch is given back and retried. Only once this worker's
        commits have met such failures for ``db_outage_s``, or in ``db_busy_spells`` spells,
        with none passing, the refusal to stop with, saying what to change. (A connection
        dropped at every commit, by a pooler's or a proxy's limit say, was retried without
        end: the connection reopens each time, so no other call of the worker gave up.)"""
        now = time.monotonic()
        last, self._busy_last = self._busy_last, now
        if self._busy_since is None or (last is not None and now - last > self.settings.db_outage_s):
            # (Two far apart, with no commit between them as a worker at a low --rps commits
            # seldom, are no run of them: the second ended the run at once. A few spells are:
            # a timeout every commit exceeds never passes, however seldom it commits.)
            self._busy_since = now
            self._busy_spells += 1
            if self._busy_spells >= self.settings.db_busy_spells:
                return _given_up(exc)
        elif now - self._busy_since > self.settings.db_outage_s:
            return _given_up(exc)
        return None

    def _let_go(self, batch_id: int) -> None:
        """The batch's task, and the give-back it started, are over."""
        self._held.discard(batch_id)
        self._landed.pop(batch_id, None)
        self._note_change()

    def _done(self, batch: Batch, enriched: Enriched, stored: int | None, t0: float,
              fetch_s: float) -> None:  # fmt: skip
        """Count and report a batch whose commit is over: ``stored`` transactions newly stored
        (its riders' too), None if its lease was lost (nothing written)."""
        committed = stored is not None
        if log.isEnabledFor(logging.INFO):
            if committed:
                log.info("batch %s committed: %d fetched%s (%d newly stored), %d failed; fetch %.2f s, "
                         "commit %.2f s (with the wait for its group)", batch.id, enriched.own,
                         _and_riders(len(enriched.rode)), stored, len(enriched.failures), fetch_s,
                         time.perf_counter() - t0 - fetch_s)  # fmt: skip
            else:
                log.info("batch %s: lease lost after a fetch of %.2f s; nothing written", batch.id,
                         fetch_s)  # fmt: skip
        t = self.totals
        if stored is not None:
            t.batches += 1
            t.processed += stored  # a transaction another batch stored first is not counted
            t.failed += len(enriched.failures)
            t.permanent += sum(1 for f in enriched.failures if f.permanent)
        else:
            t.lost += 1
        self.emit(BatchDone(self.index, batch.id, enriched.own, len(enriched.failures),
                            time.perf_counter() - t0, committed, stored or 0,
                            len(enriched.rode)))  # fmt: skip
        self.send_stats()

    def _landed_commit(self, batch: Batch, enriched: Enriched, stored: int | None) -> int | None:
        """What a commit of ``batch`` stored, None if its lease was lost; but a batch that an
        earlier commit whose answer was lost committed (:meth:`_check_lost`) is committed. How
        many of its rows that commit newly stored went with the answer: all count, its riders'
        too, as ``processed`` counts every row stored (only a transaction another batch stored
        first makes that more than the run's ``processed``, which the database keeps exact)."""
        if stored is None and self._landed.get(batch.id) == "committed":
            del self._landed[batch.id]
            return len(enriched.txs)
        return stored

    async def _abandon(
        self, batch: Batch, error: str, retry: bool = True, keep: Enriched | None = None,
        refs: int = 0, retry_after_s: float = 0.0, fetched: Enriched | None = None, t0: float = 0.0,
        failed_attempt: bool = True,
    ) -> None:
        """Give ``batch`` back, storing ``keep`` (what the attempt got of its ``refs`` refs)
        with it. ``fetched``: all the attempt fetched, if its fetch was over (what its commit
        held, if one ran; the batch task's start at ``t0``). ``failed_attempt``: a retry's
        give-back is a failed attempt (:attr:`Batch.tries`) unless the database's doing."""
        # Retried like a lease: the call that failed the batch often met a dropped
        # connection, and a lease not given back would hold the batch until it expires.
        given: GivenBack | None = None  # None: not given back
        failed = ""  # why the give-back failed, if it did: the lease is left to expire
        # A stop's give-back (no retry) is no failed attempt: the batch keeps its retries.
        abandon = functools.partial(self.store.abandon_keeping, stop=not (retry and failed_attempt))
        give_back = functools.partial(self.db, abandon, batch, error, keep, retry_after_s, calls=True,
                                      writes=(batch,))  # fmt: skip
        try:
            if retry:
                why: list[str] = []
                given = await self._retrying(f"giving back batch {batch.id}", give_back,
                                             stopping=None, why=why)  # fmt: skip
                if why:  # failed as the worker stopped: not a lease that had ended already
                    failed = why[-1]
            else:
                try:
                    given = await give_back()
                except StoreDropped as exc:
                    # Its answer may be what was lost: one look at how its lease ended. Failed
                    # unless that finds it landed (below): a lease still held stays until it expires.
                    failed = str(exc)
                    await self.db(self._check_lost)
        except Exception as exc:  # the lease will expire instead
            log.warning("could not give back batch %s: %s", batch.id, exc)
            failed = str(exc) or type(exc).__name__
        if given is None:  # its lease is gone: a write whose answer was lost may have ended it
            landed = self._landed.pop(batch.id, None)
            if landed == "committed":  # its commit landed: the batch is committed, not given back
                done = fetched or Enriched()
                self._done(batch, done, len(done.txs), t0, time.perf_counter() - t0)
                return
            if landed is not None:  # an earlier try of this give-back landed
                given = GivenBack(len(keep.txs) if keep is not None else 0, closed=landed == "closed")
        kept = kept_failed = kept_rode = 0  # kept: of its own refs (its riders' are not its)
        if given is not None and keep is not None:
            kept, kept_failed, kept_rode = keep.own, len(keep.failures), len(keep.rode)
            t = self.totals
            t.processed += given.stored
            t.failed += kept_failed
            t.permanent += kept_failed
            if given.closed:  # all it had left was stored: done, as a commit is
                t.batches += 1
        rest = max(0, refs - kept - kept_failed)
        if given is not None:
            log.info("batch %s attempt %d given back (%s): %d stored%s, %d failed for good, %d left in the "
                     "gap%s%s", batch.id, batch.tries, error[:300], kept, _and_riders(kept_rode),
                     kept_failed, rest,
                     "; closed: nothing of it is left" if given.closed else "",
                     f"; leased again no sooner than in {retry_after_s:.1f} s" if retry and retry_after_s
                     else "")  # fmt: skip
        # Not given back: said so, not as given back (a stop with the database gone said every
        # batch was), with when the batch comes back.
        not_given = "" if given is not None else failed[:300] or LEASE_GONE
        ev = BatchAbandoned(self.index, batch.id, error[:300], batch.tries, batch.attempts, kept, kept_failed,
                            rest, given.stored if given else 0, closed=given is not None and given.closed,
                            not_given=not_given, lease_timeout_s=self.settings.lease_timeout_s,
                            kept_rode=kept_rode)  # fmt: skip
        if failed and self.stopping:  # the stop's last try may give it back yet
            self._not_given.append(ev)
        else:
            self.emit(ev)
        if kept or kept_rode:
            self.send_stats()

    async def _isolate(self, enricher: Enricher, refs: Sequence[Ref], out: Collector) -> Enriched:
        """Last attempt: split until the refs that raise are isolated; store the rest. ``out``
        collects the parts done (and, if cancelled, what the part in progress got)."""

        async def go(part: Sequence[Ref]) -> None:
            part_out = Collector()  # a part that raises is split and fetched again: apart
            try:
                got = await self._enrich(enricher, part, part_out)
            except asyncio.CancelledError:
                out.take(part_out.so_far())
                raise
            except Exception as exc:
                if len(part) == 1:
                    r = part[0]
                    # A malformed answer says which field it was; anything else, its class.
                    why = (f"the node's answer is malformed: {exc}" if isinstance(exc, MalformedAnswer)
                           else f"{type(exc).__name__}: {exc}")  # fmt: skip
                    out.fail(Failure(r.chain_id, r.tx_hash, r.contract, "permanent",
                                     f"isolated after "
                                     f"{counted(self.settings.max_attempts, 'attempt')}: {why}"))  # fmt: skip
                    return
                mid = len(part) // 2
                await go(part[:mid])
                await go(part[mid:])
                return
            out.take(got)

        await go(refs)
        return out.result()

