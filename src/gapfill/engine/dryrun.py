"""``enrich --dry-run``: what a run would do, touching nothing."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from gapfill.enrich.fetch import PlanSettings
from gapfill.store import Store


@dataclass(frozen=True, slots=True)
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

    Per-block refs cost 2 calls per block; per-transaction refs 2 calls each
    (receipt and transaction; a timestamp header per block only where receipts'
    logs carry none, which this estimate does not know in advance). A transaction two
    contracts share is counted once, as a run fetches it once (the second contract's
    batch finds it stored, gone from its gap): with the first of ``targets`` that has it.
    """
    rows = []
    failed_before: dict[int, set[str]] = {}
    for i, (chain_id, contract) in enumerate(targets):
        per_block: Counter[int] = Counter()
        missing = unknown = shared = 0
        before = [c for cid, c in targets[:i] if cid == chain_id]
        gap: Iterable[tuple[int | None, int, int]] = store.gap_blocks(chain_id, contract, before)
        if retry_failed:  # not in the gap: the two never count a ref twice
            seen = failed_before.setdefault(chain_id, set())
            failed = list(store.iter_failed_refs(chain_id, contract))
            gap = itertools.chain(gap, [(ref.block_number, 1, int(ref.tx_hash in seen)) for ref in failed])
            seen.update(ref.tx_hash for ref in failed)
        for block, n, counted_above in gap:
            missing += n
            shared += counted_above
            if n == counted_above:
                continue
            if block is None:
                unknown += n - counted_above
            else:
                per_block[block] += n - counted_above
        threshold = plan.block_plan_min_refs if plan.calls_metered else plan.block_plan_min_refs_free
        calls = 2 * unknown
        pb_refs = blocks = 0
        for _, n in per_block.items():
            if block_receipts and plan.shape != "per_tx" and (
                plan.shape == "per_block" or n >= threshold
            ):
                calls += 2
                pb_refs += n
                blocks += 1
            else:
                calls += 2 * n
        secs = calls / rps_total if rps_total else None
        rows.append(DryRunRow(chain_id, contract, missing, math.ceil(missing / batch_size), pb_refs, blocks,
                              calls, secs, shared))  # fmt: skip
    return rows
