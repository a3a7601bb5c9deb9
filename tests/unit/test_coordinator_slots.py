"""The coordinator's slots as a --metrics-port scrape reads them (from the HTTP server's
thread) while the main loop adds and restarts workers, and a restarted slot's state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gapfill.engine.run import Coordinator, EnrichJob, _Slot
from gapfill.settings import EndpointSetting


class FakeProc:
    def __init__(self, pid: int, exitcode: int | None = None) -> None:
        self.pid = pid
        self.exitcode = exitcode

    def is_alive(self) -> bool:
        return self.exitcode is None


class FakeStore:
    def release_owner(self, *args: object, **kwargs: object) -> int:
        return 0

    def has_open_batches(self, *args: object) -> bool:
        return True


class HookedStats:
    """A worker's last stats, whose ``rate_limited`` (read last by a restart's move into the
    base counters, and by a scrape) calls ``hook`` once, in the thread that reads it."""

    def __init__(self, pid: int, calls: int, hook: Callable[[], None]) -> None:
        self.pid, self.calls, self.retries, self.hook = pid, calls, 1, hook

    @property
    def rate_limited(self) -> int:
        hook, self.hook = self.hook, lambda: None
        hook()
        return 0


@pytest.fixture
def coordinator(monkeypatch: pytest.MonkeyPatch) -> Iterator[Coordinator]:
    job = EnrichJob(db_url="sqlite:///unused.db", endpoints=(EndpointSetting("http://127.0.0.1:1"),),
                    targets=((1, "0x" + "11" * 20),), chain_id=1, workers=2)  # fmt: skip
    c = Coordinator(job, lambda ev: None)
    pids = iter(range(200, 300))
    monkeypatch.setattr(c, "_spawn", lambda index: FakeProc(next(pids)))
    try:
        yield c
    finally:
        c.lifeline.close()
        c._lifeline_w.close()


def scrape_in_thread(c: Coordinator) -> tuple[threading.Thread, list[Any]]:
    """A scrape, from a thread of its own as the HTTP server's: its totals, or what it raised."""
    got: list[Any] = []

    def scrape() -> None:
        try:
            got.append(c.totals())
        except Exception as exc:  # what the scrape's HTTP answer would have been
            got.append(exc)

    return threading.Thread(target=scrape, daemon=True), got


def test_a_scrape_during_the_spawning_reads_the_slots_whole(coordinator: Coordinator) -> None:
    c = coordinator
    in_scrape, go_on = threading.Event(), threading.Event()

    def pause() -> None:  # the scrape, halfway through the slots
        in_scrape.set()
        go_on.wait(10)

    c.slots[0] = _Slot(0, FakeProc(100), time.monotonic(), stats=HookedStats(100, 7, pause))  # type: ignore[arg-type]
    scrape, got = scrape_in_thread(c)
    scrape.start()
    assert in_scrape.wait(10)
    spawning = threading.Thread(target=c._add_slot, args=(1,), daemon=True)
    spawning.start()
    spawning.join(0.3)  # done at once on the old code; waits for the scrape on the new
    go_on.set()
    scrape.join(10)
    spawning.join(10)
    assert got == [(0, 0, 7, 1, 0)]  # it raised "dictionary changed size during iteration"
    assert sorted(c.slots) == [0, 1]


def test_a_scrape_during_a_restart_counts_the_workers_calls_once(coordinator: Coordinator) -> None:
    c = coordinator
    scrape: threading.Thread | None = None
    got: list[Any] = []

    def scrape_now() -> None:  # the restart, halfway through moving the stats to the base
        nonlocal scrape, got
        scrape, got = scrape_in_thread(c)
        scrape.start()
        scrape.join(0.3)  # done at once on the old code; waits for the move on the new

    c.slots[0] = _Slot(0, FakeProc(100, exitcode=1), time.monotonic(),
                       stats=HookedStats(100, 7, scrape_now))  # type: ignore[arg-type]  # fmt: skip
    c._restart(FakeStore(), c.slots[0])  # type: ignore[arg-type]
    assert scrape is not None
    scrape.join(10)
    assert got == [(0, 0, 7, 1, 0)]  # it counted 14 calls and 2 retries
    assert c.totals() == (0, 0, 7, 1, 0)
    assert c.slots[0].stats is None and c.slots[0].proc.pid == 200


def test_a_restarted_slots_new_worker_is_not_taken_for_one_the_coordinator_stopped(
    coordinator: Coordinator,
) -> None:
    # _stop_waiting sends SIGTERM to a worker still waiting for a connection slot, the plan
    # having no open batch left; one still starting dies of it and is restarted, as is every
    # slot when open batches come back once all have ended. The new worker kept the flag: a
    # SIGTERM from outside the run then (it gives its batches back, exits 0) was never
    # restarted, the run going on a worker short, and its death of a SIGTERM while starting
    # read as the coordinator's own stop, not as a crash.
    c = coordinator
    s = c.slots[0] = _Slot(0, FakeProc(100, exitcode=-15), time.monotonic(), terminated=True)  # type: ignore[arg-type]
    store = FakeStore()
    c._restart(store, s)  # type: ignore[arg-type]
    assert not s.terminated
    s.proc.exitcode = 0  # type: ignore[attr-defined]  # stopped from outside, batches still open
    assert c._ended_early(store, s)  # type: ignore[arg-type]


def test_a_worker_the_coordinator_stopped_is_started_again_as_no_crash(coordinator: Coordinator) -> None:
    # _stop_waiting stops (SIGTERM) a worker waiting for a connection slot, no batch being
    # open; one still starting dies of it. Once every worker has ended while batches are open
    # again (another run planned more), each slot is restarted: that one was said as a crash
    # ("exited with code -15; restarted") and counted against the restart budget.
    from gapfill.engine.events import Notice, WorkerExited

    c = coordinator
    seen: list[Any] = []
    c.emit = seen.append
    s = c.slots[0] = _Slot(0, FakeProc(100, exitcode=-15), time.monotonic(), terminated=True)  # type: ignore[arg-type]
    c._restart(FakeStore(), s)  # type: ignore[arg-type]
    assert c.restarts == 0 and s.restarts == 0 and s.proc.pid == 200
    assert [ev.text for ev in seen if isinstance(ev, Notice)] == [
        "[Worker-1] was stopped while no batch was open, and batches are open again; restarted"]
    assert [ev.killed for ev in seen if isinstance(ev, WorkerExited)] == [True]
    # A SIGTERM from outside the run (the slot not stopped by the coordinator) is a crash.
    s.proc.exitcode = -15  # type: ignore[attr-defined]
    c._restart(FakeStore(), s)  # type: ignore[arg-type]
    assert c.restarts == 1 and s.restarts == 1
    assert seen[-1] == Notice("[Worker-1] exited with code -15; restarted")


@pytest.mark.parametrize(("workers", "each"), [(1, 8), (2, 4), (3, 3), (4, 2), (8, 2)])
def test_the_workers_share_a_batch_runs_requests_in_flight(
    monkeypatch: pytest.MonkeyPatch, workers: int, each: int
) -> None:
    # On 2 cores shared with anvil, 2 workers with 8 requests in flight each cost the node
    # 11% more CPU per transaction than a batch run's 8, and the node bounds the run: the
    # workers share those 8 (at least 2 each).
    from dataclasses import replace

    from gapfill.engine.run import shared_in_flight

    job = EnrichJob(db_url="sqlite:///unused.db", endpoints=(EndpointSetting("http://127.0.0.1:1"),),
                    targets=((1, "0x" + "11" * 20),), chain_id=1, workers=workers)  # fmt: skip
    c = Coordinator(job, lambda ev: None)
    sent: list[EnrichJob] = []

    class Process:
        def __init__(self, *, args: tuple[Any, ...], **kwargs: Any) -> None:
            sent.append(args[1])

        def start(self) -> None:
            pass

    monkeypatch.setattr(c.ctx, "Process", Process)
    try:
        c._spawn(0)
    finally:
        c.lifeline.close()
        c._lifeline_w.close()
        for conn in c.events:
            conn.close()
    assert job.rpc.max_in_flight == 8
    assert sent[0].rpc.max_in_flight == each
    assert sent[0].rpc == replace(job.rpc, max_in_flight=each)
    # never more than the settings ask for (a client of 1 stays 1)
    assert shared_in_flight(replace(job.rpc, max_in_flight=1), workers).max_in_flight == 1
