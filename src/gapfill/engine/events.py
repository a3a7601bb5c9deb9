"""Progress events: what the engine tells whoever renders it (the CLI's live view or log lines).

Events are plain frozen records so they cross process boundaries (worker
processes send them through pipes) and carry no rendering logic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field

from gapfill.errors import StoreBusy, StoreDropped, StoreError
from gapfill.model import UNKNOWN_BLOCK_KEY, RefKey
from gapfill.records import record


def key_range(lo: RefKey, hi: RefKey) -> str:
    """``blocks 1200-1288`` (the seed printed offsets here).

    Refs imported without a block number sort after every block.
    """
    if lo[0] == UNKNOWN_BLOCK_KEY:
        return "refs with no block number yet"
    if hi[0] == UNKNOWN_BLOCK_KEY:
        return f"blocks {lo[0]} and up, then refs with no block number yet"
    return f"blocks {lo[0]}-{hi[0]}"


@record
class RunStarted:
    run_id: int
    mode: str
    workers: int
    cores: int
    batches: int
    refs: int
    joined: int
    reason: str = ""


@record
class BatchAssigned:
    worker: int
    batch_id: int
    lo: RefKey
    hi: RefKey
    #: Its refs still in the gap; the batch's planned size when they could not be read (the
    #: read failed, or a stop came first: it is said as it is given back).
    refs: int
    #: Which try of the batch this is: its failed attempts + 1 (:attr:`Batch.tries`), what the
    #: lines say. A lease given back without a failed attempt (a stop's, one whose lease answer
    #: was lost) is not one.
    attempt: int
    #: The lease's number (:attr:`Batch.attempts`, every lease counted): with the owner, the
    #: lease's identity, as its lease checks and ``lease_events`` know it.
    lease: int


@record
class BatchDone:
    worker: int
    batch_id: int
    succeeded: int  # of the batch's own refs (not its riders)
    failed: int
    seconds: float
    committed: bool  # False: the lease was lost and nothing was written
    #: Of what the batch wrote (``succeeded`` and ``rode``), the transactions no other batch
    #: had stored: what the run's ``processed`` counts (a transaction two contracts share is
    #: fetched by both contracts' batches, and stored once).
    stored: int = 0
    #: The transactions of its riders (refs of other batches in the blocks it fetched whole,
    #: ``Enricher.split``) it wrote with its own.
    rode: int = 0


@record
class BatchAbandoned:
    worker: int
    batch_id: int
    error: str
    attempt: int  # which try it was (see :attr:`BatchAssigned.attempt`)
    lease: int  # and the lease's number (:attr:`BatchAssigned.lease`)
    kept: int = 0  # transactions of its own refs the attempt stored before giving the batch back
    kept_failed: int = 0  # and the permanent failures it recorded
    rest: int = 0  # refs it stored nothing for: they stay in the gap, for another attempt
    #: Of what it stored (``kept`` and ``kept_rode``), the transactions no other batch had
    #: stored: what the run's ``processed`` counts (a transaction two contracts share is
    #: fetched by both contracts' batches).
    kept_new: int = 0
    #: What it stored was all the batch had left: the batch is done, not given back.
    closed: bool = False
    #: Why the batch was not given back, if it was not ("" if it was): the give-back failed
    #: (``not_given`` is its error; the lease stays until it expires, ``lease_timeout_s``
    #: after its last renewal, and is taken back then), or ``LEASE_GONE``: the lease had
    #: ended already (it expired and was taken back). Nothing of the attempt was kept then.
    not_given: str = ""
    lease_timeout_s: float = 0.0
    #: The transactions of its riders (see :attr:`BatchDone.rode`) stored with ``kept``.
    kept_rode: int = 0


#: :attr:`BatchAbandoned.not_given` of a batch whose lease had ended before its give-back.
LEASE_GONE = "lease gone"


@record
class BatchesEmptied:
    """A lease call closed ``count`` batches instead of leasing them: nothing of their key
    range was left in the gap (another contract's batch or the start-up sample stored it)."""

    worker: int
    count: int


@record
class WorkerStats:
    """Cumulative counters of one worker (sent every second or so)."""

    worker: int
    pid: int
    processed: int
    failed: int
    calls: int
    retries: int
    rate_limited: int
    elapsed_s: float
    #: Transactions fetched and not stored yet (their batch still fetching, or waiting for
    #: its group's commit): what moves while a long batch is in flight.
    fetched: int = 0


@record
class WorkerExited:
    worker: int
    pid: int
    exitcode: int | None
    restarted: bool
    #: Killed by its coordinator as the user asked (a second Ctrl+C), or ended by the SIGTERM
    #: it sent (the grace period's end, a wait for a connection slot with no batch open) before
    #: its handler was set: not crashed.
    killed: bool = False


@record
class Progress:
    done_batches: int
    total_batches: int
    active_workers: int
    processed: int
    failed: int
    elapsed_s: float
    rate_tx_s: float
    eta_s: float | None
    retries: int = 0
    rate_limited: int = 0
    #: Transactions the workers have fetched and not stored yet (``processed`` and the rate
    #: count stored ones): a run of one batch, or of a few slow ones, said "0/1 batches, 0
    #: tx/s" until its end, with nothing to show that it was fetching.
    fetched: int = 0


@record
class WorkerLostNode:
    """A worker stopped because no RPC node replies (or serves what it needs, or takes the
    API key); ``at_start``:
    its start-up check failed for a reason that may pass (the coordinator restarts it)."""

    worker: int
    message: str
    at_start: bool = False


@record
class WorkerRefused:
    """A worker stopped because the database refuses what it must do until the user fixes
    something (a :class:`gapfill.errors.StoreRefused`: ``what`` happened, ``fix`` what to do):
    a restarted worker, and the others, would meet it too, so the run ends with it."""

    worker: int
    what: str
    fix: str


@record
class WorkerWaitsForSlot:
    """A worker process (``pid``) whose first connection found no connection slot free on
    the database server waits up to ``wait_s`` for one (``what``: the store's sentence). Its
    coordinator says so, and stops it if the other workers finish the plan meanwhile."""

    worker: int
    pid: int
    what: str
    wait_s: float


@record
class Notice:
    """A line worth telling the user (restarts, expired leases, shutdown steps).

    ``waiting``: the run waits on something outside it (another process's lock, a node
    slow to answer); said even with ``--quiet``, which would otherwise sit silent.
    ``once``: said once per run, however many of its worker processes say it (an endpoint
    each of them sets aside).
    ``quiet_too``: said even with ``--quiet`` as well, as it changes what the run does (an
    endpoint set aside for it) or is the one way to reach it (the metrics address of
    ``--metrics-port 0``).
    """

    text: str
    waiting: bool = False
    once: bool = False
    quiet_too: bool = False


def db_retrying(exc: StoreError, doing: str = "") -> Notice:
    """The notice of a run that retries after a store call failed (``doing``: "leasing a
    batch"). A connection that worked and dropped is said as such, not as a database
    error whose URL is to be fixed: the run reconnects on its own. So is what may pass
    (:class:`StoreBusy`: a lock_timeout, the server out of memory), without the fix its
    sentence ends with ("..., then run the command again") while the run retries."""
    if isinstance(exc, StoreDropped | StoreBusy):
        return Notice(f"{exc.what}{f' while {doing}' if doing else ''}; retrying")
    return Notice(f"database error{f' while {doing}' if doing else ''}, retrying: {exc}")


@record
class Logged:
    """A log record of a worker process (``text``: its message, the worker named), on its
    way to the coordinator, which hands it to its own handlers: the CLI's writes whole
    lines on standard error, above the live view. A worker writing to the terminal itself
    would write under the live view and break it."""

    level: int
    logger: str
    text: str
    created: float
    #: The message (without the worker's name) of a record logged with
    #: ``extra={"once": True}``: the coordinator writes it for its first worker only.
    once: str = ""


@record
class RunSummary:
    run_id: int
    mode: str
    workers: int
    processed: int
    failed: int
    permanent_failures: int
    seconds: float
    rate_tx_s: float
    calls: int
    calls_per_tx: float
    state: str  # done | interrupted | failed
    sequential_rate_tx_s: float | None = None
    sequential_rate_source: str = ""
    restarts: int = 0
    notes: list[str] = field(default_factory=list)
    #: Refs left in the gap in blocks the node had not reached (``beyond_head``), and the
    #: node's head as the latest of their failures found it.
    beyond_head: int = 0
    head: int | None = None
    #: An interrupted run whose batches in flight finished within the grace period and left
    #: nothing to do: a rerun would only say "nothing to enrich".
    nothing_left: bool = False
    #: Of a complete run: refs imported or discovered while it worked, after its plan, left
    #: in the gap for a rerun (``engine.run.refs_arrived``). The exit code stays 0: the run
    #: did all it planned.
    arrived: int = 0

    @property
    def speedup(self) -> float | None:
        if not self.sequential_rate_tx_s or self.sequential_rate_tx_s <= 0:
            return None
        return self.rate_tx_s / self.sequential_rate_tx_s


Event = (
    RunStarted | BatchAssigned | BatchDone | BatchAbandoned | BatchesEmptied | WorkerStats | WorkerExited
    | Progress | WorkerLostNode | WorkerRefused | WorkerWaitsForSlot | Notice | Logged | RunSummary
)  # fmt: skip
Emit = Callable[[Event], None]


def ignore(_: Event) -> None:
    """An :data:`Emit` that drops everything."""
