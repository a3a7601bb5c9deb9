"""Block-range coverage: interval arithmetic and the report ``gapfill status`` shows.

Ranges are inclusive ``(from_block, to_block)`` pairs of ints; ``[1, 5]`` and
``[6, 9]`` touch and merge into ``[1, 9]``.

What each discovery method sees (:data:`SEES`) decides what its coverage means.
A transaction can belong to a contract in four ways: sent straight to it
(``direct``), the contract emitted a log in it (``events``), an internal call
carrying ETH reached it (``value``), or one carrying none did (``calls``):

* ``logs`` sees ``events``; ``blocks`` sees ``direct``;
* ``explorer`` sees ``direct`` and ``value`` (``txlist`` and ``txlistinternal``:
  Etherscan lists only internal calls that carry ETH, Blockscout too unless asked);
* ``trace`` sees every call frame, so all four.

A block range is **complete** once the methods that scanned it see, between
them, every transaction sent to the contract and every one in which it emitted an
event (:data:`COMPLETE_KINDS`): ``trace`` alone, ``logs`` with ``blocks``, or
``logs`` with ``explorer``. A range scanned only by methods that see less (``logs``,
``blocks`` or ``explorer`` alone) is **partial**. Internal calls that carry no ETH
and emit nothing are seen by ``trace`` alone.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

from gapfill.model import CoverageRange
from gapfill.model import Interval as Interval  # here too: the store merges its rows with it
from gapfill.model import merge as merge
from gapfill.store import Store
from gapfill.wording import counted

#: Every method discovery knows, in the order the CLI lists them.
METHODS: tuple[str, ...] = ("logs", "blocks", "trace", "explorer")

#: The kinds of transaction each method finds (see the module docstring).
SEES: dict[str, frozenset[str]] = {
    "logs": frozenset({"events"}),
    "blocks": frozenset({"direct"}),
    "trace": frozenset({"direct", "events", "value", "calls"}),
    "explorer": frozenset({"direct", "value"}),
}
#: What the methods that scanned a range must see between them for it to be complete.
COMPLETE_KINDS = frozenset({"direct", "events"})

#: Which methods' coverage makes a method's own scan redundant: those that see every kind
#: it sees (trace sees all, so everything; explorer misses zero-value internal calls, so
#: it stands in for ``blocks`` alone).
DOMINATED_BY: dict[str, frozenset[str]] = {
    m: frozenset(n for n in METHODS if SEES[n] >= SEES[m]) for m in METHODS
}


def subtract(base: Iterable[Interval], remove: Iterable[Interval]) -> list[Interval]:
    """The blocks of ``base`` that are not in ``remove`` (both merged first)."""
    cuts = merge(remove)
    out: list[Interval] = []
    first = 0  # cuts wholly below the current range: below every later one too (both sorted)
    for lo, hi in merge(base):
        while first < len(cuts) and cuts[first][1] < lo:
            first += 1
        cur = lo
        for j in range(first, len(cuts)):
            clo, chi = cuts[j]
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
    """Ranges whose methods see every kind in :data:`COMPLETE_KINDS` between them."""
    out = merge((r.from_block, r.to_block) for r in coverage)
    for kind in COMPLETE_KINDS:
        out = intersect(out, covered_by(coverage, (m for m, seen in SEES.items() if kind in seen)))
    return out


def methods_over(
    coverage: Sequence[CoverageRange], spans: Iterable[Interval]
) -> list[tuple[str, list[Interval]]]:
    """``spans`` cut where the methods that scanned them change, as ``(methods, ranges)``
    with ``methods`` joined by ``+`` in :data:`METHODS` order (``blocks+explorer``)."""
    by_method = ranges_by_method(coverage)
    edges = sorted({b for ranges in by_method.values() for lo, hi in ranges for b in (lo, hi + 1)})
    starts = {m: [lo for lo, _ in ranges] for m, ranges in by_method.items()}
    groups: dict[str, list[Interval]] = {}

    def scanned(method: str, block: int) -> bool:
        # Merged, so sorted and disjoint: the one range that may hold it starts at or below it.
        i = bisect_right(starts.get(method, ()), block) - 1
        return i >= 0 and by_method[method][i][1] >= block

    # By bisection (each span's edges, each block's range): scanning every edge for each
    # span and every range for each block took `status` ~30 s at 10,000 ranges.
    for lo, hi in merge(spans):
        inner = edges[bisect_right(edges, lo):bisect_right(edges, hi)]
        for a, b in pairwise([lo, *inner, hi + 1]):
            names = "+".join(m for m in METHODS if scanned(m, a))
            groups.setdefault(names, []).append((a, b - 1))
    return [(names, merge(ranges)) for names, ranges in groups.items()]


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
    # Blocks below the start block a `--from-block` scanned (or scanned before the start
    # block was raised): not in the window, but said, as a scan that was asked for and
    # recorded showed nowhere ("blocks 100-205" after scanning 90-95).
    below = intersect(scanned, [(0, start_block - 1)]) if start_block > 0 else []
    also = (f"{counted(size(below), 'block')} below the start block {start_block} scanned too "
            f"({fmt_ranges(below)})" if below else "")  # fmt: skip
    above = [(lo, hi) for lo, hi in scanned if hi >= start_block]
    end = head if head is not None else (above[-1][1] if above else None)
    if end is None or end < start_block:
        if end is None and below:
            summary = f"no block from the start block {start_block} on scanned yet"
        else:
            summary = "no block range scanned yet" if not scanned else "nothing to scan below the head"
        return {"complete": [], "partial": [], "unscanned": [], "below_start": [[lo, hi] for lo, hi in below],
                "summary": "; ".join(filter(None, (summary, also)))}
    window = [(start_block, end)]
    complete = intersect(complete_ranges(coverage), window)
    partial = subtract(intersect(scanned, window), complete)
    unscanned = subtract(window, scanned)
    total = end - start_block + 1
    parts = [f"blocks {start_block}-{end}: {size(complete):,}/{total:,} complete"]
    if partial:
        which = "; ".join(f"{names} only: {fmt_ranges(ranges)}"
                          for names, ranges in methods_over(coverage, partial))  # fmt: skip
        parts.append(f"{size(partial):,} partial ({which})")
    if unscanned:
        parts.append(f"{size(unscanned):,} unscanned ({fmt_ranges(unscanned)})")
    if also:
        parts.append(also)
    return {
        "complete": [[lo, hi] for lo, hi in complete],
        "partial": [[lo, hi] for lo, hi in partial],
        "unscanned": [[lo, hi] for lo, hi in unscanned],
        "below_start": [[lo, hi] for lo, hi in below],
        "summary": "; ".join(parts),
    }


def coverage_report(
    store: Store, chain_id: int, contract: str, head: int | None = None
) -> dict[str, Any]:
    """Which blocks of ``contract`` discovery has scanned, and how well.

    Returns ``complete``, ``partial`` and ``unscanned``: lists of inclusive
    ``[from, to]`` ranges between the contract's ``start_block`` (or 0) and
    ``head`` (or, when ``head`` is None, the highest block any method covered),
    ``below_start``, the ranges scanned below the start block (a ``--from-block`` under it),
    and ``summary``, one line of text. A range is complete once ``trace``, or ``logs``
    with ``blocks`` or ``explorer``, scanned it; partial when only a method that sees
    less did (see the module docstring).
    """
    tracked = store.get_contract(contract, chain_id)
    return report(store.get_coverage(chain_id, contract), tracked.start_block or 0, head)
