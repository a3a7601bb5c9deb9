"""A node whose receipts lag behind its transactions loses no transaction.

The provider emulator answers ``null`` to each transaction's first four
``eth_getTransactionReceipt`` requests while ``eth_getTransactionByHash`` returns
the transaction mined: more nulls than one attempt's three; or to every request in
the three seconds after the first, more than three attempts back to back take. Those refs must stay
in the gap (``rpc_error``, the batch tried again) and end enriched, exactly as the
node has them, never as permanent ``not_found`` failures. This is QA's
reproduction: ``contract add``, ``import refs.csv``, ``enrich``, through the CLI.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from engine_support import emulator, emulator_stats, exactness_problems, gapfill, node_truth, query

from gapfill.store import open_store

NULLS = 4  # one more than a call's three tries: only a later attempt of the batch gets the receipt
REFS = 60


#: A lag in seconds: longer than a batch's three attempts back to back (three nulls each,
#: 0.75 s), shorter than with the pauses between attempts (1 s, then 2 s) added.
LAG_S = 3.0
LAGS = {
    "four_nulls": (["--null-receipts", str(NULLS)], NULLS * REFS),
    "three_seconds": (["--receipt-lag-s", str(LAG_S)], 3 * REFS),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("lag", sorted(LAGS))
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_lagging_receipts_end_enriched_not_failed(
    backend: str, lag: str, small_chain: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    chain = small_chain.chain
    db = (f"sqlite:///{tmp_path / 'g.db'}" if backend == "sqlite"
          else request.getfixturevalue("pg_url"))  # fmt: skip
    hashes = sorted(chain.direct[chain.token])[:REFS]
    refs = tmp_path / "refs.csv"
    refs.write_text("hash,block_number\n" + "".join(f"{h},{chain.tx_block[h]}\n" for h in hashes))
    # PostgreSQL: worker processes, so the batch given back is leased again by a process.
    enrich = ["enrich"] if backend == "sqlite" else ["enrich", "--mode", "concurrent", "--workers", "2"]
    lag_args, least_nulls = LAGS[lag]
    with emulator(small_chain.url, *lag_args) as (rpc, _):
        out = ""
        for step, args in enumerate((["contract", "add", chain.token],
                                     ["import", str(refs), "--contract", chain.token], enrich)):  # fmt: skip
            rc, said = gapfill(["--db", db, "--rpc-url", rpc, *args], tmp_path, f"step{step}", timeout_s=180)
            out += said
            assert rc == 0, out
        stats = emulator_stats(rpc)
    assert stats["faults"]["null_receipt"] >= least_nulls, stats  # the lag was there
    with open_store(db) as store:
        (st,) = store.status()
    assert (st.refs, st.enriched, st.missing, st.failed) == (REFS, REFS, 0, 0), out
    not_found = "SELECT count(*) FROM failures WHERE reason = 'not_found'"
    if backend == "postgres":
        assert query(db, not_found)[0][0] == 0
    else:
        with sqlite3.connect(tmp_path / "g.db") as conn:
            assert conn.execute(not_found).fetchone()[0] == 0
    problems = exactness_problems(db, chain.chain_id, node_truth(small_chain.url, hashes), hashes)
    assert not problems, "\n".join(problems)
