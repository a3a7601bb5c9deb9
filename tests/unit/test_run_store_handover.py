"""An in-process run goes on with the command's database connection: no second session
before the node's first call (on PostgreSQL a new server process, its settings and the
schema check), and the connection it is given is always closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fixtures_runs import A, all_failed_open_plan

import gapfill.cli
import gapfill.engine.run as engine_run
import gapfill.store
from gapfill.engine.events import RunSummary
from gapfill.engine.run import EnrichJob, run_enrich
from gapfill.errors import GapfillError
from gapfill.store import Store, open_store


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs the command and the engine open, in order."""
    seen: list[str] = []
    real = gapfill.store.open_store

    def counting(url: str | None = None, **kw: Any) -> Store:
        seen.append(url or "")
        return real(url, **kw)

    for module in (gapfill.cli, engine_run):
        monkeypatch.setattr(module, "open_store", counting)
    return seen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "sequential", "auto"])
def test_an_in_process_run_opens_the_database_once(tmp_path: Path, opened: list[str], mode: str) -> None:
    # The command checked the targets on one connection, closed it, and the run opened
    # another (auto mode a third, to count the gap): each a session's start on the way
    # to the node's first call.
    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = all_failed_open_plan(db)  # an open plan: a run, which asks the node nothing
    opened.clear()
    r = CliRunner().invoke(gapfill.cli.cli, [*base, "enrich", "--mode", mode])
    assert "Run #2 done: mode " in r.output, r.output
    assert r.exit_code == 3  # the failures on record, as before
    assert opened == [db]


class _Given:
    """A database with an open plan, opened to be handed to a run; counts its closes."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.db = f"sqlite:///{tmp_path / 'g.db'}"
        all_failed_open_plan(self.db)
        self.store = open_store(self.db)
        self.closes = 0
        real = self.store.close

        def close() -> None:
            self.closes += 1
            real()

        monkeypatch.setattr(self.store, "close", close)


@pytest.fixture
def given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Given:
    return _Given(tmp_path, monkeypatch)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "auto", "concurrent"])
def test_the_store_a_run_is_given_is_closed_once(given: _Given, opened: list[str], mode: str) -> None:
    opened.clear()
    job = EnrichJob(given.db, (), ((1, A),), 1, mode=mode, workers=1)
    summary = run_enrich(job, lambda ev: None, store=given.store)
    assert isinstance(summary, RunSummary) and summary.state == "done"
    assert given.closes == 1
    # A concurrent run's coordinator opens its own (its workers too, in their processes).
    assert opened == ([given.db] if mode == "concurrent" else [])


@pytest.mark.timeout(60)
def test_a_store_given_to_a_run_that_never_starts_is_closed(given: _Given) -> None:
    job = EnrichJob(given.db, (), ((1, A),), 1, mode="nonsense")
    with pytest.raises(GapfillError, match="unknown mode"):
        run_enrich(job, lambda ev: None, store=given.store)
    assert given.closes == 1
