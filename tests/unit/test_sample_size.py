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


@pytest.mark.parametrize("cut", [False, True])
def test_a_sample_that_stores_nothing_counts_its_calls_in_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: bool
) -> None:
    # Its node check (7 calls so far) stalls past its 2 s budget: there is no sample; or a
    # Ctrl+C cuts it (``cut``), its rows not written. Its calls were made, but counted only in
    # the coordinator's totals, which the run's recorded calls (finish_run, the summary's
    # "calls:") replace: they were lost.
    import asyncio

    from gapfill.engine import run
    from gapfill.settings import EndpointSetting

    async def stalls(*args: object) -> int:
        await asyncio.sleep(10)
        return 1

    monkeypatch.setattr(run, "SAMPLE_BUDGET_S", 5.0 if cut else 0.05)
    monkeypatch.setattr(run, "_ready", stalls)
    monkeypatch.setattr(run, "_rpc_totals", lambda client: (7, 0, 0))
    db = f"sqlite:///{tmp_path / 'g.db'}"
    with open_store(db) as store:
        store.add_contract(Contract(1, A))
        store.add_refs([Ref(1, A, "0x" + f"{i:064x}", 100) for i in range(10)])
        run_id = store.create_run("concurrent", 2, chain_id=1)
        store.counts_for_run = run_id
        job = run.EnrichJob(db, (EndpointSetting("http://127.0.0.1:9/"),), ((1, A),), 1, run_id=run_id)

        async def sample() -> object:
            task = asyncio.create_task(run._measure_sequential(job, store, lambda ev: None))
            if cut:
                asyncio.get_running_loop().call_later(0.05, task.cancel)
            return await task

        if cut:
            with pytest.raises(asyncio.CancelledError):
                asyncio.run(sample())
        else:
            got = asyncio.run(sample())
            assert isinstance(got, run._Sample) and got.rate == 0 and got.calls == 7
        assert store.finish_run(run_id, "done").calls == 7
