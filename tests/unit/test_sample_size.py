"""The start-up sample of a concurrent run takes the gap's first 20 refs, whatever its size."""

from __future__ import annotations

from pathlib import Path

import pytest

from gapfill.engine.run import SAMPLE_REFS, sample_refs
from gapfill.model import Contract, Ref
from gapfill.store import open_store

A = "0x" + "ab" * 20
B = "0x" + "cd" * 20


@pytest.mark.parametrize(
    ("gaps", "expected"),
    [
        ((5,), [(A, 5)]),  # a gap under 20 refs: the sample takes what there is
        ((30_000,), [(A, SAMPLE_REFS)]),  # a hundredth of it was 250 refs, 0.3-0.4 s of the start
        ((12, 30_000), [(A, 12), (B, SAMPLE_REFS - 12)]),  # over the targets, in their order
        ((0, 7), [(B, 7)]),
    ],
)
def test_the_sample_takes_the_gaps_first_20_refs(
    tmp_path: Path, gaps: tuple[int, ...], expected: list[tuple[str, int]]
) -> None:
    # The workers start after the sample, one call at a time: a hundredth of a 32,000-ref gap
    # (and the count of the gap that sized it) took 0.4-0.5 s of a concurrent run's start.
    assert SAMPLE_REFS == 20
    with open_store(f"sqlite:///{tmp_path / 'g.db'}") as store:
        targets = []
        for contract, n in zip((A, B), gaps, strict=False):
            store.add_contract(Contract(1, contract))
            store.add_refs([Ref(1, contract, "0x" + f"{i:064x}", 100 + i // 50) for i in range(n)])
            targets.append((1, contract))
        got = sample_refs(store, targets)
        taken = [(c, sum(1 for r in got if r.contract == c)) for c in (A, B)]
        assert [t for t in taken if t[1]] == expected
        # the first of each contract's gap, in the gap's key order
        for contract, n in expected:
            mine = [r.tx_hash for r in got if r.contract == contract]
            assert mine == ["0x" + f"{i:064x}" for i in range(n)]
