"""``enrich --dry-run``: what a run would do, touching nothing."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from gapfill.enrich.fetch import PlanSettings
from gapfill.model import Ref
from gapfill.records import record
from gapfill.store import Store


@record
class DryRunRow:
    chain_id: int
    contract: str
    missing: int
    batches: int
    per_block_refs: int
    blocks: int
    estimated_calls: int
    estimated_seconds: float | None
    #: Of ``missing``, the refs of a transaction a contract above this one in the estimate
    #: also misses: a run fetches it once, so its calls are counted there, not here.
    shared: int = 0
    #: Of ``missing`` (and not ``shared``), the refs in blocks a contract above fetches whole:
    #: the batch that fetches a block stores every ref of the run in it, so their calls are
    #: counted there too.
    riders: int = 0
    #: The contract has an open plan, which a run joins: ``batches`` are then the new ones it
    #: cuts for the ``outside`` refs of the gap that no open batch's key range holds (the
    #: transient failures of its done batches, refs imported or put back since).
    joins: bool = False
    outside: int = 0


def estimate(
    store: Store,
    targets: list[tuple[int, str]],
    *,
    batch_size: int,
    plan: PlanSettings,
    block_receipts: bool = True,
    rps_total: float | None = None,
    retry_failed: bool = False,
) -> list[DryRunRow]:
    """Missing refs, batches and RPC calls per contract, from the planner's rules
    (with ``retry_failed``, the permanently failed refs count as missing too).

    A block is fetched whole (2 calls) where the refs of the run in it, every contract's
    together, reach the break-even: the first batch that has a ref in it fetches it and
    stores them all (``Enricher.split``'s riders), so its calls count with the first of
    ``targets`` that has refs in it (that contract's batches come first). A run looks riders
    up only where a batch may fetch blocks whole at all (``Enricher.may_fetch_blocks``:
    ``--plan per_block``, or calls metered): with free calls under ``auto`` each contract's
    refs in a block reach the break-even on their own (each contract's fetch of it counted),
    or are fetched one by one. Other refs cost 2 calls each (receipt and transaction; a
    timestamp header per block only where receipts' logs carry none, which this estimate
    does not know in advance). A transaction two contracts share is counted once, as a run
    fetches it once (the second contract's batch finds it stored, gone from its gap): with
    the first of ``targets`` that has it.
    """
    threshold = plan.block_plan_min_refs if plan.calls_metered else plan.block_plan_min_refs_free
    whole_blocks = block_receipts and plan.shape != "per_tx"
    riding = plan.shape == "per_block" or plan.calls_metered

    @dataclass
    class Tally:
        missing: int = 0
        unknown: int = 0
        shared: int = 0
        per_block: Counter[int] = field(default_factory=Counter)

    tallies: list[Tally] = []
    failed_before: dict[int, set[str]] = {}
    #: Per target with an open plan, the gap refs outside its open batches, per stretch.
    outside: list[list[int] | None] = []
    for i, (chain_id, contract) in enumerate(targets):
        t = Tally()
        before = [c for cid, c in targets[:i] if cid == chain_id]
        gap: Iterable[tuple[int | None, int, int]] = store.gap_blocks(chain_id, contract, before)
        failed: list[Ref] = []
        if retry_failed:  # not in the gap: the two never count a ref twice
            seen = failed_before.setdefault(chain_id, set())
            failed = list(store.iter_failed_refs(chain_id, contract))
            gap = itertools.chain(gap, [(ref.block_number, 1, int(ref.tx_hash in seen)) for ref in failed])
            seen.update(ref.tx_hash for ref in failed)
        # A run joining an open plan cuts new batches for the gap outside its open ones.
        outside.append(store.gap_outside_open_batches(chain_id, contract, [r.key for r in failed]))
        for block, n, counted_above in gap:
            t.missing += n
            t.shared += counted_above
            if n == counted_above:
                continue
            if block is None:
                t.unknown += n - counted_above
            else:
                t.per_block[block] += n - counted_above
        tallies.append(t)
    # Per chain and block, the refs of every target in it, in the targets' order.
    in_block: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, ((chain_id, _), t) in enumerate(zip(targets, tallies, strict=True)):
        for block, n in t.per_block.items():
            in_block.setdefault((chain_id, block), []).append((i, n))
    calls = [2 * t.unknown for t in tallies]
    pb_refs = [0] * len(targets)
    blocks = [0] * len(targets)
    riders = [0] * len(targets)
    for held in in_block.values():
        # Without riders each contract's batches judge the block by their own refs in it.
        for group in [held] if riding else [[h] for h in held]:
            if whole_blocks and (plan.shape == "per_block" or sum(n for _, n in group) >= threshold):
                first = group[0][0]
                calls[first] += 2
                blocks[first] += 1
                for i, n in group:
                    if i == first:
                        pb_refs[i] += n
                    else:
                        riders[i] += n
            else:
                for i, n in group:
                    calls[i] += 2 * n
    rows = []
    for i, ((chain_id, contract), t) in enumerate(zip(targets, tallies, strict=True)):
        secs = calls[i] / rps_total if rps_total else None
        stretches = outside[i]
        if stretches is None:
            joins, batches, out = False, math.ceil(t.missing / batch_size), 0
        else:  # as the plan cuts them: no batch takes refs of two stretches
            joins, batches, out = True, sum(math.ceil(n / batch_size) for n in stretches), sum(stretches)
        rows.append(DryRunRow(chain_id, contract, t.missing, batches, pb_refs[i], blocks[i], calls[i], secs,
                              t.shared, riders[i], joins, out))  # fmt: skip
    return rows
