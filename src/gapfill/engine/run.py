"""Runs: plan the gap into batches, then work them in one of the modes.

* ``sequential``: one process, one transaction and one call at a time (the
  seed's baseline, kept for comparison).
* ``batch``: one process, JSON-RPC batches, several batches in flight.
* ``concurrent``: a coordinator and N worker processes that lease batches from
  the database. The coordinator restarts crashed workers, takes back expired
  leases (killing a local worker stuck past its lease), and shuts down in
  steps on SIGINT/SIGTERM: no new leases, a grace period, SIGTERM, SIGKILL.
* ``auto``: picks by gap size from measurements (see :func:`choose_mode`).

Every mode goes through the same plan and leases, so any run resumes any other:
the batches table is a plan, the gap is always recomputed from data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue as queue_mod
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar

from gapfill.engine import forkserver
from gapfill.engine.events import (
    LEASE_GONE,
    BatchAbandoned,
    BatchDone,
    BatchesEmptied,
    Emit,
    Event,
    Logged,
    Notice,
    Progress,
    RunStarted,
    RunSummary,
    WorkerExited,
    WorkerLostNode,
    WorkerRefused,
    WorkerStats,
    WorkerWaitsForSlot,
    db_retrying,
)
from gapfill.engine.idle import (
    fill_block_numbers,
    finish_left_redecodes,
    nothing_to_enrich,
    permanent_failures,
)
from gapfill.engine.metrics import LeaseTally, series
from gapfill.engine.session import make_client
from gapfill.engine.worker import Worker, WorkerSettings
from gapfill.enrich.fetch import Enricher, PlanSettings, decoder_for
from gapfill.errors import (
    GapfillError,
    Interrupted,
    NodeUnavailable,
    RpcError,
    StoreError,
    StoreNoSlot,
    StoreRefused,
)
from gapfill.model import Enriched, Ref, head_in_error
from gapfill.records import record
from gapfill.redact import DbUrl, redact_text
from gapfill.rpc import RpcClient, RpcSettings
from gapfill.rpc.config import calls_metered
from gapfill.rpc.tls import any_may_use_tls
from gapfill.settings import ENRICH_RPC_BATCH, EndpointSetting
from gapfill.signals import HeldSignals
from gapfill.store import DB_CHECK, Store, open_store, owner_name, run_owner
from gapfill.store.liveness import owner_host, shown_owner
from gapfill.wording import counted

if TYPE_CHECKING:  # multiprocessing is imported where a concurrent run needs it: a batch run
    # never does, and it is a fixed cost of every small run's start (~5 ms)
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

log = logging.getLogger(__name__)
T = TypeVar("T")
#: A worker process's exit code when no RPC node replies or serves what it needs, or every
#: one refuses the API key.
EXIT_LOST_NODE = 4
#: How long the other workers get to give their batches back once one lost the node (or met
#: a database that refuses its work).
LOST_NODE_STOP_S = 10.0
#: A worker process's exit code when its start-up check of the node failed for a reason
#: that may pass (HTTP 5xx, timeouts): the coordinator's own check passed, so the node was
#: there a moment ago, and the worker is restarted as a crashed one would be.
EXIT_START_FAILED = 5
#: A worker process's exit code when the database refuses what it must do until the user
#: fixes something (a :class:`StoreRefused`: a read-only database, a full disk, a missing
#: grant, a statement_timeout met for the whole outage window): no restart passes it, so the
#: coordinator ends the run with the worker's sentence, as it does with a lost node's.
EXIT_REFUSED = 6

MODES = ("auto", "sequential", "batch", "concurrent")
#: Gap size from which ``auto`` runs worker processes instead of one process. Below it,
#: starting processes costs more than it wins (measured with bench/run: README "Modes").
AUTO_CONCURRENT_FROM = 20_000
#: How long the coordinator keeps retrying when the database fails, before it gives up.
DB_OUTAGE_S = 60.0
#: How often a run reports its progress (the renderers show it less often: see cli_progress).
PROGRESS_EVERY_S = 1.0


def _progress_event(done: int, total: int, active: int, processed: int, failed: int, elapsed: float,
                    retries: int, limited: int, fetched: int = 0) -> Progress:  # fmt: skip
    """Progress with its rate and ETA (the time the remaining batches take at the rate so far);
    ``fetched``: transactions fetched and not stored yet."""
    rate = processed / elapsed if elapsed > 0 else 0.0
    eta = ((total - done) * (processed / done) / rate) if done and rate > 0 else None
    return Progress(done, total, active, processed, failed, elapsed, rate, eta, retries, limited, fetched)


def default_workers(cores: int | None = None) -> int:
    """75% of the cores, clamped to 2-8 (the seed's rule)."""
    n = cores if cores is not None else (os.cpu_count() or 2)
    return max(2, min(8, int(n * 0.75)))


def shared_in_flight(settings: RpcSettings, workers: int) -> RpcSettings:
    """Each of a concurrent run's ``workers``' RPC settings: the requests a batch run keeps in
    flight (``max_in_flight``, 8) shared among them, at least 2 each, so that together they
    ask the node no more at once than one batch run does. On 2 cores shared with anvil, 2
    workers with 8 each cost the node 11% more CPU per transaction than a batch run's 8
    (80,000-tx dense chain, both backends: 33.5 against 30.2 and 34.9 against 31.5 CPU s),
    and the node is what bounds the run; with 4 each its CPU fell from 15.8 to 14.9 s and
    the run's wall time from 11.4 to 10.9 s, batch mode's 11.0 (medians of 3 runs, 32,020
    refs, PostgreSQL, bench/phases.py). A remote node's latency is covered as in a batch
    run: the workers together keep as many requests out."""
    per_worker = max(2, -(-settings.max_in_flight // max(1, workers)))
    return replace(settings, max_in_flight=min(settings.max_in_flight, per_worker))


#: Cores from which ``auto`` considers worker processes at all.
AUTO_CONCURRENT_MIN_CORES = 3


def choose_mode(gap: int, cores: int | None = None) -> tuple[str, str]:
    """The mode ``auto`` picks for a gap of ``gap`` refs, and why.

    The seed used sequential below 1,000 refs, batch to 10,000 and concurrent
    above. Measured with bench/run on 2 cores shared with a local node:

    * sequential never wins (batch is 4-9x faster even at 1,000 refs), so auto
      never picks it;
    * at 2,849 refs batch is 2-2.5x as fast as concurrent (starting
      processes dominates);
    * at 80,000 refs concurrent ran at 0.87-0.96x batch over six runs on an AMD
      machine, and at 0.95x in two runs on an Intel one after its start-up and
      shutdown were cut by ~0.5 s (2026-11-28, both backends); at 0.82-1.10x in the
      runs since, 1.09x / 0.83x (PostgreSQL / SQLite) in the latest (2026-12-01
      07:43, its start cut by another 0.5-0.8 s and its workers sharing batch mode's
      requests in flight): one process already keeps the node busy, and a second
      one takes CPU from it, so concurrent does not reliably win.

    So concurrent pays only where there are cores to spare beyond the node's and
    one worker's; auto picks it from ``AUTO_CONCURRENT_FROM`` refs on machines
    with at least ``AUTO_CONCURRENT_MIN_CORES`` cores (not measured here: this
    machine has 2).
    """
    n = cores if cores is not None else (os.cpu_count() or 1)
    if n < AUTO_CONCURRENT_MIN_CORES:
        return "batch", f"{n} cores: one process keeps the node busy, a second would take its CPU"
    if gap < AUTO_CONCURRENT_FROM:
        return "batch", f"gap of {counted(gap, 'ref')} < {AUTO_CONCURRENT_FROM:,}: one process is fastest"
    return "concurrent", (f"gap of {counted(gap, 'ref')} >= {AUTO_CONCURRENT_FROM:,} on {n} cores: "
                          "worker processes")  # fmt: skip


@record
class EnrichJob:
    """Everything a run needs, picklable so worker processes receive it whole."""

    db_url: str
    endpoints: tuple[EndpointSetting, ...]
    targets: tuple[tuple[int, str], ...]
    chain_id: int
    #: Where ``db_url`` came from, as the database's messages name it (each worker
    #: process opens its own store).
    db_check: str = DB_CHECK
    mode: str = "auto"
    workers: int | None = None
    #: How messages name ``workers`` when it is not ``--workers N`` (the config file's).
    workers_said: str | None = None
    batch_size: int = 500
    rpc_batch_size: int = ENRICH_RPC_BATCH
    grace_period_s: float = 30.0
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    plan: PlanSettings = field(default_factory=PlanSettings)
    rpc: RpcSettings = field(default_factory=RpcSettings)
    plan_new: bool = True  # False for `gapfill worker`: only join open plans
    measure_sequential: bool = True
    metrics_port: int | None = None
    #: The run the workers write for (their writes add to its counts); set by the coordinator.
    run_id: int | None = None
    #: Positions in ``endpoints`` of those the run's first probe (or the CLI's check before
    #: the run, ``engine.session.check_node``) left out (hung, unreachable):
    #: the clients made after it (the coordinator's, the workers') go without them, instead
    #: of each waiting ``probe_grace_s`` for them again. ``endpoints`` keeps them all, so
    #: their URLs are still redacted wherever the run's messages are kept.
    left_out: tuple[int, ...] = ()
    #: Whether the run's start-up check has said (at -v) the node's chain: the clients made
    #: after it (the sample's, the workers') say it at DEBUG only.
    chain_said: bool = False


# -- shared pieces ---------------------------------------------------------------------


def _abis(store: Store, chain_id: int) -> dict[str, Any]:
    """The ABI of every contract tracked on ``chain_id`` (None where it has none), by address:
    what a process's decoder is built from (a transaction to one contract may carry
    another's logs)."""
    return {c.address: c.abi for c in store.list_contracts() if c.chain_id == chain_id}


def _decoder_and_enricher(store: Store, client: RpcClient, job: EnrichJob) -> dict[int, Enricher]:
    contracts = _abis(store, job.chain_id)
    metered = calls_metered(job.endpoints)
    plan = replace(job.plan, calls_metered=metered or job.plan.calls_metered)
    return {
        job.chain_id: Enricher(client, job.chain_id, decoder_for(contracts), plan,
                               calls_per_request=job.rpc_batch_size)
    }  # fmt: skip


def _kept(job: EnrichJob) -> list[int]:
    """Positions in ``job.endpoints`` of the endpoints its clients use."""
    return [i for i in range(len(job.endpoints)) if i not in job.left_out]


def _client(job: EnrichJob, *, sequential: bool = False) -> RpcClient:
    settings = replace(job.rpc, max_in_flight=1) if sequential else job.rpc
    return make_client([job.endpoints[i] for i in _kept(job)], rpc_batch_size=job.rpc_batch_size,
                       expected_chain_id=job.chain_id, settings=settings,
                       chain_said=job.chain_said)  # fmt: skip


def _without_left_out(job: EnrichJob, client: RpcClient) -> EnrichJob:
    """``job`` with the endpoints that ``client`` (one of ``_client(job)``) left out at its
    probe added to :attr:`EnrichJob.left_out`."""
    kept = _kept(job)
    gone = {kept[i] for i in client.left_out()}
    return replace(job, left_out=tuple(sorted({*job.left_out, *gone}))) if gone else job


#: Asked once per process with a hash no transaction has: the answer is null where the
#: method exists, an error where the node does not serve it.
_NO_SUCH_TX = "0x" + "00" * 32


async def _ready(client: RpcClient, emit: Emit | None = None) -> int:
    """Probe the endpoints (chain id), then make sure the node serves what enrichment calls:
    a node without them would otherwise fail every transaction, one by one, for good.
    With ``emit``, a node slow to answer the probe is said to be waited for."""
    chain_id = await client.probe(None if emit is None else lambda text: emit(Notice(text, waiting=True)))
    await client.require(["eth_getTransactionByHash", "eth_getTransactionReceipt"], [_NO_SUCH_TX],
                         "gapfill needs to enrich transactions")  # fmt: skip
    log.debug("the RPC node serves eth_getTransactionByHash and eth_getTransactionReceipt")
    return chain_id


def _rpc_totals(client: RpcClient) -> tuple[int, int, int]:
    calls = retries = limited = 0
    for s in client.stats().values():
        calls += s.calls
        retries += s.retries
        limited += s.rate_limited
    return calls, retries, limited


def gap_size(store: Store, targets: Sequence[tuple[int, str]]) -> int:
    return sum(store.count_gap(c, a) for c, a in targets)


def _nothing_left(store: Store, job: EnrichJob) -> bool:
    """Whether an interrupted run left its targets nothing to do (its batches in flight
    finished within the grace period): no gap, no open plan."""
    return nothing_to_enrich(store, job.targets) is not None


def refs_beyond_head(store: Store, targets: Sequence[tuple[int, str]]) -> tuple[int, int | None]:
    """Refs of ``targets`` left in the gap in blocks the node had not reached, and the
    highest head their failures name."""
    n, heads = 0, []
    for chain_id, contract in targets:
        count, last_error = store.count_beyond_head(chain_id, contract)
        n += count
        head = None if last_error is None else head_in_error(last_error)
        if head is not None:
            heads.append(head)
    return n, max(heads, default=None)


def rate_limit(job: EnrichJob) -> float | None:
    """The calls per second the run's endpoints allow together when every one of them is
    metered (``--rps``, or ``rps`` in the config file): a client that makes one call at a
    time cannot go faster either. None when one of them has no limit."""
    limits = [job.endpoints[i].rps for i in _kept(job)]
    if not limits or any(r is None for r in limits):
        return None
    return sum(r for r in limits if r is not None)


def sequential_baseline(rate: float, why: str, calls_per_tx: float, rps: float | None) -> tuple[float, str]:
    """The sequential rate a run's speedup compares with: ``rate`` (measured or recorded,
    ``why`` says which), made at ``calls_per_tx`` calls per transaction, but no more than
    the run's rate limit ``rps`` allows a sequential client. A start-up sample of 20 refs
    runs within the rate limit's burst, unthrottled, and a recorded run may have had no
    limit: compared with a run the limit holds back, either made a rate-limited run look
    slower than one call at a time ("0.1x")."""
    if rps is None or calls_per_tx <= 0 or rate <= rps / calls_per_tx:
        return rate, why
    return rps / calls_per_tx, (f"{why}, capped at what the {rps:g} calls/s rate limit allows "
                                f"at its {calls_per_tx:.2f} calls per transaction")  # fmt: skip


def recorded_sequential_rate(store: Store, rps: float | None = None) -> tuple[float, str] | None:
    """The rate of the latest finished sequential run, if any, as :func:`sequential_baseline`
    bounds it under the rate limit ``rps``."""
    for r in store.list_runs(200):
        if r.mode == "sequential" and r.state == "done" and r.finished_at and r.processed >= 10:
            secs = r.finished_at - r.started_at
            if secs > 0:
                return sequential_baseline(r.processed / secs, f"recorded from sequential run #{r.run_id}",
                                           r.rpc_calls / r.processed, rps)  # fmt: skip
    return None


@record
class _Sample:
    """The sequential rate measured at the start of a concurrent run, and what it cost."""

    rate: float
    why: str
    processed: int
    failed: int
    calls: int
    job: EnrichJob  # the run's job, without the endpoints the sample's probe left out


#: The start-up sample of a concurrent run enriches the gap's first ``SAMPLE_REFS`` refs one
#: call at a time (fewer where the gap has fewer), for at most ``SAMPLE_BUDGET_S`` (a slow or
#: stalling node would hold the run's start). The workers start after it, so each of its refs
#: costs the run what one call at a time costs more than the workers: it used to take a
#: hundredth of the gap, up to 250 refs, which with the count of the gap that sized it took
#: 0.4-0.5 s of a 32,000-ref run's start on a local node (see docs/architecture.md).
SAMPLE_REFS = 20
SAMPLE_BUDGET_S = 2.0
_SAMPLE_MIN_REFS = 5
#: How long the sample waits for the workers' fork server to finish its import first.
_SERVER_READY_WAIT_S = 5.0


def sample_refs(store: Store, targets: Sequence[tuple[int, str]]) -> list[Ref]:
    """The refs the start-up sample enriches: the first ``SAMPLE_REFS`` of the targets' gap,
    in their order, or the whole gap where it is smaller."""
    refs: list[Ref] = []
    for chain_id, contract in targets:
        for r in store.iter_gap(chain_id, contract, chunk=SAMPLE_REFS):
            refs.append(r)
            if len(refs) >= SAMPLE_REFS:
                return refs
    return refs


async def _measure_sequential(job: EnrichJob, store: Store, emit: Emit) -> _Sample | None:
    """Enrich the gap's first ``SAMPLE_REFS`` refs one call at a time, for the speedup figure,
    stopping after ``SAMPLE_BUDGET_S``; None if fewer than five were done by then (the
    summary then has no speedup). It first waits for the workers' fork server to import its
    preload, which otherwise took a core from the node and the sample."""
    refs = sample_refs(store, job.targets)
    if len(refs) < _SAMPLE_MIN_REFS:
        return None
    await forkserver.ready(_SERVER_READY_WAIT_S)
    async with _client(job, sequential=True) as client:
        carried = False  # its calls, with its rows (store.write below)
        try:
            try:  # its own start-up check has the same budget: one stalled call held the run's
                # start (and its first line) for three --rpc-timeout tries, silently
                await asyncio.wait_for(_ready(client, emit), SAMPLE_BUDGET_S)
            except TimeoutError:  # no sample, no speedup figure; the workers check the node again
                return _Sample(0.0, "", 0, 0, _rpc_totals(client)[0], _without_left_out(job, client))
            enricher = _decoder_and_enricher(store, client, job)[job.chain_id]
            enriched = Enriched()
            done = 0
            calls0 = _rpc_totals(client)[0]  # the probe's: not the sample's calls per ref
            t0 = time.perf_counter()
            deadline = t0 + SAMPLE_BUDGET_S
            for ref in refs:
                now = time.perf_counter()
                left = deadline - now
                if left <= 0:
                    break
                try:  # a call that stalls is cut at the deadline; its ref stays in the gap
                    enriched.extend(await asyncio.wait_for(enricher.enrich_sequential([ref]), left))
                except TimeoutError:
                    break
                done += 1
            secs = time.perf_counter() - t0
            calls = _rpc_totals(client)[0]
            job = _without_left_out(job, client)
            carried = True
        finally:
            # No sample (its check ran out of its budget), or cut (a Ctrl+C) or failed: no rows
            # to write, but calls made, which the run's recorded ones (finish_run) missed.
            if not carried:
                with contextlib.suppress(GapfillError):  # (the database may be what failed)
                    store.add_run_calls(_rpc_totals(client)[0])
    # Real rows, idempotent: they simply leave the gap. Failures that may pass are not the
    # run's: those refs stay in the gap, and the plan that follows enriches them.
    kept = enriched.settled()
    new = store.write(kept, calls)  # a transaction two of the refs share is stored (and counted) once
    if done < _SAMPLE_MIN_REFS:
        return _Sample(0.0, "", new, len(kept.failures), calls, job)
    why = f"measured on {counted(done, 'ref')} at the start of this run"
    rate, why = sequential_baseline(done / secs, why, (calls - calls0) / done, rate_limit(job))
    return _Sample(rate, why, new, len(kept.failures), calls, job)


async def _probe(job: EnrichJob, emit: Emit, count: Callable[[int], None]) -> EnrichJob:
    """Probe the node; returns ``job`` without the endpoints the probe left out. ``count``
    hears the calls it made, even if it fails."""
    async with _client(job) as client:
        try:
            await _ready(client, emit)
        finally:
            count(_rpc_totals(client)[0])
        return replace(_without_left_out(job, client), chain_said=True)


def _needs_node(store: Store, job: EnrichJob) -> bool:
    """Whether the run has work for the node: a gap, in an open plan of its targets or (a
    run that plans) to plan. The node's start-up check, which may fail (another chain, a
    method missing, unreachable), then comes before the plan is written: a failed check
    must not leave an open plan behind (imports and discovery fill nothing under one). An
    open plan of an empty gap (its batches given back on Ctrl+C with all they had fetched)
    needs no node: planning closes its batches."""
    if not any(store.has_gap(chain_id, contract) for chain_id, contract in job.targets):
        return False
    return job.plan_new or store.has_open_batches(job.targets)


#: How often `gapfill worker --wait` looks for an open plan.
PLAN_POLL_S = 2.0


def wait_for_plan(store: Store, targets: Sequence[tuple[int, str]], poll_s: float = PLAN_POLL_S) -> None:
    """Return once one of ``targets`` has an open plan (Ctrl+C stops the wait)."""
    while not store.has_open_batches(targets):
        time.sleep(poll_s)


def _plan(store: Store, job: EnrichJob, run_id: int) -> tuple[int, int, int, int | None]:
    """Plan (or join); returns the open batches this run will work on, refs planned, plans
    joined, and the targets' refs just before it planned (None for `gapfill worker`, which
    plans nothing): see :func:`refs_arrived`."""
    if not job.plan_new:  # `gapfill worker`: the open plans of its node's chain, if any
        open_per_target = [store.count_open_batches([t]) for t in job.targets]
        joined = sum(1 for n in open_per_target if n)
        log.info("run %s joins %d open plan(s) of %d contract(s): %d open batches", run_id, joined,
                 len(job.targets), sum(open_per_target))  # fmt: skip
        return sum(open_per_target), 0, joined, None
    t0 = time.perf_counter()
    refs_before = store.count_refs(job.targets)
    info = store.plan(run_id, job.targets, job.batch_size)
    batches = store.count_open_batches(job.targets)
    log.info("run %s planned %d ref(s) into %d new batch(es) of up to %d refs, joined %d open plan(s); "
             "%d open batches for %d contract(s) (%.2f s)", run_id, info.refs, info.batches, job.batch_size,
             info.joined, batches, len(job.targets), time.perf_counter() - t0)  # fmt: skip
    return batches, info.refs, info.joined, refs_before


def refs_arrived(store: Store, targets: Sequence[tuple[int, str]], refs_before: int | None) -> int:
    """At a complete run's end: the refs of ``targets`` imported or discovered while it
    worked, after its plan (``refs_before``: the targets' refs when it planned), which it
    left in the gap: a rerun plans them. The gap's probes (each ref's transaction and failure
    records) only where the targets' refs grew since, which one count of their index tells:
    a run with nothing new pays that count alone."""
    if refs_before is None or store.count_refs(targets) <= refs_before:
        return 0
    return sum(store.count_untried(chain_id, contract) for chain_id, contract in targets)


# -- in-process modes ----------------------------------------------------------------------


def _note(job: EnrichJob, exc: BaseException) -> str:
    """Why a run failed, as its ``runs`` row keeps it: no URL's secret in it. An exception
    that is not gapfill's (a bug, an OSError) is named as the CLI says it."""
    why = str(exc) if isinstance(exc, GapfillError) else f"internal error ({type(exc).__name__}: {exc})"
    return redact_text(why, DbUrl(job.db_url), *(e.url for e in job.endpoints))[:1000]


def _app(job: EnrichJob) -> str:
    """The command, as the run's PostgreSQL sessions name it (see ``open_store``)."""
    return "enrich" if job.plan_new else "worker"


def _open(job: EnrichJob, emit: Emit, store: Store | None = None) -> Store:
    """The run's database, saying through ``emit`` what it waits for (another process's lock),
    while this process is the run's only writer. A concurrent run's coordinator (once its
    workers started) and workers wait on each other's commits, which is no news: they do
    not say it. ``store``: the job's database, open already (see :func:`run_enrich`), which
    the run takes over instead of opening it again."""
    notice = lambda text: emit(Notice(text, waiting=True))  # noqa: E731
    if store is not None:
        store.notice = notice
        return store
    return open_store(job.db_url, notice=notice, check=job.db_check, app=_app(job))


def _as_recorded(measured_s: float, recorded_s: float) -> float:
    """The run's duration as its summary says it: the one its row records, from which
    ``gapfill runs`` works out its rate (measured here apart, the two rates differed:
    2,493.0 against 2,493.1 tx/s). ``measured_s`` where the database's clock gives none
    (it stepped back between the run's start and end)."""
    return recorded_s if recorded_s > 0 else measured_s


def _release_dead_local_owners(store: Store, emit: Emit) -> None:
    for pid, n in store.release_dead_local_owners().items():
        emit(Notice(f"took back {n} lease(s) of a dead local worker (pid {pid})"))


def run_in_process(
    job: EnrichJob, emit: Emit, *, sequential: bool, end: HeldSignals | None = None,
    store: Store | None = None,
) -> RunSummary:
    """``end`` and ``store`` (taken over, closed as the run ends): see :func:`run_enrich`."""
    mode = "sequential" if sequential else "batch"
    store = _open(job, emit, store)
    term = _Term()
    old_int = signal.getsignal(signal.SIGINT)
    old_term = _sigterm_as_sigint(term)
    held = end if end is not None else HeldSignals()
    # The run's end holds the signals with the caller's handlers as those put back, not the
    # run's own (SIGTERM's), so that a caller that holds them on does so with no gap.
    callers: dict[int, Any] = {signal.SIGINT: old_int, signal.SIGTERM: old_term}
    try:
        run_id = store.create_run(mode, 1, chain_id=job.chain_id)
        store.counts_for_run = run_id
        t0 = time.perf_counter()  # as the run's row counts it: planning included
        totals_box: dict[str, Any] = {}
        state = "done"
        def start() -> int:
            """Plan (or join) and say so; returns the run's open batches."""
            batches, refs, joined, totals_box["refs_before"] = _plan(store, job, run_id)
            emit(RunStarted(run_id, mode, 1, os.cpu_count() or 1, batches, refs, joined))
            return batches

        try:
            _release_dead_local_owners(store, emit)
            finish_left_redecodes(store, None, emit)
            if _needs_node(store, job):  # the node is checked first, then the plan written
                asyncio.run(_tracked(term, lambda: _in_process(job, store, emit, sequential, totals_box,
                                                               run_id, start, t0)))
            else:  # the gap is empty or all failed for good: no node is asked anything
                start()
            if term.fired:  # stopped by SIGTERM, even if the last batch ended meanwhile
                state = "interrupted"
        except KeyboardInterrupt:  # CommitUnknown too: a second signal in a commit (PostgreSQL)
            state = "interrupted"
        except BaseException as exc:
            if not (isinstance(exc, asyncio.CancelledError) and term.fired):  # SIGTERM, SIGINT ignored
                # The node or the database failed for good, or anything else (a bug, an
                # OSError): the run says so (and why), the plan stays open, and the row keeps
                # what was committed before. It stayed `running` where the error was not gapfill's.
                held.hold(callers)
                with contextlib.suppress(GapfillError):  # the database may be what failed
                    store.finish_run(run_id, "failed", totals_box.get("calls", 0), note=_note(job, exc))
                raise
            state = "interrupted"
        finally:
            held.hold(callers)
            # A lease this process still holds (a lease answer lost on Ctrl+C, a give-back
            # cut short) goes back now: batch mode has no coordinator to return it, and a
            # rerun would wait for it to expire. A stop's is no failed attempt (a failed run's is:
            # its state is still "done" here, as it raised).
            with contextlib.suppress(GapfillError):
                store.release_owner(owner_name("w0", run_id), "run stopped", stop=state == "interrupted")
            with contextlib.suppress(GapfillError):  # the database may be what failed: the next run does it
                finish_left_redecodes(store, run_id, emit)
            fill_block_numbers(store, job.targets)
        secs = time.perf_counter() - t0
        processed, failed, calls, recorded = store.finish_run(run_id, state, totals_box.get("calls", 0))
        secs = _as_recorded(secs, recorded)
        permanent = permanent_failures(store, job.targets)
        behind, head = refs_beyond_head(store, job.targets)
        arrived = refs_arrived(store, job.targets, totals_box.get("refs_before")) if state == "done" else 0
        seq = recorded_sequential_rate(store, rate_limit(job)) if not sequential else None
        summary = RunSummary(
            run_id, mode, 1, processed, failed, permanent, secs, processed / secs if secs > 0 else 0.0,
            calls, calls / processed if processed else 0.0, state,
            seq[0] if seq else None, seq[1] if seq else "", beyond_head=behind, head=head,
            nothing_left=state == "interrupted" and _nothing_left(store, job), arrived=arrived,
        )  # fmt: skip
        emit(summary)
        if state == "interrupted":
            raise Interrupted("interrupted: rerun the same command to continue where it stopped")
        return summary
    finally:
        held.hold(callers)  # where the run did not start: the caller's SIGTERM handler goes back
        try:
            store.close()  # held too: a Ctrl+C as it closed made a run recorded complete exit 130
        finally:
            if end is None:  # else the caller gives the handlers back once it has said the end
                held.restore()


@dataclass
class _Term:
    """What a signal handler needs to stop work running in an event loop: its main task,
    while it runs (see :func:`_tracked`)."""

    task: asyncio.Task[Any] | None = None
    fired: bool = False

    def cancel(self) -> bool:
        """Cancel the task as the loop's own SIGINT handler would; False if none runs."""
        task = self.task
        if task is None:
            return False
        task.get_loop().call_soon_threadsafe(task.cancel)
        return True


async def _tracked(term: _Term, work: Callable[[], Awaitable[T]]) -> T:
    """``await work()`` with its task in ``term`` for as long as it runs."""
    term.task = asyncio.current_task()
    try:
        return await work()
    finally:
        term.task = None


def _sigterm_as_sigint(term: _Term) -> Any:
    """In the main thread, make SIGTERM (``timeout``, systemd, ``docker stop``) stop an
    in-process run as Ctrl+C does: batches given back, the run marked interrupted. Returns
    the handler to restore, or None where signals cannot be handled (another thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum: int, frame: Any) -> None:
        if callable(signal.getsignal(signal.SIGINT)):
            signal.raise_signal(signal.SIGINT)  # the event loop cancels its main task
            return
        # SIGINT ignored (a script's `cmd &` starts so): raising it would do nothing. Do what
        # the loop's SIGINT handler does, cancel the main task, so the worker gives its
        # batches back from its own await points; outside the loop, plain code is cut.
        term.fired = True
        if not term.cancel():
            raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, on_term)


async def _in_process(
    job: EnrichJob, store: Store, emit: Emit, sequential: bool, box: dict[str, Any], run_id: int,
    start: Callable[[], int], t0: float,
) -> None:
    """Check the node, then ``start()`` (plan), then work the open batches. ``box["calls"]``:
    the calls no write of the run counted (the worker's writes count its own)."""
    settings = job.worker
    if sequential:
        settings = replace(settings, sequential=True, batches_in_flight=1)
    async with _client(job, sequential=sequential) as client:
        box["calls"] = 0
        try:
            await _ready(client, emit)
            total_batches = start()
        finally:
            box["calls"] = _rpc_totals(client)[0]
        if not total_batches:  # another run took the last of it meanwhile
            return
        enrichers = _decoder_and_enricher(store, client, job)
        leases = LeaseTally()  # for --metrics-port

        def emit_counted(ev: Event) -> None:
            leases.take(ev)
            emit(ev)

        worker = Worker(0, owner_name("w0", run_id), store, client, enrichers, settings,
                        emit if job.metrics_port is None else emit_counted, job.targets)  # fmt: skip
        metrics = None
        if job.metrics_port is not None:
            from gapfill.engine.metrics import MetricsServer

            def snapshot() -> dict[str, float]:
                t = worker.totals
                calls, retries, limited = _rpc_totals(client)
                return series(t.processed, t.failed, calls, retries, limited, t.batches, 1, 0, leases)

            metrics = MetricsServer(job.metrics_port, snapshot)
            emit(Notice(f"metrics: http://127.0.0.1:{metrics.port}/metrics", quiet_too=True))

        def progress() -> None:
            t = worker.totals
            _, retries, limited = _rpc_totals(client)
            emit(_progress_event(t.batches, max(total_batches, t.batches), 1, t.processed, t.failed,
                                 time.perf_counter() - t0, retries, limited,
                                 worker.fetched_unstored()))  # fmt: skip

        async def tick() -> None:
            """Progress each second (the renderers choose how often to show it)."""
            while True:
                await asyncio.sleep(PROGRESS_EVERY_S)
                progress()

        ticker = asyncio.create_task(tick())
        try:
            await worker.run()
            progress()  # the last word: every batch done
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            box["calls"] = worker.unsaved_calls()  # its writes counted the others (the probe's too)
            if metrics is not None:
                metrics.close()


# -- worker processes ----------------------------------------------------------------------


class _EventSender:
    """A worker's events on their way to its coordinator, through a pipe of their own.

    A thread sends them, so the event loop never waits for a coordinator that has not
    drained the pipe yet. The coordinator holds the pipe's only read end, so once it is
    dead a send fails (EPIPE) and the rest are dropped: a ``multiprocessing.Queue`` gives
    every process the read end too, and a worker whose queue was full when its coordinator
    died blocked at exit flushing it, forever (and kept the fork server alive).
    """

    def __init__(self, conn: Connection, who: str) -> None:
        from multiprocessing.reduction import ForkingPickler

        self._dumps = ForkingPickler.dumps
        self._conn = conn
        self._who = who  # how its notices name the worker: "Worker-1"
        self._queue: queue_mod.SimpleQueue[Event | None] = queue_mod.SimpleQueue()
        self._thread = threading.Thread(target=self._send, name="gapfill-events", daemon=True)
        self._thread.start()

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def _send(self) -> None:
        while (event := self._queue.get()) is not None:
            try:
                self._conn.send_bytes(self._pickled(event))
            except OSError:  # the coordinator is gone: nobody will read the rest
                return

    def _pickled(self, event: Event) -> memoryview:
        """``event`` as the pipe carries it, or a notice that it could not be: an event that
        does not pickle (a bug) must not end this thread, which would leave every later
        event of the worker queued, unsent, and the coordinator blind to it."""
        try:
            return self._dumps(event)
        except Exception:  # whatever pickling raises: nothing was written to the pipe yet
            name = type(event).__name__
            log.warning("[%s] could not send a %s event to the coordinator", self._who, name, exc_info=True)
            said = f"[{self._who}] a {name} event could not be sent to the coordinator and was dropped"
            return self._dumps(Notice(f"{said}: the run's progress and counts may miss it"))

    def close(self) -> None:
        """Send what is queued (unless the coordinator is gone), then close the pipe."""
        self._queue.put(None)
        self._thread.join()
        self._conn.close()


class _LogToCoordinator(logging.Handler):
    """A worker process's log records, sent to its coordinator with its events (see
    :class:`gapfill.engine.events.Logged`), each naming the worker."""

    def __init__(self, sender: _EventSender, who: str) -> None:
        super().__init__()
        self._sender = sender
        self._who = who

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)  # the message, and the traceback of exc_info
            once = record.getMessage() if getattr(record, "once", False) else ""
            self._sender.put(Logged(record.levelno, record.name, f"[{self._who}] {text}", record.created,
                                    once))  # fmt: skip
        except Exception:
            self.handleError(record)


def _log_through(sender: _EventSender, who: str, level: int) -> None:
    """Log this worker process at ``level`` (the coordinator's) through its event pipe."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_LogToCoordinator(sender, who))
    root.setLevel(max(level, logging.INFO))  # other libraries' DEBUG stays out, as in the CLI
    logging.getLogger("gapfill").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.NOTSET)


def log_here(ev: Logged, said: set[str] | None = None) -> None:
    """A worker's record, handed to this process's handlers as its own records are (the
    worker's time kept). A record logged with ``extra={"once": True}`` (a fact about the
    node each worker finds out) is handed on only if ``said`` does not hold its message
    yet, and added to it: ``-v`` says it once per run, not once per worker."""
    if ev.once and said is not None:
        if ev.once in said:
            return
        said.add(ev.once)
    record = logging.makeLogRecord({
        "name": ev.logger, "levelno": ev.level, "levelname": logging.getLevelName(ev.level),
        "msg": ev.text, "created": ev.created, "msecs": ev.created % 1 * 1000,
    })  # fmt: skip
    logging.getLogger(ev.logger).handle(record)


def worker_process_main(index: int, job: EnrichJob, events: Connection, coordinator: Connection,
                        log_level: int = logging.ERROR) -> None:  # fmt: skip
    """Entry point of a worker process (forked by the coordinator's fork server).

    ``events`` is the write end of this worker's own event pipe, whose read end only the
    coordinator holds. ``coordinator`` is the read end of the coordinator's lifeline
    (:attr:`Coordinator.lifeline`), whose only write end the coordinator holds: it becomes
    readable when the coordinator writes its stop to it (Ctrl+C, SIGTERM) or when the
    coordinator is dead, zombie or not (EOF), and either way the worker stops as on Ctrl+C
    rather than run on unsupervised.

    ``log_level`` is the coordinator's (the CLI's ``-v``, ``-vv``): the worker's records go
    to the coordinator, which writes them with its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides about Ctrl+C
    sender = _EventSender(events, f"Worker-{index + 1}")
    _log_through(sender, f"Worker-{index + 1}", log_level)
    emit = sender.put
    try:
        asyncio.run(_worker_async(index, job, emit, coordinator))
    except NodeUnavailable as exc:
        # Only the start-up check raises it. On a flaky node a patient check still fails all
        # its tries now and then: a crash to restart (within the restart budget), not a lost
        # node. A wrong chain id or a missing method is a plain RpcError, and ends the run.
        emit(WorkerLostNode(index, str(exc), at_start=True))
        raise SystemExit(EXIT_START_FAILED) from None
    except RpcError as exc:  # the node is gone or unusable: restarting would not help
        emit(WorkerLostNode(index, str(exc)))
        raise SystemExit(EXIT_LOST_NODE) from None
    except StoreRefused as exc:  # nor would it here: the run ends with what to fix
        emit(WorkerRefused(index, exc.what, exc.fix))
        raise SystemExit(EXIT_REFUSED) from None
    except GapfillError as exc:
        emit(Notice(f"[Worker-{index + 1}] {exc}"))
        raise SystemExit(1) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise SystemExit(0) from None
    finally:
        sender.close()


async def _worker_async(index: int, job: EnrichJob, emit: Emit, coordinator: Connection) -> None:
    with _sigterm_cancels_main():
        await _worker_body(index, job, emit, coordinator)


@contextlib.contextmanager
def _sigterm_cancels_main() -> Iterator[None]:
    """SIGTERM (after the grace period) cancels the running loop's main task, which abandons
    in-flight batches; SIGTERMs after the block are ignored.

    Only one cancel: the coordinator repeats SIGTERM, and a second cancel would cut the
    give-backs. A plain ``signal.signal`` handler, not the loop's ``add_signal_handler``:
    the loop's ``remove_signal_handler`` restores SIG_DFL before anything else can be set,
    and a SIGTERM then killed the worker before its last events were sent, through any
    other thread (its events sender, the executor's resolvers), which blocking it in this
    one did not cover; and the loop closes its wakeup pipe before it removes its handlers,
    so a SIGTERM in between made Python print "Exception ignored when trying to write to
    the signal wakeup fd" and a traceback on the user's terminal. Here SIGTERM goes from
    this handler to ignored in one step, inside the block, and the wakeup fd is this
    block's own, unset before it is closed. The worker is on its way out by then, and a
    worker stuck on it still gets the SIGKILL.

    So nothing inside the block may use ``loop.add_signal_handler``: the loop's handlers are
    run from the bytes of its own wakeup fd, which this block's replaces and whose bytes
    :func:`_drain` throws away, so they would never run; and the block's end would put back
    the fd it found, whatever the loop had set meanwhile. Entered with a wakeup fd already
    set (a loop's handler, another such block), it raises ``RuntimeError`` and changes nothing.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    ended = False

    def cancel_once() -> None:
        if not ended and not main.cancelling():
            main.cancel()

    def on_term(signum: int, frame: Any) -> None:
        # Python runs it in the main thread (the loop's) between two bytecodes, perhaps in
        # the middle of the loop's own code: the cancel is left to the loop, as a callback.
        loop.call_soon_threadsafe(cancel_once)

    # A SIGTERM that another thread takes interrupts no wait of the main thread: the byte
    # Python writes to the wakeup fd wakes the loop, and the handler runs on its way.
    wake, wake_w = socket.socketpair()
    with wake, wake_w:
        wake.setblocking(False)
        wake_w.setblocking(False)
        previous = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        if previous != -1:
            signal.set_wakeup_fd(previous)
            raise RuntimeError(
                f"a signal wakeup fd ({previous}) is set already: _sigterm_cancels_main would drop "
                "what the signals write to it (loop.add_signal_handler handlers never run)"
            )
        try:
            loop.add_reader(wake, _drain, wake)
            signal.signal(signal.SIGTERM, on_term)
            yield
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # runs a pending handler first
            ended = True  # and so its cancel, should it come after the block, does nothing
            signal.set_wakeup_fd(previous)
            loop.remove_reader(wake)


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # empty (BlockingIOError), or closed
        sock.recv(4096)


async def _open_for_worker(index: int, job: EnrichJob, emit: Emit, coordinator: Connection) -> Store | None:
    """The worker's store. A first connection that finds no slot free on the server (its
    coordinator's found one) is tried again for ``no_slot_wait_s`` (other clients may leave),
    then refused: the run ends with the sentence that says what to do. None: the run stopped
    while it waited (Ctrl+C), which is no refusal to say. The wait is said to the coordinator
    (:class:`WorkerWaitsForSlot`), which stops the worker (SIGTERM) if the other workers
    finish the plan meanwhile."""
    wait_s = job.worker.no_slot_wait_s
    deadline: float | None = None
    while True:
        try:
            return open_store(job.db_url, check=job.db_check, app=f"{_app(job)} worker {index + 1}")
        except StoreNoSlot as exc:
            now = time.monotonic()
            if deadline is None:
                deadline = now + wait_s
                if wait_s > 0:
                    emit(WorkerWaitsForSlot(index, os.getpid(), exc.what, wait_s))
            if coordinator.poll():  # the run stops meanwhile: this worker has nothing to do
                return None
            if now >= deadline:
                raise StoreRefused(exc.what, exc.fix) from None
            await asyncio.sleep(min(0.5, deadline - now))


async def _worker_body(index: int, job: EnrichJob, emit: Emit, coordinator: Connection) -> None:
    store = await _open_for_worker(index, job, emit, coordinator)
    if store is None:
        return
    store.counts_for_run = job.run_id
    try:
        async with _client(job) as client:
            await _ready(client)
            enrichers = _decoder_and_enricher(store, client, job)
            worker = Worker(index, owner_name(f"w{index + 1}", job.run_id), store, client, enrichers,
                            job.worker, emit, job.targets)  # fmt: skip
            # Stopped while this worker started (Ctrl+C as it was spawned): it leases nothing,
            # where the watcher below would see the stop only after a first lease.
            worker.stopping = coordinator.poll()

            async def watch_stop() -> None:
                # The coordinator's stop, or the coordinator gone (SIGKILL, OOM): it can no
                # longer supervise, so no new leases; in-flight batches finish or are given
                # back. The lifeline is readable in both cases: the stop written to it (and
                # never read, so every worker sees it), or EOF, its write end closed by the
                # kernel when the coordinator died (a pid check took a zombie for alive).
                while not coordinator.poll():
                    await asyncio.sleep(0.2)
                worker.stopping = True

            watcher = asyncio.create_task(watch_stop())
            try:
                await worker.run()
            finally:
                watcher.cancel()
    finally:
        store.close()


# -- the coordinator -----------------------------------------------------------------------


@dataclass
class _Slot:
    index: int
    proc: BaseProcess
    started: float
    restarts: int = 0
    stats: WorkerStats | None = None
    base_calls: int = 0
    base_retries: int = 0
    base_limited: int = 0
    #: Sent SIGTERM by the coordinator (the grace period's end, a lost node, no batch open for
    #: it as it waits for a connection slot): a worker that dies of it had not set its handler
    #: yet (still starting), which is no crash to report or restart (:meth:`Coordinator._stopped_here`).
    #: The worker running now's: a restart clears it.
    terminated: bool = False
    #: Killed by the coordinator for holding a lease past its expiry (its RPC calls made
    #: no progress): said as such, not as a crash.
    stuck: bool = False
    #: The pid of the worker process that said it waits for a connection slot
    #: (:class:`WorkerWaitsForSlot`) and sent no stats since: it is that one while ``proc`` is.
    no_slot_pid: int = 0
    #: The pid of the worker process whose exit 0 was looked at (:meth:`Coordinator._ended_early`).
    ended_pid: int = 0

    def waits_for_slot(self) -> bool:
        """Whether the worker running now said it waits for a connection slot and sent no
        stats since (it may have found one, and be starting)."""
        return self.no_slot_pid == self.proc.pid and self.proc.is_alive()


class Coordinator:
    """Spawns and supervises worker processes; aggregates their events."""

    def __init__(self, job: EnrichJob, emit: Emit) -> None:
        import multiprocessing as mp

        self.job = job
        self.emit = emit
        self.workers = job.workers or default_workers()
        # Workers fork from a server process that imported the engine once: a spawned
        # worker would import everything again (~0.4 CPU s each, on the node's cores).
        self.ctx = mp.get_context("forkserver")
        # Its preload is set by forkserver.start (in _run() once it finds work to lease, or
        # earlier by the CLI), before the server or any worker starts.
        # Pipes only, no multiprocessing.Queue or Event: those are named semaphores that this
        # process creates and unlinks at its exit, so a kill -9 left them to the resource
        # tracker, which warned of "leaked semaphore objects" on the terminal.
        # The read ends of the workers' event pipes (one each, a restarted worker's too),
        # until they read EOF: a dead worker's last events are read before that.
        self.events: list[Connection] = []
        # The workers' lifeline: each gets the read end (sent through the fork server, which
        # closes its copy once it forked); the write end never leaves this process (pipes are
        # not inherited by the processes it spawns), so when it dies, even as a zombie its
        # parent has not reaped, the kernel closes the write end and every worker reads EOF.
        # Its stop (the first Ctrl+C or SIGTERM) is written to it, and read by nobody.
        self.lifeline, self._lifeline_w = self.ctx.Pipe(duplex=False)
        self.slots: dict[int, _Slot] = {}
        #: Held by the main thread while it adds a slot or moves a restarted worker's stats into
        #: its base counters, and by :meth:`totals`: a --metrics-port scrape (its HTTP thread)
        #: iterating the slots met "dictionary changed size during iteration" during the
        #: spawning, and counted a restarted worker's calls twice (in its base and its stats).
        self._counting = threading.Lock()
        self.stopping_at: float | None = None
        self.interrupts = 0
        #: How far the start went, for what a stop then leaves: the plan written (``planned``)
        #: and the workers being started (``spawning``), which then get the grace period.
        self.planned = self.spawning = False
        self.refs_before: int | None = None  # the targets' refs as it planned (refs_arrived)
        self.restarts = 0
        self.host = owner_host()  # its workers' owner ids name it: owner_name as they run
        self.done_batches = 0
        self.leases = LeaseTally()  # for --metrics-port
        #: The workers alive, as the supervision loop last counted them, for --metrics-port:
        #: its thread must not ask the processes (a forkserver Process reads its exit code from
        #: its sentinel once; two threads reading it raced, and the loser's read 255).
        self.alive_now = 0
        #: The lease events watched for leases taken back (:meth:`_supervise_leases`): after
        #: this event id (None until the run's first workers start), and those already seen.
        self.expired_from: int | None = None
        self.expired_seen: set[int] = set()
        #: The leases a local worker left to expire, their give-back failed
        #: (BatchAbandoned.not_given), as (batch id, lease number): one of them may end without
        #: expiring (the worker's release_owner gave it back after all), and a later lease of
        #: the same batch, another worker's, must not be spared when that one gets stuck.
        self.let_expire: set[tuple[int, int]] = set()
        # What the workers' commits stored, from their per-batch events: a worker killed
        # (stuck, crashed) takes the counters of its last stats message with it.
        self.committed = self.committed_failed = 0
        self.lost_node: dict[int, str] = {}  # worker -> why it stopped (WorkerLostNode)
        self.refused: dict[int, StoreRefused] = {}  # worker -> what its database refused (WorkerRefused)
        self.start_failed: dict[int, str] = {}  # worker -> why its start-up check failed
        # The workers' notices (Notice.once) and log records (`once`) said once per run.
        self.said: set[str] = set()
        self.metrics: Any = None
        #: The start-up sample or node probe, while it runs: a signal cancels it.
        self._start = _Term()
        #: What a signal has to say, said by the main thread (:meth:`_say_unsaid`).
        #: None stands for the stop before any worker started, worded as it is said.
        self._unsaid: list[Notice | None] = []
        self.sample: _Sample | None = None
        #: The calls of the coordinator's node checks, which its ``finish_run`` adds to the
        #: run's (the sample's are written with its rows, the workers' with theirs).
        self.own_calls = 0

    def _spawn(self, index: int) -> BaseProcess:
        reader, writer = self.ctx.Pipe(duplex=False)
        level = logging.getLogger("gapfill").getEffectiveLevel()  # the CLI's -v, -vv
        job = replace(self.job, rpc=shared_in_flight(self.job.rpc, self.workers))
        p = self.ctx.Process(target=worker_process_main,
                             args=(index, job, writer, self.lifeline, level),
                             name=f"gapfill-worker-{index + 1}", daemon=True)  # fmt: skip
        try:
            p.start()  # the write end is with the fork server now: the worker holds the only one
        finally:
            writer.close()
        self.events.append(reader)
        return p

    def _add_slot(self, index: int) -> None:
        slot = _Slot(index, self._spawn(index), time.monotonic())
        with self._counting:  # (not the spawn: a scrape never waits for a fork)
            self.slots[index] = slot

    def _owner(self, slot: _Slot) -> str:
        return run_owner(self.host, slot.proc.pid, f"w{slot.index + 1}", self.job.run_id)

    def _on_signal(self, signum: int, _: Any) -> None:
        """Ctrl+C or SIGTERM: stop (the first), stop at once (the next).

        It writes nothing: a handler runs between two bytecodes of the main thread, which
        may be inside a write to the stream the notice would go to, and the notice written
        there raised "reentrant call inside <_io.BufferedWriter>" (an internal error in
        place of the stop). Its notices wait in ``_unsaid`` for the main thread."""
        self.interrupts += 1
        if self.interrupts == 1:
            self.stopping_at = time.monotonic()
            with contextlib.suppress(OSError):
                self._lifeline_w.send_bytes(b"stop")
            self._start.cancel()  # the sample (its rows are not written) or the probe
            if not self.slots and not self.spawning:  # still starting: no worker to give a grace period to
                self._unsaid.append(None)  # worded when said: a plan being written gets committed
                return
            grace = self.job.grace_period_s
            # --grace-period 0: the workers get SIGTERM at once ("have 0s to finish" said it
            # as a wait); a fraction of a second is said as given, not rounded to 0.
            given = ("the workers are stopped now and give their batches in flight back" if grace <= 0
                     else f"workers have {grace:g}s to finish")  # fmt: skip
            self._unsaid.append(Notice(f"stopping: no new batches; {given} (Ctrl+C again to stop at once)"))
        else:
            if self.stopping_at != -1.0 and self.slots:
                self._unsaid.append(Notice("stopping at once: the workers are killed; their batches go "
                                           "back to the plan"))  # fmt: skip
            for s in self.slots.values():
                with contextlib.suppress(Exception):
                    s.proc.kill()
            self.stopping_at = -1.0  # at once

    def _say_unsaid(self) -> None:
        """Say, from the main thread, the notices of the signals since the last call: it
        calls this after the start-up sample or probe (which a signal cuts short), at each
        turn of its supervision loop (every 0.1 s at most) and as the run ends."""
        while self._unsaid:
            notice = self._unsaid.pop(0)
            if notice is None:  # a stop before any worker started: what it leaves, as it is now
                left = ("nothing is fetched; the open plan stays for the rerun" if self.planned
                        else "nothing is planned or fetched")  # fmt: skip
                notice = Notice(f"stopping: no worker has started yet, so {left}")
            self.emit(notice)
        if self.stopping_at is not None:
            self._say_refused()  # one kept for the run's error before the stop came

    def _say_refused(self) -> None:
        """While stopping: each worker's database refusal, or node lost, not said yet, as its
        notice.

        Each is kept for the run's error, which the supervision loop raises when it sees
        that worker's exit code; a stop (Ctrl+C) ends the run as interrupted whatever its
        workers exit with, so one that comes during the stop, or that was kept before the
        stop came and the loop saw the exit, would never be said, and the rerun would meet
        it unwarned."""
        kept = [*self.refused.items(), *self.lost_node.items()]
        for index, refused in sorted(kept, key=itemgetter(0)):
            text = f"[Worker-{index + 1}] {refused}"
            if text not in self.said:
                self.said.add(text)
                self.emit(Notice(text, quiet_too=True))  # what to fix: a -q run says it too

    def _cancellable(self, work: Callable[[], Awaitable[T]]) -> T | None:
        """Run ``work()`` in an event loop that a Ctrl+C or SIGTERM cancels (see
        :meth:`_on_signal`); None when it was, or when a signal came before its task was there
        to cancel (the sample ran its whole budget after a stop during the look-up of a
        recorded sequential rate, then wrote its rows)."""

        async def unless_stopped() -> T | None:
            # Its task is in ``_start`` by now: a signal from here on cancels it.
            return None if self.stopping_at is not None else await work()

        try:
            return asyncio.run(_tracked(self._start, unless_stopped))
        except asyncio.CancelledError:
            return None
        finally:
            self._say_unsaid()

    def totals(self) -> tuple[int, int, int, int, int]:
        """Processed and failed as the batch events count them (a worker sends its stats
        after the events they count, through the same pipe, so the events are never behind);
        calls, retries and 429s from the stats, which a killed worker's last second misses."""
        processed, failed = self.committed, self.committed_failed
        calls = retries = limited = 0
        with self._counting:
            for s in self.slots.values():
                calls += s.base_calls
                retries += s.base_retries
                limited += s.base_limited
                if s.stats is not None:
                    calls += s.stats.calls
                    retries += s.stats.retries
                    limited += s.stats.rate_limited
        if self.sample is not None:  # its rows are this run's too
            processed += self.sample.processed
            failed += self.sample.failed
            calls += self.sample.calls
        return processed, failed, calls + self.own_calls, retries, limited

    def _drain(self) -> None:
        for conn in list(self.events):
            try:
                while conn.poll():
                    self._take(conn.recv())
            except (EOFError, OSError):  # its worker has exited, and every event of it is read
                self.events.remove(conn)
                conn.close()

    def _take(self, ev: Event) -> None:
        if isinstance(ev, Logged):
            log_here(ev, self.said)
            return
        if isinstance(ev, WorkerStats):
            slot = self.slots.get(ev.worker)
            if slot is not None and slot.proc.pid == ev.pid:
                slot.stats = ev
                slot.no_slot_pid = 0  # it is working: it found a connection slot
        self.leases.take(ev)
        if isinstance(ev, BatchDone) and ev.committed:
            self.done_batches += 1
            self.committed += ev.stored
            self.committed_failed += ev.failed
        if isinstance(ev, BatchesEmptied):
            self.done_batches += ev.count
        if isinstance(ev, BatchAbandoned):
            if ev.closed:
                self.done_batches += 1
            if ev.not_given and ev.not_given != LEASE_GONE:
                self.let_expire.add((ev.batch_id, ev.lease))
            self.committed += ev.kept_new
            self.committed_failed += ev.kept_failed
        if isinstance(ev, WorkerLostNode):
            (self.start_failed if ev.at_start else self.lost_node)[ev.worker] = ev.message
            if self.stopping_at is not None and not ev.at_start:
                self._say_refused()
            return  # else the run's error, or the restart's notice, says it
        if isinstance(ev, WorkerWaitsForSlot):
            slot = self.slots.get(ev.worker)
            if slot is not None:
                slot.no_slot_pid = ev.pid
            self.emit(Notice(f"[Worker-{ev.worker + 1}] {ev.what}: waiting up to {ev.wait_s:g} s for one",
                             waiting=True))  # fmt: skip
            return
        if isinstance(ev, WorkerRefused):
            self.refused[ev.worker] = StoreRefused(ev.what, ev.fix)
            if self.stopping_at is not None:
                self._say_refused()
            return  # else the run's error says it
        if isinstance(ev, Notice) and ev.once:
            if ev.text in self.said:
                return
            self.said.add(ev.text)
        self.emit(ev)

    def run(self, end: HeldSignals | None = None) -> RunSummary:
        """The run; ``end``: see :func:`run_enrich`."""
        held = end if end is not None else HeldSignals()
        try:
            return self._run(held)
        finally:
            if end is None:  # else the caller gives the handlers back once it has said the end
                held.restore()

    def _run(self, end: HeldSignals) -> RunSummary:
        from multiprocessing.connection import wait as wait_for_ready

        job = self.job
        # Until its workers start it is the run's only writer: a lock it waits for is
        # another process's, and said; afterwards its waits are on its workers' commits.
        store = _open(job, self.emit)
        old_int = signal.signal(signal.SIGINT, self._on_signal)
        old_term = signal.signal(signal.SIGTERM, self._on_signal)
        t0 = time.perf_counter()
        run_id = 0
        why: str | None = None  # the sentence a failed run ends with, kept in its note
        state = "done"
        seq: tuple[float, str] | None = None
        ended = False  # the supervision ended as it should, not by an exception
        try:
            mode = "concurrent" if job.plan_new else "worker"
            run_id = store.create_run(mode, self.workers, chain_id=job.chain_id)
            store.counts_for_run = run_id  # the start-up sample's rows
            self.job = job = replace(job, run_id=run_id)  # and the workers'
            work = self.stopping_at is None and _needs_node(store, job)
            if work:  # (with none, no worker starts: the server's start and import are waste)
                # Start the workers' fork server now: its import of the engine (~0.3 s) then
                # overlaps the node's check and the planning instead of delaying the first worker.
                self._start_server()
            _release_dead_local_owners(store, self.emit)
            finish_left_redecodes(store, None, self.emit)
            # One probe here, before anything is planned (or sampled), fails fast with one
            # sentence (unreachable node, wrong chain, a method missing) instead of a crash
            # loop of workers that each find out, and leaves no open plan behind. The
            # endpoints it leaves out (a hung one) are left out of the sample's and the
            # workers' clients, so that none waits the probe grace for them again.
            probed = work and self.stopping_at is None and self._check_node()
            job = self.job
            # A Ctrl+C before the plan plans nothing, and says no start: "Run #N: ... 0 open
            # batches, 0 refs newly planned" after "stopping:" read as a run starting with
            # nothing to do (the in-process modes say it after planning too). The plan comes
            # before the start-up sample, so that it overlaps the fork server's import, which
            # the sample waits for (planning 32,000 refs took 0.13-0.38 s on PostgreSQL); a
            # Ctrl+C during the sample leaves it open for the rerun, as any later one does.
            if self.stopping_at is None:
                batches, refs, joined, self.refs_before = _plan(store, job, run_id)
                self.planned = True
                self.emit(RunStarted(run_id, mode, self.workers, os.cpu_count() or 1, batches, refs, joined))
            if job.plan_new and self.stopping_at is None:
                seq = recorded_sequential_rate(store, rate_limit(job))
                if seq is None and job.measure_sequential:
                    self.sample = self._cancellable(lambda: _measure_sequential(job, store, self.emit))
                    if self.sample is not None:
                        # The endpoints its probe left out are left out of the workers too.
                        self.job = job = self.sample.job
                        if self.sample.rate > 0:
                            seq = (self.sample.rate, self.sample.why)
                        if self.sample.processed and not any(store.has_gap(c, a) for c, a in job.targets):
                            # It took the whole gap: planning again closes the batches it
                            # emptied, and no worker starts to lease them for nothing.
                            store.plan(run_id, job.targets, job.batch_size)
            if job.metrics_port is not None:
                from gapfill.engine.metrics import MetricsServer

                self.metrics = MetricsServer(job.metrics_port, self._metrics_snapshot)
                self.emit(Notice(f"metrics: http://127.0.0.1:{self.metrics.port}/metrics", quiet_too=True))
            # Only the targets' batches: a worker leases on its node's chain alone, and
            # counting another chain's open plan kept restarting workers that found nothing.
            total_batches = store.count_open_batches(job.targets)
            # With nothing open, no worker starts and no node is asked anything; nor after a
            # Ctrl+C during the start (the run ends at once, as interrupted).
            if total_batches and self.stopping_at is None:
                if not probed:  # a plan opened by another run since the check above
                    self._start_server()
                    self._check_node()
                    job = self.job
                if self.stopping_at is None:
                    store.notice = None
                    self.expired_from = store.expired_after(2**62)[0]  # from now on
                    # A stop while a worker is being started (the fork server's import takes
                    # ~0.3 s) starts no more; those started see the stop and lease nothing.
                    self.spawning = True
                    for i in range(self.workers):
                        if self.stopping_at is not None:
                            break
                        self._add_slot(i)
            last_progress = last_expiry = last_no_slot = 0.0
            db_down_since: float | None = None
            while True:
                self._say_unsaid()
                self._drain()
                now = time.monotonic()
                try:
                    alive = [s for s in self.slots.values() if s.proc.is_alive()]
                    self.alive_now = len(alive)
                    for s in list(self.slots.values()):
                        if s.proc.is_alive() or s.proc.exitcode is None:
                            continue
                        # Nor a worker that died of the SIGTERM this process sent it (no batch
                        # left open for one waiting for a connection slot) before its handler
                        # was set: it was restarted as a crash, again and again while none opened.
                        if s.proc.exitcode == 0 or self.stopping_at is not None or self._stopped_here(s):
                            if s.proc.exitcode == 0 and self._ended_early(store, s):
                                self._restart(store, s)
                            continue
                        if s.proc.exitcode == EXIT_LOST_NODE:
                            self._stop_workers()
                            raise RpcError(self.lost_node.get(s.index)
                                           or "a worker lost the RPC node: check it, then rerun")
                        if s.proc.exitcode == EXIT_REFUSED:  # stopped below, as for its own refusal
                            self._drain()  # its last event says what
                            raise self.refused.get(s.index) or StoreRefused(
                                "the database refused a worker's writes", "check it, then rerun")
                        self._restart(store, s)
                    if self.stopping_at is not None:
                        if not alive:
                            break
                        waited = now - self.stopping_at if self.stopping_at >= 0 else 1e9
                        if waited > job.grace_period_s:
                            for s in alive:
                                s.terminated = True
                                s.proc.terminate()
                        if waited > job.grace_period_s + 5:
                            for s in alive:
                                s.proc.kill()
                    elif not any(s.proc.is_alive() for s in self.slots.values()):
                        # (``alive`` predates the restarts above: a worker restarted there is running.)
                        if store.has_open_batches(job.targets):
                            # Workers left while work remains (e.g. they could not start): retry once more.
                            for s in list(self.slots.values()):
                                self._restart(store, s)
                        else:
                            break
                    waiting = [s for s in alive if s.waits_for_slot()]
                    # Each second, and at once when no running worker has a connection (the
                    # last one that had just ended, say): nothing open, nothing to wait for.
                    look_every = 0.2 if len(waiting) == len(alive) else 1.0
                    if waiting and self.stopping_at is None and now - last_no_slot > look_every:
                        last_no_slot = now
                        if not store.has_open_batches(job.targets):
                            self._stop_waiting(waiting)
                    if now - last_expiry > 1.0:
                        last_expiry = now
                        self._supervise_leases(store)
                        db_down_since = None
                    if now - last_progress > PROGRESS_EVERY_S:
                        last_progress = now
                        self._progress(store, total_batches, len(alive), t0)
                except StoreError as exc:
                    if isinstance(exc, StoreRefused):
                        # A read-only database, a full disk, a missing grant: no wait lets it
                        # pass, and restarted workers would each meet it. The workers give their
                        # batches back where the database still takes that; the run ends with
                        # what to fix.
                        self._stop_workers()
                        raise
                    # A dropped connection (server restart, pg_terminate_backend) must not end
                    # the run: the store reconnects on its next call. Give up after a long outage.
                    if db_down_since is None:
                        db_down_since = now
                        self.emit(db_retrying(exc))
                    elif now - db_down_since > DB_OUTAGE_S:
                        raise
                # Wake up as soon as a worker exits (the last one ends the run), else every 0.1 s.
                running = [s.proc.sentinel for s in self.slots.values() if s.proc.exitcode is None]
                if running:
                    wait_for_ready(running, timeout=0.1)
                else:
                    time.sleep(0.1)
            self._drain()
            if self.stopping_at is None and self.slots:  # the last word: where the plan ended
                with contextlib.suppress(StoreError):
                    self._progress(store, total_batches, 0, t0)
            for s in self.slots.values():
                s.proc.join(timeout=5)
                killed = self._stopped_here(s)
                self.emit(WorkerExited(s.index, s.proc.pid or 0, s.proc.exitcode, False, killed))
                if s.proc.exitcode not in (0, None):
                    # Killed by the stop (a second Ctrl+C, the grace period's end): its leases
                    # go back as a stop gives them, no failed attempt. A database blip here
                    # leaves them to expire; the run ended as it did, as with the progress above.
                    with contextlib.suppress(StoreError):
                        store.release_owner(self._owner(s), "worker stopped",
                                            stop=self.stopping_at is not None)  # fmt: skip
            if self.stopping_at is not None:
                state = "interrupted"
            ended = True
        except KeyboardInterrupt:
            # A second signal during a commit of this thread (CommitUnknown, PostgreSQL's: the
            # plan's, a lease expiry's, a restart's give-back): a stop at once, as in the
            # in-process modes. Before the run's row exists there is nothing to record.
            if not run_id:
                raise
            state = "interrupted"
        except BaseException as exc:
            # The node or the database failed for good, or anything else (a bug, an OSError
            # spawning a worker): recorded as failed, and why. It was recorded `done`.
            state = "failed"
            why = _note(job, exc)
            raise
        finally:
            # Until run() returns, a signal no longer stops workers (they have stopped or
            # are killed below) but is held: the run's end is recorded whole.
            end.hold({signal.SIGINT: old_int, signal.SIGTERM: old_term})
            for s in self.slots.values():
                still_running = s.proc.is_alive()
                if still_running:  # the run failed: its leases go back at once, not at expiry
                    s.proc.kill()
                    s.proc.join(timeout=5)
                # A worker stopped as the run failed may have stopped with a lease whose answer
                # its cancel cut short (a lost node stops them all), and one that crashed may
                # not have been restarted (its leases given back) before the run ended: theirs
                # go back too.
                if still_running or not ended:
                    why_back = "run failed" if state == "failed" else "run stopped"
                    with contextlib.suppress(GapfillError):  # the database may be what failed
                        store.release_owner(self._owner(s), why_back, stop=state != "failed")
            forkserver.stop()
            if self.metrics is not None:
                self.metrics.close()
            # After the workers' clean-up, which a failing write of a notice must not skip.
            self._say_unsaid()
            if run_id:  # every worker has exited: no stale decoder writes after this
                with contextlib.suppress(GapfillError):  # else the next run does it
                    finish_left_redecodes(store, run_id, self.emit)
                fill_block_numbers(store, job.targets)
            secs = time.perf_counter() - t0
            processed, failed, calls, _, _ = self.totals()
            if run_id:
                with contextlib.suppress(GapfillError):  # else the events' count stands
                    processed, failed, calls, recorded = store.finish_run(run_id, state, self.own_calls,
                                                                          note=why)  # fmt: skip
                    secs = _as_recorded(secs, recorded)
            permanent, behind, head, nothing_left, arrived = 0, 0, None, False, 0
            with contextlib.suppress(GapfillError):
                permanent = permanent_failures(store, job.targets)
                behind, head = refs_beyond_head(store, job.targets)
                nothing_left = state == "interrupted" and _nothing_left(store, job)
                arrived = refs_arrived(store, job.targets, self.refs_before) if state == "done" else 0
            store.close()
            for conn in self.events:
                conn.close()
            self.lifeline.close()
            self._lifeline_w.close()
        rate = processed / secs if secs > 0 else 0.0
        summary = RunSummary(
            run_id, "concurrent" if job.plan_new else "worker", self.workers, processed, failed,
            permanent, secs, rate, calls, calls / processed if processed else 0.0, state,
            seq[0] if seq else None, seq[1] if seq else "", self.restarts,
            beyond_head=behind, head=head, nothing_left=nothing_left, arrived=arrived,
        )  # fmt: skip
        self.emit(summary)
        if state == "interrupted":
            raise Interrupted("interrupted: rerun the same command to continue where it stopped")
        return summary

    def _stop_workers(self) -> None:
        """A worker lost the node (none replies, or every one refuses the API key), or the
        database refuses the run's work (:class:`StoreRefused`): the others would meet it too.
        Stop them as the grace period's SIGTERM does, so each gives its batches
        back with what it fetched, for at most ``LOST_NODE_STOP_S``; the run's end kills and
        releases any still running. Their events are read meanwhile: a worker sends the last
        ones as it exits, and one with more than a pipe holds (64 KiB) waited for this one
        to read them until it was killed, its last events lost."""
        from multiprocessing.connection import wait

        for s in self.slots.values():
            if s.proc.is_alive():
                s.terminated = True
                with contextlib.suppress(Exception):
                    s.proc.terminate()
        deadline = time.monotonic() + LOST_NODE_STOP_S
        while (left := deadline - time.monotonic()) > 0:
            running = [s.proc.sentinel for s in self.slots.values() if s.proc.is_alive()]
            if not running:
                break
            wait([*running, *self.events], timeout=left)  # an exit, or events to read
            self._drain()
        self._drain()

    def _start_server(self) -> None:
        """Start the workers' fork server (if it is not running: the CLI may have started it)."""
        forkserver.start(self.job.db_url, any_may_use_tls(e.url for e in self.job.endpoints))

    def _stop_waiting(self, waiting: list[_Slot]) -> None:
        """The plan has no open batch left: the workers still waiting for a connection slot
        have nothing to do. Stop them (SIGTERM: one still waiting exits at once, one that has
        just connected leases nothing) rather than wait for their wait's end, which ended a
        plan done by the other workers as failed, with the no-slot refusal."""
        for s in waiting:
            log.info("Worker-%d (pid %s) stops waiting for a connection slot: no batch of the plan is "
                     "left open", s.index + 1, s.proc.pid)  # fmt: skip
            self.emit(Notice(f"[Worker-{s.index + 1}] stops waiting for a connection slot: the other "
                             "workers finished the plan"))  # fmt: skip
            s.no_slot_pid = 0
            s.terminated = True
            with contextlib.suppress(Exception):
                s.proc.terminate()

    def _stopped_here(self, s: _Slot) -> bool:
        """Whether the slot's worker, exited, died of a signal this process sent it, which is no
        crash to restart or report: the SIGKILL of a second Ctrl+C (said once, as it came), or
        the SIGTERM of :meth:`_stop_waiting`, of the grace period's end or of
        :meth:`_stop_workers` (``terminated``) to a worker still starting, before its handler
        was set (:func:`_sigterm_cancels_main`). A SIGTERM from outside the run, to a slot this
        process did not stop, is a crash."""
        code = s.proc.exitcode
        return (self.stopping_at == -1.0 and code == -signal.SIGKILL) or (
            s.terminated and code == -signal.SIGTERM)

    def _ended_early(self, store: Store, s: _Slot) -> bool:
        """Whether the worker that exited 0 left batches open, the run not stopping, nor the
        coordinator having stopped it: its own end comes once none is open (it waits while
        other workers hold the last ones), so it was stopped from outside the run (a SIGTERM
        to its pid, which it takes for a stop: it gives its batches back and exits 0), and
        the run went on one worker short. Looked at once per process."""
        if self.stopping_at is not None or s.terminated or s.ended_pid == s.proc.pid:
            return False
        s.ended_pid = s.proc.pid or 0
        return store.has_open_batches(self.job.targets)

    def _restart(self, store: Store, s: _Slot) -> None:
        owner = self._owner(s)
        code = s.proc.exitcode
        n = store.release_owner(owner, f"worker exited with code {code}")
        self._drain()  # its last events first: they may end leases it held
        self.leases.worker_gone(s.index)
        if s.stats is not None and s.stats.pid == s.proc.pid:
            with self._counting:
                s.base_calls += s.stats.calls
                s.base_retries += s.stats.retries
                s.base_limited += s.stats.rate_limited
                s.stats = None
        start_failed = None
        if code == EXIT_START_FAILED:
            self._drain()  # its last event may have come in after the loop's drain
            start_failed = self.start_failed.pop(s.index, None)
            # The node is checked from here too: on a flaky node this (patient) check
            # passes and the worker is restarted; a node gone for the coordinator too ends
            # the run at once (NodeUnavailable), not after the restart budget.
            if start_failed is not None and not self._check_node():
                return  # a Ctrl+C during the check: the run stops
        stuck, s.stuck = s.stuck, False
        # Stopped by this process as it waited for a connection slot, no batch being open (the
        # loop restarts every slot once all have ended while batches are open again): no crash,
        # said as what it was and not counted against the restart budget.
        stopped_here = self._stopped_here(s)
        if not stopped_here and self.restarts >= 10 * self.workers:
            if start_failed is not None:  # the node kept failing the workers' start-up checks
                raise NodeUnavailable(start_failed)
            if stuck:  # -v would not say more: the node is too slow for the lease timeout
                raise GapfillError(
                    f"workers keep getting stuck ({self.restarts} restarts): they renewed no lease "
                    f"for the lease timeout ({self.job.worker.lease_timeout_s:g} s), their RPC calls "
                    "(or a database write) making no progress: check the RPC node and the database, "
                    "or raise --lease-timeout, then rerun to continue"
                )
            raise GapfillError(
                f"workers keep crashing ({self.restarts} restarts): rerun with -v to see why"
            )
        if not stopped_here:
            self.restarts += 1
            s.restarts += 1
        self.emit(WorkerExited(s.index, s.proc.pid or 0, code, True, stopped_here))
        why = (f"its start-up check of the RPC node failed ({start_failed})" if start_failed
               else "was killed, stuck past its lease" if stuck
               else "was stopped while no batch was open, and batches are open again" if stopped_here
               else "stopped from outside the run (a SIGTERM, say) while batches are still open" if code == 0
               else f"exited with code {code}")  # fmt: skip
        log.info("restarting Worker-%d (pid %s, up %.1f s): %s; %d lease(s) returned; restart %d of the "
                 "run (at most %d)", s.index + 1, s.proc.pid, time.monotonic() - s.started, why, n,
                 self.restarts, 10 * self.workers)  # fmt: skip
        self.emit(Notice(f"[Worker-{s.index + 1}] {why}; restarted"
                         + (f", {n} batch(es) returned to the plan" if n else "")))  # fmt: skip
        s.proc = self._spawn(s.index)
        s.started = time.monotonic()
        s.terminated = False  # the worker stopped was the old one: this one may end early, or crash

    def _check_node(self) -> bool:
        """The node's start-up check, from the coordinator (it raises what fails it); the
        endpoints it leaves out are left out of the clients made after it. False when a
        Ctrl+C cancelled it."""
        job = self.job
        checked = self._cancellable(lambda: _probe(job, self.emit, self._count_own_calls))
        if checked is None:
            return False
        self.job = checked
        return True

    def _count_own_calls(self, calls: int) -> None:
        self.own_calls += calls

    def _supervise_leases(self, store: Store) -> None:
        """Take back expired leases; kill a local worker that held one (it is stuck)."""
        took_back: set[int] = set()
        for b in store.expire_leases():
            took_back.add(b.id)
            self.leases.took_back(b.id)
            log.info("lease of batch %d (attempt %d, lease %d) held by %s expired; taken back", b.id,
                     b.tries, b.attempts, b.lease_owner)  # fmt: skip
            self.emit(Notice(f"lease of batch {b.id} held by {shown_owner(b.lease_owner or '')} expired; "
                             "it goes back to the plan"))  # fmt: skip
            self._kill_stuck(b.lease_owner or "", b.id, b.attempts)
        # A worker (this run's, another's) that leases a batch whose lease expired takes it
        # back itself, often before the check above: the local worker that held it is as stuck.
        # Its commit would find the lease lost, but only once the call it is stuck in ends.
        if self.expired_from is not None:
            top, taken = store.expired_after(self.expired_from)
            for event_id, batch_id, owner, attempt in taken:
                if event_id not in self.expired_seen:
                    self.expired_seen.add(event_id)
                    if batch_id not in took_back:  # (those are said above)
                        log.info("lease of batch %d held by %s expired; another worker took it",
                                 batch_id, owner)  # fmt: skip
                        self._kill_stuck(owner, batch_id, attempt)
            # Looking back some events: on PostgreSQL an event may commit after a newer one.
            self.expired_from = max(self.expired_from, top - 1000)
            self.expired_seen = {e for e in self.expired_seen if e > self.expired_from}

    def _kill_stuck(self, owner: str, batch_id: int, attempt: int) -> None:
        """Kill the local worker ``owner`` names, if alive: its lease of ``batch_id`` (at
        ``attempt``) expired, so it is stuck (it renews while its calls progress). Once,
        however many of its leases expired. Not for a lease it let expire, its give-back
        having failed (a database outage): it went on with its other batches, and said so."""
        if (batch_id, attempt) in self.let_expire:
            self.let_expire.discard((batch_id, attempt))
            return
        for s in self.slots.values():
            if owner == self._owner(s) and s.proc.is_alive() and not s.stuck:
                self.emit(Notice(f"[Worker-{s.index + 1}] is stuck past its lease; killing it"))
                s.stuck = True
                s.proc.kill()

    def _progress(self, store: Store, total_batches: int, active: int, t0: float) -> None:
        """Progress of the plan: the batches open at the run's start (planned by it, or
        those of the plan it joined, which keep the run id of the run that planned them:
        counting this run's ids said 0% all along after a rerun), or for `gapfill worker`
        those it did, of those and the ones still open. Only open batches are counted: the
        done ones of earlier runs (kept until `gapfill prune`) made a count per second grow with
        the history, and a worker's total counted them all. A worker's total is not held at
        the batches open when it joined: other runs' workers close some of them, and it
        ended short of 100% ("95/159"), its finished plan never said."""
        job = self.job
        open_ = store.count_open_batches(job.targets)
        if job.plan_new:
            total = total_batches
            done = max(0, total - open_)
        else:
            done = self.done_batches
            total = done + open_
        processed, failed, _, retries, limited = self.totals()
        # As each running worker's last stats said it (a worker gone stores none of it).
        fetched = sum(s.stats.fetched for s in self.slots.values()
                      if s.stats is not None and s.stats.pid == s.proc.pid and s.proc.is_alive())  # fmt: skip
        self.emit(_progress_event(done, total, active, processed, failed, time.perf_counter() - t0,
                                  retries, limited, fetched))  # fmt: skip

    def _metrics_snapshot(self) -> dict[str, float]:
        processed, failed, calls, retries, limited = self.totals()
        return series(processed, failed, calls, retries, limited, self.done_batches, self.alive_now,
                      self.restarts, self.leases)  # fmt: skip


# -- entry point ---------------------------------------------------------------------------


def run_enrich(
    job: EnrichJob, emit: Emit, end: HeldSignals | None = None, store: Store | None = None
) -> RunSummary:
    """Run ``job`` in its mode (``auto`` picks one); emits events, returns the summary.

    The run's end (recorded, its database closed) holds a first Ctrl+C or SIGTERM in
    ``end``, with the caller's handlers as those :meth:`HeldSignals.restore` puts back; with
    ``end`` the caller's, the run leaves them held and the caller restores them once it has
    said the end, so that no signal lands in between (it ended a complete run with 130).
    Without it, the run gives them back as it returns.

    ``store``: the job's database, open already (the command's own connection, with which
    it found the work; not read-only), which the run takes over and closes: a batch or
    sequential run (and auto mode's count) works on it rather than open a second session,
    whose start (on PostgreSQL a new server process, its settings and the schema check)
    came before the node's first call. A concurrent run closes it at once: its coordinator
    and workers open their own."""
    try:
        mode = job.mode
        if mode not in MODES:
            raise GapfillError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        if job.metrics_port:  # a busy port is said before any run row or plan is written
            from gapfill.engine.metrics import check_port

            check_port(job.metrics_port)
        if mode == "auto":
            store = _open(job, emit, store)  # kept for an in-process run: one session, not two
            t0 = time.perf_counter()
            gap = gap_size(store, job.targets)
            open_plan = store.has_open_batches(job.targets)
            mode, why = choose_mode(gap)
            log.info("mode auto: a gap of %d ref(s) (counted in %.2f s)%s on %d core(s): %s (%s)", gap,
                     time.perf_counter() - t0, ", an open plan" if open_plan else "", os.cpu_count() or 1,
                     mode, why)  # fmt: skip
            if open_plan and mode == "batch":
                why += "; joining the open plan"
            emit(Notice(f"mode auto: {mode} ({why})"))
        if mode == "concurrent":
            handed, store = store, None
            if handed is not None:
                handed.close()
            return Coordinator(replace(job, mode=mode), emit).run(end)
        if job.workers and job.workers > 1:
            said = job.workers_said or f"--workers {job.workers}"
            # Said under -q too: the run does not do what the user asked of it.
            emit(Notice(f"{said} applies to concurrent mode; {mode} mode runs one worker", quiet_too=True))
        store, handed = None, store  # run_in_process closes it from here on
        return run_in_process(replace(job, mode=mode), emit, sequential=mode == "sequential", end=end,
                              store=handed)  # fmt: skip
    finally:
        if store is not None:  # the run never took it (a busy metrics port, a failed count)
            store.close()
