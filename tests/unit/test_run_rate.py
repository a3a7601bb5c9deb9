"""A run's summary and `gapfill runs` say one rate: the duration its row records."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from fixtures_runs import A, all_failed_open_plan

from gapfill.engine.events import RunSummary
from gapfill.engine.run import EnrichJob, run_enrich
from gapfill.store import open_store
from gapfill.store.sqlite import SqliteStore


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A run's database whose rerun has nothing to fetch (no node is asked)."""
    url = f"sqlite:///{tmp_path / 'g.db'}"
    all_failed_open_plan(url)
    return url


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "sequential", "concurrent"])
def test_a_runs_summary_says_the_duration_its_row_records(
    db: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # The summary timed the run itself, apart from the row's start and end: the two rates
    # differed (2,493.0 tx/s in the summary, 2,493.1 in `gapfill runs`). Here the database's
    # clock runs 100 s a reading ahead of the process's, so any other measure shows.
    readings = itertools.count()
    monkeypatch.setattr(SqliteStore, "_now", lambda self, cur: 1.7e9 + 100.0 * next(readings))
    seen: list[Any] = []
    summary = run_enrich(EnrichJob(db, (), ((1, A),), 1, mode=mode, workers=1), seen.append)
    assert isinstance(summary, RunSummary) and summary.state == "done"
    with open_store(db) as store:
        run = store.list_runs(1)[0]
    assert run.run_id == summary.run_id and run.finished_at is not None
    assert summary.seconds == run.finished_at - run.started_at >= 100.0
    assert summary.rate_tx_s == (run.rate or 0.0)
