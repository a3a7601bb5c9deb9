"""What a rerun says of an open plan whose batches have nothing left to fetch."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures_runs import all_failed_open_plan

from gapfill.cli import cli
from gapfill.store import open_store


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_a_rerun_closes_an_open_plan_with_nothing_left_and_asks_the_node_nothing(
    tmp_path: Path, mode: str
) -> None:
    # A Ctrl+C in batch mode gave back batches with all they had fetched: they stayed
    # pending, so the rerun said "2 open batches", needed the node (and failed when it was
    # down, though nothing was missing), and leased them for nothing.
    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = all_failed_open_plan(db)
    workers = ["--workers", "2"] if mode == "concurrent" else []
    r = CliRunner().invoke(cli, [*base, "enrich", "--mode", mode, *workers])
    assert r.exit_code == 3, r.output  # complete, with permanent failures: nothing to fetch
    assert "error:" not in r.output and "could not reach" not in r.output, r.output
    assert "0 open batches" in r.output and "Assigned batch" not in r.output, r.output
    with open_store(db) as store:
        assert not store.has_open_batches()
        assert [e.event for e in store.lease_events()].count("emptied") == 2
