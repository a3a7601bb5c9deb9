"""Interval arithmetic and the coverage report."""

from __future__ import annotations

import pytest

from gapfill.discover.coverage import chunks, intersect, merge, report, size, subtract
from gapfill.discover.run import plan_todo
from gapfill.model import CoverageRange


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
    assert r["complete"] == [[10, 30], [60, 70]]
    assert r["partial"] == [[5, 9], [31, 50]]
    assert r["unscanned"] == [[51, 59], [71, 100]]
    assert r["summary"].startswith("blocks 5-100: 32/96 complete")
    assert "partial" in r["summary"] and "unscanned" in r["summary"]


def test_report_without_head_stops_at_the_highest_covered_block() -> None:
    r = report([cov(0, 9, "blocks"), cov(20, 29, "logs")], 0, None)
    assert r["complete"] == [[0, 9]]
    assert r["partial"] == [[20, 29]]
    assert r["unscanned"] == [[10, 19]]


def test_report_with_nothing_scanned() -> None:
    assert report([], 0, None)["summary"] == "no block range scanned yet"
    assert report([], 0, None)["unscanned"] == []
    assert report([], 7, 9)["unscanned"] == [[7, 9]]


def test_plan_todo_default_set_skips_complete_ranges() -> None:
    coverage = [cov(0, 49, "blocks"), cov(0, 79, "logs")]
    todo = plan_todo(coverage, [(0, 99)], ("logs", "blocks"), default_set=True)
    assert todo == {"logs": [(80, 99)], "blocks": [(50, 99)]}
    # trace as the default skips what is complete too...
    assert plan_todo(coverage, [(0, 99)], ("trace",), default_set=True) == {"trace": [(50, 99)]}
    # ...but asked for explicitly it scans what only a weaker method covered.
    assert plan_todo(coverage, [(0, 99)], ("trace",), default_set=False) == {"trace": [(0, 99)]}
    assert plan_todo([cov(0, 99, "trace")], [(0, 99)], ("logs", "blocks"), default_set=False) == {
        "logs": [], "blocks": []}
