"""Plan the RPC calls for a batch of refs, fetch them, and turn the answers into rows.

The cost model counts the calls a provider meters (every item of a JSON-RPC
batch counts) and, where calls are free (a local node with no rate limit), the
work the node does to answer them.

Plans, per ref:

* **per block**: where enough refs share a known block and the endpoint
  supports ``eth_getBlockReceipts``, fetch ``eth_getBlockByNumber(n, true)`` and
  ``eth_getBlockReceipts(n)`` once for the block: 2 calls for all of its refs,
  and the block gives the timestamp. "Enough" is the cost model's break-even:
  when calls are metered, 2 refs (2 calls instead of 4), counting the batch's riders:
  the refs of the run's other contracts (and of its own beyond the batch) in the
  block, whose rows the block makes too (:meth:`Enricher.split`), so that a block is
  fetched once per run rather than once per contract's batch. When calls are free, the
  node's work decides: a full block makes it serialise every transaction in the
  block, used or not. Measured on anvil (bench/, dense chain, ~105 transactions a
  block, 80% tracked by two contracts, when each contract's batches fetched a block
  they shared again), whole blocks cost the node 0.47 CPU s per 1,000 refs against
  0.18 one by one, and took 1.9x longer. So with free calls the planner never
  fetches whole blocks unless told to (``block_plan_min_refs_free``,
  ``--block-plan-min-refs``).
* **per transaction**, when calls are free: ``eth_getTransactionByHash`` and
  ``eth_getTransactionReceipt`` side by side, one JSON-RPC batch of pairs at a
  time, every batch in flight at once and each normalised as soon as its reply
  is in, so this process's CPU work overlaps the node's instead of waiting for a
  second round. The timestamp comes from the receipt or the transaction
  (``blockTimestamp``: recent geth, reth and anvil) or the cache; refs still
  without one (older nodes, transactions without logs) get one header per block
  afterwards.
* **per transaction**, when calls are metered, in two rounds:
  1. ``eth_getTransactionReceipt``. Its logs carry ``blockTimestamp`` on recent
     nodes; it also tells the block of refs imported without one.
  2. ``eth_getTransactionByHash`` for refs whose timestamp is known; for the
     others, the block with full transactions, once per block, which gives
     transaction and timestamp in one call: at most 2 calls per transaction.

  Both rounds go one request's refs at a time (as many as the client puts in one
  request: under ``--rps`` a second of the rate), a few requests of receipts ahead of
  the transactions (:data:`RECEIPTS_AHEAD`), each request's transactions sent before
  the next receipts, so that transactions complete steadily through the batch: a stop
  (Ctrl+C, a node gone) keeps them.

Block timestamps are cached per process, so a header is fetched at most once.
Each ref ends enriched or as a :class:`~gapfill.model.Failure`: ``not_found``
(the transaction lookup still ``null`` after the retries: permanent until
``--retry-failed``), ``permanent`` (the node rejected the call), ``rpc_error``
(transient; the ref stays in the gap) or ``beyond_head`` (transient too). A receipt
still ``null`` while the node returns the transaction is ``rpc_error``: its receipts
lag, the transaction is real; so is a transaction lookup (or its block) still ``null``
while its receipt came. A ``null`` is no proof either for a block the node has
not reached: before a null makes a ref ``not_found``, the node's head
(``eth_blockNumber``, asked once for the refs an attempt has in that state, and
cached for ``HEAD_TTL_S``) is compared with the ref's block (the transaction
lookup's) or the block asked (a header, a full block); above it, the ref is
``beyond_head``. A ref without a block number proves nothing either way: a ``null``
for it stays ``not_found``. In the per-block plan a ``null`` block sends its refs to
the per-transaction plan as before, above the head too: an imported block number may
be wrong, and only the transaction lookup tells; a ``null`` there is judged as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import Any, Literal, NamedTuple

from gapfill.enrich.decode import Decoder
from gapfill.enrich.normalise import MalformedAnswer, NormaliseError, normalise_tx, timestamp_from_receipt
from gapfill.model import Enriched, Failure, LogRow, Ref, TxRow, beyond_head_error
from gapfill.quantity import QuantityError, hex_int, quantity
from gapfill.records import record
from gapfill.rpc import Call, CallError, RpcClient
from gapfill.rpc.client import ANSWERED
from gapfill.rpc.slots import PRIORITY

PlanShape = Literal["auto", "per_tx", "per_block"]

#: How long the node's head, once asked, stands for it (batches in flight share it): a head
#: older than the nulls it judges is lower, so it errs towards "not reached yet".
HEAD_TTL_S = 1.0

#: In the metered per-transaction plan, how many requests of receipts may be asked ahead of
#: the transactions (see :meth:`Enricher._per_tx_rounds`). One left a batch alone with two
#: requests at a time: where the rate limit is loose for the node's latency, the receipts
#: then waited on the round trips (measured with the emulator at 5,000 calls/s and 0.2 s:
#: 330 transactions/s, against 520 asking every receipt first and 600 with two ahead).
RECEIPTS_AHEAD = 2

#: How many rows of the blocks it fetched whole an enricher keeps for the batches after
#: (see :meth:`Enricher._per_block`): a batch leased before another's commit still has the
#: refs that batch settled as riders, and without the rows asked their block again. About
#: what 4 batches in flight of 500 refs and their riders hold (rows they hold anyway until
#: their commit; the oldest blocks' are let go first).
SHARED_ROWS_CAP = 10_000

#: The :data:`~gapfill.rpc.slots.PRIORITY` of each batch whose whole-block fetch the batch of
#: this context waits for (see :meth:`Enricher._per_block`), with how many of its blocks. The
#: engine sets it per batch: those fetches are that batch's progress, so its lease is kept
#: while they are held back by the client (its rate budget) or wait their turn behind an
#: earlier batch's requests, as it is while its own requests do. A fetch of 100 calls at 0.3
#: calls/s waits longer than the lease, and the batch waiting for it had no request of its own.
AWAITED: contextvars.ContextVar[Counter[int] | None] = contextvars.ContextVar(
    "gapfill_enrich_awaited", default=None
)

_Rows = dict[str, tuple[TxRow, list[LogRow]]]


class _Fetching(NamedTuple):
    """A block a batch of this process is fetching whole: the rows it made, once answered
    (None: the block or its receipts did not come), and the PRIORITY of the batch asking."""

    rows: asyncio.Future[_Rows | None]
    priority: int


@record
class PlanSettings:
    """How the planner chooses; the defaults follow the cost model above."""

    #: Refs sharing one block from which the per-block plan is used when calls are metered
    #: (2 calls for the block instead of 2 per ref).
    block_plan_min_refs: int = 2
    #: The same threshold when calls are free (no rps limit): the node's work decides, and
    #: on the nodes measured one by one always wins (see the module docstring).
    block_plan_min_refs_free: int = 1_000_000
    #: Force one plan shape (tests and benchmarks); ``auto`` lets the planner choose.
    shape: PlanShape = "auto"
    #: Whether calls are metered (some endpoint has an rps limit); the engine sets it.
    calls_metered: bool = False


def _failure(ref: Ref, err: CallError | str, *, reason: str | None = None) -> Failure:
    if isinstance(err, CallError):
        kind = {"not_found": "not_found", "permanent": "permanent"}.get(err.kind, "rpc_error")
        return Failure(ref.chain_id, ref.tx_hash, ref.contract, reason or kind, err.message)
    return Failure(ref.chain_id, ref.tx_hash, ref.contract, reason or "rpc_error", err)


async def _together(requests: Iterable[Awaitable[None]], queued: Callable[[], None] | None = None) -> None:
    """Await a batch's requests sent at once. One that raises (or whose answers raise as
    they are settled) ends them all: the others must not run on, asking the node (and
    spending a rate limit) for a batch already given back. ``queued()`` is called once they
    are started: what the caller starts after it reaches the client after them."""
    asked = [asyncio.ensure_future(r) for r in requests]
    if queued is not None:
        queued()
    try:
        await asyncio.gather(*asked)
    except BaseException:
        for task in asked:
            task.cancel()
        await asyncio.gather(*asked, return_exceptions=True)
        raise


class Collector:
    """Rows and failures for one batch; each ref is settled exactly once.

    A caller that passes its own to :meth:`Enricher.enrich` can read :meth:`so_far` when
    the enriching is cancelled: the worker gives a stopped batch back with it, so a
    Ctrl+C does not throw away the calls already answered.
    """

    def __init__(self) -> None:
        self.txs: list[TxRow] = []
        self.logs: list[LogRow] = []
        self.failures: list[Failure] = []
        self.moved: list[Ref] = []
        self.done: set[str] = set()
        self.rode: set[str] = set()  # of txs, the riders' (see Enriched.rode)
        #: ``not_found`` failures that the node's head may disprove, each with the block
        #: whose ``null`` made it and what showed the node knows the transaction (if
        #: anything did): judged by :meth:`Enricher._judge_nulls`.
        self.unproven: list[tuple[Failure, int, str | None]] = []

    def row(self, ref: Ref, tx: TxRow, logs: list[LogRow], *, rider: bool = False) -> None:
        """Settle ``ref`` with its row; ``rider``: a ref that is not the batch's."""
        if ref.tx_hash in self.done:
            return
        self.done.add(ref.tx_hash)
        if rider:
            self.rode.add(ref.tx_hash)
        self.txs.append(tx)
        self.logs.extend(logs)
        if ref.block_number != tx.block_number:  # imported without one, or with a wrong one
            self.moved.append(replace(ref, block_number=tx.block_number))

    def fail(self, failure: Failure, block: int | None = None, *, known: str | None = None) -> None:
        """Settle a ref as ``failure``; ``block``: the block a ``null`` answer was about (the
        ref's, or the block asked), so a ``not_found`` in it is checked against the head.
        ``known``: what showed that the node knows the transaction although this lookup
        stayed ``null`` (its receipt came), which makes the ``null`` a lagging backend's."""
        if failure.tx_hash in self.done:
            return
        self.done.add(failure.tx_hash)
        if failure.reason == "not_found" and block is not None:
            self.unproven.append((failure, block, known))
        else:
            self.failures.append(failure)

    def take(self, got: Enriched) -> None:
        """Add what enriching other refs (a part of the batch, none of them settled here yet)
        produced."""
        self.txs.extend(got.txs)
        self.logs.extend(got.logs)
        self.failures.extend(got.failures)
        self.moved.extend(got.moved)
        self.rode.update(got.rode)

    def result(self) -> Enriched:
        assert not self.unproven, "nulls not judged against the node's head"
        return Enriched(self.txs, self.logs, self.failures, self.moved, self.rode)

    def so_far(self) -> Enriched:
        """A copy of what is settled yet: complete rows (a transaction still waiting for its
        block's timestamp has none), and failures, but not the nulls still to be judged
        against the node's head."""
        return Enriched(list(self.txs), list(self.logs), list(self.failures), list(self.moved),
                        set(self.rode))  # fmt: skip


def _no_receipt(ref: Ref, rec: CallError, tx: Any) -> Failure:
    """The failure of a ref whose receipt stayed ``null`` (``rec``), given the answer to its
    transaction lookup. ``not_found`` (permanent) only when that lookup was ``null`` too:
    a node that returns the transaction knows it, and a receipt lagging behind it (a node
    still indexing the block, a load balancer's other backend) is ``rpc_error``: the ref
    stays in the gap, the batch is tried again, and a later run tries once more."""
    if isinstance(tx, CallError):
        return _failure(ref, tx)  # not_found, or why the lookup failed: it is no proof either way
    if isinstance(tx, dict):
        where = tx.get("blockNumber") or tx.get("blockHash")
        if isinstance(where, str) and where.startswith("0x") and len(where) <= 18:
            # A block number, said as the user's other numbers are (a malformed one as sent).
            with contextlib.suppress(TypeError, ValueError):
                where = hex_int(where)
        state = f"mined in block {where}" if where is not None else "pending (not mined yet)"
        return _failure(ref, f"receipt {rec.message}, but the transaction is {state}: "
                             "the node's receipts lag; tried again later")  # fmt: skip
    return _failure(ref, f"receipt {rec.message}; malformed transaction: {str(tx)[:200]}")


def _receipt(out: Collector, ref: Ref, rec: Any, tx: Any) -> dict[str, Any] | None:
    """The receipt answer if it is one; otherwise the ref's failure is recorded. A receipt
    still ``null`` is judged with ``tx``, the answer to the transaction lookup (see
    :func:`_no_receipt`): the caller looks the transaction up before it calls this."""
    if isinstance(rec, CallError):
        out.fail(_no_receipt(ref, rec, tx) if rec.kind == "not_found" else _failure(ref, rec),
                 ref.block_number)
        return None
    if not isinstance(rec, dict):
        # The same every time, as a malformed field (see MalformedAnswer): raised, not a
        # failure that passes and is asked again on every run.
        raise MalformedAnswer(f"the receipt of {ref.tx_hash} is malformed: {str(rec)[:200]}")
    return rec


def _block_of(rec: Mapping[str, Any]) -> int:
    """The block number of a receipt, or the :class:`MalformedAnswer` that names it."""
    # Read as normalise reads its fields (this runs for every receipt): int() and hex_int's
    # check inline; quantity() only for the odd forms (a number, "0x") and the error.
    v: Any = rec.get("blockNumber")
    try:
        n = int(v, 16)
        if v.isalnum() and v.isascii() and "x" in v:
            return n
    except (TypeError, ValueError):
        pass
    return quantity(v, lambda: f"the blockNumber of the receipt of {rec.get('transactionHash')}",
                    MalformedAnswer)  # fmt: skip


def _timestamp_of(header: Any, block: int | str) -> int:
    """The timestamp of a header or a block, or the :class:`MalformedAnswer` that names it."""
    stamp = header.get("timestamp") if isinstance(header, dict) else None
    return quantity(stamp, f"the timestamp of block {block}", MalformedAnswer)


def _fail_despite_receipt(out: Collector, ref: Ref, tx: CallError, rec: Mapping[str, Any]) -> None:
    """Settle a ref whose transaction lookup failed although its receipt (``rec``) came: a
    ``null`` there is a lagging backend's, not an unknown transaction (unless the receipt's
    block is above the node's head: see :meth:`Enricher._judge_nulls`)."""
    block = _block_of(rec)
    failure = _failure(ref, tx)
    out.fail(replace(failure, last_error=f"transaction lookup {tx.message}"), block,
             known=f"the node returned its receipt (block {block})")  # fmt: skip


def _hash_key(block_hash: Any) -> str:
    """A block hash as the timestamp cache keys it (a missing one: a key no hash matches)."""
    return "" if block_hash is None else str(block_hash).lower()


def _header_stamp(out: Collector, ref: Ref, rec: Mapping[str, Any], header: Any) -> int | None:
    """The timestamp of the receipt's block from ``header`` (asked by the receipt's block
    number), or ``None`` with the ref failed: the call failed, or the header is of another
    block at that height (a reorg since the receipt, or a load balancer's backends on two
    forks), whose timestamp the row must not take: ``rpc_error``, the ref stays in the gap
    and the next attempt reads the receipt again (of the block that stayed)."""
    block = _block_of(rec)
    if isinstance(header, CallError):
        out.fail(_failure(ref, header), block, known=_block_known(block))
        return None
    if _hash_key(header.get("hash")) != _hash_key(rec.get("blockHash")):
        out.fail(_failure(ref, (
            f"block {block} changed under the node (a reorg?): its header is block "
            f"{header.get('hash')}, the receipt's {rec.get('blockHash')}; tried again later")))  # fmt: skip
        return None
    return _timestamp_of(header, block)


def _block_known(block: int) -> str:
    """Why a ``null`` for ``block`` (a header, a full block) is no proof: a receipt in it came."""
    return f"the node returned a receipt in block {block}"


class Enricher:
    """Turns refs into rows for one chain. One per worker; it keeps a block-timestamp cache."""

    def __init__(
        self,
        client: RpcClient,
        chain_id: int,
        decoder: Decoder | None = None,
        plan: PlanSettings = PlanSettings(),
        *,
        timestamp_cache_size: int = 200_000,
        calls_per_request: int = 100,
        shared_rows_cap: int = SHARED_ROWS_CAP,
    ) -> None:
        self.client = client
        self.chain_id = chain_id
        self.decoder = decoder
        self.plan = plan
        self.calls = 0
        self._block_receipts_probed = False
        self._probe_lock = asyncio.Lock()  # batches in flight share one probe
        #: Block timestamps by block hash (lower case): by number, a header of another fork
        #: at that height (a reorg, a load balancer's backends on two forks) gave its
        #: timestamp to the rows of the block that went.
        self._ts: dict[str, int] = {}
        self._ts_cap = timestamp_cache_size
        self._head: tuple[float, int] | None = None  # (time.monotonic() asked, head)
        self._head_lock = asyncio.Lock()  # batches in flight share one eth_blockNumber
        #: Blocks a batch of this process is fetching whole, until their answer is in: a batch
        #: in flight at the same time that wants one of them waits for that answer instead of
        #: asking the block again (two contracts' batches leased together cover the same blocks).
        self._blocks_asked: dict[int, _Fetching] = {}
        #: The rows of the blocks this process fetched whole lately, by block and hash (see
        #: :meth:`_per_block`), at most about ``shared_rows_cap`` of them.
        self._block_rows: OrderedDict[int, _Rows] = OrderedDict()
        self._block_rows_n = 0
        #: The lease hooks (:data:`ANSWERED`) of the batches waiting for another batch's block
        #: fetch (once per block waited for): each block it gets answered counts as their
        #: progress too, or their leases went unrenewed while the blocks before came in.
        self._block_waiters: list[Callable[[], None]] = []
        self.shared_rows_cap = shared_rows_cap
        #: Calls per JSON-RPC request (the run's ``--rpc-batch-size``) wherever the enricher
        #: groups calls itself; elsewhere the client cuts them at its endpoint's cap.
        self.calls_per_request = max(1, calls_per_request)
        #: Refs per request in the free per-transaction plan: a ref's transaction and receipt
        #: go in one request, so an odd size is rounded down to whole pairs, and a size of 1
        #: still sends pairs (the client splits a request above its endpoint's cap).
        self.pairs_per_request = max(1, self.calls_per_request // 2)

    # -- helpers -------------------------------------------------------------------

    async def _many(self, calls: list[Call]) -> list[Any | CallError]:
        if not calls:
            return []
        self.calls += len(calls)
        return await self.client.call_many(calls)

    async def _many_each(
        self,
        jobs: Sequence[tuple[list[Call], Callable[[list[Any]], None]]],
        queued: Callable[[], None] | None = None,
    ) -> None:
        """Ask every job's calls, in requests of ``calls_per_request`` calls sent at once, and
        hand each job its answers as soon as the requests holding its calls are in (a job may
        straddle two: requests are filled to the size). Rows so become complete while the
        rest is still asked (and rate-limited): a batch stopped midway keeps them (see
        :class:`Collector`). ``queued``: as :func:`_together`'s."""
        step = self.calls_per_request
        calls: list[Call] = []
        spans: list[tuple[int, int]] = []  # each job's calls: calls[start:end]
        for job_calls, _ in jobs:
            spans.append((len(calls), len(calls) + len(job_calls)))
            calls.extend(job_calls)
        answers: list[Any] = [None] * len(calls)
        holding: list[list[int]] = [[] for _ in range(0, len(calls), step)]  # request -> jobs
        waiting: list[int] = []  # job -> requests not answered yet
        for j, (start, end) in enumerate(spans):
            requests = range(start // step, (end - 1) // step + 1) if end > start else range(0)
            for r in requests:
                holding[r].append(j)
            waiting.append(len(requests))
            if not requests:
                jobs[j][1]([])

        async def ask(r: int) -> None:
            lo = r * step
            answers[lo : lo + step] = await self._many(calls[lo : lo + step])
            for j in holding[r]:
                waiting[j] -= 1
                if not waiting[j]:
                    start, end = spans[j]
                    jobs[j][1](answers[start:end])

        await _together((ask(r) for r in range(len(holding))), queued)

    def _remember(self, key: str, ts: int) -> None:
        """Cache ``ts`` as the timestamp of the block ``key`` (:func:`_hash_key`, or a row's
        block hash: lower case already)."""
        if len(self._ts) >= self._ts_cap:
            self._ts.clear()
        self._ts[key] = ts

    def _block_and_ts(self, rec: Mapping[str, Any], tx: Any = None) -> tuple[int, int | None]:
        """The receipt's block, and its timestamp if the answers or the cache tell it."""
        block = _block_of(rec)
        ts = timestamp_from_receipt(rec, tx)
        return block, ts if ts is not None else self._ts.get(_hash_key(rec.get("blockHash")))

    async def _node_head(self) -> int | str:
        """The node's head block, or why it is unknown: asked at most once per
        ``HEAD_TTL_S`` whatever the batches in flight."""
        async with self._head_lock:
            if self._head is not None and time.monotonic() - self._head[0] < HEAD_TTL_S:
                return self._head[1]
            (answer,) = await self._many([Call("eth_blockNumber", [])])
            if isinstance(answer, CallError):
                return answer.message
            try:
                head = quantity(answer, "the node's answer to eth_blockNumber")
            except QuantityError as exc:
                return str(exc)
            self._head = (time.monotonic(), head)
            return head

    async def _judge_nulls(self, out: Collector) -> None:
        """Settle the ``not_found`` failures waiting in ``out``: a ``null`` about a block
        above the node's head is ``beyond_head`` (the node has not reached it), and with
        the head unknown it is ``rpc_error``; either way the ref stays in the gap."""
        if not out.unproven:
            return
        head = await self._node_head()
        for failure, block, known in out.unproven:
            if isinstance(head, str):
                out.failures.append(replace(failure, reason="rpc_error", last_error=(
                    f"{failure.last_error}, and the node's head could not be asked ({head}): "
                    "without it a null proves nothing; tried again later")))  # fmt: skip
            elif block > head:
                out.failures.append(replace(failure, reason="beyond_head",
                                            last_error=beyond_head_error(block, head)))
            elif known is not None:
                # The node answered the receipt: it knows the transaction, and the null came
                # from a backend behind (a load balancer's), as _no_receipt has it the other
                # way round. The ref stays in the gap.
                out.failures.append(replace(failure, reason="rpc_error", last_error=(
                    f"{failure.last_error}, but {known}; tried again later")))
            else:
                out.failures.append(failure)
        out.unproven.clear()

    def _metered(self) -> bool:
        return bool(self.plan.calls_metered)

    def _normalise(
        self, out: Collector, ref: Ref, tx: Mapping[str, Any], receipt: Mapping[str, Any], ts: int | None,
        *, rider: bool = False,
    ) -> tuple[TxRow, list[LogRow]] | None:
        """Make the ref's row and settle it with it (returned too); ``rider``: a ref that is not
        the batch's, which never fails it (its own batch finds it still in the gap)."""
        try:
            row, logs = normalise_tx(self.chain_id, tx, receipt, ts, self.decoder)
        except MalformedAnswer:
            if rider:
                return None  # its own batch meets it, and says so
            raise  # the same answer every time: its batch's last attempt isolates it
        except NormaliseError as exc:
            # Transaction and receipt disagree (a reorg between the calls, or a lagging
            # node): transient, the ref stays in the gap for the next attempt.
            if not rider:
                out.fail(_failure(ref, f"inconsistent answers: {exc}"))
            return None
        if row.block_timestamp is not None:
            self._remember(row.block_hash, row.block_timestamp)
        out.row(ref, row, logs, rider=rider)
        return row, logs

    # -- plans ---------------------------------------------------------------------

    def _block_plan_threshold(self) -> int:
        return self.plan.block_plan_min_refs if self._metered() else self.plan.block_plan_min_refs_free

    async def _probe_block_receipts(self, refs: Sequence[Ref]) -> None:
        """Ask the node whether it has ``eth_getBlockReceipts`` the first time a batch could
        take the per-block plan (never, without a rate limit, unless it is forced)."""
        shape = self.plan.shape
        if self._block_receipts_probed or shape == "per_tx":
            return
        if shape == "auto" and len(refs) < self._block_plan_threshold():
            return
        first = min((r.block_number for r in refs if r.block_number is not None), default=None)
        if first is None:
            return
        async with self._probe_lock:
            if not self._block_receipts_probed:
                await self.client.probe_block_receipts(first)
                self._block_receipts_probed = True

    def may_fetch_blocks(self) -> bool:
        """Whether a batch may take the per-block plan at all (``--plan per_block``, or calls
        metered under ``auto``): only then are a batch's riders worth looking up."""
        shape = self.plan.shape
        if self._block_receipts_probed and not self.client.supports_block_receipts():
            return False
        return shape == "per_block" or (shape == "auto" and self._metered())

    def split(
        self, refs: Sequence[Ref], riders: Sequence[Ref] = ()
    ) -> tuple[dict[int, list[Ref]], list[Ref]]:
        """Refs for the per-block plan (by block) and for the per-transaction plan.

        ``riders``: refs in the gap that are not the batch's (another contract's of the run,
        or its own contract's beyond the batch's key range) in the blocks of its refs. They
        count towards a block's break-even, and a block fetched whole settles them too, so
        the batch that fetches it first leaves nothing of it to fetch again; a block not
        fetched whole leaves them to their own batches."""
        shape = self.plan.shape
        if shape == "per_tx" or not self.client.supports_block_receipts():
            return {}, list(refs)
        threshold = self._block_plan_threshold()
        by_block: dict[int, list[Ref]] = defaultdict(list)
        per_tx: list[Ref] = []
        for r in refs:
            if r.block_number is None:
                per_tx.append(r)
            else:
                by_block[r.block_number].append(r)
        own = {r.tx_hash for r in refs}
        extra: dict[int, list[Ref]] = defaultdict(list)
        for r in riders:
            if r.block_number in by_block and r.tx_hash not in own:
                own.add(r.tx_hash)  # a transaction two riders share is one
                extra[r.block_number].append(r)
        blocks: dict[int, list[Ref]] = {}
        for b, rs in by_block.items():
            # A block another batch of this process fetched whole, or is fetching, costs
            # nothing where its rows hold these refs (see _per_block), whatever their number.
            shared = b in self._block_rows or b in self._blocks_asked
            if shape == "per_block" or shared or len(rs) + len(extra.get(b, ())) >= threshold:
                blocks[b] = rs + extra.get(b, [])
            else:
                per_tx.extend(rs)
        return blocks, per_tx

    async def enrich(
        self, refs: Sequence[Ref], out: Collector | None = None, riders: Sequence[Ref] = ()
    ) -> Enriched:
        """Enrich ``refs`` with batched calls; the planner picks per block or per transaction.

        ``out``, if given, collects the rows as the answers arrive (see :class:`Collector`).
        ``riders``: see :meth:`split`; their rows are added to the result where a block
        fetched whole holds them (told apart: :attr:`Enriched.rode`), and nothing else is
        asked or recorded for them."""
        out = Collector() if out is None else out
        await self._probe_block_receipts([*refs, *riders])
        blocks, per_tx = self.split(refs, riders)
        if blocks:
            riding = {(r.contract, r.tx_hash) for r in riders}
            per_tx.extend(await self._per_block(blocks, out, riding))
        if per_tx:
            await self._per_tx(per_tx, out)
        await self._judge_nulls(out)
        return out.result()

    async def _per_block(
        self, blocks: dict[int, list[Ref]], out: Collector, riding: AbstractSet[tuple[str, str]] = frozenset()
    ) -> list[Ref]:
        """Fetch ``blocks`` whole; returns the refs they did not settle (none of ``riding``,
        the riders: those are left to their own batches).

        A block this process fetched whole lately, or is fetching for another batch in flight,
        is not asked again where the rows it made hold every ref of this batch in it
        (:attr:`_block_rows`, :attr:`_blocks_asked`): a batch leased before another's commit
        still has the refs that batch's riders settled, and two contracts' batches leased
        together cover the same blocks."""
        leftovers: list[Ref] = []

        def settle(n: int, answers: list[Any]) -> _Rows | None:
            block, receipts = answers
            if not isinstance(block, dict) or not isinstance(receipts, list):
                # Unknown block (one above the node's head too: the ref's number may be
                # wrong, the lookup tells), wrong block number in the refs, or no block
                # receipts after all: the per-transaction plan settles these refs.
                leftovers.extend(r for r in blocks[n] if (r.contract, r.tx_hash) not in riding)
                return None
            ts = _timestamp_of(block, n)
            self._remember(_hash_key(block.get("hash")), ts)
            txs = {t["hash"].lower(): t for t in block.get("transactions", []) if isinstance(t, dict)}
            recs = {r["transactionHash"].lower(): r for r in receipts if isinstance(r, dict)}
            made: _Rows = {}
            for ref in blocks[n]:
                tx, rec = txs.get(ref.tx_hash), recs.get(ref.tx_hash)
                rider = (ref.contract, ref.tx_hash) in riding
                if tx is None or rec is None:
                    if not rider:
                        leftovers.append(ref)
                    continue
                got = self._normalise(out, ref, tx, rec, ts, rider=rider)
                if got is not None:
                    made[ref.tx_hash] = got
            self._keep_rows(n, made)
            return made

        def reuse(n: int, made: _Rows | None) -> bool:
            """Settle block ``n``'s refs from rows another batch's fetch made, if they hold
            every one of this batch's own refs there."""
            if made is None or any(r.tx_hash not in made for r in blocks[n]
                                   if (r.contract, r.tx_hash) not in riding):  # fmt: skip
                return False
            for ref in blocks[n]:
                if ref.tx_hash in made:
                    out.row(ref, *made[ref.tx_hash], rider=(ref.contract, ref.tx_hash) in riding)
            return True

        loop = asyncio.get_running_loop()
        priority = PRIORITY.get()
        mine: dict[int, _Fetching] = {}
        theirs: dict[int, _Fetching] = {}
        for n in sorted(blocks):
            asked = self._blocks_asked.get(n)
            if asked is not None:
                theirs[n] = asked
            elif not reuse(n, self._block_rows.get(n)):
                mine[n] = self._blocks_asked[n] = _Fetching(loop.create_future(), priority)

        def let_go(n: int) -> None:
            """This batch's fetch of block ``n`` is over: no batch waits for it from now on. Once
            it is answered, another batch may ask the block again (its rows lacked some of that
            batch's refs): that fetch, its entry in :attr:`_blocks_asked`, is not this one's."""
            if self._blocks_asked.get(n) is mine[n]:
                del self._blocks_asked[n]

        def answered(n: int, answers: list[Any]) -> None:
            for waiter in set(self._block_waiters):  # the fetch they wait for goes on
                waiter()
            made = settle(n, answers)
            let_go(n)
            if not mine[n].rows.done():
                mine[n].rows.set_result(made)

        def whole(n: int) -> list[Call]:
            return [Call("eth_getBlockByNumber", [hex(n), True]), Call("eth_getBlockReceipts", [hex(n)])]

        async def fetch(ns: Sequence[int]) -> None:
            await self._many_each([(whole(n), functools.partial(answered, n)) for n in ns])

        async def share(n: int, asked: _Fetching) -> None:
            # This batch's lease is kept while the answers it waits for come (hook), and while
            # the fetch is held back or waits its turn as this batch's own requests would (awaited).
            hook, awaited = ANSWERED.get(), AWAITED.get()
            if hook is not None:
                self._block_waiters.append(hook)
            if awaited is not None:
                awaited[asked.priority] += 1
            try:
                await asyncio.wait({asked.rows})  # raises only if this batch is cancelled
            finally:
                if hook is not None:
                    self._block_waiters.remove(hook)
                if awaited is not None:
                    awaited[asked.priority] -= 1
                    if not awaited[asked.priority]:
                        del awaited[asked.priority]
            rows = asked.rows
            made = None if rows.cancelled() or rows.exception() is not None else rows.result()
            if hook is not None:
                hook()
            if not reuse(n, made):  # the batch that asked it stopped, or it lacks some refs
                settle(n, await self._many(whole(n)))

        try:
            await _together([fetch(list(mine)), *(share(n, f) for n, f in theirs.items())])
        finally:
            for n, asked in mine.items():  # not answered (this batch stopped, or a request raised)
                if not asked.rows.done():
                    let_go(n)
                    asked.rows.cancel()
        return leftovers

    def _keep_rows(self, n: int, made: dict[str, tuple[TxRow, list[LogRow]]]) -> None:
        """Keep the rows block ``n`` made for the batches after this one (see
        :meth:`_per_block`), the oldest blocks' let go past :attr:`shared_rows_cap` rows."""
        if not made:
            return
        old = self._block_rows.pop(n, None)
        self._block_rows_n += len(made) - (len(old) if old else 0)
        self._block_rows[n] = made
        while self._block_rows_n > self.shared_rows_cap and len(self._block_rows) > 1:
            _, gone = self._block_rows.popitem(last=False)
            self._block_rows_n -= len(gone)

    async def _per_tx(self, refs: Sequence[Ref], out: Collector) -> None:
        if self._metered():
            await self._per_tx_rounds(refs, out)
            return
        late: list[tuple[Ref, Any, dict[str, Any]]] = []
        step = self.pairs_per_request
        await _together(self._pairs(refs[i : i + step], out, late) for i in range(0, len(refs), step))
        if late:
            await self._with_headers(late, out)

    async def _pairs(
        self, refs: Sequence[Ref], out: Collector, late: list[tuple[Ref, Any, dict[str, Any]]]
    ) -> None:
        """Transaction and receipt of each ref in one request; normalised on arrival."""
        calls: list[Call] = []
        for r in refs:
            calls.append(Call("eth_getTransactionByHash", [r.tx_hash], null_retry=True))
            calls.append(Call("eth_getTransactionReceipt", [r.tx_hash], null_retry=True))
        answers = await self._many(calls)
        for i, ref in enumerate(refs):
            tx = answers[2 * i]
            rec = _receipt(out, ref, answers[2 * i + 1], tx)
            if rec is None:
                continue
            if isinstance(tx, CallError):
                _fail_despite_receipt(out, ref, tx, rec)
                continue
            _, ts = self._block_and_ts(rec, tx)
            if ts is None:
                late.append((ref, tx, rec))
            else:
                self._normalise(out, ref, tx, rec, ts)

    async def _with_headers(self, late: list[tuple[Ref, Any, dict[str, Any]]], out: Collector) -> None:
        """Timestamps from one header per block (those no other answer has told since); a
        header that is not the receipt's block fails the ref (see :func:`_header_stamp`)."""
        cached: dict[str, int] = {}
        wanted: set[int] = set()
        for _, _, rec in late:
            key = _hash_key(rec.get("blockHash"))
            if key in self._ts:
                cached[key] = self._ts[key]
            else:
                wanted.add(_block_of(rec))
        blocks = sorted(wanted)
        headers = await self._many(
            [Call("eth_getBlockByNumber", [hex(b), False], null_retry=True) for b in blocks]
        )
        asked = dict(zip(blocks, headers, strict=True))
        for b, header in asked.items():
            if not isinstance(header, CallError):
                self._remember(_hash_key(header.get("hash")), _timestamp_of(header, b))
        for ref, tx, rec in late:
            stamp = cached.get(_hash_key(rec.get("blockHash")))
            if stamp is None:
                stamp = _header_stamp(out, ref, rec, asked[_block_of(rec)])
            if stamp is not None:
                self._normalise(out, ref, tx, rec, stamp)

    async def _per_tx_rounds(self, refs: Sequence[Ref], out: Collector) -> None:
        """The metered plan (receipts first, then transactions or full blocks; see above), a
        request's refs (a part) at a time: a part's second round is asked as soon as its
        receipts are in, and the receipts of at most :data:`RECEIPTS_AHEAD` parts are asked
        ahead of it. Transactions so complete one request after another through the batch,
        and a stop keeps them; asking every receipt of the batch first (as this plan did)
        kept none until the last receipt was in, at the rate limit seconds or minutes later.
        The calls are the same: a full block one part asks also settles the refs of that
        block the later parts have (see :meth:`_rounds`).

        A part is what one request carries: ``--rpc-batch-size`` refs, or fewer where the
        client cuts requests smaller (one second of an ``--rps``: 20 calls at 20 rps). Parts
        of 100 refs at 20 rps were 5 requests each, and the 10 requests of receipts asked
        ahead held every transaction back for 10 s."""
        step = min(self.calls_per_request, self.client.request_cap())
        parts = [refs[i : i + step] for i in range(0, len(refs), step)]
        turns = [asyncio.Event() for _ in parts]
        fulls: dict[int, asyncio.Future[Any]] = {}

        async def part(k: int) -> None:
            if k >= RECEIPTS_AHEAD:
                await turns[k - RECEIPTS_AHEAD].wait()  # that part's receipts are in
            await self._rounds(parts[k], out, fulls, turns[k].set)

        await _together(part(k) for k in range(len(parts)))

    async def _rounds(
        self,
        refs: Sequence[Ref],
        out: Collector,
        fulls: dict[int, asyncio.Future[Any]],
        receipts_in: Callable[[], None],
    ) -> None:
        """Both rounds of the metered plan for ``refs``; ``receipts_in()`` once the first is
        answered and the second's requests are started. ``fulls``: the full blocks the
        batch's parts asked (the answer, or the :class:`CallError`, once in): a ref in one
        of them waits for it instead of asking for its transaction, as if its part had asked
        the block with the earlier one."""
        answers = await self._many(
            [Call("eth_getTransactionReceipt", [r.tx_hash], null_retry=True) for r in refs]
        )
        with_ts: list[tuple[Ref, dict[str, Any], int]] = []
        without_ts: dict[int, list[tuple[Ref, dict[str, Any]]]] = defaultdict(list)
        riders: dict[int, list[tuple[Ref, dict[str, Any]]]] = defaultdict(list)
        # A receipt still null is no proof that the transaction is unknown: look it up in
        # the second round (one more call, only for these refs) before calling it not found.
        unproven: list[tuple[Ref, CallError]] = []
        for ref, answer in zip(refs, answers, strict=True):
            if isinstance(answer, CallError) and answer.kind == "not_found":
                unproven.append((ref, answer))
                continue
            rec = _receipt(out, ref, answer, None)  # no null receipt gets here (set aside above)
            if rec is None:
                continue
            block, ts = self._block_and_ts(rec)
            if block in fulls:
                riders[block].append((ref, rec))
            elif ts is None:
                without_ts[block].append((ref, rec))
            else:
                with_ts.append((ref, rec, ts))
        loop = asyncio.get_running_loop()
        for b in without_ts:
            fulls[b] = loop.create_future()

        def with_tx(ref: Ref, rec: dict[str, Any], ts: int, answers: list[Any]) -> None:
            (tx,) = answers
            if isinstance(tx, CallError):
                _fail_despite_receipt(out, ref, tx, rec)
            else:
                self._normalise(out, ref, tx, rec, ts)

        def with_block(b: int, items: list[tuple[Ref, dict[str, Any]]], full: Any) -> None:
            if isinstance(full, CallError):
                for ref, _ in items:
                    out.fail(_failure(ref, full), b, known=_block_known(b))
                return
            block_ts = _timestamp_of(full, b)
            self._remember(_hash_key(full.get("hash")), block_ts)
            txs = {t["hash"].lower(): t for t in full.get("transactions", []) if isinstance(t, dict)}
            for ref, rec in items:
                found = txs.get(ref.tx_hash)
                if found is None:
                    out.fail(_failure(ref, f"block {b} does not hold the transaction (reorg?)"))
                else:
                    self._normalise(out, ref, found, rec, block_ts)

        def asked_block(b: int, answers: list[Any]) -> None:
            (full,) = answers
            fulls[b].set_result(full)
            with_block(b, without_ts[b], full)

        def judged(ref: Ref, missing: CallError, answers: list[Any]) -> None:
            out.fail(_no_receipt(ref, missing, answers[0]), ref.block_number)

        def lookup(tx_hash: str) -> list[Call]:
            return [Call("eth_getTransactionByHash", [tx_hash], null_retry=True)]

        partial = functools.partial
        jobs: list[tuple[list[Call], Callable[[list[Any]], None]]] = [
            (lookup(ref.tx_hash), partial(with_tx, ref, rec, ts)) for ref, rec, ts in with_ts
        ]
        jobs += [
            ([Call("eth_getBlockByNumber", [hex(b), True], null_retry=True)], partial(asked_block, b))
            for b in sorted(without_ts)
        ]
        jobs += [(lookup(ref.tx_hash), partial(judged, ref, missing)) for ref, missing in unproven]
        # Each request's transactions are stored as soon as it is answered, not once every
        # request of the round is: with a tight rate limit that is seconds apart. The next
        # part's receipts are let go once these requests are started, so that the client
        # (its slots and rate budget serve in arrival order) sends them after these: let go
        # as the receipts came in, they went first.
        await self._many_each(jobs, queued=receipts_in)
        for b, items in riders.items():
            with_block(b, items, await fulls[b])

    # -- the seed's baseline -------------------------------------------------------

    async def enrich_sequential(self, refs: Sequence[Ref], out: Collector | None = None) -> Enriched:
        """One transaction at a time, one call at a time: the seed's baseline, for comparison;
        ``out`` as in :meth:`enrich`."""
        out = Collector() if out is None else out
        for ref in refs:
            (answer,) = await self._many([Call("eth_getTransactionReceipt", [ref.tx_hash], null_retry=True)])
            (tx,) = await self._many([Call("eth_getTransactionByHash", [ref.tx_hash], null_retry=True)])
            rec = _receipt(out, ref, answer, tx)
            if rec is None:
                continue
            if isinstance(tx, CallError):
                _fail_despite_receipt(out, ref, tx, rec)
                continue
            block, ts = self._block_and_ts(rec, tx)
            if ts is None:
                (header,) = await self._many(
                    [Call("eth_getBlockByNumber", [hex(block), False], null_retry=True)]
                )
                ts = _header_stamp(out, ref, rec, header)
                if ts is None:
                    continue
            self._normalise(out, ref, tx, rec, ts)
        await self._judge_nulls(out)
        return out.result()


def decoder_for(abis: Mapping[str, Sequence[Mapping[str, Any]] | None]) -> Decoder:
    """A decoder with each tracked contract's ABI (and the built-in token events)."""
    return Decoder({a.lower(): abi for a, abi in abis.items() if abi})
