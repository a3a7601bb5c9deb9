"""A Ctrl+C or SIGTERM that lands while a run records its end does not cut that short."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fixtures_runs import UNREACHABLE, A, all_failed_open_plan

from gapfill.cli import cli
from gapfill.store import open_store
from gapfill.store.base import Store


@pytest.fixture(autouse=True)
def _ctrl_c_as_at_a_terminal() -> Any:
    # Ctrl+C as a shell's foreground job has it: gapfill leaves an ignored SIGINT ignored
    # (`cmd &`), and the test process may have been started with it so, or had it so
    # left; CI once ran the second-signal test with it ignored, and no signal was raised.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("at", ["record", "handover"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("mode", ["batch", "sequential", "concurrent"])
def test_a_signal_as_a_run_records_its_end_leaves_it_recorded_as_it_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, signum: int, at: str
) -> None:
    # record: the coordinator put the CLI's handlers back before it wrote the run's end: a
    # Ctrl+C or SIGTERM landing then raised KeyboardInterrupt in the middle of it. The run's
    # row stayed `running` (until the next run marked it `interrupted`), no summary was said,
    # and a run that had finished exited 130. Batch and sequential modes had the same gap.
    # handover: the engine gave its handlers back as it returned, and the CLI held the
    # signals again only after it had: a signal in between made a complete run exit 130.
    import gapfill.engine.run

    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = all_failed_open_plan(db)  # a rerun closes the plan at once: complete, exit 3
    finish_run, run_enrich = Store.finish_run, gapfill.engine.run.run_enrich

    def signalled(self: Store, *args: Any, **kwargs: Any) -> tuple[int, int, int]:
        signal.raise_signal(signum)  # its handler runs here, before the row is written
        return finish_run(self, *args, **kwargs)

    def returned_signalled(*args: Any, **kwargs: Any) -> Any:
        summary = run_enrich(*args, **kwargs)
        signal.raise_signal(signum)  # its handler runs here, as the engine returns
        return summary

    if at == "record":
        monkeypatch.setattr(Store, "finish_run", signalled)
    else:
        monkeypatch.setattr(gapfill.engine.run, "run_enrich", returned_signalled)
    term = signal.getsignal(signal.SIGTERM)
    r = _enrich(base, mode)
    assert r.exit_code == 3, r.output  # complete, with permanent failures, as without the signal
    assert "Traceback" not in r.output and "interrupted" not in r.output, r.output
    assert "Run #2" in r.output, r.output
    with open_store(db) as store:
        run = max(store.list_runs(), key=lambda run: run.run_id)
    assert run.state == "done" and run.finished_at is not None, run
    # and the handlers are given back once the end is said
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == term


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_a_second_signal_as_a_run_records_its_end_stops_it_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # The record waits for the database, which may hang: a Ctrl+C repeated there stops the
    # command at once, with one line (the next run marks the row interrupted). That line said
    # "nothing was fetched yet", as before the run started, whatever the run had committed.
    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = all_failed_open_plan(db)  # a rerun closes the plan at once: complete, exit 3

    def signalled(self: Store, *args: Any, **kwargs: Any) -> tuple[int, int, int]:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("not reached")

    monkeypatch.setattr(Store, "finish_run", signalled)
    r = _enrich(base, mode)
    assert r.exit_code == 130, r.output
    assert r.output.count("interrupted") == 1, r.output
    assert r.output.strip().splitlines()[-1] == (
        "interrupted: what the run committed is kept; rerun the same command to continue where it stopped"
    ), r.output
    assert "Traceback" not in r.output and "not reached" not in r.output, r.output


def _enrich(base: list[str], mode: str) -> Any:
    """``gapfill ... enrich`` in ``mode`` (two workers in concurrent mode), through click."""
    workers = ["--workers", "2"] if mode == "concurrent" else []
    return CliRunner().invoke(cli, [*base, "enrich", "--mode", mode, *workers])


def _ten_refs(db: str) -> None:
    """Contract ``A`` tracked in ``db``, with 10 refs, none planned."""
    base = ["--db", db, "--rpc-url", UNREACHABLE]
    assert CliRunner().invoke(cli, [*base, "contract", "add", A, "--chain-id", "1"]).exit_code == 0
    hashes = "\n".join(f"0x{i:064x}" for i in range(1, 11))
    assert CliRunner().invoke(cli, [*base, "import", "-", "--contract", A], input=hashes).exit_code == 0


def _started_worker() -> Any:
    """A process started as :func:`_starting_worker`, once it has ignored Ctrl+C."""
    import multiprocessing
    import os

    ready, ready_w = os.pipe()
    proc = multiprocessing.get_context("fork").Process(target=_starting_worker, args=(ready_w,), daemon=True)
    proc.start()
    assert os.read(ready, 1) == b"!"
    os.close(ready)
    os.close(ready_w)
    return proc


def _starting_worker(ready: int) -> None:
    """A worker process before its event loop handles SIGTERM (as the fork server starts it)."""
    import os
    import time

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.write(ready, b"!")
    time.sleep(60)


@pytest.mark.timeout(60)
def test_a_worker_the_grace_periods_sigterm_ends_as_it_starts_is_no_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With --grace-period 0, a stop as the workers start sends them SIGTERM at once; a worker
    # whose event loop had not yet set its handler died of it (-15), and the run said "[Worker-1]
    # exited with code -15", a crash the coordinator had caused itself. The worker here never
    # sets one.

    from gapfill.cli_progress import LineRenderer
    from gapfill.engine.run import Coordinator, EnrichJob
    from gapfill.errors import Interrupted

    db = f"sqlite:///{tmp_path / 'g.db'}"
    _ten_refs(db)

    def spawn_then_stop(self: Coordinator, index: int) -> Any:
        proc = _started_worker()
        signal.raise_signal(signal.SIGINT)  # the stop, as the first worker starts
        return proc

    monkeypatch.setattr(Coordinator, "_spawn", spawn_then_stop)
    monkeypatch.setattr(Coordinator, "_check_node", lambda self: True)
    lines: list[str] = []
    renderer = LineRenderer()
    monkeypatch.setattr(renderer, "line", lines.append)
    job = EnrichJob(db, (), ((1, A),), 1, workers=2, grace_period_s=0.0, measure_sequential=False)
    with pytest.raises(Interrupted):
        Coordinator(job, renderer).run()
    assert not [ln for ln in lines if "exited with code" in ln], lines
    assert any(ln.startswith("stopping: no new batches") for ln in lines), lines


@pytest.mark.timeout(60)
@pytest.mark.parametrize("database", ["up", "blips"])
def test_a_worker_the_stop_kills_gives_its_lease_back_as_a_stop_not_a_failed_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str
) -> None:
    # Review h5: the leases of a worker the stop killed (the grace period's end, a second
    # Ctrl+C) went back through the run's end as a failed attempt (no `stop`): each such stop
    # spent one of the batch's 3 attempts. And a database blip on that give-back recorded an
    # interrupted run as failed, raising the store's error in place of the stop.
    import sqlite3

    from gapfill.engine.run import Coordinator, EnrichJob
    from gapfill.errors import Interrupted, StoreError
    from gapfill.store.base import run_owner

    path = tmp_path / "g.db"
    db = f"sqlite:///{path}"
    _ten_refs(db)

    def spawn_leasing_then_stop(self: Coordinator, index: int) -> Any:
        proc = _started_worker()
        with open_store(db) as store:  # what the worker leased before the stop
            assert store.lease(run_owner(self.host, proc.pid, f"w{index + 1}", self.job.run_id), 300.0)
        signal.raise_signal(signal.SIGINT)  # the stop: --grace-period 0 sends SIGTERM at once
        return proc

    release_owner = Store.release_owner

    def blip(self: Store, owner: str, error: str = "worker stopped", *args: Any, **kwargs: Any) -> int:
        if error == "worker stopped":
            raise StoreError("the database closed the connection: check it, then rerun")
        return release_owner(self, owner, error, *args, **kwargs)

    monkeypatch.setattr(Coordinator, "_spawn", spawn_leasing_then_stop)
    monkeypatch.setattr(Coordinator, "_check_node", lambda self: True)
    if database == "blips":
        monkeypatch.setattr(Store, "release_owner", blip)
    job = EnrichJob(db, (), ((1, A),), 1, workers=1, batch_size=5, grace_period_s=0.0,
                    measure_sequential=False)  # fmt: skip
    with pytest.raises(Interrupted):
        Coordinator(job, lambda ev: None).run()
    with open_store(db) as store:
        assert max(store.list_runs(), key=lambda run: run.run_id).state == "interrupted"
    if database == "up":
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT state, attempts, stops FROM batches WHERE attempts > 0").fetchall()
        assert rows == [("pending", 1, 1)]  # given back by its stop: no attempt failed


def _signal_as_the_summary_is_said(monkeypatch: pytest.MonkeyPatch, signals: list[int]) -> None:
    """The live view (a terminal's), and ``signals`` raised as the summary's second line is
    written, once the run has returned."""
    import click

    import gapfill.cli

    monkeypatch.setattr(gapfill.cli, "_is_tty", lambda: True)
    echo = click.echo

    def echo_signalled(message: Any = None, *args: Any, **kwargs: Any) -> None:
        if isinstance(message, str) and message.startswith("  processed:"):
            for signum in signals:
                signal.raise_signal(signum)  # its handler runs here, as the line is written
        echo(message, *args, **kwargs)

    monkeypatch.setattr(click, "echo", echo_signalled)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_the_summary_is_said_leaves_the_exit_code_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    # The run had ended and been recorded complete, yet a Ctrl+C as its summary was written
    # ended the command with 130, "interrupted" and the summary cut short; where the output
    # is not a terminal, a line cut by it was written twice.
    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = all_failed_open_plan(db)  # a rerun closes the plan at once: complete, exit 3
    _signal_as_the_summary_is_said(monkeypatch, [signum])
    r = CliRunner().invoke(cli, [*base, "enrich", "--mode", "batch"])
    assert r.exit_code == 3, r.output  # complete, with permanent failures, as without the signal
    assert "Traceback" not in r.output and "interrupted" not in r.output, r.output
    assert r.output.count("  processed:") == 1 and "  calls:" in r.output, r.output  # said whole, once


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first_at", ["summary", "record"])
def test_a_second_signal_as_the_summary_is_said_stops_the_command_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_at: str
) -> None:
    # record: the first came as the run recorded its end. The engine and the CLI held them
    # each in its own count, and a repeated Ctrl+C was taken each time for a first one.
    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = all_failed_open_plan(db)
    finish_run = Store.finish_run

    def signalled(self: Store, *args: Any, **kwargs: Any) -> tuple[int, int, int]:
        signal.raise_signal(signal.SIGINT)
        return finish_run(self, *args, **kwargs)

    if first_at == "record":
        monkeypatch.setattr(Store, "finish_run", signalled)
    _signal_as_the_summary_is_said(monkeypatch, [signal.SIGINT] * (2 if first_at == "summary" else 1))
    r = CliRunner().invoke(cli, [*base, "enrich", "--mode", "batch"])
    assert r.exit_code == 130, r.output
    assert "Traceback" not in r.output and "  calls:" not in r.output, r.output


@pytest.mark.timeout(60)
def test_a_signal_as_the_unreached_contracts_are_named_leaves_the_exit_code_the_runs(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not at a terminal: the summary is said as the run ends, the contracts no endpoint
    # serves after it. A Ctrl+C as they were said ended the command with 130.
    import gapfill.cli
    import gapfill.engine.run
    from gapfill.engine.events import RunSummary

    def run_enrich(job: Any, emit: Any, end: Any = None, store: Any = None) -> RunSummary:
        summary = RunSummary(1, "batch", 1, 5, 0, 0, 1.0, 5.0, 10, 2.0, "done")
        emit(summary)
        return summary

    said: list[str] = []

    def tell(text: str) -> None:
        if not said:
            signal.raise_signal(signal.SIGINT)
        said.append(text)

    monkeypatch.setattr(gapfill.engine.run, "run_enrich", run_enrich)
    monkeypatch.setattr(gapfill.cli, "tell", tell)
    try:
        gapfill.cli._run_job(None, quiet=True, left=["no endpoint serves chain 2", "nor chain 3"])
    except KeyboardInterrupt:  # uncaught, it would stop pytest itself
        pytest.fail("the signal stopped the command as it named the contracts")
    except SystemExit as exc:
        assert exc.code == 3
    else:
        pytest.fail("no exit 3")
    assert said == ["no endpoint serves chain 2", "nor chain 3"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "sequential", "concurrent"])
def test_a_signal_as_a_run_closes_its_database_leaves_the_exit_code_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Batch and sequential mode put the CLI's handlers back before they closed the run's
    # database: a Ctrl+C then made a run recorded complete exit 130.
    from gapfill.store.sqlite import SqliteStore

    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = all_failed_open_plan(db)  # a rerun closes the plan at once: complete, exit 3
    finish_run, close = Store.finish_run, SqliteStore.close
    ended: list[int] = []

    def finished(self: Store, run_id: int, *args: Any, **kwargs: Any) -> tuple[int, int, int]:
        ended.append(run_id)
        return finish_run(self, run_id, *args, **kwargs)

    def signalled(self: SqliteStore) -> None:
        if ended and ended.pop() == self.counts_for_run:  # the run's own database, once
            signal.raise_signal(signal.SIGINT)
        close(self)

    monkeypatch.setattr(Store, "finish_run", finished)
    monkeypatch.setattr(SqliteStore, "close", signalled)
    r = _enrich(base, mode)
    assert not ended, "the run's database was not closed"
    assert r.exit_code == 3, r.output
    assert "Traceback" not in r.output and "interrupted" not in r.output, r.output


def test_a_handler_to_put_back_that_ignores_the_signal_leaves_it_ignored() -> None:
    # `gapfill enrich &` starts with SIGINT ignored: the run's end, holding with the CLI's
    # handlers to put back, counted a `kill -INT` as a Ctrl+C (a second one stopped it).
    from gapfill.signals import HeldSignals

    def term(signum: int, frame: Any) -> None: ...

    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
    end = HeldSignals()
    try:
        end.hold({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: term})
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert getattr(signal.getsignal(signal.SIGTERM), "__self__", None) is end
        end.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is term
    finally:
        end.restore()
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raised", ["CommitUnknown", "OSError"])
@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_a_run_ended_by_an_exception_is_recorded_as_it_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, raised: str
) -> None:
    # Review: the coordinator recorded as `done` a run that an exception ended: its state
    # started as `done` and only a GapfillError changed it. Two Ctrl+C during a main-thread
    # COMMIT on PostgreSQL (the plan's here) raise CommitUnknown; the command exited 130 with
    # its run `done`. Any other exception (an OSError spawning a worker) did the same, and in
    # batch mode left the row `running`.
    import gapfill.engine.run
    from gapfill.signals import CommitUnknown

    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = all_failed_open_plan(db)

    def plan(*args: Any, **kwargs: Any) -> Any:
        if raised == "CommitUnknown":
            raise CommitUnknown
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gapfill.engine.run, "_plan", plan)
    r = _enrich(base, mode)
    assert "Traceback" not in r.output, r.output
    with open_store(db) as store:
        run = max(store.list_runs(), key=lambda run: run.run_id)
    assert run.run_id == 2 and run.finished_at is not None, run
    if raised == "CommitUnknown":
        assert r.exit_code == 130, r.output
        assert run.state == "interrupted", run
        assert "rerun the same command to continue where it stopped" in r.output, r.output
    else:
        assert r.exit_code == 1, r.output
        assert run.state == "failed", run
        assert run.note == "internal error (OSError: [Errno 28] No space left on device)", run
        assert r.output.strip().splitlines()[-1].startswith("error: internal error (OSError:"), r.output


def _exits_at_once() -> None:
    raise SystemExit(1)


@pytest.mark.timeout(60)
def test_a_run_ended_by_an_exception_gives_back_the_leases_of_a_crashed_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: a worker that crashed holding a lease is restarted, and its lease given back
    # first; where that give-back stopped at two Ctrl+C (CommitUnknown), the run's end
    # released only the leases of workers still running, and the crashed one's batch sat
    # leased until its lease expired.
    import multiprocessing
    import sqlite3

    from gapfill.engine.run import Coordinator, EnrichJob
    from gapfill.errors import Interrupted
    from gapfill.signals import CommitUnknown
    from gapfill.store.base import run_owner

    path = tmp_path / "g.db"
    db = f"sqlite:///{path}"
    _ten_refs(db)

    def spawn_leasing(self: Coordinator, index: int) -> Any:
        proc = multiprocessing.get_context("fork").Process(target=_exits_at_once, daemon=True)
        proc.start()
        with open_store(db) as store:  # what the worker leased before it crashed
            assert store.lease(run_owner(self.host, proc.pid, f"w{index + 1}", self.job.run_id), 300.0)
        proc.join()
        return proc

    release_owner = Store.release_owner

    def cut(self: Store, owner: str, error: str = "worker stopped", *args: Any, **kwargs: Any) -> int:
        if error.startswith("worker exited"):  # the restart's give-back
            raise CommitUnknown
        return release_owner(self, owner, error, *args, **kwargs)

    monkeypatch.setattr(Coordinator, "_spawn", spawn_leasing)
    monkeypatch.setattr(Coordinator, "_check_node", lambda self: True)
    monkeypatch.setattr(Store, "release_owner", cut)
    job = EnrichJob(db, (), ((1, A),), 1, workers=1, batch_size=5, measure_sequential=False)
    try:
        Coordinator(job, lambda ev: None).run()
    except Interrupted:
        pass
    except KeyboardInterrupt:  # uncaught, it would stop pytest itself
        pytest.fail("the run did not end as interrupted")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM batches WHERE lease_owner IS NOT NULL").fetchone() == (0,)
    with open_store(db) as store:
        assert max(store.list_runs(), key=lambda run: run.run_id).state == "interrupted"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_a_database_failing_at_the_runs_end_does_not_hide_why_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # A run that failed (here: the node, as it was planned) still fills the block numbers of
    # its refs at its end, outside any except clause: a database failing there too must not
    # replace the run's own error with its own (the user would fix the wrong thing).
    # `idle.fill_block_numbers` is best effort; this guards that it stays so.
    import gapfill.engine.run
    from gapfill.errors import RpcError, StoreError

    db = f"sqlite:///{tmp_path / 'g.db'}"
    base = all_failed_open_plan(db)

    def plan(*args: Any, **kwargs: Any) -> Any:
        raise RpcError("the RPC node went away: check it, then rerun")

    def fill(*args: Any, **kwargs: Any) -> None:
        raise StoreError("the database went away: check it, then rerun")

    monkeypatch.setattr(gapfill.engine.run, "_plan", plan)
    monkeypatch.setattr(Store, "fill_block_numbers", fill)
    r = _enrich(base, mode)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output, r.output
    assert "the RPC node went away" in r.output and "database went away" not in r.output, r.output



def _spawn_waiting_for_a_slot(self: Any, index: int) -> Any:
    """A worker as :func:`_started_worker`, which has said it waits for a connection slot
    (:class:`WorkerWaitsForSlot`, through an event pipe of its own)."""
    import multiprocessing

    from gapfill.engine.events import WorkerWaitsForSlot

    proc = _started_worker()
    reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)
    writer.send(WorkerWaitsForSlot(index, proc.pid, "no connection slot is free on the server", 30.0))
    writer.close()
    self.events.append(reader)
    return proc


def _coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawn: Any, **job: Any
) -> tuple[Any, list[Any]]:
    """A one-worker Coordinator of ten refs whose workers ``spawn`` starts, and the events it emits."""
    from gapfill.engine.run import Coordinator, EnrichJob

    db = f"sqlite:///{tmp_path / 'g.db'}"
    _ten_refs(db)
    monkeypatch.setattr(Coordinator, "_spawn", spawn)
    monkeypatch.setattr(Coordinator, "_check_node", lambda self: True)
    seen: list[Any] = []
    job.setdefault("measure_sequential", False)
    return Coordinator(EnrichJob(db, (), ((1, A),), 1, workers=1, **job), seen.append), seen


@pytest.mark.timeout(60)
def test_a_worker_stopped_as_it_waits_for_a_slot_is_not_restarted_as_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plan has no open batch left (the other workers finished it): the coordinator sends
    # SIGTERM to the workers still waiting for a connection slot. One still starting (its
    # handler not set yet) died of it (-15), and the run not stopping, the supervision loop
    # restarted it as a crash ("[Worker-1] exited with code -15; restarted"), counting a
    # restart, again and again until "workers keep crashing" failed the run.
    from gapfill.engine.events import Notice, WorkerExited

    spawned: list[int] = []

    def spawn(self: Any, index: int) -> Any:
        proc = _spawn_waiting_for_a_slot(self, index)
        spawned.append(proc.pid)
        return proc

    c, seen = _coordinator(tmp_path, monkeypatch, spawn)
    # Planned and counted open, then closed by the other workers as this one waits.
    monkeypatch.setattr(Store, "has_open_batches", lambda self, targets=None: not spawned)
    summary = c.run()
    assert len(spawned) == 1 and c.restarts == 0 and summary.restarts == 0, seen
    assert not [ev for ev in seen if isinstance(ev, Notice) and "restarted" in ev.text], seen
    assert any(isinstance(ev, Notice) and "stops waiting for a connection slot" in ev.text for ev in seen)
    exited = [ev for ev in seen if isinstance(ev, WorkerExited)]
    assert [(ev.exitcode, ev.restarted, ev.killed) for ev in exited] == [(-signal.SIGTERM, False, True)]


@pytest.mark.timeout(60)
def test_a_worker_killed_from_outside_the_run_is_still_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other side of the test above: a SIGTERM the coordinator did not send (its slot not
    # `terminated`) that kills a starting worker is a crash, and the worker is restarted.
    import os

    from gapfill.engine.events import Notice
    from gapfill.errors import Interrupted

    spawned: list[int] = []

    def spawn(self: Any, index: int) -> Any:
        proc = _started_worker()
        spawned.append(proc.pid)
        if len(spawned) == 1:
            os.kill(proc.pid, signal.SIGTERM)  # from outside the run
            proc.join(10)
        else:  # the restarted one: the user stops the run (its grace period's SIGTERM ends it)
            signal.raise_signal(signal.SIGINT)
        return proc

    c, seen = _coordinator(tmp_path, monkeypatch, spawn, grace_period_s=0.0)
    with pytest.raises(Interrupted):
        c.run()
    assert len(spawned) == 2 and c.restarts == 1, seen
    assert [ev.text for ev in seen if isinstance(ev, Notice) and "restarted" in ev.text] == [
        "[Worker-1] exited with code -15; restarted"
    ], seen


@pytest.mark.timeout(60)
def test_a_stop_just_before_the_start_up_sample_starts_no_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3c52896 planned first, and checked for a stop only before looking for a recorded
    # sequential rate: a Ctrl+C during that look-up (or before the sample's task was there to
    # cancel) let the sample run its 2 s budget after the stop and write its rows.
    from gapfill.engine import run
    from gapfill.errors import Interrupted

    sampled: list[bool] = []

    async def sample(*args: Any) -> None:
        sampled.append(True)

    def stopped_as_it_looks(*args: Any) -> None:
        signal.raise_signal(signal.SIGINT)  # its handler runs here, as the rate is looked up
        return None

    monkeypatch.setattr(run, "recorded_sequential_rate", stopped_as_it_looks)
    monkeypatch.setattr(run, "_measure_sequential", sample)
    c, seen = _coordinator(tmp_path, monkeypatch, lambda self, index: pytest.fail("a worker started"),
                           measure_sequential=True)  # fmt: skip
    with pytest.raises(Interrupted):
        c.run()
    assert sampled == [], seen
