"""Under ``--rps`` the planner fetches whole blocks; a block that several contracts of a run
have refs in is fetched once, and ``enrich --dry-run`` says the calls the run makes.

QA's run of two contracts whose transactions share blocks made 808 calls where the dry run
had said 370 + 370: each contract's batches fetched the same whole blocks again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from engine_support import emulator, emulator_stats, seed

from conftest import NodeChain
from gapfill.cli import cli

#: Calls a run makes whatever its gap: the start-up check (chain id, the two methods asked
#: with a hash no transaction has) and the probe of eth_getBlockReceipts.
FETCHES = ("eth_getBlockByNumber", "eth_getBlockReceipts", "eth_getTransactionByHash",
           "eth_getTransactionReceipt")  # fmt: skip


def _gapfill(db_url: str, rpc_url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--db", db_url, "--rpc-url", rpc_url, "--rps", "1000000", *args],
                                catch_exceptions=False)  # fmt: skip
    return result.exit_code, result.output


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {m: after.get(m, 0) - before.get(m, 0) for m in after if after.get(m, 0) != before.get(m, 0)}


@pytest.mark.parametrize("batch_size", ["100", "500"])
def test_a_block_two_contracts_share_is_fetched_once(
    db_url: str, small_chain: NodeChain, tmp_path: Path, batch_size: str
) -> None:
    """Token's and Silent's refs crowd the same blocks. With batches of 100 the batches of
    one contract come one after another; with 500, every batch of both is in flight at once
    (batch mode keeps 4). Either way each block is asked once, and the dry run's estimate
    is the calls the run makes to fetch the gap."""
    chain = small_chain.chain
    seeded = seed(db_url, chain)
    blocks = {chain.tx_block[h] for h in seeded.hashes}
    with emulator(small_chain.url) as (url, _):
        code, out = _gapfill(db_url, url, "enrich", "--dry-run", "--batch-size", batch_size)
        assert code == 0, out
        estimated = sum(int(n.replace(",", "")) for n in re.findall(r"~([\d,]+) RPC calls", out))
        before = emulator_stats(url)["methods"]
        code, out = _gapfill(db_url, url, "enrich", "--mode", "batch", "--batch-size", batch_size, "-q")
        assert code == 0, out
        made = _delta(emulator_stats(url)["methods"], before)
    assert made["eth_getBlockByNumber"] == len(blocks), made
    assert made["eth_getBlockReceipts"] == len(blocks) + 1, made  # and its probe, once
    # The start-up check asks each of the two per-transaction methods once (a hash no
    # transaction has); the probe of eth_getBlockReceipts is no fetch either.
    fetched = sum(made.get(m, 0) for m in FETCHES) - 3
    assert fetched == estimated, (made, out)
