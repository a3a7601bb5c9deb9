"""A node behind the refs loses no transaction: refs in blocks it has not reached stay in the gap.

The refs come from an import (an explorer's CSV), the node used to enrich them lags
(``--lag-blocks``: the provider emulator says its head is ``LAG`` blocks below anvil's
and answers ``null`` for every transaction, receipt and block above that). The refs
above its head must end ``beyond_head`` (transient, still in the gap), never as
permanent ``not_found`` failures; the others are stored exactly; the run says in one
sentence how many refs wait for the node and ends as a run with refs left in the gap
does (exit 3); a rerun against the node caught up (anvil itself) fills the rest.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from engine_support import emulator, emulator_stats, exactness_problems, gapfill, node_truth

from gapfill.store import open_store
from gapfill.wording import counted

LAG = 2  # blocks the node is behind
BELOW, ABOVE = 40, 20  # refs in blocks it has, and at most this many in blocks it has not


def _failure_reasons(db: str) -> Counter[str]:
    with open_store(db) as store:
        return Counter(f.reason for f, _ in store.list_failures(None, None, 10_000))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("plan", ["per_tx", "per_block"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_refs_above_a_lagging_node_head_stay_in_the_gap_until_it_catches_up(
    backend: str, plan: str, small_chain: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    chain = small_chain.chain
    head = chain.head - LAG  # the lagging node's
    db = (f"sqlite:///{tmp_path / 'g.db'}" if backend == "sqlite"
          else request.getfixturevalue("pg_url"))  # fmt: skip
    txs = sorted(chain.direct[chain.token])
    below = [h for h in txs if chain.tx_block[h] <= head][:BELOW]
    above = [h for h in txs if chain.tx_block[h] > head][:ABOVE]
    assert len(below) == BELOW and len(above) >= 5, "the chain has too few refs above the lagging head"
    hashes = below + above
    refs = tmp_path / "refs.csv"
    refs.write_text("hash,block_number\n" + "".join(f"{h},{chain.tx_block[h]}\n" for h in hashes))
    mode = ["--mode", "batch"] if backend == "sqlite" else ["--mode", "concurrent", "--workers", "2"]
    enrich = ["enrich", *mode, "--plan", plan]
    out = ""
    with emulator(small_chain.url, "--lag-blocks", str(LAG)) as (rpc, _):
        for step, args in enumerate((["contract", "add", chain.token],
                                     ["import", str(refs), "--contract", chain.token])):  # fmt: skip
            rc, said = gapfill(["--db", db, "--rpc-url", rpc, *args], tmp_path, f"step{step}")
            out += said
            assert rc == 0, out
        rc, said = gapfill(["--db", db, "--rpc-url", rpc, *enrich], tmp_path, "lagging", timeout_s=180)
        out += said
        stats = emulator_stats(rpc)
    assert stats["faults"]["beyond_head"] > 0, stats  # the lag was there
    # Refs left in the gap end the run as they always do (exit 3), and it says why, once.
    assert rc == 3, out
    sentence = (f"{counted(len(above), 'ref')} are in blocks the node has not reached yet (its head was "
                f"{head} when last asked): rerun once it has caught up to fill them")  # fmt: skip
    assert out.count(sentence) == 1, out
    with open_store(db) as store:
        (st,) = store.status()
    assert (st.refs, st.enriched, st.missing, st.failed) == (len(hashes), BELOW, len(above), 0), out
    assert _failure_reasons(db) == {"beyond_head": len(above)}
    rc, said = gapfill(["--db", db, "failures"], tmp_path, "failures")
    assert rc == 0 and said.count("beyond_head (transient, still in the gap") == len(above), said
    problems = exactness_problems(db, chain.chain_id, node_truth(small_chain.url, below), below)
    assert not problems, "\n".join(problems)

    # The node has caught up: a rerun fills the rest, and nothing is left failed.
    rc, said = gapfill(["--db", db, "--rpc-url", small_chain.url, *enrich], tmp_path, "caught_up",
                       timeout_s=180)  # fmt: skip
    assert rc == 0, said
    assert "not reached yet" not in said, said
    with open_store(db) as store:
        (st,) = store.status()
    assert (st.refs, st.enriched, st.missing, st.failed) == (len(hashes), len(hashes), 0, 0), said
    assert not _failure_reasons(db)
    problems = exactness_problems(db, chain.chain_id, node_truth(small_chain.url, hashes), hashes)
    assert not problems, "\n".join(problems)
