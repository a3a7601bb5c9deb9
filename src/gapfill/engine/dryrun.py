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
    logs carry none, which this estimate does not know in advance).
    """
    rows = []
    for chain_id, contract in targets:
        per_block: Counter[int] = Counter()
        missing = unknown = 0
        gap: Iterable[tuple[int | None, int]] = store.gap_blocks(chain_id, contract)
        if retry_failed:  # not in the gap: the two never count a ref twice
            failed = store.iter_failed_refs(chain_id, contract)
            gap = itertools.chain(gap, ((ref.block_number, 1) for ref in failed))
        for block, n in gap:
            missing += n
            if block is None:
                unknown += n
            else:
                per_block[block] += n
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
                              calls, secs))  # fmt: skip
    return rows
