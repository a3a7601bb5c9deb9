"""What an ``enrich`` run finds instead of work, and the upkeep it does at its start and end
(block numbers, re-decodes) that ``enrich`` does instead of a run when there is none.

Kept apart from :mod:`gapfill.engine.run`, which imports the RPC client (aiohttp, ~0.15 s):
a rerun with nothing to enrich (cron, after a complete run) asks no node and needs none of it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gapfill.engine.events import Emit, Notice
from gapfill.errors import GapfillError
from gapfill.records import record
from gapfill.store import Store
from gapfill.wording import counted

log = logging.getLogger(__name__)


@record
class NothingToEnrich:
    """What an ``enrich`` run of its targets would find instead of work."""

    #: Whether any target has a ref at all (none: nothing was discovered or imported yet).
    has_refs: bool
    #: The targets' permanent failures on record: out of the gap until ``--retry-failed``.
    permanent: int


def nothing_to_enrich(
    store: Store, targets: Sequence[tuple[int, str]], *, retry_failed: bool = False
) -> NothingToEnrich | None:
    """What there is instead of work, when an ``enrich`` run of ``targets`` would have none;
    None when it has some: a ref in a gap, an open plan (an interrupted run's: the run joins
    it, or closes its batches that have nothing left), or with ``retry_failed`` a permanent
    failure to put back into the gap. Without any, a run would ask the node nothing and
    store nothing: ``enrich`` says so instead of recording a run that did nothing."""
    if store.has_open_batches(targets) or any(store.has_gap(c, a) for c, a in targets):
        return None
    permanent = permanent_failures(store, targets)
    if retry_failed and permanent:
        return None
    return NothingToEnrich(any(store.has_refs(c, a) for c, a in targets), permanent)


def permanent_failures(store: Store, targets: Sequence[tuple[int, str]]) -> int:
    """Failures of ``targets`` that are permanent now, whichever run recorded them (exit code 3)."""
    return sum(store.count_permanent_failures(chain_id, contract) for chain_id, contract in targets)


def fill_block_numbers(store: Store, targets: Sequence[tuple[int, str]]) -> None:
    """At a run's end (or instead of a run, when ``enrich`` has nothing to do): refs of
    ``targets`` left without a block number whose transaction is stored (another contract's
    batch stored it first) get its block. Best effort: a conflict with a concurrent writer
    leaves them for the next run."""
    for chain_id, contract in targets:
        try:
            store.fill_block_numbers(chain_id, contract)
        except GapfillError as exc:
            log.info("block numbers of %s not filled this time: %s", contract, exc)


def finish_left_redecodes(store: Store, run_id: int | None, emit: Emit) -> None:
    """Decode again the stored rows of each contract whose ABI changed while they were stored.

    ``contract add --abi`` decodes the rows stored so far, but a run's processes keep the
    decoders they built at their start: the rows they commit afterwards are decoded the old
    way. Each run keeps the ABI versions it started with (``create_run``), which are at most
    as new as any of its processes'. At its start (``run_id`` None) a run finishes what
    others left: the runs that are over (a run killed outright never reached its end) and
    a ``contract add`` cut short, before it stores rows of its own (a contract given its
    ABI before any row was stored costs nothing then, and would cost a pass over the run's
    rows at its end). At its end (its workers gone, so no stale decoder writes after this)
    the run settles itself the same way.
    """
    from gapfill.enrich.redecode import finish_redecodes

    why = ("a run or `contract add` cut short left some decoded with its old ABI" if run_id is None
           else "it was given a new ABI during this run (or one cut short)")  # fmt: skip
    for chain_id, address, done in finish_redecodes(store, run_id):
        if done.txs or done.logs:
            # The chain too: one address may be tracked on several, each decoded apart.
            emit(Notice(f"decoded the stored rows of {address} on chain {chain_id} again "
                        f"({counted(done.txs, 'transaction')} sent to it, "
                        f"{counted(done.logs, 'log')}): {why}"))  # fmt: skip
