"""How `auto` chooses a mode, and the default worker count."""

from __future__ import annotations

from gapfill.engine.run import AUTO_CONCURRENT_FROM, choose_mode, default_workers


def test_auto_never_picks_sequential_and_needs_spare_cores_for_processes() -> None:
    assert choose_mode(10, cores=8)[0] == "batch"
    assert choose_mode(AUTO_CONCURRENT_FROM - 1, cores=8)[0] == "batch"
    assert choose_mode(AUTO_CONCURRENT_FROM, cores=8)[0] == "concurrent"
    assert choose_mode(10_000_000, cores=2)[0] == "batch"
    assert all(choose_mode(g, cores=c)[0] != "sequential" for g in (0, 500, 5_000, 10**6) for c in (1, 2, 16))


def test_default_workers_is_75_percent_of_cores_clamped_2_to_8() -> None:
    assert [default_workers(c) for c in (1, 2, 3, 4, 8, 12, 64)] == [2, 2, 2, 3, 6, 8, 8]


def test_auto_says_why_in_the_singular_for_one_ref() -> None:
    # A rerun with one ref left said "mode auto: batch (gap of 1 refs < 20000: ...)".
    assert choose_mode(1, cores=8)[1] == "gap of 1 ref < 20,000: one process is fastest"
    assert choose_mode(25_000, cores=8)[1] == "gap of 25,000 refs >= 20,000 on 8 cores: worker processes"
