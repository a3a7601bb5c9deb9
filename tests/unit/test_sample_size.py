"""The start-up sample of a concurrent run takes a hundredth of the gap (20 to 250 refs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gapfill.engine.run import SAMPLE_MAX_REFS, SAMPLE_REFS, SAMPLE_SHARE, sample_size
from gapfill.model import Contract, Ref
from gapfill.store import open_store

A = "0x" + "ab" * 20
B = "0x" + "cd" * 20


@pytest.mark.parametrize(
    ("gaps", "expected"),
    [
        ((5,), SAMPLE_REFS),  # a gap under 20 refs: the sample takes what there is
        ((1_415,), SAMPLE_REFS),  # the sparse bench gap: a quarter (250 refs) made 0.8 s 2.3 s
        ((8_000,), 80),
        ((20_000, 20_000), SAMPLE_MAX_REFS),  # counted over the targets, and only that far
        ((30_000,), SAMPLE_MAX_REFS),
    ],
)
def test_the_sample_takes_a_hundredth_of_the_gap(
    tmp_path: Path, gaps: tuple[int, ...], expected: int
) -> None:
    # A quarter of the gap, one call at a time, was a large part of a short concurrent run:
    # a run s times faster than sequential is longer by about (s - 1) / SAMPLE_SHARE.
    assert SAMPLE_SHARE == 100
    with open_store(f"sqlite:///{tmp_path / 'g.db'}") as store:
        targets = []
        for contract, n in zip((A, B), gaps, strict=False):
            store.add_contract(Contract(1, contract))
            store.add_refs([Ref(1, contract, "0x" + f"{i:064x}", 100 + i // 50) for i in range(n)])
            targets.append((1, contract))
        assert store.count_gap(1, A, upto=1_000) == min(gaps[0], 1_000)
        assert sample_size(store, targets) == expected
