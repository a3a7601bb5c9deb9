"""Block-range coverage: interval arithmetic and the report ``gapfill status`` shows.

Ranges are inclusive ``(from_block, to_block)`` pairs of ints; ``[1, 5]`` and
``[6, 9]`` touch and merge into ``[1, 9]``.

What each discovery method sees decides what its coverage means:

* ``blocks``, ``trace`` and ``explorer`` see every transaction sent to the
  contract, so a range one of them scanned is **complete**;
* ``logs`` sees only transactions in which the contract emitted an event, so a
  range only it scanned is **partial**.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from gapfill.model import CoverageRange
from gapfill.model import Interval as Interval  # here too: the store merges its rows with it
from gapfill.model import merge as merge
from gapfill.store import Store

#: Methods that see every direct call to the contract: their ranges are complete.
COMPLETE_METHODS = frozenset({"blocks", "trace", "explorer"})
#: Every method discovery knows, in the order the CLI lists them.
METHODS: tuple[str, ...] = ("logs", "blocks", "trace", "explorer")

#: Which methods' coverage makes a method's own scan redundant: a method that sees
#: a superset of what another sees (trace sees direct and internal calls, so
#: everything that emitted a log or was sent straight to the contract).
DOMINATED_BY: dict[str, frozenset[str]] = {
    "logs": frozenset({"logs", "trace", "explorer"}),
    "blocks": frozenset({"blocks", "trace", "explorer"}),
    "trace": frozenset({"trace", "explorer"}),
    "explorer": frozenset({"trace", "explorer"}),
}


def subtract(base: Iterable[Interval], remove: Iterable[Interval]) -> list[Interval]:
    """The blocks of ``base`` that are not in ``remove`` (both merged first)."""
    cuts = merge(remove)
    out: list[Interval] = []
    for lo, hi in merge(base):
        cur = lo
        for clo, chi in cuts:
            if chi < cur:
                continue
            if clo > hi:
                break
            if clo > cur:
                out.append((cur, clo - 1))
            cur = max(cur, chi + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append((cur, hi))
    return out


def intersect(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """The blocks in both ``a`` and ``b``."""
    left, right = merge(a), merge(b)
    out: list[Interval] = []
    i = j = 0
    while i < len(left) and j < len(right):
        lo = max(left[i][0], right[j][0])
        hi = min(left[i][1], right[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return out


def size(intervals: Iterable[Interval]) -> int:
    """Number of blocks in ``intervals`` (merged first, so overlaps count once)."""
    return sum(hi - lo + 1 for lo, hi in merge(intervals))


def chunks(intervals: Iterable[Interval], width: int) -> list[Interval]:
    """Cut each interval into pieces of at most ``width`` blocks."""
    if width < 1:
        raise ValueError("width must be at least 1")
    out: list[Interval] = []
    for lo, hi in merge(intervals):
        while lo <= hi:
            out.append((lo, min(hi, lo + width - 1)))
            lo += width
    return out


def ranges_by_method(coverage: Sequence[CoverageRange]) -> dict[str, list[Interval]]:
    """Merged ranges per method."""
    raw: dict[str, list[Interval]] = {}
    for r in coverage:
        raw.setdefault(r.method, []).append((r.from_block, r.to_block))
    return {m: merge(v) for m, v in raw.items()}


def complete_ranges(coverage: Sequence[CoverageRange]) -> list[Interval]:
    """Ranges scanned by a method that sees every direct call."""
    return merge((r.from_block, r.to_block) for r in coverage if r.method in COMPLETE_METHODS)


def covered_by(coverage: Sequence[CoverageRange], methods: Iterable[str]) -> list[Interval]:
    wanted = frozenset(methods)
    return merge((r.from_block, r.to_block) for r in coverage if r.method in wanted)


def fmt_ranges(intervals: Sequence[Interval]) -> str:
    """``0-9, 20, 30-39``: the first three ranges, and how many there are when more."""
    return ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in intervals[:3]) + (
        f", ... ({len(intervals)} ranges)" if len(intervals) > 3 else ""
    )


def report(coverage: Sequence[CoverageRange], start_block: int, head: int | None) -> dict[str, Any]:
    """The pure part of :func:`coverage_report` (unit-testable without a store)."""
    scanned = merge((r.from_block, r.to_block) for r in coverage)
    end = head if head is not None else (scanned[-1][1] if scanned else None)
    if end is None or end < start_block:
        summary = "no block range scanned yet" if not scanned else "nothing to scan below the head"
        return {"complete": [], "partial": [], "unscanned": [], "summary": summary}
    window = [(start_block, end)]
    complete = intersect(complete_ranges(coverage), window)
    partial = subtract(intersect(scanned, window), complete)
    unscanned = subtract(window, scanned)
    total = end - start_block + 1
    parts = [f"blocks {start_block}-{end}: {size(complete)}/{total} complete"]
    if partial:
        parts.append(f"{size(partial)} partial (logs only: {fmt_ranges(partial)})")
    if unscanned:
        parts.append(f"{size(unscanned)} unscanned ({fmt_ranges(unscanned)})")
    return {
        "complete": [[lo, hi] for lo, hi in complete],
        "partial": [[lo, hi] for lo, hi in partial],
        "unscanned": [[lo, hi] for lo, hi in unscanned],
        "summary": "; ".join(parts),
    }


def coverage_report(
    store: Store, chain_id: int, contract: str, head: int | None = None
) -> dict[str, Any]:
    """Which blocks of ``contract`` discovery has scanned, and how well.

    Returns ``complete``, ``partial`` and ``unscanned``: lists of inclusive
    ``[from, to]`` ranges between the contract's ``start_block`` (or 0) and
    ``head`` (or, when ``head`` is None, the highest block any method covered),
    and ``summary``, one line of text. A range is complete once ``blocks``,
    ``trace`` or ``explorer`` scanned it; partial when only ``logs`` did.
    """
    tracked = store.get_contract(contract, chain_id)
    return report(store.get_coverage(chain_id, contract), tracked.start_block or 0, head)
