"""``discover``: fill a contract's ``refs`` and ``coverage`` from the chain.

Methods, and what each one sees
-------------------------------

========  ===============================================  ====================
method    finds                                            cost
========  ===============================================  ====================
logs      txs in which the contract emitted an event       2 calls per window
blocks    txs sent straight to it (reverted, silent too)   1 call per block
trace     direct *and* internal calls (``trace_filter``    2 calls per window
          or Otterscan ``ots_searchTransactionsAfter``)    (or per page)
explorer  ``txlist`` + ``txlistinternal`` of an            2+ requests per
          Etherscan-compatible API: direct txs, and        10,000 rows
          internal calls that carry ETH (Etherscan lists
          no others; Blockscout does, as gapfill asks)
========  ===============================================  ====================

A window (or page) goes with ``eth_getBlockByNumber`` of its last block, so that blocks a
node behind the head answered as empty are not recorded (see :mod:`gapfill.discover.ranges`).

What each misses: ``logs`` a transaction in which the contract emitted nothing;
``blocks`` every internal call; ``explorer`` internal calls that carry no ETH
(a token called by a router, a contract called through a Safe or a forwarder)
on Etherscan; ``trace`` nothing.

Choosing methods (``--method``; the default)
--------------------------------------------

Without ``--method``, discover uses the cheapest set whose coverage is complete
(:mod:`gapfill.discover.coverage`: every transaction sent to the contract and every
one in which it emitted an event):

1. ``trace``, if the node serves ``trace_filter`` or ``ots_searchTransactionsAfter``
   (probed once): it alone also sees internal calls that emit nothing;
2. otherwise ``logs`` + ``explorer``, if an explorer URL is configured
   (``--explorer-url`` / ``GAPFILL_EXPLORER_URL``): the explorer lists direct
   calls and those carrying ETH, the log scan the internal calls in which the
   contract emitted an event;
3. otherwise ``logs`` + ``blocks``: the block scan sees every direct call, and the
   log scan adds the internal calls in which the contract emitted an event.

Coverage and resuming
---------------------

Coverage is recorded per method, and claims only what that method sees. A block
range is *complete* for a contract once ``trace``, or ``logs`` with ``blocks`` or
``explorer``, has scanned it; a range only one of ``logs``, ``blocks`` or
``explorer`` scanned is *partial*. Without ``--from-block``/``--to-block`` discover
scans from the contract's start block (or 0) to ``latest - confirmations`` (default
12; nothing above is ever recorded as covered), skipping what is already done: each
method skips what it, or a method that sees every kind it sees
(:data:`~gapfill.discover.coverage.DOMINATED_BY`), has scanned, whether the methods
are the default or ``--method``. So ``trace`` looks again over a range ``logs`` and
``blocks`` completed (for internal calls), ``logs`` over one the explorer scanned,
and ``blocks`` skips what ``explorer`` or ``trace`` scanned.

Discover reports the blocks it skipped that way ("blocks 0-1200 already scanned:
pass --rescan to scan them again"), naming the methods that skipped them when not
every method did ("blocks 0-8 already scanned for method blocks: ..."). With
``rescan=True`` nothing is skipped: every chosen method scans the whole target
again (after a reorg deeper than the confirmations, a new method, or a provider
that missed logs). Refs are only ever
added (one already there stays as it is, nothing is deleted), so ``new_refs`` counts
what the earlier scans missed (and what blocks never scanned hold); coverage is
recorded as usual. Without ``from_block`` the rescan starts at the lowest block ever
covered, if that is below the contract's start block, and without ``to_block`` it ends
at the highest (if below the head), if that is above ``latest - confirmations`` (an
earlier scan with fewer confirmations), so it covers everything scanned before.

Refs and coverage are committed together (``Store.add_refs_and_coverage``) per
completed chunk (window methods alone: every ``commit_windows`` windows answered,
as their chunks are wide), so an interrupted run loses only the work in flight, and a
rerun scans only what is still missing.

Concurrency
-----------

Discovery has its own machinery, separate from the enrich engine's batches and
leases: one process, ``concurrency`` chunks in flight at once (asyncio tasks),
each sending its calls through :meth:`RpcClient.call_many` (which batches them and
spends the endpoints' rate budget). The cursor-style methods (explorer, Otterscan
search) walk forward on their own task, committing per page. Progress goes to an
``on_progress`` callback, one :class:`DiscoverProgress` per commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import field

from gapfill.discover.blocks import scan_blocks
from gapfill.discover.coverage import (
    DOMINATED_BY,
    METHODS,
    Interval,
    chunks,
    covered_by,
    fmt_ranges,
    intersect,
    merge,
    size,
    subtract,
)
from gapfill.discover.explorer import NO_EXPLORER, ExplorerClient, ExplorerConfig, url_hint, walk_explorer
from gapfill.discover.logs import scan_logs
from gapfill.discover.ranges import AdaptiveWindow
from gapfill.discover.trace import BACKENDS, TRACE_FILTER, scan_trace_filter, trace_backend, walk_ots
from gapfill.errors import ConfigError, RpcError
from gapfill.model import Contract, CoverageRange, Ref
from gapfill.records import record
from gapfill.rpc import RpcClient
from gapfill.store import Store
from gapfill.wording import counted

logger = logging.getLogger(__name__)

DEFAULT_CONFIRMATIONS = 12


@record
class DiscoverSettings:
    """Knobs of the discovery machinery (the defaults suit public providers)."""

    #: Chunks (commit units) in flight at once.
    concurrency: int = 4
    #: Chunk width when a block scan runs (one call per block: keep commits frequent).
    block_chunk_blocks: int = 50
    #: Chunk width for window methods alone (logs, trace_filter).
    range_chunk_blocks: int = 20_000
    #: Window methods alone commit every this many windows answered, not once per chunk:
    #: a provider whose cap is 10 blocks makes a chunk 2,000 calls, lost to a Ctrl+C.
    commit_windows: int = 32
    #: First ``eth_getLogs`` / ``trace_filter`` window, and the most it grows to.
    initial_window_blocks: int = 2_000
    max_window_blocks: int = 100_000
    #: Page size asked of ``ots_searchTransactionsAfter`` (a soft limit: whole blocks).
    ots_page_size: int = 500
    #: Trace backends to use, in order of preference (the first the node serves wins).
    trace_backends: tuple[str, ...] = BACKENDS

    def __post_init__(self) -> None:
        if min(self.concurrency, self.block_chunk_blocks, self.range_chunk_blocks, self.commit_windows) < 1:
            raise ConfigError("discovery concurrency and chunk sizes must be at least 1")


@record
class DiscoverProgress:
    """One event: ``start`` (the plan), ``chunk`` (a commit), or ``done``."""

    event: str
    chain_id: int
    contract: str
    methods: tuple[str, ...]
    #: The range just committed (``chunk``), or the whole target (``start``/``done``).
    from_block: int | None
    to_block: int | None
    #: Blocks scanned so far / to scan, summed over methods.
    blocks_done: int
    blocks_total: int
    refs_found: int
    new_refs: int
    #: Per method, the blocks this call has committed so far (merged): what a failure or an
    #: interruption keeps.
    scanned: tuple[tuple[str, tuple[Interval, ...]], ...] = ()


@record
class DiscoverSummary:
    """What one ``discover`` call did."""

    chain_id: int
    contract: str
    methods: tuple[str, ...]
    #: ``latest - confirmations`` when discovery started; nothing above was covered.
    safe_head: int
    #: The target range (None when there was nothing to scan).
    from_block: int | None
    to_block: int | None
    blocks_scanned: dict[str, int] = field(default_factory=dict)
    refs_found: dict[str, int] = field(default_factory=dict)
    new_refs: int = 0
    chunks: int = 0
    rpc_calls: int = 0
    explorer_requests: int = 0
    trace_backend: str | None = None
    #: Whether coverage was ignored (``rescan=True``).
    rescan: bool = False
    #: Per method that skipped some, the blocks of the target it did not scan because
    #: coverage said they were done (see "Coverage and resuming").
    already_scanned: dict[str, tuple[Interval, ...]] = field(default_factory=dict)
    #: The node's head when discovery started (``safe_head`` + confirmations).
    latest: int | None = None
    #: The range asked for: ``--from-block`` (or the start block) and ``--to-block``.
    asked_from: int | None = None
    asked_to: int | None = None
    #: Whether ``asked_from`` is ``--from-block`` (else the contract's start block).
    from_given: bool = True
    #: The explorer's last indexed block, when it is below the target's end (the blocks
    #: above it were left for a later run).
    explorer_head: int | None = None

    @property
    def limit(self) -> str | None:
        """Why the range asked for was cut short by the head, or left nothing to scan, and
        what to do about it; None when it was not."""
        if self.latest is None:
            return None
        why = f"latest {self.latest} - {self.latest - self.safe_head} confirmations"
        lower = "pass a lower --confirmations to scan closer to the head"
        if self.from_block is None and self.asked_from is not None and self.asked_from > self.safe_head:
            first = (f"--from-block {self.asked_from}" if self.from_given
                     else f"the start block {self.asked_from}")  # fmt: skip
            if self.asked_from > self.latest:
                return f"{first} is above the node's head ({self.latest}): nothing to scan yet"
            if self.safe_head < 0:  # not a block to name: a young chain, or a huge --confirmations
                return (f"no block is {self.latest - self.safe_head} confirmations deep yet (the "
                        f"node's head is {self.latest}): {lower}")  # fmt: skip
            return f"{first} is above the safe head {self.safe_head} ({why}): {lower}"
        if (self.from_block is None and not self.from_given and self.asked_from is not None
                and self.asked_to is not None and self.asked_to < self.asked_from):  # fmt: skip
            return (f"--to-block {self.asked_to} is below the start block {self.asked_from}: nothing "
                    "to scan; pass --from-block to scan below the start block")  # fmt: skip
        if self.asked_to is not None and self.asked_to > self.safe_head and self.to_block is not None:
            return f"--to-block {self.asked_to} was capped at {self.safe_head} ({why}): {lower}"
        return None

    @property
    def text(self) -> str:
        """One line of what was done, and one more naming the blocks skipped as done."""
        scanned = ", ".join(f"{m} {counted(self.blocks_scanned.get(m, 0), 'block')}/"
                            f"{counted(self.refs_found.get(m, 0), 'ref')}" for m in self.methods)  # fmt: skip
        where = "nothing to scan" if self.from_block is None else (
            f"{'rescanned ' if self.rescan else ''}blocks {self.from_block}-{self.to_block}")
        text = (f"{self.contract}: {where}; {scanned or 'no method ran'}; "
                f"{counted(self.new_refs, 'new ref')}; {counted(self.rpc_calls, 'RPC call')}, "
                f"{counted(self.explorer_requests, 'explorer request')}")  # fmt: skip
        # One line per set of blocks skipped, naming the methods that skipped it unless every
        # method did: `--method logs,blocks` over blocks a block scan did skips only `blocks`.
        skipped: dict[tuple[Interval, ...], list[str]] = {}
        for m, spans in self.already_scanned.items():
            skipped.setdefault(spans, []).append(m)
        for spans, methods in skipped.items():
            named = f" for method{'s' if len(methods) > 1 else ''} {', '.join(methods)}"
            which = "" if len(methods) == len(self.methods) else named
            text += (f"\n{self.contract}: blocks {fmt_ranges(spans)} already scanned{which}: "
                     "pass --rescan to scan them again")  # fmt: skip
        if self.explorer_head is not None and self.to_block is not None:
            left = max(self.explorer_head + 1, self.from_block or 0)
            text += (f"\n{self.contract}: the explorer has indexed up to block {self.explorer_head} "
                     f"only: blocks {left}-{self.to_block} are left unscanned; run discover again "
                     "once it has caught up")  # fmt: skip
        return text


async def choose_methods(
    client: RpcClient,
    contract: str,
    explorer: ExplorerConfig | None,
    trace_backends: tuple[str, ...] = BACKENDS,
) -> tuple[str, ...]:
    """The default method set (see the module docstring): trace, else logs + explorer, else
    logs + blocks."""
    if await trace_backend(client, contract, trace_backends) is not None:
        return ("trace",)
    if explorer is not None:
        return ("logs", "explorer")
    return ("logs", "blocks")


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` as discovery names them (lower case, each once); raises
    :class:`ConfigError` for an unknown one or none."""
    out: list[str] = []
    for m in methods:
        name = m.strip().lower()
        if name not in METHODS:
            raise ConfigError(f"unknown discovery method {m!r}: use {', '.join(METHODS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"no discovery method given: use {', '.join(METHODS)}")
    return tuple(out)


def plan_todo(
    coverage: Sequence[CoverageRange],
    target: Sequence[Interval],
    methods: Sequence[str],
) -> dict[str, list[Interval]]:
    """Per method, the parts of ``target`` it still has to scan (see "Coverage and resuming")."""
    return {m: subtract(target, covered_by(coverage, DOMINATED_BY[m])) for m in methods}


class _Run:
    """State of one discover call: counters, the store lock, progress."""

    def __init__(
        self,
        store: Store,
        contract: Contract,
        methods: tuple[str, ...],
        todo: dict[str, list[Interval]],
        on_progress: Callable[[DiscoverProgress], None] | None,
    ) -> None:
        self.store = store
        self.chain_id = contract.chain_id
        self.address = contract.address
        self.methods = methods
        self.on_progress = on_progress
        self.blocks_total = sum(size(v) for v in todo.values())
        self.blocks_done = 0
        self.refs_by_method: dict[str, int] = dict.fromkeys(methods, 0)
        #: Per method, the blocks committed so far, merged (their size: the blocks it scanned).
        self.scanned: dict[str, list[Interval]] = {m: [] for m in methods}
        self.refs_found = 0
        #: The refs counted in ``refs_found`` when methods that commit apart may each find
        #: one transaction (logs with the explorer or trace, ...): as ``hash(tx_hash)``, a
        #: 64-bit int, about 60 bytes a ref (two hashes alike, a count one short: about once
        #: in 300,000 runs of 10^7 refs). None when they commit together (logs and blocks
        #: share each chunk's commit; one method finds a transaction once).
        self._found: set[int] | None = None if _together(methods) else set()
        self.new_refs = 0
        self.chunks = 0
        self.rpc_calls = [0]
        self._lock = asyncio.Lock()

    def emit(self, event: str, lo: int | None, hi: int | None) -> None:
        if self.on_progress is not None:
            self.on_progress(DiscoverProgress(
                event, self.chain_id, self.address, self.methods, lo, hi, self.blocks_done,
                self.blocks_total, self.refs_found, self.new_refs,
                tuple((m, tuple(spans)) for m, spans in self.scanned.items() if spans),
            ))  # fmt: skip

    async def commit(self, found: dict[str, list[Ref]], covered: dict[str, list[Interval]]) -> None:
        """Refs and the ranges they cover, in one transaction."""
        refs: dict[str, Ref] = {}
        for method_refs in found.values():
            for r in method_refs:
                refs.setdefault(r.tx_hash, r)  # first method listed wins the ``source``
        ranges = [CoverageRange(self.chain_id, self.address, lo, hi, m)
                  for m, spans in covered.items() for lo, hi in spans]  # fmt: skip
        if not ranges and not refs:
            return
        async with self._lock:
            write = asyncio.ensure_future(
                asyncio.to_thread(self.store.add_refs_and_coverage, list(refs.values()), ranges)
            )
            try:
                new = await asyncio.shield(write)
            except asyncio.CancelledError:
                # The thread commits anyway: let it finish, so that when discover
                # returns (or raises) the database holds exactly what was reported,
                # this commit included (Ctrl+C says what is kept from the reports).
                await asyncio.wait([write])
                if not write.cancelled() and write.exception() is None:
                    self._committed(write.result(), refs, found, covered)
                raise
        self._committed(new, refs, found, covered)

    def _committed(self, new: int, refs: dict[str, Ref], found: dict[str, list[Ref]],
                   covered: dict[str, list[Interval]]) -> None:  # fmt: skip
        """Count a commit and report it."""
        self.new_refs += new
        if self._found is None:
            self.refs_found += len(refs)
        else:
            before = len(self._found)
            self._found.update(map(hash, refs))
            self.refs_found += len(self._found) - before
        self.chunks += 1
        for m, spans in covered.items():
            self.blocks_done += size(spans)
            # Chunks end in any order: a few ranges (one per chunk in flight, or per hole
            # the plan skipped), merged as they come.
            self.scanned[m] = merge([*self.scanned.get(m, []), *spans])
        for m, method_refs in found.items():
            self.refs_by_method[m] = self.refs_by_method.get(m, 0) + len(method_refs)
        all_spans = merge(s for spans in covered.values() for s in spans)
        # -v: every commit once (the progress line is at most one a second), so a log shows
        # which blocks are done, and with which methods, whatever order the chunks end in.
        logger.info("discover %s: %s with %s: %s, %d new", self.address,
                    f"blocks {fmt_ranges(all_spans)} scanned" if all_spans else "no new block done",
                    ",".join(m for m, spans in covered.items() if spans) or ",".join(found),
                    counted(len(refs), "ref"), new)  # fmt: skip
        self.emit("chunk", all_spans[0][0] if all_spans else None,
                  all_spans[-1][1] if all_spans else None)  # fmt: skip


def _together(methods: Sequence[str]) -> bool:
    """Whether ``methods`` commit each ref in one commit: one method, or logs and blocks
    (their chunks are scanned by both, then committed once). Others commit apart: window
    methods without blocks each commit as their windows are answered, the explorer and
    Otterscan walk on their own task (trace here may be either: counted as apart)."""
    return len(methods) == 1 or set(methods) == {"logs", "blocks"}


async def _run_all(jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run ``jobs`` concurrently; on the first failure cancel the rest and raise it (unwrapped)."""
    tasks = [asyncio.ensure_future(job()) for job in jobs]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                raise exc
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def discover(
    store: Store,
    client: RpcClient,
    contract: Contract,
    *,
    methods: Sequence[str] | None = None,
    from_block: int | None = None,
    to_block: int | None = None,
    confirmations: int = DEFAULT_CONFIRMATIONS,
    explorer: ExplorerConfig | None = None,
    on_progress: Callable[[DiscoverProgress], None] | None = None,
    settings: DiscoverSettings = DiscoverSettings(),
    rescan: bool = False,
) -> DiscoverSummary:
    """Scan ``contract``'s blocks for its transactions; store refs and coverage as it goes.

    See the module docstring for the methods, the default choice, coverage,
    resuming and ``rescan``. Raises :class:`gapfill.errors.ConfigError` for bad arguments and
    :class:`gapfill.errors.RpcError` (or :class:`ExplorerError`) when a source
    fails; chunks committed before the failure stay committed.
    """
    if confirmations < 0:
        raise ConfigError("--confirmations must be 0 or more")
    if from_block is not None and to_block is not None and from_block > to_block:
        raise ConfigError(f"--from-block {from_block} is above --to-block {to_block}: swap them")
    address = contract.address.lower()
    contract = Contract(contract.chain_id, address, contract.label, contract.start_block, contract.abi)
    chain_id = await client.probe()
    if chain_id != contract.chain_id:
        raise RpcError(
            f"the RPC node serves chain {chain_id} but {address} is tracked on chain "
            f"{contract.chain_id}: check {client.check}"
        )
    chosen = check_methods(methods) if methods is not None else None
    if chosen is not None and "explorer" in chosen and explorer is None:
        raise ConfigError(f"{NO_EXPLORER}: {url_hint()}")
    # The lowest head: a window past an endpoint's head is answered as if empty (see ranges).
    latest = await client.lowest_head()
    safe = latest - confirmations
    coverage = await asyncio.to_thread(store.get_coverage, contract.chain_id, address)
    start = from_block if from_block is not None else (contract.start_block or 0)
    if rescan and from_block is None and coverage:
        start = min(start, min(c.from_block for c in coverage))  # everything scanned before
    end = safe if to_block is None else min(to_block, safe)  # DiscoverSummary.limit says it
    if rescan and to_block is None and coverage:
        # Blocks a run with fewer confirmations scanned above today's safe head are covered
        # already: a rescan of "everything scanned before" takes them too (below the head).
        end = max(end, min(latest, max(c.to_block for c in coverage)))
    backend: str | None = None
    if chosen is None:
        chosen = await choose_methods(client, address, explorer, settings.trace_backends)
    if "trace" in chosen:
        backend = await trace_backend(client, address, settings.trace_backends)
        if backend is None:
            raise RpcError("the node serves neither trace_filter nor ots_searchTransactionsAfter: "
                           "use --method logs,blocks, or logs,explorer with an explorer")  # fmt: skip
    target = [(start, end)] if start <= end else []
    todo = {m: list(target) for m in chosen} if rescan else plan_todo(coverage, target, chosen)
    if "logs" in chosen and todo["logs"]:
        await _require_logs(client, address, todo["logs"][0][0], chosen if methods is None else None)
    run = _Run(store, contract, chosen, todo, on_progress)
    run.emit("start", target[0][0] if target else None, target[0][1] if target else None)

    explorer_client: ExplorerClient | None = None
    explorer_head: int | None = None
    jobs: list[Callable[[], Awaitable[None]]] = []
    # Window and per-block methods share chunks, so one commit covers all of them.
    chunked = [m for m in chosen if m in ("logs", "blocks") or (m == "trace" and backend == TRACE_FILTER)]
    # A method with nothing left to scan takes no part: an empty block plan (blocks a block
    # scan or the explorer did) made the log scan go in 50-block chunks, one call each.
    if chunked_todo := {m: todo[m] for m in chunked if todo[m]}:
        jobs += _chunk_jobs(run, client, settings, chunked_todo)
    if "trace" in chosen and backend != TRACE_FILTER and todo["trace"]:
        jobs.append(lambda: _walk_job(run, "trace", todo["trace"], lambda lo, hi: walk_ots(
            client, contract.chain_id, address, lo, hi, page_size=settings.ots_page_size,
            counter=run.rpc_calls)))  # fmt: skip
    try:
        if "explorer" in chosen and todo["explorer"]:
            assert explorer is not None
            explorer_client = ExplorerClient(explorer, contract.chain_id)
            await explorer_client.__aenter__()
            ex = explorer_client
            ex_todo = todo["explorer"]
            ex_head = await ex.head()
            if ex_head is not None and ex_head < end:
                # Blocks the explorer has not indexed yet are not covered by it: the summary
                # says so (a warning log went unseen: the CLI logs errors alone by default).
                explorer_head = ex_head
                ex_todo = intersect(ex_todo, [(start, ex_head)])
            if ex_todo:
                jobs.append(lambda: _walk_job(run, "explorer", ex_todo, lambda lo, hi: walk_explorer(
                    ex, contract.chain_id, address, lo, hi)))  # fmt: skip
        await _run_all(jobs)
    finally:
        if explorer_client is not None:
            await explorer_client.__aexit__(None, None, None)
    run.emit("done", target[0][0] if target else None, target[0][1] if target else None)
    return DiscoverSummary(
        chain_id=contract.chain_id,
        contract=address,
        methods=chosen,
        safe_head=safe,
        from_block=target[0][0] if target else None,
        to_block=target[0][1] if target else None,
        blocks_scanned={m: size(spans) for m, spans in run.scanned.items()},
        refs_found=run.refs_by_method,
        new_refs=run.new_refs,
        chunks=run.chunks,
        rpc_calls=run.rpc_calls[0],
        explorer_requests=explorer_client.requests if explorer_client else 0,
        trace_backend=backend,
        rescan=rescan,
        already_scanned={m: tuple(skipped) for m in chosen if (skipped := subtract(target, todo[m]))},
        latest=latest,
        asked_from=start,
        asked_to=to_block,
        from_given=from_block is not None,
        explorer_head=explorer_head,
    )


async def _require_logs(
    client: RpcClient, address: str, block: int, default_set: tuple[str, ...] | None
) -> None:
    """Raise :class:`RpcError` in one sentence if no endpoint serves ``eth_getLogs`` (asked
    once, for one block): otherwise the log scan took its refusal for a range too wide,
    split the range down to a single block, and blamed that block. ``default_set`` is the
    default method set logs is part of, or None when the user chose the methods."""
    # The default set has logs only when the node has no trace method: then the other
    # method of the set (blocks, or the explorer) is the way left on this node.
    if default_set is not None:
        others = ",".join(m for m in default_set if m != "logs")
        why = f"discover's default methods ({','.join(default_set)}) use"
        instead = f"pass --method {others} to scan without it"
    else:
        why = "the logs discovery method uses"
        instead = "pick another method with --method (blocks, trace, explorer)"
    try:
        await client.require(["eth_getLogs"], [{"address": address, "fromBlock": hex(block),
                                                "toBlock": hex(block)}], why)  # fmt: skip
    except RpcError as exc:
        raise RpcError(f"{exc}, or {instead}") from None


def _chunk_jobs(
    run: _Run, client: RpcClient, settings: DiscoverSettings, todo: dict[str, list[Interval]]
) -> list[Callable[[], Awaitable[None]]]:
    """Workers that take chunks off one shared plan, scan them with every method, and commit."""
    width = settings.block_chunk_blocks if "blocks" in todo else settings.range_chunk_blocks
    plan: Iterator[Interval] = iter(chunks(merge(s for spans in todo.values() for s in spans), width))
    windows = {m: AdaptiveWindow(settings.initial_window_blocks, max_blocks=settings.max_window_blocks)
               for m in todo}  # fmt: skip

    # With a block scan, a chunk is 50 blocks: commit it whole. Window methods alone have
    # wide chunks: they commit as their windows are answered (see _Early).
    early = "blocks" not in todo

    async def scan(method: str, spans: list[Interval]) -> list[Ref]:
        chain_id, address = run.chain_id, run.address
        if method == "blocks":
            return await scan_blocks(client, chain_id, address, spans, counter=run.rpc_calls)
        kept = _Early(run, method, settings.commit_windows) if early else None
        scan_windows = scan_logs if method == "logs" else scan_trace_filter
        refs = await scan_windows(client, chain_id, address, spans, windows[method], counter=run.rpc_calls,
                                  on_refs=kept.add if kept else None)  # fmt: skip
        if kept is not None:
            await kept.flush()
        return refs

    async def worker() -> None:
        for chunk in plan:  # a shared iterator: each chunk goes to one worker
            parts = {m: intersect(spans, [chunk]) for m, spans in todo.items()}
            parts = {m: p for m, p in parts.items() if p}
            found = await asyncio.gather(*(scan(m, p) for m, p in parts.items()))
            if not early:
                await run.commit(dict(zip(parts, found, strict=True)), parts)

    return [worker for _ in range(settings.concurrency)]


class _Early:
    """A window method's answered windows and their refs, committed every ``every`` windows
    (and at the end, :meth:`flush`), so an interrupted scan keeps them."""

    def __init__(self, run: _Run, method: str, every: int) -> None:
        self._run, self._method, self._every = run, method, every
        self._spans: list[Interval] = []
        self._refs: list[Ref] = []

    async def add(self, spans: list[Interval], refs: list[Ref]) -> None:
        self._spans += spans
        self._refs += refs
        if len(self._spans) >= self._every:
            await self.flush()

    async def flush(self) -> None:
        if not self._spans:
            return
        spans, refs = merge(self._spans), self._refs
        self._spans, self._refs = [], []
        await self._run.commit({self._method: refs}, {self._method: spans})


async def _walk_job(
    run: _Run,
    method: str,
    todo: list[Interval],
    walk: Callable[[int, int], AsyncIterator[tuple[list[Ref], int]]],
) -> None:
    """Commit a cursor-style method page by page: refs, and blocks up to the page's end."""
    for lo, hi in todo:
        done_to = lo - 1
        async for refs, through in walk(lo, hi):
            span = [(done_to + 1, through)] if through > done_to else []
            await run.commit({method: refs}, {method: span})
            done_to = max(done_to, through)


__all__ = [
    "DEFAULT_CONFIRMATIONS",
    "DiscoverProgress",
    "DiscoverSettings",
    "DiscoverSummary",
    "check_methods",
    "choose_methods",
    "discover",
    "plan_todo",
]
