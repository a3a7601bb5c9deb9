"""Databases in the state a run leaves them, for the tests of the next run."""

from __future__ import annotations

from click.testing import CliRunner

from gapfill.cli import cli
from gapfill.model import Enriched, Failure
from gapfill.store import open_store

A = "0x" + "aa" * 20
UNREACHABLE = "http://127.0.0.1:9/"


def all_failed_open_plan(db: str, refs: int = 20) -> list[str]:
    """``refs`` refs of contract ``A`` planned in two batches, both given back (an
    interrupted run's) with every ref failed for good: a rerun has nothing to fetch and asks
    the node nothing. Returns the global options that reach ``db``."""
    base = ["--db", db, "--rpc-url", UNREACHABLE]
    assert CliRunner().invoke(cli, [*base, "contract", "add", A, "--chain-id", "1"]).exit_code == 0
    hashes = [f"0x{i:064x}" for i in range(1, refs + 1)]
    r = CliRunner().invoke(cli, [*base, "import", "-", "--contract", A], input="\n".join(hashes))
    assert r.exit_code == 0, r.output
    with open_store(db) as store:  # the interrupted run: two batches given back, all stored
        run = store.create_run("batch", 1)
        store.plan(run, [(1, A)], batch_size=(refs + 1) // 2)
        for _ in range(2):
            batch = store.lease("w", 60.0)
            assert batch is not None
            assert store.abandon(batch, "worker stopped")
        store.write(Enriched(failures=[Failure(1, h, A, "permanent", "rejected") for h in hashes]))
        store.finish_run(run, "interrupted", 0)
    return base
