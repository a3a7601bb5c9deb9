"""`gapfill prune`: delete the plans that are over, and their lease events, once old enough.

Every run that plans adds ``batches`` (one per 500 refs) and ``lease_events`` (several per
batch), and nothing else deletes them: a cron job enriching every few minutes grows them for
ever. What a run reads of them is the open plans alone, and ``gapfill runs`` reads ``runs``,
which a prune keeps: a finished plan is history nobody reads but the audit trail itself.

The plans go in chunks of whole plans, one transaction each (:meth:`Store.delete_plans`):
a short write lock at a time on SQLite, beside the runs of other contracts, and a Ctrl+C
leaves every plan deleted whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from gapfill.signals import HoldFromCommit
from gapfill.store import FinishedPlan, Pruned, Store

#: The batches of the plans one transaction deletes (a plan larger than that alone): on
#: SQLite ~0.1 s of the write lock, with their lease events.
CHUNK_BATCHES = 5_000


def chunks(plans: Sequence[FinishedPlan], size: int = CHUNK_BATCHES) -> Iterator[list[FinishedPlan]]:
    """``plans`` (by lowest batch id) in groups of whole plans of about ``size`` batches, each
    spanning at most twice that many batch ids: a group is read by its range of ids, and the
    open plan of another contract between two finished ones is not read for nothing."""
    group: list[FinishedPlan] = []
    batches = 0
    for p in plans:
        if group and (batches + p.batches > size or p.hi - group[0].lo >= 2 * size):
            yield group
            group, batches = [], 0
        group.append(p)
        batches += p.batches
    if group:
        yield group


def prune(
    store: Store, older_than_s: float, *, dry_run: bool = False,
    done: Callable[[Pruned], None] | None = None, chunk_batches: int = CHUNK_BATCHES,
) -> Pruned:
    """Delete the plans that are over and were last worked on more than ``older_than_s`` ago
    (:meth:`Store.finished_plans`), with their lease events; the runs stay. ``dry_run``: only
    count them. ``done`` is told the running total after each committed chunk, before a
    Ctrl+C held at that commit stops the prune (so the command can say what it kept)."""
    plans = store.finished_plans(older_than_s)
    if dry_run:
        return Pruned(len(plans), sum(p.batches for p in plans), sum(p.events for p in plans))
    total = Pruned()
    for group in chunks(plans, chunk_batches):
        # A Ctrl+C from the commit on is handled once the total counts this chunk.
        with HoldFromCommit():
            total += store.delete_plans(group)
            if done is not None:
                done(total)
    return total
