"""Interval arithmetic and the coverage report."""

from __future__ import annotations

from typing import cast

import pytest

from gapfill.discover.coverage import DOMINATED_BY, chunks, intersect, merge, report, size, subtract
from gapfill.discover.explorer import ExplorerConfig
from gapfill.discover.run import choose_methods, plan_todo
from gapfill.model import CoverageRange
from gapfill.rpc import RpcClient


def cov(lo: int, hi: int, method: str) -> CoverageRange:
    return CoverageRange(1, "0xc", lo, hi, method)


def test_merge_joins_overlapping_and_touching_ranges() -> None:
    assert merge([(6, 9), (1, 5), (20, 30), (25, 26), (11, 12), (3, 2)]) == [(1, 9), (11, 12), (20, 30)]
    assert merge([]) == []


def test_subtract() -> None:
    assert subtract([(0, 100)], [(10, 20), (30, 40)]) == [(0, 9), (21, 29), (41, 100)]
    assert subtract([(0, 100)], [(0, 100)]) == []
    assert subtract([(0, 10)], [(5, 50)]) == [(0, 4)]
    assert subtract([(5, 10), (20, 30)], [(0, 7), (25, 25)]) == [(8, 10), (20, 24), (26, 30)]
    assert subtract([(0, 10)], []) == [(0, 10)]


def test_intersect_and_size_and_chunks() -> None:
    assert intersect([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]
    assert intersect([(0, 3)], [(4, 9)]) == []
    assert size([(0, 9), (5, 14)]) == 15
    assert chunks([(0, 9), (20, 22)], 4) == [(0, 3), (4, 7), (8, 9), (20, 22)]
    with pytest.raises(ValueError):
        chunks([(0, 1)], 0)


def test_report_splits_complete_partial_and_unscanned() -> None:
    coverage = [cov(0, 50, "logs"), cov(10, 20, "blocks"), cov(15, 30, "trace"), cov(60, 70, "explorer")]
    r = report(coverage, 5, 100)
    # logs with blocks (10-20) and trace (15-30) are complete; the explorer alone is not: it
    # lists no internal call that carries no ETH, so a token called by a router is unseen.
    assert r["complete"] == [[10, 30]]
    assert r["partial"] == [[5, 9], [31, 50], [60, 70]]
    assert r["unscanned"] == [[51, 59], [71, 100]]
    assert r["summary"] == ("blocks 5-100: 21/96 complete; 36 partial (logs only: 5-9, 31-50; "
                            "explorer only: 60-70); 39 unscanned (51-59, 71-100); 5 blocks below the "
                            "start block 5 scanned too (0-4)")  # fmt: skip
    assert r["below_start"] == [[0, 4]]


def test_the_summary_writes_its_counts_with_thousands_separators() -> None:
    # "20039/20039 complete", "11301 unscanned" beside "20,000 blocks" in the same output.
    r = report([cov(0, 8_737, "trace"), cov(10_000, 12_000, "logs")], 0, 20_038)
    assert r["summary"] == ("blocks 0-20038: 8,738/20,039 complete; 2,001 partial (logs only: "
                            "10000-12000); 9,300 unscanned (8738-9999, 12001-20038)")  # fmt: skip


def test_blocks_scanned_below_the_start_block_are_said() -> None:
    # `discover --from-block 90 --to-block 95` on a contract that starts at 100 stored its
    # coverage, and status and the summary showed "blocks 100-205" only.
    r = report([cov(100, 205, "trace"), cov(90, 95, "blocks")], 100, 205)
    assert r["summary"] == ("blocks 100-205: 106/106 complete; 6 blocks below the start block 100 "
                            "scanned too (90-95)")  # fmt: skip
    assert r["below_start"] == [[90, 95]] and r["complete"] == [[100, 205]]
    # Before anything from the start block on is scanned, and without a head to stop at.
    r = report([cov(90, 95, "blocks")], 100, None)
    assert r["summary"] == ("no block from the start block 100 on scanned yet; 6 blocks below the start "
                            "block 100 scanned too (90-95)")  # fmt: skip


def test_only_methods_that_see_direct_calls_and_events_between_them_make_a_range_complete() -> None:
    coverage = [cov(0, 9, "blocks"), cov(10, 19, "explorer"), cov(20, 29, "logs"), cov(20, 24, "blocks"),
                cov(25, 29, "explorer"), cov(30, 39, "blocks"), cov(30, 39, "explorer")]  # fmt: skip
    r = report(coverage, 0, 39)
    assert r["complete"] == [[20, 29]]
    assert r["partial"] == [[0, 19], [30, 39]]
    assert "30 partial (blocks only: 0-9; explorer only: 10-19; blocks+explorer only: 30-39)" in r["summary"]


def test_report_without_head_stops_at_the_highest_covered_block() -> None:
    r = report([cov(0, 9, "blocks"), cov(20, 29, "logs"), cov(30, 39, "trace")], 0, None)
    assert r["complete"] == [[30, 39]]
    assert r["partial"] == [[0, 9], [20, 29]]
    assert r["unscanned"] == [[10, 19]]


def test_report_with_nothing_scanned() -> None:
    assert report([], 0, None)["summary"] == "no block range scanned yet"
    assert report([], 0, None)["unscanned"] == []
    assert report([], 7, 9)["unscanned"] == [[7, 9]]


def test_a_method_skips_only_what_a_method_seeing_as_much_scanned() -> None:
    coverage = [cov(0, 49, "blocks"), cov(0, 79, "logs")]
    assert plan_todo(coverage, [(0, 99)], ("logs", "blocks")) == {"logs": [(80, 99)], "blocks": [(50, 99)]}
    # A block scan sees no internal call: trace scans its blocks again, the default set or not.
    assert plan_todo([cov(0, 99, "blocks")], [(0, 99)], ("trace",)) == {"trace": [(0, 99)]}
    assert plan_todo(coverage, [(0, 99)], ("trace",)) == {"trace": [(0, 99)]}
    assert plan_todo([cov(0, 99, "trace")], [(0, 99)], ("logs", "blocks", "explorer")) == {
        "logs": [], "blocks": [], "explorer": []}
    # The explorer misses zero-value internal calls: it stands in for the block scan alone.
    assert plan_todo([cov(0, 99, "explorer")], [(0, 99)], ("logs", "blocks", "trace")) == {
        "logs": [(0, 99)], "blocks": [], "trace": [(0, 99)]}
    dominated = {m: set(by) for m, by in DOMINATED_BY.items()}
    assert dominated == {"logs": {"logs", "trace"}, "blocks": {"blocks", "trace", "explorer"},
                         "trace": {"trace"}, "explorer": {"explorer", "trace"}}  # fmt: skip


async def test_the_default_set_pairs_the_explorer_with_logs() -> None:
    # No trace backend to probe (so no call is made): the explorer alone would miss a token's
    # calls from a router, which carry no ETH; the log scan sees them by its Transfer events.
    client = cast(RpcClient, object())
    explorer = ExplorerConfig("https://api.example.invalid/api")
    assert await choose_methods(client, "0xc", explorer, ()) == ("logs", "explorer")
    assert await choose_methods(client, "0xc", None, ()) == ("logs", "blocks")
