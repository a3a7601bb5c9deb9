"""What a rerun says of an open plan whose batches have nothing left to fetch."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gapfill.cli import cli
from gapfill.model import Enriched, Failure
from gapfill.store import open_store

A = "0x" + "aa" * 20
UNREACHABLE = "http://127.0.0.1:9/"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_a_rerun_closes_an_open_plan_with_nothing_left_and_asks_the_node_nothing(
    tmp_path: Path, mode: str
) -> None:
    # A Ctrl+C in batch mode gave back batches with all they had fetched: they stayed
    # pending, so the rerun said "2 open batches", needed the node (and failed when it was
    # down, though nothing was missing), and leased them for nothing.
    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = ["--db", db, "--rpc-url", UNREACHABLE]
    assert CliRunner().invoke(cli, [*base, "contract", "add", A, "--chain-id", "1"]).exit_code == 0
    hashes = [f"0x{i:064x}" for i in range(1, 21)]
    r = CliRunner().invoke(cli, [*base, "import", "-", "--contract", A], input="\n".join(hashes))
    assert r.exit_code == 0, r.output
    with open_store(db) as store:  # the interrupted run: two batches given back, all stored
        run = store.create_run("batch", 1)
        store.plan(run, [(1, A)], batch_size=10)
        for _ in range(2):
            batch = store.lease("w", 60.0)
            assert batch is not None
            assert store.abandon(batch, "worker stopped")
        store.write(Enriched(failures=[Failure(1, h, A, "permanent", "rejected") for h in hashes]))
        store.finish_run(run, "interrupted", 0)
    workers = ["--workers", "2"] if mode == "concurrent" else []
    r = CliRunner().invoke(cli, [*base, "enrich", "--mode", mode, *workers])
    assert r.exit_code == 3, r.output  # complete, with permanent failures: nothing to fetch
    assert "error:" not in r.output and "could not reach" not in r.output, r.output
    assert "0 open batches" in r.output and "Assigned batch" not in r.output, r.output
    with open_store(db) as store:
        assert not store.has_open_batches()
        assert [e.event for e in store.lease_events()].count("emptied") == 2
